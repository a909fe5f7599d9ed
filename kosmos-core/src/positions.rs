//! Position encodings of the KOSMOS decoders.
//!
//! * [`Xpos`]: the extrapolatable rotary relative position embedding of KOSMOS-1 (Sun et al., 2022,
//!   "A Length-Extrapolatable Transformer", arXiv:2212.10554), matching torchscale 0.3.0's
//!   `XPOS` module: rotation of *adjacent* pairs `(2i, 2i+1)`, a per-pair decay `zeta_i^(n/scale_base)`
//!   with centred positions `n`, queries up-scaled and keys down-scaled, and the offsets torchscale
//!   uses during cached decoding.
//! * [`SinusoidalPositions`]: the fairseq/M2M100 absolute sinusoidal table used by the public
//!   KOSMOS-2 checkpoint (HF `Kosmos2TextSinusoidalPositionalEmbedding`): concatenated `[sin | cos]`
//!   halves, frequency divisor `half - 1`, positions starting after `padding_idx`, and an all-zero
//!   row at `padding_idx`.
//!
//! Both are pure functions of their configuration, so they hold no parameters: the tables are
//! computed on the host in `f32` (the reference's precision) and uploaded to the device.

use burn::config::Config;
use burn::prelude::*;
use burn::tensor::TensorData;

/// Configuration of the XPOS relative position treatment (torchscale `xpos_rel_pos`).
#[derive(Config, Debug, PartialEq)]
pub struct XposConfig {
    /// Dimension of one attention head (must be even).
    pub head_dim: usize,
    /// Base of the decay exponent `n / scale_base` (torchscale `xpos_scale_base`).
    #[config(default = 512.0)]
    pub scale_base: f64,
}

impl XposConfig {
    /// Build the XPOS operator.
    pub fn init(&self) -> Xpos {
        assert!(
            self.head_dim % 2 == 0,
            "XPOS needs an even head dimension, got {}",
            self.head_dim
        );
        Xpos {
            head_dim: self.head_dim,
            scale_base: self.scale_base as f32,
        }
    }
}

/// XPOS (extrapolatable rotary) position treatment for queries and keys.
///
/// Applied to tensors laid out `[batch, heads, length, head_dim]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Xpos {
    head_dim: usize,
    scale_base: f32,
}

impl Xpos {
    /// The per-pair decay base `zeta_i = (2i + 0.4 d) / (1.4 d)` (torchscale's `scale` buffer).
    pub fn zeta(&self) -> Vec<f32> {
        let d = self.head_dim as f32;
        (0..self.head_dim / 2)
            .map(|i| ((2 * i) as f32 + 0.4 * d) / (1.4 * d))
            .collect()
    }

    /// Host-side `(cos * s, sin * s)` tables, duplicated per pair, for rows
    /// `offset..offset + length` of a window of `total` positions. Shape of each:
    /// `length * head_dim`, row-major.
    fn tables(&self, length: usize, offset: usize, total: usize, downscale: bool) -> (Vec<f32>, Vec<f32>) {
        let half = self.head_dim / 2;
        // Python's `-(T) // 2` floors towards negative infinity.
        let min_pos = -((total as i64 + 1) / 2);
        let zeta = self.zeta();
        // inv_freq_j = 1 / 10000^(j / half), computed in f32 as torch does.
        let inv_freq: Vec<f32> = (0..half).map(|j| 1.0 / 10000f32.powf(j as f32 / half as f32)).collect();
        let mut cos = Vec::with_capacity(length * self.head_dim);
        let mut sin = Vec::with_capacity(length * self.head_dim);
        for row in offset..offset + length {
            // Centred position for the decay, uncentred index for the rotation angle.
            let n = (min_pos + row as i64) as f32 / self.scale_base;
            let m = row as f32;
            for i in 0..half {
                let mut s = zeta[i].powf(n);
                if downscale {
                    s = 1.0 / s;
                }
                let theta = m * inv_freq[i];
                let c = theta.cos() * s;
                let sn = theta.sin() * s;
                cos.push(c);
                cos.push(c);
                sin.push(sn);
                sin.push(sn);
            }
        }
        (cos, sin)
    }

    /// Apply XPOS to `x` (`[batch, heads, length, head_dim]`) whose first row sits at absolute
    /// index `offset` of a window of `length + offset` positions.
    ///
    /// Queries use `downscale = false`, keys `downscale = true`. During cached decoding the whole
    /// key cache is treated with `offset = 0` and the new queries with
    /// `offset = cache_length - new_length` so both share one window, as torchscale does.
    pub fn apply<B: Backend>(&self, x: Tensor<B, 4>, offset: usize, downscale: bool) -> Tensor<B, 4> {
        let t = x.dims()[2];
        self.apply_in_window(x, offset, offset + t, downscale)
    }

