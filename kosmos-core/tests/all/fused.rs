//! The fused flex kernels (`kosmos_core::fused`) against the computations they replace:
//! attention against the explicit path (`explicit_attention`) over masks, shapes, strided
//! inputs and fully masked rows; attention over a KV cache's segments (`cached_attention`)
//! against the segmented explicit path; the GELU kernels against f64 evaluations and Burn's operations;
//! the many-row product (weights by rows, transposed or column views, with and without bias)
//! against the backend's product on any thread count. On a
//! processor without AVX-512 the kernels decline (`None`) and the tests check that instead.

use burn::prelude::Backend;
use burn::tensor::{Bool, Distribution, Tensor, TensorData};
use kosmos_core::attention::{AttentionMask, explicit_attention};
use kosmos_core::packed::Simd;
use kosmos_core::{Activation, fused, gemv};

use crate::common::{ATOL, RTOL, TB, assert_close, assert_reordered, bits, on_threads};

fn has_kernels() -> bool {
    Simd::detected() == Simd::Avx512 && std::env::var("KOSMOS_FUSED").map_or(true, |v| v != "0")
}

/// q, k, v as the projections make them: token-major `[b, t, h, d]` buffers seen as
/// `[b, h, t, d]` (strided views, no copy).
fn heads(b: usize, t: usize, h: usize, d: usize, seed: u64) -> Tensor<TB, 4> {
    let device = Default::default();
    TB::seed(&device, seed);
    Tensor::<TB, 4>::random([b, t, h, d], Distribution::Normal(0.0, 1.0), &device).swap_dims(1, 2)
}

/// The masks the attention kernels are checked under, `[b, 1, t, s]`: none, causal, and causal
/// plus left padding (the first `i` keys of row `i`, at most `s - 1`).
fn masks(b: usize, t: usize, s: usize) -> Vec<(&'static str, Option<Tensor<TB, 4, Bool>>)> {
    let device = Default::default();
    let pads: Vec<i64> = (0..b * s).map(|x| i64::from(x % s >= (x / s).min(s - 1))).collect();
    let attention_mask = Tensor::<TB, 2, burn::tensor::Int>::from_data(TensorData::new(pads, [b, s]), &device);
    vec![
        ("no mask", None),
        ("causal", AttentionMask::<TB>::causal().to_bool(b, t, s, &device)),
        (
            "causal + padding",
            AttentionMask::causal_with_attention_mask(attention_mask).to_bool(b, t, s, &device),
        ),
    ]
}

#[test]
fn fused_attention_matches_the_explicit_path() {
    // (batch, heads, queries, keys, head dim): a decoder prompt, the vision tower's 257 tokens,
    // cross-attention of fewer queries than keys, tiny and non-multiple-of-32 sizes.
    let shapes = [
        (1, 4, 97, 97, 64),
        (2, 3, 257, 257, 40),
        (2, 2, 5, 70, 32),
        (1, 1, 1, 1, 8),
        (3, 2, 65, 65, 33),
        (1, 2, 130, 130, 128),
    ];
    for (b, h, t, s, d) in shapes {
        let q = heads(b, t, h, d, 1);
        let k = heads(b, s, h, d, 2);
        let v = heads(b, s, h, d, 3);
        for (what, mask) in masks(b, t, s) {
            let what = format!("attention {b}x{h}x{t}x{s}x{d}, {what}");
            let ours = fused::attention(&q, &k, &v, mask.as_ref());
            if !has_kernels() {
                assert!(ours.is_none(), "{what}: the kernel must decline without AVX-512");
                continue;
            }
            let ours = ours.unwrap_or_else(|| panic!("{what}: the kernel declined"));
            assert_eq!(ours.dims(), [b, h, t, d]);
            let want = explicit_attention(q.clone(), k.clone(), v.clone(), mask.clone());
            // Queries whose keys are all masked (left padding under the causal mask): zeros here,
            // uniform weights in the explicit path; never read. Compared elsewhere only.
            let (ours, want) = match &mask {
                Some(m) => {
                    let dead = m.clone().int().sum_dim(3).equal_elem(s as i64).expand([b, h, t, d]);
                    let zeros = ours.clone().mask_fill(dead.clone(), 0.0);
                    assert_eq!(
                        (ours.clone() - zeros).abs().max().into_scalar(),
                        0.0,
                        "{what}: fully masked queries give zeros"
                    );
                    (ours.mask_fill(dead.clone(), 0.0), want.mask_fill(dead, 0.0))
                }
                None => (ours, want),
            };
            assert_close(ours, want, ATOL, RTOL, &what);
        }
    }
}

