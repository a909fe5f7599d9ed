//! One-row matrix products on several threads: the projections of a decode step.
//!
//! A decode step multiplies one row by every weight matrix of the model, `x [1, k] @ W [k, n]`:
//! the product reads the whole weight once and does two flops per weight, so it runs at the
//! speed the weight streams from memory. On the CPU backends Burn 0.21 hands it to the gemm
//! crate's matrix-vector path, which runs on one thread whatever the parallelism asked, so a
//! decode step read its weights at one core's bandwidth (about 11 GB/s here, against 20-25 GB/s
//! with both cores; the benchmark chapter has the measurements). [`matmul_one_row`] splits `W`
//! by output columns into one block per thread (strided views, no copy) and runs the blocks
//! concurrently on rayon's pool: each output is the same dot product as before, so the result
//! is bit-identical.
//!
//! How many threads is a process-wide setting ([`set_threads`]; default 1, which leaves every
//! product to the backend). The backend dispatcher ([`crate::backend::run_task`]) sets it to the
//! machine's cores when it runs a task on a CPU backend; model code calls [`linear`] and
//! [`matmul_one_row`] whatever the backend and does not branch on it. `KOSMOS_GEMV_THREADS`
//! overrides the count (1 turns the split off).

use std::sync::atomic::{AtomicUsize, Ordering};

use burn::nn::Linear;
use burn::prelude::*;

static THREADS: AtomicUsize = AtomicUsize::new(1);

/// Products smaller than this many weights stay on one thread (spawning costs more than it
/// saves; 1 Mi weights = 4 MiB of f32, a few hundred microseconds).
pub const MIN_WEIGHTS: usize = 1 << 20;

/// Set the threads of one-row products (1: off).
pub fn set_threads(threads: usize) {
    THREADS.store(threads.max(1), Ordering::Relaxed);
}

/// The threads of one-row products.
pub fn threads() -> usize {
    THREADS.load(Ordering::Relaxed)
}

/// For a CPU backend: `KOSMOS_GEMV_THREADS` if set, else the machine's available parallelism.
pub fn set_threads_for_cpu() {
    let threads = std::env::var("KOSMOS_GEMV_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    set_threads(threads);
}

/// `x @ w` for `x: [m, k]`, `w: [k, n]` (any strides); with one row, more than one thread set
/// and at least [`MIN_WEIGHTS`] weights, the columns of `w` are split over the threads.
pub fn matmul_one_row<B: Backend>(x: Tensor<B, 2>, w: Tensor<B, 2>) -> Tensor<B, 2> {
    let threads = threads();
    let [m, _] = x.dims();
    let [k, n] = w.dims();
    if m != 1 || threads < 2 || k * n < MIN_WEIGHTS || n < 2 * threads {
        return x.matmul(w);
    }
    let block = n.div_ceil(threads);
    let blocks: Vec<Tensor<B, 2>> = (0..n.div_ceil(block))
        .map(|i| w.clone().slice([0..k, i * block..((i + 1) * block).min(n)]))
        .collect();
    // Rayon's pool (the one flex and ndarray use; no thread spawned per product): 5-15 % faster
    // than scoped threads over a full-size decode step's products.
    let mut outputs: Vec<Option<Tensor<B, 2>>> = vec![None; blocks.len()];
    rayon::scope(|scope| {
        for (out, block) in outputs.iter_mut().zip(blocks) {
            let x = x.clone();
            scope.spawn(move |_| *out = Some(x.matmul(block)));
        }
    });
    let outputs: Vec<Tensor<B, 2>> = outputs.into_iter().map(|o| o.expect("every block ran")).collect();
    Tensor::cat(outputs, 1)
}

/// `linear.forward(x)`, with a one-row input through [`matmul_one_row`].
pub fn linear<B: Backend, const D: usize>(linear: &Linear<B>, x: Tensor<B, D>) -> Tensor<B, D> {
    let dims = x.dims();
    let rows: usize = dims[..D - 1].iter().product();
    if rows != 1 || threads() < 2 {
        return linear.forward(x);
    }
    let w = linear.weight.val();
    let [k, n] = w.dims();
    let y = matmul_one_row(x.reshape([1, k]), w);
    let y = match &linear.bias {
        Some(b) => y + b.val().unsqueeze::<2>(),
        None => y,
    };
    let mut out = dims;
    out[D - 1] = n;
    y.reshape(out)
}
