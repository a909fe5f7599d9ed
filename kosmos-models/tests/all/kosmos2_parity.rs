//! KOSMOS-2 against transformers' `Kosmos2ForConditionalGeneration` (scripts/make_kosmos2_fixtures.py).

use burn::prelude::*;
use kosmos_core::AttentionImpl;
use kosmos_core::testing::{ATOL, Fixture, RTOL, assert_close};
use kosmos_models::{Kosmos2, Kosmos2Config, Kosmos2Input};

use crate::TB;

fn int2(io: &kosmos_core::TensorFile, key: &str, device: &burn::tensor::Device<TB>) -> Tensor<TB, 2, Int> {
    Tensor::from_data(io.data(key).unwrap().convert::<i64>(), device)
}

fn input(io: &kosmos_core::TensorFile, device: &burn::tensor::Device<TB>) -> Kosmos2Input<TB> {
    Kosmos2Input {
        input_ids: int2(io, "input_ids", device),
        attention_mask: Some(int2(io, "attention_mask", device)),
        pixel_values: Some(io.tensor("pixel_values", device).unwrap()),
        image_embeds_position_mask: Some(int2(io, "image_embeds_position_mask", device)),
    }
}

/// Rows of `[batch, len, d]` at the non-pad positions of each row, concatenated.
fn real_positions(t: Tensor<TB, 3>, attention_mask: &Tensor<TB, 2, Int>) -> Tensor<TB, 2> {
    let [b, len, d] = t.dims();
    let mask = attention_mask.to_data().convert::<i64>().to_vec::<i64>().unwrap();
    let mut rows: Vec<Tensor<TB, 2>> = Vec::new();
    for i in 0..b {
        for j in (0..len).filter(|&j| mask[i * len + j] == 1) {
            rows.push(t.clone().slice([i..i + 1, j..j + 1, 0..d]).reshape([1, d]));
        }
    }
    Tensor::cat(rows, 0)
}

/// The argmax over the vocabulary equals the reference's at every non-pad position.
fn assert_argmax_equal(logits: Tensor<TB, 3>, io: &kosmos_core::TensorFile, mask: &Tensor<TB, 2, Int>, case: &str) {
    let argmax: Vec<i64> = logits.argmax(2).into_data().convert::<i64>().to_vec().unwrap();
    let argmax_ref: Vec<i64> = io.data("logits_argmax").unwrap().convert::<i64>().to_vec().unwrap();
    let m: Vec<i64> = mask.to_data().convert::<i64>().to_vec().unwrap();
    for (i, (a, r)) in argmax.iter().zip(&argmax_ref).enumerate() {
        if m[i] == 1 {
            assert_eq!(a, r, "{case}: argmax at flat position {i}");
        }
    }
}

/// Load `case`, run it on the inputs of `inputs_case` and compare with the outputs stored in
/// `outputs_case` (the f16/bf16 copies store outputs only; the sharded copy stores none and must
/// reproduce the f32 model's).
fn check_with(case: &str, inputs_case: &str, outputs_case: &str, implementation: AttentionImpl, atol: f32, rtol: f32) {
    let fx = Fixture::open(&format!("kosmos2/{case}"));
    let device = Default::default();
    let mut model = Kosmos2::<TB>::from_pretrained(&fx.dir, &device).unwrap();
    model.set_attention_impl(implementation);
    let inp = input(
        &Fixture::open(&format!("kosmos2/{inputs_case}")).file("io.safetensors"),
        &device,
    );
    let io = Fixture::open(&format!("kosmos2/{outputs_case}")).file("io.safetensors");
    let out = model.forward(&inp).unwrap();
    let mask = inp.attention_mask.clone().unwrap();
    let what = |s: &str| format!("{case} {implementation:?} {s}");
    assert_close(
        out.image_embeds.clone().unwrap(),
        io.tensor("image_embeds", &device).unwrap(),
        atol,
        rtol,
        &what("image_embeds"),
    );
    let hidden_ref: Tensor<TB, 3> = io.tensor("text_last_hidden_state", &device).unwrap();
    assert_close(
        real_positions(out.last_hidden_state, &mask),
        real_positions(hidden_ref, &mask),
        atol,
        rtol,
        &what("last hidden state (non-pad)"),
    );
    if io.keys().iter().any(|k| k == "logits_last") {
        // Logits at the last position and the argmax everywhere.
        let [b, t, v] = out.logits.dims();
        let last = out.logits.clone().slice([0..b, t - 1..t, 0..v]).reshape([b, v]);
        assert_close(
            last,
            io.tensor("logits_last", &device).unwrap(),
            atol,
            rtol,
            &what("last-position logits"),
        );
        assert_argmax_equal(out.logits.clone(), &io, &mask, case);
    } else if io.keys().iter().any(|k| k == "logits") {
        let logits_ref: Tensor<TB, 3> = io.tensor("logits", &device).unwrap();
        assert_close(
            real_positions(out.logits, &mask),
            real_positions(logits_ref, &mask),
            atol,
            rtol,
            &what("logits (non-pad)"),
        );
    } else {
        // Real vocabulary: a slice of the logits, their argmax and logsumexp over all 65,037.
        let ids: Vec<i64> = io.data("logits_slice_ids").unwrap().convert::<i64>().to_vec().unwrap();
        let index = Tensor::<TB, 1, Int>::from_data(TensorData::new(ids.clone(), [ids.len()]), &device);
        let sliced = out.logits.clone().select(2, index);
        assert_close(
            real_positions(sliced, &mask),
            real_positions(io.tensor("logits_slice", &device).unwrap(), &mask),
            atol,
            rtol,
            &what("logits slice (non-pad)"),
        );
        let lse = out.logits.clone().exp().sum_dim(2).log();
        let lse_ref: Tensor<TB, 2> = io.tensor("logits_logsumexp", &device).unwrap();
        assert_close(
            real_positions(lse, &mask),
            real_positions(lse_ref.unsqueeze_dim(2), &mask),
            atol,
            rtol,
            &what("logsumexp (non-pad)"),
        );
        assert_argmax_equal(out.logits.clone(), &io, &mask, case);
    }
}

