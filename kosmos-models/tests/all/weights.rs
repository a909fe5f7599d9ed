//! Reduced-precision weights on the tiny KOSMOS-2 (`Kosmos2::pack_weights`): a decode step of the
//! packed model computes what the same model computes with its decoder projections and head
//! replaced by the dequantized weights (so every packed projection is used, and only those); the
//! prompt's many-row products keep the f32 weights; `F32` removes the copies.

use burn::module::Param;
use burn::nn::Linear;
use burn::prelude::*;
use kosmos_core::packed::WeightMode;
use kosmos_core::testing::Fixture;
use kosmos_models::Kosmos2;

use crate::TB;

fn base(device: &Device<TB>) -> Kosmos2<TB> {
    Kosmos2::<TB>::from_pretrained(Fixture::open("kosmos2/tiny").dir, device).unwrap()
}

fn host<const D: usize>(t: Tensor<TB, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec::<f32>().unwrap()
}

/// The model with every packed weight written back, dequantized, as an f32 weight (the head as
/// an untied `lm_head`, the embedding staying f32), and no packed copies.
fn dequantized(mut model: Kosmos2<TB>) -> Kosmos2<TB> {
    for layer in model.text_model.model.decoder.layers.iter_mut() {
        for slot in layer.self_attn.lora_slots().into_iter().chain(layer.ffn.lora_slots()) {
            let packed = slot.packed.take().expect("every decoder projection is packed");
            slot.linear.weight = Param::from_tensor(packed.dequantize().transpose());
        }
    }
    let head = model.text_model.lm_head_packed.take().expect("the head is packed");
    model.text_model.lm_head = Some(Linear {
        weight: Param::from_tensor(head.dequantize().transpose()),
        bias: None,
    });
    model
}

/// Prompt hidden states and the logits of one cached decode step.
fn prompt_and_step(model: &Kosmos2<TB>, device: &Device<TB>) -> (Vec<f32>, Vec<f32>) {
    prompt_then_step(model, model, device)
}

/// The prompt through `prompt_model` (filling the KV cache), then one decode step through
/// `step_model` on that cache.
fn prompt_then_step(prompt_model: &Kosmos2<TB>, step_model: &Kosmos2<TB>, device: &Device<TB>) -> (Vec<f32>, Vec<f32>) {
    let prompt: Vec<i64> = vec![0, 17, 230, 5, 999, 42, 7, 1201, 64, 3, 11];
    let len = prompt.len();
    let ids = Tensor::<TB, 2, Int>::from_data(TensorData::new(prompt, [1, len]), device);
    let mut cache = prompt_model.new_cache();
    let hidden = prompt_model.text_hidden(&ids, None, None, Some(&mut cache)).unwrap();
    let next = Tensor::<TB, 2, Int>::from_data(TensorData::new(vec![321i64], [1, 1]), device);
    let mask = Tensor::<TB, 2, Int>::ones([1, len + 1], device);
    let step = step_model
        .text_hidden(&next, Some(&mask), None, Some(&mut cache))
        .unwrap();
    (host(hidden), host(step_model.last_logits(step)))
}

#[test]
fn packed_decode_steps_equal_the_dequantized_model() {
    let device = Default::default();
    let f32_model = base(&device);
    let (f32_prompt, f32_step) = prompt_and_step(&f32_model, &device);
    assert_eq!(f32_model.weight_mode(), WeightMode::F32);
    for mode in [WeightMode::Bf16, WeightMode::Q8] {
        let mut packed = base(&device);
        packed.pack_weights(mode);
        assert_eq!(packed.weight_mode(), mode);
        let (prompt, step) = prompt_and_step(&packed, &device);
        // 11 rows: more than MAX_PACKED_ROWS, so the prompt runs on the f32 weights, bit for bit.
        assert_eq!(prompt, f32_prompt, "{mode}: the prompt must not use the packed weights");
        // The decode step runs on the packed weights: what the dequantized model computes on the
        // same (f32) prompt cache (the summation order differs), and not what f32 computes.
        let reference = dequantized(base_packed(mode, &device));
        let (_, want) = prompt_then_step(&f32_model, &reference, &device);
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = step.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            worst <= 1e-5 * scale.max(1.0),
            "{mode}: step logits off the dequantized model by {worst}"
        );
        let moved = step.iter().zip(&f32_step).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            moved > worst,
            "{mode}: packing should change the step's logits ({moved} vs {worst})"
        );

        packed.pack_weights(WeightMode::F32);
        assert_eq!(packed.weight_mode(), WeightMode::F32);
        assert_eq!(
            prompt_and_step(&packed, &device).1,
            f32_step,
            "{mode}: F32 restores the f32 path"
        );
    }
}

fn base_packed(mode: WeightMode, device: &Device<TB>) -> Kosmos2<TB> {
    let mut model = base(device);
    model.pack_weights(mode);
    model
}

#[test]
fn saving_a_packed_model_writes_only_the_f32_weights() {
    let device = Default::default();
    let fx = Fixture::open("kosmos2/tiny");
    let out = std::env::temp_dir().join(format!("kosmos-weights-save-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    base_packed(WeightMode::Q8, &device)
        .save_pretrained(&out, &fx.dir)
        .unwrap();
    let written = kosmos_core::loader::read_header(&out.join("model.safetensors")).unwrap();
    let original = kosmos_core::loader::read_header(&fx.dir.join("model.safetensors")).unwrap();
    assert_eq!(written, original, "the same keys and shapes as the original checkpoint");
    let reloaded = Kosmos2::<TB>::from_pretrained(&out, &device).unwrap();
    assert_eq!(
        prompt_and_step(&reloaded, &device),
        prompt_and_step(&base(&device), &device)
    );
    std::fs::remove_dir_all(&out).unwrap();
}
