//! CLIP ViT image encoder, as HF transformers' `CLIPVisionModel` structures it.
//!
//! Radford et al., 2021, "Learning Transferable Visual Models From Natural Language Supervision"
//! (arXiv:2103.00020); Dosovitskiy et al., 2020, "An Image is Worth 16x16 Words" (ViT). KOSMOS-1
//! and KOSMOS-2 use CLIP ViT-L/14 at 224 px. Matches transformers 5.24.0 `CLIPVisionTransformer`
//! (eager attention): conv patch embedding without bias, class token, learned positions,
//! `pre_layrnorm` (sic), pre-LN encoder blocks with quick_gelu MLPs, `post_layernorm` on the
//! class token for the pooled output. KOSMOS-2's image features are `post_layernorm` on *all*
//! tokens followed by per-token L2 normalisation (`Kosmos2Model.get_image_features`).
//!
//! Field names follow the HF state-dict tree (`embeddings.patch_embedding`, `pre_layrnorm`,
//! `encoder.layers.{i}.self_attn.q_proj`, `encoder.layers.{i}.mlp.fc1`, ...).

use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::Distribution;
use burn::tensor::module::interpolate;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};
use kosmos_core::lora::{LoraAdapter, LoraSlot, forward_with};
use kosmos_core::packed::PackedWeight;
use kosmos_core::{Activation, AttentionImpl, AttentionMask, MultiHeadAttention, MultiHeadAttentionConfig};

/// Configuration of a CLIP vision transformer (HF `CLIPVisionConfig` field names).
#[derive(Config, Debug)]
pub struct ClipVisionConfig {
    /// Width of the transformer.
    pub hidden_size: usize,
    /// MLP hidden width.
    pub intermediate_size: usize,
    /// Number of encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    pub num_attention_heads: usize,
    /// Input image side in pixels (the learned positions cover `(image_size / patch_size)^2`
    /// patches plus the class token).
    pub image_size: usize,
    /// Patch side in pixels.
    pub patch_size: usize,
    /// Input channels.
    #[config(default = 3)]
    pub num_channels: usize,
    /// MLP activation (CLIP: quick_gelu).
    #[config(default = "Activation::QuickGelu")]
    pub hidden_act: Activation,
    /// LayerNorm epsilon.
    #[config(default = 1e-5)]
    pub layer_norm_eps: f64,
    /// Attention kernel.
    #[config(default = "AttentionImpl::Fused")]
    pub attention_impl: AttentionImpl,
}

impl ClipVisionConfig {
    /// CLIP ViT-L/14 at 224 px, the vision tower of KOSMOS-1 and KOSMOS-2
    /// (303,179,776 parameters).
    pub fn vit_l14_224() -> Self {
        Self::new(1024, 4096, 24, 16, 224, 14)
    }

    /// Patches per side at the configured image size.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Tokens per image: patches plus the class token.
    pub fn num_positions(&self) -> usize {
        self.grid() * self.grid() + 1
    }

    /// Number of parameters.
    pub fn num_params(&self) -> usize {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let embeddings = h + h * self.num_channels * self.patch_size * self.patch_size + self.num_positions() * h;
        let layer = 4 * (h * h + h) + (h * i + i) + (i * h + h) + 4 * h;
        embeddings + 2 * h + self.num_hidden_layers * layer + 2 * h
    }

    fn layer_norm<B: Backend>(&self, device: &B::Device) -> LayerNorm<B> {
        LayerNormConfig::new(self.hidden_size)
            .with_epsilon(self.layer_norm_eps)
            .init(device)
    }

    /// Initialise (CLIP's own initialisation: normal embeddings, PyTorch default linears).
    pub fn init<B: Backend>(&self, device: &B::Device) -> ClipVisionModel<B> {
        assert!(
            self.patch_size > 0 && self.image_size % self.patch_size == 0,
            "image_size {} is not a multiple of patch_size {}",
            self.image_size,
            self.patch_size
        );
        let h = self.hidden_size;
        let attention =
            MultiHeadAttentionConfig::new(h, self.num_attention_heads).with_implementation(self.attention_impl);
        ClipVisionModel {
            embeddings: ClipEmbeddings {
                class_embedding: Param::from_tensor(Tensor::random([h], Distribution::Normal(0.0, 1.0), device)),
                patch_embedding: Conv2dConfig::new([self.num_channels, h], [self.patch_size, self.patch_size])
                    .with_stride([self.patch_size, self.patch_size])
                    .with_bias(false)
                    .init(device),
                position_embedding: EmbeddingConfig::new(self.num_positions(), h).init(device),
                patch_size: self.patch_size,
            },
            pre_layrnorm: self.layer_norm(device),
            encoder: ClipEncoder {
                layers: (0..self.num_hidden_layers)
                    .map(|_| ClipEncoderLayer {
                        self_attn: attention.init(device),
                        layer_norm1: self.layer_norm(device),
                        mlp: ClipMlp {
                            fc1: LinearConfig::new(h, self.intermediate_size).init(device),
                            fc2: LinearConfig::new(self.intermediate_size, h).init(device),
                            fc1_lora: None,
                            fc1_packed: None,
                            fc2_lora: None,
                            fc2_packed: None,
                            activation: self.hidden_act,
                        },
                        layer_norm2: self.layer_norm(device),
                    })
                    .collect(),
            },
            post_layernorm: self.layer_norm(device),
        }
    }
}

