//! AdamW with PyTorch's parameterisation and defaults (`torch.optim.AdamW`), running Burn's own
//! [`burn::optim::AdamW`].
//!
//! For a parameter `p` with gradient `g` at step `t = 1, 2, ...` (moments `m = v = 0` before step
//! 1), PyTorch 2.15 (`torch/optim/adam.py`, `_single_tensor_adam` with
//! `decoupled_weight_decay=True`, the CPU default) computes
//!
//! ```text
//! p <- p * (1 - lr * weight_decay)                 decoupled decay, on the pre-update p
//! m <- beta1 * m + (1 - beta1) * g                 (exp_avg.lerp_(g, 1 - beta1))
//! v <- beta2 * v + (1 - beta2) * g^2
//! p <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
//! ```
//!
//! Burn 0.21 (`burn-optim-0.21.0/src/optim/adamw.rs`) computes, in `AdaptiveMomentumW::transform`
//! (lines 153-221), the same moments (lines 161-199), `m_hat = m / (1 - beta1^t)` (204-207),
//! `v_hat = v / (1 - beta2^t)` (215) and `delta = m_hat / (sqrt(v_hat) + eps)` (217-218), and in
//! `AdamW::step` (lines 81-100) `p <- p * (1 - lr * weight_decay) - lr * delta`. That is the
//! same function: `sqrt(v_hat) = sqrt(v) / sqrt(1 - beta2^t)`, `eps` is added *outside* the root
//! in both, and both decay the parameter as it was before the step (the update does not depend
//! on `p`). What differs is rounding only: Burn evaluates `1 - beta`, `beta^t` (`powi`) and the
//! corrections in f32 where PyTorch uses Python floats (f64), divides inside the root rather
//! than outside, and uses multiply-add rather than `lerp`. The parity test
//! (`kosmos-train/tests/all/step_parity.rs`, fixtures from `scripts/make_step_fixtures.py`)
//! measures the result against `torch.optim.AdamW` after one and two steps on six parameters of
//! a KOSMOS-2 model (the fixture script itself re-derives the update in float64 for all of them); the f32 `beta^t` drifts from f64 by about `t * 1e-7` relative, which moves
//! an update by far less than its own rounding for any realistic `t`.
//!
//! So no optimizer of our own is needed; [`AdamWConfig`] only fixes the parameterisation:
//! PyTorch's names, defaults (`betas = (0.9, 0.999)`, `eps = 1e-8`, `weight_decay = 1e-2`; Burn's
//! own defaults are `eps = 1e-5`, `weight_decay = 1e-4`), no AMSGrad and no cautious weight
//! decay. As in PyTorch, every parameter that receives a gradient is decayed (biases and norms
//! included); parameters without a gradient are left alone. Gradient clipping is not part of
//! it: Burn's `GradientClippingConfig::Norm` clips each tensor by its own norm, not by the
//! global norm of `torch.nn.utils.clip_grad_norm_`.

use burn::config::Config;
use burn::module::AutodiffModule;
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{AdamW, AdamWConfig as BurnAdamWConfig};
use burn::tensor::backend::AutodiffBackend;

/// `torch.optim.AdamW`'s hyperparameters (the learning rate is passed to each
/// [`Optimizer::step`](burn::optim::Optimizer::step)), with PyTorch's defaults.
#[derive(Config, Debug)]
pub struct AdamWConfig {
    /// `betas[0]`: decay of the first moment.
    #[config(default = 0.9)]
    pub beta_1: f32,
    /// `betas[1]`: decay of the second moment.
    #[config(default = 0.999)]
    pub beta_2: f32,
    /// `eps`, added to `sqrt(v_hat)` (outside the root).
    #[config(default = 1e-8)]
    pub epsilon: f32,
    /// Decoupled weight decay: each step multiplies the parameter by `1 - lr * weight_decay`.
    #[config(default = 1e-2)]
    pub weight_decay: f32,
}

impl AdamWConfig {
    /// The same optimizer as Burn's configuration (no AMSGrad, no cautious decay, no clipping).
    pub fn to_burn(&self) -> BurnAdamWConfig {
        BurnAdamWConfig::new()
            .with_beta_1(self.beta_1)
            .with_beta_2(self.beta_2)
            .with_epsilon(self.epsilon)
            .with_weight_decay(self.weight_decay)
            .with_amsgrad(false)
            .with_cautious_weight_decay(false)
            .with_grad_clipping(None)
    }

    /// The optimizer for a module `M`: use it as `optim.step(lr, model, grads)` with
    /// `grads = GradientsParams::from_grads(loss.backward(), &model)`, or hand it to burn-train.
    pub fn init<B: AutodiffBackend, M: AutodiffModule<B>>(&self) -> OptimizerAdaptor<AdamW, M, B> {
        self.to_burn().init()
    }
}

/// `torch.optim.AdamW(params, lr, betas, eps, weight_decay)` for a module `M` (the learning rate
/// goes to each step).
pub fn adamw<B: AutodiffBackend, M: AutodiffModule<B>>(
    betas: (f32, f32),
    eps: f32,
    weight_decay: f32,
) -> OptimizerAdaptor<AdamW, M, B> {
    AdamWConfig::new()
        .with_beta_1(betas.0)
        .with_beta_2(betas.1)
        .with_epsilon(eps)
        .with_weight_decay(weight_decay)
        .init()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_pytorch_defaults() {
        let c = AdamWConfig::new();
        assert_eq!(
            (c.beta_1, c.beta_2, c.epsilon, c.weight_decay),
            (0.9, 0.999, 1e-8, 1e-2)
        );
    }
}
