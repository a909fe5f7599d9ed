//! # kosmos-train
//!
//! The training engine of kosmos-burn.
//!
//! * [`data`]: sources read from JSONL manifests and WebDataset-style `.tar` shards (text
//!   documents, image-caption pairs, interleaved documents, GRIT grounded captions, instruction
//!   data), collation into token ids, label masks and image tensors, truncation and packing, and
//!   a weighted, seeded, resumable mixture sampler;
//! * [`config`]: [`TrainConfig`], the TOML configuration of a run;
//! * [`trainer`]: [`Trainer`], the loop (gradient accumulation, global-norm clipping, AdamW,
//!   schedule, freezing, validation, NaN stop), and [`TrainTask`] to run it on a backend
//!   chosen at run time through [`run_autodiff_task`];
//! * [`optim`], [`schedule`], [`clip`]: AdamW with PyTorch's parameterisation, warmup and
//!   decay, clipping by the global norm;
//! * [`checkpoint`], [`metrics`]: atomic checkpoints with resume, the metrics log;
//! * [`collective`]: data parallelism over several machines (burn-collective).

pub mod checkpoint;
pub mod clip;
pub mod collective;
pub mod config;
pub mod data;
pub mod error;
pub mod location_init;
pub mod metrics;
pub mod optim;
pub mod plot;
pub mod schedule;
pub mod shapes;
pub mod trainer;

pub use config::TrainConfig;
pub use error::TrainError;
pub use kosmos_core::backend::{AutodiffTask, run_autodiff_task};
pub use trainer::{TrainTask, Trainer};