    /// Apply XPOS to `x` (`[batch, heads, length, head_dim]`) holding rows
    /// `offset..offset + length` of a window of `total` positions (the decay is centred on the
    /// window). Used for the segments of a key cache, each treated as part of the whole window.
    pub fn apply_in_window<B: Backend>(
        &self,
        x: Tensor<B, 4>,
        offset: usize,
        total: usize,
        downscale: bool,
    ) -> Tensor<B, 4> {
        let [b, h, t, d] = x.dims();
        assert_eq!(d, self.head_dim, "XPOS head_dim mismatch");
        assert!(
            offset + t <= total,
            "XPOS rows {offset}..{} outside a window of {total}",
            offset + t
        );
        let device = x.device();
        let dtype = x.dtype();
        let (cos, sin) = self.tables(t, offset, total, downscale);
        let cos = Tensor::<B, 2>::from_data(TensorData::new(cos, [t, d]), (&device, dtype)).reshape([1, 1, t, d]);
        let sin = Tensor::<B, 2>::from_data(TensorData::new(sin, [t, d]), (&device, dtype)).reshape([1, 1, t, d]);
        let rotated = rotate_every_two(x.clone(), [b, h, t, d]);
        x * cos + rotated * sin
    }
}

/// `[x0, x1, x2, x3, ...] -> [-x1, x0, -x3, x2, ...]`: the adjacent-pair rotation of GPT-J/XPOS.
fn rotate_every_two<B: Backend>(x: Tensor<B, 4>, [b, h, t, d]: [usize; 4]) -> Tensor<B, 4> {
    let pairs = x.reshape([b, h, t, d / 2, 2]);
    let even = pairs.clone().narrow(4, 0, 1);
    let odd = pairs.narrow(4, 1, 1);
    Tensor::cat(vec![odd.neg(), even], 4).reshape([b, h, t, d])
}

/// Configuration of the absolute sinusoidal position table (fairseq / HF KOSMOS-2 style).
#[derive(Config, Debug, PartialEq)]
pub struct SinusoidalPositionsConfig {
    /// Embedding width.
    pub embedding_dim: usize,
    /// Index of the padding position, whose row is all zeros; real positions start at
    /// `padding_idx + 1`.
    #[config(default = 1)]
    pub padding_idx: usize,
}

impl SinusoidalPositionsConfig {
    /// Build the position operator.
    pub fn init(&self) -> SinusoidalPositions {
        SinusoidalPositions {
            embedding_dim: self.embedding_dim,
            padding_idx: self.padding_idx,
        }
    }
}

/// Absolute sinusoidal positions. The table is a pure function of the row index, so rows are
/// computed for exactly the positions asked for (no fixed maximum, as HF regrows its buffer).
#[derive(Clone, Debug, PartialEq)]
pub struct SinusoidalPositions {
    embedding_dim: usize,
    padding_idx: usize,
}

impl SinusoidalPositions {
    /// One table row, `[sin(p f_0) .. sin(p f_{h-1}), cos(p f_0) .. cos(p f_{h-1}) (, 0)]`, or all
    /// zeros for the padding row. Computed in f32 as the reference does.
    pub fn row(&self, position: usize) -> Vec<f32> {
        let d = self.embedding_dim;
        let half = d / 2;
        let mut out = vec![0.0f32; d];
        if position == self.padding_idx || half == 0 {
            return out;
        }
        // emb = ln(10000) / (half - 1), a Python float, used as an f32 multiplier.
        let step = if half > 1 {
            (10000f64.ln() / (half as f64 - 1.0)) as f32
        } else {
            f32::INFINITY
        };
        let p = position as f32;
        for j in 0..half {
            let freq = (j as f32 * -step).exp();
            let angle = p * freq;
            out[j] = angle.sin();
            out[half + j] = angle.cos();
        }
        out
    }

    /// The whole table `[num_positions, embedding_dim]` as HF's `weights` buffer holds it.
    pub fn table<B: Backend>(&self, num_positions: usize, device: &B::Device) -> Tensor<B, 2> {
        let data: Vec<f32> = (0..num_positions).flat_map(|p| self.row(p)).collect();
        Tensor::from_data(TensorData::new(data, [num_positions, self.embedding_dim]), device)
    }

