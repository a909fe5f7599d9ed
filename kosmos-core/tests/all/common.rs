//! Shared test helpers (see `kosmos_core::testing`).

pub use kosmos_core::testing::{ATOL, Fixture, RTOL, assert_close};

/// The default test backend (the fastest CPU backend).
pub type TB = burn::backend::Flex;
