//! The built-in shapes-world model (`assets/shapes/model/`, compiled into `kosmos`): the default
//! `--model` works with no model directory and on the demo picture, and the model keeps the
//! held-out accuracy recorded when it was shipped (a regression test of the embedded weights).

use std::path::PathBuf;
use std::process::{Command, Output};

use kosmos_train::shapes::{ShapesConfig, scene, write_dataset};
use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kosmos-builtin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// `kosmos` with its cache in a fresh temporary directory (so the embedded model is written
/// there, as on a fresh machine).
fn kosmos(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_kosmos"))
        .args(args)
        .current_dir(repo())
        .env("KOSMOS_CACHE", tmp("cache"))
        .env("XDG_RUNTIME_DIR", std::env::temp_dir())
        .output()
        .expect("run kosmos");
    assert!(
        out.status.success(),
        "kosmos {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

/// The demo picture is scene 1 of seed 2024 (neither the training seed 1 nor the evaluation
/// seed 999): `kosmos ground` with no `--model` runs on the embedded model, prints a grounded
/// caption whose phrases name colours and kinds of the shapes world with a box each, and draws
/// the picture; `--model builtin` is the same model.
#[test]
fn ground_without_model_uses_the_builtin_model() {
    let truth = scene(
        &ShapesConfig {
            seed: 2024,
            ..ShapesConfig::default()
        },
        1,
    );
    let demo = image::open(repo().join("assets/demo/shapes.png")).unwrap().to_rgb8();
    assert_eq!(
        demo,
        kosmos_train::shapes::render(&truth),
        "assets/demo/shapes.png is not scene 1 of seed 2024"
    );

    let png = tmp("demo.png");
    let out = kosmos(&[
        "ground",
        "--image",
        "assets/demo/shapes.png",
        "--annotate",
        png.to_str().unwrap(),
        "--json",
    ]);
    let answer = json(&out);
    eprintln!("{}", answer["text"]);
    let entities = answer["entities"].as_array().unwrap();
    assert!(!entities.is_empty(), "{answer}");
    for e in entities {
        let phrase = e["phrase"].as_str().unwrap();
        assert!(
            ["circle", "square", "triangle", "diamond", "cross"]
                .iter()
                .any(|k| phrase.contains(k)),
            "`{phrase}` names no shape"
        );
        let b = e["boxes"][0].as_array().unwrap();
        assert_eq!(b.len(), 4, "`{phrase}` has no box");
    }
    assert!(image::open(&png).is_ok(), "no annotated picture");

    let again = json(&kosmos(&[
        "ground",
        "--model",
        "builtin",
        "--image",
        "assets/demo/shapes.png",
        "--json",
    ]));
    assert_eq!(again["text"], answer["text"]);
}

/// The shipped model on the first 100 referring expressions of held-out seed 999 scores what
/// was recorded when it was shipped (`assets/shapes/model/eval.json`, measured with the release
/// binary; the test's debug build may differ in float rounding, so within two expressions): a
/// regression test of the embedded weights and of the whole inference path. One prompt per
/// batch, as recorded: batched prompts are left-padded, and cached decode steps then shift a
/// padded row's positions (transformers' behaviour, see `kosmos_infer::generate`).
#[test]
fn builtin_model_keeps_its_recorded_heldout_accuracy() {
    let recorded: Value =
        serde_json::from_str(&std::fs::read_to_string(repo().join("assets/shapes/model/eval.json")).unwrap()).unwrap();
    let expected = recorded["refexp_first_100_seed_999"].as_f64().unwrap();
    let data = tmp("heldout");
    write_dataset(
        &ShapesConfig {
            n: 60,
            seed: 999,
            ..ShapesConfig::default()
        },
        &data,
    )
    .unwrap();
    let report = json(&kosmos(&[
        "eval",
        "refexp",
        "--data",
        data.to_str().unwrap(),
        "--limit",
        "100",
        "--batch",
        "1",
        "--max-new-tokens",
        "6",
        "--json",
    ]));
    let accuracy = report["value"].as_f64().unwrap();
    eprintln!(
        "held-out refexp accuracy on {} expressions: {accuracy} (recorded {expected})",
        report["total"]
    );
    assert_eq!(report["total"], 100);
    assert!(
        (accuracy - expected).abs() <= 0.02 + 1e-9,
        "accuracy {accuracy}, recorded {expected}"
    );
}
