//! `kosmos-compare` on the tiny generation fixture model: its JSON, the `--serve` protocol and
//! one-line errors (the Python driver, `scripts/bench/compare.py`, is not run here); and
//! `kosmos-bandwidth`, the memory read rate that driver prints beside its table.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use safetensors::tensor::TensorView;
use safetensors::{Dtype, serialize};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_kosmos-compare");

fn model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/generate/model")
}

/// Inputs for the fixture model (8 latents, 28-pixel images): `<s> <image>` 8 slots `</image>`
/// and three text ids; `image_len` != 8 makes the image mask inconsistent.
fn write_inputs(name: &str, image_len: usize) -> PathBuf {
    let mut ids = vec![0i64, 5];
    ids.extend(6..14);
    ids.extend([14, 20, 21, 22]);
    let len = ids.len();
    let mut image_mask = vec![0i64; len];
    for m in image_mask.iter_mut().skip(2).take(image_len) {
        *m = 1;
    }
    let ones = vec![1i64; len];
    let pixels: Vec<f32> = (0..3 * 28 * 28).map(|i| ((i % 17) as f32 - 8.0) / 8.0).collect();
    let bytes = |v: &[i64]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let (ids_b, mask_b, ones_b) = (bytes(&ids), bytes(&image_mask), bytes(&ones));
    let px_b: Vec<u8> = pixels.iter().flat_map(|x| x.to_le_bytes()).collect();
    let tensors = vec![
        ("input_ids", TensorView::new(Dtype::I64, vec![1, len], &ids_b).unwrap()),
        (
            "attention_mask",
            TensorView::new(Dtype::I64, vec![1, len], &ones_b).unwrap(),
        ),
        (
            "image_embeds_position_mask",
            TensorView::new(Dtype::I64, vec![1, len], &mask_b).unwrap(),
        ),
        (
            "pixel_values",
            TensorView::new(Dtype::F32, vec![1, 3, 28, 28], &px_b).unwrap(),
        ),
    ];
    let path = std::env::temp_dir().join(format!("kosmos-compare-{}-{name}.safetensors", std::process::id()));
    std::fs::write(&path, serialize(tensors, None).unwrap()).unwrap();
    path
}

fn run(args: &[&str], inputs: &Path) -> std::process::Output {
    Command::new(BIN)
        .arg("--model")
        .arg(model_dir())
        .arg("--inputs")
        .arg(inputs)
        .args(args)
        .output()
        .expect("kosmos-compare runs")
}

#[test]
fn prints_every_phase_as_json() {
    let inputs = write_inputs("phases", 8);
    let out = run(
        &["--repeats", "2", "--warmup", "0", "--new-tokens", "3", "--breakdown"],
        &inputs,
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json: Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    let repeats = json["repeats"].as_array().expect("repeats");
    assert_eq!(repeats.len(), 2);
    for r in repeats {
        for key in [
            "vision_s",
            "forward_s",
            "ttft_s",
            "decode_per_token_s",
            "decoder_prompt_s",
            "head_all_s",
            "head_last_s",
            "step_decoder_s",
            "step_head_s",
        ] {
            assert!(r[key].as_f64().is_some_and(|t| t > 0.0), "{key}: {}", r[key]);
        }
        assert_eq!(r["decode_steps"], 2);
        assert_eq!(r["tokens"].as_array().unwrap().len(), 3);
        assert_eq!(r["last_logits_head"].as_array().unwrap().len(), 16);
    }
    // Greedy decoding is deterministic.
    assert_eq!(repeats[0]["tokens"], repeats[1]["tokens"]);
    std::fs::remove_file(inputs).ok();
}

#[test]
fn serve_answers_one_line_per_run() {
    let inputs = write_inputs("serve", 8);
    let mut child = Command::new(BIN)
        .arg("--model")
        .arg(model_dir())
        .arg("--inputs")
        .arg(&inputs)
        .args(["--new-tokens", "2", "--serve"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("kosmos-compare runs");
    child.stdin.take().unwrap().write_all(b"run\nrun\nquit\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let lines: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["ready"], true);
    assert_eq!(lines[1]["tokens"], lines[2]["tokens"]);
    std::fs::remove_file(inputs).ok();
}

#[test]
fn bad_inputs_fail_with_one_line() {
    let inputs = write_inputs("bad", 5);
    let out = run(&["--repeats", "1"], &inputs);
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("error: ") && err.contains("image_embeds_position_mask"),
        "{err}"
    );
    let out = run(&[], Path::new("/nonexistent/inputs.safetensors"));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(!out.status.success() && err.starts_with("error: cannot read"), "{err}");
    std::fs::remove_file(inputs).ok();
}

/// `kosmos-bandwidth` reads every value of its buffer on each pass (the buffer holds ones, so the
/// pass's sum is its length, exactly), on one thread and on several, and reports rates.
#[test]
fn bandwidth_reads_the_whole_buffer() {
    for threads in ["1", "3"] {
        let out = Command::new(env!("CARGO_BIN_EXE_kosmos-bandwidth"))
            .args(["--gib", "0.01", "--threads", threads, "--repeats", "2"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let report: Value = serde_json::from_slice(&out.stdout).unwrap();
        let bytes = report["bytes"].as_u64().unwrap();
        assert_eq!(bytes, (0.01 * (1u64 << 30) as f64 / 4.0) as u64 * 4);
        assert_eq!(report["checksum"].as_f64().unwrap(), (bytes / 4) as f64);
        let rates = report["rates_gb_s"].as_array().unwrap();
        assert_eq!(rates.len(), 2);
        let best = report["best_gb_s"].as_f64().unwrap();
        assert!(
            rates
                .iter()
                .all(|r| r.as_f64().unwrap() > 0.0 && r.as_f64().unwrap() <= best)
        );
    }
}

/// `--huge-pages` reads the same buffer on 2 MiB pages (or, where the kernel cannot make them,
/// says so in one line instead of measuring 4 KiB pages under that name).
#[test]
fn bandwidth_on_huge_pages_reads_the_whole_buffer_or_says_why_not() {
    let out = Command::new(env!("CARGO_BIN_EXE_kosmos-bandwidth"))
        .args(["--gib", "0.02", "--threads", "2", "--repeats", "2", "--huge-pages"])
        .output()
        .unwrap();
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("huge pages") && err.lines().count() == 1, "{err}");
        return;
    }
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let bytes = report["bytes"].as_u64().unwrap();
    assert_eq!(report["checksum"].as_f64().unwrap(), (bytes / 4) as f64);
    let huge = report["huge_page_bytes"].as_u64().unwrap();
    assert!(huge > 0 && huge <= bytes, "{huge} of {bytes} bytes on huge pages");
}

#[test]
fn bandwidth_rejects_bad_arguments_with_one_line() {
    for args in [["--gib", "0"], ["--threads", "0"]] {
        let out = Command::new(env!("CARGO_BIN_EXE_kosmos-bandwidth"))
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(err.starts_with("error: ") && err.lines().count() == 1, "{err}");
    }
}
