//! Fused inference kernels on flex's CPU tensors: attention over whole sequences, the GELU
//! activations and the products of many rows by a weight.
//!
//! Burn 0.21's flex computes a prompt's (or the vision tower's) attention one head after the
//! other on one thread, with a scalar `exp` per score, and copies the heads' strided views into
//! contiguous buffers around it; its GELU calls a scalar `erf` per value. At KOSMOS-2's sizes those
//! took about half of a medium-size forward pass (`perf`, the benchmark chapter). The kernels here
//! compute the same functions in one pass each, on rayon's pool, with AVX-512:
//!
//! - [`attention`]: `softmax(q kᵀ / √d, masked) v` for `q: [b, h, t, d]`, `k, v: [b, h, s, d]`
//!   read in place from the projections' token-major buffers (any strides with `d` contiguous),
//!   one task per (batch, head, block of 64 queries); the products run on a register-tiled
//!   kernel (14 query rows x 32 keys or value columns), the softmax with a vectorised `exp`; the
//!   output is written token-major (`[b, t, h, d]`), so merging the heads back costs no copy.
//!   Masked scores get no weight; a query whose keys are all masked gets a zero row (as Burn's
//!   fused operator does; such rows are left padding, never read).
//! - [`gelu`] (`x Φ(x)` with the error function) and [`quick_gelu`] (`x σ(1.702 x)`).
//! - [`matmul`]: `x w + b` for many rows (a prompt's or the vision tower's `Linear` layers, the
//!   tied head over every position): the weight packed into strips of 32 columns a block at a
//!   time, each strip multiplied by every row while it is in L1, on the same register tile.
//!
//! `exp` is a Cody-Waite range reduction (`x = n ln 2 + r`, `|r| <= ln 2 / 2`) with the degree-7
//! Taylor polynomial of `e^r` (truncation error below 6e-9 relative) scaled by `2^n`; `erfc` is
//! the Chebyshev-fitted form `t exp(-z² + P(t))`, `t = 1 / (1 + z / 2)`, of Press et al.,
//! *Numerical Recipes*, §6.2 (fractional error below 1.2e-7 everywhere; see NOTICES), which keeps
//! GELU's small negative values accurate relative to their size. The functions therefore agree
//! with the reference's f32 results to a few units in the last place (tests in
//! `kosmos-core/tests/all/fused.rs` against f64 evaluations and against the explicit path).
//!
//! Each function returns `None` when the tensors are not flex's (another backend, or autodiff:
//! training keeps Burn's differentiable operations), not f32, or the processor lacks AVX-512,
//! or `KOSMOS_FUSED=0` is set in the environment (for comparisons); callers then use Burn's
//! operations. Model code calls them whatever the backend.

use burn::prelude::*;
use burn::tensor::Bool;
#[cfg(all(feature = "flex", target_arch = "x86_64"))]
use burn::tensor::DType;

#[cfg(all(feature = "flex", target_arch = "x86_64"))]
use crate::packed::Simd;

/// Whether the kernels may run here: AVX-512 F, and `KOSMOS_FUSED` not set to `0`.
#[cfg(all(feature = "flex", target_arch = "x86_64"))]
fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| Simd::detected() == Simd::Avx512 && std::env::var("KOSMOS_FUSED").map_or(true, |v| v != "0"))
}

/// `softmax(q kᵀ / √d, masked) v` with `q: [b, h, t, d]`, `k, v: [b, h, s, d]`, `mask`
/// broadcastable to `[b, 1, t, s]` (`true` = masked); `None` when the kernel does not apply.
pub fn attention<B: Backend>(
    q: &Tensor<B, 4>,
    k: &Tensor<B, 4>,
    v: &Tensor<B, 4>,
    mask: Option<&Tensor<B, 4, Bool>>,
) -> Option<Tensor<B, 4>> {
    #[cfg(all(feature = "flex", target_arch = "x86_64"))]
    {
        if !enabled() {
            return None;
        }
        flex_attention::run(q, k, v, mask)
    }
    #[cfg(not(all(feature = "flex", target_arch = "x86_64")))]
    {
        let _ = (q, k, v, mask);
        None
    }
}

/// Most queries [`cached_attention`] takes (decode steps have one per sequence; a longer
/// extension of a cache goes to Burn's operations).
pub const CACHED_MAX_QUERIES: usize = 4;

/// Attention of a few new queries over a KV cache held in segments: `q: [b, h, t, d]` with
/// `t <= CACHED_MAX_QUERIES`, `segments` the cache's segments in sequence order, keys and values
/// each `[b, h, len_i, d]` (any strides with `d` contiguous: the cache's token-major buffers are
/// read in place, no concatenation), `mask` broadcastable to `[b, 1, t, sum len_i]` (`true` =
/// masked). Returns `[b, h, t, d]`; `None` when the kernel does not apply.
///
/// One task per (batch, head): each query's scores are dot products with the keys, the softmax
/// as [`attention`]'s, then the weighted sum of the values, all on AVX-512. Burn's path (a product
/// per segment, a concatenation, a softmax and a product per segment again, through the gemm
/// crate for `[1, d] x [d, len]` shapes) took 2-3 % of a full-size decode step.
pub fn cached_attention<B: Backend>(
    q: &Tensor<B, 4>,
    segments: &[crate::attention::KvSegmentView<B>],
    mask: Option<&Tensor<B, 4, Bool>>,
) -> Option<Tensor<B, 4>> {
    #[cfg(all(feature = "flex", target_arch = "x86_64"))]
    {
        if !enabled() {
            return None;
        }
        flex_attention::cached(q, segments, mask)
    }
    #[cfg(not(all(feature = "flex", target_arch = "x86_64")))]
    {
        let _ = (q, segments, mask);
        None
    }
}

/// `x @ w (+ bias)` for `x: [m, k]` and `w: [k, n]` on flex f32 tensors, with `w` stored row by
/// row (a `Linear`'s `[in, out]` weight, rows any distance apart) or the transposed view of a
/// row-major `[n, k]` matrix (a tied LM head, `embed_tokensᵀ`); `bias: [n]`. `None` when the
/// kernel does not apply (another layout, backend or dtype, autodiff, no AVX-512).
///
/// Burn 0.21's flex hands many-row products to the gemm crate, which repacks the whole weight on
/// every call (the head's 133 MB at medium size, 533 MB at full size) before multiplying. Here
/// the weight is packed 256 values of `k` at a time into strips of 32 output columns: a
/// `Linear`'s in blocks of up to 8 strips (each row's 256 columns read together), the transposed
/// view one strip at a time with in-register 16 x 16 transposes and the next strip prefetched;
/// each strip is multiplied by every row of `x` (packed once into 14-row panels) while it is in
/// L1, on a 14 x 32 register tile; the bias is the sums' starting value. Each output sums in the
/// same order whatever the threads.
pub fn matmul<B: Backend>(x: &Tensor<B, 2>, w: &Tensor<B, 2>, bias: Option<&Tensor<B, 1>>) -> Option<Tensor<B, 2>> {
    #[cfg(all(feature = "flex", target_arch = "x86_64"))]
    {
        if !enabled() {
            return None;
        }
        flex_matmul::run(x, w, bias)
    }
    #[cfg(not(all(feature = "flex", target_arch = "x86_64")))]
    {
        let _ = (x, w, bias);
        None
    }
}

