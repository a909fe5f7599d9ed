//! The assembled KOSMOS-2: CLIP vision tower -> image-to-text projection -> MAGNETO text decoder
//! with absolute sinusoidal positions and a tied language-model head.
//!
//! Peng et al., 2023, "Kosmos-2: Grounding Multimodal Large Language Models to the World"
//! (arXiv:2306.14824). Matches transformers 5.24.0 `Kosmos2ForConditionalGeneration` (eager
//! attention) and loads its checkpoints (microsoft/kosmos-2-patch14-224): the image embeddings
//! overwrite the token embeddings where `image_embeds_position_mask` is set, *before* the whole
//! sequence is scaled by `sqrt(embed_dim)`; positions skip padding (first real token at 2); the
//! head is the token embedding when `lm_head.weight` is absent (tied).

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::{DType, TensorData};
use kosmos_core::gemv;
use kosmos_core::loader::{
    HF_KOSMOS2, HF_KOSMOS2_SAVE, HF_KOSMOS2_UNTIED, LoadError, cast_floats, load_safetensors_files,
};
use kosmos_core::packed::{PackedWeight, WeightMode};
use kosmos_core::{
    AttentionImpl, AttentionMask, Decoder, DecoderCache, SinusoidalPositions, SinusoidalPositionsConfig,
};
use kosmos_vision::{ClipVisionModel, ImageToTextProjection};

use crate::config::{ConfigError, Kosmos2Config};

/// The text model without its head (HF `Kosmos2TextTransformer`).
#[derive(Module, Debug)]
pub struct Kosmos2TextModel<B: Backend> {
    /// Token embedding `[vocab, embed]` (also the head when tied).
    pub embed_tokens: Embedding<B>,
    /// Layers and final norm.
    pub decoder: Decoder<B>,
    #[module(skip)]
    positions: SinusoidalPositions,
    #[module(skip)]
    embed_scale: f64,
    #[module(skip)]
    pad_token_id: u32,
}

/// Text model plus head (HF `Kosmos2TextForCausalLM`).
#[derive(Module, Debug)]
pub struct Kosmos2TextForCausalLm<B: Backend> {
    /// The text model.
    pub model: Kosmos2TextModel<B>,
    /// Untied head (`None` = tied to `model.embed_tokens`).
    pub lm_head: Option<Linear<B>>,
    /// bf16/Q8 copy of the head (tied or not) for decode steps ([`Kosmos2::pack_weights`]).
    pub lm_head_packed: Option<PackedWeight<B>>,
}

/// The vision tower wrapper (HF `Kosmos2VisionModel`, whose tower sits under `model`).
#[derive(Module, Debug)]
pub struct Kosmos2VisionModel<B: Backend> {
    /// The CLIP tower.
    pub model: ClipVisionModel<B>,
}

/// KOSMOS-2.
#[derive(Module, Debug)]
pub struct Kosmos2<B: Backend> {
    /// Text decoder and head.
    pub text_model: Kosmos2TextForCausalLm<B>,
    /// Vision tower.
    pub vision_model: Kosmos2VisionModel<B>,
    /// Features -> image embeddings.
    pub image_to_text_projection: ImageToTextProjection<B>,
}

/// Inputs of a forward pass, as the processor produces them.
#[derive(Clone, Debug)]
pub struct Kosmos2Input<B: Backend> {
    /// Token ids `[batch, len]`.
    pub input_ids: Tensor<B, 2, Int>,
    /// `1` for real tokens, `0` for padding (`None` = all real).
    pub attention_mask: Option<Tensor<B, 2, Int>>,
    /// Images `[batch, 3, H, W]` (`None` = text only).
    pub pixel_values: Option<Tensor<B, 4>>,
    /// `1` where an image embedding replaces the token embedding.
    pub image_embeds_position_mask: Option<Tensor<B, 2, Int>>,
}

/// Outputs of a forward pass.
#[derive(Clone, Debug)]
pub struct Kosmos2Output<B: Backend> {
    /// Next-token logits at every position, `[batch, len, vocab]`.
    pub logits: Tensor<B, 3>,
    /// Text decoder output after the final norm, `[batch, len, embed]`.
    pub last_hidden_state: Tensor<B, 3>,
    /// Image embeddings written into the sequence, `[batch, latents, embed]`.
    pub image_embeds: Option<Tensor<B, 3>>,
}