#[test]
fn fused_attention_gives_zero_rows_where_every_key_is_masked() {
    if !has_kernels() {
        return;
    }
    let device = Default::default();
    let (b, h, t, d) = (1, 2, 3, 16);
    let (q, k, v) = (heads(b, t, h, d, 4), heads(b, t, h, d, 5), heads(b, t, h, d, 6));
    // Query 0 sees no key; queries 1 and 2 see keys 1..=2.
    let mask = Tensor::<TB, 4, Bool>::from_data(
        TensorData::new(
            vec![true, true, true, true, false, false, true, false, false],
            [1, 1, 3, 3],
        ),
        &device,
    );
    let ours = fused::attention(&q, &k, &v, Some(&mask)).expect("kernel");
    let row0 = ours.clone().narrow(2, 0, 1).abs().max().into_scalar();
    assert_eq!(row0, 0.0, "a fully masked query gives zeros");
    let want = explicit_attention(q, k, v, Some(mask)).narrow(2, 1, 2);
    assert_close(ours.narrow(2, 1, 2), want, ATOL, RTOL, "attention, partly masked rows");
}

#[test]
fn cached_attention_matches_the_segmented_explicit_path() {
    use kosmos_core::attention::{KvSegmentView, segmented_attention};
    // (batch, heads, new queries, segment lengths, head dim): a decode step over a prompt segment
    // and an open chunk, several queries, one key, head dims off multiples of 16.
    let cases = [
        (1, 4, 1, vec![97, 3], 64),
        (2, 3, 1, vec![64, 64, 5], 40),
        (2, 2, 3, vec![7], 20),
        (1, 1, 1, vec![1], 8),
        (3, 2, 4, vec![33, 16, 2], 16),
    ];
    for (b, h, t, lens, d) in cases {
        let s: usize = lens.iter().sum();
        let q = heads(b, t, h, d, 11);
        let segments: Vec<KvSegmentView<TB>> = lens
            .iter()
            .scan(0, |start, &len| {
                let seg = KvSegmentView {
                    start: *start,
                    keys: heads(b, len, h, d, 20 + *start as u64),
                    values: heads(b, len, h, d, 40 + *start as u64),
                };
                *start += len;
                Some(seg)
            })
            .collect();
        for (name, mask) in masks(b, t, s) {
            let what = format!("cached attention b={b} h={h} t={t} segments={lens:?} d={d}, {name}");
            let ours = fused::cached_attention(&q, &segments, mask.as_ref());
            if !has_kernels() {
                assert!(ours.is_none(), "{what}: the kernel must decline without AVX-512");
                continue;
            }
            let ours = ours.unwrap_or_else(|| panic!("{what}: the kernel declined"));
            assert_eq!(ours.dims(), [b, h, t, d], "{what}");
            let want = segmented_attention(q.clone(), segments.clone(), mask);
            assert_close(ours, want, ATOL, RTOL, &what);
        }
    }
    // More queries than the kernel takes, or mismatched segments: declined.
    let segment = |d: usize| KvSegmentView {
        start: 0,
        keys: heads(1, 4, 2, d, 2),
        values: heads(1, 4, 2, d, 3),
    };
    let q = heads(1, fused::CACHED_MAX_QUERIES + 1, 2, 8, 1);
    assert!(fused::cached_attention(&q, &[segment(8)], None).is_none());
    let q = heads(1, 1, 2, 8, 1);
    assert!(fused::cached_attention(&q, &[segment(16)], None).is_none());
}

/// `x Φ(x)` and `x σ(1.702 x)` in f64.
fn reference(x: f32, quick: bool) -> f64 {
    let x = x as f64;
    if quick {
        // The constant as the f32 models use it (1.702 rounded to f32).
        x / (1.0 + (-(1.702f32 as f64) * x).exp())
    } else {
        0.5 * x * libm::erfc(-x / std::f64::consts::SQRT_2)
    }
}

