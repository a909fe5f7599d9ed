//! Freezing the vision tower for training.
//!
//! KOSMOS-1 trains with CLIP frozen except its last layer; KOSMOS-2 fine-tuning commonly freezes
//! the whole tower. Frozen parameters are marked as not requiring gradients, so the autodiff
//! backend computes no gradient for them and optimizers leave them unchanged.

use burn::module::{Module, ModuleMapper, Param};
use burn::prelude::*;

use crate::clip::ClipVisionModel;

/// Which parts of the vision tower stay trainable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum VisionFreeze {
    /// Everything trains.
    None,
    /// Nothing trains.
    All,
    /// Only the last encoder layer and the final `post_layernorm` (whose output feeds the
    /// resampler) train: the KOSMOS-1 recipe.
    AllButLast,
}

struct RequireGrad(bool);

impl<B: Backend> ModuleMapper<B> for RequireGrad {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        param.set_require_grad(self.0)
    }
}

/// Mark every parameter of `module` as trainable (`true`) or frozen (`false`).
pub fn set_trainable<B: Backend, M: Module<B>>(module: M, trainable: bool) -> M {
    module.map(&mut RequireGrad(trainable))
}

/// Apply a freezing policy to the vision tower.
pub fn freeze_vision<B: Backend>(model: ClipVisionModel<B>, policy: VisionFreeze) -> ClipVisionModel<B> {
    match policy {
        VisionFreeze::None => set_trainable(model, true),
        VisionFreeze::All => set_trainable(model, false),
        VisionFreeze::AllButLast => {
            let mut model = set_trainable(model, false);
            if let Some(last) = model.encoder.layers.pop() {
                model.encoder.layers.push(set_trainable(last, true));
            }
            model.post_layernorm = set_trainable(model.post_layernorm, true);
            model
        }
    }
}