/// Bad inputs or checkpoint problems, each naming the thing.
#[derive(Debug, thiserror::Error)]
pub enum Kosmos2Error {
    /// `config.json` problems.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Weight-file problems.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The model directory or a file in it is missing.
    #[error("`{path}`: {message}")]
    Missing {
        /// The path.
        path: PathBuf,
        /// What was expected there.
        message: String,
    },
    /// Inputs that do not fit together.
    #[error("invalid input: {0}")]
    Input(String),
}

/// Overwrite the token embeddings `[batch, len, embed]` with the image embeddings
/// `[images, latents, embed]` at the positions where `mask` (`[batch, len]`) is 1: the marked
/// positions, in row order, take the images' embeddings in order. Each row marks a multiple of
/// `latents` positions (a row with one image marks `latents`, a text-only row none, a row with
/// two images `2 * latents`), and all rows together `images * latents`.
pub fn write_image_embeds<B: Backend>(
    embeds: Tensor<B, 3>,
    images: &Tensor<B, 3>,
    mask: &Tensor<B, 2, Int>,
) -> Result<Tensor<B, 3>, Kosmos2Error> {
    let [b, t, e] = embeds.dims();
    let device = embeds.device();
    let [ib, latents, ie] = images.dims();
    if ie != e || mask.dims() != [b, t] {
        return Err(Kosmos2Error::Input(format!(
            "image embeddings {:?} and position mask {:?} do not fit token embeddings {:?}",
            images.dims(),
            mask.dims(),
            [b, t, e]
        )));
    }
    let mut index = vec![0i64; b * t];
    let mut next = 0usize;
    for (row, m) in int_rows(mask).iter().enumerate() {
        let slots: Vec<usize> = m.iter().enumerate().filter(|(_, v)| **v != 0).map(|(i, _)| i).collect();
        if slots.len() % latents.max(1) != 0 {
            return Err(Kosmos2Error::Input(format!(
                "row {row} of image_embeds_position_mask marks {} positions, not a multiple of the {latents} image embeddings per image",
                slots.len()
            )));
        }
        for pos in slots {
            index[row * t + pos] = next as i64;
            next += 1;
        }
    }
    if next != ib * latents {
        return Err(Kosmos2Error::Input(format!(
            "image_embeds_position_mask marks {next} positions in all, the {ib} image(s) give {} embeddings",
            ib * latents
        )));
    }
    let index = Tensor::<B, 1, Int>::from_data(TensorData::new(index, [b * t]), &device);
    let gathered = images
        .clone()
        .reshape([ib * latents, e])
        .select(0, index)
        .reshape([b, t, e]);
    let where_image = mask.clone().equal_elem(1).reshape([b, t, 1]).expand([b, t, e]);
    Ok(embeds.mask_where(where_image, gathered))
}

/// Rows of an int tensor `[rows, len]` on the host.
pub fn int_rows<B: Backend>(t: &Tensor<B, 2, Int>) -> Vec<Vec<i64>> {
    let [_, len] = t.dims();
    let v = t.to_data().convert::<i64>().to_vec::<i64>().expect("int data");
    v.chunks(len.max(1)).map(|r| r.to_vec()).collect()
}

impl<B: Backend> Kosmos2TextModel<B> {
    /// Token embeddings with image embeddings written in, scaled, plus positions.
    pub fn input_embeddings(
        &self,
        input_ids: &Tensor<B, 2, Int>,
        image_embeds: Option<(&Tensor<B, 3>, &Tensor<B, 2, Int>)>,
        past_length: usize,
    ) -> Result<Tensor<B, 3>, Kosmos2Error> {
        self.input_embeddings_in_documents(input_ids, image_embeds, past_length, None)
    }

    /// [`Kosmos2TextModel::input_embeddings`] for rows that pack several documents
    /// (`documents[row][position]`, see [`Kosmos2::forward_packed`]): positions restart at each
    /// document.
    pub fn input_embeddings_in_documents(
        &self,
        input_ids: &Tensor<B, 2, Int>,
        image_embeds: Option<(&Tensor<B, 3>, &Tensor<B, 2, Int>)>,
        past_length: usize,
        documents: Option<&[Vec<u32>]>,
    ) -> Result<Tensor<B, 3>, Kosmos2Error> {
        let device = input_ids.device();
        let mut embeds = self.embed_tokens.forward(input_ids.clone());
        if let Some((images, mask)) = image_embeds {
            embeds = write_image_embeds(embeds, images, mask)?;
        }
        let embeds = embeds.mul_scalar(self.embed_scale);
        let ids: Vec<Vec<u32>> = int_rows(input_ids)
            .into_iter()
            .map(|r| r.into_iter().map(|v| v as u32).collect())
            .collect();
        let positions = match documents {
            None => self.positions.position_ids(&ids, self.pad_token_id, past_length),
            Some(docs) => self.positions.position_ids_in_documents(&ids, docs, self.pad_token_id),
        };
        Ok(embeds.clone() + self.positions.embed_positions::<B>(&positions, &device, embeds.dtype()))
    }
}

