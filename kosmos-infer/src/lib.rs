//! # kosmos-infer
//!
//! Inference front end of kosmos-burn: the `kosmos` command-line tool and the helpers it uses
//! (`kosmos train` runs `kosmos-train`'s trainer).

pub mod annotate;
pub mod commands;
pub mod eval;
mod font;
pub mod generate;
#[cfg(feature = "hub")]
pub mod hub;
pub mod info;
pub mod logits;
pub mod pipeline;
pub mod train;
