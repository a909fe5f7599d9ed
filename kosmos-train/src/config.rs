//! The training configuration: one TOML file (`kosmos train --config FILE.toml`).
//!
//! Relative paths in the file (`model.dir`, `output_dir`, data source paths and image roots) are
//! resolved against the directory of the file. Unknown keys are errors. A commented example is
//! in the book's training chapter; the smallest complete file is
//!
//! ```toml
//! steps = 100
//! batch_size = 8
//! output_dir = "runs/grit"
//!
//! [model]
//! dir = "kosmos-2-patch14-224"
//!
//! [optim]
//! lr = 1e-4
//!
//! [data]
//! max_len = 256
//! [[data.sources]]
//! name = "grit"
//! kind = "grit"
//! paths = ["grit.jsonl"]
//! ```

use std::path::{Path, PathBuf};

use kosmos_models::lora::LORA_TARGETS;
use kosmos_models::{LoraSpec, LoraTower};
use kosmos_vision::freeze::VisionFreeze;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::data::DataConfig;
use crate::error::TrainError;
use crate::schedule::{Decay, LrSchedule};

/// How the model's parameters start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelInit {
    /// Fine-tune: load the weights of the Hugging Face directory `model.dir`.
    #[default]
    Pretrained,
    /// From scratch: the architecture of `model.dir/config.json`, random weights with MAGNETO's
    /// initialisation for the text decoder (seeded by `seed`).
    Scratch,
}

/// `[model]`: the model and its tokenizer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// A Hugging Face KOSMOS-2 directory: `config.json`, `tokenizer.json`,
    /// `preprocessor_config.json` and (for `init = "pretrained"`) the safetensors weights.
    pub dir: PathBuf,
    /// `"pretrained"` (default) or `"scratch"`.
    #[serde(default)]
    pub init: ModelInit,
    /// Which parts of the CLIP vision tower train: `"none"` (everything trains, the default),
    /// `"all"` (the tower is frozen) or `"all_but_last"` (only its last layer and final norm
    /// train). Frozen parameters get no gradient, no optimizer state and no update.
    #[serde(default = "default_freeze")]
    pub freeze_vision: VisionFreeze,
    /// How the location tokens' embedding rows start with `init = "scratch"`: `"random"` (the
    /// default, like every other row) or `"sincos2d"` (Fourier features of the cell's column
    /// and row, see [`crate::location_init`]). Ignored for pretrained weights.
    #[serde(default, skip_serializing_if = "LocationInit::is_random")]
    pub location_init: LocationInit,
    /// How the CLIP tower's position embeddings start with `init = "scratch"`: `"random"` (the
    /// default, N(0, 1)) or `"sincos2d"` (Fourier features of each patch's column and row,
    /// zero for the class position; see [`crate::location_init::init_vision_positions`]).
    #[serde(default, skip_serializing_if = "LocationInit::is_random")]
    pub vision_position_init: LocationInit,
    /// How the image-to-text projection starts with `init = "scratch"`: `"random"` (the
    /// default: latent queries N(0, 1), the dense layer at Burn's default), `"balanced"` (the
    /// projected image features at the latent queries' scale, see
    /// [`crate::location_init::balance_projection`]) or `"routed"` (balanced, and each latent
    /// query attends to the patches under its cell of the picture, see
    /// [`crate::location_init::route_projection`]).
    #[serde(default, skip_serializing_if = "ProjectionInit::is_random")]
    pub projection_init: ProjectionInit,
}

/// How the image-to-text projection starts in a model trained from scratch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProjectionInit {
    /// Latent queries N(0, 1), the dense layer at Burn's default.
    #[default]
    Random,
    /// Latent queries and the dense layer N(0, 1), no bias
    /// ([`crate::location_init::balance_projection`]).
    Balanced,
    /// Balanced, and each latent query attends to the patches under its cell of the picture
    /// ([`crate::location_init::route_projection`]).
    Routed,
}

impl ProjectionInit {
    fn is_random(&self) -> bool {
        *self == Self::Random
    }
}

/// How the location tokens' embedding rows (or the vision position embeddings) start in a model
/// trained from scratch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LocationInit {
    /// Random, like the other rows (N(0, d^-1/2)).
    #[default]
    Random,
    /// 2D sinusoidal features of the cell's column and row ([`crate::location_init`]), so that
    /// neighbouring cells start with similar embeddings (and, with the tied head, similar
    /// logits).
    Sincos2d,
}

