//! Book example: a LoRA fine-tune from the chapter's TOML file; its export is a merged model
//! (`final/`) and a PEFT adapter (`final/adapter/`) that loads onto the base model.
use burn::backend::{Autodiff, Flex};
use burn::module::AutodiffModule;
use burn::prelude::*;
use kosmos_models::Kosmos2;
use kosmos_train::trainer::param_counts;
use kosmos_train::{TrainConfig, Trainer};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = TrainConfig::from_toml_file("book/examples/lora.toml")?;
    config.output_dir = std::env::temp_dir().join(format!("kosmos-book-lora-{}", std::process::id()));

    let mut trainer = Trainer::<Autodiff<Flex>>::new(config.clone(), Default::default())?;
    let (all, trainable) = param_counts(trainer.model());
    println!("{trainable} of {all} parameters train");
    for m in trainer.run()?.steps {
        println!("step {}: loss {:.4}", m.step, m.loss);
    }

    // The base model with the exported PEFT adapter computes what the trained model computes.
    let device = Default::default();
    let base = Kosmos2::<Flex>::from_pretrained(&config.model.dir, &device)?;
    let adapted = base.load_peft_adapter(config.output_dir.join("final/adapter"), &device)?;
    let ids = Tensor::<Flex, 2, Int>::from_ints([[0, 7, 11, 4, 2]], &device);
    let trained = trainer.model().valid();
    let a = trained.logits(trained.text_hidden(&ids, None, None, None)?);
    let b = adapted.logits(adapted.text_hidden(&ids, None, None, None)?);
    assert_eq!(a.into_data(), b.into_data());

    // `final/` is a plain model: the adapters merged into the weights.
    let merged = Kosmos2::<Flex>::from_pretrained(config.output_dir.join("final"), &device)?;
    println!("merged model has adapters: {}", merged.has_lora());
    std::fs::remove_dir_all(&config.output_dir)?;
    Ok(())
}
