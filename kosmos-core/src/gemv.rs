//! One-row matrix products on several threads: the projections of a decode step.
//!
//! A decode step multiplies one row by every weight matrix of the model, `x [1, k] @ W [k, n]`:
//! the product reads the whole weight once and does two flops per weight, so it runs at the
//! speed the weight streams from memory. On the CPU backends Burn 0.21 hands it to the gemm
//! crate's matrix-vector path, which runs on one thread whatever the parallelism asked, so a
//! decode step read its weights at one core's bandwidth (about 11 GB/s here, against 20-25 GB/s
//! with both cores; the benchmark chapter has the measurements). [`matmul_one_row`] therefore
//! runs such products itself: on flex with AVX2 (or AVX-512), kernels of ours read the f32
//! weight from flex's storage in the layout it has (`[k, n]` in runs of consecutive rows, or the
//! transposed view of an `[n, k]` tied head as dot products) on all cores, at 28-30 GB/s where
//! the split gemm path reached 14-15 GB/s (each output's sum in a fixed order, so the result does not depend on the
//! thread count; it differs from the backend's product only in the order of the additions).
//! Elsewhere (another backend, autodiff, no AVX2, another layout) it splits `W` by output columns
//! into one block per thread (strided views, no copy) and runs the backend's product on each
//! block concurrently on rayon's pool, bit-identical to the backend's whole product.
//!
//! How many threads is a process-wide setting ([`set_threads`]; default 1, which leaves every
//! product to the backend). The backend dispatcher ([`crate::backend::run_task`]) sets it to the
//! machine's cores when it runs a task on a CPU backend; model code calls [`linear`] and
//! [`matmul_one_row`] whatever the backend and does not branch on it. `KOSMOS_GEMV_THREADS`
//! overrides the count (1 turns the kernels and the split off).

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
/// and at least [`MIN_WEIGHTS`] weights, the columns of `w` are split over the threads. With more
/// rows the product goes to [`crate::fused::matmul`] where it applies (flex, AVX-512, `w` stored
/// by rows or the transposed view of a row-major matrix such as a tied LM head).
pub fn matmul_one_row<B: Backend>(x: Tensor<B, 2>, w: Tensor<B, 2>) -> Tensor<B, 2> {
    let threads = threads();
    let [m, _] = x.dims();
    let [k, n] = w.dims();
    if m > 1 {
        if let Some(y) = crate::fused::matmul(&x, &w, None) {
            return y;
        }
    }
    if m != 1 || threads < 2 || k * n < MIN_WEIGHTS || n < 2 * threads {
        return x.matmul(w);
    }
    #[cfg(feature = "flex")]
    if let Some(y) = flex_f32::one_row::<B>(&x, &w) {
        return y;
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

/// `linear.forward(x)`: a one-row input through [`matmul_one_row`], more than
/// [`crate::packed::MAX_PACKED_ROWS`] rows through [`crate::fused::matmul`] (bias included) where
/// it applies, else the backend's `Linear`.
pub fn linear<B: Backend, const D: usize>(linear: &Linear<B>, x: Tensor<B, D>) -> Tensor<B, D> {
    let dims = x.dims();
    let rows: usize = dims[..D - 1].iter().product();
    let w = linear.weight.val();
    let [k, n] = w.dims();
    let out_dims = || {
        let mut out = dims;
        out[D - 1] = n;
        out
    };
    // A few rows (a batch of decode steps) stream the weight like one row does: the backend's
    // product reads it at least as fast as the packing kernel.
    if rows > crate::packed::MAX_PACKED_ROWS {
        let bias = linear.bias.as_ref().map(|b| b.val());
        if let Some(y) = crate::fused::matmul(&x.clone().reshape([rows, k]), &w, bias.as_ref()) {
            return y.reshape(out_dims());
        }
    }
    if rows != 1 || threads() < 2 {
        return linear.forward(x);
    }
    let y = matmul_one_row(x.reshape([1, k]), w);
    let y = match &linear.bias {
        Some(b) => y + b.val().unsqueeze::<2>(),
        None => y,
    };
    y.reshape(out_dims())
}

/// The f32 one-row kernels on flex's storage (AVX-512 or AVX2 + FMA): a weight stored `[k, n]`
/// (a `Linear`'s) is read, with AVX-512 and up to 8192 columns, in tasks of 128 consecutive rows
/// (one contiguous run each, partial sums added in a fixed order afterwards); otherwise 256
/// (AVX-512) or 128 (AVX2) output columns per task held in registers, row by row with a
/// software prefetch a few rows ahead. A transposed view of an `[n, k]` weight (the tied head)
/// is read as four dot products per pass. Measured on the full-size decoder's products (2
/// threads, distinct weights): 28-30 GB/s by runs of rows, 24-25 GB/s by columns, against 14-15
/// GB/s for the gemm crate's matrix-vector path split over the same threads. Each output's sum runs in a fixed order
/// whatever the threads, so results do not depend on the thread count; they differ from the
/// backend's product only in the order of the additions.
#[cfg(feature = "flex")]
mod flex_f32 {
    use burn::prelude::*;
    use burn::tensor::{DType, TensorPrimitive};
    use rayon::prelude::*;

    use crate::packed::Simd;
    use crate::packed::flex_io::{self, flex};

    /// `x [1, k] @ w [k, n]` on flex tensors, or `None` (another backend, another layout or
    /// dtype, no AVX2).
    pub(super) fn one_row<B: Backend>(x: &Tensor<B, 2>, w: &Tensor<B, 2>) -> Option<Tensor<B, 2>> {
        let simd = Simd::detected();
        if simd == Simd::Portable {
            return None;
        }
        let [k, n] = w.dims();
        let x = flex_io::contiguous(x)?;
        let xs = x.as_slice::<f32>()?;
        let w = match w.clone().into_primitive() {
            TensorPrimitive::Float(p) => p,
            TensorPrimitive::QFloat(_) => return None,
        };
        let wf = flex(&w)?;
        if wf.dtype() != DType::F32 {
            return None;
        }
        let layout = wf.layout();
        let start = layout.start_offset();
        let storage = wf.storage::<f32>().get(start..start + k * n)?;
        let out = match layout.strides() {
            [r, 1] if *r == n as isize => rows(xs, storage, k, n, simd),
            [1, c] if *c == k as isize => columns(xs, storage, k, n, simd),
            _ => return None,
        };
        flex_io::tensor::<B>(out, [1, n])
    }

    /// Rows of `w` per task of the AVX-512 row kernel (a fixed number, so that the sums do not
    /// depend on the threads).
    const CHUNK: usize = 128;

    /// `x @ w` with `w` stored `[k, n]` row-major.
    ///
    /// With AVX-512: tasks take [`CHUNK`] consecutive rows each (one contiguous run of memory,
    /// which the hardware prefetchers stream at the full bandwidth; a split by columns reads
    /// each row in pieces a page apart) and sum `x_i w_i` over them into a partial row of `n`
    /// values held in L1; the partial rows are then added in chunk order.
    fn rows(x: &[f32], w: &[f32], k: usize, n: usize, simd: Simd) -> Vec<f32> {
        #[cfg(target_arch = "x86_64")]
        if simd == Simd::Avx512 && n <= 8192 {
            let chunks = k.div_ceil(CHUNK);
            // Zeroed here (pages fresh from the allocator); the kernel adds into its row.
            let mut partial = vec![0f32; chunks * n];
            partial.par_chunks_mut(n).enumerate().for_each(|(c, acc)| {
                let rows = c * CHUNK..((c + 1) * CHUNK).min(k);
                // SAFETY: AVX-512 F was detected; rows `rows` of `w` hold `n` values each.
                unsafe { kernels::rows_chunk_512(&x[rows.clone()], &w[rows.start * n..rows.end * n], n, acc) };
            });
            let (first, rest) = partial.split_at(n);
            let mut out = first.to_vec();
            for part in rest.chunks(n) {
                for (o, p) in out.iter_mut().zip(part) {
                    *o += p;
                }
            }
            return out;
        }
        let tile = if simd == Simd::Avx512 { 256 } else { 128 };
        let mut out = vec![0f32; n];
        out.par_chunks_mut(tile).enumerate().for_each(|(t, out)| {
            let first = t * tile;
            if out.len() == tile {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `simd` was detected on this processor; columns `first..first + tile`
                // of every row lie within `w` (`k * n` values).
                unsafe {
                    if simd == Simd::Avx512 {
                        return kernels::rows_512(x, w, n, first, out);
                    }
                    return kernels::rows_avx2(x, w, n, first, out);
                }
            }
            for (i, &xi) in x.iter().enumerate().take(k) {
                let row = &w[i * n + first..i * n + first + out.len()];
                for (o, &v) in out.iter_mut().zip(row) {
                    *o += xi * v;
                }
            }
        });
        out
    }

    /// `x @ w` with `w` the transposed view of an `[n, k]` row-major matrix.
    fn columns(x: &[f32], w: &[f32], k: usize, n: usize, simd: Simd) -> Vec<f32> {
        const GROUP: usize = 4;
        let mut out = vec![0f32; n];
        // Chunks of whole groups, so that every output is computed the same way on any threads.
        let per_chunk = n.div_ceil(rayon::current_num_threads() * 4).div_ceil(GROUP) * GROUP;
        out.par_chunks_mut(per_chunk).enumerate().for_each(|(c, out)| {
            let first = c * per_chunk;
            for (g, out) in out.chunks_mut(GROUP).enumerate() {
                let o = first + g * GROUP;
                #[cfg(target_arch = "x86_64")]
                if out.len() == GROUP {
                    // SAFETY: `simd` was detected on this processor; rows `o..o + 4` of `w` lie
                    // within it.
                    unsafe { kernels::columns4(x, &w[o * k..(o + GROUP) * k], out, simd) };
                    continue;
                }
                for (j, y) in out.iter_mut().enumerate() {
                    let row = &w[(o + j) * k..(o + j + 1) * k];
                    *y = x.iter().zip(row).map(|(a, b)| a * b).sum();
                }
            }
        });
        let _ = simd;
        out
    }

    #[cfg(target_arch = "x86_64")]
    mod kernels {
        use std::arch::x86_64::*;

        use crate::packed::Simd;

        /// Rows ahead that each task asks the memory for.
        const AHEAD: usize = 4;

        /// # Safety
        /// AVX-512 F must be available; `w` holds `x.len()` rows of `n` values and
        /// `first + 256 <= n`; `out` holds 256 values.
        #[target_feature(enable = "avx512f")]
        pub(super) unsafe fn rows_512(x: &[f32], w: &[f32], n: usize, first: usize, out: &mut [f32]) {
            let k = x.len();
            assert!(out.len() == 256 && first + 256 <= n && w.len() >= k * n);
            let wp = w.as_ptr();
            let mut acc = [_mm512_setzero_ps(); 16];
            for (i, &xi) in x.iter().enumerate() {
                // SAFETY: row `i < k`, columns `first..first + 256` are within `w`; the prefetched
                // row is clamped to the last one.
                unsafe {
                    let xi = _mm512_set1_ps(xi);
                    let row = wp.add(i * n + first);
                    let ahead = wp.add((i + AHEAD).min(k - 1) * n + first) as *const i8;
                    for (v, acc) in acc.iter_mut().enumerate() {
                        _mm_prefetch::<_MM_HINT_T0>(ahead.add(64 * v));
                        *acc = _mm512_fmadd_ps(xi, _mm512_loadu_ps(row.add(16 * v)), *acc);
                    }
                }
            }
            for (v, acc) in acc.iter().enumerate() {
                // SAFETY: `out` holds 256 values.
                unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(16 * v), *acc) };
            }
        }

        /// `acc += sum_i x[i] w[i]` over the rows of `w` (`x.len()` rows of `n` values, one
        /// contiguous run), four rows per pass over `acc` (the caller zeroes `acc` first).
        ///
        /// # Safety
        /// AVX-512 F must be available; `w` holds `x.len() * n` values, `acc` `n`.
        #[target_feature(enable = "avx512f")]
        pub(super) unsafe fn rows_chunk_512(x: &[f32], w: &[f32], n: usize, acc: &mut [f32]) {
            let k = x.len();
            assert!(w.len() >= k * n && acc.len() == n);
            let (wp, ap) = (w.as_ptr(), acc.as_mut_ptr());
            let mask = |j: usize| -> __mmask16 {
                let left = n - j;
                if left >= 16 { 0xffff } else { (1u16 << left) - 1 }
            };
            let mut i = 0;
            while i + 4 <= k {
                let (x0, x1, x2, x3) = (
                    _mm512_set1_ps(x[i]),
                    _mm512_set1_ps(x[i + 1]),
                    _mm512_set1_ps(x[i + 2]),
                    _mm512_set1_ps(x[i + 3]),
                );
                let mut j = 0;
                while j < n {
                    let m = mask(j);
                    // SAFETY: rows `i..i + 4 < k`, columns `j..j + 16` under the mask.
                    unsafe {
                        let r = wp.add(i * n + j);
                        let mut a = _mm512_maskz_loadu_ps(m, ap.add(j));
                        a = _mm512_fmadd_ps(x0, _mm512_maskz_loadu_ps(m, r), a);
                        a = _mm512_fmadd_ps(x1, _mm512_maskz_loadu_ps(m, r.add(n)), a);
                        a = _mm512_fmadd_ps(x2, _mm512_maskz_loadu_ps(m, r.add(2 * n)), a);
                        a = _mm512_fmadd_ps(x3, _mm512_maskz_loadu_ps(m, r.add(3 * n)), a);
                        _mm512_mask_storeu_ps(ap.add(j), m, a);
                    }
                    j += 16;
                }
                i += 4;
            }
            while i < k {
                let xi = _mm512_set1_ps(x[i]);
                let mut j = 0;
                while j < n {
                    let m = mask(j);
                    // SAFETY: row `i < k`, columns `j..j + 16` under the mask.
                    unsafe {
                        let a = _mm512_maskz_loadu_ps(m, ap.add(j));
                        let a = _mm512_fmadd_ps(xi, _mm512_maskz_loadu_ps(m, wp.add(i * n + j)), a);
                        _mm512_mask_storeu_ps(ap.add(j), m, a);
                    }
                    j += 16;
                }
                i += 1;
            }
        }

        /// # Safety
        /// AVX2 and FMA must be available; `w` holds `x.len()` rows of `n` values and
        /// `first + 128 <= n`; `out` holds 128 values.
        #[target_feature(enable = "avx2,fma")]
        pub(super) unsafe fn rows_avx2(x: &[f32], w: &[f32], n: usize, first: usize, out: &mut [f32]) {
            let k = x.len();
            assert!(out.len() == 128 && first + 128 <= n && w.len() >= k * n);
            let wp = w.as_ptr();
            let mut acc = [_mm256_setzero_ps(); 16];
            for (i, &xi) in x.iter().enumerate() {
                // SAFETY: as in `rows_512`, 128 columns.
                unsafe {
                    let xi = _mm256_set1_ps(xi);
                    let row = wp.add(i * n + first);
                    let ahead = wp.add((i + AHEAD).min(k - 1) * n + first) as *const i8;
                    for (v, acc) in acc.iter_mut().enumerate() {
                        if v % 2 == 0 {
                            _mm_prefetch::<_MM_HINT_T0>(ahead.add(32 * v));
                        }
                        *acc = _mm256_fmadd_ps(xi, _mm256_loadu_ps(row.add(8 * v)), *acc);
                    }
                }
            }
            for (v, acc) in acc.iter().enumerate() {
                // SAFETY: `out` holds 128 values.
                unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(8 * v), *acc) };
            }
        }

        /// `out[r] = x · w[r]` for the 4 rows of `w` (each `x.len()` long).
        ///
        /// # Safety
        /// `simd` (AVX2 + FMA, or AVX-512 F) must be available; `w` holds 4 rows; `out` 4 values.
        pub(super) unsafe fn columns4(x: &[f32], w: &[f32], out: &mut [f32], simd: Simd) {
            // SAFETY: forwarded.
            unsafe {
                if simd == Simd::Avx512 {
                    columns4_512(x, w, out)
                } else {
                    columns4_avx2(x, w, out)
                }
            }
        }

        #[target_feature(enable = "avx512f")]
        unsafe fn columns4_512(x: &[f32], w: &[f32], out: &mut [f32]) {
            let k = x.len();
            assert!(w.len() >= 4 * k && out.len() >= 4);
            let (xp, wp) = (x.as_ptr(), w.as_ptr());
            let mut acc = [_mm512_setzero_ps(); 4];
            let mut i = 0;
            while i + 16 <= k {
                // SAFETY: `i + 16 <= k`: 16 values of `x` and of each row.
                unsafe {
                    let xv = _mm512_loadu_ps(xp.add(i));
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let p = wp.add(r * k + i);
                        _mm_prefetch::<_MM_HINT_T0>((p as *const i8).wrapping_add(1024));
                        *acc = _mm512_fmadd_ps(xv, _mm512_loadu_ps(p), *acc);
                    }
                }
                i += 16;
            }
            for (r, acc) in acc.iter().enumerate() {
                let tail: f32 = (i..k).map(|j| x[j] * w[r * k + j]).sum();
                out[r] = _mm512_reduce_add_ps(*acc) + tail;
            }
        }

        #[target_feature(enable = "avx2,fma")]
        unsafe fn columns4_avx2(x: &[f32], w: &[f32], out: &mut [f32]) {
            let k = x.len();
            assert!(w.len() >= 4 * k && out.len() >= 4);
            let (xp, wp) = (x.as_ptr(), w.as_ptr());
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut i = 0;
            while i + 8 <= k {
                // SAFETY: `i + 8 <= k`: 8 values of `x` and of each row.
                unsafe {
                    let xv = _mm256_loadu_ps(xp.add(i));
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let p = wp.add(r * k + i);
                        _mm_prefetch::<_MM_HINT_T0>((p as *const i8).wrapping_add(1024));
                        *acc = _mm256_fmadd_ps(xv, _mm256_loadu_ps(p), *acc);
                    }
                }
                i += 8;
            }
            for (r, acc) in acc.iter().enumerate() {
                let tail: f32 = (i..k).map(|j| x[j] * w[r * k + j]).sum();
                out[r] = crate::packed::simd::sum(*acc) + tail;
            }
        }
    }
}
