//! Multi-head attention with an append-only KV cache, causal and padding masks, an optional
//! MAGNETO sub-LayerNorm before the output projection, and a pluggable position treatment.
//!
//! One module serves every attention of the project: the KOSMOS text decoders' self-attention
//! (torchscale `MultiheadAttention` with `subln=True`, HF `KosmosTextAttention` with
//! `inner_attn_ln`), and the bidirectional / cross-attention of the vision side.
//!
//! Two implementations compute the same function:
//! * [`AttentionImpl::Explicit`]: `softmax(q k^T * d^-0.5 + mask) v` written out, masks filled
//!   with the dtype's most negative finite value as HF does (so a fully masked row gives a
//!   uniform distribution, never NaN). This is the tested reference path.
//! * [`AttentionImpl::Fused`]: Burn's `burn::tensor::module::attention`, which each backend may
//!   implement with a flash kernel, or on flex with AVX-512 (outside autodiff) this project's
//!   kernel [`crate::fused::attention`]. Fully masked rows come out as zeros there; they are
//!   never read (they are left-padding rows).
//!
//! The kernel choice applies to uncached calls and to the prefill of an empty cache. Once a
//! [`KvCache`] holds tokens, a step attends over the cache's segments in place: with `Fused`, on
//! flex with AVX-512 and at most [`crate::fused::CACHED_MAX_QUERIES`] new tokens, through
//! [`crate::fused::cached_attention`]; otherwise with [`segmented_attention`] (the explicit
//! computation, split by segment).

use burn::config::Config;
use burn::module::Module;
use burn::nn::{LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::softmax;
use burn::tensor::module::attention as fused_attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, DType};

use crate::lora::{LoraAdapter, LoraSlot, forward_with};
use crate::packed::PackedWeight;
use crate::positions::{Xpos, XposConfig};

/// Which attention kernel to run.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum AttentionImpl {
    /// Matmul, mask, softmax, matmul, written out (the reference path).
    Explicit,
    /// Burn's fused attention operator (flash kernels where the backend has them), or
    /// [`crate::fused::attention`] where it applies (flex f32 with AVX-512, outside autodiff).
    Fused,
}

/// Relative position treatment applied to queries and keys after projection.
#[derive(Config, Debug, PartialEq)]
pub enum PositionTreatment {
    /// No relative positions (absolute positions, if any, are added to the embeddings).
    None,
    /// XPOS, as torchscale's `xpos_rel_pos`.
    Xpos(XposConfig),
}

/// Configuration of [`MultiHeadAttention`].
#[derive(Config, Debug)]
pub struct MultiHeadAttentionConfig {
    /// Model width (query, key, value and output width).
    pub embed_dim: usize,
    /// Number of heads; `embed_dim` must be divisible by it.
    pub num_heads: usize,
    /// Whether q/k/v/out projections carry a bias.
    #[config(default = true)]
    pub bias: bool,
    /// MAGNETO sub-LayerNorm (`inner_attn_ln`) on the attention output before `out_proj`.
    #[config(default = false)]
    pub inner_attn_ln: bool,
    /// Epsilon of `inner_attn_ln`.
    #[config(default = 1e-5)]
    pub layer_norm_eps: f64,
    /// Position treatment applied to q and k.
    #[config(default = "PositionTreatment::None")]
    pub position: PositionTreatment,
    /// Kernel choice.
    #[config(default = "AttentionImpl::Fused")]
    pub implementation: AttentionImpl,
}

impl MultiHeadAttentionConfig {
    /// Initialise the module. Projections use PyTorch's default `nn.Linear` initialisation
    /// (`U(-1/sqrt(fan_in), 1/sqrt(fan_in))` for weights and biases); callers that follow another
    /// rule (MAGNETO, CLIP) re-initialise afterwards.
    pub fn init<B: Backend>(&self, device: &B::Device) -> MultiHeadAttention<B> {
        assert!(
            self.num_heads > 0 && self.embed_dim % self.num_heads == 0,
            "embed_dim {} is not divisible by num_heads {}",
            self.embed_dim,
            self.num_heads
        );
        let linear = || {
            LinearConfig::new(self.embed_dim, self.embed_dim)
                .with_bias(self.bias)
                .init(device)
        };
        let position = match &self.position {
            PositionTreatment::None => None,
            PositionTreatment::Xpos(c) => Some(c.init()),
        };
        MultiHeadAttention {
            q_proj: linear(),
            k_proj: linear(),
            v_proj: linear(),
            out_proj: linear(),
            q_proj_lora: None,
            q_proj_packed: None,
            k_proj_lora: None,
            k_proj_packed: None,
            v_proj_lora: None,
            v_proj_packed: None,
            out_proj_lora: None,
            out_proj_packed: None,
            inner_attn_ln: self.inner_attn_ln.then(|| {
                LayerNormConfig::new(self.embed_dim)
                    .with_epsilon(self.layer_norm_eps)
                    .init(device)
            }),
            num_heads: self.num_heads,
            xpos: position,
            implementation: self.implementation,
        }
    }
}

