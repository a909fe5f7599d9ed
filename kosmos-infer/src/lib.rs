//! # kosmos-infer
//!
//! Inference front end of kosmos-burn: the `kosmos` command-line tool and the helpers it uses.

pub mod info;