impl<B: Backend> Kosmos2<B> {
    /// Build a randomly initialised model from a configuration. The token embedding (also the
    /// tied output head) is drawn from `N(0, embed_dim^-1/2)`, as fairseq and torchscale
    /// initialise it, so that the tied head's initial logits are of order one (Burn's default
    /// `N(0, 1)` would give logits of order `sqrt(embed_dim)` and an initial loss in the
    /// hundreds); the decoder uses PyTorch's default `Linear` initialisation (see
    /// `DecoderConfig::init_magneto` for MAGNETO's).
    pub fn new(config: &Kosmos2Config, device: &B::Device) -> Self {
        let t = &config.text_config;
        let embed_std = (t.embed_dim as f64).powf(-0.5);
        Kosmos2 {
            text_model: Kosmos2TextForCausalLm {
                model: Kosmos2TextModel {
                    embed_tokens: EmbeddingConfig::new(t.vocab_size, t.embed_dim)
                        .with_initializer(burn::nn::Initializer::Normal {
                            mean: 0.0,
                            std: embed_std,
                        })
                        .init(device),
                    decoder: config.decoder().init(device),
                    positions: SinusoidalPositionsConfig::new(t.embed_dim)
                        .with_padding_idx(t.pad_token_id as usize)
                        .init(),
                    embed_scale: if t.scale_embedding {
                        (t.embed_dim as f64).sqrt()
                    } else {
                        1.0
                    },
                    pad_token_id: t.pad_token_id,
                },
                lm_head: (!t.tie_word_embeddings).then(|| {
                    LinearConfig::new(t.embed_dim, t.vocab_size)
                        .with_bias(false)
                        .with_initializer(burn::nn::Initializer::Normal {
                            mean: 0.0,
                            std: embed_std,
                        })
                        .init(device)
                }),
                lm_head_packed: None,
            },
            vision_model: Kosmos2VisionModel {
                model: config.vision().init(device),
            },
            image_to_text_projection: config.projection().init(device),
        }
    }

    /// Load a local HF model directory: `config.json` plus `model.safetensors` or a sharded set
    /// with `model.safetensors.index.json`; weights stored as f32, f16 or bf16 are brought to f32.
    ///
    /// ```no_run
    /// use kosmos_models::Kosmos2;
    /// type B = burn::backend::Flex;
    /// let model = Kosmos2::<B>::from_pretrained("kosmos-2-patch14-224", &Default::default())?;
    /// # Ok::<(), kosmos_models::Kosmos2Error>(())
    /// ```
    pub fn from_pretrained(dir: impl AsRef<Path>, device: &B::Device) -> Result<Self, Kosmos2Error> {
        Self::from_pretrained_with_dtype(dir, device, DType::F32)
    }

    /// As [`Kosmos2::from_pretrained`], with the parameters in `dtype`.
    pub fn from_pretrained_with_dtype(
        dir: impl AsRef<Path>,
        device: &B::Device,
        dtype: DType,
    ) -> Result<Self, Kosmos2Error> {
        let dir = dir.as_ref();
        if !dir.is_dir() {
            return Err(Kosmos2Error::Missing {
                path: dir.to_path_buf(),
                message: "model directory not found".into(),
            });
        }
        let config_path = dir.join("config.json");
        if !config_path.is_file() {
            return Err(Kosmos2Error::Missing {
                path: config_path,
                message: "no config.json: not a Hugging Face model directory".into(),
            });
        }
        let config = Kosmos2Config::from_json_file(&config_path)?;
        let files = weight_files(dir)?;
        let mut model = Self::new(&config, device);
        let map = if config.text_config.tie_word_embeddings {
            &HF_KOSMOS2
        } else {
            &HF_KOSMOS2_UNTIED
        };
        load_safetensors_files(&mut model, &files, map)?;
        let model = cast_floats(model, dtype);
        // The weights a decode step streams, on 2 MiB pages where the CPU backend holds them.
        kosmos_core::memory::use_huge_pages(&model);
        Ok(model)
    }

