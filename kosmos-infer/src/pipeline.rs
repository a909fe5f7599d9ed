//! From files to grounded answers: a KOSMOS-2 model directory (weights, tokenizer, image
//! processor, generation defaults) plus images and prompts in, generated text with its entities
//! and boxes out. This is what the `kosmos generate`, `ground` and `refer` commands run, and the
//! simplest way to use the model from Rust.
//!
//! The steps are those of the transformers model card: `Kosmos2Processor(text, images)` with left
//! padding, `generate()`, `batch_decode(skip_special_tokens=True)` and
//! `post_process_generation` (text after `</image>`, tags removed, entities with normalised
//! boxes).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use burn::prelude::*;
use burn::tensor::DType;
use kosmos_models::grounding::{Entity, caption_after_image, clean_text_and_extract_entities};
use kosmos_models::processor::{EncodeOptions, Kosmos2Processor, PaddingSide, ProcessorError, Prompt};
use kosmos_models::{Kosmos2, Kosmos2Config, Kosmos2Error, Kosmos2Input};
use kosmos_vision::{ImageError, ImageProcessor, ImageProcessorConfig, RgbImage};

use crate::generate::{
    GenerateError, GenerationConfig, GenerationOutput, Timings, TokenEvent, generate, id_rows, int_tensor,
};

