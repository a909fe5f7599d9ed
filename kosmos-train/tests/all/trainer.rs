//! The training loop on the tiny fixture model (`fixtures/generate/model`) and the GRIT fixture
//! records (`fixtures/train_data`): the loss falls, accumulation equals one batch of the union,
//! freezing, checkpoints and resume, the NaN stop, metrics and configuration errors.

use std::path::{Path, PathBuf};

use burn::backend::Autodiff;
use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::prelude::*;
use kosmos_core::testing::repo_root;
use kosmos_models::Kosmos2;
use kosmos_models::loss::IGNORE_INDEX;
use kosmos_train::checkpoint;
use kosmos_train::config::{MetricsFormat, ModelInit};
use kosmos_train::data::{Batch, CollateConfig, Collator, DataLoader};
use kosmos_train::metrics::StepMetrics;
use kosmos_train::trainer::{
    LossWeights, accumulate_gradients, accumulate_gradients_parallel, accumulate_weighted_gradients, fork,
};
use kosmos_train::{TrainConfig, TrainError, Trainer};
use kosmos_vision::freeze::{VisionFreeze, freeze_vision};

use crate::TB;
use crate::common::temp_dir;

pub(crate) type AB = Autodiff<TB>;

fn model_dir() -> PathBuf {
    repo_root().join("fixtures/generate/model")
}

/// A run of `steps` steps on the GRIT fixture records in a fresh directory; `extra` TOML is
/// appended (tables after the top-level keys).
pub(crate) fn config(name: &str, steps: u64, top: &str, optim: &str, extra: &str) -> TrainConfig {
    let text = format!(
        r#"
        steps = {steps}
        seed = 5
        output_dir = "{out}"
        {top}

        [model]
        dir = "fixtures/generate/model"

        [optim]
        {optim}

        [log]
        progress = false

        [data]
        seed = 3
        max_len = 48
        [[data.sources]]
        name = "grit"
        kind = "grit"
        paths = ["fixtures/train_data/grit.jsonl"]
        image_root = "fixtures/train_data"
        {extra}
        "#,
        out = temp_dir(name).display(),
        top = if top.contains("batch_size") {
            top.to_string()
        } else {
            format!("batch_size = 2\n{top}")
        }
    );
    let mut c = TrainConfig::from_toml_str(&text, Path::new("test.toml")).unwrap();
    c.resolve_relative_to(&repo_root());
    c.validate().unwrap();
    c
}

/// Every float parameter's values, in visiting order.
struct Values(Vec<Vec<f32>>);
impl<B: Backend> ModuleVisitor<B> for Values {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        self.0.push(param.val().into_data().convert::<f32>().to_vec().unwrap());
    }
}

pub(crate) fn values<B: Backend, M: Module<B>>(m: &M) -> Vec<Vec<f32>> {
    let mut v = Values(Vec::new());
    m.visit(&mut v);
    v.0
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
        .fold(0.0, f32::max)
}

/// Gradients of every parameter (zeros where there is none), in visiting order.
struct Grads<'a>(&'a GradientsParams, Vec<Vec<f32>>, usize);
impl ModuleVisitor<AB> for Grads<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AB, D>>) {
        match self.0.get::<TB, D>(param.id) {
            Some(g) => {
                self.2 += 1;
                self.1.push(g.into_data().convert::<f32>().to_vec().unwrap())
            }
            None => self.1.push(vec![0.0; param.val().shape().num_elements()]),
        }
    }
}

fn grads(model: &Kosmos2<AB>, g: &GradientsParams) -> (Vec<Vec<f32>>, usize) {
    let mut v = Grads(g, Vec::new(), 0);
    model.visit(&mut v);
    (v.1, v.2)
}

