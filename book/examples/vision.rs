//! Book example: a tiny CLIP tower, KOSMOS-2 projection and KOSMOS-1 perceiver on random pixels.
use burn::prelude::*;
use burn::tensor::Distribution;
use kosmos_vision::{ClipVisionConfig, ImageToTextProjectionConfig, PerceiverResamplerConfig};

type B = burn::backend::Flex;

fn main() {
    let device = Default::default();
    // hidden 32, MLP 64, 2 layers, 4 heads, 56 px images in 14 px patches (16 patches + CLS).
    let clip = ClipVisionConfig::new(32, 64, 2, 4, 56, 14).init::<B>(&device);
    let pixels = Tensor::<B, 4>::random([2, 3, 56, 56], Distribution::Normal(0.0, 1.0), &device);
    let features = clip.image_features(pixels, false);
    assert_eq!(features.dims(), [2, 17, 32]);

    // KOSMOS-2: 8 latent queries into a 64-wide text model.
    let projection = ImageToTextProjectionConfig::new(32, 64, 4)
        .with_latent_query_num(8)
        .init::<B>(&device);
    assert_eq!(projection.forward(features.clone()).dims(), [2, 8, 64]);

    // KOSMOS-1: a 2-block perceiver resampler with 8 latents.
    let perceiver = PerceiverResamplerConfig::new(32)
        .with_depth(2)
        .with_num_latents(8)
        .init::<B>(&device);
    assert_eq!(perceiver.forward(features).dims(), [2, 8, 32]);
    println!("vision example ok");
}