fn check(case: &str, implementation: AttentionImpl, atol: f32, rtol: f32) {
    check_with(case, case, case, implementation, atol, rtol)
}

#[test]
fn tiny_matches_transformers() {
    for imp in [AttentionImpl::Explicit, AttentionImpl::Fused] {
        check("tiny", imp, ATOL, RTOL);
    }
}

#[test]
fn real_vocabulary_model_matches_transformers() {
    check("realvocab", AttentionImpl::Fused, ATOL, RTOL);
}

#[test]
fn f16_bf16_and_sharded_copies_load_to_the_same_model() {
    // The f16/bf16 fixtures' outputs were computed by transformers from the rounded weights, so
    // after upcasting to f32 the f32 tolerance applies; the sharded copy is the f32 model.
    check_with("tiny_f16", "tiny", "tiny_f16", AttentionImpl::Fused, ATOL, RTOL);
    check_with("tiny_bf16", "tiny", "tiny_bf16", AttentionImpl::Fused, ATOL, RTOL);
    check_with("tiny_sharded", "tiny", "tiny", AttentionImpl::Fused, ATOL, RTOL);
}

#[test]
fn config_defaults_are_the_official_checkpoint() {
    let c = Kosmos2Config::patch14_224();
    assert_eq!(c.num_params(), 1_664_485_376);
    let tiny = Kosmos2Config::from_json_file(Fixture::open("kosmos2/tiny").dir.join("config.json")).unwrap();
    assert_eq!(tiny.text_config.embed_dim, 32);
    assert_eq!(tiny.latent_query_num, 8);
}

/// Image embeddings go to the marked positions in row order, for rows with two images or none
/// (training batches mix text-only and image rows); counts that do not fit are errors.
#[test]
fn image_embeds_fill_rows_with_several_images_or_none() {
    use burn::tensor::TensorData;
    use kosmos_models::kosmos2::write_image_embeds;
    let device = Default::default();
    let (len, e, latents) = (10, 2, 3);
    let embeds = Tensor::<TB, 3>::zeros([2, len, e], &device);
    let images: Vec<f32> = (0..2 * latents * e).map(|v| v as f32 + 1.0).collect();
    let images = Tensor::<TB, 3>::from_data(TensorData::new(images, [2, latents, e]), &device);
    let mut mask = vec![0i64; 2 * len];
    for p in [1, 2, 3, 6, 7, 8] {
        mask[p] = 1; // row 0: two images; row 1: none
    }
    let mask = Tensor::<TB, 2, Int>::from_data(TensorData::new(mask, [2, len]), &device);
    let out = write_image_embeds(embeds.clone(), &images, &mask).unwrap();
    let v = out.into_data().to_vec::<f32>().unwrap();
    let at = |row: usize, pos: usize| v[(row * len + pos) * e];
    assert_eq!(
        [at(0, 1), at(0, 2), at(0, 3), at(0, 6), at(0, 7), at(0, 8)],
        [1.0, 3.0, 5.0, 7.0, 9.0, 11.0]
    );
    assert_eq!((at(0, 0), at(0, 4), at(0, 9)), (0.0, 0.0, 0.0));
    assert!((0..len).all(|p| at(1, p) == 0.0));

    let one = images.clone().narrow(0, 0, 1);
    let msg = write_image_embeds(embeds.clone(), &one, &mask).unwrap_err().to_string();
    assert!(msg.contains("6 positions") && msg.contains("1 image"), "{msg}");
    let mut bad = vec![0i64; 2 * len];
    bad[len + 2] = 1;
    let bad = Tensor::<TB, 2, Int>::from_data(TensorData::new(bad, [2, len]), &device);
    let msg = write_image_embeds(embeds, &one, &bad).unwrap_err().to_string();
    assert!(msg.contains("row 1"), "{msg}");
}