impl LocationInit {
    fn is_random(&self) -> bool {
        *self == Self::Random
    }
}

fn default_freeze() -> VisionFreeze {
    VisionFreeze::None
}

fn d_beta_1() -> f32 {
    0.9
}
fn d_beta_2() -> f32 {
    0.999
}
fn d_eps() -> f32 {
    1e-8
}
fn d_wd() -> f32 {
    1e-2
}
fn d_clip() -> f64 {
    1.0
}
fn d_one() -> usize {
    1
}
// Settings added after the first release are left out of the serialised configuration at their
// defaults, so that the run hash of an older run's checkpoint stays the same.
fn is_one(v: &usize) -> bool {
    *v == 1
}
fn d_one_u64() -> u64 {
    1
}
fn d_keep() -> usize {
    3
}
fn d_true() -> bool {
    true
}

/// `[optim]`: AdamW (PyTorch's parameterisation), the learning-rate schedule and clipping.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimConfig {
    /// Peak learning rate.
    pub lr: f64,
    /// Learning rate at the end of the decay (default 0).
    #[serde(default)]
    pub min_lr: f64,
    /// Steps of linear warmup from 0 (default 0).
    #[serde(default)]
    pub warmup_steps: u64,
    /// Decay after warmup: `"constant"`, `"linear"` (default) or `"cosine"`.
    #[serde(default)]
    pub decay: Decay,
    /// AdamW `betas[0]` (default 0.9).
    #[serde(default = "d_beta_1")]
    pub beta_1: f32,
    /// AdamW `betas[1]` (default 0.999).
    #[serde(default = "d_beta_2")]
    pub beta_2: f32,
    /// AdamW `eps`, outside the square root (default 1e-8).
    #[serde(default = "d_eps")]
    pub epsilon: f32,
    /// Decoupled weight decay (default 0.01), applied to every trained parameter.
    #[serde(default = "d_wd")]
    pub weight_decay: f32,
    /// Clip the global gradient norm to this (`torch.nn.utils.clip_grad_norm_`; default 1.0,
    /// transformers' default); 0 turns clipping off (the norm is still logged).
    #[serde(default = "d_clip")]
    pub max_grad_norm: f64,
}

/// `[validation]`: periodic validation loss on a separate data set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValidationConfig {
    /// Validate every this many steps (and after the last step).
    pub every: u64,
    /// Batches per validation (always the first ones of `data`, so every validation sees the
    /// same examples).
    #[serde(default = "d_one")]
    pub batches: usize,
    /// Rows per validation batch (default: the training `batch_size`).
    #[serde(default)]
    pub batch_size: Option<usize>,
    /// The validation data (same format as `[data]`).
    pub data: DataConfig,
}

/// `[checkpoint]`: when to write checkpoints and how many to keep.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Write a checkpoint every this many steps (0: only after the last step). The last step
    /// is always checkpointed.
    #[serde(default)]
    pub every: u64,
    /// Keep the newest this many checkpoints, deleting older ones (default 3, at least 1).
    #[serde(default = "d_keep")]
    pub keep_last: usize,
    /// After the last step, also write the model as a Hugging Face directory,
    /// `output_dir/final/` (weights in transformers' layout plus the configuration, tokenizer
    /// and processor files of `model.dir`), which `kosmos generate --model` and transformers'
    /// `from_pretrained` load (default true).
    #[serde(default = "d_true")]
    pub export_final: bool,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self {
            every: 0,
            keep_last: d_keep(),
            export_final: true,
        }
    }
}

/// Format of the metrics log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MetricsFormat {
    /// `metrics.jsonl`: one JSON object per step.
    #[default]
    Jsonl,
    /// `metrics.csv`: a header line, then one row per step.
    Csv,
}

/// `[log]`: the progress line and the metrics file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// Print a progress line (step, loss, learning rate, tokens/s, gradient norm) to stderr every
    /// this many steps (default 1).
    #[serde(default = "d_one_u64")]
    pub every: u64,
    /// Print the progress line at all (default true).
    #[serde(default = "d_true")]
    pub progress: bool,
    /// `"jsonl"` (default) or `"csv"`; the file is `output_dir/metrics.<format>`, one record
    /// per step.
    #[serde(default)]
    pub format: MetricsFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            every: 1,
            progress: true,
            format: MetricsFormat::Jsonl,
        }
    }
}