/// Exact GELU, `x Φ(x)`, on flex f32 tensors; `None` when the kernel does not apply.
pub fn gelu<B: Backend, const D: usize>(x: &Tensor<B, D>) -> Option<Tensor<B, D>> {
    elementwise(x, Unary::Gelu)
}

/// `x σ(1.702 x)` (CLIP's `quick_gelu`) on flex f32 tensors; `None` when the kernel does not apply.
pub fn quick_gelu<B: Backend, const D: usize>(x: &Tensor<B, D>) -> Option<Tensor<B, D>> {
    elementwise(x, Unary::QuickGelu)
}

#[derive(Clone, Copy)]
enum Unary {
    Gelu,
    QuickGelu,
}

fn elementwise<B: Backend, const D: usize>(x: &Tensor<B, D>, op: Unary) -> Option<Tensor<B, D>> {
    #[cfg(all(feature = "flex", target_arch = "x86_64"))]
    {
        if !enabled() || x.dtype() != DType::F32 {
            return None;
        }
        let flex = crate::packed::flex_io::contiguous(x)?;
        let input = flex.as_slice::<f32>()?;
        let mut out = vec![0f32; input.len()];
        const CHUNK: usize = 1 << 14;
        use rayon::prelude::*;
        out.par_chunks_mut(CHUNK)
            .zip(input.par_chunks(CHUNK))
            .for_each(|(out, input)| {
                // SAFETY: AVX-512 F was detected; `out` and `input` have the same length.
                unsafe { avx512::unary(op, input, out) }
            });
        crate::packed::flex_io::tensor_nd::<B, D>(out, x.dims())
    }
    #[cfg(not(all(feature = "flex", target_arch = "x86_64")))]
    {
        let _ = (x, op);
        None
    }
}

/// The output's address, shared by the tasks of one kernel call.
#[cfg(all(feature = "flex", target_arch = "x86_64"))]
struct Out(*mut f32);
// SAFETY: every kernel's tasks write disjoint parts of the output (attention: their own (batch,
// query, head) rows; the head product: their own column strips) and the call waits for them.
#[cfg(all(feature = "flex", target_arch = "x86_64"))]
unsafe impl Send for Out {}
#[cfg(all(feature = "flex", target_arch = "x86_64"))]
unsafe impl Sync for Out {}

/// An output buffer the kernels fill completely (no zeroing pass over memory they overwrite).
#[cfg(all(feature = "flex", target_arch = "x86_64"))]
struct Uninit(Vec<std::mem::MaybeUninit<f32>>);

#[cfg(all(feature = "flex", target_arch = "x86_64"))]
impl Uninit {
    fn new(len: usize) -> Self {
        let mut v = Vec::with_capacity(len);
        // SAFETY: `MaybeUninit` values need no initialisation.
        unsafe { v.set_len(len) };
        Uninit(v)
    }

    fn as_mut_ptr(&mut self) -> *mut f32 {
        self.0.as_mut_ptr().cast()
    }

    /// # Safety
    /// Every value must have been written.
    unsafe fn assume_init(self) -> Vec<f32> {
        let mut v = std::mem::ManuallyDrop::new(self.0);
        let (ptr, len, cap) = (v.as_mut_ptr().cast::<f32>(), v.len(), v.capacity());
        // SAFETY: same allocation, layout and length; every value initialised (the caller).
        unsafe { Vec::from_raw_parts(ptr, len, cap) }
    }
}

/// The vectorised functions (AVX-512 F).
#[cfg(all(feature = "flex", target_arch = "x86_64"))]
mod avx512 {
    use std::arch::x86_64::*;

    use super::Unary;