/// Anything that can go wrong between files and answers; each names the file or input.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// A required file is missing or unreadable, or the directory is not a KOSMOS-2 model.
    #[error("`{path}`: {message}")]
    Model {
        /// The path.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Loading the weights or running the model failed.
    #[error(transparent)]
    Kosmos2(#[from] Kosmos2Error),
    /// Tokenizer problems and over-long prompts.
    #[error(transparent)]
    Processor(#[from] ProcessorError),
    /// Image decoding or preprocessing problems.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// Bad decoding options.
    #[error(transparent)]
    Generate(#[from] GenerateError),
    /// Requests that do not fit together.
    #[error("{0}")]
    Request(String),
}

/// One prompt, with or without an image.
#[derive(Clone, Debug)]
pub struct Request {
    /// The image (`None`: text only).
    pub image: Option<RgbImage>,
    /// The prompt text (may contain `<grounding>`, `<phrase>` and location tags).
    pub prompt: String,
}

/// The answer for one request.
#[derive(Clone, Debug, PartialEq)]
pub struct Answer {
    /// Decoded text after `</image>` with its tags (prompt plus continuation, special tokens
    /// such as `<s>` and `</s>` dropped): what `post_process_generation` receives.
    pub text: String,
    /// The text with every tag removed.
    pub clean_text: String,
    /// Grounded phrases with their character spans in `clean_text` and normalised boxes.
    pub entities: Vec<Entity>,
    /// The generated ids only (up to and including EOS).
    pub token_ids: Vec<u32>,
    /// The prompt ids without padding.
    pub prompt_token_ids: Vec<u32>,
    /// Beam search: the hypothesis' length-normalised log-probability.
    pub score: Option<f32>,
}

/// Answers plus the batch's timings.
#[derive(Clone, Debug, PartialEq)]
pub struct Answers {
    /// One per request (times `num_return_sequences`), in order.
    pub answers: Vec<Answer>,
    /// Prefill and decode times of the batch.
    pub timings: Timings,
    /// Image preprocessing and tokenization time.
    pub preprocess: Duration,
}

/// A loaded KOSMOS-2 model directory.
pub struct Kosmos2Pipeline<B: Backend> {
    /// The model.
    pub model: Kosmos2<B>,
    /// Its configuration.
    pub config: Kosmos2Config,
    /// Text processor (tokenizer and prompt format).
    pub processor: Kosmos2Processor,
    /// Image preprocessing.
    pub images: ImageProcessor,
    /// Decoding defaults (the directory's `generation_config.json`, when present).
    pub generation: GenerationConfig,
    device: B::Device,
}

fn require(path: PathBuf, what: &str) -> Result<PathBuf, PipelineError> {
    if path.is_file() {
        Ok(path)
    } else {
        Err(PipelineError::Model {
            path,
            message: format!("missing ({what})"),
        })
    }
}

/// Check that `dir/config.json` describes a KOSMOS-2 model.
pub fn check_model_dir(dir: &Path) -> Result<(), PipelineError> {
    if !dir.is_dir() {
        return Err(PipelineError::Model {
            path: dir.to_path_buf(),
            message: "model directory not found".into(),
        });
    }
    let path = require(dir.join("config.json"), "not a Hugging Face model directory")?;
    let text = std::fs::read_to_string(&path).map_err(|e| PipelineError::Model {
        path: path.clone(),
        message: e.to_string(),
    })?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| PipelineError::Model {
        path: path.clone(),
        message: format!("not valid JSON: {e}"),
    })?;
    match json["model_type"].as_str() {
        Some("kosmos-2") => Ok(()),
        Some(other) => Err(PipelineError::Model {
            path,
            message: format!("model_type is `{other}`, expected `kosmos-2`"),
        }),
        None => Err(PipelineError::Model {
            path,
            message: "no `model_type`; expected `kosmos-2`".into(),
        }),
    }
}

impl<B: Backend> Kosmos2Pipeline<B> {
    /// Load a model directory (`config.json`, weights, `tokenizer.json`,
    /// `preprocessor_config.json`, optional `generation_config.json`) with parameters in `dtype`.
    pub fn load(dir: impl AsRef<Path>, device: &B::Device, dtype: DType) -> Result<Self, PipelineError> {
        Self::load_with_adapter(dir, None, device, dtype)
    }

    /// As [`Kosmos2Pipeline::load`], with a PEFT LoRA adapter directory (`adapter_config.json`,
    /// `adapter_model.safetensors`, as `kosmos train` writes to `final/adapter/` and PEFT's
    /// `save_pretrained` writes) loaded onto the model in f32 and merged into its weights before
    /// the parameters are cast to `dtype` (so decoding costs what the plain model costs).
    pub fn load_with_adapter(
        dir: impl AsRef<Path>,
        adapter: Option<&Path>,
        device: &B::Device,
        dtype: DType,
    ) -> Result<Self, PipelineError> {
        let dir = dir.as_ref();
        check_model_dir(dir)?;
        require(dir.join("tokenizer.json"), "the tokenizer")?;
        let pre = require(dir.join("preprocessor_config.json"), "the image processor settings")?;
        let config = Kosmos2Config::from_json_file(dir.join("config.json")).map_err(Kosmos2Error::from)?;
        let images = ImageProcessor::new(ImageProcessorConfig::from_json_file(&pre)?)?;
        let processor = Kosmos2Processor::from_dir(dir, config.latent_query_num)?;
        let generation = GenerationConfig::for_model_dir(dir)?;
        let model = match adapter {
            None => Kosmos2::from_pretrained_with_dtype(dir, device, dtype)?,
            Some(adapter) => {
                let model = Kosmos2::from_pretrained(dir, device)?
                    .load_peft_adapter(adapter, device)?
                    .merge_lora();
                let model = kosmos_core::cast_floats(model, dtype);
                // The merged weights are new buffers (see `kosmos_core::memory`).
                kosmos_core::memory::use_huge_pages(&model);
                model
            }
        };
        Ok(Self {
            model,
            config,
            processor,
            images,
            generation,
            device: device.clone(),
        })
    }

    /// The device the model lives on.
    pub fn device(&self) -> &B::Device {
        &self.device
    }

    /// Tokenize and preprocess a batch into model inputs (left padding, as generation needs).
    pub fn encode(&self, requests: &[Request]) -> Result<Kosmos2Input<B>, PipelineError> {
        if requests.is_empty() {
            return Err(PipelineError::Request("no prompts given".into()));
        }
        let with_image = requests.iter().filter(|r| r.image.is_some()).count();
        if with_image != 0 && with_image != requests.len() {
            return Err(PipelineError::Request(
                "a batch must be all with images or all text-only".into(),
            ));
        }
        let prompts: Vec<Prompt> = requests
            .iter()
            .map(|r| {
                if r.image.is_some() {
                    Prompt::with_image(r.prompt.clone())
                } else {
                    Prompt::text(r.prompt.clone())
                }
            })
            .collect();
        let options = EncodeOptions {
            padding_side: PaddingSide::Left,
            ..EncodeOptions::default()
        }
        .within_model(&self.config);
        let enc = self.processor.encode(&prompts, &options)?;
        let int = |rows: &[Vec<u32>]| int_tensor::<B>(&id_rows(rows), &self.device);
        let pixel_values = if with_image > 0 {
            let imgs: Vec<RgbImage> = requests.iter().filter_map(|r| r.image.clone()).collect();
            Some(self.images.batch::<B>(&imgs, &self.device)?)
        } else {
            None
        };
        Ok(Kosmos2Input {
            input_ids: int(&enc.input_ids),
            attention_mask: Some(int(&enc.attention_mask)),
            image_embeds_position_mask: pixel_values.as_ref().map(|_| int(&enc.image_embeds_position_mask)),
            pixel_values,
        })
    }

    /// Run a batch: encode, generate, decode and extract entities.
    pub fn run(
        &self,
        requests: &[Request],
        config: &GenerationConfig,
        on_token: Option<&mut dyn FnMut(TokenEvent)>,
    ) -> Result<Answers, PipelineError> {
        let start = Instant::now();
        let input = self.encode(requests)?;
        let preprocess = start.elapsed();
        let output = generate(&self.model, &input, config, on_token)?;
        Ok(Answers {
            answers: self.answers(&output)?,
            timings: output.timings,
            preprocess,
        })
    }

    /// Decode generation output into answers.
    pub fn answers(&self, output: &GenerationOutput) -> Result<Vec<Answer>, PipelineError> {
        let pad = self.processor.pad_token_id();
        let mut answers = Vec::with_capacity(output.sequences.len());
        for (i, seq) in output.sequences.iter().enumerate() {
            let new = &output.new_tokens[i];
            let prompt: Vec<u32> = seq[..output.prompt_len].iter().copied().filter(|&t| t != pad).collect();
            let full: Vec<u32> = prompt.iter().chain(new.iter()).copied().collect();
            let decoded = self.processor.decode(&full)?;
            let text = caption_after_image(&decoded).to_string();
            let (clean_text, entities) = clean_text_and_extract_entities(&text, self.processor.grid());
            answers.push(Answer {
                text,
                clean_text,
                entities,
                token_ids: new.clone(),
                prompt_token_ids: prompt,
                score: output.sequence_scores.as_ref().map(|s| s[i]),
            });
        }
        Ok(answers)
    }
}
