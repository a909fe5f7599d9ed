//! MAGNETO decoder parity against torchscale 0.3.0 (fixtures from scripts/make_decoder_fixtures.py).

use burn::prelude::*;
use kosmos_core::loader::TORCHSCALE_DECODER;
use kosmos_core::{AttentionImpl, AttentionMask, Decoder, DecoderConfig, load_safetensors};

use crate::common::{ATOL, Fixture, RTOL, TB, assert_close};

/// Build the decoder a fixture describes and load its weights.
pub fn load_case<B: Backend>(fx: &Fixture, implementation: AttentionImpl, device: &B::Device) -> Decoder<B> {
    let cfg = &fx.meta["config"];
    let weights = fx.dir.join("weights.safetensors");
    // Single-layer cases hold one torchscale DecoderLayer (no final `layer_norm`).
    let final_norm = kosmos_core::loader::read_header(&weights)
        .unwrap()
        .contains_key("layer_norm.weight");
    let config = DecoderConfig::new(
        fx.config_usize("embed_dim"),
        fx.config_usize("layers"),
        fx.config_usize("attention_heads"),
        fx.config_usize("ffn_dim"),
    )
    .with_xpos_scale_base(
        cfg["xpos"]
            .as_bool()
            .unwrap()
            .then(|| cfg["xpos_scale_base"].as_f64().unwrap()),
    )
    .with_final_layer_norm(final_norm)
    .with_layer_norm_eps(cfg["layer_norm_eps"].as_f64().unwrap())
    .with_attention_impl(implementation);
    let mut decoder = config.init::<B>(device);
    let report = load_safetensors(&mut decoder, &weights, &TORCHSCALE_DECODER).unwrap();
    assert!(!report.applied.is_empty());
    decoder
}

/// Full-sequence, token-by-token cached, and chunked cached decoding against the fixture.
pub fn check_case<B: Backend>(case: &str, implementation: AttentionImpl, atol: f32, rtol: f32, device: &B::Device) {
    let fx = Fixture::open(&format!("decoder/{case}"));
    let decoder = load_case::<B>(&fx, implementation, device);
    let io = fx.file("io.safetensors");
    let x: Tensor<B, 3> = io.tensor("x", device).unwrap();
    let full_ref: Tensor<B, 3> = io.tensor("full_out", device).unwrap();
    let step_ref: Tensor<B, 3> = io.tensor("step_out", device).unwrap();
    let [b, t, e] = x.dims();
    let what = format!("{case} ({implementation:?})");

    let full = decoder.forward(x.clone(), &AttentionMask::causal(), None);
    assert_close(full, full_ref.clone(), atol, rtol, &format!("{what} full sequence"));

    // One token per step through the KV cache, as torchscale's incremental_state does.
    let mut cache = decoder.new_cache();
    let steps: Vec<Tensor<B, 3>> = (0..t)
        .map(|i| {
            decoder.forward(
                x.clone().slice([0..b, i..i + 1, 0..e]),
                &AttentionMask::causal(),
                Some(&mut cache),
            )
        })
        .collect();
    assert_eq!(cache.len(), t);
    assert_close(
        Tensor::cat(steps, 1),
        step_ref,
        atol,
        rtol,
        &format!("{what} cached, one token per step"),
    );

    // Prefill a prompt, then several tokens per step (our generalisation of the offsets).
    let split = t / 2;
    let mut cache = decoder.new_cache();
    let head = decoder.forward(
        x.clone().slice([0..b, 0..split, 0..e]),
        &AttentionMask::causal(),
        Some(&mut cache),
    );
    let tail = decoder.forward(
        x.slice([0..b, split..t, 0..e]),
        &AttentionMask::causal(),
        Some(&mut cache),
    );
    assert_close(
        Tensor::cat(vec![head, tail], 1),
        full_ref,
        atol,
        rtol,
        &format!("{what} cached, chunked"),
    );
}

#[test]
fn single_layer_with_xpos_matches_torchscale() {
    for imp in [AttentionImpl::Explicit, AttentionImpl::Fused] {
        check_case::<TB>("layer_xpos", imp, ATOL, RTOL, &Default::default());
    }
}

#[test]
fn single_layer_without_xpos_matches_torchscale() {
    for imp in [AttentionImpl::Explicit, AttentionImpl::Fused] {
        check_case::<TB>("layer_noxpos", imp, ATOL, RTOL, &Default::default());
    }
}

#[test]
fn two_layer_stack_with_final_norm_matches_torchscale() {
    for imp in [AttentionImpl::Explicit, AttentionImpl::Fused] {
        check_case::<TB>("stack2_xpos", imp, ATOL, RTOL, &Default::default());
    }
}