    /// `e^x` for every lane (`x` clamped to [-104, 89]: 0 below, infinity above 88.73).
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub(super) fn exp(x: __m512) -> __m512 {
        const LOG2_E: f32 = std::f32::consts::LOG2_E;
        // ln 2 split so that `n * LN2_HI` is exact for |n| < 2^11.
        const LN2_HI: f32 = 0.693_145_75;
        const LN2_LO: f32 = 1.428_606_8e-6;
        let x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(89.0)), _mm512_set1_ps(-104.0));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
            x,
            _mm512_set1_ps(LOG2_E),
        ));
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
        // e^r = sum r^i / i!, i = 0..=7 (Horner).
        let mut p = _mm512_set1_ps(1.0 / 5040.0);
        for c in [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        _mm512_scalef_ps(p, n)
    }

    /// `Φ(x) = erfc(-x / √2) / 2` for every lane.
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn normal_cdf(x: __m512) -> __m512 {
        // Numerical Recipes' erfcc coefficients (P(t), highest degree first).
        const P: [f32; 10] = [
            0.170_872_77,
            -0.822_152_23,
            1.488_515_87,
            -1.135_203_98,
            0.278_868_07,
            -0.186_288_06,
            0.096_784_18,
            0.374_091_96,
            1.000_023_68,
            -1.265_512_23,
        ];
        let z = _mm512_abs_ps(_mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::FRAC_1_SQRT_2)));
        let one = _mm512_set1_ps(1.0);
        let t = _mm512_div_ps(one, _mm512_fmadd_ps(z, _mm512_set1_ps(0.5), one));
        let mut p = _mm512_set1_ps(P[0]);
        for &c in &P[1..] {
            p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(c));
        }
        // erfc(z) = t exp(-z² + P(t)), z >= 0, with z² = x² / 2 taken exactly as hi + lo (an
        // FMA) and split over two exponentials: in the tail (z² up to ~100) one rounded exponent
        // would cost up to 1e-5 relative.
        let x2_hi = _mm512_mul_ps(x, x);
        let x2_lo = _mm512_fmsub_ps(x, x, x2_hi);
        let half = _mm512_set1_ps(0.5);
        let big = exp(_mm512_mul_ps(x2_hi, _mm512_set1_ps(-0.5)));
        let small = exp(_mm512_fnmadd_ps(x2_lo, half, p));
        let erfc = _mm512_mul_ps(t, _mm512_mul_ps(big, small));
        let tail = _mm512_mul_ps(erfc, half);
        // x >= 0: 1 - erfc(|x|/√2)/2; x < 0: erfc(|x|/√2)/2
        let negative = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, _mm512_setzero_ps());
        _mm512_mask_blend_ps(negative, _mm512_sub_ps(one, tail), tail)
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    fn apply(op: Unary, x: __m512) -> __m512 {
        match op {
            Unary::Gelu => _mm512_mul_ps(x, normal_cdf(x)),
            Unary::QuickGelu => {
                let e = exp(_mm512_mul_ps(x, _mm512_set1_ps(-1.702)));
                _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0), e))
            }
        }
    }

    /// `out[i] = op(input[i])`.
    ///
    /// # Safety
    /// AVX-512 F must be available; `out.len() == input.len()`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn unary(op: Unary, input: &[f32], out: &mut [f32]) {
        assert_eq!(input.len(), out.len());
        let n = input.len();
        let (ip, op_) = (input.as_ptr(), out.as_mut_ptr());
        let mut i = 0;
        while i < n {
            let left = n - i;
            let mask: __mmask16 = if left >= 16 { 0xffff } else { (1u16 << left) - 1 };
            // SAFETY: lanes `i..i + 16` under `mask` lie within both slices.
            unsafe {
                let x = _mm512_maskz_loadu_ps(mask, ip.add(i));
                _mm512_mask_storeu_ps(op_.add(i), mask, apply(op, x));
            }
            i += 16;
        }
    }

    /// Lanes `j..j + 16` that are below `len` and not masked.
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn keep_mask(j: usize, len: usize, masked: Option<&[u8]>) -> __mmask16 {
        let valid: __mmask16 = if len >= j + 16 {
            0xffff
        } else if len > j {
            (1u16 << (len - j)) - 1
        } else {
            0
        };
        match masked {
            Some(m) if valid != 0 => {
                let mut bytes = [0u8; 16];
                let end = len.min(j + 16);
                bytes[..end - j].copy_from_slice(&m[j..end]);
                // SAFETY: `bytes` holds 16 bytes.
                let b = unsafe { _mm_loadu_si128(bytes.as_ptr() as *const __m128i) };
                let wide = _mm512_cvtepu8_epi32(b);
                valid & !_mm512_test_epi32_mask(wide, wide)
            }
            _ => valid,
        }
    }

    /// `sum_p a[p] b[p]` over `d` values.
    ///
    /// # Safety
    /// AVX-512 F must be available; `a` and `b` hold `d` values.
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub(super) unsafe fn dot(a: *const f32, b: *const f32, d: usize) -> f32 {
        let mut acc = _mm512_setzero_ps();
        let mut p = 0;
        while p < d {
            let m: __mmask16 = if d - p >= 16 { 0xffff } else { (1u16 << (d - p)) - 1 };
            // SAFETY: lanes `p..p + 16` under the mask lie below `d`.
            unsafe {
                acc = _mm512_fmadd_ps(
                    _mm512_maskz_loadu_ps(m, a.add(p)),
                    _mm512_maskz_loadu_ps(m, b.add(p)),
                    acc,
                )
            };
            p += 16;
        }
        _mm512_reduce_add_ps(acc)
    }

    /// `y[p] += alpha x[p]` over `d` values.
    ///
    /// # Safety
    /// AVX-512 F must be available; `x` and `y` hold `d` values.
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub(super) unsafe fn axpy(alpha: f32, x: *const f32, y: *mut f32, d: usize) {
        let a = _mm512_set1_ps(alpha);
        let mut p = 0;
        while p < d {
            let m: __mmask16 = if d - p >= 16 { 0xffff } else { (1u16 << (d - p)) - 1 };
            // SAFETY: lanes `p..p + 16` under the mask lie below `d`.
            unsafe {
                let v = _mm512_fmadd_ps(
                    a,
                    _mm512_maskz_loadu_ps(m, x.add(p)),
                    _mm512_maskz_loadu_ps(m, y.add(p)),
                );
                _mm512_mask_storeu_ps(y.add(p), m, v);
            }
            p += 16;
        }
    }

    /// Softmax of one row of scores in place: `row[j] = exp(scale row[j] - max) / sum` over the
    /// unmasked `j < len` (`masked[j] != 0` or `j >= len`: 0). Returns false (row zeroed) when
    /// every key is masked.
    ///
    /// # Safety
    /// AVX-512 F must be available; `row.len()` is a multiple of 16, `masked.len() >= len`,
    /// `len <= row.len()`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn softmax_row(row: &mut [f32], len: usize, masked: Option<&[u8]>, scale: f32) -> bool {
        let n = row.len();
        debug_assert!(n % 16 == 0 && len <= n);
        let rp = row.as_mut_ptr();
        let keep = |j: usize| keep_mask(j, len, masked);
        let scale_v = _mm512_set1_ps(scale);
        let mut max = _mm512_set1_ps(f32::NEG_INFINITY);
        let mut any = false;
        let mut j = 0;
        while j < n {
            let k = keep(j);
            any |= k != 0;
            // SAFETY: `j + 16 <= n`.
            unsafe {
                let s = _mm512_mul_ps(_mm512_loadu_ps(rp.add(j)), scale_v);
                let s = _mm512_mask_mov_ps(_mm512_set1_ps(f32::NEG_INFINITY), k, s);
                _mm512_storeu_ps(rp.add(j), s);
                max = _mm512_max_ps(max, s);
            }
            j += 16;
        }
        if !any {
            row.fill(0.0);
            return false;
        }
        let max = _mm512_set1_ps(_mm512_reduce_max_ps(max));
        let mut sum = _mm512_setzero_ps();
        let mut j = 0;
        while j < n {
            let k = keep(j);
            // SAFETY: `j + 16 <= n`.
            unsafe {
                let e = _mm512_maskz_mov_ps(k, exp(_mm512_sub_ps(_mm512_loadu_ps(rp.add(j)), max)));
                _mm512_storeu_ps(rp.add(j), e);
                sum = _mm512_add_ps(sum, e);
            }
            j += 16;
        }
        let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(sum));
        let mut j = 0;
        while j < n {
            // SAFETY: `j + 16 <= n`.
            unsafe { _mm512_storeu_ps(rp.add(j), _mm512_mul_ps(_mm512_loadu_ps(rp.add(j)), inv)) };
            j += 16;
        }
        true
    }

    /// Columns of the register tile.
    pub(super) const NR: usize = 32;
    /// Most rows of the register tile.
    pub(super) const MR: usize = 14;

    /// How a tile reads its `a` operand.
    #[derive(Clone, Copy)]
    pub(super) enum ARows {
        /// Row `r` at `a + r * lda`, contiguous in `p`.
        Strided(usize),
        /// A packed panel: `a[p * MR + r]`.
        Panel,
    }

    /// What a tile's sums start from.
    #[derive(Clone, Copy)]
    pub(super) enum Start {
        /// Zero.
        Zero,
        /// Rows of earlier sums at `from + r * ld` (a later pass over `k`).
        Add(*const f32, usize),
        /// A bias row of 32 values (those under the mask are read), the same for every row.
        Bias(*const f32),
    }

    /// `c[r, 0..32] = start + sum_p a[r, p] b[p, 0..32]` for `r < rows <= MR`: `a` as `a_rows`
    /// says, `b` packed `[kc, 32]`, `c` row `r` at `c + r * ldc`; only the columns in `mask` are
    /// read and stored.
    ///
    /// # Safety
    /// AVX-512 F must be available; the pointers cover those extents.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile(
        rows: usize,
        kc: usize,
        a: *const f32,
        a_rows: ARows,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        mask: u32,
        start: Start,
    ) {
        macro_rules! go {
            ($($r:literal)*) => {
                match (rows, a_rows) {
                    $(
                        ($r, ARows::Strided(lda)) => tile_n::<$r, false>(kc, a, lda, b, c, ldc, mask, start),
                        ($r, ARows::Panel) => tile_n::<$r, true>(kc, a, MR, b, c, ldc, mask, start),
                    )*
                    _ => unreachable!("tile rows 1..=14"),
                }
            };
        }
        // SAFETY: forwarded.
        unsafe { go!(1 2 3 4 5 6 7 8 9 10 11 12 13 14) }
    }

    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn tile_n<const R: usize, const PANEL: bool>(
        kc: usize,
        a: *const f32,
        lda: usize,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        mask: u32,
        start: Start,
    ) {
        let (m0, m1) = (mask as u16, (mask >> 16) as u16);
        let (b0, b1) = match start {
            // SAFETY: the bias row covers the columns under the mask.
            Start::Bias(bias) => unsafe { (_mm512_maskz_loadu_ps(m0, bias), _mm512_maskz_loadu_ps(m1, bias.add(16))) },
            Start::Zero | Start::Add(..) => (_mm512_setzero_ps(), _mm512_setzero_ps()),
        };
        let mut lo = [b0; R];
        let mut hi = [b1; R];
        for p in 0..kc {
            // SAFETY: `p < kc`: row `p` of the packed `b`, column `p` of `a`'s rows.
            unsafe {
                let b0 = _mm512_loadu_ps(b.add(p * NR));
                let b1 = _mm512_loadu_ps(b.add(p * NR + 16));
                for r in 0..R {
                    let at = if PANEL { p * MR + r } else { r * lda + p };
                    let x = _mm512_set1_ps(*a.add(at));
                    lo[r] = _mm512_fmadd_ps(x, b0, lo[r]);
                    hi[r] = _mm512_fmadd_ps(x, b1, hi[r]);
                }
            }
        }
        for r in 0..R {
            // SAFETY: row `r < rows` of `c`, the columns under the mask.
            unsafe {
                let row = c.add(r * ldc);
                let (mut v0, mut v1) = (lo[r], hi[r]);
                if let Start::Add(from, ld) = start {
                    let from = from.add(r * ld);
                    v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, from));
                    v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, from.add(16)));
                }
                _mm512_mask_storeu_ps(row, m0, v0);
                _mm512_mask_storeu_ps(row.add(16), m1, v1);
            }
        }
    }

    /// Rows `j..j + nr` (`nr <= 32`), columns `p0..p0 + kc` of the row-major matrix `e` (rows
    /// `ld` apart: the `[n, k]` matrix whose transposed view is the product's weight), transposed
    /// into `buf[p][32]` (zeros past `nr`), sixteen rows at a time with in-register 16 x 16
    /// transposes.
    ///
    /// # Safety
    /// AVX-512 F must be available; the rows and columns lie within `e`; `buf` holds `kc * 32`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn pack_transposed(
        e: &[f32],
        ld: usize,
        j: usize,
        nr: usize,
        p0: usize,
        kc: usize,
        buf: &mut [f32],
    ) {
        assert!(nr <= NR && buf.len() >= kc * NR && (j + nr - 1) * ld + p0 + kc <= e.len());
        let (ep, out) = (e.as_ptr(), buf.as_mut_ptr());
        let mut p = 0;
        while p < kc {
            let w = 16.min(kc - p);
            let lanes: __mmask16 = if w == 16 { 0xffff } else { (1u16 << w) - 1 };
            for half in 0..2 {
                let mut rows = [_mm512_setzero_ps(); 16];
                for (i, row) in rows.iter_mut().enumerate() {
                    if half * 16 + i < nr {
                        let at = (j + half * 16 + i) * ld + p0 + p;
                        // SAFETY: row `j + half * 16 + i < j + nr`, columns `p0 + p..+ w`.
                        *row = unsafe { _mm512_maskz_loadu_ps(lanes, ep.add(at)) };
                        // The next strip's row (same columns) into L2 while this one is
                        // multiplied: a hint, never dereferenced.
                        _mm_prefetch::<_MM_HINT_T1>(ep.wrapping_add(at + NR * ld) as *const i8);
                    }
                }
                let cols = transpose16(rows);
                for (q, col) in cols.iter().enumerate().take(w) {
                    // SAFETY: `p + q < kc`: within `buf`.
                    unsafe { _mm512_storeu_ps(out.add((p + q) * NR + half * 16), *col) };
                }
            }
            p += 16;
        }
    }

    /// Columns `j..j + cols`, rows `p0..p0 + kc` of the row-major `[k, n]` matrix `w` (rows `ld`
    /// apart: a `Linear`'s weight) copied into `buf` as strips of 32 columns, strip `s` at
    /// `s * kc * 32`, `[p][32]` within it (zeros past `cols`). Each row's columns are read as
    /// one contiguous run (rows `ld` apart are often a multiple of 4 KiB apart, so reading a
    /// 32-column strip down the rows would land every row in the same few cache sets); rows a
    /// few ahead are prefetched.
    ///
    /// # Safety
    /// AVX-512 F must be available; the rows and columns lie within `w`; `buf` holds
    /// `cols.div_ceil(32) * kc * 32`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn pack_rows(w: &[f32], ld: usize, j: usize, cols: usize, p0: usize, kc: usize, buf: &mut [f32]) {
        const AHEAD: usize = 4;
        let strips = cols.div_ceil(NR);
        assert!(buf.len() >= strips * kc * NR && (p0 + kc - 1) * ld + j + cols <= w.len());
        let (wp, out) = (w.as_ptr(), buf.as_mut_ptr());
        for p in 0..kc {
            let at = (p0 + p) * ld + j;
            let ahead = (p0 + p + AHEAD) * ld + j;
            for s in 0..strips {
                let nr = NR.min(cols - s * NR);
                let mask = if nr == NR { u32::MAX } else { (1u32 << nr) - 1 };
                let (m0, m1) = (mask as u16, (mask >> 16) as u16);
                // SAFETY: row `p0 + p`, columns `j + 32 s..+ nr` (the masks), within `w`; row `p`
                // of strip `s` within `buf`.
                unsafe {
                    let lo = _mm512_maskz_loadu_ps(m0, wp.add(at + s * NR));
                    let hi = _mm512_maskz_loadu_ps(m1, wp.add(at + s * NR + 16));
                    // A row a few ahead into L1: a hint, never dereferenced.
                    _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add(ahead + s * NR) as *const i8);
                    _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add(ahead + s * NR + 16) as *const i8);
                    _mm512_storeu_ps(out.add(s * kc * NR + p * NR), lo);
                    _mm512_storeu_ps(out.add(s * kc * NR + p * NR + 16), hi);
                }
            }
        }
    }

    /// The 16 x 16 transpose of `r` (row `i` in `r[i]`): the result's vector `c` is column `c`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn transpose16(r: [__m512; 16]) -> [__m512; 16] {
        // 1: interleave pairs of rows (32-bit), 2: pairs of pairs (64-bit); each 128-bit lane L
        // of u[4g + x] then holds column 4L + x of rows 4g..4g + 4.
        let mut t = [_mm512_setzero_ps(); 16];
        for i in 0..8 {
            t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
        }
        let mut u = [_mm512_setzero_ps(); 16];
        for g in 0..4 {
            let a0 = _mm512_castps_pd(t[4 * g]);
            let a1 = _mm512_castps_pd(t[4 * g + 1]);
            let b0 = _mm512_castps_pd(t[4 * g + 2]);
            let b1 = _mm512_castps_pd(t[4 * g + 3]);
            u[4 * g] = _mm512_castpd_ps(_mm512_unpacklo_pd(a0, b0));
            u[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a0, b0));
            u[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(a1, b1));
            u[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(a1, b1));
        }
        // 3: gather lane L of the four row groups into column 4L + x.
        let mut out = [_mm512_setzero_ps(); 16];
        for x in 0..4 {
            let even = _mm512_shuffle_f32x4::<0x88>(u[x], u[4 + x]);
            let odd = _mm512_shuffle_f32x4::<0xDD>(u[x], u[4 + x]);
            let even2 = _mm512_shuffle_f32x4::<0x88>(u[8 + x], u[12 + x]);
            let odd2 = _mm512_shuffle_f32x4::<0xDD>(u[8 + x], u[12 + x]);
            out[x] = _mm512_shuffle_f32x4::<0x88>(even, even2);
            out[8 + x] = _mm512_shuffle_f32x4::<0xDD>(even, even2);
            out[4 + x] = _mm512_shuffle_f32x4::<0x88>(odd, odd2);
            out[12 + x] = _mm512_shuffle_f32x4::<0xDD>(odd, odd2);
        }
        out
    }
}

