//! KOSMOS-1 at tiny size: end to end (images + text -> logits) and trainable.

use burn::backend::Autodiff;
use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::{Distribution, TensorData};
use kosmos_models::kosmos1::{Kosmos1, Kosmos1Config};
use kosmos_models::loss::{IGNORE_INDEX, causal_lm_loss, weighted_causal_lm_loss};

use crate::TB;

type AB = Autodiff<TB>;

/// `<s> <image> [4 slots] </image> text... <image> [4 slots] </image> text...` with ids 0..50,
/// image slot ids 4..7, two images per row.
fn batch(
    device: &burn::tensor::Device<AB>,
) -> (
    Tensor<AB, 2, Int>,
    Tensor<AB, 2, Int>,
    Tensor<AB, 2, Int>,
    Tensor<AB, 4>,
) {
    let row: Vec<i64> = vec![0, 40, 4, 5, 6, 7, 41, 20, 21, 22, 40, 4, 5, 6, 7, 41, 23, 24, 25, 2];
    let mask: Vec<i64> = row
        .iter()
        .enumerate()
        .map(|(i, _)| ((2..6).contains(&i) || (11..15).contains(&i)) as i64)
        .collect();
    let labels: Vec<i64> = row
        .iter()
        .zip(&mask)
        .map(|(&id, &m)| {
            if m == 1 || id == 40 || id == 41 {
                IGNORE_INDEX
            } else {
                id
            }
        })
        .collect();
    let t = row.len();
    let ids = Tensor::<AB, 2, Int>::from_data(TensorData::new([row.clone(), row].concat(), [2, t]), device);
    let mask = Tensor::<AB, 2, Int>::from_data(TensorData::new([mask.clone(), mask].concat(), [2, t]), device);
    let labels = Tensor::<AB, 2, Int>::from_data(TensorData::new([labels.clone(), labels].concat(), [2, t]), device);
    let pixels = Tensor::<AB, 4>::random([4, 3, 28, 28], Distribution::Normal(0.0, 1.0), device);
    (ids, mask, labels, pixels)
}

#[test]
fn tiny_kosmos1_runs_end_to_end_and_its_loss_falls() {
    let device = Default::default();
    let config = Kosmos1Config::tiny(50);
    let mut model: Kosmos1<AB> = config.init(&device);
    assert_eq!(model.num_params(), config.num_params());
    let (ids, mask, labels, pixels) = batch(&device);
    let mut optim = AdamWConfig::new().init::<AB, Kosmos1<AB>>();
    let mut losses = Vec::new();
    for _ in 0..8 {
        let logits = model
            .forward(ids.clone(), None, Some(pixels.clone()), Some(mask.clone()))
            .unwrap();
        assert_eq!(logits.dims(), [2, 20, 50]);
        let loss = causal_lm_loss(logits, labels.clone());
        losses.push(loss.clone().into_scalar().elem::<f32>());
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(3e-3, model, grads);
    }
    assert!(losses.iter().all(|l| l.is_finite()));
    assert!(losses[7] < losses[0] * 0.8, "loss did not fall: {losses:?}");
}

#[test]
fn paper_size_is_documented_by_its_config() {
    let paper = Kosmos1Config::paper();
    assert_eq!(paper.decoder.layers, 24);
    assert_eq!(paper.decoder.embed_dim, 2048);
    assert_eq!(paper.decoder.xpos_scale_base, Some(512.0));
    assert_eq!(paper.latents(), 64);
    // Language model 1.34B (as torchscale counts it) + ViT-L/14 303M + resampler and connector.
    let lm = 1_340_180_480usize;
    assert!(paper.num_params() > lm + 303_179_776);
}

#[test]
fn loss_ignores_masked_labels() {
    let device = Default::default();
    let logits = Tensor::<TB, 3>::random([1, 4, 6], Distribution::Normal(0.0, 1.0), &device);
    let all = Tensor::<TB, 2, Int>::from_data(TensorData::new(vec![1i64, 2, 3, 4], [1, 4]), &device);
    let some = Tensor::<TB, 2, Int>::from_data(
        TensorData::new(vec![1i64, IGNORE_INDEX, 3, IGNORE_INDEX], [1, 4]),
        &device,
    );
    let lp = burn::tensor::activation::log_softmax(logits.clone(), 2)
        .into_data()
        .to_vec::<f32>()
        .unwrap();
    // Only position 1 predicts a counted label (3).
    let expected = -lp[6 + 3];
    let got: f32 = causal_lm_loss(logits.clone(), some).into_scalar().elem();
    assert!((got - expected).abs() < 1e-5, "{got} vs {expected}");
    let full: f32 = causal_lm_loss(logits, all).into_scalar().elem();
    let expected_full = -(lp[2] + lp[6 + 3] + lp[12 + 4]) / 3.0;
    assert!((full - expected_full).abs() < 1e-5, "{full} vs {expected_full}");
}

#[test]
fn weighted_loss_is_the_weighted_mean_of_the_counted_targets() {
    let device = Default::default();
    let logits = Tensor::<TB, 3>::random([2, 4, 6], Distribution::Normal(0.0, 1.0), &device);
    let labels = Tensor::<TB, 2, Int>::from_data(
        TensorData::new(vec![1i64, 2, IGNORE_INDEX, 4, 5, 0, 3, IGNORE_INDEX], [2, 4]),
        &device,
    );
    let lp = burn::tensor::activation::log_softmax(logits.clone(), 2)
        .into_data()
        .to_vec::<f32>()
        .unwrap();
    let nll = |row: usize, pos: usize, label: usize| -lp[row * 24 + pos * 6 + label];
    // Weights of the labels; the first position and the ignored labels count nothing whatever
    // their weight.
    let w = [9.0f32, 2.0, 7.0, 0.5, 9.0, 1.0, 3.0, 7.0];
    let weights = Tensor::<TB, 2>::from_data(TensorData::new(w.to_vec(), [2, 4]), &device);
    let expected = (2.0 * nll(0, 0, 2) + 0.5 * nll(0, 2, 4) + 1.0 * nll(1, 0, 0) + 3.0 * nll(1, 1, 3)) / 6.5;
    let got: f32 = weighted_causal_lm_loss(logits.clone(), labels.clone(), weights)
        .into_scalar()
        .elem();
    assert!((got - expected).abs() < 1e-5, "{got} vs {expected}");
    // Every weight 1: the plain mean.
    let ones = Tensor::<TB, 2>::ones([2, 4], &device);
    let plain: f32 = causal_lm_loss(logits.clone(), labels.clone()).into_scalar().elem();
    let got: f32 = weighted_causal_lm_loss(logits.clone(), labels, ones)
        .into_scalar()
        .elem();
    assert!((got - plain).abs() < 1e-6, "{got} vs {plain}");
    // Nothing counted: zero, not NaN.
    let none = Tensor::<TB, 2, Int>::full([2, 4], IGNORE_INDEX, &device);
    let zero: f32 = weighted_causal_lm_loss(logits, none, Tensor::ones([2, 4], &device))
        .into_scalar()
        .elem();
    assert_eq!(zero, 0.0);
}