/// Mixed batches (GRIT rows with an image, text-only rows): the validation loss falls by more
/// than 20% in 12 steps (measured 10.50 -> 7.67).
#[test]
fn tiny_model_loss_falls() {
    let text = temp_dir("falls-text").join("text.jsonl");
    std::fs::write(
        &text,
        "{\"text\": \"A man in a blue shirt is holding a dog.\"}\n{\"text\": \"Two people are riding horses.\"}\n",
    )
    .unwrap();
    let c = config(
        "falls",
        12,
        "",
        "lr = 5e-3\ndecay = \"constant\"\nweight_decay = 0.0",
        &(format!(
            "[[data.sources]]\nname = \"text\"\nkind = \"text\"\npaths = [\"{}\"]\n",
            text.display()
        ) + "[validation]\nevery = 4\nbatches = 3\n[validation.data]\nmax_len = 48\n[[validation.data.sources]]\nname = \"grit\"\nkind = \"grit\"\npaths = [\"fixtures/train_data/grit.jsonl\"]\nimage_root = \"fixtures/train_data\""),
    );
    // the training batches mix rows with and without an image
    let collator = Collator::from_model_dir(model_dir(), 8, CollateConfig::from(&c.data)).unwrap();
    let mut loader = DataLoader::with_collator(c.data.clone(), collator).unwrap();
    let mixed = (0..12)
        .map(|_| loader.next_batch(2).unwrap().images_per_row)
        .filter(|rows| rows.contains(&0) && rows.contains(&1))
        .count();
    assert!(mixed > 0, "no mixed batch");
    let mut c = c;
    c.log.format = MetricsFormat::Csv;
    let mut trainer = Trainer::<AB>::new(c, Default::default()).unwrap();
    let before = trainer.validate().unwrap().unwrap();
    let summary = trainer.run().unwrap();
    let losses: Vec<f64> = summary.steps.iter().map(|m| m.loss).collect();
    let after = summary.steps.last().unwrap().val_loss.unwrap();
    eprintln!("validation loss {before:.4} -> {after:.4}; training losses {losses:.4?}");
    assert!(after < 0.8 * before, "validation loss {before} -> {after}");
    assert!(summary.steps[3].val_loss.is_some() && summary.steps[2].val_loss.is_none());
    let csv = std::fs::read_to_string(trainer.metrics_path().unwrap()).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(
        lines[0],
        "step,loss,lr,tokens,scored_tokens,tokens_per_s,grad_norm,val_loss"
    );
    assert_eq!(lines.len(), 13);
    assert!(lines[12].starts_with("12,"));

    // The trained model was exported as a Hugging Face directory that loads back to the same
    // logits.
    use burn::module::AutodiffModule;
    let final_dir = trainer.config().output_dir.join("final");
    let exported = Kosmos2::<TB>::from_pretrained(&final_dir, &Default::default()).unwrap();
    let trained = trainer.model().clone().valid();
    let ids = Tensor::<TB, 2, Int>::from_ints([[0, 7, 11, 4, 2]], &Default::default());
    let a = trained.logits(trained.text_hidden(&ids, None, None, None).unwrap());
    let b = exported.logits(exported.text_hidden(&ids, None, None, None).unwrap());
    assert_eq!(a.into_data(), b.into_data());
    for name in ["config.json", "tokenizer.json", "preprocessor_config.json"] {
        assert!(final_dir.join(name).is_file(), "{name} not copied");
    }
}

/// Four examples as two micro-batches of two rows and as one batch of four: the same loss and
/// gradients (token-weighted accumulation).
/// The first four GRIT fixture examples as two micro-batches of two rows and as one batch of
/// four, with the examples' lengths.
pub(crate) fn micro_and_union(name: &str) -> ([Batch; 2], [Batch; 1], Vec<usize>) {
    let c = config(name, 1, "", "lr = 1e-3", "");
    let collator = Collator::from_model_dir(model_dir(), 8, CollateConfig::from(&c.data)).unwrap();
    let mut loader = DataLoader::with_collator(c.data.clone(), collator).unwrap();
    let encoded: Vec<_> = (0..4).map(|_| loader.next_example().unwrap().1).collect();
    let lens: Vec<usize> = encoded.iter().map(|e| e.len()).collect();
    let rows = |r: std::ops::Range<usize>| encoded[r].iter().map(|e| vec![e.clone()]).collect::<Vec<_>>();
    let collator = loader.collator();
    let micro = [
        collator.collate(rows(0..2)).unwrap(),
        collator.collate(rows(2..4)).unwrap(),
    ];
    let union = [collator.collate(rows(0..4)).unwrap()];
    (micro, union, lens)
}

