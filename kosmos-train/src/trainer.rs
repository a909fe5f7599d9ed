//! The training loop: [`Trainer`], generic over Burn's autodiff backends.
//!
//! One optimizer step of a run with `grad_accumulation = k`:
//!
//! 1. re-seed the backend with [`step_seed`]`(seed, step)`;
//! 2. draw `k` micro-batches of `batch_size` rows from the resumable [`DataLoader`];
//! 3. [`accumulate_gradients`]: forward, [`causal_lm_loss`], backward per micro-batch, each loss
//!    weighted by its share of the step's scored tokens (see there); with `[loss]` weights,
//!    [`weighted_causal_lm_loss`] and shares by weight ([`accumulate_weighted_gradients`]);
//! 4. stop with [`TrainError::NonFinite`] if the loss is NaN or infinite (nothing is applied or
//!    checkpointed);
//! 5. clip by the global norm ([`clip_grad_norm`], `optim.max_grad_norm`);
//! 6. AdamW ([`crate::optim`]) with the schedule's learning rate ([`crate::schedule`]);
//! 7. log metrics, validate every `validation.every` steps, checkpoint every `checkpoint.every`
//!    steps and after the last ([`crate::checkpoint`]).
//!
//! # Why not burn-train's `Learner`
//!
//! burn-train 0.21.0 was read (`learner/supervised/strategies/single/epoch.rs`,
//! `learner/base.rs`, `checkpoint/file.rs`) before writing this loop. Its `Learner` does not
//! fit the requirements without replacing most of it:
//!
//! - checkpoints and resumption are per *epoch* (`LearningCheckpointer::checkpoint(epoch)`,
//!   resume restarts at `checkpoint + 1`), while our data is an endless weighted mixture whose
//!   position ([`crate::data::DataState`]) must be saved at any step; its data loaders are
//!   `Arc<dyn DataLoader>` iterated afresh each epoch, with no way to save or restore a
//!   position mid-epoch;
//! - `FileCheckpointer` writes model, optimizer and scheduler records straight to their final
//!   paths (no temporary file and rename), with no step, data or RNG state, and a failed save
//!   panics (`expect("Can save model checkpoint.")`);
//! - the optimizer step (`Learner::optimizer_step`) follows the gradients directly: there is no
//!   place for clipping by the *global* norm (only the optimizer's per-tensor clipping) or for
//!   refusing a step whose loss is not finite;
//! - its gradient accumulation sums the micro-batch gradients of losses that are each a mean
//!   over their own tokens; weighting by scored tokens needs the count of the whole step before
//!   the first backward;
//! - the dependency is heavy: even with `default-features = false` it pulls burn-dataset,
//!   `rstest` as a normal dependency, tracing-appender and csv (the default features add the
//!   ratatui TUI, sysinfo and NVML).
//!
//! What is reused from Burn: the autodiff backend, [`GradientsParams`] and burn-optim's
//! [`GradientsAccumulator`], its AdamW, and the record format of the checkpoint files. Several
//! devices are driven by [`accumulate_on_devices`] (Burn's `Module::fork` and
//! `GradientsParams::to_device`, what burn-train's multi-device strategy is built on), several
//! machines by burn-collective's all-reduce ([`crate::collective`]).

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::{AutodiffModule, Module, ModuleMapper, ModuleVisitor, Param};
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{AdamW, GradientsAccumulator, GradientsParams, Optimizer};
use burn::prelude::*;
use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder, Recorder};
use burn::tensor::DType;
use burn::tensor::backend::AutodiffBackend;
use kosmos_core::backend::AutodiffTask;
use kosmos_core::cast_floats;
use kosmos_models::grounding::patch_index_token;
use kosmos_models::loss::{IGNORE_INDEX, causal_lm_loss, weighted_causal_lm_loss};
use kosmos_models::processor::Kosmos2Processor;
use kosmos_models::{Kosmos2, Kosmos2Config, Kosmos2Input};
use kosmos_vision::freeze::freeze_vision;

use crate::checkpoint::{self, RngState, TrainState, step_seed};
use crate::clip::{clip_grad_norm, global_grad_norm};
use crate::collective::NodeGroup;
use crate::config::{LocationInit, ModelInit, ProjectionInit, TrainConfig};
use crate::data::{Batch, CollateConfig, Collator, DataConfig, DataLoader, Encoded, balance};
use crate::error::TrainError;
use crate::location_init::{balance_projection, init_location_embeddings, init_vision_positions, route_projection};
use crate::metrics::{MetricsLog, StepMetrics};
use crate::optim::AdamWConfig;
use crate::schedule::LrSchedule;

/// The optimizer of a [`Trainer`].
pub type TrainOptimizer<B> = OptimizerAdaptor<AdamW, Kosmos2<B>, B>;

type FileRecorder = NamedMpkFileRecorder<FullPrecisionSettings>;

/// Scored tokens of a batch: the labels that [`causal_lm_loss`] counts (not the first position
/// of a row, not [`IGNORE_INDEX`]).
pub fn scored_tokens(batch: &Batch) -> u64 {
    batch
        .labels
        .iter()
        .map(|row| row.iter().skip(1).filter(|&&l| l != IGNORE_INDEX).count() as u64)
        .sum()
}

/// Input tokens (attention mask 1) of a batch.
pub fn input_tokens(batch: &Batch) -> u64 {
    batch
        .attention_mask
        .iter()
        .map(|row| row.iter().filter(|&&m| m != 0).count() as u64)
        .sum()
}

/// The mean next-token loss of a batch (over its scored tokens), on any backend.
pub fn batch_loss<B: Backend>(
    model: &Kosmos2<B>,
    batch: &Batch,
    device: &B::Device,
) -> Result<Tensor<B, 1>, TrainError> {
    let (logits, labels) = logits_and_labels(model, batch, device)?;
    Ok(causal_lm_loss(logits, labels))
}

