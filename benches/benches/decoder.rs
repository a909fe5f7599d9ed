//! Decoder-layer forward on the CPU backends: prefill of a 97-token prompt and one cached decode
//! step after it (for the 512-wide layer also after 512 and 2,048 cached tokens). Run with `cargo bench -p kosmos-benches --bench decoder`.

use burn::prelude::*;
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use kosmos_benches::{LAYER_SHAPES, PROMPT_LEN, hidden, layer};
use kosmos_core::AttentionMask;

fn bench_backend<B: Backend>(c: &mut Criterion, backend: &str) {
    let device = B::Device::default();
    let mut group = c.benchmark_group(format!("decoder-layer/{backend}"));
    group.sample_size(10);
    for (name, width, heads, ffn) in LAYER_SHAPES {
        let decoder = layer::<B>(width, heads, ffn, &device);
        let prompt = hidden::<B>(PROMPT_LEN, width, &device);
        group.bench_function(format!("{name}/prefill-{PROMPT_LEN}"), |b| {
            b.iter(|| {
                let out = decoder.forward(prompt.clone(), &AttentionMask::causal(), None);
                B::sync(&device).unwrap();
                out
            })
        });
        let token = hidden::<B>(1, width, &device);
        // One cached step after the prompt; for the medium shape also after longer caches (the
        // step grows only with the attention over the cache).
        let lengths: &[usize] = if width == 512 {
            &[PROMPT_LEN, 512, 2048]
        } else {
            &[PROMPT_LEN]
        };
        for &len in lengths {
            let prompt = hidden::<B>(len, width, &device);
            group.bench_function(format!("{name}/decode-step-after-{len}"), |b| {
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

criterion_group!(decoder, benches);
criterion_main!(decoder);