#[test]
fn accumulation_equals_one_batch_of_the_union() {
    let (micro, union, lens) = micro_and_union("accumulate");

    let device = Default::default();
    let model = Kosmos2::<AB>::from_pretrained(model_dir(), &device).unwrap();
    let a = accumulate_gradients(&model, &micro, &device, 1).unwrap();
    let b = accumulate_gradients(&model, &union, &device, 1).unwrap();
    let ((ga, na), (gb, nb)) = (grads(&model, &a.grads), grads(&model, &b.grads));
    let diff = max_diff(&ga, &gb);
    let scale = gb.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
    eprintln!(
        "lengths {lens:?}, scored tokens {} = {}: loss {:.7} vs {:.7} (|diff| {:.2e}); max |grad diff| {diff:.2e} (max |grad| {scale:.2e})",
        a.scored_tokens,
        b.scored_tokens,
        a.loss,
        b.loss,
        (a.loss - b.loss).abs()
    );
    assert_eq!(a.scored_tokens, b.scored_tokens);
    assert_eq!(na, nb);
    assert!((a.loss - b.loss).abs() <= 1e-5);
    assert!(diff <= 1e-5, "gradients differ by {diff}");

    // The same two micro-batches on two threads (replicas with their own autodiff graphs):
    // the same loss and gradients, and the same again on a second call (reproducible).
    let p = accumulate_gradients_parallel(&model, &micro, &device, 1, 2).unwrap();
    let q = accumulate_gradients_parallel(&model, &micro, &device, 1, 2).unwrap();
    let (gp, np) = grads(&model, &p.grads);
    let (gq, _) = grads(&model, &q.grads);
    let diff = max_diff(&gp, &ga);
    eprintln!(
        "two threads: loss {:.7}, max |grad diff| to sequential {diff:.2e}",
        p.loss
    );
    assert_eq!(
        np, na,
        "every parameter with a gradient sequentially has one in parallel"
    );
    assert_eq!(p.scored_tokens, a.scored_tokens);
    assert!((p.loss - a.loss).abs() <= 1e-6);
    assert!(diff <= 1e-6, "parallel gradients differ by {diff}");
    assert_eq!(max_diff(&gp, &gq), 0.0, "two parallel calls differ");

    // A weighted loss (`[loss]`): the targets with the upper half of the ids present weigh 3.
    // Micro-batches share by weight, so the equality with the union holds again, and the
    // weighting changes the loss.
    let present: Vec<i64> = union[0]
        .labels
        .iter()
        .flat_map(|row| row.iter().skip(1))
        .copied()
        .filter(|&l| l != IGNORE_INDEX)
        .collect();
    let (lo, hi) = (*present.iter().min().unwrap(), *present.iter().max().unwrap());
    let weights = LossWeights {
        location: Some(((lo + hi) / 2..hi + 1, 3.0)),
    };
    let heavy = present.iter().filter(|&&l| l >= (lo + hi) / 2).count();
    assert!(
        heavy > 0 && heavy < present.len(),
        "{heavy} of {} targets weighted",
        present.len()
    );
    let expected_total = (present.len() - heavy) as f64 + 3.0 * heavy as f64;
    assert_eq!(weights.total(&union[0]), expected_total);
    let wa = accumulate_weighted_gradients(&model, &micro, &weights, &device, 1, 2).unwrap();
    let wb = accumulate_weighted_gradients(&model, &union, &weights, &device, 1, 1).unwrap();
    let (gwa, _) = grads(&model, &wa.grads);
    let (gwb, _) = grads(&model, &wb.grads);
    let diff = max_diff(&gwa, &gwb);
    eprintln!(
        "weighted: loss {:.7} vs {:.7} (plain {:.7}), max |grad diff| {diff:.2e}",
        wa.loss, wb.loss, b.loss
    );
    assert!((wa.loss - wb.loss).abs() <= 1e-5);
    assert!(diff <= 1e-5, "weighted gradients differ by {diff}");
    assert!((wb.loss - b.loss).abs() > 1e-4, "the weights changed nothing");
    assert_eq!(wb.scored_tokens, b.scored_tokens);
    // Uniform weights are the plain loss, exactly.
    let u = accumulate_weighted_gradients(&model, &micro, &LossWeights::uniform(), &device, 1, 1).unwrap();
    assert_eq!(u.loss, a.loss);
    assert_eq!(max_diff(&grads(&model, &u.grads).0, &ga), 0.0);
}

