//! Reduced-precision weights for decode steps: bf16 and Q8 (int8 in blocks of 32 with one f32
//! scale per block) copies of the projections, multiplied by one (or a few) rows at a time.
//!
//! A decode step multiplies one row by every weight matrix: it streams each weight once and does
//! two flops per weight, so its speed is the speed at which the weights come from memory. bf16
//! reads half the bytes of f32 and Q8 a little over a quarter (32 int8 plus a 4-byte scale per 32
//! weights: 9 bits per weight). The block format is the one of llama.cpp's `Q8_0` (Gerganov et
//! al., ggml; see NOTICES), with an f32 scale instead of an f16 one; the rounding of bf16 is
//! round-to-nearest-even, as PyTorch's `tensor.to(torch.bfloat16)`.
//!
//! A [`PackedWeight`] is an ordinary Burn module (its values are Burn tensors: the bf16 matrix, or
//! the int8 matrix and its scales), stored output-major (`[out, in]`, one contiguous row per
//! output) so that each output is one streamed dot product. It sits beside the f32 projection it
//! was packed from ([`crate::lora::LoraSlot::pack`]): products with more rows than
//! [`MAX_PACKED_ROWS`] (the prompt, training, the vision tower) keep using the f32 weight with the
//! backend's matrix product, which is compute-bound and exact, and only the small products of
//! decoding use the packed copy.
//!
//! The product has two implementations, chosen by the kind of tensor, never by model code:
//!
//! - on the flex CPU backend, a kernel of ours reads the packed values straight from flex's
//!   tensor storage, four weight rows per pass over the input (AVX-512 when the processor has
//!   it, else AVX2 + FMA, else portable Rust; a software prefetch ahead in each weight stream),
//!   splits the outputs over rayon's pool like [`crate::gemv`], and returns a flex tensor;
//! - on every other backend (and under autodiff), the same values through Burn's own operations:
//!   the packed matrix is dequantized to f32 (`q * scale`, or the bf16 value cast) and multiplied.
//!   This is also the reference the kernel is tested against.
//!
//! Accuracy: packing changes the weights (bf16 keeps 8 significant bits; Q8 keeps 127 levels per
//! block of 32), so logits move; `kosmos-compare --weights` reports how far on each model
//! (logit error against f32 and how many greedy tokens agree), and the book's benchmark chapter
//! records the figures.

use std::fmt;
use std::str::FromStr;

use burn::module::Module;
use burn::prelude::*;
use burn::tensor::{DType, FloatDType, TensorData, bf16};
use serde::{Deserialize, Serialize};

/// Weights per Q8 block (one scale each).
pub const Q8_BLOCK: usize = 32;

/// Products with at most this many rows use a packed weight; more rows use the f32 weight.
pub const MAX_PACKED_ROWS: usize = 8;

/// How the projections of decode steps are stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightMode {
    /// The f32 weights only (exact; the default).
    #[default]
    F32,
    /// A bf16 copy (half the bytes of f32; 8 significant bits).
    Bf16,
    /// An int8 copy in blocks of 32 weights with one f32 scale per block (9 bits per weight).
    Q8,
}

impl WeightMode {
    /// Every mode, in the order the CLI lists them.
    pub const ALL: [WeightMode; 3] = [WeightMode::F32, WeightMode::Bf16, WeightMode::Q8];

    /// The mode's name (`f32`, `bf16`, `q8`).
    pub fn name(self) -> &'static str {
        match self {
            WeightMode::F32 => "f32",
            WeightMode::Bf16 => "bf16",
            WeightMode::Q8 => "q8",
        }
    }

    /// Bytes per weight the packed copy stores (f32: 4).
    pub fn bytes_per_weight(self) -> f64 {
        match self {
            WeightMode::F32 => 4.0,
            WeightMode::Bf16 => 2.0,
            WeightMode::Q8 => 1.0 + 4.0 / Q8_BLOCK as f64,
        }
    }
}

impl fmt::Display for WeightMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for WeightMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        WeightMode::ALL
            .into_iter()
            .find(|m| m.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("unknown weight mode `{s}` (expected f32, bf16 or q8)"))
    }
}