/// The attention kernel on flex tensors.
#[cfg(all(feature = "flex", target_arch = "x86_64"))]
mod flex_attention {
    use burn::prelude::*;
    use burn::tensor::{Bool, DType, TensorPrimitive};
    use burn_flex::FlexTensor;
    use rayon::prelude::*;

    use super::avx512::{self, ARows, MR, NR};
    use super::{Out, Uninit};
    use crate::packed::flex_io::{self, flex};

    /// Queries per task.
    const QUERY_BLOCK: usize = 64;

    /// A float tensor's flex storage, start offset and strides, with `d` contiguous.
    struct View {
        tensor: FlexTensor,
        start: usize,
        strides: [usize; 4],
    }

    impl View {
        fn of<B: Backend>(t: &Tensor<B, 4>) -> Option<View> {
            if t.dtype() != DType::F32 {
                return None;
            }
            let tensor = match t.clone().into_primitive() {
                TensorPrimitive::Float(p) => flex(&p)?.clone(),
                TensorPrimitive::QFloat(_) => return None,
            };
            let layout = tensor.layout();
            let s = layout.strides();
            if s.len() != 4 || s[3] != 1 || s.iter().any(|&x| x < 0) {
                return None;
            }
            let strides = [s[0] as usize, s[1] as usize, s[2] as usize, 1];
            let start = layout.start_offset();
            Some(View { tensor, start, strides })
        }