/// A replica for another thread has the same parameter ids and values as the model.
#[test]
fn fork_keeps_parameter_ids_and_values() {
    let device = Default::default();
    let model = Kosmos2::<AB>::from_pretrained(model_dir(), &device).unwrap();
    let replica = fork(&model);
    let (a, b) = (values::<AB, _>(&model), values::<AB, _>(&replica));
    assert_eq!(a.len(), b.len());
    assert_eq!(a, b);
    let ids = |m: &Kosmos2<AB>| {
        let mut v = Ids(Vec::new());
        m.visit(&mut v);
        v.0
    };
    assert_eq!(ids(&model), ids(&replica));
}

struct Ids(Vec<burn::module::ParamId>);
impl<B: burn::prelude::Backend> burn::module::ModuleVisitor<B> for Ids {
    fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<burn::prelude::Tensor<B, D>>) {
        self.0.push(param.id);
    }
}

#[test]
fn frozen_vision_tower_gets_no_gradient_and_does_not_move() {
    let device = Default::default();
    let c = config("freeze-grads", 1, "", "lr = 1e-3", "");
    let collator = Collator::from_model_dir(model_dir(), 8, CollateConfig::from(&c.data)).unwrap();
    let mut loader = DataLoader::with_collator(c.data.clone(), collator).unwrap();
    let batch = [loader.next_batch(2).unwrap()];
    let mut model = Kosmos2::<AB>::from_pretrained(model_dir(), &device).unwrap();
    model.vision_model.model = freeze_vision(model.vision_model.model, VisionFreeze::All);
    let acc = accumulate_gradients(&model, &batch, &device, 1).unwrap();
    let (all, with_grad) = grads(&model, &acc.grads);
    let n_vision = values::<AB, _>(&model.vision_model).len();
    let mut g = Grads(&acc.grads, Vec::new(), 0);
    model.vision_model.visit(&mut g);
    assert_eq!(g.2, 0, "a frozen vision parameter has a gradient");
    assert_eq!(with_grad, all.len() - n_vision, "every other parameter has one");

    for (policy, name) in [(VisionFreeze::All, "all"), (VisionFreeze::AllButLast, "all_but_last")] {
        let mut c = config(&format!("freeze-{name}"), 2, "", "lr = 1e-3", "");
        c.model.freeze_vision = policy;
        let mut trainer = Trainer::<AB>::new(c, device).unwrap();
        let before = trainer.model().clone();
        trainer.run().unwrap();
        let after = trainer.model();
        let (vb, va) = (&before.vision_model.model, &after.vision_model.model);
        assert_eq!(
            max_diff(&values::<AB, _>(&vb.embeddings), &values::<AB, _>(&va.embeddings)),
            0.0
        );
        assert_eq!(
            max_diff(
                &values::<AB, _>(&vb.encoder.layers[0]),
                &values::<AB, _>(&va.encoder.layers[0])
            ),
            0.0
        );
        let last_moved = max_diff(
            &values::<AB, _>(&vb.encoder.layers[1]),
            &values::<AB, _>(&va.encoder.layers[1]),
        );
        let norm_moved = max_diff(
            &values::<AB, _>(&vb.post_layernorm),
            &values::<AB, _>(&va.post_layernorm),
        );
        match policy {
            VisionFreeze::All => assert_eq!((last_moved, norm_moved), (0.0, 0.0)),
            _ => assert!(last_moved > 0.0 && norm_moved > 0.0, "the last layer trains"),
        }
        let text_moved = max_diff(
            &values::<AB, _>(&before.text_model),
            &values::<AB, _>(&after.text_model),
        );
        assert!(text_moved > 0.0, "the text model trains");
    }
}

