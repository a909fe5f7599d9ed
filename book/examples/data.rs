//! Book example: the training data layer. A TOML data configuration with a GRIT source and a
//! text source, a loader over them, and one collated batch with its label mask.
use kosmos_models::processor::Kosmos2Processor;
use kosmos_train::data::{DataConfig, DataLoader};
use kosmos_vision::{ImageProcessor, ImageProcessorConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A text source written on the fly next to the GRIT fixture records.
    let dir = std::env::temp_dir().join(format!("kosmos-book-data-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("text.jsonl"),
        "{\"text\": \"A man in a blue shirt is holding a dog.\"}\n{\"text\": \"Two people are riding.\"}\n",
    )?;
    let config: DataConfig = toml::from_str(&format!(
        r#"
        seed = 7
        max_len = 64

        [[sources]]
        name = "grit"
        kind = "grit"
        paths = ["fixtures/train_data/grit.jsonl"]
        image_root = "fixtures/train_data"
        weight = 3.0
        grit = {{ score_threshold = 0.65 }}

        [[sources]]
        name = "text"
        kind = "text"
        paths = ["{}"]
        weight = 1.0
        "#,
        dir.join("text.jsonl").display()
    ))?;

    let tokenizer_dir = "fixtures/kosmos2/tokenizer";
    let processor = Kosmos2Processor::from_dir(tokenizer_dir, 8)?;
    let images = ImageProcessor::new(ImageProcessorConfig::from_json_file(format!(
        "{tokenizer_dir}/preprocessor_config.json"
    ))?)?;
    let mut loader = DataLoader::new(config, processor, images)?;

    let batch = loader.next_batch(4)?;
    for (row, ids) in batch.input_ids.iter().enumerate() {
        let scored = batch.labels[row].iter().filter(|&&l| l != -100).count();
        println!(
            "row {row}: {} tokens, {} scored, {} image(s), from {}",
            ids.len(),
            scored,
            batch.images_per_row[row],
            batch.locations[row][0]
        );
    }
    // The sampler position goes into checkpoints; restoring it continues the same stream.
    let state = serde_json::to_string(&loader.state())?;
    println!("data state: {} bytes of JSON", state.len());
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
