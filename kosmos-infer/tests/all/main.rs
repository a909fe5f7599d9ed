//! Integration tests of kosmos-infer (one test binary for the crate).

mod builtin;
mod cli;
mod eval;
mod generation;
mod processors;
mod train;

/// The default test backend.
pub type TB = burn::backend::Flex;