/// The forward pass of a batch: its logits and its labels, as tensors.
fn logits_and_labels<B: Backend>(
    model: &Kosmos2<B>,
    batch: &Batch,
    device: &B::Device,
) -> Result<(Tensor<B, 3>, Tensor<B, 2, Int>), TrainError> {
    let t = batch.to_tensors::<B>(device);
    let has_images = t.pixel_values.is_some();
    let input = Kosmos2Input {
        input_ids: t.input_ids,
        attention_mask: Some(t.attention_mask),
        pixel_values: t.pixel_values,
        image_embeds_position_mask: has_images.then_some(t.image_embeds_position_mask),
    };
    // Rows packing several documents keep each document to itself.
    let packed = batch.document_ids.iter().flatten().any(|&d| d > 1);
    let logits = if packed {
        model.forward_packed(&input, &batch.document_ids)?.logits
    } else {
        model.forward(&input)?.logits
    };
    // The loss is taken in f32 also when the model computes in a lower precision.
    let logits = if logits.dtype() == DType::F32 {
        logits
    } else {
        logits.cast(DType::F32)
    };
    Ok((logits, t.labels))
}

/// Per-target weights of the next-token loss (`[loss]` of a [`TrainConfig`]): location tokens
/// (a consecutive id range) weigh `location`, every other target 1.
#[derive(Clone, Debug, PartialEq)]
pub struct LossWeights {
    /// The location tokens' ids and their weight; `None`: every target weighs 1.
    pub location: Option<(std::ops::Range<i64>, f32)>,
}

impl LossWeights {
    /// Every target weighs 1 (the plain mean of [`causal_lm_loss`]).
    pub fn uniform() -> Self {
        Self { location: None }
    }

    /// The weight of target `label` (0 for [`IGNORE_INDEX`]).
    pub fn weight(&self, label: i64) -> f32 {
        match &self.location {
            _ if label == IGNORE_INDEX => 0.0,
            Some((ids, w)) if ids.contains(&label) => *w,
            _ => 1.0,
        }
    }

    /// The sum of the weights of a batch's scored targets (its [`scored_tokens`] when uniform).
    pub fn total(&self, batch: &Batch) -> f64 {
        match self.location {
            None => scored_tokens(batch) as f64,
            Some(_) => batch
                .labels
                .iter()
                .flat_map(|row| row.iter().skip(1))
                .map(|&l| self.weight(l) as f64)
                .sum(),
        }
    }

    /// The weights of `batch`'s labels as a `[rows, len]` tensor, or `None` when uniform.
    fn tensor<B: Backend>(&self, batch: &Batch, device: &B::Device) -> Option<Tensor<B, 2>> {
        self.location.as_ref()?;
        let flat: Vec<f32> = batch.labels.iter().flatten().map(|&l| self.weight(l)).collect();
        Some(Tensor::from_data(
            TensorData::new(flat, [batch.len(), batch.seq_len()]),
            device,
        ))
    }
}

/// The weighted loss of a batch ([`LossWeights`]; [`batch_loss`] when uniform).
pub fn weighted_batch_loss<B: Backend>(
    model: &Kosmos2<B>,
    batch: &Batch,
    weights: &LossWeights,
    device: &B::Device,
) -> Result<Tensor<B, 1>, TrainError> {
    let Some(w) = weights.tensor::<B>(batch, device) else {
        return batch_loss(model, batch, device);
    };
    let (logits, labels) = logits_and_labels(model, batch, device)?;
    Ok(weighted_causal_lm_loss(logits, labels, w))
}

/// The gradients of one optimizer step over several micro-batches.
pub struct Accumulated {
    /// Mean loss over every scored token of all micro-batches (the weighted mean under
    /// [`LossWeights`]).
    pub loss: f64,
    /// The gradients of that mean loss (parameters without a gradient are absent).
    pub grads: GradientsParams,
    /// Scored tokens of all micro-batches.
    pub scored_tokens: u64,
    /// Input tokens of all micro-batches.
    pub tokens: u64,
}

/// Forward and backward over `batches`, accumulating the gradients of the mean loss over all
/// their scored tokens: micro-batch `i` with `n_i` of the `N` scored tokens contributes
/// `loss_i * n_i / N` (its own mean loss times its share). That is what transformers' Trainer
/// computes when the model receives `num_items_in_batch` (the default for causal LMs since
/// 4.46): the result equals one batch made of the union of the micro-batches' rows, whatever
/// their padding. (A plain `loss_i / k` would weight a token of a short micro-batch more.)
///
/// Stops with [`TrainError::NonFinite`] (`step` names it) as soon as a micro-batch's loss is
/// not finite. Micro-batches without scored tokens are skipped.
pub fn accumulate_gradients<B: AutodiffBackend>(
    model: &Kosmos2<B>,
    batches: &[Batch],
    device: &B::Device,
    step: u64,
) -> Result<Accumulated, TrainError> {
    accumulate_gradients_parallel(model, batches, device, step, 1)
}

/// [`accumulate_gradients`] with up to `threads` micro-batches computed at the same time, each
/// on its own thread with its own replica of the model ([`fork`]): data parallelism on one
/// device, for CPU backends whose kernels leave cores idle on small models. The gradients are
/// summed in micro-batch order whatever thread finishes first, so a run is reproducible for a
/// given `threads`; the result equals the sequential one up to float rounding.
pub fn accumulate_gradients_parallel<B: AutodiffBackend>(
    model: &Kosmos2<B>,
    batches: &[Batch],
    device: &B::Device,
    step: u64,
    threads: usize,
) -> Result<Accumulated, TrainError> {
    accumulate_weighted_gradients(model, batches, &LossWeights::uniform(), device, step, threads)
}