fn metrics(path: &Path) -> Vec<StepMetrics> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Six steps straight equal three steps, a stop, and three resumed steps: the same losses and
/// the same final parameters; checkpoints are kept as configured.
#[test]
fn resume_continues_the_same_run() {
    let make = |name: &str| {
        config(
            name,
            6,
            "grad_accumulation = 2\nbatch_size = 1",
            "lr = 2e-3\nwarmup_steps = 2\ndecay = \"cosine\"\nmin_lr = 1e-4",
            "[checkpoint]\nevery = 3\nkeep_last = 1",
        )
    };
    let device = Default::default();
    let mut straight = Trainer::<AB>::new(make("straight"), device).unwrap();
    let all = straight.run().unwrap();
    assert_eq!(all.steps.len(), 6);

    let c = make("resumed");
    let run_dir = c.output_dir.clone();
    let mut first = Trainer::<AB>::new(c.clone(), device).unwrap();
    let head = first.run_until(3).unwrap();
    drop(first);
    let ckpts = checkpoint::list(&run_dir.join("checkpoints")).unwrap();
    assert_eq!(ckpts.iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![3]);
    // a fresh run in a directory with checkpoints is refused
    assert!(matches!(
        Trainer::<AB>::new(c.clone(), device),
        Err(TrainError::Checkpoint { .. })
    ));
    let mut resumed = Trainer::<AB>::resume(&run_dir, Some(&c), device).unwrap();
    assert_eq!(resumed.step(), 3);
    let tail = resumed.run().unwrap();

    let joined: Vec<&StepMetrics> = head.steps.iter().chain(&tail.steps).collect();
    let mut worst = 0f64;
    for (a, b) in all.steps.iter().zip(&joined) {
        assert_eq!(a.step, b.step);
        assert_eq!(a.lr, b.lr);
        assert_eq!((a.tokens, a.scored_tokens), (b.tokens, b.scored_tokens));
        worst = worst.max((a.loss - b.loss).abs());
    }
    let params = max_diff(&values::<AB, _>(straight.model()), &values::<AB, _>(resumed.model()));
    eprintln!(
        "losses {:?}; max |straight - resumed| loss {worst:.3e}, parameters {params:.3e}",
        all.steps.iter().map(|m| m.loss).collect::<Vec<_>>()
    );
    assert!(worst <= 1e-6, "losses differ by {worst}");
    assert_eq!(params, 0.0, "final parameters differ");

    // keep_last = 1: only the final checkpoint remains; the metrics file has each step once
    let ckpts = checkpoint::list(&run_dir.join("checkpoints")).unwrap();
    assert_eq!(ckpts.iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![6]);
    assert_eq!(checkpoint::resolve(&run_dir).unwrap(), ckpts[0].1);
    let logged = metrics(resumed.metrics_path().unwrap());
    assert_eq!(
        logged.iter().map(|m| m.step).collect::<Vec<_>>(),
        (1..=6).collect::<Vec<_>>()
    );
    assert_eq!(logged[4].loss, tail.steps[1].loss);

    // a different configuration is refused
    let mut other = c.clone();
    other.optim.lr = 1e-3;
    assert!(matches!(
        Trainer::<AB>::resume(&run_dir, Some(&other), device),
        Err(TrainError::ConfigMismatch { .. })
    ));
}