/// The whole training configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Optimizer steps of the run.
    pub steps: u64,
    /// Rows per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step (default 1). The step's loss is the mean over all scored
    /// tokens of its micro-batches (see [`crate::trainer::accumulate_gradients`]).
    #[serde(default = "d_one")]
    pub grad_accumulation: usize,
    /// Micro-batches computed at the same time, each on its own thread with its own replica of
    /// the model (default 1; see [`crate::trainer::accumulate_gradients_parallel`]). Data
    /// parallelism on one device: on a CPU whose cores a small model leaves idle, set it to the
    /// number of cores and split the batch into that many micro-batches (`grad_accumulation`).
    #[serde(default = "d_one", skip_serializing_if = "is_one")]
    pub parallel_micro_batches: usize,
    /// Regroup each step's rows into micro-batches of about equal cost (default false): the
    /// `batch_size × grad_accumulation` rows of a step are drawn as usual, then sorted by length
    /// and cut into `grad_accumulation` micro-batches (rows of similar length together, so less
    /// padding is computed; the micro-batches' row counts then differ), with the cut points that
    /// make the most expensive micro-batch cheapest (see [`crate::data::balance`]; an image
    /// counts as `Kosmos2Config::image_macs() / text_token_macs()` text positions). The step's
    /// loss and gradient are the same mean over the same rows, up to float rounding.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub balance_micro_batches: bool,
    /// Data parallelism over several devices of the backend chosen at run time (default: none,
    /// everything on the `--device` given): device indices, e.g. `[0, 1]` for `cuda:0` and
    /// `cuda:1`. Each group of `max(parallel_micro_batches, devices)` micro-batches is spread
    /// over replicas of the model on these devices, one thread each; their gradients are summed
    /// on the `--device` (which holds the model and the optimizer state). Set
    /// `grad_accumulation` to a multiple of the number of devices. On a CPU backend every index
    /// is the one CPU (replicas on one device, as `parallel_micro_batches`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<u16>,
    /// Float type of the forward and backward passes (default `"f32"`). `"bf16"` is mixed
    /// precision: each step computes with bf16 copies of the f32 parameters, takes the loss in
    /// f32, and hands f32 gradients to the f32 optimizer (the parameters and the optimizer state
    /// stay f32). Needs a backend with bf16 kernels (flex, cuda).
    #[serde(default, skip_serializing_if = "Precision::is_f32")]
    pub precision: Precision,
    /// Gradient checkpointing (default false): `kosmos train` runs on the autodiff backend with
    /// Burn's balanced checkpointing strategy, which recomputes the results of memory-bound
    /// operations in the backward pass instead of keeping them, trading time for activation
    /// memory; the gradients are the same. It does not change the run (a run may resume with
    /// it switched), so it is not part of [`TrainConfig::run_hash`].
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub gradient_checkpointing: bool,
    /// Base seed: scratch initialisation and the per-step seeds (`step_seed(seed, step)`); the
    /// data order has its own `data.seed`.
    #[serde(default)]
    pub seed: u64,
    /// Run directory: `config.toml`, `metrics.jsonl` (or `.csv`) and `checkpoints/step-NNNNNN/`.
    pub output_dir: PathBuf,
    /// The model.
    pub model: ModelConfig,
    /// Optimizer, schedule and clipping.
    pub optim: OptimConfig,
    /// Training data (see [`DataConfig`]).
    pub data: DataConfig,
    /// Optional periodic validation.
    #[serde(default)]
    pub validation: Option<ValidationConfig>,
    /// Checkpoints.
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
    /// Progress line and metrics file.
    #[serde(default)]
    pub log: LogConfig,
    /// Per-target weights of the next-token loss (default: the plain mean).
    #[serde(default, skip_serializing_if = "LossConfig::is_default")]
    pub loss: LossConfig,
    /// LoRA fine-tuning: adapters on the chosen projections, everything else frozen (default:
    /// none, every parameter not frozen by `model.freeze_vision` trains).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraTrainConfig>,
    /// Data parallelism over several machines (default: none, one machine; see
    /// [`NodesConfig`]). Not part of [`TrainConfig::run_hash`]: the nodes compute the same
    /// steps as one machine would.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<NodesConfig>,
}

