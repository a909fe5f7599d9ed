//! One training step of KOSMOS-2 against PyTorch/transformers (`scripts/make_step_fixtures.py`,
//! `fixtures/train_step/`): the loss of `Kosmos2ForConditionalGeneration(..., labels=labels)`,
//! the gradients, and the parameters after one and two `torch.optim.AdamW` steps (lr 1e-3, betas
//! (0.9, 0.98), eps 1e-6, weight decay 0.05).
//!
//! The initial parameters are the weights of `fixtures/generate/model/` (checked against the
//! fixture's per-parameter `sum |p|`). To keep the fixture small, gradients and updated parameters
//! are stored for six named parameters only (`meta.json` `stored`: the tied token embedding, a
//! text-layer `Linear` weight, an attention key bias, a LayerNorm weight, the vision patch
//! embedding and the projection's latent queries), and of the token embedding and the patch
//! embedding only some rows (torch dim 0; `rows.<name>`: every token of the two batches plus a few
//! untouched ones, and a few output channels). Everything is compared on those elements only.
//!
//! Parameters are matched by walking the Burn model (module paths) and looking each path up in
//! the fixture's parameter table (`meta.json`: HF name, Burn path, layout); Burn `Linear` weights
//! are `[in, out]`, the transpose of torch's `[out, in]`, and are compared transposed.
//!
//! The fixture model is mildly ill-conditioned in f32 (its text-layer weights are scaled x3):
//! torch's own f32 gradients differ from float64 ones by up to ~2e-4 of a tensor's largest
//! gradient, far beyond `1e-6 + 1e-4 |ref|` elementwise. So the gradient tests (1) run the same
//! step in float64 on both sides, where the gradients must agree closely (that proves the same
//! function is differentiated), and (2) check that our f32 gradients are as accurate as torch's
//! f32 ones against the float64 gradients, reporting the elementwise errors against torch f32.
//! AdamW is checked alone on torch's gradients (steps 1 and 2, `1e-6`), step 2 from a reference
//! state that both sides reach exactly (see [`training_step_2_matches_transformers`]), and two
//! whole steps end to end (where AdamW's sign-like first step turns noise-signed gradient elements
//! into `2 lr` differences; those are identified and bounded).

