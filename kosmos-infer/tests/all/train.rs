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
    write_config_with(d, "steps = 4", "")
}

/// [`write_config`] with `top` (top-level keys) and `tables` (appended).
fn write_config_with(d: &Path, top: &str, tables: &str) -> PathBuf {
    let root = repo_root();
    let text = format!(
        r#"
{top}
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
{tables}
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

/// A free TCP port on loopback (bound, read and released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Two nodes (two `kosmos train` processes on loopback, rank 0 serving burn-collective's
/// orchestrator, rank 1 given its rank and address on the command line) make the steps of one
/// process over the same micro-batches: each node computes half of every step's micro-batches
/// and one all-reduce per step sums their gradients. Stopped after step 2 and resumed (rank 1
/// from rank 0's checkpoint), they give the same losses and gradient norms at every step (so the
/// same updates) and the same final weights as one process straight; only rank 0 writes.
#[test]
fn two_nodes_make_the_steps_of_one() {
    let top = "steps = 3\ngrad_accumulation = 2";
    let one = dir("one-node");
    let config = write_config_with(&one, top, "");
    let out = ok(&kosmos(&["train", "--config", config.to_str().unwrap()]));
    assert!(out.contains("trained to step 3"), "{out}");

    let two = dir("two-nodes");
    let (orchestrator, a0, a1) = (free_port(), free_port(), free_port());
    let nodes = format!(
        "[nodes]\ncount = 2\norchestrator = \"ws://127.0.0.1:{orchestrator}\"\nserve_orchestrator = true\naddress = \"ws://127.0.0.1:{a0}\"\n"
    );
    let config = write_config_with(&two, top, &nodes);
    let config = config.to_str().unwrap();
    let address = format!("ws://127.0.0.1:{a1}");
    // Both nodes stop after step 2 (rank 0 checkpoints) and resume from rank 0's checkpoint.
    let both = |rank0: &[&str], rank1: &[&str]| -> (String, String) {
        let rank0 = std::process::Command::new(env!("CARGO_BIN_EXE_kosmos"))
            .args(rank0)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let rank1 = kosmos(&[rank1, &["--node-rank", "1", "--node-address", &address]].concat());
        (ok(&rank0.wait_with_output().unwrap()), ok(&rank1))
    };
    let (out0, out1) = both(
        &["train", "--config", config, "--stop-after", "2"],
        &["train", "--config", config, "--stop-after", "2"],
    );
    assert!(
        out0.contains("trained to step 2") && out1.contains("trained to step 2"),
        "{out0}\n{out1}"
    );
    assert!(
        out0.contains("checkpoint: ") && !out1.contains("checkpoint: "),
        "{out0}\n{out1}"
    );
    let run = two.join("run");
    let run = run.to_str().unwrap();
    let (out0, out1) = both(&["train", "--resume", run], &["train", "--resume", run]);
    assert!(
        out0.contains("trained to step 3") && out1.contains("trained to step 3"),
        "{out0}\n{out1}"
    );

    let metrics = |run: &Path| -> Vec<(f64, f64)> {
        std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let v: Value = serde_json::from_str(l).unwrap();
                (v["loss"].as_f64().unwrap(), v["grad_norm"].as_f64().unwrap())
            })
            .collect()
    };
    let (a, b) = (metrics(&one.join("run")), metrics(&two.join("run")));
    eprintln!("one node  {a:?}\ntwo nodes {b:?}");
    assert_eq!(a.len(), 3);
    assert_eq!(a.len(), b.len());
    for (s, ((la, ga), (lb, gb))) in a.iter().zip(&b).enumerate() {
        assert!((la - lb).abs() <= 1e-9, "step {}: loss {la} vs {lb}", s + 1);
        assert!(
            (ga - gb).abs() <= 1e-5 * ga.abs().max(1.0),
            "step {}: grad norm {ga} vs {gb}",
            s + 1
        );
    }
    let read = |run: &Path| std::fs::read(run.join("run/final/model.safetensors")).unwrap();
    let (x, y) = (read(&one), read(&two));
    let (x, y) = (
        safetensors::SafeTensors::deserialize(&x).unwrap(),
        safetensors::SafeTensors::deserialize(&y).unwrap(),
    );
    let mut worst = 0f32;
    for name in x.names() {
        let f = |t: safetensors::tensor::TensorView| -> Vec<f32> {
            t.data()
                .chunks(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect()
        };
        let (p, q) = (f(x.tensor(name).unwrap()), f(y.tensor(name).unwrap()));
        assert_eq!(p.len(), q.len(), "{name}");
        for (u, v) in p.iter().zip(&q) {
            worst = worst.max((u - v).abs() / (1e-5 + 1e-4 * u.abs()));
        }
    }
    eprintln!("final weights: worst |one - two| / (1e-5 + 1e-4 |one|) = {worst:.3}");
    assert!(worst <= 1.0, "{worst}");
}
