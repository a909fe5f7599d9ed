//! One-row products (a decode step's projections) with `kosmos_core::gemv` off (1 thread: the
//! backend's product) and on (all cores: on flex, our kernels), at KOSMOS-2's full-size shapes: `[1, 2048] x [2048, 2048]` (attention),
//! `[2048, 8192]` and `[8192, 2048]` (FFN) and the tied head `[1, 2048] x [65,037, 2048]ᵀ`; plus a
//! full-size decode step's 144 layer products over distinct weights (4.8 GB, streamed from memory
//! as in the model), in f32 and with the packed bf16 and Q8 copies of `kosmos_core::packed` (the
//! `--weights` modes; 2.4 and 1.4 GB). Also many-row products (a prompt's `Linear` layers) through
//! `gemv::linear` against Burn's `Linear::forward`. Run with
//! `cargo bench -p kosmos-benches --bench gemv`.

use burn::prelude::*;
use burn::tensor::Distribution;
use criterion::{Criterion, criterion_group, criterion_main};
use kosmos_core::gemv;
use kosmos_core::packed::{PackedWeight, WeightMode};

fn bench_backend<B: Backend>(c: &mut Criterion, backend: &str) {
    let device = B::Device::default();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut group = c.benchmark_group(format!("one-row-product/{backend}"));
    group.sample_size(10);
    let random = |dims: [usize; 2]| Tensor::<B, 2>::random(dims, Distribution::Normal(0.0, 0.02), &device);
    let shapes = [("attention", 2048, 2048), ("fc1", 2048, 8192), ("fc2", 8192, 2048)];
    for threads in [1, cores] {
        gemv::set_threads(threads);
        for (name, k, n) in shapes {
            let (x, w) = (random([1, k]), random([k, n]));
            group.bench_function(format!("{name}/{threads}-threads"), |b| {
                b.iter(|| {
                    let out = gemv::matmul_one_row(x.clone(), w.clone());
                    B::sync(&device).unwrap();
                    out
                })
            });
        }
        let (x, head) = (random([1, 2048]), random([65037, 2048]));
        group.bench_function(format!("tied-head/{threads}-threads"), |b| {
            b.iter(|| {
                let out = gemv::matmul_one_row(x.clone(), head.clone().transpose());
                B::sync(&device).unwrap();
                out
            })
        });
    }
    // A full-size decode step's layer products, each weight read once per step.
    let layers: Vec<[Tensor<B, 2>; 6]> = (0..24)
        .map(|_| {
            let a = || random([2048, 2048]);
            [a(), a(), a(), a(), random([2048, 8192]), random([8192, 2048])]
        })
        .collect();
    let (x, xf) = (random([1, 2048]), random([1, 8192]));
    for threads in [1, cores] {
        gemv::set_threads(threads);
        group.bench_function(format!("full-size-step-products/{threads}-threads"), |b| {
            b.iter(|| {
                for layer in &layers {
                    for w in layer {
                        let input = if w.dims()[0] == 2048 { &x } else { &xf };
                        let _ = gemv::matmul_one_row(input.clone(), w.clone());
                    }
                }
                B::sync(&device).unwrap();
            })
        });
    }
    // The same products on packed copies (the decode steps of `--weights bf16|q8`).
    gemv::set_threads(cores);
    for mode in [WeightMode::Bf16, WeightMode::Q8] {
        let packed: Vec<Vec<PackedWeight<B>>> = layers
            .iter()
            .map(|layer| {
                layer
                    .iter()
                    .map(|w| PackedWeight::pack(w.clone(), mode).expect("packed"))
                    .collect()
            })
            .collect();
        group.bench_function(format!("full-size-step-products-{mode}/{cores}-threads"), |b| {
            b.iter(|| {
                for layer in &packed {
                    for w in layer {
                        let input = if w.dims()[1] == 2048 { &x } else { &xf };
                        let _ = w.matmul(input.clone());
                    }
                }
                B::sync(&device).unwrap();
            })
        });
    }
    gemv::set_threads(1);
    group.finish();
}

/// Many-row products (a prompt's and the vision tower's `Linear` layers, KOSMOS-2 medium and full
/// sizes) through `gemv::linear` (on flex: `kosmos_core::fused::matmul`) and through Burn's
/// `Linear::forward` (the backend's product), each weight a fresh one per iteration from a set
/// larger than the caches where it fits in 64 MiB (as in the model, which reads each layer's
/// weight once per forward pass).
fn bench_many_rows<B: Backend>(c: &mut Criterion, backend: &str) {
    let device = B::Device::default();
    let mut group = c.benchmark_group(format!("many-row-product/{backend}"));
    group.sample_size(20);
    let shapes = [
        (97, 512, 512),
        (97, 512, 2048),
        (97, 2048, 512),
        (257, 256, 256),
        (257, 1024, 256),
        (97, 2048, 2048),
        (97, 2048, 8192),
        (97, 8192, 2048),
        (257, 1024, 4096),
        (257, 4096, 1024),
    ];
    for (m, k, n) in shapes {
        let copies = ((64 << 20) / (k * n * 4)).clamp(1, 32);
        let linears: Vec<_> = (0..copies)
            .map(|_| burn::nn::LinearConfig::new(k, n).init::<B>(&device))
            .collect();
        // Parameters initialise lazily: draw them before timing.
        for linear in &linears {
            let _ = linear.weight.val().into_data();
        }
        let x = Tensor::<B, 3>::random([1, m, k], Distribution::Normal(0.0, 1.0), &device);
        let mut i = 0;
        group.bench_function(format!("[{m}, {k}] x [{k}, {n}]/ours"), |b| {
            b.iter(|| {
                i = (i + 1) % copies;
                let out = gemv::linear(&linears[i], x.clone());
                B::sync(&device).unwrap();
                out
            })
        });
        group.bench_function(format!("[{m}, {k}] x [{k}, {n}]/backend"), |b| {
            b.iter(|| {
                i = (i + 1) % copies;
                let out = linears[i].forward(x.clone());
                B::sync(&device).unwrap();
                out
            })
        });
    }
    group.finish();
}

fn benches(c: &mut Criterion) {
    #[cfg(feature = "flex")]
    bench_many_rows::<burn::backend::Flex>(c, "flex");
    #[cfg(feature = "flex")]
    bench_backend::<burn::backend::Flex>(c, "flex");
    #[cfg(feature = "ndarray")]
    bench_backend::<burn::backend::NdArray>(c, "ndarray");
}

criterion_group!(gemv, benches);
criterion_main!(gemv);
