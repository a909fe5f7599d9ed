//! Book example: the shapes world end to end in code. A scene that no training or evaluation
//! seed produced is generated and drawn, the built-in model (compiled into `kosmos-infer`) names
//! the box of each of its referring expressions, and each answer is scored against the scene's
//! ground truth, as `kosmos eval refexp` does.
use burn::tensor::DType;
use kosmos_infer::builtin;
use kosmos_infer::pipeline::{Kosmos2Pipeline, Request};
use kosmos_models::grounding::iou;
use kosmos_train::shapes::{ShapesConfig, referring_expressions, render, scene};
use kosmos_vision::preprocess::RgbImage;
use rand::SeedableRng;

type B = burn::backend::Flex;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Scene 3 of seed 7 (the recipe trains on seed 1 and evaluates on seed 999).
    let config = ShapesConfig {
        seed: 7,
        ..ShapesConfig::default()
    };
    let s = scene(&config, 3);
    let drawn = render(&s);
    let picture = RgbImage {
        width: drawn.width() as usize,
        height: drawn.height() as usize,
        pixels: drawn.into_raw(),
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let expressions = referring_expressions(&s, &mut rng);

    // The embedded model, written once to the cache directory.
    let device = Default::default();
    let pipeline = Kosmos2Pipeline::<B>::load(builtin::model_dir()?, &device, DType::F32)?;
    let generation = pipeline.generation.clone();

    let mut correct = 0;
    for e in &expressions {
        // KOSMOS-2's referring-expression prompt; the first generated box is the answer.
        let request = Request {
            image: Some(picture.clone()),
            prompt: format!("<grounding><phrase> {}</phrase>", e.text.trim()),
        };
        let answer = &pipeline.run(&[request], &generation, None)?.answers[0];
        let predicted = answer.entities.iter().flat_map(|x| x.boxes.first()).next().copied();
        let truth = s.shapes[e.target].bbox(s.width, s.height);
        let score = predicted.map_or(0.0, |p| iou(p, truth));
        correct += usize::from(score >= 0.5);
        println!("{:<40} IoU {score:.2}  {}", e.text.trim(), answer.text);
    }
    println!("{correct} of {} expressions located at IoU >= 0.5", expressions.len());
    assert!(!expressions.is_empty());
    Ok(())
}
