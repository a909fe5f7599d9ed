//! The whole KOSMOS-2 on each compiled backend, random weights, batch 1: vision (tower and
//! projection: the image embeddings), prefill (the 97-token prompt of 64 image slots and 33 text
//! tokens through the text decoder into an empty KV cache, and the last position's logits on the
//! host: time to first token without the vision part), one decode step with the KV cache (a token
//! in, its logits on the host), and one training step (forward, backward and AdamW on two rows of
//! the prompt with its text scored).
//!
//! Configurations: `tiny` (the generation fixture's sizes: text 64 wide, 2 layers; vision 24 wide,
//! 28-pixel images; 8 latent queries), `medium` (issue 8's: text 512 wide, 6 layers, 8 heads, FFN
//! 2,048, vocabulary 65,037; vision 256 wide, 4 layers, 224 pixels; 64 latent queries) and, with
//! `KOSMOS_BENCH_FULL=1`, the released KOSMOS-2 size for inference (1.66 G parameters, 6.7 GB in
//! f32; its training step needs more than 24 GB with AdamW and is left to GPUs). Run with
//! `cargo bench -p kosmos-benches --bench model` (a filter such as `-- medium/decode` picks one).
//! The same model against transformers is `scripts/bench/compare.py` (see the book's benchmark
//! chapter).

use std::time::{Duration, Instant};

use burn::optim::Optimizer;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Distribution, TensorData};
use criterion::{Criterion, criterion_group, criterion_main};
use kosmos_models::loss::IGNORE_INDEX;
use kosmos_models::{Kosmos2, Kosmos2Config};
use kosmos_train::data::Batch;
use kosmos_train::optim::AdamWConfig;
use kosmos_train::trainer::accumulate_gradients;

/// Text tokens after the image: `<s>`, `<image>`, the slots, `</image>` and 30 others.
const TEXT_TOKENS: usize = 33;

/// A benchmark configuration: its name, the model sizes, and whether to train it here.
struct Case {
    name: &'static str,
    config: Kosmos2Config,
    train: bool,
}

fn config(json: &str) -> Kosmos2Config {
    Kosmos2Config::from_json_str(json, std::path::Path::new("benches/model.rs")).expect("a valid configuration")
}

fn cases() -> Vec<Case> {
    let mut cases = vec![
        Case {
            name: "tiny",
            // The generation fixture's configuration, read from the fixture itself.
            config: Kosmos2Config::from_json_file(
                std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/generate/model/config.json"),
            )
            .expect("the generation fixture's config.json"),
            train: true,
        },
        Case {
            name: "medium",
            config: config(
                r#"{"latent_query_num": 64,
                "text_config": {"embed_dim": 512, "layers": 6, "attention_heads": 8, "ffn_dim": 2048,
                                "vocab_size": 65037, "max_position_embeddings": 2048},
                "vision_config": {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 8,
                                  "intermediate_size": 1024, "image_size": 224, "patch_size": 14}}"#,
            ),
            train: true,
        },
    ];
    if std::env::var_os("KOSMOS_BENCH_FULL").is_some() {
        cases.push(Case {
            name: "full",
            config: Kosmos2Config::patch14_224(),
            train: false,
        });
    }
    cases
}

/// One prompt row: `<s> <image>`, the latent slots, `</image>`, then text ids; and its image mask.
fn prompt(config: &Kosmos2Config) -> (Vec<u32>, Vec<u32>) {
    let latents = config.latent_query_num;
    let vocab = config.text_config.vocab_size as u32;
    // Any ids below the vocabulary: the slots' embeddings are replaced by the image's.
    let mut ids = vec![0, 4.min(vocab - 1)];
    ids.extend((0..latents as u32).map(|i| 4 + i % (vocab - 4)));
    ids.push(5.min(vocab - 1));
    ids.extend((0..(TEXT_TOKENS - 3) as u32).map(|i| 5 + (i * 7919) % (vocab - 5)));
    let mut mask = vec![0; ids.len()];
    mask[2..2 + latents].iter_mut().for_each(|m| *m = 1);
    (ids, mask)
}

fn ints<B: Backend>(row: &[u32], device: &B::Device) -> Tensor<B, 2, Int> {
    let values: Vec<i64> = row.iter().map(|&v| v as i64).collect();
    Tensor::from_data(TensorData::new(values, [1, row.len()]), device)
}

fn pixels<B: Backend>(config: &Kosmos2Config, rows: usize, device: &B::Device) -> Tensor<B, 4> {
    let size = config.vision_config.image_size;
    Tensor::random([rows, 3, size, size], Distribution::Normal(0.0, 1.0), device)
}

