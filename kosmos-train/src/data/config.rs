//! The data configuration, deserialisable with serde (meant to be embedded as a `[data]` table of
//! a TOML training configuration).
//!
//! ```toml
//! seed = 1234
//! max_len = 2048
//! packing = true
//! on_error = "skip"
//!
//! [[sources]]
//! name = "grit"
//! kind = "grit"
//! format = "tar"
//! paths = ["grit/00000.tar", "grit/00001.tar"]
//! weight = 3.0
//! grit = { score_threshold = 0.65, use_ref_exps = false }
//!
//! [[sources]]
//! name = "pile"
//! kind = "text"
//! paths = ["text/"]          # a directory: every *.jsonl in it, sorted
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::DataError;

/// What a source holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    /// Text-only documents: `{"text": ...}`.
    Text,
    /// Image-caption pairs: `{"image": ..., "caption": ...}`.
    Caption,
    /// Interleaved documents: `{"items": [{"text": ...}, {"image": ...}, ...]}`.
    Interleaved,
    /// GRIT grounded captions: `{"image": ..., "caption": ..., "noun_chunks": [...], "ref_exps": [...]}`.
    Grit,
    /// Instruction data: `{"prompt": ..., "response": ..., "image": ... (optional)}`.
    Instruction,
}

/// How a source is stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceFormat {
    /// JSON Lines manifests, one record per line, images as files under `image_root`.
    #[default]
    Jsonl,
    /// WebDataset-style tar shards: members grouped by key (`000123.json` + `000123.jpg`).
    Tar,
}

/// What to do with a malformed record or a missing image.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    /// Stop with the error (the default: nothing is dropped silently).
    #[default]
    Fail,
    /// Skip the record, count it and keep the error in the statistics.
    Skip,
}

/// What to do with an example longer than `max_len`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Overflow {
    /// Keep the first `max_len` tokens, never cutting through an image block (see
    /// [`Collator`](crate::data::Collator) for the exact policy). The default.
    #[default]
    Truncate,
    /// Drop the example (counted in the statistics).
    Skip,
    /// Stop with [`DataError::TooLong`].
    Fail,
}

/// GRIT conversion settings (see [`crate::data::grit`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GritConfig {
    /// Keep entries whose score is at least this (GRIT's own filter used 0.65).
    pub score_threshold: f64,
    /// Also ground the referring expressions (`ref_exps`), competing with the noun chunks under
    /// the overlap rule.
    pub use_ref_exps: bool,
    /// Start the text with `<grounding>` (as KOSMOS-2 does for grounded data).
    pub grounding_prefix: bool,
}

impl Default for GritConfig {
    fn default() -> Self {
        Self {
            score_threshold: 0.65,
            use_ref_exps: false,
            grounding_prefix: true,
        }
    }
}

fn default_weight() -> f64 {
    1.0
}

/// One source.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// A unique name (keys the sampler state, so renaming a source breaks resumption).
    pub name: String,
    /// What it holds.
    pub kind: SourceKind,
    /// How it is stored.
    #[serde(default)]
    pub format: SourceFormat,
    /// Manifest or shard files; a directory stands for its `*.jsonl` (or `*.tar`) files, sorted.
    pub paths: Vec<PathBuf>,
    /// Sampling weight (relative; zero = never drawn).
    #[serde(default = "default_weight")]
    pub weight: f64,
    /// Directory that relative image paths of a JSONL manifest are resolved against (default:
    /// the manifest's directory).
    #[serde(default)]
    pub image_root: Option<PathBuf>,
    /// GRIT settings (for `kind = "grit"`).
    #[serde(default)]
    pub grit: GritConfig,
    /// Overrides the global `on_error` for this source.
    #[serde(default)]
    pub on_error: Option<OnError>,
}

fn default_seed() -> u64 {
    0
}

fn default_max_len() -> usize {
    2048
}

fn default_true() -> bool {
    true
}

fn default_max_skips() -> usize {
    1000
}

/// The data configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// The sources.
    pub sources: Vec<SourceConfig>,
    /// Seed of the mixture sampler and of every source's per-epoch shuffle.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Longest sequence in tokens (BOS, image blocks and EOS included).
    #[serde(default = "default_max_len")]
    pub max_len: usize,
    /// Pack text-only documents into shared rows (see [`crate::data::pack`]).
    #[serde(default)]
    pub packing: bool,
    /// Pad every batch to `max_len` (static shapes) instead of to its longest row.
    #[serde(default)]
    pub pad_to_max_len: bool,
    /// End every document (response, caption) with `</s>`.
    #[serde(default = "default_true")]
    pub add_eos: bool,
    /// What to do with examples longer than `max_len`.
    #[serde(default)]
    pub overflow: Overflow,
    /// What to do with malformed records and missing images.
    #[serde(default)]
    pub on_error: OnError,
    /// With `on_error = "skip"`, give up after this many consecutive skipped draws.
    #[serde(default = "default_max_skips")]
    pub max_consecutive_skips: usize,
}

impl DataConfig {
    /// Resolve relative source paths and image roots against `base` (e.g. the directory of the
    /// TOML file the configuration came from).
    pub fn resolve_relative_to(&mut self, base: &Path) {
        for source in &mut self.sources {
            for path in &mut source.paths {
                if path.is_relative() {
                    *path = base.join(&*path);
                }
            }
            if let Some(root) = source.image_root.as_mut().filter(|r| r.is_relative()) {
                *root = base.join(&*root);
            }
        }
    }

    /// Check names, weights and limits.
    pub fn validate(&self) -> Result<(), DataError> {
        if self.sources.is_empty() {
            return Err(DataError::Config("no sources".into()));
        }
        let mut names = std::collections::HashSet::new();
        for s in &self.sources {
            if !names.insert(s.name.as_str()) {
                return Err(DataError::Config(format!("two sources are named `{}`", s.name)));
            }
            if !(s.weight.is_finite() && s.weight >= 0.0) {
                return Err(DataError::Config(format!(
                    "source `{}`: weight must be finite and >= 0, found {}",
                    s.name, s.weight
                )));
            }
            if s.paths.is_empty() {
                return Err(DataError::Config(format!("source `{}`: no paths", s.name)));
            }
            if !(0.0..=1.0).contains(&s.grit.score_threshold) {
                return Err(DataError::Config(format!(
                    "source `{}`: grit.score_threshold must be in [0, 1], found {}",
                    s.name, s.grit.score_threshold
                )));
            }
        }
        if self.sources.iter().all(|s| s.weight == 0.0) {
            return Err(DataError::Config("every source has weight 0".into()));
        }
        if self.max_len < 2 {
            return Err(DataError::Config(format!(
                "max_len must be >= 2, found {}",
                self.max_len
            )));
        }
        Ok(())
    }
}
