//! The perceiver resampler against flamingo-pytorch 0.1.2 (forward and gradients).

use burn::backend::Autodiff;
use burn::prelude::*;
use kosmos_core::load_safetensors;
use kosmos_core::loader::FLAMINGO_PERCEIVER;
use kosmos_core::testing::{ATOL, Fixture, RTOL, assert_close};
use kosmos_vision::{PerceiverResampler, PerceiverResamplerConfig};

use crate::TB;

fn load<B: Backend>(fx: &Fixture, device: &B::Device) -> PerceiverResampler<B> {
    let config = PerceiverResamplerConfig::new(fx.config_usize("dim"))
        .with_depth(fx.config_usize("depth"))
        .with_dim_head(fx.config_usize("dim_head"))
        .with_heads(fx.config_usize("heads"))
        .with_num_latents(fx.config_usize("num_latents"))
        .with_num_media_embeds(fx.config_usize("num_media_embeds"))
        .with_ff_mult(fx.config_usize("ff_mult"));
    let mut model = config.init::<B>(device);
    load_safetensors(&mut model, fx.dir.join("weights.safetensors"), &FLAMINGO_PERCEIVER).unwrap();
    model
}

#[test]
fn perceiver_forward_matches_flamingo_pytorch() {
    let fx = Fixture::open("vision/perceiver");
    let device = Default::default();
    let model = load::<TB>(&fx, &device);
    let io = fx.file("io.safetensors");
    let out = model.forward_media(io.tensor::<TB, 3>("x", &device).unwrap().unsqueeze_dim(1));
    assert_close(
        out,
        io.tensor("output", &device).unwrap(),
        ATOL,
        RTOL,
        "perceiver, one media item",
    );
    let out = model.forward_media(io.tensor("x_media2", &device).unwrap());
    assert_close(
        out,
        io.tensor("output_media2", &device).unwrap(),
        ATOL,
        RTOL,
        "perceiver, two media items",
    );
}

#[test]
fn perceiver_gradients_match_flamingo_pytorch() {
    type AB = Autodiff<TB>;
    let fx = Fixture::open("vision/perceiver");
    let device = Default::default();
    let model = load::<AB>(&fx, &device);
    let io = fx.file("io.safetensors");
    let x: Tensor<AB, 3> = io.tensor::<AB, 3>("x", &device).unwrap().require_grad();
    let g: Tensor<AB, 4> = io.tensor("grad_out", &device).unwrap();
    let loss = (model.forward_media(x.clone().unsqueeze_dim(1)) * g).sum();
    let grads = loss.backward();
    let check = |ours: Tensor<TB, 2>, key: &str, transpose: bool| {
        let reference: Tensor<TB, 2> = io.tensor(key, &device).unwrap();
        let ours = if transpose { ours.transpose() } else { ours };
        assert_close(ours, reference, ATOL, RTOL, key);
    };
    check(model.latents.grad(&grads).unwrap(), "grad_latents", false);
    // Burn stores linear weights as [in, out]; PyTorch's gradients are [out, in].
    check(
        model.layers[0].attn.to_q.weight.grad(&grads).unwrap(),
        "grad_layers.0.0.to_q.weight",
        true,
    );
    check(
        model.layers[1].attn.to_kv.weight.grad(&grads).unwrap(),
        "grad_layers.1.0.to_kv.weight",
        true,
    );
    check(
        model.layers[1].ff.fc2.weight.grad(&grads).unwrap(),
        "grad_layers.1.1.3.weight",
        true,
    );
    let gx: Tensor<TB, 3> = x.grad(&grads).unwrap();
    assert_close(gx, io.tensor("grad_x", &device).unwrap(), ATOL, RTOL, "grad_x");
}