/// A reduced-precision copy of one projection's weight, output-major (`[out, in]`).
///
/// Exactly one of `bf16` and `q8` is set; `scales` goes with `q8`. On a backend that cannot
/// store bf16 (or int8) tensors the same values are kept in f32 (or int32): same results, no
/// saving.
#[derive(Module, Debug)]
pub struct PackedWeight<B: Backend> {
    /// The weight in bf16, `[out, in]`.
    pub bf16: Option<Tensor<B, 2>>,
    /// The weight in int8, `[out, in rounded up to a multiple of 32]` (zeros past `in`).
    pub q8: Option<Tensor<B, 2, Int>>,
    /// One scale per block of 32 int8 weights, `[out, in / 32 rounded up]`:
    /// `weight[o, i] ~ q8[o, i] * scales[o, i / 32]`.
    pub scales: Option<Tensor<B, 2>>,
    #[module(skip)]
    d_input: usize,
}

impl<B: Backend> PackedWeight<B> {
    /// Pack a Burn linear weight (`[in, out]`, as `Linear` stores it). `F32` gives `None`.
    pub fn pack(weight: Tensor<B, 2>, mode: WeightMode) -> Option<Self> {
        Self::pack_rows(weight.transpose(), mode)
    }

    /// Pack a weight stored output-major (`[out, in]`, as a tied embedding used as the head).
    /// `F32` gives `None`.
    pub fn pack_rows(weight: Tensor<B, 2>, mode: WeightMode) -> Option<Self> {
        if mode == WeightMode::F32 {
            return None;
        }
        let [d_out, d_input] = weight.dims();
        let device = weight.device();
        let values: Vec<f32> = weight
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .expect("an f32 tensor converts to f32 values");
        match mode {
            WeightMode::F32 => None,
            WeightMode::Bf16 => {
                let half: Vec<bf16> = values.iter().map(|&v| bf16::from_f32(v)).collect();
                // A backend that cannot store bf16 keeps the rounded values in f32: the same
                // numbers, without the saving.
                let data = if B::supports_dtype(&device, DType::BF16) {
                    TensorData::new(half, [d_out, d_input])
                } else {
                    TensorData::new(half.iter().map(|v| v.to_f32()).collect::<Vec<f32>>(), [d_out, d_input])
                };
                let dtype = data.dtype;
                let bf16 = Tensor::from_data(data, (&device, dtype));
                crate::memory::float_tensor(&bf16);
                Some(Self {
                    bf16: Some(bf16),
                    q8: None,
                    scales: None,
                    d_input,
                })
            }
            WeightMode::Q8 => {
                let (q, scales) = quantize_q8(&values, d_out, d_input);
                let blocks = d_input.div_ceil(Q8_BLOCK);
                let shape = [d_out, blocks * Q8_BLOCK];
                // Likewise int8 in int32 where the backend has no int8 tensors.
                let q = if B::supports_dtype(&device, DType::I8) {
                    TensorData::new(q, shape)
                } else {
                    TensorData::new(q.iter().map(|&v| v as i32).collect::<Vec<i32>>(), shape)
                };
                let dtype = q.dtype;
                let scales = TensorData::new(scales, [d_out, blocks]);
                let (q, scales) = (
                    Tensor::from_data(q, (&device, dtype)),
                    Tensor::from_data(scales, (&device, DType::F32)),
                );
                // The copies decode steps stream, on huge pages (see `crate::memory`).
                crate::memory::int_tensor(&q);
                crate::memory::float_tensor(&scales);
                Some(Self {
                    bf16: None,
                    q8: Some(q),
                    scales: Some(scales),
                    d_input,
                })
            }
        }
    }

    /// The packing's mode.
    pub fn mode(&self) -> WeightMode {
        if self.bf16.is_some() {
            WeightMode::Bf16
        } else {
            WeightMode::Q8
        }
    }

    /// `[out, in]`.
    pub fn dims(&self) -> [usize; 2] {
        let d_out = match (&self.bf16, &self.q8) {
            (Some(w), _) => w.dims()[0],
            (None, Some(q)) => q.dims()[0],
            (None, None) => unreachable!("a packed weight holds bf16 or q8 values"),
        };
        [d_out, self.d_input]
    }

    /// The packed weight as f32 values, `[out, in]` (through Burn's operations; any backend).
    pub fn dequantize(&self) -> Tensor<B, 2> {
        if let Some(w) = &self.bf16 {
            return w.clone().cast(FloatDType::F32);
        }
        let q = self.q8.clone().expect("a packed weight holds bf16 or q8 values");
        let scales = self.scales.clone().expect("q8 values come with their scales");
        let [d_out, padded] = q.dims();
        let blocks = padded / Q8_BLOCK;
        let w = q.float().cast(FloatDType::F32).reshape([d_out, blocks, Q8_BLOCK]) * scales.unsqueeze_dim::<3>(2);
        w.reshape([d_out, padded]).slice([0..d_out, 0..self.d_input])
    }

