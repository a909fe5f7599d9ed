//! LoRA on KOSMOS-2: attaching adapters to the attention and feed-forward projections, merging
//! them into the weights, and reading and writing adapters in Hugging Face PEFT's format.
//!
//! Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models" (arXiv:2106.09685); the
//! adapter itself is [`kosmos_core::lora`]. A PEFT adapter directory (`adapter_config.json` and
//! `adapter_model.safetensors`, as PEFT 0.21's `save_pretrained` writes it for
//! `Kosmos2ForConditionalGeneration`) loads onto a model with [`Kosmos2::load_peft_adapter`], and
//! [`Kosmos2::save_peft_adapter`] writes one that `PeftModel.from_pretrained` loads. Projections are
//! named by their Hugging Face module path (`text_model.model.layers.0.self_attn.q_proj`), the
//! names PEFT's keys and `target_modules` use.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use burn::prelude::*;
use kosmos_core::loader::{LoadError, TensorFile};
use kosmos_core::lora::{LoraAdapter, LoraConfig, LoraSlot};
use kosmos_vision::freeze::set_trainable;
use serde::{Deserialize, Serialize};

use crate::kosmos2::{Kosmos2, Kosmos2Error};

/// The part of the model a projection belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoraTower {
    /// The text decoder's layers (`text_model.model.layers.N.{self_attn,ffn}`).
    Text,
    /// The CLIP vision encoder's layers (`vision_model.model.encoder.layers.N.{self_attn,mlp}`).
    Vision,
    /// The image-to-text projection's cross-attention (`image_to_text_projection.x_attn`).
    Projection,
}

/// The projection names an adapter can target.
pub const LORA_TARGETS: [&str; 6] = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"];

/// Where to attach adapters and how they are shaped.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoraSpec {
    /// Rank, alpha, dropout and scaling rule of every adapter.
    pub adapter: LoraConfig,
    /// Projection names to adapt (default: all of [`LORA_TARGETS`]).
    pub targets: Vec<String>,
    /// Towers whose projections are adapted (default: the text decoder).
    pub towers: Vec<LoraTower>,
    /// Seed of the adapters' `A` (projection `i` in [`lora_slots`] order draws from a seed derived
    /// from this one and `i`), so attaching is reproducible on every backend.
    #[serde(default)]
    pub seed: u64,
}

impl LoraSpec {
    /// Adapters of `rank` on every attention and feed-forward projection of the text decoder,
    /// `alpha = 2 * rank`, no dropout.
    pub fn new(rank: usize) -> Self {
        Self {
            adapter: LoraConfig::new(rank).with_alpha(2.0 * rank as f64),
            targets: LORA_TARGETS.iter().map(|s| s.to_string()).collect(),
            towers: vec![LoraTower::Text],
            seed: 0,
        }
    }

    /// Check the rank, the dropout and the target names; errors name the setting.
    pub fn validate(&self) -> Result<(), String> {
        let a = &self.adapter;
        if a.rank == 0 {
            return Err("the LoRA rank must be >= 1, found 0".into());
        }
        if !(a.alpha.is_finite() && a.alpha > 0.0) {
            return Err(format!("the LoRA alpha must be finite and > 0, found {}", a.alpha));
        }
        if !(0.0..1.0).contains(&a.dropout) {
            return Err(format!("the LoRA dropout must be in [0, 1), found {}", a.dropout));
        }
        if self.targets.is_empty() || self.towers.is_empty() {
            return Err("LoRA needs at least one target and one tower".into());
        }
        for t in &self.targets {
            if !LORA_TARGETS.contains(&t.as_str()) {
                return Err(format!(
                    "unknown LoRA target `{t}`: expected one of {}",
                    LORA_TARGETS.join(", ")
                ));
            }
        }
        Ok(())
    }

    fn matches(&self, tower: LoraTower, name: &str) -> bool {
        self.towers.contains(&tower) && self.targets.iter().any(|t| t == name)
    }
}

/// A projection of the model with its adapter slot and its Hugging Face module path.
pub struct ModelLoraSlot<'a, B: Backend> {
    /// The tower it belongs to.
    pub tower: LoraTower,
    /// Its Hugging Face module path, e.g. `text_model.model.layers.0.self_attn.q_proj`.
    pub path: String,
    /// The projection and its adapter.
    pub slot: LoraSlot<'a, B>,
}

