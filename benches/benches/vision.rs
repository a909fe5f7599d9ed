//! CLIP ViT-L/14 forward at 224 px (random weights) on the default CPU backend, and the KOSMOS-2
//! projection. Run with `cargo bench -p kosmos-benches --bench vision`.

use burn::prelude::*;
use burn::tensor::Distribution;
use criterion::{Criterion, criterion_group, criterion_main};
use kosmos_vision::{ClipVisionConfig, ImageToTextProjectionConfig};

fn bench_backend<B: Backend>(c: &mut Criterion, backend: &str) {
    let device = B::Device::default();
    let mut group = c.benchmark_group(format!("vision/{backend}"));
    group.sample_size(10);
    let config = ClipVisionConfig::vit_l14_224();
    let model = config.init::<B>(&device);
    let pixels = Tensor::<B, 4>::random([1, 3, 224, 224], Distribution::Normal(0.0, 1.0), &device);
    group.bench_function("clip-vit-l14-224/image-features", |b| {
        b.iter(|| {
            let out = model.image_features(pixels.clone(), false);
            B::sync(&device).unwrap();
            out
        })
    });
    let projection = ImageToTextProjectionConfig::kosmos2().init::<B>(&device);
    let features = Tensor::<B, 3>::random([1, 257, 1024], Distribution::Normal(0.0, 1.0), &device);
    group.bench_function("kosmos2-projection", |b| {
        b.iter(|| {
            let out = projection.forward(features.clone());
            B::sync(&device).unwrap();
            out
        })
    });
    group.finish();
}

fn benches(c: &mut Criterion) {
    #[cfg(feature = "flex")]
    bench_backend::<burn::backend::Flex>(c, "flex");
    #[cfg(feature = "cuda")]
    bench_backend::<burn::backend::Cuda>(c, "cuda");
}

criterion_group!(vision, benches);
criterion_main!(vision);
