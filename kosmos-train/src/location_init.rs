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
/// The side of the square patch grid of a position table of `positions` rows (class row
/// first), if it is square.
fn patch_grid(positions: usize) -> Option<usize> {
    let side = (positions.saturating_sub(1) as f64).sqrt().round() as usize;
    (side > 0 && side * side + 1 == positions).then_some(side)
}

pub fn init_vision_positions<B: Backend>(model: Kosmos2<B>) -> Kosmos2<B> {
    let mut model = model;
    let weight = model.vision_model.model.embeddings.position_embedding.weight;
    model.vision_model.model.embeddings.position_embedding.weight = weight.map(|w| {
        let [positions, dim] = w.dims();
        let Some(grid) = patch_grid(positions) else {
            return w;
        };
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

/// The share of its attention that [`route_projection`] gives each latent's own patches on a
/// blank picture, on average over latents and heads.
pub const ROUTE_SHARE: f64 = 0.7;

/// Start the image-to-text projection *routed*: latent query `i` of a grid of latents laid over
/// the picture attends to the patches under its cell, so that the image embeddings the text
/// model sees start as a map of the picture instead of `n` copies of its average.
///
/// Why: with any random start the latents' attention is nearly uniform, every image embedding is
/// the same average, the text model's gradient is the same for all of them, and the symmetry that
/// would let a latent specialise on a place breaks only through the latents' small random
/// differences (a model trained so names the colours of a picture but not where they are).
///
/// How (an exact construction, then all of it trains): the dense layer is
/// [`balance_projection`]'s; the features of a blank picture (zero after normalisation, the mean
/// colour) give each patch `j` a projected vector `h_j` that only its position distinguishes;
/// `c_j = h_j - mean(h)`. The even coordinates carry the keys and the odd ones the queries:
/// `k_proj` copies the even coordinates and subtracts the blank mean (its bias), `q_proj` moves
/// the odd coordinates onto the even ones, and latent `i` holds `beta * mean(c_j over its cell)`
/// in its odd coordinates and the blank mean in its even ones. Its own key is then zero (the
/// keys include the latents themselves), and its score for patch `j` is `beta * t_i . c_j` per
/// head, largest under its cell; `beta` is the smallest that gives its own patches
/// [`ROUTE_SHARE`] of its attention on average (keys: the class token, the patches and the
/// latents). Values and output projections keep their random start.
///
/// Returns the model and the own patches' mean attention share reached (on a blank picture,
/// over latents and heads). Needs a square patch grid and biased key and query projections
/// (KOSMOS-2's). The blank picture's size (patch grid times patch side) and the number of heads
/// come from the model. The latents' grid is `rows x cols` with `rows` the largest divisor of
/// their count up to its square root.
pub fn route_projection<B: Backend>(model: Kosmos2<B>) -> Result<(Kosmos2<B>, f64), String> {
    let mut model = balance_projection(model);
    let embeddings = &model.vision_model.model.embeddings;
    let positions = embeddings.position_embedding.weight.dims()[0];
    let gp = patch_grid(positions).ok_or_else(|| {
        format!(
            "routed projection needs a square patch grid, and the vision tower has {} patch positions",
            positions.saturating_sub(1)
        )
    })?;
    let image_size = gp * embeddings.patch_size();
    let num_heads = model.image_to_text_projection.x_attn.num_heads();
    let device = model.image_to_text_projection.latent_query.device();
    let blank = Tensor::<B, 4>::zeros([1, 3, image_size, image_size], &device);
    let features = model.vision_model.model.image_features(blank, false).detach();
    let hidden = model.image_to_text_projection.dense.forward(features).detach();
    let [_, tokens, dim] = hidden.dims();
    let h: Vec<f32> = hidden
        .into_data()
        .convert::<f32>()
        .to_vec()
        .map_err(|e| format!("routed projection: reading the blank features: {e:?}"))?;
    let patches = tokens - 1;
    let [latents, width] = model.image_to_text_projection.latent_query.dims();
    // The latents' grid: `rows x cols` with rows the largest divisor of their count up to its
    // square root (8 x 8 for KOSMOS-2's 64, 2 x 4 for 8).
    let rows = (1..=latents)
        .take_while(|r| r * r <= latents)
        .filter(|r| latents % r == 0)
        .max()
        .unwrap_or(1);
    let cols = latents / rows;
    if width != dim || dim % num_heads != 0 || (dim / num_heads) % 2 != 0 {
        return Err(format!(
            "routed projection needs latent queries as wide as the projected features and an even \
             head width: latents {width}, features {dim}, {num_heads} heads"
        ));
    }
    let attn = &model.image_to_text_projection.x_attn;
    if attn.k_proj.bias.is_none() || attn.q_proj.bias.is_none() {
        return Err("routed projection needs biased key and query projections".into());
    }
    // Centred blank vectors of the patches (row 0 is the class token).
    let mut mean = vec![0.0f32; dim];
    for j in 0..patches {
        for (m, v) in mean.iter_mut().enumerate() {
            *v += h[(1 + j) * dim + m] / patches as f32;
        }
    }
    let c: Vec<Vec<f32>> = (0..patches)
        .map(|j| (0..dim).map(|m| h[(1 + j) * dim + m] - mean[m]).collect())
        .collect();
    // The patches under each latent's cell.
    let span = |r: usize, n: usize| {
        let lo = r * gp / n;
        lo..((r + 1) * gp / n).max(lo + 1)
    };
    let cells: Vec<Vec<usize>> = (0..latents)
        .map(|i| {
            let (r, col) = (i / cols, i % cols);
            span(r, rows)
                .flat_map(|pr| span(col, cols).map(move |pc| pr * gp + pc))
                .collect()
        })
        .collect();
    let targets: Vec<Vec<f32>> = cells
        .iter()
        .map(|cell| {
            (0..dim)
                .map(|m| cell.iter().map(|&j| c[j][m]).sum::<f32>() / cell.len() as f32)
                .collect()
        })
        .collect();
    // Scores at beta = 1 of every (latent, head) over the keys of a blank picture: the class
    // token, the patches (even coordinates only), and the latents (zero: their keys vanish).
    let head = dim / num_heads;
    let scale = (head as f32).powf(-0.5);
    let cls: Vec<f32> = (0..dim).map(|m| h[m] - mean[m]).collect();
    let mut scored: Vec<(Vec<f32>, &Vec<usize>)> = Vec::new();
    for (i, cell) in cells.iter().enumerate() {
        for hd in 0..num_heads {
            let dot = |v: &[f32]| -> f32 {
                (hd * head..(hd + 1) * head)
                    .step_by(2)
                    .map(|m| targets[i][m] * v[m])
                    .sum::<f32>()
                    * scale
            };
            let mut scores = vec![dot(&cls)];
            scores.extend(c.iter().map(|cj| dot(cj)));
            scored.push((scores, cell));
        }
    }
    // The mean attention share of a latent's own patches at a given beta.
    let share = |beta: f32| -> f64 {
        let mut total = 0.0f64;
        for (scores, cell) in &scored {
            let top = scores.iter().fold(0.0f32, |a, &v| a.max(beta * v));
            let e: Vec<f64> = scores.iter().map(|&v| ((beta * v - top) as f64).exp()).collect();
            let sum = e.iter().sum::<f64>() + latents as f64 * ((-top) as f64).exp();
            total += cell.iter().map(|&j| e[1 + j]).sum::<f64>() / sum;
        }
        total / scored.len() as f64
    };
    // The smallest beta on a geometric ladder that reaches ROUTE_SHARE, else the best one.
    let ladder = (0..=400).map(|k| 10f32.powf(-2.0 + k as f32 * 0.015));
    let mut best = (0.0f32, share(0.0));
    for beta in ladder {
        let s = share(beta);
        if s > best.1 {
            best = (beta, s);
        }
        if s >= ROUTE_SHARE {
            break;
        }
    }
    let (beta, reached) = best;
    if reached < 0.5 {
        return Err(format!(
            "routed projection: the latents' own patches get at most {reached:.2} of the attention on a \
             blank picture (the position embeddings barely distinguish the patches; use \
             vision_position_init = \"sincos2d\")"
        ));
    }
    let mut query = vec![0.0f32; latents * dim];
    for i in 0..latents {
        for m in (0..dim).step_by(2) {
            query[i * dim + m] = mean[m];
            query[i * dim + m + 1] = beta * targets[i][m];
        }
    }
    let mut wk = vec![0.0f32; dim * dim];
    let mut wq = vec![0.0f32; dim * dim];
    let mut bk = vec![0.0f32; dim];
    for m in (0..dim).step_by(2) {
        wk[m * dim + m] = 1.0; // weight is [in, out]: k[m] = x[m]
        wq[(m + 1) * dim + m] = 1.0; // q[m] = x[m + 1]
        bk[m] = -mean[m];
    }
    let matrix = |v: Vec<f32>, d: &B::Device| Tensor::<B, 1>::from_floats(v.as_slice(), d).reshape([dim, dim]);
    let p = &mut model.image_to_text_projection;
    p.latent_query = p.latent_query.clone().map(|q| {
        let d = q.device();
        leaf(Tensor::<B, 1>::from_floats(query.as_slice(), &d).reshape([latents, dim]))
    });
    let attn = &mut p.x_attn;
    attn.k_proj.weight = attn.k_proj.weight.clone().map(|w| leaf(matrix(wk, &w.device())));
    attn.q_proj.weight = attn.q_proj.weight.clone().map(|w| leaf(matrix(wq, &w.device())));
    if let Some(b) = attn.k_proj.bias.take() {
        attn.k_proj.bias = Some(b.map(|b| leaf(Tensor::<B, 1>::from_floats(bk.as_slice(), &b.device()))));
    }
    if let Some(b) = attn.q_proj.bias.take() {
        attn.q_proj.bias = Some(b.map(|b| leaf(b.zeros_like())));
    }
    Ok((model, reached))
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
