//! LoRA against Hugging Face PEFT (scripts/make_lora_fixtures.py): PEFT's adapters loaded onto
//! the tiny KOSMOS-2 give PEFT's logits, merged and unmerged; fresh adapters change nothing; a
//! saved adapter has PEFT's layout and reloads to the same function; bad adapters are refused
//! with errors that name the file and key.

use std::path::{Path, PathBuf};

use burn::prelude::*;
use kosmos_core::TensorFile;
use kosmos_core::testing::{ATOL, Fixture, RTOL, assert_close};
use kosmos_models::lora::lora_slots;
use kosmos_models::{Kosmos2, Kosmos2Input, LoraSpec, LoraTower};

use crate::TB;

fn input(device: &burn::tensor::Device<TB>) -> Kosmos2Input<TB> {
    let io = Fixture::open("kosmos2/tiny").file("io.safetensors");
    let int2 = |key: &str| Tensor::<TB, 2, Int>::from_data(io.data(key).unwrap().convert::<i64>(), device);
    Kosmos2Input {
        input_ids: int2("input_ids"),
        attention_mask: Some(int2("attention_mask")),
        pixel_values: Some(io.tensor("pixel_values", device).unwrap()),
        image_embeds_position_mask: Some(int2("image_embeds_position_mask")),
    }
}

/// Logit rows `[n, vocab]` at the non-pad positions.
fn real_rows(logits: Tensor<TB, 3>, inp: &Kosmos2Input<TB>) -> Tensor<TB, 2> {
    let [b, t, v] = logits.dims();
    let mask: Vec<i64> = inp
        .attention_mask
        .clone()
        .unwrap()
        .into_data()
        .convert::<i64>()
        .to_vec()
        .unwrap();
    let rows: Vec<Tensor<TB, 2>> = (0..b * t)
        .filter(|&i| mask[i] == 1)
        .map(|i| {
            logits
                .clone()
                .slice([i / t..i / t + 1, i % t..i % t + 1, 0..v])
                .reshape([1, v])
        })
        .collect();
    Tensor::cat(rows, 0)
}

fn base(device: &burn::tensor::Device<TB>) -> Kosmos2<TB> {
    Kosmos2::<TB>::from_pretrained(Fixture::open("kosmos2/tiny").dir, device).unwrap()
}

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kosmos-lora-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The weight `[out, in]` (PyTorch layout) of the projection at a Hugging Face module path.
fn weight_at(model: &mut Kosmos2<TB>, path: &str) -> Tensor<TB, 2> {
    let slot = lora_slots(model).into_iter().find(|s| s.path == path).unwrap();
    slot.slot.linear.weight.val().transpose()
}

fn check_case(case: &str, adapted: usize) {
    let fx = Fixture::open(&format!("lora/{case}"));
    let io = fx.file("io.safetensors");
    let device = Default::default();
    let inp = input(&device);
    let model = base(&device)
        .load_peft_adapter(fx.dir.join("adapter"), &device)
        .unwrap();
    let mut m = model.clone();
    let n = lora_slots(&mut m).iter().filter(|s| s.slot.adapter.is_some()).count();
    assert_eq!(n, adapted, "{case}: adapted projections");
    assert_eq!(n as u64, fx.meta["adapted_modules"].as_u64().unwrap());

    let logits = model.forward(&inp).unwrap().logits;
    assert_close(
        real_rows(logits, &inp),
        real_rows(io.tensor("logits", &device).unwrap(), &inp),
        ATOL,
        RTOL,
        &format!("lora {case}: adapted logits (non-pad)"),
    );
    let mut merged = model.merge_lora();
    assert!(!merged.has_lora());
    let key = fx.meta["merged_key"].as_str().unwrap();
    let path = key.trim_end_matches(".weight");
    assert_close(
        weight_at(&mut merged, path),
        io.tensor("merged_weight", &device).unwrap(),
        ATOL,
        RTOL,
        &format!("lora {case}: merged {key}"),
    );
    let logits = merged.forward(&inp).unwrap().logits;
    assert_close(
        real_rows(logits, &inp),
        real_rows(io.tensor("merged_logits", &device).unwrap(), &inp),
        ATOL,
        RTOL,
        &format!("lora {case}: merged logits (non-pad)"),
    );
}

#[test]
fn peft_text_adapters_give_pefts_logits_merged_and_unmerged() {
    check_case("text", 12);
}

#[test]
fn peft_adapters_everywhere_with_rslora_and_a_rank_pattern_give_pefts_logits() {
    check_case("everywhere", 28);
}