use std::collections::{BTreeMap, BTreeSet};

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::{GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{DType, TensorData};
use kosmos_core::testing::Fixture;
use kosmos_core::{AttentionImpl, TensorFile};
use kosmos_models::loss::causal_lm_loss;
use kosmos_models::{Kosmos2, Kosmos2Input};
use kosmos_train::optim::{AdamWConfig, adamw};

/// The autodiff test backend (this suite's own: the binary's `TB` is the plain backend).
type TB = burn::backend::Autodiff<burn::backend::Flex>;
type Inner = <TB as AutodiffBackend>::InnerBackend;
type Grads = <TB as AutodiffBackend>::Gradients;

/// Loss tolerance (absolute), f32.
const LOSS_ATOL: f64 = 1e-5;
/// The brief's elementwise gradient tolerance `1e-6 + 1e-4 |ref|` (reported against torch f32).
const GRAD_ATOL: f64 = 1e-6;
const GRAD_RTOL: f64 = 1e-4;
/// f32 gradients: per tensor, `max |ours - exact| <= GRAD_NOISE_ATOL + GRAD_NOISE_FACTOR * max |torch f32 - exact|`
/// (exact = the float64 reference): as accurate as torch's f32 gradients, within a factor.
const GRAD_NOISE_ATOL: f64 = 1e-7;
const GRAD_NOISE_FACTOR: f64 = 4.0;
/// f32 gradients: per tensor, `max |ours - torch f32| <= 1e-6 + GRAD_SCALE_RTOL * max |torch f32|`.
const GRAD_SCALE_RTOL: f64 = 1e-3;
/// float64 run: loss, and per tensor `max |ours - ref| <= 1e-12 + F64_SCALE_RTOL * max |ref|`. Not
/// tighter because both sides build the sinusoidal position table in f32 (HF by design), with
/// different libm `exp`/`sin`/`cos`: the script measured that replacing HF's f32 table by the
/// exact one moves the f64 loss by ~3e-7 and gradients by up to ~8e-6 of their tensor's maximum
/// (`meta.json` `float64_reference.position_table_sensitivity`).
const F64_LOSS_ATOL: f64 = 1e-7;
const F64_SCALE_RTOL: f64 = 1e-5;
/// Optimizer alone (reference gradients in): `|ours - ref| <= 1e-6 + 1e-6 |ref|` elementwise.
const OPTIM_ATOL: f64 = 1e-6;
const OPTIM_RTOL: f64 = 1e-6;
/// Whole steps: the elementwise tolerance `1e-5 + 1e-4 |ref|` of parameters, except where the
/// gradient's sign is f32 noise (see [`two_training_steps_match_transformers`]).
const STEP_ATOL: f64 = 1e-5;
const STEP_RTOL: f64 = 1e-4;
/// An element's gradient sign is f32 noise when its float64 gradient is within this factor of
/// torch's f32 noise on that tensor (`max |torch f32 - float64|`).
const UNDETERMINED_FACTOR: f64 = 2.0;

const LR: f64 = 1e-3;

/// The fixture, its tensors, the parameter table (Burn path -> (HF name, transposed)) and the
/// stored parameters (HF name -> stored rows, `None` for all).
struct Case {
    fx: Fixture,
    io: TensorFile,
    raw: Vec<u8>,
    table: BTreeMap<String, (String, bool)>,
    /// Per HF name: torch shape and `sum |p|` of the initial values.
    shapes: BTreeMap<String, (Vec<usize>, f64)>,
    stored: BTreeMap<String, Option<Vec<usize>>>,
}

fn case() -> Case {
    let fx = Fixture::open("train_step");
    let io = fx.file("step.safetensors");
    let raw = std::fs::read(fx.dir.join("step.safetensors")).unwrap();
    let (mut table, mut shapes) = (BTreeMap::new(), BTreeMap::new());
    for p in fx.meta["parameters"].as_array().expect("meta.parameters") {
        let burn = p["burn"].as_str().unwrap().to_string();
        let hf = p["hf"].as_str().unwrap().to_string();
        let transposed = match p["layout"].as_str().unwrap() {
            "same" => false,
            "transposed" => true,
            other => panic!("{burn}: layout {other}"),
        };
        let shape: Vec<usize> = p["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        shapes.insert(hf.clone(), (shape, p["init_abs_sum"].as_f64().unwrap()));
        assert!(table.insert(burn.clone(), (hf, transposed)).is_none(), "{burn} twice");
    }
    let mut stored = BTreeMap::new();
    for p in fx.meta["stored"].as_array().expect("meta.stored") {
        let hf = p["hf"].as_str().unwrap().to_string();
        assert!(shapes.contains_key(&hf), "{hf}: not a parameter");
        let rows = p["rows"].as_array().map(|r| {
            let rows: Vec<usize> = r.iter().map(|i| i.as_u64().unwrap() as usize).collect();
            let stored: Vec<usize> = host(io.data(&format!("rows.{hf}")).unwrap())
                .into_iter()
                .map(|i| i as usize)
                .collect();
            assert_eq!(rows, stored, "{hf}: rows in meta.json and step.safetensors");
            rows
        });
        stored.insert(hf, rows);
    }
    assert_eq!(stored.len(), 6, "six named parameters");
    let config = &fx.meta["config"];
    assert_eq!(config["lr"].as_f64(), Some(LR));
    assert_eq!(config["betas"][0].as_f64(), Some(0.9));
    assert_eq!(config["betas"][1].as_f64(), Some(0.98));
    assert_eq!(config["eps"].as_f64(), Some(1e-6));
    assert_eq!(config["weight_decay"].as_f64(), Some(0.05));
    Case {
        fx,
        io,
        raw,
        table,
        shapes,
        stored,
    }
}

impl Case {
    /// A float tensor of the fixture, exactly (f32 or f64), flattened.
    fn values(&self, key: &str) -> Vec<f64> {
        let st = safetensors::SafeTensors::deserialize(&self.raw).unwrap();
        let view = st.tensor(key).unwrap_or_else(|_| panic!("{key}: not in the fixture"));
        match view.dtype() {
            safetensors::Dtype::F32 => view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64)
                .collect(),
            safetensors::Dtype::F64 => view
                .data()
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
                .collect(),
            other => panic!("{key}: {other:?}"),
        }
    }

    /// The stored elements (rows) of a whole parameter or gradient of `hf` (torch layout, flat).
    fn stored_part(&self, hf: &str, full: &[f64]) -> Vec<f64> {
        let (shape, _) = &self.shapes[hf];
        assert_eq!(full.len(), shape.iter().product::<usize>(), "{hf}: size");
        match &self.stored[hf] {
            None => full.to_vec(),
            Some(rows) => {
                let row = full.len() / shape[0];
                rows.iter()
                    .flat_map(|&r| full[r * row..(r + 1) * row].iter().copied())
                    .collect()
            }
        }
    }

    /// The fixture's stored elements `<prefix><hf>` as a whole tensor of `hf`'s shape (torch
    /// layout), zero in the rows not stored.
    fn whole(&self, prefix: &str, hf: &str) -> TensorData {
        let (shape, _) = &self.shapes[hf];
        let values = self.values(&format!("{prefix}{hf}"));
        let full: Vec<f32> = match &self.stored[hf] {
            None => values.iter().map(|&v| v as f32).collect(),
            Some(rows) => {
                let row = shape[1..].iter().product::<usize>();
                let mut full = vec![0f32; shape[0] * row];
                assert_eq!(values.len(), rows.len() * row, "{prefix}{hf}: size");
                for (i, &r) in rows.iter().enumerate() {
                    for (dst, &v) in full[r * row..(r + 1) * row]
                        .iter_mut()
                        .zip(&values[i * row..(i + 1) * row])
                    {
                        *dst = v as f32;
                    }
                }
                full
            }
        };
        TensorData::new(full, shape.clone())
    }
}

/// The optimizer of the fixture, `torch.optim.AdamW(lr=1e-3, betas=(0.9, 0.98), eps=1e-6,
/// weight_decay=0.05)`, built through the config (`via_config`) or [`adamw`].
fn optimizer(via_config: bool) -> impl Optimizer<Kosmos2<TB>, TB> {
    if via_config {
        AdamWConfig::new()
            .with_beta_2(0.98)
            .with_epsilon(1e-6)
            .with_weight_decay(0.05)
            .init::<TB, Kosmos2<TB>>()
    } else {
        adamw::<TB, Kosmos2<TB>>((0.9, 0.98), 1e-6, 0.05)
    }
}

/// Makes every float parameter a fresh leaf that requires gradients. A model loaded with a dtype
/// other than the file's gets its parameters from `cast` (a recorded operation), so without this
/// their `grad()` is `None` on an autodiff backend.
struct Leaves;

impl ModuleMapper<TB> for Leaves {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<TB, D>>) -> Param<Tensor<TB, D>> {
        param.map(|t| t.detach().require_grad())
    }
}

