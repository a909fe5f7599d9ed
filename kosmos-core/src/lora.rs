//! LoRA: low-rank adapters on linear projections, for parameter-efficient fine-tuning.
//!
//! Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models" (arXiv:2106.09685). A
//! frozen projection `y = x W + b` gains a trainable low-rank update,
//! `y = x W + b + scale * dropout(x) A B`, with `A: [in, rank]`, `B: [rank, out]` and
//! `scale = alpha / rank` (or `alpha / sqrt(rank)`, rsLoRA, Kalajdzievski 2023,
//! arXiv:2312.03732). `A` starts like PyTorch's `nn.Linear` weight (uniform in
//! `+-1/sqrt(in)`, PEFT's Kaiming-uniform with `a = sqrt(5)`) and `B` at zero, so an attached
//! adapter leaves the model's function unchanged until it trains. [`merge_into`] folds the update
//! into `W` for inference.
//!
//! Matches Hugging Face PEFT's `LoraLayer` for `nn.Linear` (`lora_A`, `lora_B`, `scaling`,
//! `lora_dropout`, `merge`); `A` and `B` are stored transposed with respect to PEFT's
//! `lora_A.weight` (`[rank, in]`) and `lora_B.weight` (`[out, rank]`), as Burn stores every linear
//! weight `[in, out]`.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::{Dropout, DropoutConfig, Linear};
use burn::prelude::*;
use burn::tensor::Distribution;
use burn::tensor::module::linear;

use crate::packed::{PackedWeight, WeightMode};

/// Configuration of one [`LoraAdapter`].
#[derive(Config, Debug, PartialEq)]
pub struct LoraConfig {
    /// Rank of the update (`r`).
    pub rank: usize,
    /// Scaling numerator (`lora_alpha`); the update is multiplied by `alpha / rank`.
    #[config(default = 16.0)]
    pub alpha: f64,
    /// Dropout probability on the adapter's input (`lora_dropout`), active in training only.
    #[config(default = 0.0)]
    pub dropout: f64,
    /// rsLoRA scaling `alpha / sqrt(rank)` instead of `alpha / rank` (`use_rslora`).
    #[config(default = false)]
    pub rslora: bool,
}

impl LoraConfig {
    /// The factor applied to `x A B`.
    pub fn scale(&self) -> f64 {
        if self.rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }

    /// An adapter for a `[d_in, d_out]` projection: `A` uniform in `+-1/sqrt(d_in)` (drawn from
    /// the backend's generator), `B` zero.
    pub fn init<B: Backend>(&self, d_in: usize, d_out: usize, device: &B::Device) -> LoraAdapter<B> {
        assert!(self.rank > 0, "LoRA rank must be >= 1");
        let bound = 1.0 / (d_in as f64).sqrt();
        let a = Tensor::random([d_in, self.rank], Distribution::Uniform(-bound, bound), device);
        let b = Tensor::zeros([self.rank, d_out], device);
        self.init_with(a, b)
    }

    /// As [`LoraConfig::init`], with `A` drawn on the host from `seed` (SplitMix64): the same
    /// values on every backend, whatever else draws from the backend's process-wide generator.
    pub fn init_seeded<B: Backend>(&self, d_in: usize, d_out: usize, seed: u64, device: &B::Device) -> LoraAdapter<B> {
        assert!(self.rank > 0, "LoRA rank must be >= 1");
        let bound = 1.0 / (d_in as f64).sqrt();
        let mut state = seed;
        let values: Vec<f32> = (0..d_in * self.rank)
            .map(|_| {
                state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                z ^= z >> 31;
                let unit = (z >> 11) as f64 / (1u64 << 53) as f64;
                ((2.0 * unit - 1.0) * bound) as f32
            })
            .collect();
        let a = Tensor::from_data(TensorData::new(values, [d_in, self.rank]), device);
        let b = Tensor::zeros([self.rank, d_out], device);
        self.init_with(a, b)
    }

    /// An adapter with the given factors `a: [in, rank]` and `b: [rank, out]` (loading).
    pub fn init_with<B: Backend>(&self, a: Tensor<B, 2>, b: Tensor<B, 2>) -> LoraAdapter<B> {
        LoraAdapter {
            lora_a: Param::from_tensor(a),
            lora_b: Param::from_tensor(b),
            dropout: DropoutConfig::new(self.dropout).init(),
            scale: self.scale(),
        }
    }
}

/// A low-rank update `scale * dropout(x) A B` beside a frozen projection.
#[derive(Module, Debug)]
pub struct LoraAdapter<B: Backend> {
    /// `A: [in, rank]` (PEFT's `lora_A.weight` transposed).
    pub lora_a: Param<Tensor<B, 2>>,
    /// `B: [rank, out]` (PEFT's `lora_B.weight` transposed).
    pub lora_b: Param<Tensor<B, 2>>,
    /// Dropout on the adapter's input.
    pub dropout: Dropout,
    #[module(skip)]
    scale: f64,
}