#[test]
fn fresh_adapters_leave_the_function_unchanged_and_train_alone() {
    let device = Default::default();
    let inp = input(&device);
    let model = base(&device);
    let before = model.forward(&inp).unwrap().logits.into_data();
    let mut spec = LoraSpec::new(4);
    spec.towers = vec![LoraTower::Text, LoraTower::Vision, LoraTower::Projection];
    let (model, n) = model.attach_lora(&spec, &device).unwrap();
    // 2 text layers x 6, 2 vision layers x 6, the projection's 4.
    assert_eq!(n, 28);
    assert!(model.has_lora());
    let after = model.forward(&inp).unwrap().logits.into_data();
    assert_eq!(before, after, "B = 0: the adapted model computes the same logits");

    // Only adapter parameters stay trainable (on an autodiff backend, where that means something).
    type AD = burn::backend::Autodiff<TB>;
    let mut spec = LoraSpec::new(2);
    spec.targets = vec!["q_proj".into(), "v_proj".into()];
    let model = Kosmos2::<AD>::from_pretrained(Fixture::open("kosmos2/tiny").dir, &device).unwrap();
    let (model, n) = model.attach_lora(&spec, &device).unwrap();
    assert_eq!(n, 4, "q_proj and v_proj of the 2 text layers");
    let model = model.train_only_lora();
    // [32, 2] + [2, 32] per adapter.
    assert_eq!(model.lora_num_params(), 4 * (32 * 2 + 2 * 32));
    struct Trainable(usize, usize);
    impl<B: Backend> burn::module::ModuleVisitor<B> for Trainable {
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<B, D>>) {
            let n = param.val().shape().num_elements();
            if param.val().is_require_grad() {
                self.0 += n;
            } else {
                self.1 += n;
            }
        }
    }
    let mut count = Trainable(0, 0);
    model.visit(&mut count);
    assert_eq!(count.0, model.lora_num_params());
    assert_eq!(count.0 + count.1, model.num_params());
}

#[test]
fn saved_adapters_have_pefts_layout_and_reload_to_the_same_function() {
    let device = Default::default();
    let inp = input(&device);
    let fx = Fixture::open("lora/text");
    let model = base(&device)
        .load_peft_adapter(fx.dir.join("adapter"), &device)
        .unwrap();
    let out = temp("save");
    model.save_peft_adapter(&out, "fixtures/kosmos2/tiny").unwrap();

    // The same tensors under the same keys, shapes and values as PEFT's file.
    let ours = TensorFile::open(out.join("adapter_model.safetensors")).unwrap();
    let theirs = TensorFile::open(fx.dir.join("adapter/adapter_model.safetensors")).unwrap();
    assert_eq!(ours.keys(), theirs.keys());
    for key in theirs.keys() {
        let (a, b) = (ours.data(&key).unwrap(), theirs.data(&key).unwrap());
        assert_eq!(a.shape, b.shape, "{key}");
        assert_eq!(a.to_vec::<f32>().unwrap(), b.to_vec::<f32>().unwrap(), "{key}");
    }
    // The configuration fields PEFT reads agree.
    let read = |p: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p.join("adapter_config.json")).unwrap()).unwrap()
    };
    let (a, b) = (read(&out), read(&fx.dir.join("adapter")));
    for key in [
        "peft_type",
        "r",
        "lora_alpha",
        "lora_dropout",
        "use_rslora",
        "use_dora",
        "bias",
        "fan_in_fan_out",
    ] {
        assert_eq!(a[key], b[key], "adapter_config.json `{key}`");
    }
    let reloaded = base(&device).load_peft_adapter(&out, &device).unwrap();
    assert_eq!(
        model.forward(&inp).unwrap().logits.into_data(),
        reloaded.forward(&inp).unwrap().logits.into_data()
    );

    // save_pretrained merges the adapters: the saved directory is a plain model with the
    // adapted function.
    let plain = temp("merged");
    model
        .save_pretrained(&plain, Fixture::open("kosmos2/tiny").dir)
        .unwrap();
    let keys = TensorFile::open(plain.join("model.safetensors")).unwrap().keys();
    assert!(
        keys.iter().all(|k| !k.contains("lora")),
        "no adapter tensors in the HF file"
    );
    let loaded = Kosmos2::<TB>::from_pretrained(&plain, &device).unwrap();
    assert!(!loaded.has_lora());
    assert_close(
        real_rows(loaded.forward(&inp).unwrap().logits, &inp),
        real_rows(model.forward(&inp).unwrap().logits, &inp),
        ATOL,
        RTOL,
        "save_pretrained of an adapted model (merged) against the adapted model",
    );

    // Adapters of different ranks (PEFT's rank_pattern) cannot share one configuration.
    let mixed = base(&device)
        .load_peft_adapter(Fixture::open("lora/everywhere").dir.join("adapter"), &device)
        .unwrap();
    let err = mixed.save_peft_adapter(temp("mixed"), "x").unwrap_err().to_string();
    assert!(err.contains("different ranks"), "{err}");
    for dir in [out, plain] {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// A copy of the text adapter with its configuration edited by `config` and its tensors by
/// `tensors` (key -> (shape, values)).
fn edited_adapter(
    name: &str,
    config: impl FnOnce(&mut serde_json::Value),
    tensors: impl FnOnce(&mut Vec<(String, Vec<usize>, Vec<f32>)>),
) -> PathBuf {
    let src = Fixture::open("lora/text").dir.join("adapter");
    let dir = temp(name);
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("adapter_config.json")).unwrap()).unwrap();
    config(&mut cfg);
    std::fs::write(dir.join("adapter_config.json"), cfg.to_string()).unwrap();
    let file = TensorFile::open(src.join("adapter_model.safetensors")).unwrap();
    let mut list: Vec<(String, Vec<usize>, Vec<f32>)> = file
        .keys()
        .into_iter()
        .map(|k| {
            let d = file.data(&k).unwrap();
            (k, d.shape.to_vec(), d.to_vec::<f32>().unwrap())
        })
        .collect();
    tensors(&mut list);
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = list
        .into_iter()
        .map(|(k, s, v)| (k, s, v.iter().flat_map(|x| x.to_le_bytes()).collect()))
        .collect();
    let views = bytes.iter().map(|(k, s, b)| {
        (
            k.clone(),
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b).unwrap(),
        )
    });
    std::fs::write(
        dir.join("adapter_model.safetensors"),
        safetensors::serialize(views, None).unwrap(),
    )
    .unwrap();
    dir
}