fn model(case: &Case, implementation: AttentionImpl, dtype: DType) -> Kosmos2<TB> {
    let dir = kosmos_core::testing::repo_root().join(case.fx.meta["model"]["dir"].as_str().unwrap());
    let mut model = Kosmos2::<TB>::from_pretrained_with_dtype(dir, &Default::default(), dtype).unwrap();
    model.set_attention_impl(implementation);
    let model = if dtype == DType::F32 {
        model
    } else {
        model.map(&mut Leaves)
    };
    // the initial parameters are the fixture's (the model was not regenerated since)
    for e in entries(case, &model, None) {
        let (_, expected) = case.shapes[&e.hf];
        let sum: f64 = e.value.iter().map(|v| v.abs()).sum();
        assert!(
            (sum - expected).abs() <= 1e-9 * expected.max(1e-30),
            "{}: sum |p| {sum} but the fixture's model had {expected}: regenerate fixtures/train_step",
            e.hf
        );
    }
    model
}

fn int2(io: &TensorFile, key: &str) -> Tensor<TB, 2, Int> {
    Tensor::from_data(io.data(key).unwrap().convert::<i64>(), &Default::default())
}

/// The batch (pixels in `dtype`) and labels of step `step`.
fn batch(io: &TensorFile, step: usize, dtype: DType) -> (Kosmos2Input<TB>, Tensor<TB, 2, Int>) {
    let k = |name: &str| format!("step{step}.{name}");
    let pixels: Tensor<TB, 4> = io.tensor(&k("pixel_values"), &Default::default()).unwrap();
    let input = Kosmos2Input {
        input_ids: int2(io, &k("input_ids")),
        attention_mask: Some(int2(io, &k("attention_mask"))),
        pixel_values: Some(pixels.cast(dtype)),
        image_embeds_position_mask: Some(int2(io, &k("image_embeds_position_mask"))),
    };
    (input, int2(io, &k("labels")))
}

/// Forward pass and `causal_lm_loss` of step `step` (f32).
fn loss(model: &Kosmos2<TB>, io: &TensorFile, step: usize) -> Tensor<TB, 1> {
    let (input, labels) = batch(io, step, DType::F32);
    causal_lm_loss(model.forward(&input).unwrap().logits, labels)
}