/// Every projection an adapter can sit on, in module order.
pub fn lora_slots<B: Backend>(model: &mut Kosmos2<B>) -> Vec<ModelLoraSlot<'_, B>> {
    fn push<'a, B: Backend>(
        out: &mut Vec<ModelLoraSlot<'a, B>>,
        tower: LoraTower,
        prefix: String,
        slots: impl IntoIterator<Item = LoraSlot<'a, B>>,
    ) {
        for slot in slots {
            let path = format!("{prefix}.{}", slot.name);
            out.push(ModelLoraSlot { tower, path, slot });
        }
    }
    let mut out = Vec::new();
    for (i, layer) in model.text_model.model.decoder.layers.iter_mut().enumerate() {
        let prefix = format!("text_model.model.layers.{i}");
        push(
            &mut out,
            LoraTower::Text,
            format!("{prefix}.self_attn"),
            layer.self_attn.lora_slots(),
        );
        push(
            &mut out,
            LoraTower::Text,
            format!("{prefix}.ffn"),
            layer.ffn.lora_slots(),
        );
    }
    for (i, layer) in model.vision_model.model.encoder.layers.iter_mut().enumerate() {
        let prefix = format!("vision_model.model.encoder.layers.{i}");
        push(
            &mut out,
            LoraTower::Vision,
            format!("{prefix}.self_attn"),
            layer.self_attn.lora_slots(),
        );
        push(
            &mut out,
            LoraTower::Vision,
            format!("{prefix}.mlp"),
            layer.mlp.lora_slots(),
        );
    }
    push(
        &mut out,
        LoraTower::Projection,
        "image_to_text_projection.x_attn".into(),
        model.image_to_text_projection.x_attn.lora_slots(),
    );
    out
}

/// PEFT's `adapter_config.json`, the fields this project reads and writes.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct PeftConfig {
    #[serde(default)]
    peft_type: Option<String>,
    r: usize,
    lora_alpha: f64,
    #[serde(default)]
    lora_dropout: f64,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default = "none_str")]
    bias: String,
    #[serde(default)]
    alpha_pattern: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    rank_pattern: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    target_modules: serde_json::Value,
}

fn none_str() -> String {
    "none".into()
}

/// PEFT's key prefix for a `Kosmos2ForConditionalGeneration` wrapped in a `PeftModel`.
const PEFT_PREFIX: &str = "base_model.model.";

impl<B: Backend> Kosmos2<B> {
    /// Attach fresh adapters (see [`kosmos_core::lora`]: `B = 0`, so the model's function is
    /// unchanged) to the projections `spec` selects. Returns the model and the number of
    /// adapted projections.
    pub fn attach_lora(mut self, spec: &LoraSpec, device: &B::Device) -> Result<(Self, usize), Kosmos2Error> {
        spec.validate().map_err(Kosmos2Error::Input)?;
        let mut n = 0;
        for (i, mut s) in lora_slots(&mut self).into_iter().enumerate() {
            if spec.matches(s.tower, s.slot.name) {
                let seed = spec.seed ^ (i as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03);
                s.slot.attach(&spec.adapter, seed, device);
                n += 1;
            }
        }
        Ok((self, n))
    }

    /// Fold every adapter into its projection's weight and remove it: the plain architecture
    /// again, with the adapted function (what inference and [`Kosmos2::save_pretrained`] use).
    pub fn merge_lora(mut self) -> Self {
        for mut s in lora_slots(&mut self) {
            s.slot.merge();
        }
        self
    }

    /// Whether any projection carries an adapter.
    pub fn has_lora(&self) -> bool {
        let mut model = self.clone();
        lora_slots(&mut model).iter().any(|s| s.slot.adapter.is_some())
    }

    /// Parameters in adapters.
    pub fn lora_num_params(&self) -> usize {
        let mut model = self.clone();
        lora_slots(&mut model)
            .iter()
            .filter_map(|s| s.slot.adapter.as_ref())
            .map(|a| a.num_params())
            .sum()
    }

    /// Freeze everything but the adapters (LoRA fine-tuning): only adapter parameters get
    /// gradients, optimizer state and updates.
    pub fn train_only_lora(self) -> Self {
        let mut model = set_trainable(self, false);
        for s in lora_slots(&mut model) {
            let adapter = s.slot.adapter.take();
            *s.slot.adapter = adapter.map(|a| set_trainable(a, true));
        }
        model
    }

