//! The shapes-world model compiled into the `kosmos` binary: the default `--model`.
//!
//! `assets/shapes/model/` is a tiny KOSMOS-2 (about 1.3M parameters, Hugging Face layout)
//! trained from scratch on the synthetic shapes world by the recipe `assets/shapes/train.toml`
//! (see the book's "The shapes world" chapter). Its files are included in the binary with
//! `include_bytes!`, so an installed `kosmos` grounds shapes on any machine, offline. The model
//! loader reads directories, so the first use writes the files once to a cache directory named
//! by their hash (`$KOSMOS_CACHE`, else `$XDG_CACHE_HOME/kosmos-burn`, else
//! `~/.cache/kosmos-burn`, else the system's temporary directory) and loads from there; the
//! directory is written under a temporary name and renamed, so a crashed or concurrent first
//! run never leaves a half-written model.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// The name that selects the embedded model explicitly (`--model builtin`).
pub const BUILTIN_NAME: &str = "builtin";

/// The embedded files: name and contents.
pub const FILES: &[(&str, &[u8])] = &[
    ("config.json", include_bytes!("../../assets/shapes/model/config.json")),
    (
        "model.safetensors",
        include_bytes!("../../assets/shapes/model/model.safetensors"),
    ),
    (
        "tokenizer.json",
        include_bytes!("../../assets/shapes/model/tokenizer.json"),
    ),
    (
        "tokenizer_config.json",
        include_bytes!("../../assets/shapes/model/tokenizer_config.json"),
    ),
    (
        "preprocessor_config.json",
        include_bytes!("../../assets/shapes/model/preprocessor_config.json"),
    ),
    (
        "processor_config.json",
        include_bytes!("../../assets/shapes/model/processor_config.json"),
    ),
];

/// The first 16 hex digits of the SHA-256 over the embedded files (names and contents).
pub fn fingerprint() -> String {
    let mut h = Sha256::new();
    for (name, bytes) in FILES {
        h.update(name.as_bytes());
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    }
    h.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect()
}

fn cache_root() -> PathBuf {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    env("KOSMOS_CACHE")
        .or_else(|| env("XDG_CACHE_HOME").map(|p| p.join("kosmos-burn")))
        .or_else(|| env("HOME").map(|p| p.join(".cache").join("kosmos-burn")))
        .unwrap_or_else(|| std::env::temp_dir().join("kosmos-burn"))
}

/// The embedded model as a directory: written once under the cache root, then reused.
pub fn model_dir() -> Result<PathBuf, String> {
    materialize(&cache_root())
}

/// Write the embedded model under `root` (if not there yet) and return its directory.
pub fn materialize(root: &Path) -> Result<PathBuf, String> {
    let hash = fingerprint();
    let dir = root.join(format!("shapes-{hash}"));
    if FILES
        .iter()
        .all(|(name, bytes)| std::fs::metadata(dir.join(name)).is_ok_and(|m| m.len() == bytes.len() as u64))
    {
        return Ok(dir);
    }
    let io = |path: &Path, e: std::io::Error| format!("writing the built-in model to `{}`: {e}", path.display());
    std::fs::create_dir_all(root).map_err(|e| io(root, e))?;
    let tmp = root.join(format!(".shapes-{hash}-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
    for (name, bytes) in FILES {
        let path = tmp.join(name);
        std::fs::write(&path, bytes).map_err(|e| io(&path, e))?;
    }
    if let Err(e) = std::fs::rename(&tmp, &dir) {
        // Another process may have won the race; its copy is as good as ours.
        let _ = std::fs::remove_dir_all(&tmp);
        if !dir.join("model.safetensors").is_file() {
            return Err(io(&dir, e));
        }
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn materialises_once_and_reuses() {
        let root = std::env::temp_dir().join(format!("kosmos-builtin-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let dir = materialize(&root).unwrap();
        for (name, bytes) in FILES {
            assert_eq!(std::fs::read(dir.join(name)).unwrap(), *bytes, "{name}");
        }
        let again = materialize(&root).unwrap();
        assert_eq!(dir, again);
        // Only the model directory: no temporary left behind.
        assert_eq!(std::fs::read_dir(&root).unwrap().count(), 1);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
