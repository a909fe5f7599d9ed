//! The language-modelling loss of KOSMOS: next-token cross-entropy over text positions only.
//!
//! `labels` are aligned with the inputs (HF convention): the loss at position `t` compares the
//! logits at `t` with the label at `t + 1`; labels equal to [`IGNORE_INDEX`] (image slots,
//! padding, instruction prompts) do not count. The mean is over counted tokens.

use burn::prelude::*;
use burn::tensor::activation::log_softmax;

/// Label value that is not counted (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// Mean next-token cross-entropy; `logits: [batch, len, vocab]`, `labels: [batch, len]`.
/// Returns a scalar tensor (zero when nothing is counted).
pub fn causal_lm_loss<B: Backend>(logits: Tensor<B, 3>, labels: Tensor<B, 2, Int>) -> Tensor<B, 1> {
    let device = logits.device();
    let Some((picked, counted)) = target_log_probs(logits, labels) else {
        return Tensor::zeros([1], &device);
    };
    let weights = counted.float().cast(picked.dtype());
    let total = weights.clone().sum().clamp_min(1.0);
    (picked * weights).sum().neg() / total
}

/// [`causal_lm_loss`] with a weight per target: `weights: [batch, len]` is aligned with
/// `labels` (the weight of the label at `t`, which the logits at `t - 1` predict). Labels equal
/// to [`IGNORE_INDEX`] count nothing whatever their weight. Returns `sum(w * nll) / sum(w)` over
/// the counted targets (zero when nothing is counted); with every weight 1 it equals
/// [`causal_lm_loss`]. Weights must be finite and >= 0.
pub fn weighted_causal_lm_loss<B: Backend>(
    logits: Tensor<B, 3>,
    labels: Tensor<B, 2, Int>,
    weights: Tensor<B, 2>,
) -> Tensor<B, 1> {
    let [b, t] = weights.dims();
    let Some((picked, counted)) = target_log_probs(logits, labels) else {
        return Tensor::zeros([1], &weights.device());
    };
    let weights = weights
        .narrow(1, 1, t - 1)
        .reshape([b * (t - 1)])
        .cast(picked.dtype())
        .mask_fill(counted.bool_not(), 0.0);
    let total = weights.clone().sum();
    // Guard the empty case without flooring the weight sum at 1 (weights may be below 1).
    let total = total.clone().mask_fill(total.equal_elem(0.0), 1.0);
    (picked * weights).sum().neg() / total
}

/// The log-probability of each next-token target, `[batch * (len - 1)]` (token 0's where not counted),
/// and which targets count; `None` for sequences shorter than 2.
fn target_log_probs<B: Backend>(
    logits: Tensor<B, 3>,
    labels: Tensor<B, 2, Int>,
) -> Option<(Tensor<B, 1>, Tensor<B, 1, Bool>)> {
    let [b, t, v] = logits.dims();
    if t < 2 {
        return None;
    }
    let logits = logits.narrow(1, 0, t - 1).reshape([b * (t - 1), v]);
    let targets = labels.narrow(1, 1, t - 1).reshape([b * (t - 1)]);
    let counted = targets.clone().not_equal_elem(IGNORE_INDEX);
    let safe_targets = targets.mask_fill(counted.clone().bool_not(), 0);
    let log_probs = log_softmax(logits, 1);
    let picked = log_probs
        .gather(1, safe_targets.reshape([b * (t - 1), 1]))
        .reshape([b * (t - 1)]);
    Some((picked, counted))
}