fn scalar(t: Tensor<TB, 1>) -> f64 {
    t.into_data().convert::<f64>().to_vec::<f64>().unwrap()[0]
}

fn host(data: TensorData) -> Vec<f64> {
    data.convert::<f64>().to_vec::<f64>().unwrap()
}

/// One parameter of the Burn model, in torch layout.
struct Entry {
    hf: String,
    value: Vec<f64>,
    grad: Option<Vec<f64>>,
}

/// Walks the model's float parameters with their module paths.
struct Walk<'a> {
    table: &'a BTreeMap<String, (String, bool)>,
    path: Vec<String>,
    containers: Vec<String>,
    seen: BTreeSet<String>,
    /// Collect values and (with `grads`) gradients.
    collect: Option<(Option<&'a Grads>, Vec<Entry>)>,
    /// Register the reference gradients `<prefix><hf name>` of the stored parameters.
    register: Option<(&'a Case, String, GradientsParams)>,
}

impl<'a> Walk<'a> {
    fn new(table: &'a BTreeMap<String, (String, bool)>) -> Self {
        Self {
            table,
            path: Vec::new(),
            containers: Vec::new(),
            seen: BTreeSet::new(),
            collect: None,
            register: None,
        }
    }

    /// Every parameter of the table was visited exactly once.
    fn check_complete(&self) {
        let all: BTreeSet<String> = self.table.keys().cloned().collect();
        assert_eq!(self.seen, all, "the model's parameters and the fixture's differ");
    }
}

/// Torch layout of a Burn tensor (a transposed `Linear` weight is transposed back).
fn torch_layout<const D: usize>(t: Tensor<Inner, D>, transposed: bool) -> Vec<f64> {
    host(if transposed { t.transpose() } else { t }.into_data())
}

impl ModuleVisitor<TB> for Walk<'_> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.push(name.to_string());
        self.containers.push(container_type.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
        self.containers.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<TB, D>>) {
        let burn = self.path.join(".");
        let (hf, transposed) = self
            .table
            .get(&burn)
            .unwrap_or_else(|| panic!("{burn}: not in the fixture's parameter table"))
            .clone();
        let linear_weight =
            self.containers.last().map(String::as_str) == Some("Struct:Linear") && burn.ends_with(".weight");
        assert_eq!(transposed, linear_weight, "{burn}: layout in the table");
        assert!(self.seen.insert(burn.clone()), "{burn} visited twice");
        let id: ParamId = param.id;
        if let Some((grads, out)) = self.collect.as_mut() {
            let tensor = param.val();
            let grad = grads.map(|g| {
                let g = tensor.grad(g).unwrap_or_else(|| panic!("{burn}: no gradient"));
                torch_layout(g, transposed)
            });
            out.push(Entry {
                hf,
                value: torch_layout(tensor.inner(), transposed),
                grad,
            });
        } else if let Some((case, prefix, grads)) = self.register.as_mut()
            && case.stored.contains_key(&hf)
        {
            let t = Tensor::<Inner, D>::from_data(case.whole(prefix, &hf), &Default::default());
            grads.register(id, if transposed { t.transpose() } else { t });
        }
    }
}

/// Values (and gradients) of all parameters, in torch layout.
fn entries(case: &Case, model: &Kosmos2<TB>, grads: Option<&Grads>) -> Vec<Entry> {
    let mut walk = Walk::new(&case.table);
    walk.collect = Some((grads, Vec::new()));
    model.visit(&mut walk);
    walk.check_complete();
    walk.collect.unwrap().1
}

/// Values (and gradients) of the stored elements of the six stored parameters, in torch layout.
fn stored_entries(case: &Case, model: &Kosmos2<TB>, grads: Option<&Grads>) -> Vec<Entry> {
    let out: Vec<Entry> = entries(case, model, grads)
        .into_iter()
        .filter(|e| case.stored.contains_key(&e.hf))
        .map(|e| Entry {
            value: case.stored_part(&e.hf, &e.value),
            grad: e.grad.map(|g| case.stored_part(&e.hf, &g)),
            hf: e.hf,
        })
        .collect();
    assert_eq!(out.len(), case.stored.len());
    out
}

