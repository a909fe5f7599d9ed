//! The KOSMOS-1 perceiver resampler: a Flamingo-style stack of latent cross-attention blocks that
//! turns a variable number of image features into a fixed number (64) of image embeddings.
//!
//! Alayrac et al., 2022, "Flamingo: a Visual Language Model for Few-Shot Learning"
//! (arXiv:2204.14198); KOSMOS-1 (arXiv:2302.14045) uses a perceiver resampler between CLIP and the
//! language model. Structured so that the weights of lucidrains' `flamingo-pytorch` 0.1.2
//! `PerceiverResampler` load into it (key map `kosmos_core::loader::FLAMINGO_PERCEIVER`), and matches its
//! forward:
//!
//! * media features get a learned per-media position (`media_pos_emb`); latents are shared;
//! * each block: `latents += attn(x, latents)` then `latents += ff(latents)`, where the attention
//!   normalises media (`norm_media`) and latents (`norm_latents`), takes queries from the latents
//!   and keys/values from `[media; latents]` through one packed `to_kv` projection (keys first),
//!   and projects back with `to_out` (no biases anywhere);
//! * the FFN is `LayerNorm -> Linear(d, mult d) -> GELU -> Linear(mult d, d)`;
//! * a final LayerNorm.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::{LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::Distribution;
use kosmos_core::attention::scaled_dot_product;
use kosmos_core::gemv::linear;
use kosmos_core::{Activation, AttentionImpl};

/// Configuration of [`PerceiverResampler`] (flamingo-pytorch argument names).
#[derive(Config, Debug)]
pub struct PerceiverResamplerConfig {
    /// Width of the media features and of the latents.
    pub dim: usize,
    /// Number of blocks.
    #[config(default = 6)]
    pub depth: usize,
    /// Width of one attention head.
    #[config(default = 64)]
    pub dim_head: usize,
    /// Attention heads.
    #[config(default = 8)]
    pub heads: usize,
    /// Number of latents, i.e. of image embeddings produced (KOSMOS-1: 64).
    #[config(default = 64)]
    pub num_latents: usize,
    /// Maximum number of media per sample (rows of `media_pos_emb`).
    #[config(default = 4)]
    pub num_media_embeds: usize,
    /// FFN expansion factor.
    #[config(default = 4)]
    pub ff_mult: usize,
    /// LayerNorm epsilon.
    #[config(default = 1e-5)]
    pub layer_norm_eps: f64,
    /// Attention kernel.
    #[config(default = "AttentionImpl::Fused")]
    pub attention_impl: AttentionImpl,
}

impl PerceiverResamplerConfig {
    fn norm<B: Backend>(&self, device: &B::Device) -> LayerNorm<B> {
        LayerNormConfig::new(self.dim)
            .with_epsilon(self.layer_norm_eps)
            .init(device)
    }

    fn linear<B: Backend>(&self, d_in: usize, d_out: usize, device: &B::Device) -> Linear<B> {
        LinearConfig::new(d_in, d_out).with_bias(false).init(device)
    }

    /// Initialise (latents and media positions `N(0, 1)` as flamingo-pytorch does).
    pub fn init<B: Backend>(&self, device: &B::Device) -> PerceiverResampler<B> {
        let inner = self.dim_head * self.heads;
        let normal = Distribution::Normal(0.0, 1.0);
        PerceiverResampler {
            latents: Param::from_tensor(Tensor::random([self.num_latents, self.dim], normal, device)),
            media_pos_emb: Param::from_tensor(Tensor::random([self.num_media_embeds, 1, self.dim], normal, device)),
            layers: (0..self.depth)
                .map(|_| PerceiverBlock {
                    attn: PerceiverAttention {
                        norm_media: self.norm(device),
                        norm_latents: self.norm(device),
                        to_q: self.linear(self.dim, inner, device),
                        to_kv: self.linear(self.dim, 2 * inner, device),
                        to_out: self.linear(inner, self.dim, device),
                        heads: self.heads,
                        implementation: self.attention_impl,
                    },
                    ff: PerceiverFeedForward {
                        norm: self.norm(device),
                        fc1: self.linear(self.dim, self.dim * self.ff_mult, device),
                        fc2: self.linear(self.dim * self.ff_mult, self.dim, device),
                    },
                })
                .collect(),
            norm: self.norm(device),
        }
    }
}