/// Vision, prefill and decode steps of `case` on backend `B`.
fn inference<B: Backend>(c: &mut Criterion, backend: &str, case: &Case) {
    let device = B::Device::default();
    let model = Kosmos2::<B>::new(&case.config, &device);
    // As `Kosmos2::from_pretrained` leaves loaded weights: on 2 MiB pages where the CPU holds them.
    kosmos_core::memory::use_huge_pages(&model);
    let (ids, mask) = prompt(&case.config);
    let (input_ids, image_mask) = (ints::<B>(&ids, &device), ints::<B>(&mask, &device));
    let image = pixels::<B>(&case.config, 1, &device);
    let embeds = model.image_embeds(image.clone());
    let mut group = c.benchmark_group(format!("kosmos2/{backend}/{}", case.name));
    group.sample_size(10);
    if case.name == "full" {
        group.measurement_time(Duration::from_secs(30));
    }
    group.bench_function("vision", |b| {
        b.iter(|| {
            pool(|| {
                let out = model.image_embeds(image.clone());
                B::sync(&device).unwrap();
                out
            })
        })
    });
    // A fresh cache per prompt; the logits of its last position brought to the host.
    let prefill = || {
        let mut cache = model.new_cache();
        let hidden = model
            .text_hidden(&input_ids, None, Some((&embeds, &image_mask)), Some(&mut cache))
            .expect("the prompt fits the model");
        let logits = model.last_logits(hidden).into_data();
        (cache, logits)
    };
    group.bench_function(format!("prefill-{}", ids.len()), |b| b.iter(|| pool(prefill)));
    // `iters` decode steps after one untimed prefill, each feeding one token and bringing its
    // logits to the host (as generation does), timed together.
    group.bench_function("decode-token", |b| {
        b.iter_custom(|iters| {
            pool(|| {
                let (mut cache, _) = prefill();
                let token = ints::<B>(&[7], &device);
                let start = Instant::now();
                for _ in 0..iters {
                    let hidden = model
                        .text_hidden(&token, None, None, Some(&mut cache))
                        .expect("the cache has room");
                    let _ = model.last_logits(hidden).into_data();
                }
                start.elapsed()
            })
        })
    });
    group.finish();
}

/// One training step of `case` on autodiff backend `B`: two rows of the prompt, text scored.
fn training<B: AutodiffBackend>(c: &mut Criterion, backend: &str, case: &Case) {
    let device = B::Device::default();
    let (ids, mask) = prompt(&case.config);
    let size = case.config.vision_config.image_size;
    let rows = 2;
    let labels: Vec<i64> = ids
        .iter()
        .zip(&mask)
        .map(|(&id, &m)| if m == 1 { IGNORE_INDEX } else { id as i64 })
        .collect();
    let batch = Batch {
        input_ids: vec![ids.clone(); rows],
        attention_mask: vec![vec![1; ids.len()]; rows],
        image_embeds_position_mask: vec![mask; rows],
        labels: vec![labels; rows],
        document_ids: vec![vec![1; ids.len()]; rows],
        pixel_values: (0..rows * 3 * size * size)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
            .collect(),
        image_size: Some((size, size)),
        images_per_row: vec![1; rows],
        locations: vec![Vec::new(); rows],
    };
    let mut model = Some(Kosmos2::<B>::new(&case.config, &device));
    let mut optim = AdamWConfig::new().init::<B, Kosmos2<B>>();
    let mut group = c.benchmark_group(format!("kosmos2/{backend}/{}", case.name));
    group.sample_size(10);
    group.bench_function(format!("train-step-{rows}x{}", ids.len()), |b| {
        b.iter(|| {
            pool(|| {
                let current = model.take().expect("the model is put back after each step");
                let acc =
                    accumulate_gradients(&current, std::slice::from_ref(&batch), &device, 1).expect("a finite loss");
                let next = optim.step(1e-4, current, acc.grads);
                B::sync(&device).unwrap();
                model = Some(next);
                acc.loss
            })
        })
    });
    group.finish();
}

fn bench_backend<B: AutodiffBackend>(c: &mut Criterion, backend: &str) {
    for case in cases() {
        inference::<B::InnerBackend>(c, backend, &case);
        if case.train {
            training::<B>(c, backend, &case);
        }
    }
}

/// Each timed routine runs on a worker of rayon's pool, as `run_task` runs the binaries' work on
/// the CPU backends (criterion's own state is not `Send`, so the routines move, not the whole
/// benchmark; on the GPU backends this only adds one hand-off per routine).
fn pool<R: Send>(op: impl FnOnce() -> R + Send) -> R {
    kosmos_core::backend::on_cpu_pool(op)
}

fn benches(c: &mut Criterion) {
    // One-row products on every core, as `run_task` sets them up for the CPU backends.
    kosmos_core::gemv::set_threads_for_cpu();
    #[cfg(feature = "flex")]
    bench_backend::<burn::backend::Autodiff<burn::backend::Flex>>(c, "flex");
    #[cfg(feature = "ndarray")]
    bench_backend::<burn::backend::Autodiff<burn::backend::NdArray>>(c, "ndarray");
    #[cfg(feature = "wgpu")]
    bench_backend::<burn::backend::Autodiff<burn::backend::Wgpu>>(c, "wgpu");
    #[cfg(feature = "cuda")]
    bench_backend::<burn::backend::Autodiff<burn::backend::Cuda>>(c, "cuda");
}

criterion_group!(model, benches);
criterion_main!(model);