/// Multi-head attention. Field names follow the HF/torchscale state-dict tree.
#[derive(Module, Debug)]
pub struct MultiHeadAttention<B: Backend> {
    /// Query projection.
    pub q_proj: Linear<B>,
    /// Key projection.
    pub k_proj: Linear<B>,
    /// Value projection.
    pub v_proj: Linear<B>,
    /// Output projection.
    pub out_proj: Linear<B>,
    /// LoRA adapter of `q_proj` (see [`crate::lora`]).
    pub q_proj_lora: Option<LoraAdapter<B>>,
    /// bf16/Q8 copy of `q_proj` for decode steps (see [`crate::packed`]).
    pub q_proj_packed: Option<PackedWeight<B>>,
    /// LoRA adapter of `k_proj`.
    pub k_proj_lora: Option<LoraAdapter<B>>,
    /// bf16/Q8 copy of `k_proj` for decode steps (see [`crate::packed`]).
    pub k_proj_packed: Option<PackedWeight<B>>,
    /// LoRA adapter of `v_proj`.
    pub v_proj_lora: Option<LoraAdapter<B>>,
    /// bf16/Q8 copy of `v_proj` for decode steps (see [`crate::packed`]).
    pub v_proj_packed: Option<PackedWeight<B>>,
    /// LoRA adapter of `out_proj`.
    pub out_proj_lora: Option<LoraAdapter<B>>,
    /// bf16/Q8 copy of `out_proj` for decode steps (see [`crate::packed`]).
    pub out_proj_packed: Option<PackedWeight<B>>,
    /// MAGNETO sub-LayerNorm before `out_proj`.
    pub inner_attn_ln: Option<LayerNorm<B>>,
    #[module(skip)]
    num_heads: usize,
    #[module(skip)]
    xpos: Option<Xpos>,
    #[module(skip)]
    implementation: AttentionImpl,
}

/// Masks of one attention call.
#[derive(Clone, Debug)]
pub struct AttentionMask<B: Backend> {
    /// Causal masking: query `i` of `t` new tokens (absolute index `s - t + i` among `s` keys) sees
    /// keys `0..=s - t + i`.
    pub causal: bool,
    /// Key padding, `[batch, keys]`, `true` where the key is padding (covers cached keys too).
    pub key_padding: Option<Tensor<B, 2, Bool>>,
    /// Document of each key, `[batch, keys]` (rows packing several documents): a query sees only
    /// keys of its own document (the queries are the last `queries` keys). `None`: one document
    /// per row.
    pub documents: Option<Tensor<B, 2, Int>>,
}

impl<B: Backend> AttentionMask<B> {
    /// No masking (bidirectional attention, cross-attention).
    pub fn none() -> Self {
        Self {
            causal: false,
            key_padding: None,
            documents: None,
        }
    }

    /// Causal masking without padding.
    pub fn causal() -> Self {
        Self {
            causal: true,
            key_padding: None,
            documents: None,
        }
    }

    /// Causal masking plus a key padding mask built from an attention mask (`1` = real token,
    /// `0` = padding) over all keys (cached and new), `[batch, keys]`.
    pub fn causal_with_attention_mask(attention_mask: Tensor<B, 2, Int>) -> Self {
        Self {
            causal: true,
            key_padding: Some(attention_mask.equal_elem(0)),
            documents: None,
        }
    }

    /// This mask, with attention kept inside documents (`[batch, keys]` document ids, see
    /// [`AttentionMask::documents`]).
    pub fn with_documents(self, documents: Tensor<B, 2, Int>) -> Self {
        Self {
            documents: Some(documents),
            ..self
        }
    }

