//! Integration tests of kosmos-train (one test binary for the crate).

mod backends;
mod balance;
mod cast;
mod checkpointing;
mod clipping;
mod collate;
mod common;
mod config;
mod data_parallel;
mod errors;
mod grit_parity;
mod lora;
mod mixed_precision;
mod packing;
mod sampler;
mod schedule;
mod shapes;
mod step_parity;
mod tar;
mod trainer;

/// The default test backend.
pub type TB = burn::backend::Flex;
