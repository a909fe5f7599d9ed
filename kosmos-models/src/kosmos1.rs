//! KOSMOS-1, assembled from the project's parts: CLIP ViT -> perceiver resampler -> a linear
//! connector -> a MAGNETO decoder with XPOS relative positions.
//!
//! Huang et al., 2023, "Language Is Not All You Need: Aligning Perception with Language Models"
//! (arXiv:2302.14045). No KOSMOS-1 weights were released, so there is no checkpoint layout to
//! match; the architecture follows the paper: the image embeddings (64 per image) replace the
//! placeholder slots between `<image>` and `</image>`, the text decoder is MAGNETO with XPOS at
//! 24 layers x 2048 (32 heads, FFN 8192), the vision tower is CLIP ViT-L/14 at 224 px, and training
//! uses next-token loss on text tokens only ([`crate::loss`]). Several images per prompt
//! (interleaved documents, few-shot prompts) each fill their own block.

use burn::config::Config;
use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig};
use burn::prelude::*;
use kosmos_core::gemv;
use kosmos_core::{AttentionMask, Decoder, DecoderConfig};
use kosmos_vision::{ClipVisionConfig, ClipVisionModel, PerceiverResampler, PerceiverResamplerConfig};

use crate::kosmos2::{Kosmos2Error, write_image_embeds};

/// Configuration of [`Kosmos1`].
#[derive(Config, Debug)]
pub struct Kosmos1Config {
    /// The text decoder (MAGNETO + XPOS).
    pub decoder: DecoderConfig,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// The vision tower.
    pub vision: ClipVisionConfig,
    /// The resampler (its `dim` is the vision width).
    pub resampler: PerceiverResamplerConfig,
}

impl Kosmos1Config {
    /// The paper's configuration: 24 x 2048 MAGNETO + XPOS decoder, 64,007-token vocabulary,
    /// CLIP ViT-L/14 at 224 px, a 6-block perceiver resampler (Flamingo's depth) with 64 latents.
    pub fn paper() -> Self {
        Self::new(
            DecoderConfig::kosmos1(),
            64007,
            ClipVisionConfig::vit_l14_224(),
            PerceiverResamplerConfig::new(1024).with_depth(6).with_num_latents(64),
        )
    }

    /// A tiny configuration for tests and examples.
    pub fn tiny(vocab_size: usize) -> Self {
        Self::new(
            DecoderConfig::new(32, 2, 4, 64).with_xpos_scale_base(Some(512.0)),
            vocab_size,
            ClipVisionConfig::new(24, 48, 2, 2, 28, 14),
            PerceiverResamplerConfig::new(24)
                .with_depth(1)
                .with_dim_head(8)
                .with_heads(3)
                .with_num_latents(4)
                .with_ff_mult(2),
        )
    }

    /// Image embeddings per image.
    pub fn latents(&self) -> usize {
        self.resampler.num_latents
    }

    /// Parameters (tied head counted once).
    pub fn num_params(&self) -> usize {
        let e = self.decoder.embed_dim;
        let d = self.resampler.dim;
        let inner = self.resampler.dim_head * self.resampler.heads;
        let block = 6 * d + 4 * d * inner + 2 * d * d * self.resampler.ff_mult;
        let resampler =
            self.resampler.num_latents * d + self.resampler.num_media_embeds * d + self.resampler.depth * block + 2 * d;
        self.vocab_size * e + self.decoder.num_params() + self.vision.num_params() + resampler + (d * e + e)
    }

    /// Initialise: MAGNETO initialisation for the decoder.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Kosmos1<B> {
        assert_eq!(
            self.resampler.dim, self.vision.hidden_size,
            "the resampler works at the vision width"
        );
        Kosmos1 {
            embed_tokens: EmbeddingConfig::new(self.vocab_size, self.decoder.embed_dim).init(device),
            decoder: self.decoder.init_magneto(device),
            vision: self.vision.init(device),
            resampler: self.resampler.init(device),
            connector: LinearConfig::new(self.resampler.dim, self.decoder.embed_dim).init(device),
        }
    }
}

/// KOSMOS-1.
#[derive(Module, Debug)]
pub struct Kosmos1<B: Backend> {
    /// Token embedding (also the output head).
    pub embed_tokens: Embedding<B>,
    /// MAGNETO + XPOS decoder with its final norm.
    pub decoder: Decoder<B>,
    /// CLIP tower.
    pub vision: ClipVisionModel<B>,
    /// Perceiver resampler.
    pub resampler: PerceiverResampler<B>,
    /// Vision width -> text width.
    pub connector: Linear<B>,
}

impl<B: Backend> Kosmos1<B> {
    /// Image embeddings `[images, latents, embed]` from pixels `[images, 3, H, W]`.
    pub fn image_embeds(&self, pixels: Tensor<B, 4>) -> Tensor<B, 3> {
        let features = self.vision.last_hidden_state(pixels, false);
        gemv::linear(&self.connector, self.resampler.forward(features))
    }

    /// Logits `[batch, len, vocab]`. `pixel_values` holds `images_per_row` images per batch row
    /// (row-major), whose embeddings fill the row's marked slots in order.
    pub fn forward(
        &self,
        input_ids: Tensor<B, 2, Int>,
        attention_mask: Option<Tensor<B, 2, Int>>,
        pixel_values: Option<Tensor<B, 4>>,
        image_embeds_position_mask: Option<Tensor<B, 2, Int>>,
    ) -> Result<Tensor<B, 3>, Kosmos2Error> {
        let [b, _] = input_ids.dims();
        let mut embeds = self.embed_tokens.forward(input_ids);
        if let (Some(pixels), Some(mask)) = (pixel_values, image_embeds_position_mask.as_ref()) {
            let images = self.image_embeds(pixels);
            let [n, l, e] = images.dims();
            if n % b != 0 {
                return Err(Kosmos2Error::Input(format!("{n} images for a batch of {b}")));
            }
            // All images of a row form one run of `images_per_row * latents` embeddings.
            embeds = write_image_embeds(embeds, &images.reshape([b, (n / b) * l, e]), mask)?;
        }
        let mask = match attention_mask {
            Some(m) => AttentionMask::causal_with_attention_mask(m),
            None => AttentionMask::causal(),
        };
        let hidden = self.decoder.forward(embeds, &mask, None);
        let [b, t, e] = hidden.dims();
        // Rows flattened (see `Kosmos2::logits`); one row splits over threads (`gemv`).
        let logits = gemv::matmul_one_row(hidden.reshape([b * t, e]), self.embed_tokens.weight.val().transpose());
        let vocab = logits.dims()[1];
        Ok(logits.reshape([b, t, vocab]))
    }
}