    /// Files besides the weights that make a model directory, copied by
    /// [`Kosmos2::save_pretrained`] when the source directory has them.
    pub const DIRECTORY_FILES: [&'static str; 8] = [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "sentencepiece.bpe.model",
        "preprocessor_config.json",
        "processor_config.json",
    ];

    /// Save as a Hugging Face model directory that transformers' `from_pretrained` and
    /// [`Kosmos2::from_pretrained`] load: `model.safetensors` with HF's keys and layouts (the
    /// `lm_head` left out when tied, as `save_pretrained` does), written atomically, plus the
    /// configuration, tokenizer and processor files copied from `source` (the directory the
    /// architecture came from). `out` is created if needed. LoRA adapters, if any, are merged
    /// into the saved weights ([`Kosmos2::merge_lora`]).
    pub fn save_pretrained(&self, out: impl AsRef<Path>, source: impl AsRef<Path>) -> Result<(), Kosmos2Error> {
        let (out, source) = (out.as_ref(), source.as_ref());
        std::fs::create_dir_all(out).map_err(|e| Kosmos2Error::Missing {
            path: out.to_path_buf(),
            message: format!("cannot create the directory: {e}"),
        })?;
        for name in Self::DIRECTORY_FILES {
            let from = source.join(name);
            if from.is_file() && from != out.join(name) {
                std::fs::copy(&from, out.join(name)).map_err(|e| Kosmos2Error::Missing {
                    path: out.join(name),
                    message: format!("copying {}: {e}", from.display()),
                })?;
            }
        }
        // Adapters are folded into the weights (see `save_peft_adapter` to keep them apart) and
        // packed decode copies (`pack_weights`) are left out: the HF layout has no place for
        // either. A clone shares the tensors, so this copies nothing.
        let mut model = if self.has_lora() {
            self.clone().merge_lora()
        } else {
            self.clone()
        };
        model.pack_weights(WeightMode::F32);
        kosmos_core::loader::save_safetensors(&model, out.join("model.safetensors"), HF_KOSMOS2_SAVE)?;
        Ok(())
    }

    /// Use the given attention kernel everywhere.
    pub fn set_attention_impl(&mut self, implementation: AttentionImpl) {
        self.text_model.model.decoder.set_attention_impl(implementation);
        for layer in self.vision_model.model.encoder.layers.iter_mut() {
            layer.self_attn.set_implementation(implementation);
        }
        self.image_to_text_projection.x_attn.set_implementation(implementation);
    }

    /// Image embeddings `[batch, latents, embed]` from pixels `[batch, 3, H, W]`.
    pub fn image_embeds(&self, pixel_values: Tensor<B, 4>) -> Tensor<B, 3> {
        let features = self.vision_model.model.image_features(pixel_values, false);
        self.image_to_text_projection.forward(features)
    }

