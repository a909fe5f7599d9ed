//! The KV cache during decoding: appending a sequence one token at a time, per token, at growing
//! lengths (flat: tokens are written into 64-slot chunks that merge like a binary counter, never
//! re-concatenated per token), and the backend primitive a flat preallocated buffer would rely
//! on instead. The decode step at growing cache lengths is in the `decoder` bench. Run with
//! `cargo bench -p kosmos-benches --bench kv_cache`.

use burn::prelude::*;
use burn::tensor::Distribution;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kosmos_core::KvCache;

const LENGTHS: [usize; 4] = [64, 256, 1024, 2048];

fn bench_backend<B: Backend>(c: &mut Criterion, backend: &str) {
    let device = B::Device::default();
    let mut group = c.benchmark_group(format!("kv-cache/{backend}"));
    group.sample_size(10);
    let (heads, head_dim) = (8, 64);
    let new = |len| Tensor::<B, 4>::random([1, len, heads, head_dim], Distribution::Normal(0.0, 1.0), &device);
    // Appending a whole sequence one token at a time from an empty cache: each write touches one
    // 64-slot chunk, so the time per token stays flat as the sequence grows; re-concatenating
    // per token (or a backend copying a whole flat buffer per write) would make it grow linearly.
    let token = new(1);
    for len in LENGTHS {
        group.throughput(Throughput::Elements(len as u64));
        group.bench_function(format!("append-{len}-tokens-one-by-one"), |b| {
            b.iter(|| {
                let mut cache = KvCache::<B>::new();
                for _ in 0..len {
                    cache.append(token.clone(), token.clone());
                }
                B::sync(&device).unwrap();
                cache
            })
        });
    }
    // What a flat preallocated buffer would rely on: writing one token into a uniquely owned
    // buffer of `len` slots. Backends that write in place take constant time here; Burn 0.21's
    // flex copies the whole buffer (linear in `len`), which is why the cache uses chunks.
    for len in LENGTHS {
        group.throughput(Throughput::Elements(1));
        group.bench_function(format!("slice-assign-one-into-{len}-slots"), |b| {
            let mut storage = Some(Tensor::<B, 4>::zeros([1, len, heads, head_dim], &device));
            let mut at = 0;
            b.iter(|| {
                let s = storage.take().unwrap();
                storage = Some(s.slice_assign([0..1, at..at + 1, 0..heads, 0..head_dim], token.clone()));
                at = (at + 1) % len;
                B::sync(&device).unwrap();
            })
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