    /// Whether a product of `rows` rows should use this packed copy: at most
    /// [`MAX_PACKED_ROWS`] (decode steps, where reading the weight dominates); more rows (the
    /// prompt, the vision tower, training) use the f32 weight. The one rule every caller applies.
    pub fn serves(&self, rows: usize) -> bool {
        rows <= MAX_PACKED_ROWS
    }

    /// `x @ weightᵀ` for `x: [rows, in]`, `[rows, out]`: the kernel on flex, Burn's operations
    /// ([`PackedWeight::matmul_reference`]) elsewhere.
    pub fn matmul(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        #[cfg(feature = "flex")]
        if let Some(y) = flex_kernel::matmul::<B>(self, &x) {
            return y;
        }
        self.matmul_reference(x)
    }

    /// `x @ weightᵀ` through Burn's operations on the dequantized weight (any backend; the weight
    /// is cast to `x`'s float type, e.g. for a model loaded in bf16).
    pub fn matmul_reference(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let w = self.dequantize();
        let w = if x.dtype() == w.dtype() {
            w
        } else {
            w.cast(FloatDType::from(x.dtype()))
        };
        x.matmul(w.transpose())
    }

    /// `x @ weightᵀ + bias` for `x: [..., in]`.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>, bias: Option<Tensor<B, 1>>) -> Tensor<B, D> {
        let dims = x.dims();
        let rows: usize = dims[..D - 1].iter().product();
        let [d_out, d_input] = self.dims();
        let y = self.matmul(x.reshape([rows, d_input]));
        let y = match bias {
            Some(b) => y + b.unsqueeze::<2>(),
            None => y,
        };
        let mut out = dims;
        out[D - 1] = d_out;
        y.reshape(out)
    }
}

/// Quantize `[rows, cols]` f32 values to int8 blocks of [`Q8_BLOCK`] along each row: per block
/// `scale = max|w| / 127` and `q = round(w / scale)` (0 where the block is all zeros). Rows are
/// padded with zeros to whole blocks. Returns `(q [rows, blocks * 32], scales [rows, blocks])`.
pub fn quantize_q8(values: &[f32], rows: usize, cols: usize) -> (Vec<i8>, Vec<f32>) {
    assert_eq!(
        values.len(),
        rows * cols,
        "quantize_q8: {rows} x {cols} values expected"
    );
    let blocks = cols.div_ceil(Q8_BLOCK);
    let padded = blocks * Q8_BLOCK;
    let mut q = vec![0i8; rows * padded];
    let mut scales = vec![0f32; rows * blocks];
    for r in 0..rows {
        let row = &values[r * cols..(r + 1) * cols];
        for b in 0..blocks {
            let block = &row[b * Q8_BLOCK..((b + 1) * Q8_BLOCK).min(cols)];
            let max = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let scale = max / 127.0;
            scales[r * blocks + b] = scale;
            if scale > 0.0 {
                let inverse = 1.0 / scale;
                for (i, v) in block.iter().enumerate() {
                    q[r * padded + b * Q8_BLOCK + i] = (v * inverse).round().clamp(-127.0, 127.0) as i8;
                }
            }
        }
    }
    (q, scales)
}

/// The way in and out of flex's tensors for the CPU kernels (this module's and
/// [`crate::gemv`]'s): generic code reaches flex's storage by downcasting the tensor primitives,
/// and hands a result back as `B`'s primitive when `B` is flex.
#[cfg(feature = "flex")]
pub(crate) mod flex_io {
    use std::any::Any;

    use burn::prelude::*;
    use burn::tensor::{TensorData, TensorPrimitive};
    use burn_flex::FlexTensor;

    /// The flex tensor behind a primitive, if it is one (not under autodiff, not another backend).
    pub(crate) fn flex<T: Any>(primitive: &T) -> Option<&FlexTensor> {
        (primitive as &dyn Any).downcast_ref::<FlexTensor>()
    }

    /// A float tensor as a contiguous flex tensor (shares the storage when already contiguous).
    pub(crate) fn contiguous<B: Backend, const D: usize>(tensor: &Tensor<B, D>) -> Option<FlexTensor> {
        match tensor.clone().into_primitive() {
            TensorPrimitive::Float(p) => Some(flex(&p)?.to_contiguous()),
            TensorPrimitive::QFloat(_) => None,
        }
    }

    /// `values` (`shape`, row-major) as a `B` tensor when `B`'s float tensors are flex's.
    pub(crate) fn tensor<B: Backend>(values: Vec<f32>, shape: [usize; 2]) -> Option<Tensor<B, 2>> {
        tensor_nd::<B, 2>(values, shape)
    }

