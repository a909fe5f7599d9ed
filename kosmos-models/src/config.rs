//! `config.json` of HF KOSMOS-2 checkpoints (`Kosmos2Config` of transformers 5.24.0), with the
//! reference's JSON aliases and defaults (the defaults are microsoft/kosmos-2-patch14-224's).

use std::path::{Path, PathBuf};

use kosmos_core::{Activation, DecoderConfig};
use kosmos_vision::{ClipVisionConfig, ImageToTextProjectionConfig};
use serde::Deserialize;

/// Why a configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read `{path}`: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Not valid JSON for this configuration.
    #[error("`{path}`: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// serde's message, with line and column.
        message: String,
    },
    /// A value out of range or unsupported.
    #[error("`{path}`: {field} = {value}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The field, dotted (`text_config.embed_dim`).
        field: String,
        /// The value found.
        value: String,
        /// What is wrong.
        reason: String,
    },
}

fn d_vocab() -> usize {
    65037
}
fn d_max_pos() -> usize {
    2048
}
fn d_embed() -> usize {
    2048
}
fn d_layers() -> usize {
    24
}
fn d_ffn() -> usize {
    8192
}
fn d_heads() -> usize {
    32
}
fn d_gelu() -> String {
    "gelu".into()
}
fn d_eps() -> f64 {
    1e-5
}
fn d_true() -> bool {
    true
}
fn d_pad() -> u32 {
    1
}
fn d_bos() -> u32 {
    0
}
fn d_eos() -> u32 {
    2
}
fn d_latents() -> usize {
    64
}
fn d_v_hidden() -> usize {
    1024
}
fn d_v_inter() -> usize {
    4096
}
fn d_v_layers() -> usize {
    24
}
fn d_v_heads() -> usize {
    16
}
fn d_channels() -> usize {
    3
}
fn d_image() -> usize {
    224
}
fn d_patch() -> usize {
    14
}
fn d_qgelu() -> String {
    "quick_gelu".into()
}

/// `text_config` (HF `Kosmos2TextConfig`).
#[derive(Clone, Debug, Deserialize)]
pub struct Kosmos2TextConfig {
    /// Vocabulary size (65,037 = 64,013 text pieces and tags + 1,024 location tokens).
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    /// Positions the model was trained for (the sinusoid itself has no limit).
    #[serde(default = "d_max_pos")]
    pub max_position_embeddings: usize,
    /// Model width.
    #[serde(default = "d_embed", alias = "hidden_size")]
    pub embed_dim: usize,
    /// Decoder layers.
    #[serde(default = "d_layers", alias = "num_hidden_layers")]
    pub layers: usize,
    /// FFN width.
    #[serde(default = "d_ffn")]
    pub ffn_dim: usize,
    /// Attention heads.
    #[serde(default = "d_heads", alias = "num_attention_heads")]
    pub attention_heads: usize,
    /// FFN activation name.
    #[serde(default = "d_gelu")]
    pub activation_function: String,
    /// LayerNorm epsilon.
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
    /// Multiply embeddings by `sqrt(embed_dim)`.
    #[serde(default = "d_true")]
    pub scale_embedding: bool,
    /// Padding token id (also the sinusoid's padding position).
    #[serde(default = "d_pad")]
    pub pad_token_id: u32,
    /// Beginning-of-sequence id.
    #[serde(default = "d_bos")]
    pub bos_token_id: u32,
    /// End-of-sequence id.
    #[serde(default = "d_eos")]
    pub eos_token_id: u32,
    /// `lm_head` shares the token embedding.
    #[serde(default = "d_true")]
    pub tie_word_embeddings: bool,
    /// Cross-attention layers (unsupported; KOSMOS-2 has none).
    #[serde(default)]
    pub add_cross_attention: bool,
}