/// [`accumulate_gradients_parallel`] for a weighted loss ([`LossWeights`]): micro-batch `i`
/// contributes its weighted mean times its share `W_i / W` of the step's target weights, so that
/// the result is again the weighted mean over the union of the micro-batches' rows.
pub fn accumulate_weighted_gradients<B: AutodiffBackend>(
    model: &Kosmos2<B>,
    batches: &[Batch],
    weights: &LossWeights,
    device: &B::Device,
    step: u64,
    threads: usize,
) -> Result<Accumulated, TrainError> {
    accumulate_on_devices(model, batches, weights, device, step, &Workers::threads(threads))
}

/// How the micro-batches of a step are computed: on how many threads, on which devices, in which
/// float type.
#[derive(Clone, Debug)]
pub struct Workers<B: Backend> {
    /// Micro-batches computed at the same time (each on its own thread and model replica).
    pub threads: usize,
    /// Devices of the replicas (empty: the main device).
    pub devices: Vec<B::Device>,
    /// The float type of the forward and backward passes: `F32`, or `BF16` for mixed precision
    /// (bf16 copies of the f32 parameters compute; the loss is taken in f32 from f32 logits; the
    /// gradients come back as f32 for the f32 parameters and the optimizer).
    pub compute: DType,
    /// `(index, of)`: compute only the micro-batches `i` with `i % of == index` (this node's
    /// share of a multi-node step, see [`crate::collective`]); `(0, 1)` computes all. The loss
    /// and gradients returned are then this share's part of the step's sums.
    pub shard: (usize, usize),
}

impl<B: Backend> Workers<B> {
    /// `threads` replicas on the main device, in f32.
    pub fn threads(threads: usize) -> Self {
        Self {
            threads,
            devices: Vec::new(),
            compute: DType::F32,
            shard: (0, 1),
        }
    }
}

/// Data parallelism over several devices: [`accumulate_weighted_gradients`] with micro-batch
/// `i` of each group of `max(threads, devices.len())` computed by a replica of the model on
/// `devices[i % devices.len()]` ([`Module::fork`]: the same parameter ids, its own autodiff
/// graph), on its own thread, and its gradients moved to `device` (where the model and the
/// optimizer live) and summed there in micro-batch order. With `devices` empty, every replica is
/// on `device`. The result is the step of one worker on the union of the micro-batches, up to
/// float rounding (tested with two workers against the doubled batch).
pub fn accumulate_on_devices<B: AutodiffBackend>(
    model: &Kosmos2<B>,
    batches: &[Batch],
    weights: &LossWeights,
    device: &B::Device,
    step: u64,
    workers: &Workers<B>,
) -> Result<Accumulated, TrainError> {
    let (threads, devices, compute) = (workers.threads, workers.devices.as_slice(), workers.compute);
    let mixed = compute != DType::F32;
    let counts: Vec<f64> = batches.iter().map(|b| weights.total(b)).collect();
    let total_weight: f64 = counts.iter().sum();
    let total: u64 = batches.iter().map(scored_tokens).sum();
    let tokens = batches.iter().map(input_tokens).sum();
    let mut accumulator = GradientsAccumulator::<Kosmos2<B>>::new();
    let mut loss = 0.0;
    let (index, of) = workers.shard;
    let work: Vec<(&Batch, f64)> = batches
        .iter()
        .zip(&counts)
        .enumerate()
        .filter(|(i, (_, n))| **n > 0.0 && i % of.max(1) == index)
        .map(|(_, (b, &n))| (b, n / total_weight))
        .collect();
    // One micro-batch: its loss value and the gradients of `loss * share` for `replica`, which
    // lives on `on`; the gradients are returned on `device` (moved there with `devices`, also
    // when `on` is `device`, so that one code path serves one CPU and several GPUs).
    let one = |replica: &Kosmos2<B>,
               on: &B::Device,
               batch: &Batch,
               share: f64|
     -> Result<(f64, GradientsParams), TrainError> {
        let l = weighted_batch_loss(replica, batch, weights, on)?;
        let value: f64 = l.clone().into_scalar().elem();
        if !value.is_finite() {
            return Err(TrainError::NonFinite {
                step,
                what: "loss",
                value,
                last_checkpoint: None,
            });
        }
        let mut grads = GradientsParams::from_grads(l.mul_scalar(share).backward(), replica);
        if mixed {
            grads_to_f32(replica, &mut grads);
        }
        let grads = if devices.is_empty() {
            grads
        } else {
            grads.to_device(device, replica)
        };
        Ok((value, grads))
    };
    let group = threads.max(devices.len()).max(1);
    for chunk in work.chunks(group) {
        let results: Vec<Result<(f64, GradientsParams), TrainError>> =
            if chunk.len() == 1 && devices.is_empty() && !mixed {
                vec![one(model, device, chunk[0].0, chunk[0].1)]
            } else {
                let replicas: Vec<(Kosmos2<B>, B::Device)> = (0..chunk.len())
                    .map(|i| {
                        let (replica, on) = match devices.get(i % devices.len().max(1)) {
                            Some(d) => (model.clone().fork(d), d.clone()),
                            _ => (fork(model), device.clone()),
                        };
                        // Mixed precision: the replica's parameters are low-precision leaves with the
                        // f32 parameters' ids.
                        (if mixed { cast_floats(replica, compute) } else { replica }, on)
                    })
                    .collect();
                std::thread::scope(|scope| {
                    let handles: Vec<_> = chunk
                        .iter()
                        .zip(&replicas)
                        .map(|(&(batch, share), (replica, on))| scope.spawn(move || one(replica, on, batch, share)))
                        .collect();
                    handles
                        .into_iter()
                        .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                        .collect()
                })
            };
        for (&(_, share), r) in chunk.iter().zip(results) {
            let (value, grads) = r?;
            loss += value * share;
            accumulator.accumulate(model, grads);
        }
    }
    Ok(Accumulated {
        loss,
        grads: accumulator.grads(),
        scored_tokens: total,
        tokens,
    })
}