        fn data(&self) -> &[f32] {
            self.tensor.storage::<f32>()
        }

        fn offset(&self, b: usize, h: usize, i: usize) -> usize {
            self.start + b * self.strides[0] + h * self.strides[1] + i * self.strides[2]
        }
    }

    /// The mask (broadcastable to `[b, 1, t, s]`) as contiguous bytes with the strides of its
    /// batch and query dims (0 where broadcast); `Some(None)` without a mask, `None` when its
    /// shape does not fit or it is not flex's.
    fn mask_bytes<B: Backend>(
        mask: Option<&Tensor<B, 4, Bool>>,
        b: usize,
        t: usize,
        s: usize,
    ) -> Option<Option<(FlexTensor, [usize; 2])>> {
        let Some(m) = mask else { return Some(None) };
        let [mb, mh, mt, ms] = m.dims();
        if (mb != b && mb != 1) || mh != 1 || (mt != t && mt != 1) || ms != s {
            return None;
        }
        let m = flex(&m.clone().into_primitive())?.to_contiguous();
        let strides = [if mb == 1 { 0 } else { mt * ms }, if mt == 1 { 0 } else { ms }];
        Some(Some((m, strides)))
    }

    pub(super) fn run<B: Backend>(
        q: &Tensor<B, 4>,
        k: &Tensor<B, 4>,
        v: &Tensor<B, 4>,
        mask: Option<&Tensor<B, 4, Bool>>,
    ) -> Option<Tensor<B, 4>> {
        let [b, h, t, d] = q.dims();
        let [kb, kh, s, kd] = k.dims();
        if [kb, kh, kd] != [b, h, d] || v.dims() != [b, h, s, d] || s == 0 || t == 0 || d == 0 {
            return None;
        }
        let (qv, kv, vv) = (View::of(q)?, View::of(k)?, View::of(v)?);
        let mask = mask_bytes(mask, b, t, s)?;
        let mask_bytes: Option<(&[u8], [usize; 2])> = mask.as_ref().map(|(m, st)| (m.bytes(), *st));

        let s_pad = s.div_ceil(NR) * NR;
        let d_strips = d.div_ceil(NR);
        let scale = 1.0 / (d as f32).sqrt();
        // Every value is written below (each task its rows, every head column under the masks).
        let mut out = Uninit::new(b * t * h * d);
        let out_ptr = Out(out.as_mut_ptr());
        let out_ptr = &out_ptr;
        let blocks = t.div_ceil(QUERY_BLOCK);
        let (qd, kd_, vd) = (qv.data(), kv.data(), vv.data());

        (0..b * h * blocks).into_par_iter().for_each(|task| {
            let (bh, blk) = (task / blocks, task % blocks);
            let (bi, hi) = (bh / h, bh % h);
            let i0 = blk * QUERY_BLOCK;
            let rows = QUERY_BLOCK.min(t - i0);
            // Keys transposed in strips of 32: kt[strip][p][32].
            let mut kt = vec![0f32; s_pad * d];
            for j in 0..s {
                let key = &kd_[kv.offset(bi, hi, j)..kv.offset(bi, hi, j) + d];
                let (strip, col) = (j / NR, j % NR);
                for (p, &x) in key.iter().enumerate() {
                    kt[strip * d * NR + p * NR + col] = x;
                }
            }
            // Values in strips of 32 columns: vs[strip][j][32] (zero past s and d).
            let mut vs = vec![0f32; d_strips * s_pad * NR];
            for j in 0..s {
                let value = &vd[vv.offset(bi, hi, j)..vv.offset(bi, hi, j) + d];
                for (strip, chunk) in value.chunks(NR).enumerate() {
                    let at = strip * s_pad * NR + j * NR;
                    vs[at..at + chunk.len()].copy_from_slice(chunk);
                }
            }
            // The block's queries, contiguous (token-major rows sit `h * d` apart, often a
            // multiple of 4 KiB, where 14 rows would compete for the same L1 sets).
            let mut qb = vec![0f32; rows * d];
            for (r, row) in qb.chunks_mut(d).enumerate() {
                let at = qv.offset(bi, hi, i0 + r);
                row.copy_from_slice(&qd[at..at + d]);
            }
            // Score rows `ld` apart (`s_pad`, or a little more where that is a multiple of 4 KiB).
            let ld = if s_pad % 1024 == 0 { s_pad + 16 } else { s_pad };
            let mut scores = vec![0f32; rows * ld];
            // SAFETY: AVX-512 F was detected by the caller; every tile reads `n` query rows
            // of `d` values, a packed strip of `d x 32` keys and writes rows of `scores`.
            unsafe {
                for strip in 0..s_pad / NR {
                    let mut r = 0;
                    while r < rows {
                        let n = MR.min(rows - r);
                        avx512::tile(
                            n,
                            d,
                            qb.as_ptr().add(r * d),
                            ARows::Strided(d),
                            kt.as_ptr().add(strip * d * NR),
                            scores.as_mut_ptr().add(r * ld + strip * NR),
                            ld,
                            u32::MAX,
                            avx512::Start::Zero,
                        );
                        r += n;
                    }
                }
            }
            for (r, row) in scores.chunks_mut(ld).enumerate() {
                let row = &mut row[..s_pad];
                let masked = mask_bytes.map(|(m, [sb, st])| {
                    let at = bi * sb + (i0 + r) * st;
                    &m[at..at + s]
                });
                // SAFETY: AVX-512 F detected; `row` is `s_pad` (a multiple of 32) long.
                unsafe { avx512::softmax_row(row, s, masked, scale) };
            }
            // out[bi, i, hi, :] = P V, written token-major.
            let ld_out = h * d;
            // SAFETY: as above; the output rows `(bi, i0..i0 + rows, hi)` belong to this task
            // only, and the mask keeps the stores within `d` columns.
            unsafe {
                let base = out_ptr.0.add(bi * t * ld_out + i0 * ld_out + hi * d);
                for strip in 0..d_strips {
                    let cols = NR.min(d - strip * NR);
                    let mask = if cols == NR { u32::MAX } else { (1u32 << cols) - 1 };
                    let mut r = 0;
                    while r < rows {
                        let n = MR.min(rows - r);
                        avx512::tile(
                            n,
                            s_pad,
                            scores.as_ptr().add(r * ld),
                            ARows::Strided(ld),
                            vs.as_ptr().add(strip * s_pad * NR),
                            base.add(r * ld_out + strip * NR),
                            ld_out,
                            mask,
                            avx512::Start::Zero,
                        );
                        r += n;
                    }
                }
            }
        });
        // [b, t, h, d] -> the [b, h, t, d] view.
        // SAFETY: the tasks wrote every value (above).
        let out = unsafe { out.assume_init() };
        Some(flex_io::tensor_nd::<B, 4>(out, [b, t, h, d])?.swap_dims(1, 2))
    }

