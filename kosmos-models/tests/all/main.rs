//! Integration tests of kosmos-models (one test binary for the crate).

mod grounding;
mod kosmos1;
mod kosmos2_parity;
mod loading_errors;
mod lora;
mod memory;
mod packed;
mod processor;
mod save;
mod tokenizer;
mod weights;

/// The default test backend.
pub type TB = burn::backend::Flex;