    /// The combined boolean mask `[batch, 1, queries, keys]` (`true` = masked), or `None`.
    pub fn to_bool(&self, batch: usize, queries: usize, keys: usize, device: &B::Device) -> Option<Tensor<B, 4, Bool>> {
        // One query (a decode step) is the last position: the causal mask hides nothing.
        let causal = (self.causal && queries > 1).then(|| {
            // key j is hidden from query i when j > (keys - queries) + i
            let offset = keys as i64 - queries as i64;
            let rows = Tensor::<B, 1, Int>::arange(0..queries as i64, device)
                .reshape([queries, 1])
                .add_scalar(offset);
            let cols = Tensor::<B, 1, Int>::arange(0..keys as i64, device).reshape([1, keys]);
            rows.lower(cols).reshape([1, 1, queries, keys])
        });
        let padding = self.key_padding.as_ref().map(|p| {
            let [pb, pk] = p.dims();
            assert_eq!(pk, keys, "key padding mask covers {pk} keys, attention has {keys}");
            assert_eq!(pb, batch, "key padding mask has batch {pb}, attention has {batch}");
            p.clone().reshape([batch, 1, 1, keys])
        });
        let documents = self.documents.as_ref().map(|d| {
            let [db, dk] = d.dims();
            assert_eq!(
                (db, dk),
                (batch, keys),
                "document ids are [{db}, {dk}], attention has [{batch}, {keys}]"
            );
            let q = d
                .clone()
                .narrow(1, keys - queries, queries)
                .reshape([batch, 1, queries, 1]);
            let k = d.clone().reshape([batch, 1, 1, keys]);
            q.expand([batch, 1, queries, keys])
                .not_equal(k.expand([batch, 1, queries, keys]))
        });
        let expand = |m: Tensor<B, 4, Bool>| m.expand([batch, 1, queries, keys]);
        [causal, padding, documents]
            .into_iter()
            .flatten()
            .map(expand)
            .reduce(|a, b| a.bool_or(b))
    }
}

/// Append-only key/value cache of one attention layer, stored in segments.
///
/// Tokens are kept token-major (`[batch, slots, heads, head_dim]`) in a short list of segments:
///
/// * new tokens are written into an open *chunk* of [`KvCache::CHUNK`] slots (a bulk append of at
///   least `CHUNK` tokens, such as a prompt prefill, becomes a sealed segment of its own);
/// * when a chunk fills up it is sealed, and the sealed segments at the end of the list are
///   concatenated pairwise while the older one is not longer than the newer one (a binary
///   counter: segment lengths roughly halve along the list).
///
/// So a write never touches more than one chunk, whatever the cache length: this matters on
/// backends whose `slice_assign` copies the whole destination (Burn 0.21's `flex` does, see the
/// Generation chapter), where a flat buffer makes each append O(length). Over a sequence of `n`
/// tokens each token is copied by merges at most `log2(n / CHUNK)` times (5 times at 2,048
/// tokens), and there are at most `log2(n / CHUNK) + 2` segments. Attention reads the segments
/// in place ([`MultiHeadAttention::forward`] computes the scores per segment, one softmax over
/// all of them, and sums the per-segment products with the values), so nothing is
/// re-concatenated per token. Keys are stored *before* the position treatment (XPOS is
/// re-applied over the whole window each step, as torchscale does).
#[derive(Clone, Debug)]
pub struct KvCache<B: Backend> {
    segments: Vec<KvSegment<B>>,
    len: usize,
}

/// One segment of a [`KvCache`]: `len` live rows of `keys`/`values` (`[batch, slots, heads,
/// head_dim]`); a chunk has free slots after them, a sealed segment has none.
#[derive(Clone, Debug)]
struct KvSegment<B: Backend> {
    keys: Tensor<B, 4>,
    values: Tensor<B, 4>,
    len: usize,
}

impl<B: Backend> KvSegment<B> {
    fn slots(&self) -> usize {
        self.keys.dims()[1]
    }

    fn is_full(&self) -> bool {
        self.len == self.slots()
    }

    /// The live rows as `[batch, heads, len, head_dim]` views.
    fn live(&self) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let take = |t: &Tensor<B, 4>| {
            let t = if self.is_full() {
                t.clone()
            } else {
                t.clone().narrow(1, 0, self.len)
            };
            t.swap_dims(1, 2)
        };
        (take(&self.keys), take(&self.values))
    }
}

