//! The MAGNETO decoder of KOSMOS-1 and KOSMOS-2.
//!
//! MAGNETO (Wang et al., 2022, "Foundation Transformers", arXiv:2210.06423) is a pre-LN
//! transformer with an extra *sub-LayerNorm* inside each sublayer: `inner_attn_ln` between the
//! attention and its output projection, `ffn_layernorm` between the FFN activation and `fc2`.
//! KOSMOS-1 (Huang et al., 2023, arXiv:2302.14045) uses it with XPOS relative positions; the public
//! KOSMOS-2 checkpoint (Peng et al., 2023, arXiv:2306.14824) uses it with absolute sinusoidal
//! positions added to the embeddings.
//!
//! Matches torchscale 0.3.0 `DecoderLayer`/`Decoder` with `subln=True` (and `xpos_rel_pos`), and
//! HF transformers' `Kosmos2TextBlock`/`Kosmos2TextTransformer` layer stack. Field names follow
//! their state-dict trees (`layers.{i}.self_attn.q_proj`, `layers.{i}.ffn.fc1`, `layer_norm`, ...).

use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::{LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::Distribution;

use crate::activation::Activation;
use crate::attention::{
    AttentionImpl, AttentionMask, KvCache, MultiHeadAttention, MultiHeadAttentionConfig, PositionTreatment,
};
use crate::lora::{LoraAdapter, LoraSlot, forward_with};
use crate::packed::PackedWeight;
use crate::positions::XposConfig;

/// Configuration of the position-wise feed-forward network `fc1 -> act -> ffn_layernorm -> fc2`.
#[derive(Config, Debug)]
pub struct FeedForwardConfig {
    /// Model width.
    pub embed_dim: usize,
    /// Hidden width of the FFN.
    pub ffn_dim: usize,
    /// Activation between `fc1` and `fc2`.
    #[config(default = "Activation::Gelu")]
    pub activation: Activation,
    /// MAGNETO sub-LayerNorm (`ffn_layernorm`) after the activation.
    #[config(default = true)]
    pub subln: bool,
    /// LayerNorm epsilon.
    #[config(default = 1e-5)]
    pub layer_norm_eps: f64,
}

impl FeedForwardConfig {
    /// Initialise with PyTorch's default `nn.Linear` initialisation.
    pub fn init<B: Backend>(&self, device: &B::Device) -> FeedForward<B> {
        FeedForward {
            fc1: LinearConfig::new(self.embed_dim, self.ffn_dim).init(device),
            fc2: LinearConfig::new(self.ffn_dim, self.embed_dim).init(device),
            fc1_lora: None,
            fc1_packed: None,
            fc2_lora: None,
            fc2_packed: None,
            ffn_layernorm: self.subln.then(|| {
                LayerNormConfig::new(self.ffn_dim)
                    .with_epsilon(self.layer_norm_eps)
                    .init(device)
            }),
            activation: self.activation,
        }
    }
}

/// Feed-forward network of a decoder layer.
#[derive(Module, Debug)]
pub struct FeedForward<B: Backend> {
    /// Input projection `embed -> ffn`.
    pub fc1: Linear<B>,
    /// Output projection `ffn -> embed`.
    pub fc2: Linear<B>,
    /// LoRA adapter of `fc1` (see [`crate::lora`]).
    pub fc1_lora: Option<LoraAdapter<B>>,
    /// bf16/Q8 copy of `fc1` for decode steps (see [`crate::packed`]).
    pub fc1_packed: Option<PackedWeight<B>>,
    /// LoRA adapter of `fc2`.
    pub fc2_lora: Option<LoraAdapter<B>>,
    /// bf16/Q8 copy of `fc2` for decode steps (see [`crate::packed`]).
    pub fc2_packed: Option<PackedWeight<B>>,
    /// MAGNETO sub-LayerNorm over the hidden width.
    pub ffn_layernorm: Option<LayerNorm<B>>,
    #[module(skip)]
    activation: Activation,
}

impl<B: Backend> FeedForward<B> {
    /// `fc2(ffn_layernorm(act(fc1(x))))`.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let h = self.activation.forward(forward_with(
            &self.fc1,
            self.fc1_lora.as_ref(),
            self.fc1_packed.as_ref(),
            x,
        ));
        let h = match &self.ffn_layernorm {
            Some(ln) => ln.forward(h),
            None => h,
        };
        forward_with(&self.fc2, self.fc2_lora.as_ref(), self.fc2_packed.as_ref(), h)
    }

    /// The two projections with their LoRA adapter slots.
    pub fn lora_slots(&mut self) -> [LoraSlot<'_, B>; 2] {
        [
            LoraSlot::new("fc1", &mut self.fc1, &mut self.fc1_lora, &mut self.fc1_packed),
            LoraSlot::new("fc2", &mut self.fc2, &mut self.fc2_lora, &mut self.fc2_packed),
        ]
    }
}