/// The fixture's gradients `<prefix><hf name>` as Burn gradients of `model`'s stored parameters
/// (zero in the rows not stored; the other parameters get none, so the optimizer leaves them
/// alone, as `torch.optim.AdamW` does a parameter whose `grad` is `None`).
fn reference_grads(case: &Case, model: &Kosmos2<TB>, prefix: &str) -> GradientsParams {
    let mut walk = Walk::new(&case.table);
    walk.register = Some((case, prefix.to_string(), GradientsParams::new()));
    model.visit(&mut walk);
    walk.check_complete();
    walk.register.unwrap().2
}

/// Differences between two tensors.
#[derive(Clone, Debug, Default)]
struct Diff {
    /// `max |a - b|`.
    max_abs: f64,
    /// `max |b|`.
    max_ref: f64,
    /// Largest `|a - b| / (atol + rtol |b|)` and where.
    worst_ratio: f64,
    worst: String,
    /// Elements outside `atol + rtol |b|`, and all elements.
    outside: usize,
    n: usize,
}

fn diff(ours: &[f64], reference: &[f64], atol: f64, rtol: f64, what: &str) -> Diff {
    assert_eq!(ours.len(), reference.len(), "{what}: size");
    let mut d = Diff {
        n: ours.len(),
        ..Diff::default()
    };
    for (i, (x, y)) in ours.iter().zip(reference).enumerate() {
        assert!(x.is_finite(), "{what}: non-finite value at {i}");
        let err = (x - y).abs();
        let ratio = err / (atol + rtol * y.abs());
        d.max_abs = d.max_abs.max(err);
        d.max_ref = d.max_ref.max(y.abs());
        if ratio > 1.0 {
            d.outside += 1;
        }
        if ratio > d.worst_ratio {
            d.worst_ratio = ratio;
            d.worst = format!("{what}[{i}]: ours {x:e}, reference {y:e}, |diff| {err:.3e}");
        }
    }
    d
}

/// Elements outside the brief's elementwise tolerance, over all tensors.
fn outside_summary(diffs: &[Diff]) -> String {
    let outside: usize = diffs.iter().map(|d| d.outside).sum();
    let n: usize = diffs.iter().map(|d| d.n).sum();
    let worst = diffs
        .iter()
        .max_by(|a, b| a.worst_ratio.total_cmp(&b.worst_ratio))
        .unwrap();
    format!(
        "{outside} of {n} elements outside; worst {:.1}x the tolerance at {}",
        worst.worst_ratio, worst.worst
    )
}

fn loss_and_gradients(implementation: AttentionImpl) {
    let case = case();
    let model = model(&case, implementation, DType::F32);
    let loss = loss(&model, &case.io, 1);
    let ours = scalar(loss.clone());
    let reference = case.values("step1.loss")[0];
    let exact = case.values("f64.step1.loss")[0];
    eprintln!(
        "loss: ours {ours:.8}, transformers f32 {reference:.8} (|diff| {:.3e}), float64 {exact:.8} (ours {:.3e}, torch {:.3e})",
        (ours - reference).abs(),
        (ours - exact).abs(),
        (reference - exact).abs()
    );
    assert!((ours - reference).abs() <= LOSS_ATOL, "loss {ours} vs {reference}");

    let grads = loss.backward();
    let mut elementwise = Vec::new();
    let (mut worst_noise, mut worst_scale) = ((0.0, String::new()), (0.0, String::new()));
    eprintln!("per tensor: max|g|, max|ours - torch32|, max|ours - f64|, max|torch32 - f64|, elementwise outside");
    for e in stored_entries(&case, &model, Some(&grads)) {
        let ours = e.grad.as_ref().unwrap();
        let torch = case.values(&format!("step1.grad.{}", e.hf));
        let exact = case.values(&format!("f64.step1.grad.{}", e.hf));
        let vs_torch = diff(ours, &torch, GRAD_ATOL, GRAD_RTOL, &format!("step1.grad.{}", e.hf));
        let vs_exact = diff(ours, &exact, GRAD_ATOL, GRAD_RTOL, &e.hf);
        let torch_vs_exact = diff(&torch, &exact, GRAD_ATOL, GRAD_RTOL, &e.hf);
        eprintln!(
            "  {}: {:.2e} | {:.2e} | {:.2e} | {:.2e} | {}/{}",
            e.hf,
            vs_exact.max_ref,
            vs_torch.max_abs,
            vs_exact.max_abs,
            torch_vs_exact.max_abs,
            vs_torch.outside,
            vs_torch.n
        );
        let noise = vs_exact.max_abs / (GRAD_NOISE_ATOL + GRAD_NOISE_FACTOR * torch_vs_exact.max_abs);
        if noise > worst_noise.0 {
            worst_noise = (noise, e.hf.clone());
        }
        let scale = vs_torch.max_abs / (GRAD_ATOL + GRAD_SCALE_RTOL * vs_torch.max_ref);
        if scale > worst_scale.0 {
            worst_scale = (scale, e.hf.clone());
        }
        elementwise.push(vs_torch);
    }
    eprintln!(
        "elementwise |ours - torch32| <= 1e-6 + 1e-4 |ref|: {}",
        outside_summary(&elementwise)
    );
    eprintln!(
        "accuracy against float64 relative to torch f32's: worst {:.3} of the bound ({})",
        worst_noise.0, worst_noise.1
    );
    eprintln!(
        "max |ours - torch32| relative to 1e-6 + 1e-3 max|torch32|: worst {:.3} ({})",
        worst_scale.0, worst_scale.1
    );
    assert!(
        worst_noise.0 <= 1.0,
        "{}: less accurate than torch's f32 gradients",
        worst_noise.1
    );
    assert!(
        worst_scale.0 <= 1.0,
        "{}: too far from torch's f32 gradients",
        worst_scale.1
    );
}