    /// Load a PEFT LoRA adapter directory (`adapter_config.json`, `adapter_model.safetensors`)
    /// onto this model: every `base_model.model.<path>.lora_A.weight` / `lora_B.weight` pair
    /// becomes the adapter of the projection at `<path>` (the rank is read from the tensors, so
    /// PEFT's `rank_pattern` works). Refused, naming the file and key: DoRA, trained biases,
    /// `fan_in_fan_out`, `alpha_pattern`, `modules_to_save`, keys of projections this model does
    /// not have, shapes that do not fit, and an `A` without its `B`.
    pub fn load_peft_adapter(mut self, dir: impl AsRef<Path>, device: &B::Device) -> Result<Self, Kosmos2Error> {
        let dir = dir.as_ref();
        let config_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|e| Kosmos2Error::Missing {
            path: config_path.clone(),
            message: format!("cannot read the PEFT adapter configuration: {e}"),
        })?;
        let config: PeftConfig = serde_json::from_str(&text).map_err(|e| Kosmos2Error::Missing {
            path: config_path.clone(),
            message: format!("not a PEFT LoRA adapter configuration: {e}"),
        })?;
        let refuse = |message: String| {
            Err(Kosmos2Error::Missing {
                path: config_path.clone(),
                message,
            })
        };
        if let Some(kind) = config.peft_type.as_deref()
            && kind != "LORA"
        {
            return refuse(format!("peft_type is `{kind}`; only LORA adapters load"));
        }
        if config.use_dora {
            return refuse("use_dora = true: DoRA adapters are not supported".into());
        }
        if config.bias != "none" {
            return refuse(format!(
                "bias = `{}`: adapters that train biases are not supported",
                config.bias
            ));
        }
        if config.fan_in_fan_out {
            return refuse("fan_in_fan_out = true is for Conv1D layers, which KOSMOS-2 does not have".into());
        }
        if !config.alpha_pattern.is_empty() {
            return refuse("per-module alpha_pattern is not supported".into());
        }
        if config.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
            return refuse("modules_to_save (fully trained modules beside the adapters) is not supported".into());
        }
        let weights_path = dir.join("adapter_model.safetensors");
        let file = TensorFile::open(&weights_path)?;
        let mut unused: BTreeSet<String> = file.keys().into_iter().collect();
        let mut loaded = 0;
        for s in lora_slots(&mut self) {
            let key_a = format!("{PEFT_PREFIX}{}.lora_A.weight", s.path);
            let key_b = format!("{PEFT_PREFIX}{}.lora_B.weight", s.path);
            let (has_a, has_b) = (unused.remove(&key_a), unused.remove(&key_b));
            if !has_a && !has_b {
                continue;
            }
            let missing = if has_a { key_b.clone() } else { key_a.clone() };
            if !(has_a && has_b) {
                return Err(LoadError::MissingKey {
                    path: weights_path,
                    key: missing,
                }
                .into());
            }
            let [d_in, d_out] = s.slot.dims();
            let a: Tensor<B, 2> = file.tensor(&key_a, device)?;
            let rank = a.dims()[0];
            let shape_error = |key: &str, expected: Vec<usize>, found: Vec<usize>| LoadError::ShapeMismatch {
                path: weights_path.clone(),
                key: key.to_string(),
                expected,
                found,
            };
            if a.dims()[1] != d_in || rank == 0 {
                return Err(shape_error(&key_a, vec![rank.max(1), d_in], a.dims().to_vec()).into());
            }
            let b: Tensor<B, 2> = file.tensor(&key_b, device)?;
            if b.dims() != [d_out, rank] {
                return Err(shape_error(&key_b, vec![d_out, rank], b.dims().to_vec()).into());
            }
            let adapter = LoraConfig::new(rank)
                .with_alpha(config.lora_alpha)
                .with_dropout(config.lora_dropout)
                .with_rslora(config.use_rslora);
            *s.slot.adapter = Some(adapter.init_with(a.transpose(), b.transpose()));
            loaded += 1;
        }
        if !unused.is_empty() {
            return Err(LoadError::UnusedKeys {
                path: weights_path,
                count: unused.len(),
                examples: unused.into_iter().take(3).collect(),
            }
            .into());
        }
        if loaded == 0 {
            return Err(Kosmos2Error::Missing {
                path: weights_path,
                message: "no LoRA tensors in the file".into(),
            });
        }
        Ok(self)
    }

    /// Write the adapters as a PEFT LoRA adapter directory that `PeftModel.from_pretrained`
    /// loads onto the base model: `adapter_config.json` (rank, alpha, dropout, rsLoRA and every
    /// adapted module's path as `target_modules`) and `adapter_model.safetensors` (f32
    /// `lora_A.weight` `[rank, in]` and `lora_B.weight` `[out, rank]`), each written to a
    /// temporary name and renamed into place. `base_model` names the base model in the
    /// configuration (`base_model_name_or_path`). All adapters must share rank, alpha, dropout
    /// and scaling rule (as [`Kosmos2::attach_lora`] makes them).
    pub fn save_peft_adapter(&self, out: impl AsRef<Path>, base_model: &str) -> Result<PathBuf, Kosmos2Error> {
        let out = out.as_ref();
        let io = |path: &Path, e: std::io::Error| Kosmos2Error::Missing {
            path: path.to_path_buf(),
            message: format!("cannot write: {e}"),
        };
        std::fs::create_dir_all(out).map_err(|e| io(out, e))?;
        let mut model = self.clone();
        let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        let mut targets = Vec::new();
        let mut shared: Option<(usize, f64, f64)> = None;
        for s in lora_slots(&mut model) {
            let Some(adapter) = s.slot.adapter.as_ref() else {
                continue;
            };
            let (rank, scale, p) = (adapter.rank(), adapter.scale(), adapter.dropout.prob);
            match shared {
                None => shared = Some((rank, scale, p)),
                Some(x) if x == (rank, scale, p) => {}
                Some(_) => {
                    return Err(Kosmos2Error::Input(format!(
                        "{}: adapters of different ranks, scales or dropouts cannot share one adapter_config.json",
                        s.path
                    )));
                }
            }
            for (suffix, t) in [
                ("lora_A", adapter.lora_a.val().transpose()),
                ("lora_B", adapter.lora_b.val().transpose()),
            ] {
                let shape = t.dims().to_vec();
                let values = t
                    .into_data()
                    .convert::<f32>()
                    .to_vec::<f32>()
                    .map_err(|e| Kosmos2Error::Input(format!("{}.{suffix}: {e:?}", s.path)))?;
                let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
                tensors.push((format!("{PEFT_PREFIX}{}.{suffix}.weight", s.path), shape, bytes));
            }
            targets.push(s.path.clone());
        }
        let Some((rank, scale, dropout)) = shared else {
            return Err(Kosmos2Error::Input("the model has no LoRA adapters to save".into()));
        };
        // scale = alpha / rank: write alpha so that PEFT's default scaling gives the same scale.
        let config = serde_json::json!({
            "peft_type": "LORA",
            "task_type": null,
            "base_model_name_or_path": base_model,
            "r": rank,
            "lora_alpha": scale * rank as f64,
            "lora_dropout": dropout,
            "use_rslora": false,
            "use_dora": false,
            "fan_in_fan_out": false,
            "bias": "none",
            "target_modules": targets,
            "modules_to_save": null,
            "inference_mode": true,
            "init_lora_weights": true,
        });
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
            .iter()
            .map(|(k, shape, bytes)| {
                let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                    .expect("shape and byte count agree");
                (k.clone(), view)
            })
            .collect();
        let weights = out.join("adapter_model.safetensors");
        let bytes = safetensors::serialize(views, None).map_err(|e| Kosmos2Error::Input(e.to_string()))?;
        write_atomic(&weights, &bytes).map_err(|e| io(&weights, e))?;
        let config_path = out.join("adapter_config.json");
        let text = serde_json::to_string_pretty(&config).expect("JSON");
        write_atomic(&config_path, text.as_bytes()).map_err(|e| io(&config_path, e))?;
        Ok(out.to_path_buf())
    }
}

