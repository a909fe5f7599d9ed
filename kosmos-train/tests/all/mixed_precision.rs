//! Mixed precision (`precision = "bf16"`): bf16 copies of the f32 parameters compute the forward
//! and backward passes, the loss is taken in f32, the gradients come back as f32 for the f32
//! parameters. On the shipped shapes-world model, one step's loss and gradients stay within the
//! stated tolerance of the f32 step, and a short fine-tune follows the f32 run.

use burn::backend::Autodiff;
use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::DType;
use kosmos_core::testing::repo_root;
use kosmos_models::Kosmos2;
use kosmos_train::Trainer;
use kosmos_train::data::{CollateConfig, Collator, DataLoader};
use kosmos_train::trainer::{LossWeights, Workers, accumulate_on_devices};

use crate::TB;

type AB = Autodiff<TB>;

/// Per parameter with a gradient on either side: (dtype, |g_a - g_b|_2, |g_b|_2).
struct Compare<'a>(&'a GradientsParams, &'a GradientsParams, Vec<(DType, f64, f64)>);
impl ModuleVisitor<AB> for Compare<'_> {
    fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<AB, D>>) {
        let (a, b) = (self.0.get::<TB, D>(p.id), self.1.get::<TB, D>(p.id));
        assert_eq!(a.is_some(), b.is_some(), "a parameter has a gradient on one side only");
        if let (Some(a), Some(b)) = (a, b) {
            let dtype = a.dtype();
            let norm = |t: Tensor<TB, D>| -> f64 { t.powf_scalar(2.0).sum().into_scalar().elem::<f64>().sqrt() };
            self.2.push((dtype, norm(a - b.clone()), norm(b)));
        }
    }
}

/// Eight generated scenes (written once per test binary).
fn shapes_data() -> std::path::PathBuf {
    use kosmos_train::shapes::{ShapesConfig, write_dataset};
    static DATA: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    DATA.get_or_init(|| {
        let dir = crate::common::temp_dir("mixed-shapes");
        let config = ShapesConfig {
            n: 8,
            seed: 3,
            ..ShapesConfig::default()
        };
        write_dataset(&config, &dir).unwrap();
        dir
    })
    .clone()
}

/// Loss and gradients of one step of the shipped shapes-world model (trained, so the gradients
/// are well conditioned; the random fixture model's f32 gradients already differ from float64's
/// by 1.6e-4 relative) on a few generated scenes, computed in each of `computes`.
fn shapes_steps(computes: &[DType]) -> (Kosmos2<AB>, Vec<kosmos_train::trainer::Accumulated>) {
    let data_dir = shapes_data();
    let mut data: kosmos_train::data::DataConfig =
        toml::from_str(&std::fs::read_to_string(data_dir.join("data.toml")).unwrap()).unwrap();
    data.resolve_relative_to(&data_dir);
    let model_dir = repo_root().join("assets/shapes/model");
    let latents = kosmos_models::Kosmos2Config::from_json_file(model_dir.join("config.json"))
        .unwrap()
        .latent_query_num;
    let collator = Collator::from_model_dir(&model_dir, latents, CollateConfig::from(&data)).unwrap();
    let mut loader = DataLoader::with_collator(data, collator).unwrap();
    let batches: Vec<_> = (0..2).map(|_| loader.next_batch(4).unwrap()).collect();
    let device = Default::default();
    let model = Kosmos2::<AB>::from_pretrained(&model_dir, &device).unwrap();
    let accs = computes
        .iter()
        .map(|&compute| {
            let workers = Workers {
                threads: 1,
                devices: Vec::new(),
                compute,
                shard: (0, 1),
            };
            accumulate_on_devices(&model, &batches, &LossWeights::uniform(), &device, 1, &workers).unwrap()
        })
        .collect();
    (model, accs)
}

/// Global relative L2 error of `a`'s gradients against `b`'s, the worst tensor's, and whether
/// every gradient is f32.
fn grad_error(model: &Kosmos2<AB>, a: &GradientsParams, b: &GradientsParams) -> (f64, f64, bool) {
    let mut cmp = Compare(a, b, Vec::new());
    model.visit(&mut cmp);
    let (diff2, ref2) = cmp
        .2
        .iter()
        .fold((0.0, 0.0), |(d, r), (_, x, y)| (d + x * x, r + y * y));
    // Tensors whose reference gradient is itself rounding noise (key-projection biases, whose
    // exact gradient is zero) are left out of the per-tensor worst case.
    let worst = cmp
        .2
        .iter()
        .filter(|(_, _, y)| *y > 1e-6 * ref2.sqrt())
        .map(|(_, x, y)| x / y)
        .fold(0.0, f64::max);
    (
        (diff2 / ref2).sqrt(),
        worst,
        cmp.2.iter().all(|(d, _, _)| *d == DType::F32),
    )
}

