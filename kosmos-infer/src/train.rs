//! `kosmos train`: a training run from a TOML configuration, or the continuation of one from a
//! checkpoint, on the backend named by `--device` (see `kosmos_train::config` for the format).

use std::path::Path;

use kosmos_train::{TrainConfig, TrainTask, run_autodiff_task};

/// Train (or resume) and describe the result in a few lines.
pub fn run(
    config: Option<&Path>,
    resume: Option<&Path>,
    stop_after: Option<u64>,
    device: &str,
) -> Result<String, String> {
    let config = config
        .map(TrainConfig::from_toml_file)
        .transpose()
        .map_err(|e| e.to_string())?;
    if config.is_none() && resume.is_none() {
        return Err("give --config FILE.toml or --resume DIR".into());
    }
    let task = TrainTask {
        config,
        resume: resume.map(Path::to_path_buf),
        stop_after,
    };
    let summary = run_autodiff_task(device, task)
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let mut out = format!("trained to step {}", summary.step);
    if let Some(last) = summary.steps.last() {
        out.push_str(&format!(" (loss {:.4})", last.loss));
    }
    out.push('\n');
    if let Some(path) = &summary.last_checkpoint {
        out.push_str(&format!("checkpoint: {}\n", path.display()));
    }
    Ok(out)
}
