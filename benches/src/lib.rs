//! Shared helpers of the kosmos-burn criterion benchmarks.

use burn::prelude::*;
use burn::tensor::Distribution;
use kosmos_core::DecoderConfig;

/// Decoder-layer shapes the benchmarks run: (name, width, heads, FFN).
pub const LAYER_SHAPES: [(&str, usize, usize, usize); 2] =
    [("medium-512", 512, 8, 2048), ("kosmos2-2048", 2048, 32, 8192)];

/// Prompt length of the benchmarks: 64 image slots plus 33 text tokens.
pub const PROMPT_LEN: usize = 97;

/// A one-layer MAGNETO decoder (no final norm) at the given shape, MAGNETO-initialised.
pub fn layer<B: Backend>(width: usize, heads: usize, ffn: usize, device: &B::Device) -> kosmos_core::Decoder<B> {
    DecoderConfig::new(width, 1, heads, ffn)
        .with_final_layer_norm(false)
        .init_magneto(device)
}

/// Random hidden states `[1, len, width]`.
pub fn hidden<B: Backend>(len: usize, width: usize, device: &B::Device) -> Tensor<B, 3> {
    Tensor::random([1, len, width], Distribution::Normal(0.0, 1.0), device)
}
