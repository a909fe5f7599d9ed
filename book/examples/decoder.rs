//! Book example: a small MAGNETO + XPOS decoder, full forward and cached decoding.
use burn::prelude::*;
use burn::tensor::Distribution;
use kosmos_core::{AttentionMask, DecoderConfig};

type B = burn::backend::Flex;

fn main() {
    let device = Default::default();
    // 2 layers, width 64, 4 heads, FFN 128, XPOS with scale base 512.
    let config = DecoderConfig::new(64, 2, 4, 128).with_xpos_scale_base(Some(512.0));
    let decoder = config.init_magneto::<B>(&device);

    let x = Tensor::<B, 3>::random([1, 5, 64], Distribution::Normal(0.0, 1.0), &device);
    let full = decoder.forward(x.clone(), &AttentionMask::causal(), None);

    // The same sequence, one token at a time through the KV cache.
    let mut cache = decoder.new_cache();
    let steps: Vec<_> = (0..5)
        .map(|i| {
            decoder.forward(
                x.clone().slice([0..1, i..i + 1, 0..64]),
                &AttentionMask::causal(),
                Some(&mut cache),
            )
        })
        .collect();
    let cached = Tensor::cat(steps, 1);

    let diff: f32 = (full - cached).abs().max().into_scalar();
    println!("max |full - cached| = {diff:e}");
    assert!(diff < 1e-4);
    load_example().ok();
}

// ANCHOR: load
fn load_example() -> Result<(), kosmos_core::LoadError> {
    use kosmos_core::loader::TORCHSCALE_DECODER;
    let device = Default::default();
    // A 2-layer torchscale decoder saved with safetensors (keys `layers.{i}.…`, `layer_norm.…`).
    let mut decoder = DecoderConfig::new(32, 2, 4, 64)
        .with_xpos_scale_base(Some(512.0))
        .init::<B>(&device);
    match kosmos_core::load_safetensors(
        &mut decoder,
        "fixtures/decoder/stack2_xpos/weights.safetensors",
        &TORCHSCALE_DECODER,
    ) {
        Ok(report) => println!("loaded {} tensors", report.applied.len()),
        Err(err) => println!("{err}"), // e.g. "cannot read `…`: No such file or directory"
    }
    Ok(())
}
// ANCHOR_END: load