/// A huge learning rate makes the second step's loss NaN/infinite: the run stops naming the
/// step, no checkpoint is written for it, the previous one stays loadable.
#[test]
fn non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint() {
    let c = config(
        "nan",
        4,
        "",
        "lr = 1e30\ndecay = \"constant\"\nweight_decay = 0.0\nmax_grad_norm = 0.0",
        "[checkpoint]\nevery = 1\nkeep_last = 5",
    );
    let run_dir = c.output_dir.clone();
    let device = Default::default();
    let mut trainer = Trainer::<AB>::new(c, device).unwrap();
    let err = trainer.run().unwrap_err();
    eprintln!("{err}");
    let TrainError::NonFinite {
        step, last_checkpoint, ..
    } = &err
    else {
        panic!("expected NonFinite, got {err}");
    };
    assert!(*step >= 2, "step 1 starts from the fixture's weights");
    assert!(err.to_string().contains(&format!("step {step}:")));
    let ckpts = checkpoint::list(&run_dir.join("checkpoints")).unwrap();
    assert_eq!(ckpts.last().unwrap().0, step - 1, "no checkpoint of the failed step");
    assert_eq!(last_checkpoint.as_deref(), Some(ckpts.last().unwrap().1.as_path()));
    let resumed = Trainer::<AB>::resume(&run_dir, None, device).unwrap();
    assert_eq!(resumed.step(), step - 1);
}

#[test]
fn configuration_errors_name_the_file_and_key() {
    let path = Path::new("run.toml");
    let err = TrainConfig::from_toml_str("steps = 1\nbatch_size = 1\nbogus = 2\n", path).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("run.toml") && msg.contains("bogus"), "{msg}");

    let mut c = config("errors", 1, "", "lr = 1e-3", "");
    c.optim.lr = -1.0;
    let msg = c.validate().unwrap_err().to_string();
    assert!(msg.contains("optim.lr"), "{msg}");
    for bad in [0.0, -1.0, f64::NAN] {
        let mut c = config("errors", 1, "", "lr = 1e-3", "");
        c.loss.location_weight = bad;
        let msg = c.validate().unwrap_err().to_string();
        assert!(msg.contains("loss.location_weight"), "{bad}: {msg}");
    }

    // `[nodes]`: each rule names its key; `--node-rank` and `--node-address` need the section.
    let nodes = |count, rank, address: &str| kosmos_train::config::NodesConfig {
        count,
        rank,
        orchestrator: "ws://10.0.0.1:3870".into(),
        serve_orchestrator: false,
        address: address.into(),
    };
    for (n, accumulation, key) in [
        (nodes(1, 0, "ws://10.0.0.2:3871"), 2, "nodes.count"),
        (nodes(2, 2, "ws://10.0.0.2:3871"), 2, "nodes.rank"),
        (nodes(2, 1, "10.0.0.2:3871"), 2, "nodes.address"),
        (nodes(2, 1, "ws://10.0.0.2"), 2, "nodes.address"),
        (nodes(2, 1, "ws://10.0.0.2:3871"), 3, "grad_accumulation"),
    ] {
        let mut c = config("errors", 1, "", "lr = 1e-3", "");
        c.grad_accumulation = accumulation;
        c.nodes = Some(n);
        let msg = c.validate().unwrap_err().to_string();
        assert!(msg.contains(key), "{key}: {msg}");
    }
    let mut c = config("errors", 1, "", "lr = 1e-3", "");
    let rank = kosmos_train::trainer::NodeOverrides {
        rank: Some(1),
        address: None,
    };
    let msg = rank.apply(&mut c).unwrap_err().to_string();
    assert!(msg.contains("[nodes]"), "{msg}");

    let missing = temp_dir("errors-missing").join("nothing");
    let msg = checkpoint::resolve(&missing).unwrap_err().to_string();
    assert!(msg.contains("nothing"), "{msg}");
}