/// Configuration of a MAGNETO decoder stack.
#[derive(Config, Debug)]
pub struct DecoderConfig {
    /// Model width (`decoder_embed_dim`, HF `embed_dim`).
    pub embed_dim: usize,
    /// Number of layers (`decoder_layers`, HF `layers`).
    pub layers: usize,
    /// Attention heads per layer.
    pub attention_heads: usize,
    /// FFN hidden width.
    pub ffn_dim: usize,
    /// FFN activation (KOSMOS: exact GELU).
    #[config(default = "Activation::Gelu")]
    pub activation: Activation,
    /// MAGNETO sub-LayerNorms (`inner_attn_ln`, `ffn_layernorm`).
    #[config(default = true)]
    pub subln: bool,
    /// XPOS relative positions in self-attention (`None` = no relative positions).
    #[config(default = "None")]
    pub xpos_scale_base: Option<f64>,
    /// Final LayerNorm after the last layer (`layer_norm`).
    #[config(default = true)]
    pub final_layer_norm: bool,
    /// LayerNorm epsilon everywhere in the stack.
    #[config(default = 1e-5)]
    pub layer_norm_eps: f64,
    /// Attention kernel.
    #[config(default = "AttentionImpl::Fused")]
    pub attention_impl: AttentionImpl,
}

impl DecoderConfig {
    /// KOSMOS-1's language model at paper size: 24 layers, width 2048, 32 heads, FFN 8192,
    /// MAGNETO with XPOS (scale base 512).
    pub fn kosmos1() -> Self {
        Self::new(2048, 24, 32, 8192).with_xpos_scale_base(Some(512.0))
    }

    /// The text decoder of the public KOSMOS-2 checkpoint (microsoft/kosmos-2-patch14-224):
    /// 24 layers, width 2048, 32 heads, FFN 8192, MAGNETO sub-LN, no XPOS (absolute sinusoidal
    /// positions are added to the embeddings instead).
    pub fn kosmos2() -> Self {
        Self::new(2048, 24, 32, 8192)
    }

    /// Head dimension.
    pub fn head_dim(&self) -> usize {
        self.embed_dim / self.attention_heads
    }

    /// Configuration of one layer's self-attention.
    pub fn attention_config(&self) -> MultiHeadAttentionConfig {
        let position = match self.xpos_scale_base {
            Some(base) => PositionTreatment::Xpos(XposConfig::new(self.head_dim()).with_scale_base(base)),
            None => PositionTreatment::None,
        };
        MultiHeadAttentionConfig::new(self.embed_dim, self.attention_heads)
            .with_inner_attn_ln(self.subln)
            .with_layer_norm_eps(self.layer_norm_eps)
            .with_position(position)
            .with_implementation(self.attention_impl)
    }