    /// Embeddings for explicit position ids `[batch, length]` -> `[batch, length, dim]`.
    pub fn embed_positions<B: Backend>(
        &self,
        positions: &[Vec<usize>],
        device: &B::Device,
        dtype: burn::tensor::DType,
    ) -> Tensor<B, 3> {
        let b = positions.len();
        let t = positions.first().map_or(0, Vec::len);
        let d = self.embedding_dim;
        let mut data = Vec::with_capacity(b * t * d);
        for row in positions {
            assert_eq!(row.len(), t, "ragged position ids");
            for &p in row {
                data.extend(self.row(p));
            }
        }
        Tensor::from_data(TensorData::new(data, [b, t, d]), (device, dtype))
    }

    /// Position ids as HF computes them from token ids: real tokens get
    /// `cumsum(non_pad) + past_len + padding_idx`, pad tokens get `padding_idx`.
    pub fn position_ids(&self, input_ids: &[Vec<u32>], pad_token_id: u32, past_len: usize) -> Vec<Vec<usize>> {
        input_ids
            .iter()
            .map(|row| {
                let mut count = 0usize;
                row.iter()
                    .map(|&id| {
                        if id == pad_token_id {
                            self.padding_idx
                        } else {
                            count += 1;
                            count + past_len + self.padding_idx
                        }
                    })
                    .collect()
            })
            .collect()
    }

    /// [`SinusoidalPositions::position_ids`] for rows that pack several documents
    /// (`documents[row][position]`, no cache): each document counts its real tokens from the start,
    /// as if alone in its row; pad tokens get `padding_idx`.
    pub fn position_ids_in_documents(
        &self,
        input_ids: &[Vec<u32>],
        documents: &[Vec<u32>],
        pad_token_id: u32,
    ) -> Vec<Vec<usize>> {
        input_ids
            .iter()
            .zip(documents)
            .map(|(row, docs)| {
                let mut counts = std::collections::HashMap::new();
                row.iter()
                    .zip(docs)
                    .map(|(&id, &doc)| {
                        if id == pad_token_id {
                            self.padding_idx
                        } else {
                            let count = counts.entry(doc).or_insert(0usize);
                            *count += 1;
                            *count + self.padding_idx
                        }
                    })
                    .collect()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_floor_division_of_window_start() {
        let x = XposConfig::new(4).init();
        // total 7 -> min_pos = -4 (Python: -7 // 2 == -4); total 6 -> -3.
        let (c7, _) = x.tables(7, 0, 7, false);
        let (c6, _) = x.tables(6, 0, 6, false);
        let zeta0 = x.zeta()[0];
        assert!((c7[0] - zeta0.powf(-4.0 / 512.0)).abs() < 1e-7);
        assert!((c6[0] - zeta0.powf(-3.0 / 512.0)).abs() < 1e-7);
    }

    #[test]
    fn offset_takes_the_last_rows_of_the_window() {
        let x = XposConfig::new(8).init();
        let (full_c, full_s) = x.tables(5, 0, 5, true);
        let (last_c, last_s) = x.tables(1, 4, 5, true);
        assert_eq!(&full_c[4 * 8..], &last_c[..]);
        assert_eq!(&full_s[4 * 8..], &last_s[..]);
    }

    #[test]
    fn window_pieces_equal_the_whole_window() {
        let x = XposConfig::new(8).init();
        let (full_c, full_s) = x.tables(9, 0, 9, true);
        for (offset, length) in [(0, 3), (3, 4), (7, 2)] {
            let (c, s) = x.tables(length, offset, 9, true);
            assert_eq!(&full_c[offset * 8..(offset + length) * 8], &c[..]);
            assert_eq!(&full_s[offset * 8..(offset + length) * 8], &s[..]);
        }
    }

    #[test]
    fn padding_row_is_zero_and_odd_dim_has_zero_column() {
        let s = SinusoidalPositionsConfig::new(5).init();
        assert!(s.row(1).iter().all(|&v| v == 0.0));
        let r = s.row(3);
        assert_eq!(r[4], 0.0);
        assert!((r[0] - 3f32.sin()).abs() < 1e-6);
        assert!((r[2] - 3f32.cos()).abs() < 1e-6);
    }

    #[test]
    fn position_ids_skip_pads() {
        let s = SinusoidalPositionsConfig::new(4).init();
        let ids = s.position_ids(&[vec![1, 1, 5, 6], vec![5, 6, 7, 8]], 1, 0);
        assert_eq!(ids, vec![vec![1, 1, 2, 3], vec![2, 3, 4, 5]]);
        let ids = s.position_ids(&[vec![5]], 1, 3);
        assert_eq!(ids, vec![vec![5]]);
    }
}
