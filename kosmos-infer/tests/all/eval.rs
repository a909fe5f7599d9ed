//! Grounding evaluation: MDETR-style annotation files read into samples, scorers on hand-made
//! files with known answers, prompt construction, and `kosmos eval` / `kosmos data shapes` end
//! to end on the fixture model.

use std::path::{Path, PathBuf};

use kosmos_infer::eval::{Score, iou, phrase_grounding_prompt, read_grounding, read_refexp, refexp_prompt};
use serde_json::{Value, json};

use crate::cli::kosmos;

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kosmos-eval-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn write(dir: &Path, name: &str, v: &Value) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, v.to_string()).unwrap();
    p
}

/// Three expressions on a 200x100 picture; boxes in pixels `[x, y, w, h]`.
fn refexp_file(d: &Path) -> PathBuf {
    write(
        d,
        "final_refcoco_testA.json",
        &json!({
            "images": [
                {"id": 10, "file_name": "a.png", "width": 200, "height": 100, "caption": "the left dog"},
                {"id": 11, "file_name": "a.png", "width": 200, "height": 100, "caption": "the right dog"},
                {"id": 12, "file_name": "b.png", "width": 100, "height": 100, "caption": "a cat"}
            ],
            "annotations": [
                {"id": 1, "image_id": 10, "bbox": [0, 0, 100, 100], "category_id": 1},
                {"id": 2, "image_id": 11, "bbox": [100, 50, 100, 50], "category_id": 1},
                {"id": 3, "image_id": 12, "bbox": [25, 25, 50, 50], "category_id": 1}
            ]
        }),
    )
}

#[test]
fn refexp_files_give_normalised_targets() {
    let d = dir("refexp");
    let samples = read_refexp(&refexp_file(&d), Path::new("/imgs")).unwrap();
    assert_eq!(samples.len(), 3);
    assert_eq!(samples[0].expression, "the left dog");
    assert_eq!(samples[0].image, PathBuf::from("/imgs/a.png"));
    assert_eq!(samples[0].target, [0.0, 0.0, 0.5, 1.0]);
    assert_eq!(samples[1].target, [0.5, 0.5, 1.0, 1.0]);
    assert_eq!(samples[2].target, [0.25, 0.25, 0.75, 0.75]);
}

/// IoU by hand: two unit squares offset by half a side overlap in 1/2, union 3/2: 1/3.
#[test]
fn iou_and_scores_by_hand() {
    assert!((iou([0.0, 0.0, 1.0, 1.0], [0.5, 0.0, 1.5, 1.0]) - 1.0 / 3.0).abs() < 1e-12);
    assert_eq!(iou([0.0, 0.0, 0.1, 0.1], [0.2, 0.2, 0.3, 0.3]), 0.0);
    assert_eq!(iou([0.1, 0.1, 0.4, 0.4], [0.1, 0.1, 0.4, 0.4]), 1.0);
    // Against a target of width 0.5: exact (hit); shifted by 0.1 (overlap 0.4, union 0.6: IoU
    // 2/3, hit); missing (miss); disjoint (miss).
    let truth = [[0.0, 0.0, 0.5, 1.0]];
    let preds = [
        Some([0.0, 0.0, 0.5, 1.0]),
        Some([0.1, 0.0, 0.6, 1.0]),
        None,
        Some([0.6, 0.0, 1.0, 1.0]),
    ];
    assert!((iou(preds[1].unwrap(), truth[0]) - 0.4 / 0.6).abs() < 1e-12);
    let s = Score::of(preds.iter().map(|p| (*p, &truth[..])), 0.5);
    assert_eq!((s.correct, s.total), (2, 4));
    assert_eq!(s.value, 0.5);
    // The threshold is inclusive: IoU exactly 0.5 hits (a box covering half of the truth).
    let s = Score::of([(Some([0.0, 0.0, 0.25, 1.0]), &truth[..])], 0.5);
    assert_eq!(s.correct, 1);
    assert_eq!(Score::of(std::iter::empty(), 0.5).value, 0.0);
}

/// Two captions: phrases with one and two ground-truth boxes (separate GT: any counts), a phrase
/// without a box (left out), phrases matched to boxes through overlapping `tokens_positive`.
#[test]
fn grounding_files_group_boxes_by_phrase() {
    let d = dir("grounding");
    let caption = "A man and two dogs on grass.";
    // "A man" = [0, 5), "two dogs" = [10, 18), "grass" = [22, 27)
    let file = write(
        &d,
        "final_flickr_separateGT_test.json",
        &json!({
            "images": [
                {"id": 0, "file_name": "p.jpg", "width": 100, "height": 50, "caption": caption,
                 "tokens_positive_eval": [[[0, 5]], [[10, 18]], [[22, 27]]]},
                {"id": 1, "file_name": "q.jpg", "width": 10, "height": 10, "caption": "A cat.",
                 "tokens_positive_eval": [[[0, 5]]]}
            ],
            "annotations": [
                {"id": 0, "image_id": 0, "bbox": [0, 0, 50, 50], "tokens_positive": [[0, 5]]},
                {"id": 1, "image_id": 0, "bbox": [50, 0, 25, 25], "tokens_positive": [[14, 18]]},
                {"id": 2, "image_id": 0, "bbox": [75, 25, 25, 25], "tokens_positive": [[10, 18]]},
                {"id": 3, "image_id": 1, "bbox": [0, 0, 10, 10], "tokens_positive": [[2, 5]]}
            ]
        }),
    );
    let samples = read_grounding(&file, &d).unwrap();
    assert_eq!(samples.len(), 2);
    let s0 = &samples[0];
    assert_eq!(s0.phrases.len(), 2, "grass has no box");
    assert_eq!(s0.phrases[0].span, (0, 5));
    assert_eq!(s0.phrases[0].boxes, vec![[0.0, 0.0, 0.5, 1.0]]);
    assert_eq!(s0.phrases[1].boxes, vec![[0.5, 0.0, 0.75, 0.5], [0.75, 0.5, 1.0, 1.0]]);
    assert_eq!(samples[1].phrases[0].boxes, vec![[0.0, 0.0, 1.0, 1.0]]);
    // Recall@1: man right, dogs right on its second box, cat wrong.
    let preds = [
        Some([0.0, 0.0, 0.5, 1.0]),
        Some([0.75, 0.5, 1.0, 1.0]),
        Some([0.0, 0.0, 0.2, 0.2]),
    ];
    let truths = [&s0.phrases[0].boxes, &s0.phrases[1].boxes, &samples[1].phrases[0].boxes];
    let s = Score::of(preds.iter().zip(truths).map(|(p, t)| (*p, t.as_slice())), 0.5);
    assert_eq!((s.correct, s.total), (2, 3));
}

