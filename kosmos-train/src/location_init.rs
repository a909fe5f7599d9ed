//! Sinusoidal initialisation of the location tokens' embeddings for models trained from
//! scratch (`[model] location_init = "sincos2d"`).
//!
//! KOSMOS-2 (Peng et al., 2023) learns its 1,024 location-token embeddings from random starts
//! on 91M grounded image-text pairs. A small model trained on a few thousand pictures sees each
//! location token a few hundred times at most, and random rows say nothing about which cells
//! are neighbours. This initialisation writes, into row `first + row * grid + column` of the
//! token embedding, Fourier features of the cell's centre `u = (column + 0.5) / grid` and
//! `v = (row + 0.5) / grid`: the first half of the dimensions are `sin(w_j u), cos(w_j u)` and
//! the second half the same of `v`, for angular frequencies `w_j` spaced geometrically from
//! `pi` (half a period across the picture) to `pi * grid` (half a period per cell). With the
//! head tied to the embedding, the dot product of two rows is a sum of cosines of their cells'
//! distance per axis, so near cells start with near logits and the model learns one smooth
//! coordinate map instead of 1,024 unrelated classes. The rows are scaled to the random rows'
//! standard deviation and stay trainable. This is a choice of this project (the idea of sinusoidal
//! coordinate features follows the Transformer's positional encoding, Vaswani et al., 2017), not
//! something KOSMOS-2 does.

use burn::prelude::*;
use burn::tensor::Distribution;
use kosmos_models::Kosmos2;

/// A new trainable leaf holding `t`'s values. `Param::map` keeps a parameter trainable only if
/// the mapped tensor requires gradients, and the result of an operation on a parameter is an
/// inner node of the autodiff graph, whose gradient is not kept: without this, a parameter
/// rewritten at initialisation would never be updated.
fn leaf<B: Backend, const D: usize>(t: Tensor<B, D>) -> Tensor<B, D> {
    t.detach().require_grad()
}

/// The `grid * grid` rows of `dim` values (row-major, cell `row * grid + column` first to
/// last), each value scaled so that the rows' standard deviation is `std`.
pub fn sincos_2d_rows(grid: usize, dim: usize, std: f32) -> Vec<f32> {
    let per_axis = dim / 2;
    let freqs = per_axis / 2;
    let omega = |j: usize| -> f64 {
        if freqs <= 1 {
            std::f64::consts::PI
        } else {
            std::f64::consts::PI * (grid as f64).powf(j as f64 / (freqs - 1) as f64)
        }
    };
    // sin and cos have mean square 1/2 over the features; the dimensions left over (odd `dim`)
    // stay zero.
    let scale = std * std::f32::consts::SQRT_2;
    let mut out = vec![0.0f32; grid * grid * dim];
    for row in 0..grid {
        for column in 0..grid {
            let cell = &mut out[(row * grid + column) * dim..][..dim];
            for (axis, pos) in [column, row].into_iter().enumerate() {
                let t = (pos as f64 + 0.5) / grid as f64;
                for j in 0..freqs {
                    let a = omega(j) * t;
                    cell[axis * per_axis + 2 * j] = a.sin() as f32 * scale;
                    cell[axis * per_axis + 2 * j + 1] = a.cos() as f32 * scale;
                }
            }
        }
    }
    out
}

/// [`sincos_2d_rows`] as a `[grid * grid, dim]` tensor on `device`.
fn sincos_2d_tensor<B: Backend>(grid: usize, dim: usize, std: f32, device: &B::Device) -> Tensor<B, 2> {
    Tensor::<B, 1>::from_floats(sincos_2d_rows(grid, dim, std).as_slice(), device).reshape([grid * grid, dim])
}

/// Overwrite the embedding rows `first .. first + grid * grid` of `model`'s token embedding
/// with [`sincos_2d_rows`] at the standard deviation `std`.
///
/// # Panics
/// Never for a valid range; callers check `first + grid * grid <= vocab_size`.
pub fn init_location_embeddings<B: Backend>(model: Kosmos2<B>, first: usize, grid: usize, std: f32) -> Kosmos2<B> {
    let mut model = model;
    let weight = model.text_model.model.embed_tokens.weight;
    model.text_model.model.embed_tokens.weight = weight.map(|w| {
        let [_, dim] = w.dims();
        let device = w.device();
        let rows = sincos_2d_tensor::<B>(grid, dim, std, &device);
        leaf(w.slice_assign([first..first + grid * grid, 0..dim], rows))
    });
    model
}