/// `init = "scratch"`: the fixture's architecture with fresh (MAGNETO) weights, which train.
#[test]
fn scratch_initialisation_trains() {
    let device = Default::default();
    let mut c = config("scratch", 2, "", "lr = 1e-3", "");
    c.model.init = ModelInit::Scratch;
    // With location targets weighing more (the trainer finds the location tokens' ids).
    c.loss.location_weight = 4.0;
    let mut trainer = Trainer::<AB>::new(c, device).unwrap();
    let pretrained = Kosmos2::<AB>::from_pretrained(model_dir(), &device).unwrap();
    let (ours, theirs) = (values::<AB, _>(trainer.model()), values::<AB, _>(&pretrained));
    assert_eq!(ours.len(), theirs.len());
    assert!(
        ours.iter().zip(&theirs).all(|(a, b)| a.len() == b.len() && a != b),
        "every tensor is fresh"
    );
    let summary = trainer.run().unwrap();
    assert!(summary.steps.iter().all(|m| m.loss.is_finite() && m.grad_norm > 0.0));
}

/// A trainer of one step from scratch with sinusoidal vision positions and the given projection
/// start (and location rows when `locations`).
fn scratch_trainer(name: &str, locations: bool, projection: kosmos_train::config::ProjectionInit) -> Trainer<AB> {
    use kosmos_train::config::LocationInit;
    let mut c = config(name, 1, "", "lr = 1e-3", "");
    c.model.init = ModelInit::Scratch;
    if locations {
        c.model.location_init = LocationInit::Sincos2d;
    }
    c.model.vision_position_init = LocationInit::Sincos2d;
    c.model.projection_init = projection;
    Trainer::<AB>::new(c, Default::default()).unwrap()
}

/// Every parameter tensor of `after` differs from `before`'s.
fn assert_every_parameter_moved(before: &Kosmos2<AB>, after: &Kosmos2<AB>) {
    let (a, b) = (values::<AB, _>(before), values::<AB, _>(after));
    let frozen: Vec<usize> = a
        .iter()
        .zip(&b)
        .enumerate()
        .filter(|(_, (x, y))| x == y)
        .map(|(i, _)| i)
        .collect();
    assert!(frozen.is_empty(), "parameters {frozen:?} of {} did not move", a.len());
}

/// The scratch starts that rewrite parameters (`location_init`, `vision_position_init`,
/// `projection_init`) write what they say and leave every parameter trainable: after one step,
/// every tensor has moved. (A rewritten parameter that is not a fresh autodiff leaf gets no
/// gradient and would stay at its start for the whole run.)
#[test]
fn scratch_starts_write_their_values_and_every_parameter_trains() {
    use kosmos_train::config::ProjectionInit;
    use kosmos_train::location_init::{VISION_POSITION_STD, sincos_2d_rows};
    let mut trainer = scratch_trainer("scratch-starts", true, ProjectionInit::Balanced);
    let before = trainer.model().clone();

    // Location tokens 411.. of the fixture tokenizer hold the 32 x 32 Fourier rows.
    let emb = before.text_model.model.embed_tokens.weight.val();
    let [_, d] = emb.dims();
    let rows = emb.slice([411..411 + 1024, 0..d]).into_data().to_vec::<f32>().unwrap();
    let expected = sincos_2d_rows(32, d, (d as f32).powf(-0.5));
    assert_eq!(rows, expected);
    // Vision positions: zero for the class position, then the patch grid's rows.
    let pos = before.vision_model.model.embeddings.position_embedding.weight.val();
    let [n, h] = pos.dims();
    let grid = ((n - 1) as f64).sqrt() as usize;
    let pos = pos.into_data().to_vec::<f32>().unwrap();
    assert!(pos[..h].iter().all(|v| *v == 0.0));
    assert_eq!(pos[h..].to_vec(), sincos_2d_rows(grid, h, VISION_POSITION_STD));
    // Balanced projection: latents and dense weight N(0, 1), zero bias.
    let p = &before.image_to_text_projection;
    let latent = p.latent_query.val().into_data().to_vec::<f32>().unwrap();
    let rms = (latent.iter().map(|v| v * v).sum::<f32>() / latent.len() as f32).sqrt();
    assert!((rms - 1.0).abs() < 0.2, "latent rms {rms}");
    let bias = p
        .dense
        .bias
        .as_ref()
        .unwrap()
        .val()
        .into_data()
        .to_vec::<f32>()
        .unwrap();
    assert!(bias.iter().all(|v| *v == 0.0));

    trainer.run().unwrap();
    assert_every_parameter_moved(&before, trainer.model());
}