    /// Configuration of one layer's FFN.
    pub fn ffn_config(&self) -> FeedForwardConfig {
        FeedForwardConfig::new(self.embed_dim, self.ffn_dim)
            .with_activation(self.activation)
            .with_subln(self.subln)
            .with_layer_norm_eps(self.layer_norm_eps)
    }

    fn layer_norm<B: Backend>(&self, device: &B::Device) -> LayerNorm<B> {
        LayerNormConfig::new(self.embed_dim)
            .with_epsilon(self.layer_norm_eps)
            .init(device)
    }

    /// Initialise with PyTorch's default layer initialisation (use [`DecoderConfig::init_magneto`]
    /// for training from scratch).
    pub fn init<B: Backend>(&self, device: &B::Device) -> Decoder<B> {
        let attention = self.attention_config();
        let ffn = self.ffn_config();
        Decoder {
            layers: (0..self.layers)
                .map(|_| DecoderLayer {
                    self_attn: attention.init(device),
                    self_attn_layer_norm: self.layer_norm(device),
                    ffn: ffn.init(device),
                    final_layer_norm: self.layer_norm(device),
                })
                .collect(),
            layer_norm: self.final_layer_norm.then(|| self.layer_norm(device)),
        }
    }

    /// MAGNETO's initialisation gain for a decoder-only stack: `sqrt(ln(2N))`.
    pub fn magneto_init_scale(&self) -> f64 {
        ((2 * self.layers) as f64).ln().sqrt()
    }

    /// Initialise as torchscale 0.3.0 does for a MAGNETO decoder (`subln=True`): every linear layer
    /// keeps PyTorch's `nn.Linear` default (weight and bias `U(-1/sqrt(fan_in), 1/sqrt(fan_in))`;
    /// torchscale's Xavier `reset_parameters` of the attention is never called), LayerNorms are
    /// ones and zeros, then every parameter (weight *and* bias) of `fc1`, `fc2`, `out_proj` and
    /// `v_proj` is multiplied by [`DecoderConfig::magneto_init_scale`].
    pub fn init_magneto<B: Backend>(&self, device: &B::Device) -> Decoder<B> {
        let mut decoder = self.init(device);
        let gain = self.magneto_init_scale();
        let (e, f) = (self.embed_dim, self.ffn_dim);
        for layer in decoder.layers.iter_mut() {
            let attn = &mut layer.self_attn;
            reinit(&mut attn.q_proj, e, 1.0, device);
            reinit(&mut attn.k_proj, e, 1.0, device);
            reinit(&mut attn.v_proj, e, gain, device);
            reinit(&mut attn.out_proj, e, gain, device);
            reinit(&mut layer.ffn.fc1, e, gain, device);
            reinit(&mut layer.ffn.fc2, f, gain, device);
        }
        decoder
    }

    /// Number of parameters of the stack (layers and final norm).
    pub fn num_params(&self) -> usize {
        let e = self.embed_dim;
        let f = self.ffn_dim;
        let ln = |d: usize| 2 * d;
        let attention = 4 * (e * e + e) + if self.subln { ln(e) } else { 0 };
        let ffn = (e * f + f) + (f * e + e) + if self.subln { ln(f) } else { 0 };
        let layer = attention + ffn + 2 * ln(e);
        self.layers * layer + if self.final_layer_norm { ln(e) } else { 0 }
    }
}

/// Re-draw a linear layer with PyTorch's `nn.Linear` default (weight and bias uniform in
/// `+-1/sqrt(fan_in)`), both multiplied by `gain`.
fn reinit<B: Backend>(linear: &mut Linear<B>, fan_in: usize, gain: f64, device: &B::Device) {
    let bound = 1.0 / (fan_in as f64).sqrt();
    let uniform = Distribution::Uniform(-bound, bound);
    let weight = Tensor::<B, 2>::random(linear.weight.dims(), uniform, device).mul_scalar(gain);
    linear.weight = Param::from_tensor(weight);
    if let Some(bias) = linear.bias.as_mut() {
        *bias = Param::from_tensor(Tensor::<B, 1>::random(bias.dims(), uniform, device).mul_scalar(gain));
    }
}