/// A replica of `model` for another thread: the same parameter ids and values, but fresh
/// autodiff nodes, so that its forward pass builds a graph of its own (Burn's autodiff merges
/// graphs that share a node and runs their backward passes under one lock).
pub fn fork<B: AutodiffBackend>(model: &Kosmos2<B>) -> Kosmos2<B> {
    model.clone().map(&mut Fork)
}

struct Fork;
impl<B: AutodiffBackend> ModuleMapper<B> for Fork {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        let tracked = tensor.is_require_grad();
        let tensor = tensor.detach();
        Param::from_mapped_value(id, if tracked { tensor.require_grad() } else { tensor }, mapper)
    }
}

/// Bring every gradient of `model`'s parameters in `grads` to f32 (mixed precision: gradients
/// of low-precision parameter copies, for the f32 parameters with the same ids).
fn grads_to_f32<B: AutodiffBackend>(model: &Kosmos2<B>, grads: &mut GradientsParams) {
    struct ToF32<'a>(&'a mut GradientsParams);
    impl<B: AutodiffBackend> ModuleVisitor<B> for ToF32<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if let Some(g) = self.0.remove::<B::InnerBackend, D>(param.id) {
                self.0.register(param.id, g.cast(DType::F32));
            }
        }
    }
    model.visit(&mut ToF32(grads));
}

/// The device with index `index` of the same kind as `device` (`cuda:1` for `cuda:0` and 1;
/// the one CPU device, again, for a CPU backend).
pub fn device_at<B: Backend>(device: &B::Device, index: u16) -> B::Device {
    use burn::tensor::backend::{Device, DeviceId};
    let id = device.to_id();
    B::Device::from_id(DeviceId {
        type_id: id.type_id,
        index_id: index,
    })
}

/// `(all, trainable)` parameter counts of `model`.
pub fn param_counts<B: AutodiffBackend>(model: &Kosmos2<B>) -> (usize, usize) {
    struct Count(usize, usize);
    impl<B: Backend> ModuleVisitor<B> for Count {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let n = param.val().shape().num_elements();
            self.0 += n;
            if param.val().is_require_grad() {
                self.1 += n;
            }
        }
    }
    let mut count = Count(0, 0);
    model.visit(&mut count);
    (count.0, count.1)
}

/// Forces Burn's lazily initialised parameters (so that clones share values).
struct Materialize;
impl<B: Backend> ModuleMapper<B> for Materialize {}

/// The first location token's id and the grid side, from the model directory's tokenizer; the
/// `grid * grid` location tokens must have consecutive ids inside the vocabulary.
/// `what` names the setting that needs them in errors.
fn location_rows(model_dir: &Path, model_config: &Kosmos2Config, what: &str) -> Result<(usize, usize), TrainError> {
    let path = model_dir.join("tokenizer.json");
    let bad = |message: String| TrainError::Config {
        path: path.clone(),
        message,
    };
    let processor =
        Kosmos2Processor::from_dir(model_dir, model_config.latent_query_num).map_err(|e| bad(e.to_string()))?;
    let grid = processor.grid();
    let tokenizer = processor.tokenizer();
    let first = tokenizer.token_to_id(&patch_index_token(0)).ok_or_else(|| {
        bad(format!(
            "{what} needs location tokens, and there is no <patch_index_0000>"
        ))
    })? as usize;
    for i in 0..grid * grid {
        let token = patch_index_token(i as i64);
        if tokenizer.token_to_id(&token) != Some((first + i) as u32) {
            return Err(bad(format!(
                "{what} needs consecutive ids for the location tokens, and {token} is not id {}",
                first + i
            )));
        }
    }
    let vocab = model_config.text_config.vocab_size;
    if first + grid * grid > vocab {
        return Err(bad(format!(
            "the location tokens end at id {} beyond the model's vocab_size {vocab}",
            first + grid * grid - 1
        )));
    }
    Ok((first, grid))
}

/// Export the model of a checkpoint in the Hugging Face layout (what the trainer writes to
/// `output_dir/final/` after the last step; a LoRA run's adapters merged, and also written as a
/// PEFT adapter to `out/adapter/`): `dir` is a checkpoint directory, a run's
/// `checkpoints/` directory or the run directory (then the newest checkpoint). The tokenizer and
/// processor files come from the run's `model.dir`. Returns the checkpoint exported.
pub fn export_checkpoint<B: Backend>(dir: &Path, out: &Path, device: &B::Device) -> Result<PathBuf, TrainError> {
    let step_dir = checkpoint::resolve(dir)?;
    let (_, config) = checkpoint::read(&step_dir)?;
    let model_config = Kosmos2Config::from_json_file(config.model.dir.join("config.json"))
        .map_err(kosmos_models::Kosmos2Error::from)?;
    let model = checkpoint_model::<B>(&step_dir, &config, &model_config, device)?;
    save_model(&model, &config, out)?;
    Ok(step_dir)
}

/// The model of checkpoint `step_dir` of the run `config`: the whole model record, or (LoRA)
/// the base model from `model.dir` with the checkpoint's adapters (their parameter ids kept,
/// which the optimizer state refers to).
fn checkpoint_model<B: Backend>(
    step_dir: &Path,
    config: &TrainConfig,
    model_config: &Kosmos2Config,
    device: &B::Device,
) -> Result<Kosmos2<B>, TrainError> {
    let recorder = FileRecorder::new();
    match &config.lora {
        None => Kosmos2::<B>::new(model_config, device)
            .load_file(step_dir.join("model"), &recorder, device)
            .map_err(|e| TrainError::checkpoint(&step_dir.join("model.mpk"), e.to_string())),
        Some(lora) => {
            let (model, _) =
                Kosmos2::<B>::from_pretrained(&config.model.dir, device)?.attach_lora(&lora.spec(), device)?;
            let adapters = model
                .lora_adapters()
                .load_file(step_dir.join("adapters"), &recorder, device)
                .map_err(|e| TrainError::checkpoint(&step_dir.join("adapters.mpk"), e.to_string()))?;
            Ok(model.with_lora_adapters(adapters)?)
        }
    }
}

