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
//!   implement with a flash kernel. Fully masked rows come out as zeros there; they are never
//!   read (they are left-padding rows).

use burn::config::Config;
use burn::module::Module;
use burn::nn::{LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::softmax;
use burn::tensor::module::attention as fused_attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, DType};

use crate::positions::{Xpos, XposConfig};

/// Which attention kernel to run.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum AttentionImpl {
    /// Matmul, mask, softmax, matmul, written out (the reference path).
    Explicit,
    /// Burn's fused attention operator (flash kernels where the backend has them).
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
}

impl<B: Backend> AttentionMask<B> {
    /// No masking (bidirectional attention, cross-attention).
    pub fn none() -> Self {
        Self {
            causal: false,
            key_padding: None,
        }
    }

    /// Causal masking without padding.
    pub fn causal() -> Self {
        Self {
            causal: true,
            key_padding: None,
        }
    }

    /// Causal masking plus a key padding mask built from an attention mask (`1` = real token,
    /// `0` = padding) over all keys (cached and new), `[batch, keys]`.
    pub fn causal_with_attention_mask(attention_mask: Tensor<B, 2, Int>) -> Self {
        Self {
            causal: true,
            key_padding: Some(attention_mask.equal_elem(0)),
        }
    }

    /// The combined boolean mask `[batch, 1, queries, keys]` (`true` = masked), or `None`.
    pub fn to_bool(&self, batch: usize, queries: usize, keys: usize, device: &B::Device) -> Option<Tensor<B, 4, Bool>> {
        let causal = self.causal.then(|| {
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
        match (causal, padding) {
            (None, None) => None,
            (Some(c), None) => Some(c.expand([batch, 1, queries, keys])),
            (None, Some(p)) => Some(p.expand([batch, 1, queries, keys])),
            (Some(c), Some(p)) => Some(
                c.expand([batch, 1, queries, keys])
                    .bool_or(p.expand([batch, 1, queries, keys])),
            ),
        }
    }
}

/// Append-only key/value cache of one attention layer.
///
/// Stored token-major, `[batch, capacity, heads, head_dim]`, so that appending writes contiguous
/// rows; read back as `[batch, heads, len, head_dim]` views. Storage grows geometrically (doubling,
/// at least [`KvCache::CHUNK`] slots), so appending is amortised O(1) in copies; the live part is
/// `0..len`. Keys are stored *before* the position treatment (XPOS is re-applied over the whole
/// window each step, as torchscale does).
#[derive(Clone, Debug)]
pub struct KvCache<B: Backend> {
    keys: Option<Tensor<B, 4>>,
    values: Option<Tensor<B, 4>>,
    len: usize,
}

impl<B: Backend> Default for KvCache<B> {
    fn default() -> Self {
        Self::new()
    }
}

impl<B: Backend> KvCache<B> {
    /// Minimum number of slots allocated at a time.
    pub const CHUNK: usize = 64;

    /// An empty cache.
    pub fn new() -> Self {
        Self {
            keys: None,
            values: None,
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
        self.keys.as_ref().map(|k| k.dims()[0])
    }

    /// Allocated slots.
    pub fn capacity(&self) -> usize {
        self.keys.as_ref().map_or(0, |k| k.dims()[1])
    }

    fn grow(storage: Option<Tensor<B, 4>>, like: &Tensor<B, 4>, len: usize, needed: usize) -> Tensor<B, 4> {
        let [b, _, h, d] = like.dims();
        let cap = storage.as_ref().map_or(0, |s| s.dims()[1]);
        match storage {
            Some(s) if needed <= cap => s,
            storage => {
                let new_cap = needed.max(cap * 2).max(Self::CHUNK);
                let fresh = Tensor::<B, 4>::zeros([b, new_cap, h, d], (&like.device(), like.dtype()));
                match storage {
                    Some(old) if len > 0 => fresh.slice_assign([0..b, 0..len, 0..h, 0..d], old.narrow(1, 0, len)),
                    _ => fresh,
                }
            }
        }
    }

    /// Append keys and values of `new` tokens, laid out `[batch, new, heads, head_dim]`; returns the
    /// live keys and values as `[batch, heads, len, head_dim]`.
    pub fn append(&mut self, keys: Tensor<B, 4>, values: Tensor<B, 4>) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let [b, t, h, d] = keys.dims();
        let end = self.len + t;
        let k = Self::grow(self.keys.take(), &keys, self.len, end);
        let v = Self::grow(self.values.take(), &values, self.len, end);
        self.keys = Some(k.slice_assign([0..b, self.len..end, 0..h, 0..d], keys));
        self.values = Some(v.slice_assign([0..b, self.len..end, 0..h, 0..d], values));
        self.len = end;
        self.get().expect("just appended")
    }

    /// The live keys and values, `[batch, heads, len, head_dim]`, or `None` when empty.
    pub fn get(&self) -> Option<(Tensor<B, 4>, Tensor<B, 4>)> {
        match (&self.keys, &self.values) {
            (Some(k), Some(v)) if self.len > 0 => Some((
                k.clone().narrow(1, 0, self.len).swap_dims(1, 2),
                v.clone().narrow(1, 0, self.len).swap_dims(1, 2),
            )),
            _ => None,
        }
    }

    /// Reorder the batch (beam search): row `i` of the result is row `indices[i]` now.
    pub fn reorder(&mut self, indices: Tensor<B, 1, Int>) {
        self.keys = self.keys.take().map(|k| k.select(0, indices.clone()));
        self.values = self.values.take().map(|v| v.select(0, indices));
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
        let q = self.split_heads(self.q_proj.forward(query)).swap_dims(1, 2);
        let k = self.split_heads(self.k_proj.forward(kv_in.clone()));
        let v = self.split_heads(self.v_proj.forward(kv_in));
        let (k, v) = match cache {
            Some(cache) => cache.append(k, v),
            None => (k.swap_dims(1, 2), v.swap_dims(1, 2)),
        };
        let s = k.dims()[2];
        let (q, k) = match &self.xpos {
            Some(xpos) => (xpos.apply(q, s - t, false), xpos.apply(k, 0, true)),
            None => (q, k),
        };
        let mask = mask.to_bool(b, t, s, &q.device());
        let context = scaled_dot_product(q, k, v, mask, self.implementation);
        let context = context.swap_dims(1, 2).reshape([b, t, e]);
        let context = match &self.inner_attn_ln {
            Some(ln) => ln.forward(context),
            None => context,
        };
        self.out_proj.forward(context)
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