#[test]
fn bad_adapters_are_refused_with_the_file_and_key() {
    let device = Default::default();
    let load = |dir: &Path| base(&device).load_peft_adapter(dir, &device).unwrap_err().to_string();
    let q_a = "base_model.model.text_model.model.layers.0.self_attn.q_proj.lora_A.weight";
    let q_b = "base_model.model.text_model.model.layers.0.self_attn.q_proj.lora_B.weight";

    let dir = edited_adapter("dora", |c| c["use_dora"] = true.into(), |_| {});
    let err = load(&dir);
    assert!(err.contains("adapter_config.json") && err.contains("DoRA"), "{err}");

    let dir = edited_adapter("bias", |c| c["bias"] = "all".into(), |_| {});
    assert!(load(&dir).contains("bias = `all`"));

    let dir = edited_adapter("no-b", |_| {}, |t| t.retain(|(k, _, _)| k != q_b));
    let err = load(&dir);
    assert!(err.contains("adapter_model.safetensors") && err.contains(q_b), "{err}");

    let dir = edited_adapter(
        "shape",
        |_| {},
        |t| {
            let a = t.iter_mut().find(|(k, _, _)| k == q_a).unwrap();
            a.1 = vec![4, 16];
            a.2.truncate(64);
        },
    );
    let err = load(&dir);
    assert!(
        err.contains(q_a) && err.contains("[4, 16]") && err.contains("[4, 32]"),
        "{err}"
    );

    let dir = edited_adapter(
        "unknown",
        |_| {},
        |t| {
            t.push((
                "base_model.model.text_model.model.layers.7.self_attn.q_proj.lora_A.weight".into(),
                vec![4, 32],
                vec![0.0; 128],
            ))
        },
    );
    let err = load(&dir);
    assert!(
        err.contains("not used by the model") && err.contains("layers.7"),
        "{err}"
    );

    let missing = temp("missing");
    let err = load(&missing);
    assert!(err.contains("adapter_config.json"), "{err}");

    // Specifications that cannot work are refused before anything is attached.
    let mut spec = LoraSpec::new(4);
    spec.targets = vec!["qkv".into()];
    let err = base(&device).attach_lora(&spec, &device).unwrap_err().to_string();
    assert!(err.contains("unknown LoRA target `qkv`"), "{err}");
    let err = base(&device)
        .attach_lora(&LoraSpec::new(0), &device)
        .unwrap_err()
        .to_string();
    assert!(err.contains("rank must be >= 1"), "{err}");
}
