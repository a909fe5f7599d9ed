//! # kosmos-train
//!
//! The training engine of kosmos-burn: data sources, collation with text-only loss masks, and the
//! training loop on Burn's autodiff backends. The engine arrives with the training issue; the
//! crate exists so that the workspace layout and feature wiring are in place.

pub use kosmos_core::backend::{AutodiffTask, run_autodiff_task};
