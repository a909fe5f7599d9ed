//! Activation functions used by the KOSMOS models.
//!
//! * exact (erf) GELU: the text FFN of KOSMOS-1/2 (`activation_function="gelu"`);
//! * `quick_gelu`, `x * sigmoid(1.702 x)`: the CLIP vision tower (OpenAI CLIP, HF `QuickGELUActivation`).

use burn::config::Config;
use burn::prelude::*;
use burn::tensor::activation::{gelu, relu, sigmoid};

/// An element-wise activation, serialisable under the names the reference configs use.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum Activation {
    /// Exact GELU, `x * Phi(x)` with the error function.
    Gelu,
    /// `x * sigmoid(1.702 x)`.
    QuickGelu,
    /// `max(x, 0)`.
    Relu,
}

impl Activation {
    /// Parse a reference config's activation name (`"gelu"`, `"quick_gelu"`, `"relu"`).
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "gelu" => Some(Self::Gelu),
            "quick_gelu" => Some(Self::QuickGelu),
            "relu" => Some(Self::Relu),
            _ => None,
        }
    }

    /// Apply the activation (GELU and `quick_gelu` through [`crate::fused`]'s kernels where they
    /// apply: flex f32 tensors outside autodiff).
    pub fn forward<B: Backend, const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let fused = match self {
            Self::Gelu => crate::fused::gelu(&x),
            Self::QuickGelu => crate::fused::quick_gelu(&x),
            Self::Relu => None,
        };
        if let Some(y) = fused {
            return y;
        }
        self.forward_reference(x)
    }

    /// Apply the activation with Burn's operations (what [`Activation::forward`] does on other
    /// backends and under autodiff).
    pub fn forward_reference<B: Backend, const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        match self {
            Self::Gelu => gelu(x),
            Self::QuickGelu => x.clone() * sigmoid(x.mul_scalar(1.702)),
            Self::Relu => relu(x),
        }
    }
}
