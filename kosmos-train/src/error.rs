//! [`TrainError`]: everything that stops a training run, each naming the file, key or step.

use std::path::{Path, PathBuf};

use kosmos_models::Kosmos2Error;

use crate::data::DataError;

/// Why training could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The configuration file cannot be parsed (the message has the line and column).
    #[error("`{path}`: {message}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A configuration value is out of range (the message names the key).
    #[error("invalid configuration: {0}")]
    Invalid(String),
    /// The data layer failed (names `file:line` or `shard.tar[member]`).
    #[error(transparent)]
    Data(#[from] DataError),
    /// The model could not be loaded or run.
    #[error(transparent)]
    Model(#[from] Kosmos2Error),
    /// Reading or writing a file failed.
    #[error("`{path}`: {message}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The system's message.
        message: String,
    },
    /// A checkpoint is missing, incomplete or does not fit.
    #[error("checkpoint `{path}`: {message}")]
    Checkpoint {
        /// The checkpoint (or the directory searched).
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The loss (or the gradient norm) of a step is NaN or infinite: the step was not applied
    /// and not checkpointed.
    #[error(
        "step {step}: the {what} is {value} (not finite); training stopped without applying the step{}",
        match last_checkpoint {
            Some(p) => format!("; the last good checkpoint is `{}`", p.display()),
            None => "; no checkpoint was written yet".to_string(),
        }
    )]
    NonFinite {
        /// The step (1-based) whose loss was not finite.
        step: u64,
        /// `"loss"` or `"gradient norm"`.
        what: &'static str,
        /// The value.
        value: f64,
        /// The newest checkpoint on disk, untouched.
        last_checkpoint: Option<PathBuf>,
    },
    /// `--resume` with a configuration that differs from the checkpoint's.
    #[error(
        "checkpoint `{checkpoint}` was written by a different configuration (run hash {expected}, the given configuration has {found}); resume without --config or with the run's own config.toml"
    )]
    ConfigMismatch {
        /// The checkpoint.
        checkpoint: PathBuf,
        /// The checkpoint's run hash.
        expected: String,
        /// The given configuration's run hash.
        found: String,
    },
}

impl TrainError {
    /// An I/O error on `path`.
    pub fn io(path: &Path, e: impl std::fmt::Display) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            message: e.to_string(),
        }
    }

    /// A checkpoint problem at `path`.
    pub fn checkpoint(path: &Path, message: impl Into<String>) -> Self {
        Self::Checkpoint {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }
}
