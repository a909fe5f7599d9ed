//! `kosmos train`: a training run from a TOML configuration, or the continuation of one from a
//! checkpoint, on the backend named by `--device` (see `kosmos_train::config` for the format).

use std::path::Path;

use kosmos_train::trainer::NodeOverrides;
use kosmos_train::{TrainConfig, TrainTask};

/// Train (or resume) and describe the result in a few lines; `node` is this node's rank and
/// address in a multi-node run (over the configuration's `[nodes]`).
pub fn run(
    config: Option<&Path>,
    resume: Option<&Path>,
    stop_after: Option<u64>,
    device: &str,
    node: NodeOverrides,
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
        node,
    };
    let summary = task.run_on(device).map_err(|e| e.to_string())?;
    let mut out = format!("trained to step {}", summary.step);
    if let Some(last) = summary.steps.last() {
        out.push_str(&format!(" (loss {:.4})", last.loss));
    }
    out.push('\n');
    if let Some(path) = &summary.last_checkpoint {
        // (none on a multi-node run's ranks other than 0: rank 0 writes)
        out.push_str(&format!("checkpoint: {}\n", path.display()));
    }
    Ok(out)
}

/// `kosmos plot`: the loss curve of a run (`run` is the run directory or its `metrics.jsonl`)
/// as an SVG picture at `out`.
pub fn plot(run: &Path, out: &Path, title: &str) -> Result<(), String> {
    use kosmos_train::metrics::StepMetrics;
    use kosmos_train::plot::{PlotOptions, loss_curve_svg};
    let path = if run.is_dir() {
        run.join("metrics.jsonl")
    } else {
        run.to_path_buf()
    };
    let text = std::fs::read_to_string(&path).map_err(|e| format!("`{}`: {e}", path.display()))?;
    let mut steps = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let m: StepMetrics =
            serde_json::from_str(line).map_err(|e| format!("`{}` line {}: {e}", path.display(), i + 1))?;
        steps.push(m);
    }
    let options = PlotOptions {
        title: title.to_string(),
        ..PlotOptions::default()
    };
    let svg = loss_curve_svg(&steps, &options)
        .ok_or_else(|| format!("`{}`: no step with a finite loss to plot", path.display()))?;
    std::fs::write(out, svg).map_err(|e| format!("`{}`: {e}", out.display()))?;
    eprintln!("wrote the loss curve of {} steps to {}", steps.len(), out.display());
    Ok(())
}

/// `kosmos export`: the model of a checkpoint as a Hugging Face directory.
pub fn export(checkpoint: &Path, out: &Path, device: &str) -> Result<(), String> {
    struct Export<'a>(&'a Path, &'a Path);
    impl kosmos_core::backend::BackendTask for Export<'_> {
        type Output = Result<std::path::PathBuf, kosmos_train::TrainError>;
        fn run<B: burn::prelude::Backend>(self, device: B::Device) -> Self::Output {
            kosmos_train::trainer::export_checkpoint::<B>(self.0, self.1, &device)
        }
    }
    let step_dir = kosmos_core::backend::run_task(device, Export(checkpoint, out))
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    eprintln!("exported {} to {}", step_dir.display(), out.display());
    Ok(())
}