    /// [`super::cached_attention`] on flex tensors.
    pub(super) fn cached<B: Backend>(
        q: &Tensor<B, 4>,
        segments: &[crate::attention::KvSegmentView<B>],
        mask: Option<&Tensor<B, 4, Bool>>,
    ) -> Option<Tensor<B, 4>> {
        let [b, h, t, d] = q.dims();
        if t == 0 || t > super::CACHED_MAX_QUERIES || d == 0 || segments.is_empty() {
            return None;
        }
        let qv = View::of(q)?;
        let mut views = Vec::with_capacity(segments.len());
        for seg in segments {
            let [kb, kh, len, kd] = seg.keys.dims();
            if [kb, kh, kd] != [b, h, d] || seg.values.dims() != [b, h, len, d] {
                return None;
            }
            views.push((View::of(&seg.keys)?, View::of(&seg.values)?, len));
        }
        let s: usize = views.iter().map(|(_, _, len)| len).sum();
        if s == 0 {
            return None;
        }
        let mask = mask_bytes(mask, b, t, s)?;
        let mask_bytes: Option<(&[u8], [usize; 2])> = mask.as_ref().map(|(m, st)| (m.bytes(), *st));
        let scale = 1.0 / (d as f32).sqrt();
        let s_pad = s.div_ceil(16) * 16;
        let ld_out = h * d;
        // Written whole below: every (batch, query, head) row by its task.
        let mut out = Uninit::new(b * t * ld_out);
        let out_ptr = Out(out.as_mut_ptr());
        let out_ptr = &out_ptr;
        let qd = qv.data();
        (0..b * h).into_par_iter().for_each(|task| {
            let (bi, hi) = (task / h, task % h);
            let mut scores = vec![0f32; s_pad];
            for i in 0..t {
                let query = &qd[qv.offset(bi, hi, i)..qv.offset(bi, hi, i) + d];
                let mut j = 0;
                for (kv, _, len) in &views {
                    let keys = kv.data();
                    for tok in 0..*len {
                        let at = kv.offset(bi, hi, tok);
                        let key = &keys[at..at + d];
                        // SAFETY: AVX-512 F detected by the caller; both slices hold `d` values.
                        scores[j] = unsafe { avx512::dot(query.as_ptr(), key.as_ptr(), d) };
                        j += 1;
                    }
                }
                let masked = mask_bytes.map(|(m, [sb, st])| {
                    let at = bi * sb + i * st;
                    &m[at..at + s]
                });
                scores[s..].fill(0.0);
                // SAFETY: AVX-512 F detected; `scores` is `s_pad` (a multiple of 16) long.
                unsafe { avx512::softmax_row(&mut scores, s, masked, scale) };
                // SAFETY: the row (bi, i, hi) of the output belongs to this task only; it holds
                // `d` values; each value row holds `d` values.
                unsafe {
                    let row = out_ptr.0.add(bi * t * ld_out + i * ld_out + hi * d);
                    std::ptr::write_bytes(row, 0, d);
                    let mut j = 0;
                    for (_, vv, len) in &views {
                        let values = vv.data();
                        for tok in 0..*len {
                            let p = scores[j];
                            j += 1;
                            if p != 0.0 {
                                let at = vv.offset(bi, hi, tok);
                                avx512::axpy(p, values[at..at + d].as_ptr(), row, d);
                            }
                        }
                    }
                }
            }
        });
        // [b, t, h, d] -> the [b, h, t, d] view.
        // SAFETY: the tasks wrote every value (above).
        let out = unsafe { out.assume_init() };
        Some(flex_io::tensor_nd::<B, 4>(out, [b, t, h, d])?.swap_dims(1, 2))
    }
}