/// The loss equals transformers' `outputs.loss` (HF's ForCausalLMLoss: shift inside, ignore -100,
/// mean over counted tokens), and the stored parameters' f32 gradients are as close to the float64
/// gradients as torch's f32 gradients are (explicit attention, HF's eager path).
#[test]
fn loss_and_gradients_match_transformers() {
    loss_and_gradients(AttentionImpl::Explicit);
}

/// The same with Burn's fused attention kernel (the models' default).
#[test]
fn loss_and_gradients_match_transformers_fused_attention() {
    loss_and_gradients(AttentionImpl::Fused);
}

/// Step 1 in float64 on both sides: the same loss, and gradients that agree to rounding of the
/// f32-computed position tables (HF computes them in f32 by design). The reference gradients are
/// stored rounded to f32 (a relative 6e-8 of each element, far below the `1e-5` bound).
#[test]
fn loss_and_gradients_match_transformers_in_float64() {
    let case = case();
    let model = model(&case, AttentionImpl::Explicit, DType::F64);
    let (input, labels) = batch(&case.io, 1, DType::F64);
    let logits = model.forward(&input).unwrap().logits;
    assert_eq!(logits.dtype(), DType::F64);
    let loss = causal_lm_loss(logits, labels);
    assert_eq!(loss.dtype(), DType::F64);
    let ours = scalar(loss.clone());
    let reference = case.values("f64.step1.loss")[0];
    eprintln!(
        "float64 loss: ours {ours:.12}, torch {reference:.12}, |diff| {:.3e}",
        (ours - reference).abs()
    );
    assert!((ours - reference).abs() <= F64_LOSS_ATOL);

    let grads = loss.backward();
    let mut worst = (0.0, String::new());
    let mut all = Vec::new();
    for e in stored_entries(&case, &model, Some(&grads)) {
        let reference = case.values(&format!("f64.step1.grad.{}", e.hf));
        let d = diff(e.grad.as_ref().unwrap(), &reference, 1e-12, 1e-6, &e.hf);
        let ratio = d.max_abs / (1e-12 + F64_SCALE_RTOL * d.max_ref);
        eprintln!(
            "  {}: max|g| {:.2e}, max |diff| {:.2e} ({:.2e} of max|g|)",
            e.hf,
            d.max_ref,
            d.max_abs,
            d.max_abs / d.max_ref.max(1e-300)
        );
        if ratio > worst.0 {
            worst = (ratio, e.hf.clone());
        }
        all.push(d);
    }
    eprintln!(
        "elementwise |ours - ref| <= 1e-12 + 1e-6 |ref|: {}",
        outside_summary(&all)
    );
    eprintln!(
        "max |diff| relative to 1e-5 max|ref|: worst {:.3} ({})",
        worst.0, worst.1
    );
    assert!(worst.0 <= 1.0, "{}: float64 gradients differ", worst.1);
}