/// The live keys and values of one cache segment, as read by attention.
#[derive(Clone, Debug)]
pub struct KvSegmentView<B: Backend> {
    /// Index of the segment's first token in the cached sequence.
    pub start: usize,
    /// Keys, `[batch, heads, len, head_dim]`.
    pub keys: Tensor<B, 4>,
    /// Values, `[batch, heads, len, head_dim]`.
    pub values: Tensor<B, 4>,
}

impl<B: Backend> Default for KvCache<B> {
    fn default() -> Self {
        Self::new()
    }
}

impl<B: Backend> KvCache<B> {
    /// Slots of a chunk: single-token appends are written into chunks of this size.
    pub const CHUNK: usize = 64;

    /// An empty cache.
    pub fn new() -> Self {
        Self {
            segments: Vec::new(),
            len: 0,
        }
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Batch rows held (`None` when nothing was appended yet).
    pub fn batch(&self) -> Option<usize> {
        self.segments.first().map(|s| s.keys.dims()[0])
    }

    /// Allocated slots (live plus free slots of the open chunk).
    pub fn capacity(&self) -> usize {
        self.segments.iter().map(KvSegment::slots).sum()
    }

    /// Number of segments the cache is stored in.
    pub fn num_segments(&self) -> usize {
        self.segments.len()
    }

    /// Append keys and values of `new` tokens, laid out `[batch, new, heads, head_dim]`.
    pub fn append(&mut self, keys: Tensor<B, 4>, values: Tensor<B, 4>) {
        let [b, t, h, d] = keys.dims();
        assert_eq!(values.dims(), [b, t, h, d], "keys and values of different shapes");
        if let Some(batch) = self.batch() {
            assert_eq!(batch, b, "appending batch {b} to a cache of batch {batch}");
        }
        let mut done = 0;
        // Fill the open chunk first.
        if let Some(last) = self.segments.last_mut().filter(|s| !s.is_full()) {
            let n = (last.slots() - last.len).min(t);
            let at = last.len..last.len + n;
            last.keys = last
                .keys
                .clone()
                .slice_assign([0..b, at.clone(), 0..h, 0..d], keys.clone().narrow(1, 0, n));
            last.values = last
                .values
                .clone()
                .slice_assign([0..b, at, 0..h, 0..d], values.clone().narrow(1, 0, n));
            last.len += n;
            done = n;
            self.merge();
        }
        let rest = t - done;
        if rest >= Self::CHUNK {
            // A bulk append (a prompt): one sealed segment.
            self.segments.push(KvSegment {
                keys: keys.narrow(1, done, rest),
                values: values.narrow(1, done, rest),
                len: rest,
            });
            self.merge();
        } else if rest > 0 {
            let (device, dtype) = (keys.device(), keys.dtype());
            let fresh = || Tensor::<B, 4>::zeros([b, Self::CHUNK, h, d], (&device, dtype));
            let at = [0..b, 0..rest, 0..h, 0..d];
            self.segments.push(KvSegment {
                keys: fresh().slice_assign(at.clone(), keys.narrow(1, done, rest)),
                values: fresh().slice_assign(at, values.narrow(1, done, rest)),
                len: rest,
            });
        }
        self.len += t;
    }

    /// Concatenate the two newest segments while both are full and the older is not longer.
    fn merge(&mut self) {
        while let [.., older, newer] = self.segments.as_slice() {
            if !(older.is_full() && newer.is_full() && older.len <= newer.len) {
                break;
            }
            let newer = self.segments.pop().expect("two segments");
            let older = self.segments.pop().expect("two segments");
            self.segments.push(KvSegment {
                keys: Tensor::cat(vec![older.keys, newer.keys], 1),
                values: Tensor::cat(vec![older.values, newer.values], 1),
                len: older.len + newer.len,
            });
        }
    }

    /// The live keys and values segment by segment (views, no copy), in sequence order.
    pub fn segments(&self) -> Vec<KvSegmentView<B>> {
        let mut start = 0;
        self.segments
            .iter()
            .map(|s| {
                let (keys, values) = s.live();
                let view = KvSegmentView { start, keys, values };
                start += s.len;
                view
            })
            .collect()
    }

    /// All live keys and values concatenated, `[batch, heads, len, head_dim]`, or `None` when
    /// empty. This copies; attention reads [`KvCache::segments`] instead.
    pub fn get(&self) -> Option<(Tensor<B, 4>, Tensor<B, 4>)> {
        let (keys, values): (Vec<_>, Vec<_>) = self.segments().into_iter().map(|s| (s.keys, s.values)).unzip();
        match keys.len() {
            0 => None,
            1 => Some((keys.into_iter().next()?, values.into_iter().next()?)),
            _ => Some((Tensor::cat(keys, 2), Tensor::cat(values, 2))),
        }
    }

    /// Reorder the batch (beam search): row `i` of the result is row `indices[i]` now.
    pub fn reorder(&mut self, indices: Tensor<B, 1, Int>) {
        for s in self.segments.iter_mut() {
            s.keys = s.keys.clone().select(0, indices.clone());
            s.values = s.values.clone().select(0, indices.clone());
        }
    }
}

fn mask_min(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => f64::MIN,
        DType::F16 => -65504.0,
        DType::BF16 => -3.38953139e38,
        _ => f32::MIN as f64,
    }
}