/// Patch, class and position embeddings.
#[derive(Module, Debug)]
pub struct ClipEmbeddings<B: Backend> {
    /// The class token `[hidden]`.
    pub class_embedding: Param<Tensor<B, 1>>,
    /// Patchify convolution, kernel = stride = patch size, no bias.
    pub patch_embedding: Conv2d<B>,
    /// Learned positions `[patches + 1, hidden]`.
    pub position_embedding: Embedding<B>,
    #[module(skip)]
    patch_size: usize,
}

impl<B: Backend> ClipEmbeddings<B> {
    /// `[B, C, H, W]` pixels -> `[B, 1 + (H/p)(W/p), hidden]` tokens. With `interpolate`, the
    /// learned position grid is resized bicubically to the input's grid (HF
    /// `interpolate_pos_encoding=True`); otherwise the input must have the trained size.
    pub fn forward(&self, pixels: Tensor<B, 4>, interpolate_positions: bool) -> Tensor<B, 3> {
        let [b, _, height, width] = pixels.dims();
        // Pixels come in f32; a model held in f16/bf16 embeds them in its own dtype.
        let dtype = self.patch_embedding.weight.val().dtype();
        let pixels = if pixels.dtype() == dtype {
            pixels
        } else {
            pixels.cast(dtype)
        };
        let patches = self.patch_embedding.forward(pixels); // [B, h, gh, gw]
        let [_, hidden, gh, gw] = patches.dims();
        let patches = patches.flatten::<3>(2, 3).swap_dims(1, 2); // [B, gh*gw, h]
        let class = self
            .class_embedding
            .val()
            .reshape([1, 1, hidden])
            .expand([b, 1, hidden]);
        let tokens = Tensor::cat(vec![class, patches], 1);
        let table = self.position_embedding.weight.val(); // [n, h]
        let n = table.dims()[0];
        let positions = if gh * gw + 1 == n && !interpolate_positions {
            table
        } else {
            assert!(
                interpolate_positions,
                "input {height}x{width} gives a {gh}x{gw} patch grid but the model was trained for {} positions; \
                 resize the image or enable position interpolation",
                n - 1
            );
            self.interpolated_positions(table, gh, gw)
        };
        tokens + positions.unsqueeze::<3>()
    }

    /// HF's `interpolate_pos_encoding`: keep the class row, resize the square grid of the rest to
    /// `gh x gw` with bicubic interpolation (`align_corners=False`, A = -0.75).
    fn interpolated_positions(&self, table: Tensor<B, 2>, gh: usize, gw: usize) -> Tensor<B, 2> {
        let [n, hidden] = table.dims();
        let side = ((n - 1) as f64).sqrt().round() as usize;
        if side * side + 1 == n && side == gh && side == gw {
            return table;
        }
        let class = table.clone().narrow(0, 0, 1);
        let grid = table
            .narrow(0, 1, n - 1)
            .reshape([1, side, side, hidden])
            .permute([0, 3, 1, 2]);
        let options = InterpolateOptions::new(InterpolateMode::Bicubic).with_align_corners(false);
        let resized = interpolate(grid, [gh, gw], options)
            .permute([0, 2, 3, 1])
            .reshape([gh * gw, hidden]);
        Tensor::cat(vec![class, resized], 0)
    }

    /// Patch side in pixels.
    pub fn patch_size(&self) -> usize {
        self.patch_size
    }
}

/// The MLP of an encoder layer: `fc2(act(fc1(x)))`.
#[derive(Module, Debug)]
pub struct ClipMlp<B: Backend> {
    /// `hidden -> intermediate`.
    pub fc1: Linear<B>,
    /// `intermediate -> hidden`.
    pub fc2: Linear<B>,
    /// LoRA adapter of `fc1` (see [`kosmos_core::lora`]).
    pub fc1_lora: Option<LoraAdapter<B>>,
    /// bf16/Q8 copy of `fc1` for decode steps (see [`kosmos_core::packed`]).
    pub fc1_packed: Option<PackedWeight<B>>,
    /// LoRA adapter of `fc2`.
    pub fc2_lora: Option<LoraAdapter<B>>,
    /// bf16/Q8 copy of `fc2` for decode steps (see [`kosmos_core::packed`]).
    pub fc2_packed: Option<PackedWeight<B>>,
    #[module(skip)]
    activation: Activation,
}