impl<B: Backend> LoraAdapter<B> {
    /// The update `scale * dropout(x) A B` for `x: [..., in]`.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let h = linear(self.dropout.forward(x), self.lora_a.val(), None);
        linear(h, self.lora_b.val(), None).mul_scalar(self.scale)
    }

    /// The factor applied to `x A B`.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// The rank.
    pub fn rank(&self) -> usize {
        self.lora_a.dims()[1]
    }

    /// The dense update `scale * A B`, `[in, out]` (what merging adds to the weight).
    pub fn delta(&self) -> Tensor<B, 2> {
        self.lora_a.val().matmul(self.lora_b.val()).mul_scalar(self.scale)
    }
}

/// `linear(x)` plus the adapter's update when there is one. With a packed copy of the weight
/// (bf16 or Q8, [`crate::packed`]) that serves the rows ([`PackedWeight::serves`]: a decode
/// step), the product uses the packed copy; otherwise the f32 weight.
pub fn forward_with<B: Backend, const D: usize>(
    linear: &Linear<B>,
    adapter: Option<&LoraAdapter<B>>,
    packed: Option<&PackedWeight<B>>,
    x: Tensor<B, D>,
) -> Tensor<B, D> {
    let dims = x.dims();
    let rows: usize = dims[..D - 1].iter().product();
    let base = |x: Tensor<B, D>| match packed {
        Some(packed) if packed.serves(rows) => packed.forward(x, linear.bias.as_ref().map(|b| b.val())),
        _ => crate::gemv::linear(linear, x),
    };
    match adapter {
        Some(adapter) => base(x.clone()) + adapter.forward(x),
        None => base(x),
    }
}

/// Fold the adapter into the projection (`W += scale * A B`; the bias is unchanged) and remove
/// it. Without an adapter, nothing changes. The merged weight keeps the projection's parameter
/// id and its trainable flag.
pub fn merge_into<B: Backend>(linear: &mut Linear<B>, adapter: &mut Option<LoraAdapter<B>>) {
    if let Some(adapter) = adapter.take() {
        let delta = adapter.delta().detach();
        let trainable = linear.weight.val().is_require_grad();
        linear.weight = linear.weight.clone().map(|w| {
            let merged = w.detach() + delta;
            if trainable { merged.require_grad() } else { merged }
        });
    }
}

/// A projection and its adapter slot, as the modules that carry adapters expose them (see
/// [`crate::MultiHeadAttention::lora_slots`]).
pub struct LoraSlot<'a, B: Backend> {
    /// The projection's name in the module (`q_proj`, `fc1`, ...), as in the state-dict tree.
    pub name: &'static str,
    /// The frozen projection.
    pub linear: &'a mut Linear<B>,
    /// Its adapter, if attached.
    pub adapter: &'a mut Option<LoraAdapter<B>>,
    /// Its reduced-precision copy for decode steps, if packed ([`crate::packed`]).
    pub packed: &'a mut Option<PackedWeight<B>>,
}

impl<'a, B: Backend> LoraSlot<'a, B> {
    /// The slot of projection `name`.
    pub fn new(
        name: &'static str,
        linear: &'a mut Linear<B>,
        adapter: &'a mut Option<LoraAdapter<B>>,
        packed: &'a mut Option<PackedWeight<B>>,
    ) -> Self {
        Self {
            name,
            linear,
            adapter,
            packed,
        }
    }

    /// `[in, out]` of the projection.
    pub fn dims(&self) -> [usize; 2] {
        self.linear.weight.dims()
    }

    /// Attach a fresh adapter (replacing any), `A` drawn from `seed` ([`LoraConfig::init_seeded`]).
    pub fn attach(&mut self, config: &LoraConfig, seed: u64, device: &B::Device) {
        let [d_in, d_out] = self.dims();
        *self.adapter = Some(config.init_seeded(d_in, d_out, seed, device));
    }

    /// Fold the adapter into the projection and remove it. A packed copy is dropped (it no
    /// longer matches the weight; pack again after merging).
    pub fn merge(&mut self) {
        if self.adapter.is_some() {
            *self.packed = None;
        }
        merge_into(self.linear, self.adapter);
    }

    /// Keep a reduced-precision copy of the weight for decode steps (`F32`: drop any copy). The
    /// f32 weight stays: products with many rows (prompts, training) use it.
    pub fn pack(&mut self, mode: WeightMode) {
        *self.packed = PackedWeight::pack(self.linear.weight.val(), mode);
    }
}