impl<B: Backend> MultiHeadAttention<B> {
    /// Number of heads.
    pub fn num_heads(&self) -> usize {
        self.num_heads
    }

    /// The kernel this module runs.
    pub fn implementation(&self) -> AttentionImpl {
        self.implementation
    }

    /// Switch the kernel (both compute the same function).
    pub fn set_implementation(&mut self, implementation: AttentionImpl) {
        self.implementation = implementation;
    }

    /// `[b, t, e]` -> `[b, t, heads, head_dim]` (token-major, contiguous).
    fn split_heads(&self, x: Tensor<B, 3>) -> Tensor<B, 4> {
        let [b, t, e] = x.dims();
        x.reshape([b, t, self.num_heads, e / self.num_heads])
    }

    /// Attention of `query` (`[batch, new, embed]`) over `key_value` (`None` = self-attention on
    /// `query`), with the mask, and the cache (self-attention only) extended by the new keys.
    pub fn forward(
        &self,
        query: Tensor<B, 3>,
        key_value: Option<Tensor<B, 3>>,
        mask: &AttentionMask<B>,
        cache: Option<&mut KvCache<B>>,
    ) -> Tensor<B, 3> {
        let [b, t, e] = query.dims();
        let kv_in = key_value.unwrap_or_else(|| query.clone());
        let q = forward_with(
            &self.q_proj,
            self.q_proj_lora.as_ref(),
            self.q_proj_packed.as_ref(),
            query,
        );
        let q = self.split_heads(q).swap_dims(1, 2);
        let k = self.split_heads(forward_with(
            &self.k_proj,
            self.k_proj_lora.as_ref(),
            self.k_proj_packed.as_ref(),
            kv_in.clone(),
        ));
        let v = self.split_heads(forward_with(
            &self.v_proj,
            self.v_proj_lora.as_ref(),
            self.v_proj_packed.as_ref(),
            kv_in,
        ));
        let context = match cache {
            // Decoding after a prefill: attend over the cached segments in place.
            Some(cache) if !cache.is_empty() => {
                cache.append(k, v);
                let s = cache.len();
                let q = match &self.xpos {
                    Some(xpos) => xpos.apply(q, s - t, false),
                    None => q,
                };
                let mask = mask.to_bool(b, t, s, &q.device());
                let segments: Vec<KvSegmentView<B>> = cache
                    .segments()
                    .into_iter()
                    .map(|seg| KvSegmentView {
                        keys: match &self.xpos {
                            Some(xpos) => xpos.apply_in_window(seg.keys, seg.start, s, true),
                            None => seg.keys,
                        },
                        ..seg
                    })
                    .collect();
                let fused = match self.implementation {
                    AttentionImpl::Fused => crate::fused::cached_attention(&q, &segments, mask.as_ref()),
                    AttentionImpl::Explicit => None,
                };
                match fused {
                    Some(context) => context,
                    None => segmented_attention(q, segments, mask),
                }
            }
            cache => {
                if let Some(cache) = cache {
                    cache.append(k.clone(), v.clone());
                }
                let (k, v) = (k.swap_dims(1, 2), v.swap_dims(1, 2));
                let s = k.dims()[2];
                let (q, k) = match &self.xpos {
                    Some(xpos) => (xpos.apply(q, s - t, false), xpos.apply(k, 0, true)),
                    None => (q, k),
                };
                let mask = mask.to_bool(b, t, s, &q.device());
                scaled_dot_product(q, k, v, mask, self.implementation)
            }
        };
        let context = context.swap_dims(1, 2).reshape([b, t, e]);
        let context = match &self.inner_attn_ln {
            Some(ln) => ln.forward(context),
            None => context,
        };
        forward_with(
            &self.out_proj,
            self.out_proj_lora.as_ref(),
            self.out_proj_packed.as_ref(),
            context,
        )
    }