/// The many-row product on flex tensors.
#[cfg(all(feature = "flex", target_arch = "x86_64"))]
mod flex_matmul {
    use std::cell::RefCell;
    use std::thread::LocalKey;

    use burn::prelude::*;
    use burn::tensor::{DType, TensorPrimitive};
    use rayon::prelude::*;

    use super::avx512::{self, ARows, MR, NR, Start};
    use super::{Out, Uninit};
    use crate::packed::flex_io::{self, flex};

    /// Depth of one pass (a strip buffer of `KC x 32` values: 32 KiB, in L1).
    const KC: usize = 256;
    /// Most strips of a `Linear`'s weight packed together (8: 256 columns, 1 KiB of each row
    /// read at once; a 256 KiB buffer, in L2).
    const MAX_BLOCK: usize = 8;
    /// Fewest strips packed together where the weight has as many (512 bytes of each row).
    const MIN_BLOCK: usize = 4;
    /// Scratch buffers up to this many values (16 MiB) stay with their thread between calls.
    const SCRATCH_MAX: usize = 1 << 22;

    thread_local! {
        /// `x` in panels (the calling thread).
        static PANELS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
        /// A task's packed strips.
        static STRIPS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
        /// A task's partial sums between passes over `k`.
        static PARTIAL: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
        /// The whole weight packed, when several groups of panels share it (the calling thread).
        static SHARED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    }

    /// `f` on `len` values of this thread's buffer `key` (grown as needed, kept between calls:
    /// no allocation or page faults per product), or on a fresh buffer when it is in use or
    /// `len` is above [`SCRATCH_MAX`]. The values are whatever an earlier call left.
    fn with_scratch<R>(key: &'static LocalKey<RefCell<Vec<f32>>>, len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
        key.with(|cell| match cell.try_borrow_mut() {
            Ok(mut buffer) if len <= SCRATCH_MAX => {
                if buffer.len() < len {
                    buffer.resize(len, 0.0);
                }
                f(&mut buffer[..len])
            }
            _ => f(&mut vec![0f32; len]),
        })
    }

    /// How the weight `[k, n]` lies in its storage.
    #[derive(Clone, Copy)]
    enum Weight {
        /// Row `p` at `p * ld` (a `Linear`'s `[in, out]` weight, or a view of its columns).
        Rows(usize),
        /// Column `j` at `j * ld`: the transposed view of a row-major `[n, k]` matrix (a tied head).
        Transposed(usize),
    }

    pub(super) fn run<B: Backend>(
        x: &Tensor<B, 2>,
        w: &Tensor<B, 2>,
        bias: Option<&Tensor<B, 1>>,
    ) -> Option<Tensor<B, 2>> {
        let [m, k] = x.dims();
        let [wk, n] = w.dims();
        if wk != k || m == 0 || k == 0 || n == 0 || x.dtype() != DType::F32 || w.dtype() != DType::F32 {
            return None;
        }
        let w = match w.clone().into_primitive() {
            TensorPrimitive::Float(p) => p,
            TensorPrimitive::QFloat(_) => return None,
        };
        let wf = flex(&w)?;
        let layout = wf.layout();
        let (weight, extent) = match *layout.strides() {
            [ld, 1] if ld >= n as isize => (Weight::Rows(ld as usize), (k - 1) * ld as usize + n),
            [1, ld] if ld >= k as isize => (Weight::Transposed(ld as usize), (n - 1) * ld as usize + k),
            _ => return None,
        };
        let start = layout.start_offset();
        let ws = wf.storage::<f32>().get(start..start + extent)?;
        let bias = match bias {
            Some(b) if b.dims() == [n] && b.dtype() == DType::F32 => Some(flex_io::contiguous(b)?),
            Some(_) => return None,
            None => None,
        };
        let bias = match &bias {
            Some(b) => Some(b.as_slice::<f32>()?),
            None => None,
        };
        let x = flex_io::contiguous(x)?;
        let xs = x.as_slice::<f32>()?;

        let strips = n.div_ceil(NR);
        let threads = rayon::current_num_threads();
        // Tasks take blocks of strips. A `Linear`'s weight is packed a block at a time (each
        // row's columns of the block read together), then each strip of the block is multiplied
        // by every panel; the transposed view is packed one strip at a time (its strips are 32
        // rows of the `[n, k]` matrix, already contiguous), the next one prefetched.
        // A narrow weight (few blocks for the threads) also splits the rows into groups of
        // panels, each packing the block again (at least 5 panels, 70 rows, per group, over which
        // the packing is spread).
        let panels = m.div_ceil(MR);
        let (block, per_task, groups) = match weight {
            Weight::Rows(_) => {
                let block = strips.div_ceil(threads * 4).clamp(MIN_BLOCK.min(strips), MAX_BLOCK);
                let blocks = strips.div_ceil(block);
                let groups = (threads * 4).div_ceil(blocks).min(panels / 5).max(1);
                (block, 1, groups)
            }
            Weight::Transposed(_) => (1, strips.div_ceil(threads * 8).max(1), 1),
        };
        let plan = Plan {
            m,
            k,
            n,
            panels,
            passes: k.div_ceil(KC),
            block,
            blocks: strips.div_ceil(block),
            per_task,
            groups,
            group: panels.div_ceil(groups),
            weight,
            ws,
            bias,
        };
        // A `Linear` weight whose rows are split into groups is packed once for every group
        // (each group packing its own copy made the packing cost a third of the medium vision
        // tower's `fc2`, [257, 1024] x [1024, 256]).
        let shared = match weight {
            Weight::Rows(_) if groups > 1 => plan.passes * strips * KC * NR,
            _ => 0,
        };
        let out = with_scratch(&PANELS, plan.panels * MR * k, |panels| {
            with_scratch(&SHARED, shared, |packed| plan.run(xs, panels, packed))
        });
        flex_io::tensor::<B>(out, [m, n])
    }

