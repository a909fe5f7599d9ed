//! Integration tests of kosmos-models (one test binary for the crate).

mod grounding;
mod kosmos2_parity;
mod loading_errors;

/// The default test backend.
pub type TB = burn::backend::Flex;
