//! Book example: a training run from the chapter's TOML file, stopped after three steps and
//! resumed from its checkpoint; the resumed run is the same run.
use burn::backend::{Autodiff, Flex};
use kosmos_train::{TrainConfig, TrainTask, Trainer, run_autodiff_task};

type B = Autodiff<Flex>;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = TrainConfig::from_toml_file("book/examples/train.toml")?;
    config.output_dir = std::env::temp_dir().join(format!("kosmos-book-train-{}", std::process::id()));
    config.log.progress = false;

    // Steps 1-3, then the trainer is dropped (as if the process were killed after the
    // checkpoint of step 3).
    let mut trainer = Trainer::<B>::new(config.clone(), Default::default())?;
    let first = trainer.run_until(3)?;
    drop(trainer);

    // `kosmos train --resume DIR` does this: the newest checkpoint of the run directory, on the
    // backend named at run time.
    let task = TrainTask {
        config: None,
        resume: Some(config.output_dir.clone()),
        stop_after: None,
        node: Default::default(),
    };
    let rest = run_autodiff_task("flex", task)??;
    for m in first.steps.iter().chain(&rest.steps) {
        println!(
            "step {}: loss {:.4}, lr {:.2e}, grad norm {:.3}{}",
            m.step,
            m.loss,
            m.lr,
            m.grad_norm,
            m.val_loss
                .map(|v| format!(", validation loss {v:.4}"))
                .unwrap_or_default()
        );
    }
    println!("last checkpoint: {}", rest.last_checkpoint.unwrap().display());
    std::fs::remove_dir_all(&config.output_dir)?;
    Ok(())
}
