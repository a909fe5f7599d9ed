//! Book example: load a KOSMOS-2 model directory (HF layout), process an image and a grounded
//! prompt, run the model, and parse grounded text. Runs on the tiny fixture model by default;
//! pass the official checkpoint's directory (and its tokenizer directory) to run the real one.
use burn::prelude::*;
use kosmos_models::grounding::post_process_generation;
use kosmos_models::processor::{EncodeOptions, Kosmos2Processor, Prompt};
use kosmos_models::{Kosmos2, Kosmos2Input};
use kosmos_vision::{ImageProcessor, ImageProcessorConfig};

type B = burn::backend::Flex;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let model_dir = args.next().unwrap_or_else(|| "fixtures/kosmos2/tiny".into());
    let tokenizer_dir = args.next().unwrap_or_else(|| "fixtures/kosmos2/tokenizer".into());
    let image = args
        .next()
        .unwrap_or_else(|| "fixtures/preprocess/images/rgb_300x200.png".into());
    let device = Default::default();

    // Model, text processor (latent_query_num image slots) and image preprocessing.
    let model = Kosmos2::<B>::from_pretrained(&model_dir, &device)?;
    let latents = model.image_to_text_projection.latent_query.dims()[0];
    let processor = Kosmos2Processor::from_dir(&tokenizer_dir, latents)?;
    let images = ImageProcessor::new(ImageProcessorConfig::from_json_file(format!(
        "{tokenizer_dir}/preprocessor_config.json"
    ))?)?;

    // "<s><image> ... </image><grounding> An image of" with its masks.
    let enc = processor.encode(
        &[Prompt::with_image("<grounding> An image of")],
        &EncodeOptions::default(),
    )?;
    let ids: Vec<i64> = enc.input_ids[0].iter().map(|&v| v as i64).collect();
    let mask: Vec<i64> = enc.image_embeds_position_mask[0].iter().map(|&v| v as i64).collect();
    let len = ids.len();
    let input = Kosmos2Input {
        input_ids: Tensor::from_data(TensorData::new(ids, [1, len]), &device),
        attention_mask: None,
        pixel_values: Some(images.load_batch::<B>(&[image], &device)?),
        image_embeds_position_mask: Some(Tensor::from_data(TensorData::new(mask, [1, len]), &device)),
    };
    let out = model.forward(&input)?;
    let next: i64 = out.logits.slice([0..1, len - 1..len]).argmax(2).into_scalar().elem();
    println!(
        "prompt of {len} tokens; most likely next token: {next} ({:?})",
        processor.decode(&[next as u32])?
    );

    // Grounded text -> clean caption and boxes.
    let (caption, entities) = post_process_generation(
        "<grounding> An image of<phrase> a snowman</phrase><object><patch_index_0044><patch_index_0863></object>.",
    );
    println!("{caption}");
    for e in entities {
        println!("  {:?} at {:?}: {:?}", e.phrase, e.span, e.boxes);
    }
    Ok(())
}