/// Standard deviation of the vision position features: about that of the patch embeddings of
/// CLIP-normalised pixels at Burn's default convolution initialisation.
pub const VISION_POSITION_STD: f32 = 0.7;

/// Overwrite the CLIP tower's position embeddings with 2D sinusoidal features of each patch's
/// column and row ([`sincos_2d_rows`] on the patch grid, at [`VISION_POSITION_STD`]), and zeros for the class position. Fixed 2D sinusoidal position
/// embeddings are the usual start for vision transformers trained from scratch on little data
/// (MAE, He et al. 2021; "Better plain ViT baselines", Beyer et al. 2022); here they stay
/// trainable.
pub fn init_vision_positions<B: Backend>(model: Kosmos2<B>) -> Kosmos2<B> {
    let mut model = model;
    let weight = model.vision_model.model.embeddings.position_embedding.weight;
    model.vision_model.model.embeddings.position_embedding.weight = weight.map(|w| {
        let [positions, dim] = w.dims();
        let grid = ((positions - 1) as f64).sqrt().round() as usize;
        if grid * grid + 1 != positions {
            return w;
        }
        let device = w.device();
        let rows = sincos_2d_tensor::<B>(grid, dim, VISION_POSITION_STD, &device);
        leaf(Tensor::cat(vec![Tensor::zeros([1, dim], &device), rows], 0))
    });
    model
}

/// Start the image-to-text projection balanced: the latent queries N(0, 1) (transformers'
/// start) and the dense layer N(0, 1) with a zero bias, so that the projected image features are
/// at the latents' scale.
///
/// The projection's keys and values are `[dense(features); latent_query]`, and the features are
/// L2-normalised per token (norm 1). At transformers' scales (dense N(0, 0.02), latents N(0, 1))
/// the image entries are some fifty times smaller than the latent entries: their keys give
/// attention scores near zero, so every latent averages the picture uniformly (only its mean
/// colour gets through) and the gradient that would make the latents pick places is as small as
/// the keys. A model trained from scratch then names colours but puts every box in the same
/// place whatever the picture. With both entries at scale 1 the scores vary from the first step.
pub fn balance_projection<B: Backend>(model: Kosmos2<B>) -> Kosmos2<B> {
    let mut model = model;
    let p = &mut model.image_to_text_projection;
    let [n, d] = p.latent_query.dims();
    let std = 1.0;
    let device = p.latent_query.device();
    p.latent_query = p
        .latent_query
        .clone()
        .map(|_| leaf(Tensor::random([n, d], Distribution::Normal(0.0, std), &device)));
    let weight = p.dense.weight.clone();
    p.dense.weight = weight.map(|w| {
        let dims = w.dims();
        leaf(Tensor::random(dims, Distribution::Normal(0.0, std), &device))
    });
    if let Some(bias) = p.dense.bias.take() {
        p.dense.bias = Some(bias.map(|b| leaf(b.zeros_like())));
    }
    model
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dot(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    #[test]
    fn rows_have_the_requested_scale_and_neighbours_are_closest() {
        let (grid, dim, std) = (32, 128, 0.1f32);
        let rows = sincos_2d_rows(grid, dim, std);
        assert_eq!(rows.len(), grid * grid * dim);
        let ms = rows.iter().map(|v| v * v).sum::<f32>() / rows.len() as f32;
        assert!((ms.sqrt() - std).abs() < 1e-3 * std, "rms {} vs {std}", ms.sqrt());
        let row = |r: usize, c: usize| &rows[(r * grid + c) * dim..][..dim];
        // Each cell's most similar row is itself, and similarity falls with distance along
        // each axis near the cell.
        for (r, c) in [(0, 0), (5, 17), (31, 31), (16, 3)] {
            let me = row(r, c);
            let best = (0..grid * grid)
                .max_by(|&a, &b| dot(me, row(a / grid, a % grid)).total_cmp(&dot(me, row(b / grid, b % grid))))
                .unwrap();
            assert_eq!(best, r * grid + c);
            if c + 2 < grid {
                assert!(dot(me, row(r, c + 1)) > dot(me, row(r, c + 2)));
            }
            if r + 2 < grid {
                assert!(dot(me, row(r + 1, c)) > dot(me, row(r + 2, c)));
            }
        }
    }
}
