//! Checkpoints: one directory per step, written atomically, the newest K kept.
//!
//! ```text
//! <output_dir>/checkpoints/step-000010/
//!     model.mpk      the model record (Burn named MessagePack, full precision)
//!     adapters.mpk   instead of model.mpk in a LoRA run: the adapters only (the frozen base is
//!                    the weights of `model.dir`)
//!     optim.mpk      the AdamW state (moments and step count per parameter id)
//!     state.json     TrainState: step, tokens, data loader position, RNG state, run hash
//!     config.toml    the run's configuration (paths resolved)
//! ```
//!
//! A checkpoint is written into `checkpoints/.tmp-step-000010/` and renamed to `step-000010/`
//! only when every file is complete (`rename` of a directory is atomic on POSIX file systems),
//! so a run killed mid-write leaves either the previous set of checkpoints or the new one; a
//! left-over `.tmp-*` directory is ignored and removed by the next save. A checkpoint directory
//! counts only if it has `state.json`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::TrainConfig;
use crate::data::DataState;
use crate::error::TrainError;

/// Version of the checkpoint layout.
pub const FORMAT: u32 = 1;

/// The random-number state of a run. Every random draw of step `s` is seeded by
/// [`step_seed`]`(seed, s)` (the backend's generator is re-seeded before each step), so the
/// state is just the base seed and the step reached; the data order has its own state
/// ([`DataState`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    /// The run's base seed.
    pub seed: u64,
    /// Steps completed.
    pub step: u64,
}

/// The seed of step `step` of a run with base seed `seed` (SplitMix64 of both).
pub fn step_seed(seed: u64, step: u64) -> u64 {
    let mut z = seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `state.json`: where the run stands after a step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// [`FORMAT`].
    pub format: u32,
    /// Optimizer steps completed.
    pub step: u64,
    /// Input tokens (non-padding) trained on so far.
    pub tokens: u64,
    /// The training data loader's position.
    pub data: DataState,
    /// The random-number state.
    pub rng: RngState,
    /// [`TrainConfig::run_hash`] of the run.
    pub config_hash: String,
}

/// The directory name of the checkpoint of `step`.
pub fn step_dir_name(step: u64) -> String {
    format!("step-{step:06}")
}

fn parse_step(name: &str) -> Option<u64> {
    name.strip_prefix("step-")?.parse().ok()
}

/// The complete checkpoints under `checkpoints_dir`, oldest first.
pub fn list(checkpoints_dir: &Path) -> Result<Vec<(u64, PathBuf)>, TrainError> {
    if !checkpoints_dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for entry in std::fs::read_dir(checkpoints_dir).map_err(|e| TrainError::io(checkpoints_dir, e))? {
        let entry = entry.map_err(|e| TrainError::io(checkpoints_dir, e))?;
        let path = entry.path();
        if let Some(step) = entry.file_name().to_str().and_then(parse_step)
            && path.join("state.json").is_file()
        {
            out.push((step, path));
        }
    }
    out.sort();
    Ok(out)
}

/// The checkpoint meant by `dir`: a checkpoint directory itself (has `state.json`), or the
/// newest checkpoint of a `checkpoints/` directory or of a run directory (`output_dir`).
pub fn resolve(dir: &Path) -> Result<PathBuf, TrainError> {
    if dir.join("state.json").is_file() {
        return Ok(dir.to_path_buf());
    }
    if !dir.is_dir() {
        return Err(TrainError::checkpoint(dir, "no such directory"));
    }
    for candidate in [dir.join("checkpoints"), dir.to_path_buf()] {
        if let Some((_, newest)) = list(&candidate)?.pop() {
            return Ok(newest);
        }
    }
    Err(TrainError::checkpoint(
        dir,
        "no checkpoint here (expected a step-NNNNNN directory with state.json, or a run directory with checkpoints/)",
    ))
}

/// Read `state.json` and `config.toml` of a checkpoint directory.
pub fn read(step_dir: &Path) -> Result<(TrainState, TrainConfig), TrainError> {
    let state_path = step_dir.join("state.json");
    let text = std::fs::read_to_string(&state_path).map_err(|e| TrainError::io(&state_path, e))?;
    let state: TrainState =
        serde_json::from_str(&text).map_err(|e| TrainError::checkpoint(&state_path, e.to_string()))?;
    if state.format != FORMAT {
        return Err(TrainError::checkpoint(
            &state_path,
            format!("format {} (this build reads format {FORMAT})", state.format),
        ));
    }
    let config_path = step_dir.join("config.toml");
    let text = std::fs::read_to_string(&config_path).map_err(|e| TrainError::io(&config_path, e))?;
    let config = TrainConfig::from_toml_str(&text, &config_path)?;
    if config.run_hash() != state.config_hash {
        return Err(TrainError::checkpoint(
            step_dir,
            "config.toml does not match the run hash in state.json",
        ));
    }
    Ok((state, config))
}

/// Write a checkpoint atomically: `write_files` fills a fresh temporary directory (the model
/// and optimizer records), then `state.json` and `config.toml` are added and the directory is
/// renamed to `step-NNNNNN`. Older checkpoints beyond `keep_last` are deleted afterwards.
/// Returns the checkpoint's path.
pub fn write(
    checkpoints_dir: &Path,
    state: &TrainState,
    config: &TrainConfig,
    keep_last: usize,
    write_files: impl FnOnce(&Path) -> Result<(), TrainError>,
) -> Result<PathBuf, TrainError> {
    let name = step_dir_name(state.step);
    let tmp = checkpoints_dir.join(format!(".tmp-{name}"));
    let done = checkpoints_dir.join(&name);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
    write_files(&tmp)?;
    let json = serde_json::to_string_pretty(state).expect("the state serialises");
    write_synced(&tmp.join("state.json"), json.as_bytes())?;
    write_synced(&tmp.join("config.toml"), config.to_toml()?.as_bytes())?;
    if done.exists() {
        // A checkpoint of the same step from an earlier, interrupted attempt of this run.
        std::fs::remove_dir_all(&done).map_err(|e| TrainError::io(&done, e))?;
    }
    std::fs::rename(&tmp, &done).map_err(|e| TrainError::io(&done, e))?;
    let all = list(checkpoints_dir)?;
    for (_, old) in all.iter().take(all.len().saturating_sub(keep_last.max(1))) {
        std::fs::remove_dir_all(old).map_err(|e| TrainError::io(old, e))?;
    }
    Ok(done)
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), TrainError> {
    use std::io::Write;
    let mut f = std::fs::File::create(path).map_err(|e| TrainError::io(path, e))?;
    f.write_all(bytes).map_err(|e| TrainError::io(path, e))?;
    f.sync_all().map_err(|e| TrainError::io(path, e))
}