/// Write `model` as a Hugging Face directory at `out` (adapters merged) and, for a LoRA run,
/// its adapters as a PEFT adapter directory at `out/adapter/`.
fn save_model<B: Backend>(model: &Kosmos2<B>, config: &TrainConfig, out: &Path) -> Result<(), TrainError> {
    model.save_pretrained(out, &config.model.dir)?;
    if config.lora.is_some() {
        model.save_peft_adapter(out.join("adapter"), &config.model.dir.display().to_string())?;
    }
    Ok(())
}

/// The loader of a data configuration with the model's tokenizer and image processor.
fn loader(model_dir: &Path, latents: usize, data: &DataConfig) -> Result<DataLoader, TrainError> {
    let collator = Collator::from_model_dir(model_dir, latents, CollateConfig::from(data))?;
    Ok(DataLoader::with_collator(data.clone(), collator)?)
}

/// What [`Trainer::run`] did.
#[derive(Clone, Debug, Default)]
pub struct RunSummary {
    /// The metrics of the steps run by this call.
    pub steps: Vec<StepMetrics>,
    /// Steps completed in the run (including before a resume).
    pub step: u64,
    /// The newest checkpoint.
    pub last_checkpoint: Option<PathBuf>,
}

/// A training run of KOSMOS-2 on autodiff backend `B`.
pub struct Trainer<B: AutodiffBackend> {
    config: TrainConfig,
    run_hash: String,
    device: B::Device,
    model: Kosmos2<B>,
    optim: TrainOptimizer<B>,
    loader: DataLoader,
    schedule: LrSchedule,
    latents: usize,
    /// An image's forward pass in text positions (for `balance_micro_batches`).
    image_cost: f64,
    loss_weights: LossWeights,
    workers: Workers<B>,
    nodes: Option<NodeGroup>,
    step: u64,
    tokens: u64,
    /// `None` on a multi-node run's ranks other than 0 (only rank 0 writes).
    metrics: Option<MetricsLog>,
    last_checkpoint: Option<PathBuf>,
}

impl<B: AutodiffBackend> Trainer<B> {
    /// Start a fresh run in `config.output_dir` (refused if it already holds checkpoints: resume
    /// it or choose another directory).
    pub fn new(config: TrainConfig, device: B::Device) -> Result<Self, TrainError> {
        config.validate()?;
        let checkpoints = config.output_dir.join("checkpoints");
        if let Some((_, newest)) = checkpoint::list(&checkpoints)?.pop() {
            return Err(TrainError::checkpoint(
                &newest,
                "the output directory already holds checkpoints: resume it (`--resume`) or choose another output_dir",
            ));
        }
        let model_config = Self::model_config(&config)?;
        B::seed(&device, step_seed(config.seed, 0));
        let model = match config.model.init {
            ModelInit::Pretrained => Kosmos2::<B>::from_pretrained(&config.model.dir, &device)?,
            ModelInit::Scratch => {
                let mut model = Kosmos2::<B>::new(&model_config, &device);
                model.text_model.model.decoder = model_config.decoder().init_magneto(&device);
                let model = match config.model.location_init {
                    LocationInit::Random => model,
                    LocationInit::Sincos2d => {
                        let (first, grid) =
                            location_rows(&config.model.dir, &model_config, "location_init = \"sincos2d\"")?;
                        let std = (model_config.text_config.embed_dim as f32).powf(-0.5);
                        init_location_embeddings(model, first, grid, std)
                    }
                };
                let model = match config.model.vision_position_init {
                    LocationInit::Random => model,
                    LocationInit::Sincos2d => init_vision_positions(model),
                };
                match config.model.projection_init {
                    ProjectionInit::Random => model,
                    ProjectionInit::Balanced => balance_projection(model),
                    ProjectionInit::Routed => route_projection(model).map_err(TrainError::Invalid)?.0,
                }
            }
        }
        .map(&mut Materialize);
        let model = match &config.lora {
            Some(lora) => {
                let mut spec = lora.spec();
                spec.seed = step_seed(config.seed, 0);
                model.attach_lora(&spec, &device)?.0
            }
            None => model,
        };
        if writes(&config) {
            std::fs::create_dir_all(&config.output_dir).map_err(|e| TrainError::io(&config.output_dir, e))?;
            let copy = config.output_dir.join("config.toml");
            std::fs::write(&copy, config.to_toml()?).map_err(|e| TrainError::io(&copy, e))?;
        }
        Self::assemble(config, model_config, model, device, 0)
    }

    /// Continue the run of a checkpoint: `dir` is a checkpoint directory, a run's
    /// `checkpoints/` directory or the run directory (then the newest checkpoint is used). With
    /// `config`, it must describe the same run ([`TrainConfig::run_hash`]); without, the
    /// checkpoint's own configuration is used. The run continues in the checkpoint's run
    /// directory.
    pub fn resume(dir: &Path, config: Option<&TrainConfig>, device: B::Device) -> Result<Self, TrainError> {
        Self::resume_node(dir, config, device, &NodeOverrides::default())
    }