/// `[nodes]`: data parallelism over several machines ("nodes") through burn-collective.
///
/// Every node runs `kosmos train` with the same configuration (its own `rank` and `address`,
/// in the file or from `--node-rank` / `--node-address`). Every node draws the whole step's
/// micro-batches from the same seeded sampler (so every node's data position is the same),
/// computes the micro-batches `i` with `i % count == rank` (on its own `devices` /
/// `parallel_micro_batches`), and the nodes sum their gradients and losses with one
/// all-reduce per step through burn-collective's global orchestrator; every node then makes the
/// same AdamW step, so the replicas stay equal. The result is the step of one machine over all
/// the micro-batches, up to float rounding (set `grad_accumulation` to a multiple of `count`).
/// Only rank 0 writes (`config.toml`, metrics, checkpoints, `final/`); another rank resumes from
/// rank 0's checkpoint (`kosmos train --resume DIR --node-rank R`).
///
/// ```toml
/// [nodes]
/// count = 2
/// rank = 0                                 # or --node-rank
/// orchestrator = "ws://10.0.0.1:3870"      # `kosmos orchestrator --port 3870`, or:
/// serve_orchestrator = true                # rank 0 serves it itself
/// address = "ws://10.0.0.1:3871"           # or --node-address; reachable by the other nodes
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodesConfig {
    /// Nodes in the run (at least 2).
    pub count: u32,
    /// This node's rank, `0..count` (default 0).
    #[serde(default)]
    pub rank: u32,
    /// The global orchestrator's address, `ws://HOST:PORT`.
    pub orchestrator: String,
    /// Whether this node (rank 0) serves the orchestrator itself, on the port of
    /// `orchestrator` (default false: it runs apart, `kosmos orchestrator --port PORT`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub serve_orchestrator: bool,
    /// This node's address as the other nodes reach it, `ws://HOST:PORT`; its tensor service
    /// listens on that port.
    pub address: String,
}

impl NodesConfig {
    /// The port of a `ws://HOST:PORT` address (`key` names it in the error).
    pub fn port_of(address: &str, key: &str) -> Result<u16, TrainError> {
        let rest = address
            .strip_prefix("ws://")
            .ok_or_else(|| TrainError::Invalid(format!("`{key}` must be ws://HOST:PORT, found {address:?}")))?;
        let port = rest.trim_end_matches('/').rsplit_once(':').map(|(_, p)| p);
        port.and_then(|p| p.parse().ok()).ok_or_else(|| {
            TrainError::Invalid(format!(
                "`{key}` must be ws://HOST:PORT (a port number), found {address:?}"
            ))
        })
    }

    fn validate(&self) -> Result<(), TrainError> {
        if self.count < 2 {
            return Err(TrainError::Invalid(format!(
                "`nodes.count` must be >= 2, found {} (leave [nodes] out for one machine)",
                self.count
            )));
        }
        if self.rank >= self.count {
            return Err(TrainError::Invalid(format!(
                "`nodes.rank` must be < nodes.count = {}, found {}",
                self.count, self.rank
            )));
        }
        if self.serve_orchestrator && self.rank != 0 {
            return Err(TrainError::Invalid(format!(
                "`nodes.serve_orchestrator` is for rank 0 only, found it on rank {}",
                self.rank
            )));
        }
        Self::port_of(&self.orchestrator, "nodes.orchestrator")?;
        Self::port_of(&self.address, "nodes.address")?;
        Ok(())
    }
}

/// `[lora]`: parameter-efficient fine-tuning with LoRA adapters (Hu et al., 2021).
///
/// Adapters `scale * x A B` (`A: [in, rank]`, `B: [rank, out]`, `B` starting at zero) sit beside
/// the chosen projections; every other parameter is frozen (so `model.freeze_vision` does not
/// apply). Checkpoints hold only the adapters and their optimizer state; the final export merges
/// them into a plain Hugging Face model (`final/`) and also writes them as a PEFT adapter
/// (`final/adapter/`). Needs `model.init = "pretrained"`.
///
/// ```toml
/// [lora]
/// rank = 8
/// alpha = 16                      # default 2 * rank
/// targets = ["q_proj", "v_proj"]  # default: q_proj, k_proj, v_proj, out_proj, fc1, fc2
/// towers = ["text"]               # "text" (default), "vision", "projection"
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraTrainConfig {
    /// Rank of every adapter.
    pub rank: usize,
    /// Scaling numerator: the update is multiplied by `alpha / rank` (default `2 * rank`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alpha: Option<f64>,
    /// Dropout on the adapters' input during training (default 0).
    #[serde(default)]
    pub dropout: f64,
    /// rsLoRA scaling `alpha / sqrt(rank)` (default false).
    #[serde(default)]
    pub rslora: bool,
    /// Projection names to adapt.
    #[serde(default = "d_lora_targets")]
    pub targets: Vec<String>,
    /// Towers whose projections are adapted.
    #[serde(default = "d_lora_towers")]
    pub towers: Vec<LoraTower>,
}

