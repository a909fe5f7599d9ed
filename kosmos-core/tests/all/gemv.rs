//! One-row products split over threads (`kosmos_core::gemv`) give the backend's own product bit
//! for bit: a plain `[k, n]` weight, the tied head's transposed view, and `Linear` with a bias on
//! a rank-3 input; several rows and small products are left to the backend.

use burn::nn::LinearConfig;
use burn::tensor::{Distribution, Tensor};
use kosmos_core::gemv;

use crate::common::TB;

fn bits(t: Tensor<TB, 2>) -> Vec<u32> {
    t.into_data()
        .to_vec::<f32>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

#[test]
fn split_one_row_products_are_bit_identical() {
    let device = Default::default();
    // The setting is process-wide; the split gives the same bits, so concurrent tests see no
    // difference whatever it is.
    gemv::set_threads(3);
    assert_eq!(gemv::threads(), 3);
    let (k, n) = (1024, 1031); // above MIN_WEIGHTS, columns not a multiple of the threads
    assert!(k * n >= gemv::MIN_WEIGHTS);
    let x = Tensor::<TB, 2>::random([1, k], Distribution::Normal(0.0, 1.0), &device);
    let w = Tensor::<TB, 2>::random([k, n], Distribution::Normal(0.0, 1.0), &device);
    assert_eq!(
        bits(gemv::matmul_one_row(x.clone(), w.clone())),
        bits(x.clone().matmul(w.clone()))
    );

    // The tied head: the embedding `[n, k]` used through its transposed view.
    let e = Tensor::<TB, 2>::random([n, k], Distribution::Normal(0.0, 1.0), &device);
    let et = e.transpose();
    assert_eq!(
        bits(gemv::matmul_one_row(x.clone(), et.clone())),
        bits(x.clone().matmul(et))
    );

    // `Linear` with a bias, rank-3 input of one row, and two rows (left to the backend).
    let linear = LinearConfig::new(k, n).init::<TB>(&device);
    let x3 = x.clone().reshape([1, 1, k]);
    let ours = gemv::linear(&linear, x3.clone()).reshape([1, n]);
    assert_eq!(bits(ours), bits(linear.forward(x3).reshape([1, n])));
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