/// Latent cross-attention over `[media; latents]`.
#[derive(Module, Debug)]
pub struct PerceiverAttention<B: Backend> {
    /// Norm of the media features.
    pub norm_media: LayerNorm<B>,
    /// Norm of the latents.
    pub norm_latents: LayerNorm<B>,
    /// Query projection (latents).
    pub to_q: Linear<B>,
    /// Packed key/value projection of `[media; latents]` (keys first).
    pub to_kv: Linear<B>,
    /// Output projection.
    pub to_out: Linear<B>,
    #[module(skip)]
    heads: usize,
    #[module(skip)]
    implementation: AttentionImpl,
}

impl<B: Backend> PerceiverAttention<B> {
    /// `x: [b, n, d]` media, `latents: [b, l, d]` -> `[b, l, d]`.
    pub fn forward(&self, x: Tensor<B, 3>, latents: Tensor<B, 3>) -> Tensor<B, 3> {
        let x = self.norm_media.forward(x);
        let latents = self.norm_latents.forward(latents);
        let [b, l, _] = latents.dims();
        let q = linear(&self.to_q, latents.clone());
        let kv = linear(&self.to_kv, Tensor::cat(vec![x, latents], 1));
        let [_, s, two_inner] = kv.dims();
        let inner = two_inner / 2;
        let k = kv.clone().narrow(2, 0, inner);
        let v = kv.narrow(2, inner, inner);
        let h = self.heads;
        let split = |t: Tensor<B, 3>, len: usize| t.reshape([b, len, h, inner / h]).swap_dims(1, 2);
        let out = scaled_dot_product(split(q, l), split(k, s), split(v, s), None, self.implementation);
        linear(&self.to_out, out.swap_dims(1, 2).reshape([b, l, inner]))
    }
}

/// `LayerNorm -> Linear -> GELU -> Linear`.
#[derive(Module, Debug)]
pub struct PerceiverFeedForward<B: Backend> {
    /// Pre-norm.
    pub norm: LayerNorm<B>,
    /// Expansion.
    pub fc1: Linear<B>,
    /// Projection back.
    pub fc2: Linear<B>,
}

impl<B: Backend> PerceiverFeedForward<B> {
    /// Apply the FFN (no residual).
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        linear(
            &self.fc2,
            Activation::Gelu.forward(linear(&self.fc1, self.norm.forward(x))),
        )
    }
}

/// One resampler block.
#[derive(Module, Debug)]
pub struct PerceiverBlock<B: Backend> {
    /// Latent cross-attention.
    pub attn: PerceiverAttention<B>,
    /// Feed-forward.
    pub ff: PerceiverFeedForward<B>,
}

/// The perceiver resampler.
#[derive(Module, Debug)]
pub struct PerceiverResampler<B: Backend> {
    /// Learned latents `[latents, d]`.
    pub latents: Param<Tensor<B, 2>>,
    /// Learned per-media positions `[max_media, 1, d]`.
    pub media_pos_emb: Param<Tensor<B, 3>>,
    /// The blocks.
    pub layers: Vec<PerceiverBlock<B>>,
    /// Final norm.
    pub norm: LayerNorm<B>,
}

impl<B: Backend> PerceiverResampler<B> {
    /// `[b, media, tokens, d]` features -> `[b, media, latents, d]` embeddings (one set of latents
    /// per media item).
    pub fn forward_media(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [b, t, n, d] = x.dims();
        let max_media = self.media_pos_emb.dims()[0];
        assert!(
            t <= max_media,
            "{t} media items per sample, the resampler has positions for {max_media}"
        );
        let pos = self.media_pos_emb.val().narrow(0, 0, t).unsqueeze::<4>(); // [1, t, 1, d]
        let x = (x + pos).reshape([b * t, n, d]);
        let [l, _] = self.latents.dims();
        let mut latents = self.latents.val().unsqueeze::<3>().expand([b * t, l, d]);
        for block in &self.layers {
            latents = block.attn.forward(x.clone(), latents.clone()) + latents;
            latents = block.ff.forward(latents.clone()) + latents;
        }
        self.norm.forward(latents).reshape([b, t, l, d])
    }

    /// `[b, tokens, d]` features of one image per sample -> `[b, latents, d]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, n, d] = x.dims();
        let out = self.forward_media(x.reshape([b, 1, n, d]));
        let [_, _, l, _] = out.dims();
        out.reshape([b, l, d])
    }
}