    /// [`Trainer::resume`] as node `node.rank` of a multi-node run (another rank resumes from
    /// rank 0's checkpoint, with its own rank and address).
    pub fn resume_node(
        dir: &Path,
        config: Option<&TrainConfig>,
        device: B::Device,
        node: &NodeOverrides,
    ) -> Result<Self, TrainError> {
        let step_dir = checkpoint::resolve(dir)?;
        let (state, mut stored) = checkpoint::read(&step_dir)?;
        if let Some(given) = config {
            let found = given.run_hash();
            if found != state.config_hash {
                return Err(TrainError::ConfigMismatch {
                    checkpoint: step_dir,
                    expected: state.config_hash,
                    found,
                });
            }
            // Neither is part of the run hash: the given configuration's logging and nodes apply.
            stored.log = given.log.clone();
            stored.nodes = given.nodes.clone();
        }
        if let Some(run_dir) = step_dir.parent().and_then(Path::parent) {
            stored.output_dir = run_dir.to_path_buf();
        }
        node.apply(&mut stored)?;
        stored.validate()?;
        let model_config = Self::model_config(&stored)?;
        let recorder = FileRecorder::new();
        let model = checkpoint_model::<B>(&step_dir, &stored, &model_config, &device)?;
        let mut trainer = Self::assemble(stored, model_config, model, device, state.step)?;
        let optim_path = step_dir.join("optim");
        let record = Recorder::<B>::load(&recorder, optim_path.clone(), &trainer.device)
            .map_err(|e| TrainError::checkpoint(&step_dir.join("optim.mpk"), e.to_string()))?;
        trainer.optim = trainer.optim.load_record(record);
        trainer.loader.restore(&state.data)?;
        trainer.tokens = state.tokens;
        trainer.last_checkpoint = Some(step_dir);
        Ok(trainer)
    }

    fn model_config(config: &TrainConfig) -> Result<Kosmos2Config, TrainError> {
        Ok(Kosmos2Config::from_json_file(config.model.dir.join("config.json"))
            .map_err(kosmos_models::Kosmos2Error::from)?)
    }

    fn assemble(
        config: TrainConfig,
        model_config: Kosmos2Config,
        mut model: Kosmos2<B>,
        device: B::Device,
        step: u64,
    ) -> Result<Self, TrainError> {
        model.vision_model.model = freeze_vision(model.vision_model.model, config.model.freeze_vision);
        if config.lora.is_some() {
            model = model.train_only_lora();
        }
        let o = &config.optim;
        let optim = AdamWConfig::new()
            .with_beta_1(o.beta_1)
            .with_beta_2(o.beta_2)
            .with_epsilon(o.epsilon)
            .with_weight_decay(o.weight_decay)
            .init::<B, Kosmos2<B>>();
        let latents = model_config.latent_query_num;
        let loader = loader(&config.model.dir, latents, &config.data)?;
        let loss_weights = match config.loss.location_weight {
            1.0 => LossWeights::uniform(),
            w => {
                let (first, grid) = location_rows(&config.model.dir, &model_config, "loss.location_weight")?;
                let ids = first as i64..(first + grid * grid) as i64;
                LossWeights {
                    location: Some((ids, w as f32)),
                }
            }
        };
        let metrics = match writes(&config) {
            true => Some(MetricsLog::open(&config.output_dir, config.log.format, step)?),
            false => None,
        };
        let nodes = config.nodes.as_ref().map(NodeGroup::join).transpose()?;
        let workers = Workers {
            threads: config.parallel_micro_batches,
            devices: config.devices.iter().map(|&i| device_at::<B>(&device, i)).collect(),
            compute: config.precision.dtype(),
            shard: nodes.as_ref().map_or((0, 1), |n| (n.rank(), n.count())),
        };
        if config.log.progress {
            let (total, trainable) = param_counts(&model);
            let lora = match &config.lora {
                Some(l) => format!(", LoRA rank {} on {} projections", l.rank, model.lora_adapters().len()),
                None => String::new(),
            };
            eprintln!("parameters: {total} ({trainable} trainable{lora})");
        }
        Ok(Self {
            run_hash: config.run_hash(),
            schedule: config.schedule(),
            config,
            device,
            model,
            optim,
            loader,
            latents,
            image_cost: model_config.image_macs() as f64 / model_config.text_token_macs().max(1) as f64,
            loss_weights,
            workers,
            nodes,
            step,
            tokens: 0,
            metrics,
            last_checkpoint: None,
        })
    }

    /// The configuration (paths resolved).
    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// The model as trained so far.
    pub fn model(&self) -> &Kosmos2<B> {
        &self.model
    }

    /// Steps completed.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// The metrics file (`None` on a multi-node run's ranks other than 0, which write nothing).
    pub fn metrics_path(&self) -> Option<&Path> {
        self.metrics.as_ref().map(MetricsLog::path)
    }

    /// Whether this process writes the run's files (always, but on a multi-node run's ranks
    /// other than 0).
    pub fn writes(&self) -> bool {
        writes(&self.config)
    }

    /// The newest checkpoint written or resumed from.
    pub fn last_checkpoint(&self) -> Option<&Path> {
        self.last_checkpoint.as_deref()
    }

