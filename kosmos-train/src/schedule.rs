//! Learning-rate schedules: linear warmup from 0, then constant, linear or cosine decay to
//! `min_lr`.
//!
//! `lr_at(i)` is the learning rate of optimizer step `i`, counted from 0 (the first step is
//! `i = 0`; the trainer's step `s = 1, 2, ...` uses `lr_at(s - 1)`). With `w` warmup steps, `T`
//! total steps, peak `lr` and floor `min_lr`:
//!
//! ```text
//! i < w:          lr * i / w                                   (linear warmup from 0)
//! otherwise, with progress p = min(1, (i - w) / max(1, T - w)):
//!   constant:     lr
//!   linear:       min_lr + (lr - min_lr) * (1 - p)
//!   cosine:       min_lr + (lr - min_lr) * 0.5 * (1 + cos(pi * p))
//! ```
//!
//! With `min_lr = 0` these are transformers' `get_constant_schedule_with_warmup`,
//! `get_linear_schedule_with_warmup` and `get_cosine_schedule_with_warmup` (`num_cycles = 0.5`)
//! applied to step `i` (transformers' `LambdaLR` uses its step counter, 0 for the first
//! optimizer step, so the first warmup step has learning rate 0 there too); with `min_lr > 0`
//! cosine is `get_cosine_with_min_lr_schedule_with_warmup(min_lr=...)`. One difference: past
//! `T` the progress stays at 1 (transformers' cosine would rise again).

use serde::{Deserialize, Serialize};

/// The shape of the learning rate after warmup.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decay {
    /// Stay at the peak.
    Constant,
    /// Linearly to `min_lr` at the last step.
    #[default]
    Linear,
    /// Half a cosine to `min_lr` at the last step.
    Cosine,
}

/// Warmup then decay (see the module documentation for the formulas).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    /// Peak learning rate (reached at the end of warmup).
    pub lr: f64,
    /// Floor of the decay.
    pub min_lr: f64,
    /// Warmup steps (linear from 0).
    pub warmup_steps: u64,
    /// Total optimizer steps of the run (where the decay reaches `min_lr`).
    pub total_steps: u64,
    /// Decay after warmup.
    pub decay: Decay,
}

impl LrSchedule {
    /// The learning rate of optimizer step `i` (0 for the first step).
    pub fn lr_at(&self, i: u64) -> f64 {
        if i < self.warmup_steps {
            return self.lr * i as f64 / self.warmup_steps as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let p = ((i - self.warmup_steps) as f64 / span).min(1.0);
        let factor = match self.decay {
            Decay::Constant => return self.lr,
            Decay::Linear => 1.0 - p,
            Decay::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * p).cos()),
        };
        self.min_lr + (self.lr - self.min_lr) * factor
    }
}