fn d_lora_targets() -> Vec<String> {
    LORA_TARGETS.iter().map(|s| s.to_string()).collect()
}

fn d_lora_towers() -> Vec<LoraTower> {
    vec![LoraTower::Text]
}

impl LoraTrainConfig {
    /// The adapter specification for [`kosmos_models::Kosmos2::attach_lora`].
    pub fn spec(&self) -> LoraSpec {
        let mut spec = LoraSpec::new(self.rank);
        spec.adapter = spec
            .adapter
            .with_alpha(self.alpha.unwrap_or(2.0 * self.rank as f64))
            .with_dropout(self.dropout)
            .with_rslora(self.rslora);
        spec.targets = self.targets.clone();
        spec.towers = self.towers.clone();
        spec
    }
}

/// Float type of the training computation ([`TrainConfig::precision`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// Everything in f32.
    #[default]
    F32,
    /// Mixed precision: bf16 forward and backward, f32 parameters, loss and optimizer.
    Bf16,
}

impl Precision {
    /// The compute dtype.
    pub fn dtype(self) -> burn::tensor::DType {
        match self {
            Self::F32 => burn::tensor::DType::F32,
            Self::Bf16 => burn::tensor::DType::BF16,
        }
    }

    fn is_f32(&self) -> bool {
        *self == Self::F32
    }
}

/// `[loss]`: per-target weights of the next-token loss.
///
/// The loss of a step is `sum(w * nll) / sum(w)` over its scored targets, where `w` is
/// `location_weight` for a location token (`<patch_index_NNNN>`) and 1 for every other token;
/// the default weight 1 gives the paper's plain mean. The logged `loss` is that weighted mean.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LossConfig {
    /// Weight of the targets that are location tokens, relative to 1 for the others (default
    /// 1). A box is two tokens among the dozens of a caption, so the signal that teaches the
    /// model where things are is a small share of a plain mean; a weight above 1 raises it.
    #[serde(default = "d_one_f64")]
    pub location_weight: f64,
}

impl Default for LossConfig {
    fn default() -> Self {
        Self { location_weight: 1.0 }
    }
}

impl LossConfig {
    /// Whether this is the default (the plain mean).
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

fn d_one_f64() -> f64 {
    1.0
}

impl TrainConfig {
    /// Read a TOML file, resolve its relative paths against the file's directory and validate.
    pub fn from_toml_file(path: impl AsRef<Path>) -> Result<Self, TrainError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
        let mut config = Self::from_toml_str(&text, path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.resolve_relative_to(base);
        config.validate()?;
        Ok(config)
    }