    /// One optimizer step (see the module documentation). Does not log, validate or checkpoint.
    pub fn train_step(&mut self) -> Result<StepMetrics, TrainError> {
        let step = self.step + 1;
        let start = Instant::now();
        B::seed(&self.device, step_seed(self.config.seed, step));
        let lr = self.schedule.lr_at(step - 1);
        let batches = self.next_batches()?;
        let non_finite = |what, value, last: &Option<PathBuf>| TrainError::NonFinite {
            step,
            what,
            value,
            last_checkpoint: last.clone(),
        };
        let acc = accumulate_on_devices(
            &self.model,
            &batches,
            &self.loss_weights,
            &self.device,
            step,
            &self.workers,
        );
        let acc = match (acc, &self.nodes) {
            (Ok(acc), None) => acc,
            (Err(TrainError::NonFinite { value, .. }), None) => {
                return Err(non_finite("loss", value, &self.last_checkpoint));
            }
            (Err(e), None) => return Err(e),
            // Every node takes part in the all-reduce, also one whose loss was not finite (it
            // passes the value on), so that all stop at the same step.
            (acc, Some(nodes)) => {
                let acc = match acc {
                    Ok(acc) => acc,
                    Err(TrainError::NonFinite { value, .. }) => Accumulated {
                        loss: value,
                        grads: GradientsParams::new(),
                        scored_tokens: 0,
                        tokens: batches.iter().map(input_tokens).sum(),
                    },
                    Err(e) => return Err(e),
                };
                let acc = nodes.all_reduce(&self.model, acc, &self.device)?;
                if !acc.loss.is_finite() {
                    return Err(non_finite("loss", acc.loss, &self.last_checkpoint));
                }
                acc
            }
        };
        let (grads, grad_norm) = if self.config.optim.max_grad_norm > 0.0 {
            clip_grad_norm::<B, _>(&self.model, acc.grads, self.config.optim.max_grad_norm)
        } else {
            let norm = global_grad_norm::<B, _>(&self.model, &acc.grads);
            (acc.grads, norm)
        };
        if !grad_norm.is_finite() {
            return Err(non_finite("gradient norm", grad_norm, &self.last_checkpoint));
        }
        self.model = self.optim.step(lr, self.model.clone(), grads);
        self.step = step;
        self.tokens += acc.tokens;
        let seconds = start.elapsed().as_secs_f64().max(1e-9);
        Ok(StepMetrics {
            step,
            loss: acc.loss,
            lr,
            tokens: acc.tokens,
            scored_tokens: acc.scored_tokens,
            tokens_per_s: acc.tokens as f64 / seconds,
            grad_norm,
            val_loss: None,
        })
    }

    /// The step's `grad_accumulation` micro-batches: `batch_size` rows each in draw order, or
    /// with `balance_micro_batches` the same rows regrouped by length ([`crate::data::balance`]).
    fn next_batches(&mut self) -> Result<Vec<Batch>, TrainError> {
        let (size, count) = (self.config.batch_size, self.config.grad_accumulation);
        if !self.config.balance_micro_batches {
            return Ok((0..count)
                .map(|_| self.loader.next_batch(size))
                .collect::<Result<Vec<_>, _>>()?);
        }
        let mut rows = Vec::with_capacity(size * count);
        for _ in 0..count {
            rows.extend(self.loader.next_rows(size)?);
        }
        let measure = |row: &Vec<Encoded>| {
            (
                row.iter().map(Encoded::len).sum(),
                row.iter().map(|e| e.images.len()).sum(),
            )
        };
        Ok(balance(rows, count, self.image_cost, measure)
            .into_iter()
            .map(|part| self.loader.collate(part))
            .collect::<Result<Vec<_>, _>>()?)
    }

    /// The validation loss (mean over the scored tokens of `validation.batches` batches, the
    /// first ones of the validation data), or `None` without `[validation]`.
    pub fn validate(&self) -> Result<Option<f64>, TrainError> {
        let Some(v) = &self.config.validation else {
            return Ok(None);
        };
        if !self.writes() {
            return Ok(None); // rank 0 validates and logs
        }
        let mut loader = loader(&self.config.model.dir, self.latents, &v.data)?;
        let model = self.model.valid();
        let (mut sum, mut count) = (0.0, 0u64);
        for _ in 0..v.batches {
            let batch = loader.next_batch(v.batch_size.unwrap_or(self.config.batch_size))?;
            let n = scored_tokens(&batch);
            if n == 0 {
                continue;
            }
            let l: f64 = batch_loss(&model, &batch, &self.device)?.into_scalar().elem();
            sum += l * n as f64;
            count += n;
        }
        Ok(Some(if count == 0 { 0.0 } else { sum / count as f64 }))
    }

    /// Write a checkpoint of the current step (see [`crate::checkpoint`]).
    pub fn save_checkpoint(&mut self) -> Result<PathBuf, TrainError> {
        let state = TrainState {
            format: checkpoint::FORMAT,
            step: self.step,
            tokens: self.tokens,
            data: self.loader.state(),
            rng: RngState {
                seed: self.config.seed,
                step: self.step,
            },
            config_hash: self.run_hash.clone(),
        };
        let dir = self.config.output_dir.join("checkpoints");
        let path = checkpoint::write(&dir, &state, &self.config, self.config.checkpoint.keep_last, |tmp| {
            let recorder = FileRecorder::new();
            if self.config.lora.is_some() {
                // The frozen base is `model.dir`'s weights: only the adapters are saved.
                self.model
                    .lora_adapters()
                    .save_file(tmp.join("adapters"), &recorder)
                    .map_err(|e| TrainError::io(&tmp.join("adapters.mpk"), e))?;
            } else {
                self.model
                    .clone()
                    .save_file(tmp.join("model"), &recorder)
                    .map_err(|e| TrainError::io(&tmp.join("model.mpk"), e))?;
            }
            Recorder::<B>::record(&recorder, self.optim.to_record(), tmp.join("optim"))
                .map_err(|e| TrainError::io(&tmp.join("optim.mpk"), e))?;
            Ok(())
        })?;
        self.last_checkpoint = Some(path.clone());
        Ok(path)
    }

    /// Write the current model as a Hugging Face directory at `output_dir/final/` (see
    /// [`crate::config::CheckpointConfig::export_final`]; a LoRA run's adapters merged, and also
    /// written as a PEFT adapter to `final/adapter/`); returns its path.
    pub fn export_final(&self) -> Result<PathBuf, TrainError> {
        let out = self.config.output_dir.join("final");
        save_model(&self.model, &self.config, &out)?;
        Ok(out)
    }

    /// Train to the configured number of steps.
    pub fn run(&mut self) -> Result<RunSummary, TrainError> {
        self.run_until(self.config.steps)
    }

