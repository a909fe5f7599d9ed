//! Fixture access and tolerance checks shared by the tests.

use std::path::{Path, PathBuf};

use burn::prelude::*;
use kosmos_core::TensorFile;
use sha2::{Digest, Sha256};

/// The default test backend (the fastest CPU backend).
pub type TB = burn::backend::Flex;

/// Repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// A fixture case folder, checked against the script that made it: the script's current sha256
/// must equal the one recorded in `meta.json` (regenerate fixtures after changing the script).
pub struct Fixture {
    pub dir: PathBuf,
    pub meta: serde_json::Value,
}

impl Fixture {
    pub fn open(relative: &str) -> Self {
        let dir = repo_root().join("fixtures").join(relative);
        let meta_path = dir.join("meta.json");
        let meta: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(&meta_path).unwrap_or_else(|e| panic!("{}: {e}", meta_path.display())),
        )
        .unwrap();
        let script = meta["script"].as_str().expect("meta.json names its script");
        let bytes = std::fs::read(repo_root().join(script)).unwrap();
        let digest = format!("{:x}", Sha256::digest(&bytes));
        assert_eq!(
            meta["script_sha256"].as_str().unwrap(),
            digest,
            "{script} changed since {} was generated: rerun it to regenerate the fixtures",
            dir.display()
        );
        Self { dir, meta }
    }

    pub fn file(&self, name: &str) -> TensorFile {
        TensorFile::open(self.dir.join(name)).unwrap()
    }

    pub fn config_usize(&self, key: &str) -> usize {
        self.meta["config"][key]
            .as_u64()
            .unwrap_or_else(|| panic!("config.{key}")) as usize
    }
}

/// Elementwise `|ours - ref| <= atol + rtol * |ref|`; returns (max abs error, max rel error).
pub fn assert_close<B: Backend, const D: usize>(
    ours: Tensor<B, D>,
    reference: Tensor<B, D>,
    atol: f32,
    rtol: f32,
    what: &str,
) -> (f32, f32) {
    assert_eq!(ours.dims(), reference.dims(), "{what}: shape");
    let a = ours.into_data().convert::<f32>().to_vec::<f32>().unwrap();
    let b = reference.into_data().convert::<f32>().to_vec::<f32>().unwrap();
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

/// The project's f32 tolerance (DEVELOPERS.md).
pub const ATOL: f32 = 1e-5;
pub const RTOL: f32 = 1e-4;
