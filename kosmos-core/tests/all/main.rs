//! Integration tests of kosmos-core (one test binary for the crate).

mod attention;
mod backends;
mod common;
mod decoder_init;
mod decoder_parity;
mod fused;
mod gemv;
mod loader_errors;
mod memory;
mod packed;
mod positions;