/// One MAGNETO decoder layer (pre-LN, sub-LN, residual scale 1).
#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend> {
    /// Causal self-attention with `inner_attn_ln`.
    pub self_attn: MultiHeadAttention<B>,
    /// Pre-norm of the attention sublayer.
    pub self_attn_layer_norm: LayerNorm<B>,
    /// Feed-forward network with `ffn_layernorm`.
    pub ffn: FeedForward<B>,
    /// Pre-norm of the FFN sublayer.
    pub final_layer_norm: LayerNorm<B>,
}

impl<B: Backend> DecoderLayer<B> {
    /// `h = x + attn(ln(x)); out = h + ffn(ln(h))`, extending `cache` when given.
    pub fn forward(&self, x: Tensor<B, 3>, mask: &AttentionMask<B>, cache: Option<&mut KvCache<B>>) -> Tensor<B, 3> {
        let h = self.self_attn_layer_norm.forward(x.clone());
        let x = x + self.self_attn.forward(h, None, mask, cache);
        let h = self.final_layer_norm.forward(x.clone());
        x + self.ffn.forward(h)
    }
}

/// Per-layer KV caches of a decoder stack.
#[derive(Clone, Debug)]
pub struct DecoderCache<B: Backend> {
    /// One cache per layer.
    pub layers: Vec<KvCache<B>>,
}

impl<B: Backend> DecoderCache<B> {
    /// Empty caches for `layers` layers.
    pub fn new(layers: usize) -> Self {
        Self {
            layers: (0..layers).map(|_| KvCache::new()).collect(),
        }
    }

    /// Cached positions (equal in every layer).
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, KvCache::len)
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Batch rows held (`None` before the first append).
    pub fn batch(&self) -> Option<usize> {
        self.layers.first().and_then(KvCache::batch)
    }

    /// Reorder the batch of every layer (beam search).
    pub fn reorder(&mut self, indices: Tensor<B, 1, Int>) {
        for layer in self.layers.iter_mut() {
            layer.reorder(indices.clone());
        }
    }
}

/// A MAGNETO decoder stack: layers and the final LayerNorm (`layer_norm`).
#[derive(Module, Debug)]
pub struct Decoder<B: Backend> {
    /// The layers.
    pub layers: Vec<DecoderLayer<B>>,
    /// Final LayerNorm.
    pub layer_norm: Option<LayerNorm<B>>,
}

impl<B: Backend> Decoder<B> {
    /// An empty cache sized for this stack.
    pub fn new_cache(&self) -> DecoderCache<B> {
        DecoderCache::new(self.layers.len())
    }

    /// Run the stack over input embeddings `[batch, new, embed]`. With a cache, the new tokens
    /// attend to everything cached before them and the cache is extended.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        mask: &AttentionMask<B>,
        cache: Option<&mut DecoderCache<B>>,
    ) -> Tensor<B, 3> {
        let mut x = x;
        match cache {
            Some(cache) => {
                assert_eq!(
                    cache.layers.len(),
                    self.layers.len(),
                    "cache has the wrong number of layers"
                );
                for (layer, c) in self.layers.iter().zip(cache.layers.iter_mut()) {
                    x = layer.forward(x, mask, Some(c));
                }
            }
            None => {
                for layer in &self.layers {
                    x = layer.forward(x, mask, None);
                }
            }
        }
        match &self.layer_norm {
            Some(ln) => ln.forward(x),
            None => x,
        }
    }

    /// Use the given attention kernel in every layer.
    pub fn set_attention_impl(&mut self, implementation: AttentionImpl) {
        for layer in self.layers.iter_mut() {
            layer.self_attn.set_implementation(implementation);
        }
    }
}
