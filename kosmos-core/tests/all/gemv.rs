//! One-row products (`kosmos_core::gemv`: our flex kernels, else the backend's product split over
//! threads) give the backend's product up to the order of the additions, with the same bits on
//! any thread count: a plain `[k, n]` weight, the tied head's transposed view, and `Linear` with a
//! bias on a rank-3 input; several rows and small products are left to the backend, bit for bit.

use burn::nn::LinearConfig;
use burn::tensor::{Distribution, Tensor};
use kosmos_core::gemv;

use crate::common::{TB, assert_reordered, bits, on_threads};

#[test]
fn one_row_products_match_the_backend_on_any_thread_count() {
    let device = Default::default();
    // The setting is process-wide; the products do not depend on it beyond the order of the
    // additions, which concurrent tests tolerate.
    gemv::set_threads(3);
    assert_eq!(gemv::threads(), 3);
    let (k, n) = (1024, 1031); // above MIN_WEIGHTS, columns not a multiple of the tiles
    assert!(k * n >= gemv::MIN_WEIGHTS);
    let x = Tensor::<TB, 2>::random([1, k], Distribution::Normal(0.0, 1.0), &device);
    let w = Tensor::<TB, 2>::random([k, n], Distribution::Normal(0.0, 1.0), &device);
    // The tied head: the embedding `[n, k]` used through its transposed view.
    let e = Tensor::<TB, 2>::random([n, k], Distribution::Normal(0.0, 1.0), &device);
    for (what, w) in [("[k, n] weight", w), ("transposed [n, k] view", e.transpose())] {
        let ours = gemv::matmul_one_row(x.clone(), w.clone());
        assert_reordered(ours.clone(), x.clone().matmul(w.clone()), &x, &w, what);
        // The same bits on 1, 2 or 3 threads.
        let one = on_threads(1, || bits(gemv::matmul_one_row(x.clone(), w.clone())));
        let three = on_threads(3, || bits(gemv::matmul_one_row(x.clone(), w.clone())));
        assert_eq!(one, three, "{what}: the result depends on the threads");
        assert_eq!(bits(ours), one, "{what}: the result depends on the threads");
    }

    // Weights stored `[k, n]` read in runs of 128 rows: a short last run with rows past a
    // multiple of 4 (k = 1027); more than 8192 columns (read by columns instead).
    for (k, n) in [(1027, 1031), (130, 8200)] {
        assert!(k * n >= gemv::MIN_WEIGHTS);
        let what = format!("[1, {k}] x [{k}, {n}]");
        let x = Tensor::<TB, 2>::random([1, k], Distribution::Normal(0.0, 1.0), &device);
        let w = Tensor::<TB, 2>::random([k, n], Distribution::Normal(0.0, 1.0), &device);
        let ours = gemv::matmul_one_row(x.clone(), w.clone());
        assert_reordered(ours.clone(), x.clone().matmul(w.clone()), &x, &w, &what);
        let one = on_threads(1, || bits(gemv::matmul_one_row(x.clone(), w.clone())));
        let three = on_threads(3, || bits(gemv::matmul_one_row(x.clone(), w.clone())));
        assert_eq!(one, three, "{what}: the result depends on the threads");
        assert_eq!(bits(ours), one, "{what}: the result depends on the threads");
    }

    // `Linear` with a bias, rank-3 input of one row, and two rows (left to the backend).
    let linear = LinearConfig::new(k, n).init::<TB>(&device);
    let x3 = x.clone().reshape([1, 1, k]);
    let ours = gemv::linear(&linear, x3.clone()).reshape([1, n]);
    let weight = linear.weight.val();
    assert_reordered(ours, linear.forward(x3).reshape([1, n]), &x, &weight, "Linear");
    let two = Tensor::<TB, 3>::random([1, 2, k], Distribution::Normal(0.0, 1.0), &device);
    let ours = gemv::linear(&linear, two.clone()).reshape([2, n]);
    assert_eq!(bits(ours), bits(linear.forward(two).reshape([2, n])));

    // Below MIN_WEIGHTS: the backend's product.
    let small = Tensor::<TB, 2>::random([64, 64], Distribution::Normal(0.0, 1.0), &device);
    let xs = x.slice([0..1, 0..64]);
    assert_eq!(
        bits(gemv::matmul_one_row(xs.clone(), small.clone())),
        bits(xs.matmul(small))
    );
}
