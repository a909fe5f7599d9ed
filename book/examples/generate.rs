//! Book example: grounded generation through the pipeline API, the same path as `kosmos ground`.
//! Runs on the tiny fixture model (random weights: the words are noise, the mechanics are real);
//! pass a model directory and an image to run another model.
use burn::tensor::DType;
use kosmos_core::packed::WeightMode;
use kosmos_infer::generate::{GenerationConfig, TokenEvent};
use kosmos_infer::pipeline::{Kosmos2Pipeline, Request};
use kosmos_vision::preprocess::load_rgb;

type B = burn::backend::Flex;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let model_dir = args.next().unwrap_or_else(|| "fixtures/generate/model".into());
    let image = args.next().unwrap_or_else(|| "fixtures/generate/images/a.png".into());
    let device = Default::default();

    // Weights, tokenizer, image preprocessing and generation_config.json defaults.
    let mut pipeline = Kosmos2Pipeline::<B>::load(&model_dir, &device, DType::F32)?;

    // Greedy search, 3-gram blocking as in the KOSMOS-2 demo, at most 16 new tokens.
    let config = GenerationConfig {
        max_new_tokens: Some(16),
        no_repeat_ngram_size: 3,
        ..pipeline.generation.clone()
    };
    let requests = [Request {
        image: Some(load_rgb(&image, 1 << 26)?),
        prompt: "<grounding>An image of".into(),
    }];
    // Tokens stream in as they are chosen.
    let mut streamed = Vec::new();
    let mut on_token = |e: TokenEvent| streamed.push(e.token);
    let result = pipeline.run(&requests, &config, Some(&mut on_token))?;

    let answer = &result.answers[0];
    assert_eq!(streamed, answer.token_ids);
    println!("text:       {}", answer.text);
    println!("clean text: {}", answer.clean_text);
    for e in &answer.entities {
        println!("entity:     {} {:?} {:?}", e.phrase, e.span, e.boxes);
    }
    println!(
        "{} new tokens, prefill {:.1} ms, {:.1} tokens/s",
        answer.token_ids.len(),
        result.timings.prefill.as_secs_f64() * 1e3,
        result.timings.steps_per_second()
    );

    // Decode steps on Q8 weights (`kosmos ... --weights q8`): an int8 copy (blocks of 32, one
    // scale each) of the decoder's projections and the head serves the one-row products of each
    // new token; the prompt and the image keep the f32 weights.
    pipeline.model.pack_weights(WeightMode::Q8);
    let q8 = pipeline.run(&requests, &config, None)?;
    let same = q8.answers[0]
        .token_ids
        .iter()
        .zip(&answer.token_ids)
        .filter(|(a, b)| a == b)
        .count();
    println!(
        "q8 text:    {} ({same}/{} tokens as f32)",
        q8.answers[0].text,
        answer.token_ids.len()
    );
    Ok(())
}