#[test]
fn gelu_kernels_match_f64_and_burn() {
    let device = Default::default();
    // A dense grid over [-12, 12], the tails, zeros and tiny values; 3 x 7 x 1000 + 9 values, not
    // a multiple of 16 (the tail lanes).
    let mut xs: Vec<f32> = (0..21_000).map(|i| -12.0 + 24.0 * i as f32 / 20_999.0).collect();
    xs.extend([0.0, -0.0, 1e-30, -1e-30, 1e-7, -1e-7, 40.0, -40.0, -100.0]);
    let n = xs.len();
    let x = Tensor::<TB, 3>::from_data(TensorData::new(xs.clone(), [3, 1, n / 3]), &device);
    for (activation, quick) in [(Activation::Gelu, false), (Activation::QuickGelu, true)] {
        let ours = if quick { fused::quick_gelu(&x) } else { fused::gelu(&x) };
        if !has_kernels() {
            assert!(ours.is_none());
            continue;
        }
        let ours = ours.expect("kernel");
        let values = ours.clone().into_data().to_vec::<f32>().unwrap();
        // Against f64: a few units in the last place of the value (the f32 rounding of x Φ(x)
        // plus erfc's 1.2e-7 and the exponentials' rounding), also deep in GELU's negative tail
        // (2e-32 at x = -12, where f32's `1 + erf` is exactly 0), and 1e-37 absolute
        // (denormal-sized outputs).
        let mut worst = 0f64;
        for (&xi, &yi) in xs.iter().zip(&values) {
            let want = reference(xi, quick);
            let err = (yi as f64 - want).abs();
            // quick GELU: the f32 product 1.702 x (rounded as in the reference) moves e^(-1.702 x)
            // by up to ε |1.702 x| relative, ε = 6e-8.
            let argument = if quick { 6e-8 * (1.702 * xi.abs() as f64) } else { 0.0 };
            let bound = 1e-37 + (6e-7 + argument) * want.abs();
            assert!(
                err <= bound,
                "{activation:?}({xi}) = {yi}, f64 {want} (|diff| {err:.3e})"
            );
            worst = worst.max(err / want.abs().max(1e-30));
        }
        eprintln!("{activation:?}: worst relative error against f64 {worst:.2e}");
        // And within the project's tolerance of Burn's operations (the reference path).
        let burn = activation.forward_reference(x.clone());
        assert_close(ours, burn, ATOL, RTOL, &format!("{activation:?} against Burn's"));
    }
}

/// `[x, 1]` and `[w; bias]`: the product with the bias as one more term (for the reordering bound).
fn with_bias(x: &Tensor<TB, 2>, w: &Tensor<TB, 2>, bias: &Tensor<TB, 1>) -> (Tensor<TB, 2>, Tensor<TB, 2>) {
    let [m, _] = x.dims();
    let ones = Tensor::<TB, 2>::ones([m, 1], &x.device());
    (
        Tensor::cat(vec![x.clone(), ones], 1),
        Tensor::cat(vec![w.clone(), bias.clone().unsqueeze()], 0),
    )
}

