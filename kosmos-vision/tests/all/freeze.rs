//! Freezing the vision tower: frozen parameters do not move under an optimizer step.

use burn::backend::Autodiff;
use burn::module::{Module, Param};
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::Distribution;
use kosmos_vision::freeze::{VisionFreeze, freeze_vision};
use kosmos_vision::{ClipVisionConfig, ClipVisionModel};

use crate::TB;

type AB = Autodiff<TB>;

fn values<const D: usize>(p: &Param<Tensor<AB, D>>) -> Vec<f32> {
    p.val().into_data().convert::<f32>().to_vec::<f32>().unwrap()
}

fn step(model: ClipVisionModel<AB>) -> (ClipVisionModel<AB>, ClipVisionModel<AB>) {
    let device = Default::default();
    let before = model.clone();
    let pixels = Tensor::<AB, 4>::random([1, 3, 28, 28], Distribution::Normal(0.0, 1.0), &device);
    let loss = model.image_features(pixels, false).powi_scalar(3).sum();
    let grads = GradientsParams::from_grads(loss.backward(), &model);
    let mut optim = AdamWConfig::new().init::<AB, ClipVisionModel<AB>>();
    let after = optim.step(1e-2, model, grads);
    (before, after)
}

fn changed<const D: usize>(a: &Param<Tensor<AB, D>>, b: &Param<Tensor<AB, D>>) -> bool {
    values(a) != values(b)
}

/// Burn initialises parameters lazily and a clone of an uninitialised parameter draws its own
/// values; materialise them so that clones share the starting point.
struct Materialize;
impl burn::module::ModuleMapper<AB> for Materialize {}

#[test]
fn frozen_tower_does_not_move_and_last_layer_does_when_asked() {
    let device = Default::default();
    let config = ClipVisionConfig::new(16, 32, 3, 2, 28, 14);
    let model: ClipVisionModel<AB> = config.init::<AB>(&device).map(&mut Materialize);

    let (before, after) = step(freeze_vision(model.clone(), VisionFreeze::All));
    assert!(!changed(
        &before.embeddings.patch_embedding.weight,
        &after.embeddings.patch_embedding.weight
    ));
    for (b, a) in before.encoder.layers.iter().zip(&after.encoder.layers) {
        assert!(!changed(&b.mlp.fc1.weight, &a.mlp.fc1.weight));
        assert!(!changed(&b.self_attn.q_proj.weight, &a.self_attn.q_proj.weight));
    }
    assert!(!changed(&before.post_layernorm.gamma, &after.post_layernorm.gamma));

    let (before, after) = step(freeze_vision(model.clone(), VisionFreeze::AllButLast));
    assert!(!changed(
        &before.embeddings.class_embedding,
        &after.embeddings.class_embedding
    ));
    assert!(!changed(
        &before.encoder.layers[0].mlp.fc1.weight,
        &after.encoder.layers[0].mlp.fc1.weight
    ));
    assert!(!changed(
        &before.encoder.layers[1].self_attn.v_proj.weight,
        &after.encoder.layers[1].self_attn.v_proj.weight
    ));
    assert!(changed(
        &before.encoder.layers[2].mlp.fc1.weight,
        &after.encoder.layers[2].mlp.fc1.weight
    ));
    assert!(changed(
        &before.encoder.layers[2].self_attn.q_proj.weight,
        &after.encoder.layers[2].self_attn.q_proj.weight
    ));
    assert!(changed(&before.post_layernorm.gamma, &after.post_layernorm.gamma));

    let (before, after) = step(freeze_vision(model, VisionFreeze::None));
    assert!(changed(
        &before.embeddings.patch_embedding.weight,
        &after.embeddings.patch_embedding.weight
    ));
    assert!(changed(
        &before.encoder.layers[0].mlp.fc1.weight,
        &after.encoder.layers[0].mlp.fc1.weight
    ));
    let _ = Module::<AB>::num_params(&after);
}