/// `vision_config` (HF `Kosmos2VisionConfig`, a CLIP vision config).
#[derive(Clone, Debug, Deserialize)]
pub struct Kosmos2VisionConfig {
    /// Width.
    #[serde(default = "d_v_hidden")]
    pub hidden_size: usize,
    /// MLP width.
    #[serde(default = "d_v_inter")]
    pub intermediate_size: usize,
    /// Encoder layers.
    #[serde(default = "d_v_layers")]
    pub num_hidden_layers: usize,
    /// Heads.
    #[serde(default = "d_v_heads")]
    pub num_attention_heads: usize,
    /// Input channels.
    #[serde(default = "d_channels")]
    pub num_channels: usize,
    /// Image side.
    #[serde(default = "d_image")]
    pub image_size: usize,
    /// Patch side.
    #[serde(default = "d_patch")]
    pub patch_size: usize,
    /// Activation name.
    #[serde(default = "d_qgelu")]
    pub hidden_act: String,
    /// LayerNorm epsilon.
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
}

/// The whole `config.json`.
#[derive(Clone, Debug, Deserialize)]
pub struct Kosmos2Config {
    /// The text decoder.
    #[serde(default = "default_text")]
    pub text_config: Kosmos2TextConfig,
    /// The vision tower.
    #[serde(default = "default_vision")]
    pub vision_config: Kosmos2VisionConfig,
    /// Image embeddings per image (64).
    #[serde(default = "d_latents")]
    pub latent_query_num: usize,
}

fn default_text() -> Kosmos2TextConfig {
    serde_json::from_str("{}").expect("defaults")
}

fn default_vision() -> Kosmos2VisionConfig {
    serde_json::from_str("{}").expect("defaults")
}

impl Default for Kosmos2Config {
    fn default() -> Self {
        Self::patch14_224()
    }
}

impl Kosmos2Config {
    /// microsoft/kosmos-2-patch14-224 (1,664,485,376 parameters).
    pub fn patch14_224() -> Self {
        serde_json::from_str("{}").expect("defaults")
    }

    /// Multiply-accumulates of the forward pass for one image: the patch embedding, the
    /// vision encoder's projections, MLPs and attention products over the patches and the class
    /// token, and the image-to-text projection (its dense layer over those tokens, the latent
    /// queries' attention over them and the latents). Layer norms and activations are not
    /// counted.
    pub fn image_macs(&self) -> u64 {
        let v = &self.vision_config;
        let d = self.text_config.embed_dim as u64;
        let patches = ((v.image_size / v.patch_size.max(1)) as u64).pow(2);
        let tokens = patches + 1;
        let (h, i) = (v.hidden_size as u64, v.intermediate_size as u64);
        let embed = patches * (v.num_channels * v.patch_size * v.patch_size) as u64 * h;
        let layer = tokens * (4 * h * h + 2 * h * i) + 2 * tokens * tokens * h;
        let q = self.latent_query_num as u64;
        let keys = tokens + q;
        let projection = tokens * h * d + q * d * d * 2 + keys * d * d * 2 + 2 * q * keys * d;
        embed + v.num_hidden_layers as u64 * layer + projection
    }

    /// Multiply-accumulates of the text decoder's forward pass per token: every layer's
    /// projections and feed-forward network, and the head over the vocabulary. Attention
    /// products (which grow with the sequence's length) are not counted.
    pub fn text_token_macs(&self) -> u64 {
        let t = &self.text_config;
        let (d, f) = (t.embed_dim as u64, t.ffn_dim as u64);
        t.layers as u64 * (4 * d * d + 2 * d * f) + d * t.vocab_size as u64
    }

    /// Parse and validate a `config.json`.
    pub fn from_json_file(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json_str(&text, path)
    }

