//! KOSMOS-2's image-to-text projection: a single perceiver-style cross-attention that turns the
//! vision tower's per-token features into `latent_query_num` (64) image embeddings for the text
//! decoder.
//!
//! Peng et al., 2023, "Kosmos-2: Grounding Multimodal Large Language Models to the World"
//! (arXiv:2306.14824). Matches transformers 5.24.0 `Kosmos2ImageToTextProjection`: `dense` maps the
//! features to the text width, the learned `latent_query` are the queries, and the keys/values are
//! `[dense(features); latent_query]` (the latents are appended *after* the image tokens). q/k/v/out
//! projections with bias, no sub-LN, no residual, no norm.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::{Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::Distribution;
use kosmos_core::{AttentionImpl, AttentionMask, MultiHeadAttention, MultiHeadAttentionConfig};

/// Configuration of [`ImageToTextProjection`].
#[derive(Config, Debug)]
pub struct ImageToTextProjectionConfig {
    /// Width of the vision features (CLIP hidden size).
    pub vision_hidden_size: usize,
    /// Width of the text decoder.
    pub text_embed_dim: usize,
    /// Attention heads of the cross-attention (the text decoder's head count).
    pub attention_heads: usize,
    /// Number of image embeddings produced (`latent_query_num`).
    #[config(default = 64)]
    pub latent_query_num: usize,
    /// Attention kernel.
    #[config(default = "AttentionImpl::Fused")]
    pub attention_impl: AttentionImpl,
}

impl ImageToTextProjectionConfig {
    /// The projection of microsoft/kosmos-2-patch14-224 (1024 -> 2048, 32 heads, 64 latents).
    pub fn kosmos2() -> Self {
        Self::new(1024, 2048, 32)
    }

    /// Number of parameters.
    pub fn num_params(&self) -> usize {
        let (v, t) = (self.vision_hidden_size, self.text_embed_dim);
        self.latent_query_num * t + (v * t + t) + 4 * (t * t + t)
    }

    /// Initialise (latents `N(0, 1)`, PyTorch default linears).
    pub fn init<B: Backend>(&self, device: &B::Device) -> ImageToTextProjection<B> {
        ImageToTextProjection {
            dense: LinearConfig::new(self.vision_hidden_size, self.text_embed_dim).init(device),
            latent_query: Param::from_tensor(Tensor::random(
                [self.latent_query_num, self.text_embed_dim],
                Distribution::Normal(0.0, 1.0),
                device,
            )),
            x_attn: MultiHeadAttentionConfig::new(self.text_embed_dim, self.attention_heads)
                .with_implementation(self.attention_impl)
                .init(device),
        }
    }
}

/// The KOSMOS-2 image-to-text projection.
#[derive(Module, Debug)]
pub struct ImageToTextProjection<B: Backend> {
    /// Vision width -> text width.
    pub dense: Linear<B>,
    /// Learned queries `[latents, text_width]`.
    pub latent_query: Param<Tensor<B, 2>>,
    /// Cross-attention of the latents over `[features; latents]`.
    pub x_attn: MultiHeadAttention<B>,
}

impl<B: Backend> ImageToTextProjection<B> {
    /// `[B, tokens, vision_width]` features -> `[B, latents, text_width]` image embeddings.
    pub fn forward(&self, features: Tensor<B, 3>) -> Tensor<B, 3> {
        let b = features.dims()[0];
        let hidden = kosmos_core::gemv::linear(&self.dense, features);
        let [n, t] = self.latent_query.dims();
        let latents = self.latent_query.val().unsqueeze::<3>().expand([b, n, t]);
        let key_value = Tensor::cat(vec![hidden, latents.clone()], 1);
        self.x_attn
            .forward(latents, Some(key_value), &AttentionMask::none(), None)
    }
}