impl<B: Backend> ClipMlp<B> {
    /// Apply the MLP.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let h = self.activation.forward(forward_with(
            &self.fc1,
            self.fc1_lora.as_ref(),
            self.fc1_packed.as_ref(),
            x,
        ));
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

/// A pre-LN encoder block.
#[derive(Module, Debug)]
pub struct ClipEncoderLayer<B: Backend> {
    /// Bidirectional self-attention (q/k/v/out with bias, no sub-LN).
    pub self_attn: MultiHeadAttention<B>,
    /// Norm before attention.
    pub layer_norm1: LayerNorm<B>,
    /// The MLP.
    pub mlp: ClipMlp<B>,
    /// Norm before the MLP.
    pub layer_norm2: LayerNorm<B>,
}

impl<B: Backend> ClipEncoderLayer<B> {
    /// `h = x + attn(ln1(x)); h + mlp(ln2(h))`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let h = self.layer_norm1.forward(x.clone());
        let x = x + self.self_attn.forward(h, None, &AttentionMask::none(), None);
        let h = self.layer_norm2.forward(x.clone());
        x + self.mlp.forward(h)
    }
}

/// The encoder stack.
#[derive(Module, Debug)]
pub struct ClipEncoder<B: Backend> {
    /// The layers.
    pub layers: Vec<ClipEncoderLayer<B>>,
}

/// Outputs of [`ClipVisionModel::forward`].
#[derive(Debug, Clone)]
pub struct ClipVisionOutput<B: Backend> {
    /// Output of the last encoder layer, `[B, tokens, hidden]` (no final norm).
    pub last_hidden_state: Tensor<B, 3>,
    /// `post_layernorm` of the class token, `[B, hidden]`.
    pub pooler_output: Tensor<B, 2>,
}

/// The CLIP vision transformer.
#[derive(Module, Debug)]
pub struct ClipVisionModel<B: Backend> {
    /// Patch, class and position embeddings.
    pub embeddings: ClipEmbeddings<B>,
    /// LayerNorm before the encoder (HF's spelling).
    pub pre_layrnorm: LayerNorm<B>,
    /// The encoder.
    pub encoder: ClipEncoder<B>,
    /// Final LayerNorm (pooled output, KOSMOS-2 image features).
    pub post_layernorm: LayerNorm<B>,
}

impl<B: Backend> ClipVisionModel<B> {
    /// Encoder output before any final norm, `[B, tokens, hidden]`.
    pub fn last_hidden_state(&self, pixels: Tensor<B, 4>, interpolate_positions: bool) -> Tensor<B, 3> {
        let mut x = self
            .pre_layrnorm
            .forward(self.embeddings.forward(pixels, interpolate_positions));
        for layer in &self.encoder.layers {
            x = layer.forward(x);
        }
        x
    }

    /// Last hidden state and pooled output, as HF's `CLIPVisionModel` returns them.
    pub fn forward(&self, pixels: Tensor<B, 4>, interpolate_positions: bool) -> ClipVisionOutput<B> {
        let last_hidden_state = self.last_hidden_state(pixels, interpolate_positions);
        let [b, _, h] = last_hidden_state.dims();
        let cls = last_hidden_state.clone().narrow(1, 0, 1).reshape([b, h]);
        ClipVisionOutput {
            pooler_output: self.post_layernorm.forward(cls),
            last_hidden_state,
        }
    }

    /// KOSMOS-2's image features: `post_layernorm` on every token of the last hidden state, then
    /// each token vector L2-normalised (`F.normalize(dim=-1, eps=1e-12)`), `[B, tokens, hidden]`.
    pub fn image_features(&self, pixels: Tensor<B, 4>, interpolate_positions: bool) -> Tensor<B, 3> {
        let x = self
            .post_layernorm
            .forward(self.last_hidden_state(pixels, interpolate_positions));
        l2_normalize(x, 1e-12)
    }

    /// Number of encoder layers.
    pub fn num_layers(&self) -> usize {
        self.encoder.layers.len()
    }
}

/// `x / max(||x||_2, eps)` along the last dimension.
pub fn l2_normalize<B: Backend>(x: Tensor<B, 3>, eps: f64) -> Tensor<B, 3> {
    let norm = x.clone().powi_scalar(2).sum_dim(2).sqrt().clamp_min(eps);
    x / norm
}
