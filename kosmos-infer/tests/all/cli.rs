//! The `kosmos` binary on the fixture model (`fixtures/generate/model`): JSON output checked
//! against transformers' tokens, annotated pictures decoded and checked for drawn pixels, and every
//! kind of bad input giving one clear line on stderr and a non-zero exit.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kosmos_core::testing::Fixture;
use serde_json::Value;

fn fixture() -> Fixture {
    Fixture::open("generate")
}

/// Run the `kosmos` binary (shared by the CLI tests of this test binary).
pub fn kosmos(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kosmos"))
        .args(args)
        .env("XDG_RUNTIME_DIR", std::env::temp_dir())
        .output()
        .expect("run kosmos")
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kosmos-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// Successful run: stdout parsed as one JSON object per line.
fn json_lines(out: &Output) -> Vec<Value> {
    assert!(
        out.status.success(),
        "kosmos failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect()
}

/// Failed run: non-zero exit, one `error:` line naming `needle`, no panic trace.
fn assert_clear_error(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure, got success; stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line expected on stderr, got:\n{stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    assert!(lines[0].contains(needle), "`{needle}` not in: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

fn case_ids(fx: &Fixture, name: &str) -> Vec<u64> {
    let cases: Value = serde_json::from_str(&std::fs::read_to_string(fx.dir.join("cases.json")).unwrap()).unwrap();
    let case = cases["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap();
    case["generated_ids"][0]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect()
}

#[test]
fn generate_json_matches_transformers_from_files() {
    // The whole path from files: PNG decode, CLIP preprocessing, tokenization with the image
    // block, generation; tokens must equal generate()'s on the fixture's inputs.
    let fx = fixture();
    let model = fx.dir.join("model");
    let image = fx.dir.join("images/a.png");
    let out = kosmos(&[
        "generate",
        "--model",
        path(&model),
        "--image",
        path(&image),
        "--prompt",
        "<grounding>An image of",
        "--max-new-tokens",
        "12",
        "--json",
    ]);
    let objs = json_lines(&out);
    assert_eq!(objs.len(), 1);
    let o = &objs[0];
    let ids: Vec<u64> = o["token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(ids, case_ids(&fx, "greedy_single"));
    let prompt: Vec<u64> = o["prompt_token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(prompt, vec![0, 401, 4, 5, 6, 7, 8, 9, 10, 11, 402, 410, 181, 344, 83]);
    for key in ["text", "clean_text"] {
        assert!(o[key].is_string(), "{key}");
    }
    assert!(o["text"].as_str().unwrap().starts_with("<grounding>"));
    assert!(o["entities"].is_array());
    for key in ["prefill_ms", "decode_ms", "tokens_per_s"] {
        assert!(o["timings"][key].as_f64().unwrap() >= 0.0, "{key}");
    }
}

#[test]
fn beams_and_batches() {
    let fx = fixture();
    let model = fx.dir.join("model");
    let a = fx.dir.join("images/a.png");
    let b = fx.dir.join("images/b.png");
    // Beam search through the CLI equals generate(num_beams=3).
    let out = kosmos(&[
        "generate",
        "--model",
        path(&model),
        "--image",
        path(&a),
        "--prompt",
        "<grounding>An image of",
        "--max-new-tokens",
        "10",
        "--num-beams",
        "3",
        "--json",
    ]);
    let objs = json_lines(&out);
    let ids: Vec<u64> = objs[0]["token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(ids, case_ids(&fx, "beam3"));
    // Two images, one prompt each: the left-padded batch of the fixture.
    let out = kosmos(&[
        "generate",
        "--model",
        path(&model),
        "--image",
        path(&a),
        "--image",
        path(&b),
        "--prompt",
        "<grounding>An image of",
        "--prompt",
        "A dog is sitting on the grass next to a red ball.",
        "--max-new-tokens",
        "10",
        "--json",
    ]);
    let objs = json_lines(&out);
    assert_eq!(objs.len(), 2);
    let cases: Value = serde_json::from_str(&std::fs::read_to_string(fx.dir.join("cases.json")).unwrap()).unwrap();
    let case = cases["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "greedy_batch_left")
        .unwrap();
    for (o, reference) in objs.iter().zip(case["generated_ids"].as_array().unwrap()) {
        assert_eq!(&o["token_ids"], reference);
    }
    assert_eq!(objs[1]["image"].as_str().unwrap(), path(&b));
    // Three prompts for two images is an error.
    let out = kosmos(&[
        "generate",
        "--model",
        path(&model),
        "--image",
        path(&a),
        "--image",
        path(&b),
        "--prompt",
        "x",
        "--prompt",
        "y",
        "--prompt",
        "z",
    ]);
    assert_clear_error(&out, "3 prompts for 2 images");
}

#[test]
fn generation_config_json_supplies_defaults_and_options_override() {
    let fx = fixture();
    let dir = tmp("model-with-generation-config");
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(fx.dir.join("model")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    std::fs::write(
        dir.join("generation_config.json"),
        r#"{"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "max_new_tokens": 3}"#,
    )
    .unwrap();
    let image = fx.dir.join("images/a.png");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            path(&dir),
            "--image",
            path(&image),
            "--prompt",
            "An image of",
            "--json",
        ];
        args.extend_from_slice(extra);
        json_lines(&kosmos(&args))[0]["token_ids"].as_array().unwrap().len()
    };
    assert_eq!(run(&[]), 3);
    assert_eq!(run(&["--max-new-tokens", "5"]), 5);
}

fn drawn_pixels(original: &Path, annotated: &Path) -> usize {
    let a = image::open(original).unwrap().to_rgb8();
    let b = image::open(annotated).unwrap().to_rgb8();
    assert_eq!(a.dimensions(), b.dimensions());
    a.pixels().zip(b.pixels()).filter(|(x, y)| x != y).count()
}

#[test]
fn annotate_draws_the_entities() {
    // Referring-expression generation puts a phrase with a box into the prompt, so the output
    // has an entity whatever the (random) fixture model generates.
    let fx = fixture();
    let model = fx.dir.join("model");
    let image = fx.dir.join("images/a.png");
    let out_png = tmp("annotated.png");
    let out = kosmos(&[
        "generate",
        "--model",
        path(&model),
        "--image",
        path(&image),
        "--task",
        "referring-generation",
        "--box",
        "0.1,0.2,0.7,0.9",
        "--max-new-tokens",
        "4",
        "--json",
        "--annotate",
        path(&out_png),
    ]);
    let objs = json_lines(&out);
    let entities = objs[0]["entities"].as_array().unwrap();
    assert_eq!(entities[0]["phrase"], "It");
    let b: Vec<f64> = entities[0]["boxes"][0]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    // The 32x32 codec: cells (3, 6) and (22, 28) -> box of the cell edges/centres.
    assert!(b[0] < b[2] && b[1] < b[3], "{b:?}");
    assert!((b[0] - 0.1).abs() < 0.05 && (b[3] - 0.9).abs() < 0.05, "{b:?}");
    assert!(drawn_pixels(&image, &out_png) > 20, "no box drawn");
    // `ground` runs and writes a picture too (it may have no entities with random weights).
    let out_png2 = tmp("ground.png");
    let out = kosmos(&[
        "ground",
        "--model",
        path(&model),
        "--image",
        path(&image),
        "--max-new-tokens",
        "4",
        "--annotate",
        path(&out_png2),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(out_png2.is_file());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("An image of"), "{text}");
    // `refer` prints the phrase and a box or says that none was generated.
    let out = kosmos(&[
        "refer",
        "--model",
        path(&model),
        "--image",
        path(&image),
        "--phrase",
        "a red ball",
        "--max-new-tokens",
        "3",
        "--json",
    ]);
    let objs = json_lines(&out);
    assert_eq!(objs[0]["phrase"], "a red ball");
    assert!(objs[0].get("box").is_some());
    assert!(
        objs[0]["text"]
            .as_str()
            .unwrap()
            .starts_with("<grounding><phrase> a red ball</phrase>")
    );
}

#[test]
fn bad_input_is_one_clear_line() {
    let fx = fixture();
    let model = fx.dir.join("model");
    let image = fx.dir.join("images/a.png");
    let m = path(&model);
    let i = path(&image);
    assert_clear_error(
        &kosmos(&[
            "generate",
            "--model",
            "/nonexistent/model",
            "--image",
            i,
            "--prompt",
            "x",
        ]),
        "/nonexistent/model",
    );
    assert_clear_error(
        &kosmos(&["generate", "--model", m, "--image", "/nonexistent.png", "--prompt", "x"]),
        "/nonexistent.png",
    );
    let corrupt = tmp("corrupt.png");
    std::fs::write(&corrupt, b"\x89PNG\r\n\x1a\nthis is not a png").unwrap();
    assert_clear_error(
        &kosmos(&["generate", "--model", m, "--image", path(&corrupt), "--prompt", "x"]),
        "corrupt.png",
    );
    let long = "word ".repeat(300);
    assert_clear_error(
        &kosmos(&["generate", "--model", m, "--image", i, "--prompt", &long]),
        "128",
    );
    assert_clear_error(
        &kosmos(&["generate", "--model", m, "--prompt", "x", "--device", "tpu"]),
        "tpu",
    );
    if !kosmos_core::backend::BackendKind::Cuda.is_compiled() {
        assert_clear_error(
            &kosmos(&["generate", "--model", m, "--prompt", "x", "--device", "cuda"]),
            "--features cuda",
        );
    }
    let wrong = tmp("not-kosmos");
    std::fs::create_dir_all(&wrong).unwrap();
    std::fs::write(wrong.join("config.json"), r#"{"model_type": "llama"}"#).unwrap();
    assert_clear_error(
        &kosmos(&["generate", "--model", path(&wrong), "--prompt", "x"]),
        "kosmos-2",
    );
    assert_clear_error(
        &kosmos(&["generate", "--model", m, "--prompt", "x", "--top-p", "1.5"]),
        "top_p",
    );
    assert_clear_error(&kosmos(&["ground", "--model", m]), "--image");
    let out = kosmos(&["generate", "--model", m, "--task", "vqa"]);
    assert_clear_error(&out, "--question");
}

#[test]
fn wgpu_cli_gives_the_cpu_tokens() {
    if !crate::generation::wgpu_available() {
        return;
    }
    let fx = fixture();
    let model = fx.dir.join("model");
    let image = fx.dir.join("images/a.png");
    let run = |device: &str| {
        json_lines(&kosmos(&[
            "generate",
            "--model",
            path(&model),
            "--image",
            path(&image),
            "--prompt",
            "<grounding>An image of",
            "--max-new-tokens",
            "12",
            "--json",
            "--device",
            device,
        ]))[0]["token_ids"]
            .clone()
    };
    assert_eq!(run("wgpu"), run("flex"));
}

/// `--adapter` merges a PEFT LoRA adapter at load time: the tokens equal those of the merged
/// model saved as a plain directory, and differ from the base model's.
#[test]
fn adapter_flag_runs_the_merged_model() {
    use burn::prelude::*;
    use kosmos_models::lora::lora_slots;
    type B = burn::backend::Flex;
    let fx = fixture();
    let model_dir = fx.dir.join("model");
    let device = Default::default();
    // Adapters with seeded random, non-zero factors on the text decoder.
    B::seed(&device, 17);
    let (mut model, _) = kosmos_models::Kosmos2::<B>::from_pretrained(&model_dir, &device)
        .unwrap()
        .attach_lora(&kosmos_models::LoraSpec::new(4), &device)
        .unwrap();
    for s in lora_slots(&mut model) {
        if let Some(a) = s.slot.adapter.as_mut() {
            let shape = a.lora_b.dims();
            let b = Tensor::<B, 2>::random(shape, burn::tensor::Distribution::Normal(0.0, 0.5), &device);
            a.lora_b = burn::module::Param::from_tensor(b);
        }
    }
    let adapter = tmp("adapter");
    model.save_peft_adapter(&adapter, "fixtures/generate/model").unwrap();
    let merged = tmp("merged");
    model.save_pretrained(&merged, &model_dir).unwrap();

    let image = fx.dir.join("images/a.png");
    let run = |model: &Path, adapter: Option<&Path>| {
        let mut args = vec![
            "generate",
            "--model",
            path(model),
            "--image",
            path(&image),
            "--prompt",
            "<grounding>An image of",
            "--max-new-tokens",
            "12",
            "--json",
        ];
        if let Some(a) = adapter {
            args.extend(["--adapter", path(a)]);
        }
        json_lines(&kosmos(&args))[0]["token_ids"].clone()
    };
    let with_adapter = run(&model_dir, Some(&adapter));
    assert_eq!(with_adapter, run(&merged, None));
    assert_ne!(with_adapter, run(&model_dir, None));

    assert_clear_error(
        &kosmos(&[
            "generate",
            "--model",
            path(&model_dir),
            "--prompt",
            "x",
            "--adapter",
            "/nonexistent/adapter",
        ]),
        "/nonexistent/adapter/adapter_config.json",
    );
}