    /// `values` (`shape`, row-major) as a `D`-dimensional `B` tensor when `B`'s float tensors are
    /// flex's.
    pub(crate) fn tensor_nd<B: Backend, const D: usize>(values: Vec<f32>, shape: [usize; D]) -> Option<Tensor<B, D>> {
        let mut slot = Some(FlexTensor::from_data(TensorData::new(values, shape)));
        let primitive = (&mut slot as &mut dyn Any)
            .downcast_mut::<Option<B::FloatTensorPrimitive>>()?
            .take()?;
        Some(Tensor::from_primitive(TensorPrimitive::Float(primitive)))
    }
}

/// The flex kernel: reads the packed values and the input from flex's storage.
#[cfg(feature = "flex")]
mod flex_kernel {
    use burn::prelude::*;
    use burn::tensor::bf16;
    use rayon::prelude::*;

    use super::flex_io::{self, flex};
    use super::{MAX_PACKED_ROWS, PackedWeight, Q8_BLOCK, Simd};

    /// The packed values of one weight, as slices.
    #[derive(Clone, Copy)]
    pub(super) enum Weights<'a> {
        /// `[out, in]` bf16.
        Bf16(&'a [bf16]),
        /// `[out, padded]` int8 and `[out, padded / 32]` scales.
        Q8 {
            q: &'a [i8],
            scales: &'a [f32],
            padded: usize,
        },
    }

    /// `x @ wᵀ` on flex tensors, or `None` when the tensors are not flex's (another backend,
    /// autodiff) or `x` has too many rows.
    pub(super) fn matmul<B: Backend>(packed: &PackedWeight<B>, x: &Tensor<B, 2>) -> Option<Tensor<B, 2>> {
        let [rows, d_input] = x.dims();
        let [d_out, _] = packed.dims();
        if rows == 0 || rows > MAX_PACKED_ROWS {
            return None;
        }
        let x = flex_io::contiguous(x)?;
        let xs: &[f32] = x.as_slice::<f32>()?;
        // Keep the primitives alive while their storage is borrowed.
        let (w_primitive, q_primitive, s_primitive);
        let weights = if let Some(w) = &packed.bf16 {
            w_primitive = w.clone().into_primitive().tensor();
            Weights::Bf16(flex(&w_primitive)?.as_slice::<bf16>()?)
        } else {
            let q = packed.q8.as_ref()?;
            let padded = q.dims()[1];
            q_primitive = q.clone().into_primitive();
            s_primitive = packed.scales.as_ref()?.clone().into_primitive().tensor();
            Weights::Q8 {
                q: flex(&q_primitive)?.as_slice::<i8>()?,
                scales: flex(&s_primitive)?.as_slice::<f32>()?,
                padded,
            }
        };
        let out = product(
            xs,
            rows,
            d_input,
            d_out,
            weights,
            crate::gemv::threads(),
            Simd::detected(),
        );
        flex_io::tensor::<B>(out, [rows, d_out])
    }

    /// `x [rows, d_input] @ wᵀ`, `[rows, d_out]` row-major, outputs split over `threads`.
    pub(super) fn product(
        x: &[f32],
        rows: usize,
        d_input: usize,
        d_out: usize,
        weights: Weights<'_>,
        threads: usize,
        simd: Simd,
    ) -> Vec<f32> {
        // Computed output-major (`[d_out, rows]`) so that each thread's outputs are contiguous.
        let mut out_t = vec![0f32; d_out * rows];
        // Outputs go in groups of `GROUP` consecutive rows of the weight (one pass over `x` for
        // four weight streams); the groups start at multiples of `GROUP` whatever the threads, so
        // that every output is computed by the same kernel, bit for bit, on any thread count.
        let run = |first: usize, chunk: &mut [f32]| {
            let outputs = chunk.len() / rows;
            let mut j = 0;
            while j < outputs {
                let group = (outputs - j).min(GROUP);
                for r in 0..rows {
                    let mut y = [0f32; GROUP];
                    dot_group(
                        &x[r * d_input..(r + 1) * d_input],
                        weights,
                        first + j,
                        group,
                        simd,
                        &mut y,
                    );
                    for (g, y) in y.iter().take(group).enumerate() {
                        chunk[(j + g) * rows + r] = *y;
                    }
                }
                j += group;
            }
        };
        if threads < 2 || d_out * d_input < crate::gemv::MIN_WEIGHTS / 4 || d_out < 2 * threads * GROUP {
            run(0, &mut out_t);
        } else {
            // A few chunks per thread, so that a slow thread does not hold the others up; whole
            // groups per chunk.
            let per_chunk = d_out.div_ceil(threads * 4).div_ceil(GROUP) * GROUP;
            out_t
                .par_chunks_mut(per_chunk * rows)
                .enumerate()
                .for_each(|(c, chunk)| run(c * per_chunk, chunk));
        }
        if rows == 1 {
            return out_t;
        }
        let mut out = vec![0f32; rows * d_out];
        for o in 0..d_out {
            for r in 0..rows {
                out[r * d_out + o] = out_t[o * rows + r];
            }
        }
        out
    }

