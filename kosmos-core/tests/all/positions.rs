//! Sinusoidal positions against HF transformers, XPOS buffers against torchscale.

use burn::prelude::*;
use kosmos_core::{SinusoidalPositionsConfig, XposConfig};

use crate::common::{ATOL, Fixture, RTOL, TB, assert_close};

#[test]
fn sinusoidal_tables_match_hf() {
    let fx = Fixture::open("decoder/sinusoidal");
    let io = fx.file("io.safetensors");
    let device = Default::default();
    for (key, dim) in [("table_d32", 32), ("table_d33", 33)] {
        let reference: Tensor<TB, 2> = io.tensor(key, &device).unwrap();
        let rows = reference.dims()[0];
        let ours = SinusoidalPositionsConfig::new(dim).init().table::<TB>(rows, &device);
        assert_close(ours, reference, ATOL, RTOL, key);
    }
}

#[test]
fn sinusoidal_positions_from_left_padded_ids_match_hf() {
    let fx = Fixture::open("decoder/sinusoidal");
    let io = fx.file("io.safetensors");
    let device = Default::default();
    let ids = io.data("input_ids").unwrap().convert::<i64>().to_vec::<i64>().unwrap();
    let ids: Vec<Vec<u32>> = ids.chunks(5).map(|r| r.iter().map(|&v| v as u32).collect()).collect();
    let positions = SinusoidalPositionsConfig::new(32).init();
    for (key, past) in [("positions_out", 0), ("positions_out_past3", 3)] {
        let pos = positions.position_ids(&ids, 1, past);
        let ours = positions.embed_positions::<TB>(&pos, &device, burn::tensor::DType::F32);
        let reference: Tensor<TB, 3> = io.tensor(key, &device).unwrap();
        assert_close(ours, reference, ATOL, RTOL, key);
    }
}

#[test]
fn xpos_zeta_equals_torchscale_scale_buffer() {
    let fx = Fixture::open("decoder/layer_xpos");
    let weights = fx.file("weights.safetensors");
    let device = Default::default();
    let reference: Tensor<TB, 1> = weights.tensor("layers.0.self_attn.xpos.scale", &device).unwrap();
    let head_dim = fx.config_usize("embed_dim") / fx.config_usize("attention_heads");
    let zeta = XposConfig::new(head_dim).init().zeta();
    assert_close(
        Tensor::<TB, 1>::from_floats(zeta.as_slice(), &device),
        reference,
        1e-7,
        1e-6,
        "xpos scale",
    );
}
