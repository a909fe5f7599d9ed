//! Clipping by the global gradient norm, as `torch.nn.utils.clip_grad_norm_(params, max_norm)`
//! (norm type 2, `foreach` or not):
//!
//! ```text
//! total = sqrt(sum over every gradient tensor g of sum(g^2))
//! coef  = max_norm / (total + 1e-6)
//! if coef < 1: every g <- g * coef
//! ```
//!
//! (PyTorch multiplies by `min(coef, 1)` always; multiplying by 1 changes nothing.) Burn's own
//! `GradientClipping::Norm` clips each tensor by its own norm, which is a different rule. The
//! squares are summed on the device in f32 (gradients of other float types are cast first), so
//! one number comes back to the host per call.

use burn::module::{AutodiffModule, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::DType;
use burn::tensor::backend::AutodiffBackend;

struct SumSquares<'a, B: AutodiffBackend> {
    grads: &'a GradientsParams,
    total: Option<Tensor<B::InnerBackend, 1>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for SumSquares<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = self.grads.get::<B::InnerBackend, D>(param.id) {
            let s = g.cast(DType::F32).powi_scalar(2).sum();
            self.total = Some(match self.total.take() {
                Some(t) => t + s,
                None => s,
            });
        }
    }
}

struct Scale<'a> {
    grads: &'a mut GradientsParams,
    factor: f64,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Scale<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = self.grads.remove::<B::InnerBackend, D>(param.id) {
            self.grads.register(param.id, g.mul_scalar(self.factor));
        }
    }
}

/// The global L2 norm of the gradients of `module`'s parameters (0 without gradients).
pub fn global_grad_norm<B: AutodiffBackend, M: AutodiffModule<B>>(module: &M, grads: &GradientsParams) -> f64 {
    let mut visitor = SumSquares::<B> { grads, total: None };
    module.visit(&mut visitor);
    match visitor.total {
        Some(t) => t.into_scalar().elem::<f64>().sqrt(),
        None => 0.0,
    }
}

/// Multiply every gradient of `module`'s parameters by `factor`.
pub fn scale_grads<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    mut grads: GradientsParams,
    factor: f64,
) -> GradientsParams {
    module.visit(&mut Scale {
        grads: &mut grads,
        factor,
    });
    grads
}

/// `torch.nn.utils.clip_grad_norm_(module.parameters(), max_norm)`: returns the clipped
/// gradients and the total norm *before* clipping (what PyTorch returns). A non-finite norm is
/// returned as is, with the gradients unchanged (the trainer stops on it).
pub fn clip_grad_norm<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    grads: GradientsParams,
    max_norm: f64,
) -> (GradientsParams, f64) {
    let total = global_grad_norm::<B, M>(module, &grads);
    if !total.is_finite() {
        return (grads, total);
    }
    let coef = max_norm / (total + 1e-6);
    if coef < 1.0 {
        (scale_grads::<B, M>(module, grads, coef), total)
    } else {
        (grads, total)
    }
}