    /// Weight rows one kernel call reads together.
    const GROUP: usize = 4;

    /// `y[g] = x · w[first + g]` for `g < group` (`group <= GROUP`): a whole group through the
    /// four-row kernel of `simd`, a partial one row by row.
    fn dot_group(x: &[f32], weights: Weights<'_>, first: usize, group: usize, simd: Simd, y: &mut [f32; GROUP]) {
        let k = x.len();
        #[cfg(target_arch = "x86_64")]
        if group == GROUP && simd != Simd::Portable {
            use super::simd;
            // SAFETY: `simd` is one this processor has (detected, or checked by `host_product`);
            // rows `first..first + 4` lie within the weights (a whole group of the caller's
            // `d_out` rows), each `k` (bf16) or `padded` (q8, `padded / 32` scales) long.
            unsafe {
                match (simd, weights) {
                    (Simd::Avx512, Weights::Bf16(w)) => simd::dot4_bf16_512(x, &w[first * k..], y),
                    (_, Weights::Bf16(w)) => simd::dot4_bf16_avx2(x, &w[first * k..], y),
                    (_, Weights::Q8 { q, scales, padded }) => {
                        let (q, s) = (&q[first * padded..], &scales[first * (padded / Q8_BLOCK)..]);
                        if simd == Simd::Avx512 {
                            simd::dot4_q8_512(x, q, s, padded, y)
                        } else {
                            simd::dot4_q8_avx2(x, q, s, padded, y)
                        }
                    }
                }
            }
            return;
        }
        for (g, y) in y.iter_mut().take(group).enumerate() {
            let o = first + g;
            *y = match weights {
                Weights::Bf16(w) => dot_bf16(x, &w[o * k..(o + 1) * k], simd),
                Weights::Q8 { q, scales, padded } => {
                    let blocks = padded / Q8_BLOCK;
                    dot_q8(
                        x,
                        &q[o * padded..(o + 1) * padded],
                        &scales[o * blocks..(o + 1) * blocks],
                        simd,
                    )
                }
            };
        }
    }

    /// `Σ x[i] w[i]` with bf16 weights (AVX2 + FMA unless `simd` is portable).
    pub(super) fn dot_bf16(x: &[f32], w: &[bf16], simd: Simd) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if simd != Simd::Portable {
            // SAFETY: AVX2 and FMA are present (checked at run time); the slices have equal lengths.
            return unsafe { super::simd::dot_bf16(x, w) };
        }
        x.iter().zip(w).map(|(x, w)| x * w.to_f32()).sum()
    }

    /// `Σ_blocks scale_b Σ_i x[i] q[i]` with int8 weights (`q` padded to whole blocks).
    pub(super) fn dot_q8(x: &[f32], q: &[i8], scales: &[f32], simd: Simd) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if simd != Simd::Portable {
            // SAFETY: AVX2 and FMA are present (checked at run time); `q` holds whole blocks
            // covering `x`, one scale each.
            return unsafe { super::simd::dot_q8(x, q, scales) };
        }
        let mut total = 0f32;
        for (b, (x, q)) in x.chunks(Q8_BLOCK).zip(q.chunks(Q8_BLOCK)).enumerate() {
            let s: f32 = x.iter().zip(q).map(|(x, &q)| x * q as f32).sum();
            total += s * scales[b];
        }
        total
    }
}

/// AVX2 + FMA dot products (x86-64).
#[cfg(all(feature = "flex", target_arch = "x86_64"))]
pub(crate) mod simd {
    use std::arch::x86_64::*;
    use std::sync::OnceLock;

    use burn::tensor::bf16;

    use super::{Q8_BLOCK, Simd};