#[test]
fn a_bf16_step_stays_within_tolerance_of_the_f32_step() {
    let (model, accs) = shapes_steps(&[DType::F32, DType::F64, DType::BF16]);
    let (full, wide, mixed) = (&accs[0], &accs[1], &accs[2]);
    let (g64, w64, _) = grad_error(&model, &full.grads, &wide.grads);
    let (global, worst, all_f32) = grad_error(&model, &mixed.grads, &full.grads);
    let loss_rel = (mixed.loss - full.loss).abs() / full.loss;
    eprintln!(
        "f32 vs float64: loss {:.6} vs {:.6}, gradients global {g64:.2e}, worst tensor {w64:.2e}",
        full.loss, wide.loss
    );
    eprintln!(
        "bf16 vs f32: loss {:.6} vs {:.6} (rel {loss_rel:.2e}), gradients global {global:.2e}, worst tensor {worst:.2e}",
        mixed.loss, full.loss
    );
    assert!(all_f32, "gradients come back as f32");
    assert!(loss_rel <= 1e-2, "loss: relative error {loss_rel}");
    // Measured: loss 1.2e-3 relative; gradients 9.2e-2 global relative L2 error (cosine about
    // 0.996), worst tensor 0.19. Everything runs in bf16 here, LayerNorm and softmax included
    // (PyTorch's autocast keeps those in f32), so the error is bf16's 8-bit mantissa compounded.
    assert!(global <= 0.15, "gradients: global relative error {global}");
    assert!(worst <= 0.3, "gradients: worst tensor's relative error {worst}");
}

#[test]
fn a_bf16_run_follows_the_f32_run() {
    let data_dir = shapes_data();
    let run = |name: &str, precision: &str| {
        let text = format!(
            r#"
            steps = 6
            batch_size = 4
            output_dir = "{out}"
            precision = "{precision}"
            [model]
            dir = "{model}"
            [optim]
            lr = 1e-3
            decay = "constant"
            [log]
            progress = false
            [data]
            max_len = 64
            [[data.sources]]
            name = "grounded"
            kind = "grit"
            paths = ["{data}/grit.jsonl"]
            image_root = "{data}"
            "#,
            out = crate::common::temp_dir(name).display(),
            model = repo_root().join("assets/shapes/model").display(),
            data = data_dir.display(),
        );
        let c = kosmos_train::TrainConfig::from_toml_str(&text, std::path::Path::new("mixed.toml")).unwrap();
        c.validate().unwrap();
        let mut t = Trainer::<AB>::new(c, Default::default()).unwrap();
        let s = t.run().unwrap();
        let dtype = t.model().text_model.model.embed_tokens.weight.val().dtype();
        (s.steps.iter().map(|m| m.loss).collect::<Vec<_>>(), dtype)
    };
    let (full, _) = run("mixed-f32", "f32");
    let (mixed, dtype) = run("mixed-bf16", "bf16");
    eprintln!("f32 losses {full:.4?}\nbf16 losses {mixed:.4?}");
    assert_eq!(dtype, DType::F32, "the parameters stay f32");
    // Step 1 (the same weights): bf16 rounds the logits, so the loss's error is of an absolute
    // size, not relative to the loss: measured 1.1e-3 at loss 0.273 with the model shipped on
    // 2026-11-28 (1e-3 at the earlier model's loss near 1). Later steps within 4.5e-2 relative
    // (AdamW's normalised updates carry the bf16 gradient error into the weights).
    assert!(
        (full[0] - mixed[0]).abs() <= 2e-3 * full[0].max(1.0),
        "step 1: {} vs {}",
        full[0],
        mixed[0]
    );
    let worst = full
        .iter()
        .zip(&mixed)
        .map(|(a, b)| (a - b).abs() / a)
        .fold(0.0, f64::max);
    assert!(worst <= 6e-2, "losses differ by {worst} (relative)");
    assert!(mixed[5] < mixed[0], "the bf16 run's loss falls");
}

#[test]
fn f16_is_refused_with_the_choices() {
    // f16 needs loss scaling (its gradients underflow), which the loop does not have.
    let toml = "steps = 1\nbatch_size = 1\noutput_dir = \"x\"\nprecision = \"f16\"\n[model]\ndir = \"m\"\n[optim]\nlr = 1e-3\n[data]\nmax_len = 8\n[[data.sources]]\nname = \"t\"\nkind = \"text\"\npaths = [\"t.jsonl\"]\n";
    let err = kosmos_train::TrainConfig::from_toml_str(toml, std::path::Path::new("run.toml"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("run.toml") && err.contains("f16") && err.contains("bf16"),
        "{err}"
    );
}
