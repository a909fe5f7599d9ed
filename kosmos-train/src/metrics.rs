//! Per-step metrics and their log file (`metrics.jsonl` or `metrics.csv` in the run directory).
//!
//! JSONL: one object per step,
//! `{"step":1,"loss":7.28,"lr":0.001,"tokens":52,"scored_tokens":24,"tokens_per_s":310.5,"grad_norm":4.1,"val_loss":null}`.
//! CSV: the header `step,loss,lr,tokens,scored_tokens,tokens_per_s,grad_norm,val_loss` and one
//! row per step (`val_loss` empty when not validated). On resume, records of steps after the
//! checkpoint (written by the interrupted run) are dropped, so the file describes one run.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::MetricsFormat;
use crate::error::TrainError;

/// What one optimizer step measured.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    /// The step (1-based).
    pub step: u64,
    /// Mean loss over the step's scored tokens (all micro-batches).
    pub loss: f64,
    /// The learning rate the step used.
    pub lr: f64,
    /// Input tokens (non-padding) of the step.
    pub tokens: u64,
    /// Scored (label) tokens of the step.
    pub scored_tokens: u64,
    /// `tokens` per second of wall time (data, forward, backward, optimizer).
    pub tokens_per_s: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Validation loss, when the step validated.
    pub val_loss: Option<f64>,
}

const CSV_HEADER: &str = "step,loss,lr,tokens,scored_tokens,tokens_per_s,grad_norm,val_loss";

/// The metrics file of a run.
pub struct MetricsLog {
    path: PathBuf,
    format: MetricsFormat,
}

impl MetricsLog {
    /// The file name for a format.
    pub fn file_name(format: MetricsFormat) -> &'static str {
        match format {
            MetricsFormat::Jsonl => "metrics.jsonl",
            MetricsFormat::Csv => "metrics.csv",
        }
    }

    /// Open the log of the run in `dir`, keeping the records of steps `<= keep_through` (0 for a
    /// fresh run: the file starts empty).
    pub fn open(dir: &Path, format: MetricsFormat, keep_through: u64) -> Result<Self, TrainError> {
        let path = dir.join(Self::file_name(format));
        let old = if keep_through > 0 && path.is_file() {
            std::fs::read_to_string(&path).map_err(|e| TrainError::io(&path, e))?
        } else {
            String::new()
        };
        let mut kept = String::new();
        if format == MetricsFormat::Csv {
            kept.push_str(CSV_HEADER);
            kept.push('\n');
        }
        for line in old.lines().filter(|l| !l.trim().is_empty() && *l != CSV_HEADER) {
            let step = match format {
                MetricsFormat::Jsonl => serde_json::from_str::<serde_json::Value>(line)
                    .ok()
                    .and_then(|v| v["step"].as_u64()),
                MetricsFormat::Csv => line.split(',').next().and_then(|s| s.parse().ok()),
            };
            if step.is_some_and(|s| s <= keep_through) {
                kept.push_str(line);
                kept.push('\n');
            }
        }
        std::fs::write(&path, kept).map_err(|e| TrainError::io(&path, e))?;
        Ok(Self { path, format })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Append one step's record.
    pub fn write(&mut self, m: &StepMetrics) -> Result<(), TrainError> {
        let line = match self.format {
            MetricsFormat::Jsonl => serde_json::to_string(m).expect("metrics serialise"),
            MetricsFormat::Csv => format!(
                "{},{},{},{},{},{},{},{}",
                m.step,
                m.loss,
                m.lr,
                m.tokens,
                m.scored_tokens,
                m.tokens_per_s,
                m.grad_norm,
                m.val_loss.map(|v| v.to_string()).unwrap_or_default()
            ),
        };
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.path)
            .map_err(|e| TrainError::io(&self.path, e))?;
        writeln!(f, "{line}").map_err(|e| TrainError::io(&self.path, e))
    }
}
