//! Fused inference kernels on flex's CPU tensors: attention over whole sequences and the GELU
//! activations.
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

/// `x @ w` for `x: [m, k]` and `w: [k, n]` the transposed view of a row-major `[n, k]` matrix
/// (a tied LM head, `embed_tokensᵀ`), on flex f32 tensors; `None` when the kernel does not apply
/// (another layout, backend or dtype, autodiff, no AVX-512).
///
/// Burn 0.21's flex hands this product to the gemm crate, which repacks the whole `[n, k]`
/// matrix on every call (the head's 133 MB at medium size, 533 MB at full size). Here each strip
/// of 32 output columns is transposed into a small buffer (in-register 16 x 16 transposes, 256
/// values of `k` at a time) and multiplied by every row of `x` (packed once into 14-row panels)
/// while it is in L1. Each output sums in the same order whatever the threads.
pub fn matmul_transposed<B: Backend>(x: &Tensor<B, 2>, w: &Tensor<B, 2>) -> Option<Tensor<B, 2>> {
    #[cfg(all(feature = "flex", target_arch = "x86_64"))]
    {
        if !enabled() {
            return None;
        }
        flex_matmul::transposed(x, w)
    }
    #[cfg(not(all(feature = "flex", target_arch = "x86_64")))]
    {
        let _ = (x, w);
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

    /// `c[r, 0..32] (+)= sum_p a[r, p] b[p, 0..32]` for `r < rows <= MR`: `a` as `a_rows` says,
    /// `b` packed `[kc, 32]`, `c` row `r` at `c + r * ldc`; only the columns in `mask` are
    /// stored; with `accumulate` the tile adds to what `c` holds.
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
        accumulate: bool,
    ) {
        macro_rules! go {
            ($($r:literal)*) => {
                match (rows, a_rows) {
                    $(
                        ($r, ARows::Strided(lda)) => tile_n::<$r, false>(kc, a, lda, b, c, ldc, mask, accumulate),
                        ($r, ARows::Panel) => tile_n::<$r, true>(kc, a, MR, b, c, ldc, mask, accumulate),
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
        accumulate: bool,
    ) {
        let mut lo = [_mm512_setzero_ps(); R];
        let mut hi = [_mm512_setzero_ps(); R];
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
        let (m0, m1) = (mask as u16, (mask >> 16) as u16);
        for r in 0..R {
            // SAFETY: row `r < rows` of `c`, the columns under the mask.
            unsafe {
                let row = c.add(r * ldc);
                let (mut v0, mut v1) = (lo[r], hi[r]);
                if accumulate {
                    v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, row));
                    v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, row.add(16)));
                }
                _mm512_mask_storeu_ps(row, m0, v0);
                _mm512_mask_storeu_ps(row.add(16), m1, v1);
            }
        }
    }

    /// Rows `j..j + nr` (`nr <= 32`), columns `p0..p0 + kc` of the row-major `[n, k]` matrix
    /// `e`, transposed into `buf[p][32]` (zeros past `nr`), sixteen rows at a time with
    /// in-register 16 x 16 transposes.
    ///
    /// # Safety
    /// AVX-512 F must be available; the rows and columns lie within `e`; `buf` holds `kc * 32`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn pack_transposed(
        e: &[f32],
        k: usize,
        j: usize,
        nr: usize,
        p0: usize,
        kc: usize,
        buf: &mut [f32],
    ) {
        assert!(nr <= NR && buf.len() >= kc * NR && (j + nr) * k <= e.len() && p0 + kc <= k);
        let (ep, out) = (e.as_ptr(), buf.as_mut_ptr());
        let mut p = 0;
        while p < kc {
            let w = 16.min(kc - p);
            let lanes: __mmask16 = if w == 16 { 0xffff } else { (1u16 << w) - 1 };
            for half in 0..2 {
                let mut rows = [_mm512_setzero_ps(); 16];
                for (i, row) in rows.iter_mut().enumerate() {
                    if half * 16 + i < nr {
                        let at = (j + half * 16 + i) * k + p0 + p;
                        // SAFETY: row `j + half * 16 + i < j + nr`, columns `p0 + p..+ w`.
                        *row = unsafe { _mm512_maskz_loadu_ps(lanes, ep.add(at)) };
                        // The next strip's row (same columns) into L2 while this one is
                        // multiplied: a hint, never dereferenced.
                        _mm_prefetch::<_MM_HINT_T1>(ep.wrapping_add(at + NR * k) as *const i8);
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
        // The mask as bytes [b, t, s] with strides (broadcast dims at stride 0).
        let mask = match mask {
            Some(m) => {
                let [mb, mh, mt, ms] = m.dims();
                if (mb != b && mb != 1) || mh != 1 || (mt != t && mt != 1) || ms != s {
                    return None;
                }
                let m = flex(&m.clone().into_primitive())?.to_contiguous();
                let strides = [if mb == 1 { 0 } else { mt * ms }, if mt == 1 { 0 } else { ms }];
                Some((m, strides))
            }
            None => None,
        };
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
                            false,
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
                            false,
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
}

/// The many-row product with a transposed weight on flex tensors.
#[cfg(all(feature = "flex", target_arch = "x86_64"))]
mod flex_matmul {
    use burn::prelude::*;
    use burn::tensor::{DType, TensorPrimitive};
    use rayon::prelude::*;

    use super::avx512::{self, ARows, MR, NR};
    use super::{Out, Uninit};
    use crate::packed::flex_io::{self, flex};

    /// Depth of one pass (a strip buffer of `KC x 32` values: 32 KiB, in L1).
    const KC: usize = 256;

    pub(super) fn transposed<B: Backend>(x: &Tensor<B, 2>, w: &Tensor<B, 2>) -> Option<Tensor<B, 2>> {
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
        if layout.strides() != [1, k as isize] {
            return None;
        }
        let start = layout.start_offset();
        let e = wf.storage::<f32>().get(start..start + n * k)?;
        let x = flex_io::contiguous(x)?;
        let xs = x.as_slice::<f32>()?;

        // x in panels of MR rows, per pass of KC: pass q at q * panels * MR * KC, panel i at
        // + i * MR * kc, value [p * MR + r] (zero past m).
        let panels = m.div_ceil(MR);
        let mut packed = vec![0f32; panels * MR * k];
        packed
            .par_chunks_mut(panels * MR * KC)
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

        // Every value is written by the first pass over k (`p0 == 0`, no accumulation).
        let mut out = Uninit::new(m * n);
        let out_ptr = Out(out.as_mut_ptr());
        let out_ptr = &out_ptr;
        let strips = n.div_ceil(NR);
        let per_task = strips.div_ceil(rayon::current_num_threads() * 8).max(1);
        (0..strips.div_ceil(per_task)).into_par_iter().for_each(|task| {
            let mut buf = vec![0f32; KC * NR];
            let (s0, s1) = (task * per_task, ((task + 1) * per_task).min(strips));
            for strip in s0..s1 {
                let j = strip * NR;
                let nr = NR.min(n - j);
                let mask = if nr == NR { u32::MAX } else { (1u32 << nr) - 1 };
                let mut p0 = 0;
                while p0 < k {
                    let kc = KC.min(k - p0);
                    // SAFETY: AVX-512 F was detected by the caller; rows `j..j + nr` of the
                    // `[n, k]` matrix, columns `p0..p0 + kc`; every tile reads one panel of
                    // `kc` columns and writes `rows` rows of this task's own strip.
                    unsafe {
                        avx512::pack_transposed(e, k, j, nr, p0, kc, &mut buf);
                        let pass = packed.as_ptr().add(p0 * panels * MR);
                        for i in 0..panels {
                            let rows = MR.min(m - i * MR);
                            avx512::tile(
                                rows,
                                kc,
                                pass.add(i * MR * kc),
                                ARows::Panel,
                                buf.as_ptr(),
                                out_ptr.0.add(i * MR * n + j),
                                n,
                                mask,
                                p0 > 0,
                            );
                        }
                    }
                    p0 += kc;
                }
            }
        });
        // SAFETY: the first pass wrote every row of every strip (above).
        let out = unsafe { out.assume_init() };
        flex_io::tensor::<B>(out, [m, n])
    }
}