#[test]
fn many_row_products_match_the_backend_on_any_thread_count() {
    let device = Default::default();
    // (rows, k, n): a prompt's head or layer (97 rows, several passes of 256, strips of 32 plus a
    // tail), the vision tower's 257 rows, panel edges (13, 14, 15 rows), k below one transpose
    // block, one output column; narrow weights whose rows split into groups of panels over one
    // pass or several (the weight packed once for every group: 257 x 600 x 70, 100 x 520 x 200).
    let shapes = [
        (97, 600, 1031),
        (257, 64, 96),
        (257, 600, 70),
        (100, 520, 200),
        (13, 17, 64),
        (14, 256, 33),
        (15, 513, 1),
        (2, 1, 40),
        (29, 40, 95),
    ];
    for (m, k, n) in shapes {
        let x = Tensor::<TB, 2>::random([m, k], Distribution::Normal(0.0, 1.0), &device);
        let e = Tensor::<TB, 2>::random([n, k], Distribution::Normal(0.0, 1.0), &device);
        let bias = Tensor::<TB, 1>::random([n], Distribution::Normal(0.0, 1.0), &device);
        // The weight as a tied head (the transposed view of `[n, k]`), as a `Linear` stores it
        // (`[k, n]` rows) and as a view of `n` columns of a wider `[k, n + 7]` matrix (rows
        // `n + 7` apart).
        let wide = Tensor::<TB, 2>::random([k, n + 7], Distribution::Normal(0.0, 1.0), &device);
        let weights = [
            ("transposed", e.clone().transpose()),
            (
                "rows",
                Tensor::<TB, 2>::from_data(e.clone().transpose().into_data(), &device),
            ),
            ("column view", wide.slice([0..k, 3..3 + n])),
        ];
        for (layout, w) in weights {
            for with in [false, true] {
                let what = format!("[{m}, {k}] x [{k}, {n}] ({layout}{})", if with { ", bias" } else { "" });
                let b = with.then_some(&bias);
                let ours = fused::matmul(&x, &w, b);
                if !has_kernels() {
                    assert!(ours.is_none(), "{what}: the kernel must decline without AVX-512");
                    continue;
                }
                let ours = ours.expect("kernel");
                if with {
                    let want = x.clone().matmul(w.clone()) + bias.clone().unsqueeze();
                    let (xa, wa) = with_bias(&x, &w, &bias);
                    assert_reordered(ours.clone(), want, &xa, &wa, &what);
                } else {
                    assert_reordered(ours.clone(), x.clone().matmul(w.clone()), &x, &w, &what);
                }
                let on = |threads: usize| on_threads(threads, || bits(fused::matmul(&x, &w, b).expect("kernel")));
                assert_eq!(on(1), on(3), "{what}: the result depends on the threads");
                assert_eq!(bits(ours), on(1), "{what}: the result depends on the threads");
            }
        }
        // A broadcast weight (every row the same values, stored once or copied, as the backend
        // chooses) is declined or multiplied correctly; a bias of the wrong length is declined.
        let broadcast = bias.clone().unsqueeze::<2>().expand([k, n]);
        if let Some(ours) = fused::matmul(&x, &broadcast, None) {
            let want = x.clone().matmul(broadcast.clone());
            assert_reordered(ours, want, &x, &broadcast, "a broadcast weight");
        }
        let short = Tensor::<TB, 1>::zeros([n + 1], &device);
        assert!(
            fused::matmul(&x, &e.clone().transpose(), Some(&short)).is_none(),
            "a bias of n + 1 values is declined"
        );
    }
    // Through `gemv::linear` (every `Linear` of the models) on a 3-d input, with its bias, against
    // Burn's `Linear`.
    let linear = burn::nn::LinearConfig::new(300, 70).init::<TB>(&device);
    let x3 = Tensor::<TB, 3>::random([2, 49, 300], Distribution::Normal(0.0, 1.0), &device);
    let ours = gemv::linear(&linear, x3.clone()).reshape([98, 70]);
    let want = linear.forward(x3.clone()).reshape([98, 70]);
    let bias = linear.bias.as_ref().expect("a bias").val();
    let (xa, wa) = with_bias(&x3.reshape([98, 300]), &linear.weight.val(), &bias);
    assert_reordered(ours, want, &xa, &wa, "gemv::linear, [2, 49, 300] x [300, 70] + bias");
    // Through `gemv::matmul_one_row` (the LM head's call), above `MIN_WEIGHTS`, with threads set.
    gemv::set_threads(2);
    let (m, k, n) = (9, 1024, 1100);
    let x = Tensor::<TB, 2>::random([m, k], Distribution::Normal(0.0, 1.0), &device);
    let w = Tensor::<TB, 2>::random([n, k], Distribution::Normal(0.0, 1.0), &device).transpose();
    let want = x.clone().matmul(w.clone());
    assert_reordered(
        gemv::matmul_one_row(x.clone(), w.clone()),
        want,
        &x,
        &w,
        "matmul_one_row, 9 rows",
    );
}
