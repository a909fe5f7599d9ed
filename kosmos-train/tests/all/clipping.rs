//! Clipping by the global norm against hand-computed values of
//! `torch.nn.utils.clip_grad_norm_` (total norm over all gradients, coefficient
//! `max_norm / (total + 1e-6)` applied when below 1).

use burn::backend::Autodiff;
use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::TensorData;
use kosmos_train::clip::{clip_grad_norm, global_grad_norm};

use crate::TB;

type AB = Autodiff<TB>;

/// A 2x2 linear layer with gradients `weight = [[3, 0], [0, 0]]`, `bias = [0, 4]` (norm 5).
fn case() -> (Linear<AB>, GradientsParams) {
    let device = Default::default();
    let layer: Linear<AB> = LinearConfig::new(2, 2).init(&device);
    let mut grads = GradientsParams::new();
    grads.register(
        layer.weight.id,
        Tensor::<TB, 2>::from_data(TensorData::new(vec![3f32, 0., 0., 0.], [2, 2]), &device),
    );
    grads.register(
        layer.bias.as_ref().unwrap().id,
        Tensor::<TB, 1>::from_data(TensorData::new(vec![0f32, 4.], [2]), &device),
    );
    (layer, grads)
}

fn values<const D: usize>(grads: &GradientsParams, id: burn::module::ParamId) -> Vec<f32> {
    grads
        .get::<TB, D>(id)
        .unwrap()
        .into_data()
        .convert::<f32>()
        .to_vec()
        .unwrap()
}

#[test]
fn global_norm_clipping_matches_hand_values() {
    let (layer, grads) = case();
    assert_eq!(global_grad_norm::<AB, _>(&layer, &grads), 5.0);

    // max_norm 1: every gradient times 1 / (5 + 1e-6)
    let (clipped, total) = clip_grad_norm::<AB, _>(&layer, grads, 1.0);
    assert_eq!(total, 5.0);
    let coef = (1.0f64 / (5.0 + 1e-6)) as f32;
    let w = values::<2>(&clipped, layer.weight.id);
    let b = values::<1>(&clipped, layer.bias.as_ref().unwrap().id);
    for (got, want) in w.iter().chain(&b).zip([3.0 * coef, 0.0, 0.0, 0.0, 0.0, 4.0 * coef]) {
        assert!((got - want).abs() <= 1e-7, "{got} vs {want}");
    }
    let after = global_grad_norm::<AB, _>(&layer, &clipped);
    assert!((after - 1.0).abs() < 1e-6, "norm after clipping {after}");

    // max_norm 10 (above the norm): unchanged
    let (layer, grads) = case();
    let (kept, total) = clip_grad_norm::<AB, _>(&layer, grads, 10.0);
    assert_eq!(total, 5.0);
    assert_eq!(values::<2>(&kept, layer.weight.id), vec![3.0, 0.0, 0.0, 0.0]);
    assert_eq!(values::<1>(&kept, layer.bias.as_ref().unwrap().id), vec![0.0, 4.0]);

    // a parameter without gradient is ignored
    let (layer, mut grads) = case();
    grads.remove::<TB, 1>(layer.bias.as_ref().unwrap().id);
    assert_eq!(global_grad_norm::<AB, _>(&layer, &grads), 3.0);
    let _ = layer.num_params();
}