    /// What this processor has (checked once).
    pub(super) fn detect() -> Simd {
        static LEVEL: OnceLock<Simd> = OnceLock::new();
        *LEVEL.get_or_init(|| {
            if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
                Simd::Portable
            } else if is_x86_feature_detected!("avx512f") {
                Simd::Avx512
            } else {
                Simd::Avx2
            }
        })
    }

    /// How far ahead (bytes) the four-row kernels ask for each weight stream: measured on the
    /// full-size decoder's products, 2 threads, 17 against 14 GB/s without (Q8).
    const PREFETCH: usize = 1024;

    /// # Safety
    /// AVX-512 F must be available; `w` must hold 4 rows of `x.len()` values.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn dot4_bf16_512(x: &[f32], w: &[bf16], y: &mut [f32; 4]) {
        let k = x.len();
        assert!(w.len() >= 4 * k);
        let (xp, wp) = (x.as_ptr(), w.as_ptr());
        let mut acc = [_mm512_setzero_ps(); 8];
        let mut i = 0;
        while i + 32 <= k {
            // SAFETY: `i + 32 <= k`: 32 values of `x` and of each of the 4 rows; prefetching
            // past the end is harmless (a hint, never a fault).
            unsafe {
                let x0 = _mm512_loadu_ps(xp.add(i));
                let x1 = _mm512_loadu_ps(xp.add(i + 16));
                for r in 0..4 {
                    let p = wp.add(r * k + i);
                    _mm_prefetch::<_MM_HINT_T0>((p as *const i8).wrapping_add(PREFETCH));
                    let w0 = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i));
                    let w1 = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p.add(16) as *const __m256i));
                    acc[2 * r] = _mm512_fmadd_ps(x0, _mm512_castsi512_ps(_mm512_slli_epi32(w0, 16)), acc[2 * r]);
                    acc[2 * r + 1] =
                        _mm512_fmadd_ps(x1, _mm512_castsi512_ps(_mm512_slli_epi32(w1, 16)), acc[2 * r + 1]);
                }
            }
            i += 32;
        }
        for (r, y) in y.iter_mut().enumerate() {
            let tail: f32 = (i..k).map(|j| x[j] * w[r * k + j].to_f32()).sum();
            *y = _mm512_reduce_add_ps(_mm512_add_ps(acc[2 * r], acc[2 * r + 1])) + tail;
        }
    }

    /// # Safety
    /// AVX2 and FMA must be available; `w` must hold 4 rows of `x.len()` values.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot4_bf16_avx2(x: &[f32], w: &[bf16], y: &mut [f32; 4]) {
        let k = x.len();
        assert!(w.len() >= 4 * k);
        let (xp, wp) = (x.as_ptr(), w.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 8];
        let mut i = 0;
        while i + 16 <= k {
            // SAFETY: `i + 16 <= k`: 16 values of `x` and of each of the 4 rows.
            unsafe {
                let x0 = _mm256_loadu_ps(xp.add(i));
                let x1 = _mm256_loadu_ps(xp.add(i + 8));
                for r in 0..4 {
                    let p = wp.add(r * k + i);
                    _mm_prefetch::<_MM_HINT_T0>((p as *const i8).wrapping_add(PREFETCH));
                    acc[2 * r] = _mm256_fmadd_ps(x0, load_bf16(p), acc[2 * r]);
                    acc[2 * r + 1] = _mm256_fmadd_ps(x1, load_bf16(p.add(8)), acc[2 * r + 1]);
                }
            }
            i += 16;
        }
        for (r, y) in y.iter_mut().enumerate() {
            let tail: f32 = (i..k).map(|j| x[j] * w[r * k + j].to_f32()).sum();
            *y = sum(_mm256_add_ps(acc[2 * r], acc[2 * r + 1])) + tail;
        }
    }

    /// # Safety
    /// AVX-512 F must be available; `q` must hold 4 rows of `padded` values (`x.len()` rounded
    /// up to whole blocks of 32) and `scales` 4 rows of `padded / 32`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn dot4_q8_512(x: &[f32], q: &[i8], scales: &[f32], padded: usize, y: &mut [f32; 4]) {
        let k = x.len();
        let (full, blocks) = (k / Q8_BLOCK, padded / Q8_BLOCK);
        assert!(padded >= k && q.len() >= 4 * padded && scales.len() >= 4 * blocks);
        let (xp, qp) = (x.as_ptr(), q.as_ptr());
        let mut acc = [_mm512_setzero_ps(); 4];
        for b in 0..full {
            let o = b * Q8_BLOCK;
            // SAFETY: block `b < full` lies within `x` and every row of `q`; one scale per block.
            unsafe {
                let x0 = _mm512_loadu_ps(xp.add(o));
                let x1 = _mm512_loadu_ps(xp.add(o + 16));
                for r in 0..4 {
                    let p = qp.add(r * padded + o);
                    if b % 2 == 0 {
                        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH));
                    }
                    let q0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p as *const __m128i)));
                    let q1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p.add(16) as *const __m128i)));
                    let t = _mm512_fmadd_ps(x1, q1, _mm512_mul_ps(x0, q0));
                    acc[r] = _mm512_fmadd_ps(t, _mm512_set1_ps(*scales.get_unchecked(r * blocks + b)), acc[r]);
                }
            }
        }
        for (r, y) in y.iter_mut().enumerate() {
            *y = _mm512_reduce_add_ps(acc[r]) + q8_tail(x, &q[r * padded..], &scales[r * blocks..], full);
        }
    }

    /// # Safety
    /// AVX2 and FMA must be available; `q` and `scales` as for [`dot4_q8_512`].
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot4_q8_avx2(x: &[f32], q: &[i8], scales: &[f32], padded: usize, y: &mut [f32; 4]) {
        let k = x.len();
        let (full, blocks) = (k / Q8_BLOCK, padded / Q8_BLOCK);
        assert!(padded >= k && q.len() >= 4 * padded && scales.len() >= 4 * blocks);
        let (xp, qp) = (x.as_ptr(), q.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        for b in 0..full {
            let o = b * Q8_BLOCK;
            // SAFETY: as in `dot4_q8_512`.
            unsafe {
                let xs = [
                    _mm256_loadu_ps(xp.add(o)),
                    _mm256_loadu_ps(xp.add(o + 8)),
                    _mm256_loadu_ps(xp.add(o + 16)),
                    _mm256_loadu_ps(xp.add(o + 24)),
                ];
                for r in 0..4 {
                    let p = qp.add(r * padded + o);
                    if b % 2 == 0 {
                        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH));
                    }
                    let mut t = _mm256_mul_ps(xs[0], load_i8(p));
                    t = _mm256_fmadd_ps(xs[1], load_i8(p.add(8)), t);
                    t = _mm256_fmadd_ps(xs[2], load_i8(p.add(16)), t);
                    t = _mm256_fmadd_ps(xs[3], load_i8(p.add(24)), t);
                    acc[r] = _mm256_fmadd_ps(t, _mm256_set1_ps(*scales.get_unchecked(r * blocks + b)), acc[r]);
                }
            }
        }
        for (r, y) in y.iter_mut().enumerate() {
            *y = sum(acc[r]) + q8_tail(x, &q[r * padded..], &scales[r * blocks..], full);
        }
    }

    /// The partial last block of one row (0 when `x` is whole blocks).
    fn q8_tail(x: &[f32], q: &[i8], scales: &[f32], full: usize) -> f32 {
        let start = full * Q8_BLOCK;
        if start >= x.len() {
            return 0.0;
        }
        let s: f32 = (start..x.len()).map(|i| x[i] * q[i] as f32).sum();
        s * scales[full]
    }

    /// The sum of the 8 lanes.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn sum(v: __m256) -> f32 {
        let pair = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let pair = _mm_add_ps(pair, _mm_movehl_ps(pair, pair));
        let one = _mm_add_ss(pair, _mm_shuffle_ps(pair, pair, 1));
        _mm_cvtss_f32(one)
    }

    /// 8 bf16 values from `p` as f32 (a bf16 is the top half of an f32).
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load_bf16(p: *const bf16) -> __m256 {
        // SAFETY: the caller guarantees 8 readable values at `p`.
        let raw = unsafe { _mm_loadu_si128(p as *const __m128i) };
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16))
    }

    /// 8 int8 values from `p` as f32.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load_i8(p: *const i8) -> __m256 {
        // SAFETY: the caller guarantees 8 readable bytes at `p`.
        let raw = unsafe { _mm_loadl_epi64(p as *const __m128i) };
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw))
    }

    /// # Safety
    /// AVX2 and FMA must be available; `x` and `w` must have the same length.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_bf16(x: &[f32], w: &[bf16]) -> f32 {
        let n = x.len().min(w.len());
        let (xp, wp) = (x.as_ptr(), w.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        // SAFETY (every load): `i + 32 <= n` (then `i + 8 <= n`) elements of both slices.
        while i + 32 <= n {
            for (a, acc) in acc.iter_mut().enumerate() {
                let o = i + 8 * a;
                *acc = unsafe { _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(o)), load_bf16(wp.add(o)), *acc) };
            }
            i += 32;
        }
        while i + 8 <= n {
            acc[0] = unsafe { _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(i)), load_bf16(wp.add(i)), acc[0]) };
            i += 8;
        }
        let mut total = sum(_mm256_add_ps(
            _mm256_add_ps(acc[0], acc[1]),
            _mm256_add_ps(acc[2], acc[3]),
        ));
        while i < n {
            total += x[i] * w[i].to_f32();
            i += 1;
        }
        total
    }

    /// # Safety
    /// AVX2 and FMA must be available; `q` must hold `x.len()` rounded up to whole blocks of 32
    /// values and `scales` one scale per block.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_q8(x: &[f32], q: &[i8], scales: &[f32]) -> f32 {
        let n = x.len();
        let full = n / Q8_BLOCK;
        debug_assert!(q.len() >= n.div_ceil(Q8_BLOCK) * Q8_BLOCK && scales.len() >= n.div_ceil(Q8_BLOCK));
        let (xp, qp) = (x.as_ptr(), q.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 2];
        for b in 0..full {
            let o = b * Q8_BLOCK;
            // SAFETY: block `b < full` lies within `x` and `q`; `scales` has a scale per block.
            unsafe {
                let mut s = _mm256_mul_ps(_mm256_loadu_ps(xp.add(o)), load_i8(qp.add(o)));
                s = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(o + 8)), load_i8(qp.add(o + 8)), s);
                s = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(o + 16)), load_i8(qp.add(o + 16)), s);
                s = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(o + 24)), load_i8(qp.add(o + 24)), s);
                acc[b & 1] = _mm256_fmadd_ps(s, _mm256_set1_ps(*scales.get_unchecked(b)), acc[b & 1]);
            }
        }
        let mut total = sum(_mm256_add_ps(acc[0], acc[1]));
        if full * Q8_BLOCK < n {
            let tail: f32 = (full * Q8_BLOCK..n).map(|i| x[i] * q[i] as f32).sum();
            total += tail * scales[full];
        }
        total
    }
}

