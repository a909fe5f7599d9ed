//! # kosmos-models
//!
//! The assembled models of kosmos-burn, generic over `B: Backend`:
//!
//! * [`Kosmos2`]: KOSMOS-2 as HF transformers' `Kosmos2ForConditionalGeneration`, loadable from a
//!   local Hugging Face model directory (`Kosmos2::from_pretrained`), at logits parity with
//!   transformers;
//! * [`grounding`]: the location-token codec and `post_process_generation`, equal to transformers';
//! * [`processor`]: prompts to ids and masks, equal to transformers' `Kosmos2Processor`;
//! * [`Kosmos1`](kosmos1::Kosmos1): KOSMOS-1 from the same parts (MAGNETO + XPOS decoder, perceiver
//!   resampler), with [`loss`] the text-only next-token loss;
//! * [`lora`]: LoRA adapters on the attention and FFN projections, merging, PEFT's adapter format;
//! * [`config`]: `config.json` parsing with the reference's aliases, defaults and validation.

pub mod config;
pub mod grounding;
pub mod kosmos1;
pub mod kosmos2;
pub mod lora;
pub mod loss;
pub mod processor;

pub use config::{ConfigError, Kosmos2Config, Kosmos2TextConfig, Kosmos2VisionConfig};
pub use kosmos2::{Kosmos2, Kosmos2Error, Kosmos2Input, Kosmos2Output, int_rows};
pub use lora::{LoraSpec, LoraTower};