/// Our AdamW, fed torch's gradients, reproduces `torch.optim.AdamW` after steps 1 and 2 (the
/// optimizer alone: no gradient differences involved), on the stored elements. Step 1 is the real
/// run's, step 2 the reference-state run's (whose step 1 is the same on the stored elements).
#[test]
fn adamw_matches_torch_on_reference_gradients() {
    let case = case();
    let mut model = model(&case, AttentionImpl::Explicit, DType::F32);
    let mut optim = optimizer(true);
    for (step, run) in [(1, "step1"), (2, "ref2")] {
        let grads = reference_grads(&case, &model, &format!("{run}.grad."));
        model = optim.step(LR, model, grads);
        let diffs: Vec<Diff> = stored_entries(&case, &model, None)
            .iter()
            .map(|e| {
                let key = format!("{run}.param.{}", e.hf);
                diff(&e.value, &case.values(&key), OPTIM_ATOL, OPTIM_RTOL, &key)
            })
            .collect();
        let max_abs = diffs.iter().map(|d| d.max_abs).fold(0.0, f64::max);
        eprintln!(
            "AdamW step {step} on reference gradients: max |diff| {max_abs:.3e}; {}",
            outside_summary(&diffs)
        );
        assert!(diffs.iter().all(|d| d.outside == 0), "step {step}");
    }
}

/// Step 2 from the reference state: a step 1 that both sides take with torch's step-1 gradients of
/// the stored elements only (zero on the other rows of the embedding and patch embedding, no
/// gradient - no update, no optimizer state - for the other parameters; the script's `ref2` run),
/// so parameters and AdamW moments equal torch's to rounding; then our loss, gradients and AdamW
/// step 2 (the stored parameters at t = 2, the others at t = 1). The stored parameters after it
/// agree to `1e-5 + 1e-4 |ref|` everywhere except the attention key bias, whose exact gradient is
/// 0 (softmax ignores a per-query constant): its f32 gradients are pure noise (~1e-7), which AdamW
/// (eps 1e-6) turns into steps of up to ~lr/10 in random directions, in torch as in Burn.
#[test]
fn training_step_2_matches_transformers() {
    let case = case();
    let mut model = model(&case, AttentionImpl::Explicit, DType::F32);
    let mut optim = optimizer(true);
    model = optim.step(LR, model.clone(), reference_grads(&case, &model, "step1.grad."));

    let loss = loss(&model, &case.io, 2);
    let ours = scalar(loss.clone());
    let reference = case.values("ref2.loss")[0];
    eprintln!(
        "step 2 loss: ours {ours:.8}, transformers {reference:.8}, |diff| {:.3e}",
        (ours - reference).abs()
    );
    assert!(
        (ours - reference).abs() <= LOSS_ATOL,
        "step 2 loss {ours} vs {reference}"
    );

    let grads = loss.backward();
    let (mut elementwise, mut worst) = (Vec::new(), (0.0, String::new()));
    for e in stored_entries(&case, &model, Some(&grads)) {
        let key = format!("ref2.grad.{}", e.hf);
        let d = diff(e.grad.as_ref().unwrap(), &case.values(&key), GRAD_ATOL, GRAD_RTOL, &key);
        let scale = d.max_abs / (GRAD_ATOL + GRAD_SCALE_RTOL * d.max_ref);
        if scale > worst.0 {
            worst = (scale, e.hf.clone());
        }
        elementwise.push(d);
    }
    let max_abs = elementwise.iter().map(|d| d.max_abs).fold(0.0, f64::max);
    eprintln!(
        "step 2 gradients: max |diff| {max_abs:.3e}; elementwise 1e-6 + 1e-4 |ref|: {}",
        outside_summary(&elementwise)
    );
    eprintln!(
        "max |ours - torch32| relative to 1e-6 + 1e-3 max|torch32|: worst {:.3} ({})",
        worst.0, worst.1
    );
    assert!(worst.0 <= 1.0, "{}: step 2 gradients too far from torch's", worst.1);

    model = optim.step(LR, model.clone(), GradientsParams::from_grads(grads, &model));
    let (mut others, mut key_bias) = (Vec::new(), Diff::default());
    for e in stored_entries(&case, &model, None) {
        let key = format!("ref2.param.{}", e.hf);
        let d = diff(&e.value, &case.values(&key), STEP_ATOL, STEP_RTOL, &key);
        if e.hf.ends_with("k_proj.bias") {
            key_bias.max_abs = key_bias.max_abs.max(d.max_abs);
            key_bias.outside += d.outside;
            key_bias.n += d.n;
        } else {
            others.push(d);
        }
    }
    let max_abs = others.iter().map(|d| d.max_abs).fold(0.0, f64::max);
    eprintln!(
        "parameters after step 2: max |diff| {max_abs:.3e}; {}",
        outside_summary(&others)
    );
    eprintln!(
        "  attention key bias (exact gradient 0): max |diff| {:.3e}, {} of {} outside",
        key_bias.max_abs, key_bias.outside, key_bias.n
    );
    assert!(others.iter().all(|d| d.outside == 0), "parameters after step 2");
    assert!(key_bias.n > 0, "a key bias is stored");
    assert!(
        key_bias.max_abs <= 2.0 * LR,
        "key biases moved by more than AdamW's noise step"
    );
}

