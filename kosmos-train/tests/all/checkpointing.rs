//! Gradient checkpointing (`gradient_checkpointing = true`: Burn's balanced strategy, which
//! recomputes memory-bound results in the backward pass): the same gradients as without it, for a
//! full model and for a LoRA model (frozen base), and the same run through `kosmos train`'s task.

use burn::backend::Autodiff;
use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use kosmos_core::backend::BalancedCheckpointing;
use kosmos_core::testing::repo_root;
use kosmos_models::{Kosmos2, LoraSpec};
use kosmos_train::TrainTask;
use kosmos_train::data::{Batch, CollateConfig, Collator, DataLoader};
use kosmos_train::trainer::accumulate_gradients;

use crate::TB;
use crate::trainer::config;

type Plain = Autodiff<TB>;
type Checkpointed = Autodiff<TB, BalancedCheckpointing>;

/// Gradients of every parameter that has one, in visiting order.
struct Grads<'a, B: AutodiffBackend>(&'a GradientsParams, Vec<Vec<f32>>, std::marker::PhantomData<B>);
impl<B: AutodiffBackend> ModuleVisitor<B> for Grads<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = self.0.get::<B::InnerBackend, D>(param.id) {
            self.1.push(g.into_data().convert::<f32>().to_vec().unwrap());
        }
    }
}

fn gradients<B: AutodiffBackend>(lora: bool, batches: &[Batch]) -> (f64, Vec<Vec<f32>>) {
    let device = Default::default();
    let model = Kosmos2::<B>::from_pretrained(repo_root().join("fixtures/generate/model"), &device).unwrap();
    let model = if lora {
        B::seed(&device, 3);
        let (m, _) = model.attach_lora(&LoraSpec::new(4), &device).unwrap();
        // B = 0 gives A no gradient: start B away from zero.
        let mut m = m;
        for s in kosmos_models::lora::lora_slots(&mut m) {
            if let Some(a) = s.slot.adapter.as_mut() {
                let shape = a.lora_b.dims();
                a.lora_b = Param::from_tensor(Tensor::random(
                    shape,
                    burn::tensor::Distribution::Normal(0.0, 0.1),
                    &device,
                ));
            }
        }
        m.train_only_lora()
    } else {
        model
    };
    let acc = accumulate_gradients(&model, batches, &device, 1).unwrap();
    let mut v = Grads::<B>(&acc.grads, Vec::new(), std::marker::PhantomData);
    model.visit(&mut v);
    (acc.loss, v.1)
}

fn batches() -> Vec<Batch> {
    let c = config("checkpointing", 1, "", "lr = 1e-3", "");
    let collator = Collator::from_model_dir(
        repo_root().join("fixtures/generate/model"),
        8,
        CollateConfig::from(&c.data),
    )
    .unwrap();
    let mut loader = DataLoader::with_collator(c.data.clone(), collator).unwrap();
    (0..2).map(|_| loader.next_batch(2).unwrap()).collect()
}

#[test]
fn checkpointing_gives_the_same_gradients() {
    let batches = batches();
    for lora in [false, true] {
        let (loss_a, a) = gradients::<Plain>(lora, &batches);
        let (loss_b, b) = gradients::<Checkpointed>(lora, &batches);
        assert_eq!(a.len(), b.len(), "the same parameters have gradients");
        let diff = a
            .iter()
            .zip(&b)
            .flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
            .fold(0f32, f32::max);
        eprintln!(
            "lora {lora}: {} gradient tensors, loss {loss_a:.7} vs {loss_b:.7}, max |grad diff| {diff:.2e}",
            a.len()
        );
        assert_eq!(loss_a, loss_b);
        assert_eq!(diff, 0.0, "checkpointed gradients differ");
    }
}

#[test]
fn a_checkpointed_run_is_the_same_run() {
    let make = |name: &str, on: bool| {
        let mut c = config(name, 3, "", "lr = 2e-3", "");
        c.gradient_checkpointing = on;
        c
    };
    let (plain, checkpointed) = (make("ckpt-off", false), make("ckpt-on", true));
    assert_eq!(
        plain.run_hash(),
        checkpointed.run_hash(),
        "not part of the run's identity"
    );
    let run = |c: kosmos_train::TrainConfig| {
        let task = TrainTask {
            config: Some(c),
            resume: None,
            stop_after: None,
            node: Default::default(),
        };
        assert_eq!(
            task.gradient_checkpointing().unwrap(),
            task.config.as_ref().unwrap().gradient_checkpointing
        );
        task.run_on("flex").unwrap()
    };
    let (a, b) = (run(plain), run(checkpointed.clone()));
    let losses = |s: &kosmos_train::trainer::RunSummary| s.steps.iter().map(|m| m.loss).collect::<Vec<_>>();
    assert_eq!(losses(&a), losses(&b));
    // A resume without a configuration takes the checkpoint's setting.
    let task = TrainTask {
        config: None,
        resume: Some(checkpointed.output_dir.clone()),
        stop_after: None,
        node: Default::default(),
    };
    assert!(task.gradient_checkpointing().unwrap());
}