/// The routed projection start: on a blank picture every latent's attention (averaged over the
/// heads) peaks on the patch under its cell of the latent grid, the own patches' mean share is
/// the one the start reports (between a half and `ROUTE_SHARE`), the latents' own keys are zero,
/// and the whole model still trains from there.
#[test]
fn routed_projection_sends_each_latent_to_its_cell_and_every_parameter_trains() {
    use burn::tensor::activation::softmax;
    use kosmos_train::config::ProjectionInit;
    use kosmos_train::location_init::{ROUTE_SHARE, init_vision_positions, route_projection};
    let device = Default::default();
    let mut trainer = scratch_trainer("routed-start", false, ProjectionInit::Routed);
    let before = trainer.model().clone();

    // The start on its own (the trainer's is the same on another draw of the dense layer).
    // The fixture: 28 px pictures in 14 px patches (a 2 x 2 grid), 8 latents (a 2 x 4 grid),
    // text width 64 in 4 heads.
    let model_config = kosmos_models::Kosmos2Config::from_json_file(model_dir().join("config.json")).unwrap();
    // Several draws of the random start (the backend's generator is shared with the other
    // tests running in parallel, so the draws differ from run to run too).
    for draw in 0..4 {
        <AB as Backend>::seed(&device, 100 + draw);
        let model = init_vision_positions(Kosmos2::<AB>::new(&model_config, &device));
        let (routed, reported) = route_projection(model).unwrap();
        let p = &routed.image_to_text_projection;
        let [n, d] = p.latent_query.dims();
        assert_eq!(n, 8);
        let blank = Tensor::<AB, 4>::zeros([1, 3, 28, 28], &device);
        let hidden = p.dense.forward(routed.vision_model.model.image_features(blank, false));
        let latents = p.latent_query.val().unsqueeze::<3>();
        let kv = Tensor::cat(vec![hidden, latents.clone()], 1);
        let keys = kv.dims()[1];
        assert_eq!(keys, 1 + 4 + n);
        let (heads, hd) = (4, d / 4);
        let by_head = |x: Tensor<AB, 3>, len: usize| x.reshape([1, len, heads, hd]).swap_dims(1, 2);
        let q = by_head(p.x_attn.q_proj.forward(latents), n);
        let k = by_head(p.x_attn.k_proj.forward(kv), keys);
        let latent_keys = k.clone().slice([0..1, 0..heads, 5..keys, 0..hd]);
        assert!(latent_keys.abs().max().into_scalar().elem::<f32>() < 1e-4);
        let att = softmax(q.matmul(k.swap_dims(2, 3)).mul_scalar((hd as f64).powf(-0.5)), 3);
        let att = att.mean_dim(1).into_data().to_vec::<f32>().unwrap();
        let mut shares = Vec::new();
        for i in 0..n {
            let row = &att[i * keys..][..keys];
            let patches = &row[1..5];
            let (r, col) = (i / 4, i % 4);
            let own = r * 2 + col / 2;
            let best = (0..4).max_by(|&a, &b| patches[a].total_cmp(&patches[b])).unwrap();
            assert_eq!(
                best, own,
                "draw {draw}, latent {i}: attention over the patches {patches:?}"
            );
            shares.push(patches[own]);
        }
        // The share the start reports (at most ROUTE_SHARE) is the one measured here.
        let mean = shares.iter().sum::<f32>() / n as f32;
        assert!(
            (mean as f64 - reported).abs() < 1e-3,
            "mean own share {mean}, reported {reported}"
        );
        assert!((0.5..=ROUTE_SHARE + 0.05).contains(&reported), "{reported}");
    }

    trainer.run().unwrap();
    assert_every_parameter_moved(&before, trainer.model());
}
