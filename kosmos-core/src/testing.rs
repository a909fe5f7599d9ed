//! Helpers for parity tests against reference fixtures, shared by the workspace's test suites.
//!
//! A fixture case is a folder under `fixtures/` with a `meta.json` that names the script that
//! wrote it and that script's SHA-256; [`Fixture::open`] refuses a case whose script changed
//! since (regenerate the fixtures). [`assert_close`] checks the project's elementwise tolerance.

use std::path::{Path, PathBuf};

use burn::prelude::*;
use sha2::{Digest, Sha256};

use crate::loader::TensorFile;

/// The project's f32 absolute tolerance (`|ours - ref| <= ATOL + RTOL |ref|`).
pub const ATOL: f32 = 1e-5;
/// The project's f32 relative tolerance.
pub const RTOL: f32 = 1e-4;

/// The workspace root (the parent of this crate's directory).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// A fixture case folder with its parsed `meta.json`.
pub struct Fixture {
    /// The folder.
    pub dir: PathBuf,
    /// Parsed `meta.json`.
    pub meta: serde_json::Value,
}

impl Fixture {
    /// Open `fixtures/<relative>`, checking the recorded script hash against the script's current
    /// contents. Panics with instructions when they differ (this is for tests).
    pub fn open(relative: &str) -> Self {
        let dir = repo_root().join("fixtures").join(relative);
        let meta_path = dir.join("meta.json");
        let text = std::fs::read_to_string(&meta_path).unwrap_or_else(|e| panic!("{}: {e}", meta_path.display()));
        let meta: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", meta_path.display()));
        let script = meta["script"].as_str().expect("meta.json names its script");
        let bytes = std::fs::read(repo_root().join(script)).unwrap_or_else(|e| panic!("{script}: {e}"));
        let digest = format!("{:x}", Sha256::digest(&bytes));
        assert_eq!(
            meta["script_sha256"].as_str().unwrap_or_default(),
            digest,
            "{script} changed since {} was generated: rerun it to regenerate the fixtures",
            dir.display()
        );
        Self { dir, meta }
    }

    /// Open a safetensors file of the case.
    pub fn file(&self, name: &str) -> TensorFile {
        TensorFile::open(self.dir.join(name)).unwrap_or_else(|e| panic!("{e}"))
    }

    /// An unsigned integer of the case's `config`.
    pub fn config_usize(&self, key: &str) -> usize {
        self.meta["config"][key]
            .as_u64()
            .unwrap_or_else(|| panic!("config.{key} in {}", self.dir.display())) as usize
    }
}

/// Assert `|ours - ref| <= atol + rtol |ref|` elementwise (and finiteness); returns and prints the
/// maximum absolute and relative errors.
pub fn assert_close<B: Backend, const D: usize>(
    ours: Tensor<B, D>,
    reference: Tensor<B, D>,
    atol: f32,
    rtol: f32,
    what: &str,
) -> (f32, f32) {
    assert_eq!(ours.dims(), reference.dims(), "{what}: shape");
    let a = ours.into_data().convert::<f32>().to_vec::<f32>().expect("f32 data");
    let b = reference
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .expect("f32 data");
    let mut max_abs = 0f32;
    let mut max_rel = 0f32;
    for (i, (x, y)) in a.iter().zip(b.iter()).enumerate() {
        let err = (x - y).abs();
        assert!(x.is_finite(), "{what}: non-finite value at {i}");
        assert!(
            err <= atol + rtol * y.abs(),
            "{what}: element {i}: ours {x}, reference {y} (|diff| {err})"
        );
        max_abs = max_abs.max(err);
        max_rel = max_rel.max(err / y.abs().max(1e-12));
    }
    eprintln!("{what}: max |diff| {max_abs:.3e}, max rel {max_rel:.3e}");
    (max_abs, max_rel)
}