    /// The four projections with their LoRA adapter slots.
    pub fn lora_slots(&mut self) -> [LoraSlot<'_, B>; 4] {
        [
            LoraSlot::new(
                "q_proj",
                &mut self.q_proj,
                &mut self.q_proj_lora,
                &mut self.q_proj_packed,
            ),
            LoraSlot::new(
                "k_proj",
                &mut self.k_proj,
                &mut self.k_proj_lora,
                &mut self.k_proj_packed,
            ),
            LoraSlot::new(
                "v_proj",
                &mut self.v_proj,
                &mut self.v_proj_lora,
                &mut self.v_proj_packed,
            ),
            LoraSlot::new(
                "out_proj",
                &mut self.out_proj,
                &mut self.out_proj_lora,
                &mut self.out_proj_packed,
            ),
        ]
    }
}

/// Scaled dot-product attention over split heads with the chosen kernel: `q: [b,h,t,d]`,
/// `k, v: [b,h,s,d]`, mask `[b,1,t,s]` (`true` = masked). Returns `[b,h,t,d]`.
pub fn scaled_dot_product<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Option<Tensor<B, 4, Bool>>,
    implementation: AttentionImpl,
) -> Tensor<B, 4> {
    match implementation {
        AttentionImpl::Explicit => explicit_attention(q, k, v, mask),
        AttentionImpl::Fused => {
            if let Some(out) = crate::fused::attention(&q, &k, &v, mask.as_ref()) {
                return out;
            }
            let [b, h, t, _] = q.dims();
            let s = k.dims()[2];
            let mask = mask.map(|m| m.expand([b, h, t, s]));
            fused_attention(q, k, v, mask, None, AttentionModuleOptions::default())
        }
    }
}

/// `softmax(q k^T / sqrt(d) masked) v` with HF's masking convention (masked scores set to the
/// dtype's most negative finite value). `q: [b,h,t,d]`, `k, v: [b,h,s,d]`, mask `[b,1,t,s]`.
pub fn explicit_attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Option<Tensor<B, 4, Bool>>,
) -> Tensor<B, 4> {
    let [b, h, t, d] = q.dims();
    let s = k.dims()[2];
    let scores = q.matmul(k.swap_dims(2, 3)).mul_scalar((d as f64).powf(-0.5));
    let scores = match mask {
        Some(m) => {
            let min = mask_min(scores.dtype());
            scores.mask_fill(m.expand([b, h, t, s]), min)
        }
        None => scores,
    };
    softmax(scores, 3).matmul(v)
}

/// [`explicit_attention`] over keys and values held in segments (a [`KvCache`]): the scores of
/// each segment, one softmax over all of them (masked as `explicit_attention` masks), and the sum
/// of the per-segment products with the values. `q: [b,h,t,d]`, segment keys and values
/// `[b,h,len_i,d]` in sequence order, mask `[b,1,t,sum len_i]`. Returns `[b,h,t,d]`.
pub fn segmented_attention<B: Backend>(
    q: Tensor<B, 4>,
    segments: Vec<KvSegmentView<B>>,
    mask: Option<Tensor<B, 4, Bool>>,
) -> Tensor<B, 4> {
    let [b, h, t, d] = q.dims();
    if segments.len() == 1 {
        let seg = segments.into_iter().next().expect("one segment");
        return explicit_attention(q, seg.keys, seg.values, mask);
    }
    let scale = (d as f64).powf(-0.5);
    let scores: Vec<_> = segments
        .iter()
        .map(|seg| q.clone().matmul(seg.keys.clone().swap_dims(2, 3)))
        .collect();
    let scores = Tensor::cat(scores, 3).mul_scalar(scale);
    let s = scores.dims()[3];
    let scores = match mask {
        Some(m) => {
            let min = mask_min(scores.dtype());
            scores.mask_fill(m.expand([b, h, t, s]), min)
        }
        None => scores,
    };
    let probs = softmax(scores, 3);
    segments
        .into_iter()
        .map(|seg| {
            let len = seg.values.dims()[2];
            probs.clone().narrow(3, seg.start, len).matmul(seg.values)
        })
        .reduce(|acc, part| acc + part)
        .expect("at least one segment")
}