/// The largest |torch f32 - float64| of each stored step-1 gradient (torch's own f32 noise, on the
/// stored elements), by HF name.
fn torch_noise(case: &Case) -> BTreeMap<String, f64> {
    case.stored
        .keys()
        .map(|hf| {
            let torch = case.values(&format!("step1.grad.{hf}"));
            let exact = case.values(&format!("f64.step1.grad.{hf}"));
            (hf.clone(), diff(&torch, &exact, 1.0, 0.0, hf).max_abs)
        })
        .collect()
}

/// Two whole training steps with our loss, gradients and AdamW against transformers + torch.
///
/// AdamW's first step moves every element by about `lr * sign(g)` (`m_hat / sqrt(v_hat) =
/// g / |g|`), so an element whose gradient is below f32 noise - its sign differs between torch f32,
/// float64 and us - ends up to `2 lr` away. After step 1 the parameters must agree to
/// `1e-5 + 1e-4 |ref|` except at such elements (float64 gradient within
/// [`UNDETERMINED_FACTOR`] x torch's f32 noise on that tensor: the attention key biases, whose
/// exact gradient is 0, and a few dozen elements of the ill-conditioned projection and vision
/// tower). Parameters are compared on the stored elements. Step 2 then starts from different
/// parameters: one of those elements,
/// `latent_query[25]` (float64 gradient -1.9e-4, torch noise 1.7e-4, ours of the opposite sign),
/// has a step-2 loss gradient of about -0.6, so step 2's loss differs by ~1e-3 and is only
/// checked loosely here; [`training_step_2_matches_transformers`] checks step 2 exactly.
#[test]
fn two_training_steps_match_transformers() {
    let case = case();
    let noise = torch_noise(&case);
    let mut model = model(&case, AttentionImpl::Explicit, DType::F32);
    let mut optim = optimizer(false);
    for step in 1..=2 {
        let loss = loss(&model, &case.io, step);
        let ours = scalar(loss.clone());
        let reference = case.values(&format!("step{step}.loss"))[0];
        eprintln!(
            "step {step} loss: ours {ours:.8}, transformers {reference:.8}, |diff| {:.3e}",
            (ours - reference).abs()
        );
        let loss_atol = if step == 1 { LOSS_ATOL } else { 5e-3 };
        assert!(
            (ours - reference).abs() <= loss_atol,
            "step {step} loss {ours} vs {reference}"
        );
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(LR, model, grads);

        let (mut determined, mut undetermined, mut max_undetermined) = (Vec::new(), 0usize, 0f64);
        for e in stored_entries(&case, &model, None) {
            let key = format!("step{step}.param.{}", e.hf);
            let reference = case.values(&key);
            let exact = case.values(&format!("f64.step1.grad.{}", e.hf));
            let sign_is_noise = |i: usize| exact[i].abs() <= UNDETERMINED_FACTOR * noise[&e.hf];
            let (mut ours_kept, mut ref_kept) = (Vec::new(), Vec::new());
            for (i, (x, y)) in e.value.iter().zip(&reference).enumerate() {
                if step == 1 && sign_is_noise(i) && (x - y).abs() > STEP_ATOL + STEP_RTOL * y.abs() {
                    undetermined += 1;
                    max_undetermined = max_undetermined.max((x - y).abs());
                } else {
                    ours_kept.push(*x);
                    ref_kept.push(*y);
                }
            }
            determined.push(diff(&ours_kept, &ref_kept, STEP_ATOL, STEP_RTOL, &key));
        }
        let max_abs = determined.iter().map(|d| d.max_abs).fold(max_undetermined, f64::max);
        eprintln!(
            "parameters after step {step}: max |diff| {max_abs:.3e}; {undetermined} elements with a noise-signed \
             gradient differ (by <= {max_undetermined:.3e}); the others: {}",
            outside_summary(&determined)
        );
        if step == 1 {
            assert!(determined.iter().all(|d| d.outside == 0), "parameters after step 1");
            assert!(
                max_undetermined <= 2.0 * LR * 1.001,
                "an element moved by more than 2 lr"
            );
        } else {
            assert!(max_abs <= 4.0 * LR, "step 2: an element moved by more than 4 lr");
        }
    }
}