/// Write `bytes` to a temporary file beside `path` and rename it into place.
fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

impl<B: Backend> Kosmos2<B> {
    /// The attached adapters, in [`lora_slots`] order (clones sharing the parameters and their
    /// ids). With [`Kosmos2::with_lora_adapters`] this saves and restores only the adapters (a
    /// LoRA training checkpoint), keeping the parameter ids that optimizer state refers to.
    pub fn lora_adapters(&self) -> Vec<LoraAdapter<B>> {
        let mut model = self.clone();
        lora_slots(&mut model)
            .into_iter()
            .filter_map(|s| s.slot.adapter.clone())
            .collect()
    }

    /// Put `adapters` (as [`Kosmos2::lora_adapters`] returned them) back into the slots that
    /// carry adapters, in order; the count must match.
    pub fn with_lora_adapters(mut self, adapters: Vec<LoraAdapter<B>>) -> Result<Self, Kosmos2Error> {
        let (given, mut adapters) = (adapters.len(), adapters.into_iter());
        let mut attached = 0;
        for s in lora_slots(&mut self) {
            if s.slot.adapter.is_some() {
                attached += 1;
                if let Some(a) = adapters.next() {
                    *s.slot.adapter = Some(a);
                }
            }
        }
        if attached != given {
            return Err(Kosmos2Error::Input(format!(
                "{given} LoRA adapters given for a model that carries {attached}"
            )));
        }
        Ok(self)
    }
}
