//! `kosmos train` on the fixture model and the GRIT fixture records: a 4-step run, and the same
//! run as 2 steps, a stop and `--resume` (same losses), plus configuration errors.

use std::path::{Path, PathBuf};

use kosmos_core::testing::repo_root;

use crate::cli::kosmos;
use serde_json::Value;

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kosmos-cli-train-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A configuration file in `d` (paths relative to the file, as users write them).
fn write_config(d: &Path) -> PathBuf {
    let root = repo_root();
    let text = format!(
        r#"
steps = 4
batch_size = 2
output_dir = "run"

[model]
dir = "{model}"
freeze_vision = "all_but_last"

[optim]
lr = 2e-3
warmup_steps = 1
decay = "linear"

[checkpoint]
every = 2
keep_last = 2

[log]
progress = false

[data]
max_len = 48
[[data.sources]]
name = "grit"
kind = "grit"
paths = ["{data}/grit.jsonl"]
image_root = "{data}"
"#,
        model = root.join("fixtures/generate/model").display(),
        data = root.join("fixtures/train_data").display()
    );
    let path = d.join("train.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "kosmos train failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn losses(run: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap())
        })
        .collect()
}

#[test]
fn train_then_resume_is_the_same_run() {
    let straight = dir("straight");
    let config = write_config(&straight);
    let out = ok(&kosmos(&["train", "--config", config.to_str().unwrap()]));
    assert!(out.starts_with("trained to step 4"), "{out}");
    let run = straight.join("run");
    assert!(run.join("checkpoints/step-000004/state.json").is_file());
    assert!(run.join("checkpoints/step-000002/model.mpk").is_file());
    let all = losses(&run);
    assert_eq!(all.iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![1, 2, 3, 4]);

    // `kosmos export` of the last checkpoint writes what the trainer wrote to `final/`, and
    // `kosmos plot` draws the run's four losses.
    let exported = straight.join("exported");
    ok(&kosmos(&[
        "export",
        "--checkpoint",
        run.to_str().unwrap(),
        "--out",
        exported.to_str().unwrap(),
    ]));
    for name in ["config.json", "tokenizer.json", "preprocessor_config.json"] {
        assert_eq!(
            std::fs::read(exported.join(name)).unwrap(),
            std::fs::read(run.join("final").join(name)).unwrap(),
            "{name}"
        );
    }
    // The same tensors (the header's key order is not fixed, so not byte for byte).
    let (a, b) = (
        std::fs::read(exported.join("model.safetensors")).unwrap(),
        std::fs::read(run.join("final/model.safetensors")).unwrap(),
    );
    let (a, b) = (
        safetensors::SafeTensors::deserialize(&a).unwrap(),
        safetensors::SafeTensors::deserialize(&b).unwrap(),
    );
    let (mut na, mut nb) = (a.names(), b.names());
    na.sort();
    nb.sort();
    assert_eq!(na, nb);
    for n in na {
        let (x, y) = (a.tensor(n).unwrap(), b.tensor(n).unwrap());
        assert_eq!((x.shape(), x.dtype()), (y.shape(), y.dtype()), "{n}");
        assert_eq!(x.data(), y.data(), "{n}");
    }
    let svg = straight.join("loss.svg");
    ok(&kosmos(&[
        "plot",
        "--run",
        run.to_str().unwrap(),
        "--out",
        svg.to_str().unwrap(),
    ]));
    let svg = std::fs::read_to_string(svg).unwrap();
    assert!(svg.starts_with("<svg") && svg.matches(" L").count() >= 6, "{svg}");

    let split = dir("split");
    let config = write_config(&split);
    let config = config.to_str().unwrap();
    let out = ok(&kosmos(&["train", "--config", config, "--stop-after", "2"]));
    assert!(out.starts_with("trained to step 2"), "{out}");
    let run = split.join("run");
    let out = ok(&kosmos(&[
        "train",
        "--resume",
        run.to_str().unwrap(),
        "--device",
        "flex",
    ]));
    assert!(out.starts_with("trained to step 4"), "{out}");
    let resumed = losses(&run);
    eprintln!("straight {all:?}\nresumed  {resumed:?}");
    assert_eq!(all.len(), resumed.len());
    for ((s, a), (t, b)) in all.iter().zip(&resumed) {
        assert_eq!(s, t);
        assert!((a - b).abs() <= 1e-6, "step {s}: {a} vs {b}");
    }
}

#[test]
fn train_errors_are_one_line() {
    let d = dir("errors");
    let bad = d.join("bad.toml");
    std::fs::write(
        &bad,
        "steps = 4\nbatch_size = 2\noutput_dir = \"run\"\nlearning_rate = 1\n",
    )
    .unwrap();
    let out = kosmos(&["train", "--config", bad.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.starts_with("error: ") && stderr.contains("bad.toml"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    let out = kosmos(&["train", "--resume", d.join("nowhere").to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.starts_with("error: checkpoint") && stderr.contains("nowhere"),
        "{stderr}"
    );
}
