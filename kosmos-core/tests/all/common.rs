//! Shared test helpers (see `kosmos_core::testing`).

use burn::tensor::Tensor;

pub use kosmos_core::testing::{ATOL, Fixture, RTOL, assert_close};

/// The default test backend (the fastest CPU backend).
pub type TB = burn::backend::Flex;

/// The bits of every value (for same-result checks).
pub fn bits(t: Tensor<TB, 2>) -> Vec<u32> {
    t.into_data()
        .to_vec::<f32>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

/// `|ours - backend| <= 1e-6 + 1e-5 * Σ_i |x_i w_ij|`: the two differ only in the order of the
/// f32 additions (bounded by the terms' magnitudes; 1e-5 is about 80 ε).
pub fn assert_reordered(ours: Tensor<TB, 2>, want: Tensor<TB, 2>, x: &Tensor<TB, 2>, w: &Tensor<TB, 2>, what: &str) {
    let bound = x
        .clone()
        .abs()
        .matmul(w.clone().abs())
        .mul_scalar(1e-5)
        .add_scalar(1e-6);
    let diff = (ours - want).abs();
    let over = diff.clone().greater(bound).int().sum().into_scalar();
    assert_eq!(
        over, 0,
        "{what}: {over} outputs off the backend's product by more than the bound"
    );
}

/// `f` on a rayon pool of `threads` threads.
pub fn on_threads<T: Send>(threads: usize, f: impl FnOnce() -> T + Send) -> T {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
        .install(f)
}