    /// Parse and validate JSON text (`path` names it in errors).
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: Self = serde_json::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |field: &str, value: String, reason: &str| ConfigError::Invalid {
            path: path.to_path_buf(),
            field: field.into(),
            value,
            reason: reason.into(),
        };
        let t = &self.text_config;
        let v = &self.vision_config;
        for (field, value) in [
            ("text_config.vocab_size", t.vocab_size),
            ("text_config.embed_dim", t.embed_dim),
            ("text_config.layers", t.layers),
            ("text_config.ffn_dim", t.ffn_dim),
            ("text_config.attention_heads", t.attention_heads),
            ("vision_config.hidden_size", v.hidden_size),
            ("vision_config.num_hidden_layers", v.num_hidden_layers),
            ("vision_config.num_attention_heads", v.num_attention_heads),
            ("vision_config.patch_size", v.patch_size),
            ("latent_query_num", self.latent_query_num),
        ] {
            if value == 0 {
                return Err(invalid(field, value.to_string(), "must be positive"));
            }
        }
        if t.embed_dim % t.attention_heads != 0 {
            return Err(invalid(
                "text_config.embed_dim",
                t.embed_dim.to_string(),
                &format!("not divisible by attention_heads {}", t.attention_heads),
            ));
        }
        if v.hidden_size % v.num_attention_heads != 0 {
            return Err(invalid(
                "vision_config.hidden_size",
                v.hidden_size.to_string(),
                &format!("not divisible by num_attention_heads {}", v.num_attention_heads),
            ));
        }
        if v.image_size % v.patch_size != 0 {
            return Err(invalid(
                "vision_config.image_size",
                v.image_size.to_string(),
                &format!("not a multiple of patch_size {}", v.patch_size),
            ));
        }
        if Activation::from_name(&t.activation_function).is_none() {
            return Err(invalid(
                "text_config.activation_function",
                t.activation_function.clone(),
                "unsupported (gelu, quick_gelu, relu)",
            ));
        }
        if Activation::from_name(&v.hidden_act).is_none() {
            return Err(invalid(
                "vision_config.hidden_act",
                v.hidden_act.clone(),
                "unsupported (gelu, quick_gelu, relu)",
            ));
        }
        if t.add_cross_attention {
            return Err(invalid(
                "text_config.add_cross_attention",
                "true".into(),
                "cross-attention layers are not supported",
            ));
        }
        if t.pad_token_id as usize >= t.vocab_size {
            return Err(invalid(
                "text_config.pad_token_id",
                t.pad_token_id.to_string(),
                "outside the vocabulary",
            ));
        }
        Ok(())
    }

    /// The text decoder stack (MAGNETO sub-LN, no XPOS).
    pub fn decoder(&self) -> DecoderConfig {
        let t = &self.text_config;
        DecoderConfig::new(t.embed_dim, t.layers, t.attention_heads, t.ffn_dim)
            .with_activation(Activation::from_name(&t.activation_function).unwrap_or(Activation::Gelu))
            .with_layer_norm_eps(t.layer_norm_eps)
    }

    /// The vision tower.
    pub fn vision(&self) -> ClipVisionConfig {
        let v = &self.vision_config;
        ClipVisionConfig::new(
            v.hidden_size,
            v.intermediate_size,
            v.num_hidden_layers,
            v.num_attention_heads,
            v.image_size,
            v.patch_size,
        )
        .with_num_channels(v.num_channels)
        .with_hidden_act(Activation::from_name(&v.hidden_act).unwrap_or(Activation::QuickGelu))
        .with_layer_norm_eps(v.layer_norm_eps)
    }

    /// The image-to-text projection.
    pub fn projection(&self) -> ImageToTextProjectionConfig {
        ImageToTextProjectionConfig::new(
            self.vision_config.hidden_size,
            self.text_config.embed_dim,
            self.text_config.attention_heads,
        )
        .with_latent_query_num(self.latent_query_num)
    }

    /// Number of parameters (tied `lm_head` counted once).
    pub fn num_params(&self) -> usize {
        let t = &self.text_config;
        let embed = t.vocab_size * t.embed_dim;
        let lm_head = if t.tie_word_embeddings { 0 } else { embed };
        embed + lm_head + self.decoder().num_params() + self.vision().num_params() + self.projection().num_params()
    }
}
