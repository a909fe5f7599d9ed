//! # kosmos-train
//!
//! The training engine of kosmos-burn. Its first part is the [`data`] layer: sources read from
//! JSONL manifests and WebDataset-style `.tar` shards (text documents, image-caption pairs,
//! interleaved documents, GRIT grounded captions, instruction data), collation into token ids,
//! label masks and image tensors, truncation and packing, and a weighted, seeded, resumable
//! mixture sampler. The training loop runs on Burn's autodiff backends through
//! [`run_autodiff_task`].

pub mod data;
pub mod optim;
pub mod shapes;

pub use kosmos_core::backend::{AutodiffTask, run_autodiff_task};