    /// One product's shapes, operands and division into tasks.
    struct Plan<'a> {
        m: usize,
        k: usize,
        n: usize,
        /// Panels of `MR` rows of `x`.
        panels: usize,
        /// Passes of `KC` over `k`.
        passes: usize,
        /// Strips per block.
        block: usize,
        blocks: usize,
        /// Blocks per task.
        per_task: usize,
        /// Groups of panels (tasks per block).
        groups: usize,
        /// Panels per group.
        group: usize,
        weight: Weight,
        /// The weight's storage from its first value.
        ws: &'a [f32],
        bias: Option<&'a [f32]>,
    }

    impl Plan<'_> {
        /// `x @ w (+ bias)`, `[m, n]` row-major; `panels` holds `panels * MR * k` values;
        /// `packed` is empty, or holds `passes * strips * KC * 32` values for the whole weight
        /// packed once (pass `q`'s strip `s` at `(q * strips * KC + s * kc) * 32`).
        fn run(&self, xs: &[f32], panels: &mut [f32], packed: &mut [f32]) -> Vec<f32> {
            let (m, k) = (self.m, self.k);
            // x in panels of MR rows, per pass of KC: pass q at q * panels * MR * KC, panel i at
            // + i * MR * kc, value [p * MR + r] (rows past m are never read).
            panels
                .par_chunks_mut(self.panels * MR * KC)
                .enumerate()
                .for_each(|(q, chunk)| {
                    let p0 = q * KC;
                    let kc = KC.min(k - p0);
                    for (i, panel) in chunk.chunks_mut(MR * kc).enumerate() {
                        for r in 0..MR.min(m - i * MR) {
                            let row = &xs[(i * MR + r) * k + p0..(i * MR + r) * k + p0 + kc];
                            for (p, &v) in row.iter().enumerate() {
                                panel[p * MR + r] = v;
                            }
                        }
                    }
                });
            let panels = &*panels;
            let strips = self.n.div_ceil(NR);
            if let (Weight::Rows(ld), false) = (self.weight, packed.is_empty()) {
                packed
                    .par_chunks_mut(strips * KC * NR)
                    .enumerate()
                    .for_each(|(q, chunk)| {
                        let p0 = q * KC;
                        let kc = KC.min(k - p0);
                        for b in 0..self.blocks {
                            let (s0, s1) = (b * self.block, ((b + 1) * self.block).min(strips));
                            let (j0, j1) = (s0 * NR, (s1 * NR).min(self.n));
                            // SAFETY: AVX-512 F was detected by the caller; rows `p0..p0 + kc`,
                            // columns `j0..j1` lie within `ws`; the chunk holds the pass's strips.
                            unsafe { avx512::pack_rows(self.ws, ld, j0, j1 - j0, p0, kc, &mut chunk[s0 * kc * NR..]) };
                        }
                    });
            }
            let packed = (!packed.is_empty()).then_some(&*packed);

            // Every value is written by the last pass over k.
            let mut out = Uninit::new(m * self.n);
            let out_ptr = Out(out.as_mut_ptr());
            let out_ptr = &out_ptr;
            // With several passes over k, the partial sums of a block's rows wait in a
            // contiguous buffer (output rows `n` apart, often a multiple of 4 KiB, would compete
            // for the same L1 sets); the last pass adds them and writes the output.
            let partial = if self.passes > 1 {
                self.block * self.panels * MR * NR
            } else {
                0
            };
            (0..self.blocks.div_ceil(self.per_task) * self.groups)
                .into_par_iter()
                .for_each(|task| {
                    let (task, group) = (task / self.groups, task % self.groups);
                    let rows = group * self.group..((group + 1) * self.group).min(self.panels);
                    with_scratch(&STRIPS, self.block * KC * NR, |buf| {
                        with_scratch(&PARTIAL, partial, |partial| {
                            for b in task * self.per_task..((task + 1) * self.per_task).min(self.blocks) {
                                self.block_of_strips(b, rows.clone(), panels, packed, buf, partial, out_ptr);
                            }
                        })
                    })
                });
            // SAFETY: the last pass wrote every row of every strip (`block_of_strips`).
            unsafe { out.assume_init() }
        }

        /// Every pass over `k` of block `b`'s strips by the panels `rows`, writing their part of
        /// the output; the strips come from `packed` (the whole weight, see [`Plan::run`]) or
        /// are packed into `buf`.
        #[allow(clippy::too_many_arguments)]
        fn block_of_strips(
            &self,
            b: usize,
            rows: std::ops::Range<usize>,
            panels: &[f32],
            packed: Option<&[f32]>,
            buf: &mut [f32],
            partial: &mut [f32],
            out: &Out,
        ) {
            let (m, k, n) = (self.m, self.k, self.n);
            let strips = n.div_ceil(NR);
            let (s0, s1) = (b * self.block, ((b + 1) * self.block).min(strips));
            let (j0, j1) = (s0 * NR, (s1 * NR).min(n));
            let partial = partial.as_mut_ptr();
            for pass in 0..self.passes {
                let p0 = pass * KC;
                let kc = KC.min(k - p0);
                if let (Weight::Rows(ld), None) = (self.weight, packed) {
                    // SAFETY: AVX-512 F was detected by the caller; rows `p0..p0 + kc`, columns
                    // `j0..j1` lie within `ws` (its extent, `run`); `buf` holds `block` strips.
                    unsafe { avx512::pack_rows(self.ws, ld, j0, j1 - j0, p0, kc, buf) };
                }
                for strip in s0..s1 {
                    let j = strip * NR;
                    let nr = NR.min(n - j);
                    let mask = if nr == NR { u32::MAX } else { (1u32 << nr) - 1 };
                    let sums = (strip - s0) * self.panels * MR * NR;
                    // SAFETY: AVX-512 F detected; the strip's rows lie within `ws`; every tile
                    // reads one panel of `kc` columns and a packed strip of `buf`, and writes
                    // `rows` rows of this block's own strip (of `partial` or `out`, whose other
                    // columns and rows belong to other tasks); the bias has `n` values.
                    unsafe {
                        let b = match (self.weight, packed) {
                            (Weight::Rows(_), Some(all)) => all.as_ptr().add((pass * strips * KC + strip * kc) * NR),
                            (Weight::Rows(_), None) => buf.as_ptr().add((strip - s0) * kc * NR),
                            (Weight::Transposed(ld), _) => {
                                avx512::pack_transposed(self.ws, ld, j, nr, p0, kc, buf);
                                buf.as_ptr()
                            }
                        };
                        let a = panels.as_ptr().add(p0 * self.panels * MR);
                        for i in rows.clone() {
                            let rows = MR.min(m - i * MR);
                            let start = match self.bias {
                                _ if pass > 0 => Start::Add(partial.add(sums + i * MR * NR), NR),
                                Some(bias) => Start::Bias(bias.as_ptr().add(j)),
                                None => Start::Zero,
                            };
                            let (c, ldc) = if pass + 1 == self.passes {
                                (out.0.add(i * MR * n + j), n)
                            } else {
                                (partial.add(sums + i * MR * NR), NR)
                            };
                            avx512::tile(rows, kc, a.add(i * MR * kc), ARows::Panel, b, c, ldc, mask, start);
                        }
                    }
                }
            }
        }
    }
}