    /// Train until step `last` (at most the configured number), logging, validating and
    /// checkpointing on the way. A run stopped here and resumed later is the same run as one
    /// that was not stopped, provided a checkpoint of the stopping step exists (checkpoint
    /// steps: multiples of `checkpoint.every`, and the last step).
    pub fn run_until(&mut self, last: u64) -> Result<RunSummary, TrainError> {
        let last = last.min(self.config.steps);
        let mut summary = RunSummary::default();
        while self.step < last {
            let mut m = self.train_step()?;
            let s = m.step;
            let final_step = s == self.config.steps;
            if let Some(v) = &self.config.validation
                && (s % v.every == 0 || final_step)
            {
                m.val_loss = self.validate()?;
            }
            if let Some(metrics) = &mut self.metrics {
                metrics.write(&m)?;
            }
            if self.config.log.progress && (s % self.config.log.every == 0 || final_step) {
                eprintln!(
                    "step {s}/{} loss {:.4} lr {:.3e} {:.0} tok/s grad_norm {:.3}{}",
                    self.config.steps,
                    m.loss,
                    m.lr,
                    m.tokens_per_s,
                    m.grad_norm,
                    m.val_loss.map(|v| format!(" val_loss {v:.4}")).unwrap_or_default()
                );
            }
            let every = self.config.checkpoint.every;
            if self.writes() && (final_step || (every > 0 && s % every == 0)) {
                self.save_checkpoint()?;
            }
            if self.writes() && final_step && self.config.checkpoint.export_final {
                self.export_final()?;
            }
            summary.steps.push(m);
        }
        summary.step = self.step;
        summary.last_checkpoint = self.last_checkpoint.clone();
        Ok(summary)
    }
}

/// `kosmos train` as an [`AutodiffTask`]: a fresh run of `config`, or `resume` of a checkpoint
/// (with `config`, which must then describe the same run). Run it with
/// [`kosmos_core::backend::run_autodiff_task`].
pub struct TrainTask {
    /// The configuration (required without `resume`).
    pub config: Option<TrainConfig>,
    /// A checkpoint or run directory to continue.
    pub resume: Option<PathBuf>,
    /// Stop after this step (writing a checkpoint there) instead of the configured last step;
    /// a later `resume` continues the same run.
    pub stop_after: Option<u64>,
    /// This node's rank and address in a multi-node run, over the configuration's `[nodes]`.
    pub node: NodeOverrides,
}

/// `--node-rank` and `--node-address`: what differs between the nodes of a multi-node run, so
/// that they can share one configuration file.
#[derive(Clone, Debug, Default)]
pub struct NodeOverrides {
    /// This node's rank.
    pub rank: Option<u32>,
    /// This node's address, `ws://HOST:PORT`.
    pub address: Option<String>,
}

impl NodeOverrides {
    /// Set them in `config`'s `[nodes]` (refused without one).
    pub fn apply(&self, config: &mut TrainConfig) -> Result<(), TrainError> {
        if self.rank.is_none() && self.address.is_none() {
            return Ok(());
        }
        let Some(nodes) = &mut config.nodes else {
            return Err(TrainError::Invalid(
                "--node-rank / --node-address need a [nodes] section in the configuration".into(),
            ));
        };
        if let Some(rank) = self.rank {
            nodes.rank = rank;
            nodes.serve_orchestrator &= rank == 0;
        }
        if let Some(address) = &self.address {
            nodes.address = address.clone();
        }
        Ok(())
    }
}

/// Whether a process with `config` writes the run's files: all but a multi-node run's ranks
/// other than 0.
fn writes(config: &TrainConfig) -> bool {
    config.nodes.as_ref().is_none_or(|n| n.rank == 0)
}

impl TrainTask {
    /// Whether the run uses gradient checkpointing: the given configuration's setting, or (a
    /// resume without one) the checkpoint's.
    pub fn gradient_checkpointing(&self) -> Result<bool, TrainError> {
        match (&self.config, &self.resume) {
            (Some(c), _) => Ok(c.gradient_checkpointing),
            (None, Some(dir)) => Ok(checkpoint::read(&checkpoint::resolve(dir)?)?.1.gradient_checkpointing),
            (None, None) => Ok(false),
        }
    }

    /// Run on the backend named `device` (`flex`, `cuda:1`, ...), with gradient checkpointing
    /// when the run asks for it ([`TrainTask::gradient_checkpointing`]).
    pub fn run_on(self, device: &str) -> Result<RunSummary, TrainError> {
        let checkpointing = self.gradient_checkpointing()?;
        kosmos_core::backend::run_autodiff_task_with(device, self, checkpointing)
            .map_err(|e| TrainError::Invalid(e.to_string()))?
    }
}

impl AutodiffTask for TrainTask {
    type Output = Result<RunSummary, TrainError>;

    fn run<B: AutodiffBackend>(self, device: B::Device) -> Self::Output {
        let mut trainer = match (self.resume, self.config) {
            (Some(dir), config) => Trainer::<B>::resume_node(&dir, config.as_ref(), device, &self.node)?,
            (None, Some(mut config)) => {
                self.node.apply(&mut config)?;
                Trainer::<B>::new(config, device)?
            }
            (None, None) => {
                return Err(TrainError::Invalid(
                    "nothing to train: give a configuration or a checkpoint to resume".into(),
                ));
            }
        };
        let last = self.stop_after.unwrap_or(u64::MAX);
        let summary = trainer.run_until(last)?;
        let step = trainer.step();
        let checkpointed = trainer
            .last_checkpoint()
            .is_some_and(|p| p.ends_with(checkpoint::step_dir_name(step)));
        if step > 0 && !checkpointed && trainer.writes() {
            let path = trainer.save_checkpoint()?;
            return Ok(RunSummary {
                last_checkpoint: Some(path),
                ..summary
            });
        }
        Ok(summary)
    }
}
