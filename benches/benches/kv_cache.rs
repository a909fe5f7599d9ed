//! The KV cache during decoding: the cost of appending one token's keys and values at growing
//! cache lengths (flat: storage grows by doubling, never re-concatenated per token), and one
//! decode step of a 512-wide layer after growing prompts (grows only with the attention over the
//! cache). Run with `cargo bench -p kosmos-benches --bench kv_cache`.

use burn::prelude::*;
use burn::tensor::Distribution;
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use kosmos_benches::{hidden, layer};
use kosmos_core::{AttentionMask, KvCache};

const LENGTHS: [usize; 4] = [64, 256, 1024, 2048];

fn bench_backend<B: Backend>(c: &mut Criterion, backend: &str) {
    let device = B::Device::default();
    let mut group = c.benchmark_group(format!("kv-cache/{backend}"));
    group.sample_size(10);
    let (heads, head_dim) = (8, 64);
    let new = |len| Tensor::<B, 4>::random([1, len, heads, head_dim], Distribution::Normal(0.0, 1.0), &device);
    for len in LENGTHS {
        // Appending token `len + 1` to a cache holding `len` tokens.
        group.bench_function(format!("append-one-at-{len}"), |b| {
            b.iter_batched(
                || {
                    let mut cache = KvCache::<B>::new();
                    cache.append(new(len), new(len));
                    B::sync(&device).unwrap();
                    (cache, new(1), new(1))
                },
                |(mut cache, k, v)| {
                    let out = cache.append(k, v);
                    B::sync(&device).unwrap();
                    (out, cache)
                },
                BatchSize::PerIteration,
            )
        });
    }
    let decoder = layer::<B>(512, 8, 2048, &device);
    let token = hidden::<B>(1, 512, &device);
    for len in LENGTHS {
        let prompt = hidden::<B>(len, 512, &device);
        group.bench_function(format!("decode-step-512-after-{len}"), |b| {
            b.iter_batched(
                || {
                    let mut cache = decoder.new_cache();
                    decoder.forward(prompt.clone(), &AttentionMask::causal(), Some(&mut cache));
                    B::sync(&device).unwrap();
                    cache
                },
                |mut cache| {
                    let out = decoder.forward(token.clone(), &AttentionMask::causal(), Some(&mut cache));
                    B::sync(&device).unwrap();
                    (out, cache)
                },
                BatchSize::PerIteration,
            )
        });
    }
    group.finish();
}

fn benches(c: &mut Criterion) {
    #[cfg(feature = "flex")]
    bench_backend::<burn::backend::Flex>(c, "flex");
    #[cfg(feature = "ndarray")]
    bench_backend::<burn::backend::NdArray>(c, "ndarray");
    #[cfg(feature = "wgpu")]
    bench_backend::<burn::backend::Wgpu>(c, "wgpu");
    #[cfg(feature = "cuda")]
    bench_backend::<burn::backend::Cuda>(c, "cuda");
}

criterion_group!(kv_cache, benches);
criterion_main!(kv_cache);