#[test]
fn prompts_follow_the_training_markup() {
    assert_eq!(
        refexp_prompt("the red circle"),
        "<grounding><phrase> the red circle</phrase>"
    );
    let caption = "An image of a red circle and a blue square.";
    assert_eq!(
        phrase_grounding_prompt(caption, (12, 24)),
        "<grounding>An image of<phrase> a red circle</phrase>"
    );
    assert_eq!(
        phrase_grounding_prompt(caption, (29, 42)),
        "<grounding>An image of a red circle and<phrase> a blue square</phrase>"
    );
    assert_eq!(
        phrase_grounding_prompt("dog", (0, 3)),
        "<grounding><phrase>dog</phrase>"
    );
}

#[test]
fn malformed_files_name_the_entry_and_field() {
    let d = dir("bad");
    let cases = [
        (json!({"annotations": []}), "no `images` list"),
        (
            json!({"images": [{"id": 1, "file_name": "a", "width": 2, "height": 2}], "annotations": []}),
            "images[0] has no `caption`",
        ),
        (
            json!({"images": [{"id": 1, "file_name": "a", "width": 2, "height": 2, "caption": "x"}],
                   "annotations": [{"image_id": 7, "bbox": [0, 0, 1, 1]}]}),
            "annotations[0]: image_id 7",
        ),
        (
            json!({"images": [{"id": 1, "file_name": "a", "width": 2, "height": 2, "caption": "x"}],
                   "annotations": [{"image_id": 1, "bbox": [0, 0, 1]}]}),
            "annotations[0]: `bbox`",
        ),
        (
            json!({"images": [{"id": 1, "file_name": "a", "width": 2, "height": 2, "caption": "x"}],
                   "annotations": []}),
            "id 1 has no annotation",
        ),
    ];
    for (i, (v, needle)) in cases.iter().enumerate() {
        let file = write(&d, &format!("bad{i}.json"), v);
        let err = read_refexp(&file, &d).unwrap_err().to_string();
        assert!(err.contains(needle), "case {i}: `{needle}` not in {err}");
        assert!(err.contains(&format!("bad{i}.json")), "{err}");
    }
    std::fs::write(d.join("notjson.json"), "{").unwrap();
    let err = read_grounding(&d.join("notjson.json"), &d).unwrap_err().to_string();
    assert!(err.contains("not JSON"), "{err}");
}

/// `kosmos data shapes` then `kosmos eval` on the (untrained) fixture model: the reports are
/// well-formed, count what the data set holds, and the predictions file has one line per
/// prompt with `correct` consistent with the reported score.
#[test]
fn data_shapes_then_eval_on_the_fixture_model() {
    let d = dir("cli");
    let data = d.join("shapes");
    let out = kosmos(&[
        "data",
        "shapes",
        "--n",
        "4",
        "--seed",
        "3",
        "--out",
        data.to_str().unwrap(),
        "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["images"], 4);
    assert!(summary["codec"]["accuracy_at_0_5"].as_f64().unwrap() > 0.9);

    let model = kosmos_core::testing::Fixture::open("generate").dir.join("model");
    for (task, metric) in [("refexp", "accuracy"), ("grounding", "recall_at_1")] {
        let preds = d.join(format!("{task}.jsonl"));
        let out = kosmos(&[
            "eval",
            task,
            "--model",
            model.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--limit",
            "2",
            "--max-new-tokens",
            "6",
            "--json",
            "--predictions",
            preds.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let report: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(report["metric"], metric);
        assert_eq!(report["sentences"], 2);
        let lines: Vec<Value> = std::fs::read_to_string(&preds)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(report["total"].as_u64().unwrap() as usize, lines.len());
        let correct = lines.iter().filter(|l| l["correct"] == true).count();
        assert_eq!(report["correct"].as_u64().unwrap() as usize, correct);
        assert!(
            lines
                .iter()
                .all(|l| l["prompt"].as_str().unwrap().starts_with("<grounding>"))
        );
    }
    // A directory without the annotation file is refused with its name.
    let out = kosmos(&[
        "eval",
        "refexp",
        "--model",
        model.to_str().unwrap(),
        "--data",
        d.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("final_shapes_refexp.json"), "{err}");
}