    /// Logits from decoder hidden states (tied head unless the checkpoint has its own).
    ///
    /// The rows are flattened to `[batch * len, embed]` first: Burn 0.21's flex multiplies a
    /// rank-3 input by the tied head's transposed `[embed, vocab]` view through its batched path,
    /// which copies the whole vocabulary matrix on every call (206 ms per decode step for
    /// KOSMOS-2's 65,037 x 512 head on this machine's 2 cores, against 18.7 ms flattened;
    /// `benches` `kosmos-compare --breakdown` times the head).
    pub fn logits(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, t, e] = hidden.dims();
        let rows = hidden.reshape([b * t, e]);
        // One row (a decode step): the head's columns are split over threads (`gemv`).
        let logits = match (&self.text_model.lm_head_packed, &self.text_model.lm_head) {
            // A decode step with a packed head (`pack_weights`).
            (Some(packed), _) if packed.serves(b * t) => packed.matmul(rows),
            (_, Some(head)) => gemv::linear(head, rows),
            (_, None) => gemv::matmul_one_row(rows, self.text_model.model.embed_tokens.weight.val().transpose()),
        };
        let vocab = logits.dims()[1];
        logits.reshape([b, t, vocab])
    }

    /// Full forward pass (`model(...)` in transformers): image embeddings, text decoder, logits
    /// at every position.
    pub fn forward(&self, input: &Kosmos2Input<B>) -> Result<Kosmos2Output<B>, Kosmos2Error> {
        self.forward_cached(input, None)
    }

    /// Forward pass that also fills (or extends) a KV cache. With a non-empty cache the inputs are
    /// the new tokens only and `attention_mask` must cover cached plus new tokens.
    ///
    /// Positions follow transformers exactly: real tokens count from `cache.len() + 2`, pads get
    /// position 1. With a cache built from a left-padded prompt, `cache.len()` counts the pads, so
    /// a padded row's cached steps jump by its number of pads (transformers' behaviour, which
    /// generation reproduces for parity; see the book's generation chapter).
    pub fn forward_cached(
        &self,
        input: &Kosmos2Input<B>,
        cache: Option<&mut DecoderCache<B>>,
    ) -> Result<Kosmos2Output<B>, Kosmos2Error> {
        self.forward_inner(input, cache, None)
    }

    /// [`Kosmos2::forward`] for training rows that pack several documents: `documents[row]`
    /// gives each position's document (1, 2, ... in order; 0 for padding, as
    /// `kosmos_train`'s `Batch::document_ids`). Each document attends only to itself and counts
    /// its positions from the start, so every document gets the logits it would get alone in a
    /// row.
    pub fn forward_packed(
        &self,
        input: &Kosmos2Input<B>,
        documents: &[Vec<u32>],
    ) -> Result<Kosmos2Output<B>, Kosmos2Error> {
        let [b, t] = input.input_ids.dims();
        if documents.len() != b || documents.iter().any(|r| r.len() != t) {
            return Err(Kosmos2Error::Input(format!(
                "document ids for {} rows of lengths {:?}, the input is [{b}, {t}]",
                documents.len(),
                documents.iter().map(Vec::len).collect::<Vec<_>>()
            )));
        }
        self.forward_inner(input, None, Some(documents))
    }

    fn forward_inner(
        &self,
        input: &Kosmos2Input<B>,
        cache: Option<&mut DecoderCache<B>>,
        documents: Option<&[Vec<u32>]>,
    ) -> Result<Kosmos2Output<B>, Kosmos2Error> {
        let image_embeds = match (&input.pixel_values, &input.image_embeds_position_mask) {
            (Some(pixels), Some(_)) => Some(self.image_embeds(pixels.clone())),
            (Some(_), None) => {
                return Err(Kosmos2Error::Input(
                    "pixel_values given without image_embeds_position_mask".into(),
                ));
            }
            (None, _) => None,
        };
        let hidden = self.text_hidden_in_documents(
            &input.input_ids,
            input.attention_mask.as_ref(),
            image_embeds.as_ref().zip(input.image_embeds_position_mask.as_ref()),
            cache,
            documents,
        )?;
        Ok(Kosmos2Output {
            logits: self.logits(hidden.clone()),
            last_hidden_state: hidden,
            image_embeds,
        })
    }

    /// The text decoder's output `[batch, len, embed]` for token ids, with precomputed image
    /// embeddings written in where their position mask is 1 (`image = (embeds, mask)`), extending
    /// `cache` when given. `attention_mask` (`None` = all real) covers cached plus new tokens.
    pub fn text_hidden(
        &self,
        input_ids: &Tensor<B, 2, Int>,
        attention_mask: Option<&Tensor<B, 2, Int>>,
        image: Option<(&Tensor<B, 3>, &Tensor<B, 2, Int>)>,
        cache: Option<&mut DecoderCache<B>>,
    ) -> Result<Tensor<B, 3>, Kosmos2Error> {
        self.text_hidden_in_documents(input_ids, attention_mask, image, cache, None)
    }

    fn text_hidden_in_documents(
        &self,
        input_ids: &Tensor<B, 2, Int>,
        attention_mask: Option<&Tensor<B, 2, Int>>,
        image: Option<(&Tensor<B, 3>, &Tensor<B, 2, Int>)>,
        cache: Option<&mut DecoderCache<B>>,
        documents: Option<&[Vec<u32>]>,
    ) -> Result<Tensor<B, 3>, Kosmos2Error> {
        let [b, t] = input_ids.dims();
        let past = cache.as_ref().map_or(0, |c| c.len());
        if let Some(c) = cache.as_ref()
            && !c.is_empty()
            && c.batch() != Some(b)
        {
            return Err(Kosmos2Error::Input(format!(
                "the cache holds {:?} rows, the input has {b}",
                c.batch()
            )));
        }
        let text = &self.text_model.model;
        let embeds = text.input_embeddings_in_documents(input_ids, image, past, documents)?;
        let mask = match attention_mask {
            Some(m) => {
                if m.dims() != [b, past + t] {
                    return Err(Kosmos2Error::Input(format!(
                        "attention_mask is {:?}, expected {:?} (cached {past} + new {t})",
                        m.dims(),
                        [b, past + t]
                    )));
                }
                AttentionMask::causal_with_attention_mask(m.clone())
            }
            None => AttentionMask::causal(),
        };
        let mask = match documents {
            Some(docs) => {
                let flat: Vec<i64> = docs.iter().flatten().map(|&d| d as i64).collect();
                let device = input_ids.device();
                mask.with_documents(Tensor::from_data(TensorData::new(flat, [b, t]), &device))
            }
            None => mask,
        };
        Ok(text.decoder.forward(embeds, &mask, cache))
    }

    /// Next-token logits `[batch, vocab]` at the last position of hidden states `[batch, len,
    /// embed]` (the head runs on that position only, as generation needs).
    pub fn last_logits(&self, hidden: Tensor<B, 3>) -> Tensor<B, 2> {
        let t = hidden.dims()[1];
        self.logits(hidden.narrow(1, t - 1, 1)).squeeze_dim::<2>(1)
    }

    /// Keep bf16 or Q8 copies of the text decoder's projections and of the head for decode
    /// steps ([`kosmos_core::packed`]); `F32` drops them. Products with more than
    /// [`kosmos_core::packed::MAX_PACKED_ROWS`] rows (the prompt, the vision tower, training)
    /// keep the f32 weights, so
    /// only the tokens generated after the first use the packed copies, and the first token's
    /// logits use the packed head. Packing again replaces the copies (after merging LoRA
    /// adapters, pack again).
    pub fn pack_weights(&mut self, mode: WeightMode) {
        for layer in self.text_model.model.decoder.layers.iter_mut() {
            for mut slot in layer.self_attn.lora_slots().into_iter().chain(layer.ffn.lora_slots()) {
                slot.pack(mode);
            }
        }
        self.text_model.lm_head_packed = match &self.text_model.lm_head {
            Some(head) => PackedWeight::pack(head.weight.val(), mode),
            None => PackedWeight::pack_rows(self.text_model.model.embed_tokens.weight.val(), mode),
        };
    }

    /// The mode of the packed copies ([`Kosmos2::pack_weights`]); `F32` when there are none.
    pub fn weight_mode(&self) -> WeightMode {
        self.text_model
            .lm_head_packed
            .as_ref()
            .map_or(WeightMode::F32, |p| p.mode())
    }

    /// An empty KV cache sized for the text decoder.
    pub fn new_cache(&self) -> DecoderCache<B> {
        self.text_model.model.decoder.new_cache()
    }

    /// The padding id of the text model (its positions are 1, its embedding row is ignored).
    pub fn pad_token_id(&self) -> u32 {
        self.text_model.model.pad_token_id
    }
}

/// The weight files of a model directory: `model.safetensors`, or the shards listed by
/// `model.safetensors.index.json`.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, Kosmos2Error> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if !index.is_file() {
        return Err(Kosmos2Error::Missing {
            path: dir.to_path_buf(),
            message: "neither model.safetensors nor model.safetensors.index.json".into(),
        });
    }
    let text = std::fs::read_to_string(&index).map_err(|e| Kosmos2Error::Missing {
        path: index.clone(),
        message: e.to_string(),
    })?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| Kosmos2Error::Missing {
        path: index.clone(),
        message: format!("not a valid index: {e}"),
    })?;
    let map = json["weight_map"].as_object().ok_or_else(|| Kosmos2Error::Missing {
        path: index.clone(),
        message: "no `weight_map` object".into(),
    })?;
    let mut files: Vec<PathBuf> = map.values().filter_map(|v| v.as_str()).map(|f| dir.join(f)).collect();
    files.sort();
    files.dedup();
    for f in &files {
        if !f.is_file() {
            return Err(Kosmos2Error::Missing {
                path: f.clone(),
                message: format!("shard listed in {} is missing", index.display()),
            });
        }
    }
    Ok(files)
}