/// The flex kernel's product on host slices, for tests and benchmarks: `x [rows, d_input]` times
/// the transposed packed weight given as host values (`bf16` `[d_out, d_input]`, or `q8`
/// `[d_out, padded]` with `scales`), split over `threads`, with the instructions `simd` (one of
/// [`Simd::available`]).
#[cfg(feature = "flex")]
pub fn host_product(
    x: &[f32],
    rows: usize,
    d_input: usize,
    d_out: usize,
    weights: HostWeights<'_>,
    threads: usize,
    simd: Simd,
) -> Vec<f32> {
    assert!(
        Simd::available().contains(&simd),
        "{simd:?} is not available on this processor"
    );
    let weights = match weights {
        HostWeights::Bf16(w) => flex_kernel::Weights::Bf16(w),
        HostWeights::Q8 { q, scales } => flex_kernel::Weights::Q8 {
            q,
            scales,
            padded: d_input.div_ceil(Q8_BLOCK) * Q8_BLOCK,
        },
    };
    flex_kernel::product(x, rows, d_input, d_out, weights, threads, simd)
}

/// Host-side packed values for [`host_product`].
#[cfg(feature = "flex")]
#[derive(Clone, Copy, Debug)]
pub enum HostWeights<'a> {
    /// `[d_out, d_input]` bf16.
    Bf16(&'a [bf16]),
    /// `[d_out, padded]` int8 with `[d_out, padded / 32]` scales.
    Q8 {
        /// The int8 values.
        q: &'a [i8],
        /// One scale per block.
        scales: &'a [f32],
    },
}

/// The instruction sets of the flex kernel.
#[cfg(feature = "flex")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Simd {
    /// Portable Rust (any processor).
    Portable,
    /// AVX2 and FMA (x86-64).
    Avx2,
    /// AVX-512 F, with AVX2 and FMA (x86-64).
    Avx512,
}

#[cfg(feature = "flex")]
impl Simd {
    /// The best this processor has (what [`PackedWeight::matmul`] uses).
    pub fn detected() -> Simd {
        #[cfg(target_arch = "x86_64")]
        return simd::detect();
        #[cfg(not(target_arch = "x86_64"))]
        Simd::Portable
    }

    /// Every level this processor can run, the portable one first.
    pub fn available() -> Vec<Simd> {
        let best = Self::detected();
        [Simd::Portable, Simd::Avx2, Simd::Avx512]
            .into_iter()
            .filter(|s| match s {
                Simd::Portable => true,
                Simd::Avx2 => best != Simd::Portable,
                Simd::Avx512 => best == Simd::Avx512,
            })
            .collect()
    }
}
