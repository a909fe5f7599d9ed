//! Integration tests of kosmos-vision (one test binary for the crate).

mod clip_parity;
mod freeze;
mod perceiver;
mod preprocess;

/// The default test backend.
pub type TB = burn::backend::Flex;