    /// Parse TOML text (`path` names it in errors); paths stay as written.
    pub fn from_toml_str(text: &str, path: &Path) -> Result<Self, TrainError> {
        toml::from_str(text).map_err(|e| TrainError::Config {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }

    /// The configuration as TOML (what a checkpoint stores).
    pub fn to_toml(&self) -> Result<String, TrainError> {
        toml::to_string(self).map_err(|e| TrainError::Invalid(format!("cannot write the configuration as TOML: {e}")))
    }

    /// Resolve relative paths against `base`.
    pub fn resolve_relative_to(&mut self, base: &Path) {
        let join = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        join(&mut self.model.dir);
        join(&mut self.output_dir);
        self.data.resolve_relative_to(base);
        if let Some(v) = self.validation.as_mut() {
            v.data.resolve_relative_to(base);
        }
    }

    /// Check values that serde cannot; errors name the key.
    pub fn validate(&self) -> Result<(), TrainError> {
        let bad = |key: &str, rule: &str, found: String| {
            Err(TrainError::Invalid(format!("`{key}` must be {rule}, found {found}")))
        };
        let o = &self.optim;
        if self.steps == 0 {
            return bad("steps", ">= 1", "0".into());
        }
        if self.batch_size == 0 {
            return bad("batch_size", ">= 1", "0".into());
        }
        if self.parallel_micro_batches == 0 {
            return bad("parallel_micro_batches", ">= 1", "0".into());
        }
        let mut seen = std::collections::BTreeSet::new();
        if let Some(d) = self.devices.iter().find(|d| !seen.insert(**d)) {
            return bad("devices", "distinct device indices", format!("{d} twice"));
        }
        if self.grad_accumulation == 0 {
            return bad("grad_accumulation", ">= 1", "0".into());
        }
        if let Some(nodes) = &self.nodes {
            nodes.validate()?;
            if self.grad_accumulation % nodes.count as usize != 0 {
                return bad(
                    "grad_accumulation",
                    &format!("a multiple of nodes.count = {}", nodes.count),
                    self.grad_accumulation.to_string(),
                );
            }
        }
        if !(o.lr.is_finite() && o.lr > 0.0) {
            return bad("optim.lr", "finite and > 0", o.lr.to_string());
        }
        if !(o.min_lr.is_finite() && o.min_lr >= 0.0 && o.min_lr <= o.lr) {
            return bad("optim.min_lr", "finite, >= 0 and <= optim.lr", o.min_lr.to_string());
        }
        for (key, beta) in [("optim.beta_1", o.beta_1), ("optim.beta_2", o.beta_2)] {
            if !(0.0..1.0).contains(&beta) {
                return bad(key, "in [0, 1)", beta.to_string());
            }
        }
        if !(o.epsilon.is_finite() && o.epsilon > 0.0) {
            return bad("optim.epsilon", "finite and > 0", o.epsilon.to_string());
        }
        if !(o.weight_decay.is_finite() && o.weight_decay >= 0.0) {
            return bad("optim.weight_decay", "finite and >= 0", o.weight_decay.to_string());
        }
        if !(o.max_grad_norm.is_finite() && o.max_grad_norm >= 0.0) {
            return bad("optim.max_grad_norm", "finite and >= 0", o.max_grad_norm.to_string());
        }
        let lw = self.loss.location_weight;
        if !(lw.is_finite() && lw > 0.0) {
            return bad("loss.location_weight", "finite and > 0", lw.to_string());
        }
        if let Some(lora) = &self.lora {
            lora.spec()
                .validate()
                .map_err(|e| TrainError::Invalid(format!("`lora`: {e}")))?;
            if self.model.init != ModelInit::Pretrained {
                return bad(
                    "model.init",
                    "\"pretrained\" with [lora] (LoRA adapts a trained model)",
                    format!("{:?}", self.model.init).to_lowercase(),
                );
            }
        }
        if self.checkpoint.keep_last == 0 {
            return bad("checkpoint.keep_last", ">= 1", "0".into());
        }
        if self.log.every == 0 {
            return bad("log.every", ">= 1", "0".into());
        }
        if let Some(v) = &self.validation {
            if v.every == 0 {
                return bad("validation.every", ">= 1", "0".into());
            }
            if v.batches == 0 || v.batch_size == Some(0) {
                return bad("validation.batches and validation.batch_size", ">= 1", "0".into());
            }
            v.data.validate()?;
        }
        self.data.validate()?;
        Ok(())
    }

    /// The learning-rate schedule of the run.
    pub fn schedule(&self) -> LrSchedule {
        LrSchedule {
            lr: self.optim.lr,
            min_lr: self.optim.min_lr,
            warmup_steps: self.optim.warmup_steps,
            total_steps: self.steps,
            decay: self.optim.decay,
        }
    }

    /// SHA-256 (hex) of everything that defines the run: the configuration without
    /// `output_dir` (a run directory may be moved), without `log` (how progress is shown) and
    /// without `gradient_checkpointing` and `nodes` (how gradients are computed, not what they
    /// are).
    /// A checkpoint records it; resuming with a different configuration is refused.
    pub fn run_hash(&self) -> String {
        let mut c = self.clone();
        c.output_dir = PathBuf::new();
        c.log = LogConfig::default();
        c.gradient_checkpointing = false;
        c.nodes = None;
        let json = serde_json::to_string(&c).expect("the configuration serialises");
        let digest = Sha256::digest(json.as_bytes());
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }
}
