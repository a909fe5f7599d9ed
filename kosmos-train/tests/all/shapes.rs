//! The synthetic shapes world: deterministic scenes, shapes the codec can represent, captions
//! whose spans name the shapes, referring expressions that name exactly one shape, and a written
//! data set that the data layer reads back.

use kosmos_train::data::{Content, DataConfig, DataLoader, Source};
use kosmos_train::shapes::{
    ShapesConfig, codec_ceiling, grounded_caption, iou, referring_expressions, render, scene, write_dataset,
};
use rand::SeedableRng;

use crate::common::*;

fn config(n: usize) -> ShapesConfig {
    ShapesConfig {
        n,
        seed: 7,
        ..ShapesConfig::default()
    }
}

#[test]
fn scenes_are_a_function_of_seed_and_index() {
    let c = config(10);
    assert_eq!(scene(&c, 3), scene(&c, 3));
    assert_ne!(scene(&c, 3), scene(&c, 4));
    let other = ShapesConfig { seed: 8, ..c.clone() };
    assert_ne!(scene(&c, 3), scene(&other, 3));
    assert_eq!(render(&scene(&c, 5)), render(&scene(&c, 5)));
}

#[test]
fn shapes_fit_do_not_overlap_and_span_enough_cells() {
    let c = config(300);
    let mut counts = [0usize; 7];
    for i in 0..c.n {
        let s = scene(&c, i);
        assert!((64..=128).contains(&s.width) && (64..=128).contains(&s.height));
        assert!(!s.shapes.is_empty() && s.shapes.len() <= 4, "scene {i}");
        counts[s.shapes.len()] += 1;
        for (a, sa) in s.shapes.iter().enumerate() {
            let [x, y, w, h] = sa.pixels;
            assert!(x + w <= s.width && y + h <= s.height, "scene {i} shape {a} outside");
            let b = sa.bbox(s.width, s.height);
            // At least 4 grid cells of 32 and a quarter of the image per side, at most half
            // the shorter image side.
            assert!(
                (b[2] - b[0]) * 32.0 >= 4.0 - 1e-9 && (b[3] - b[1]) * 32.0 >= 4.0 - 1e-9,
                "scene {i} shape {a} too small"
            );
            assert!(
                b[2] - b[0] >= 0.25 - 1e-9 && b[3] - b[1] >= 0.25 - 1e-9,
                "scene {i} shape {a} under a quarter"
            );
            assert!(w.max(h) <= s.width.min(s.height) / 2, "scene {i} shape {a} over half");
            for sb in &s.shapes[a + 1..] {
                assert_eq!(iou(b, sb.bbox(s.width, s.height)), 0.0, "scene {i}: overlapping shapes");
            }
        }
    }
    // Every count from 1 to 4 occurs.
    assert!(counts[1..=4].iter().all(|&n| n > 20), "{counts:?}");
}

/// Shapes (and so the caption's phrases) run left to right by centre, top to bottom on ties: a
/// caption that repeats a phrase names its shapes in reading order.
#[test]
fn shapes_run_left_to_right() {
    let c = config(300);
    let mut repeats = 0;
    for i in 0..c.n {
        let s = scene(&c, i);
        let key = |sh: &kosmos_train::shapes::Shape| {
            let [x, y, w, h] = sh.pixels;
            (2 * x + w, 2 * y + h)
        };
        for pair in s.shapes.windows(2) {
            assert!(
                key(&pair[0]) <= key(&pair[1]),
                "scene {i}: {:?} before {:?}",
                pair[0],
                pair[1]
            );
            repeats += usize::from(pair[0].description() == pair[1].description());
        }
    }
    assert!(
        repeats > 0,
        "no scene lists two shapes of one description next to each other"
    );
}

#[test]
fn caption_spans_are_the_shape_phrases() {
    let c = config(50);
    for i in 0..c.n {
        let s = scene(&c, i);
        let (text, spans) = grounded_caption(&s);
        assert!(text.starts_with("An image of ") && text.ends_with('.'));
        assert_eq!(spans.len(), s.shapes.len());
        let chars: Vec<char> = text.chars().collect();
        for (&(a, b), shape) in spans.iter().zip(&s.shapes) {
            let phrase: String = chars[a..b].iter().collect();
            let an = shape.colour.word().starts_with('o') && !shape.small;
            assert!(phrase.starts_with(if an { "an " } else { "a " }), "{phrase}");
            assert!(
                phrase.ends_with(&shape.description()),
                "{phrase} vs {}",
                shape.description()
            );
            assert_eq!(phrase.contains("small"), shape.small);
        }
    }
}

/// Each expression starts with its target's description; an anchor named after a relation has a
/// unique description in the scene; expressions for an ambiguous description carry a relation
/// and no other shape with that description stands in the same relation (checked here from the
/// shapes' centres, independently of the generator).
#[test]
fn referring_expressions_name_exactly_one_shape() {
    let c = config(400);
    let mut relational = 0;
    let mut total = 0;
    for i in 0..c.n {
        let s = scene(&c, i);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(i as u64);
        for r in referring_expressions(&s, &mut rng) {
            total += 1;
            let target = &s.shapes[r.target];
            let desc = target.description();
            let same: Vec<usize> = (0..s.shapes.len())
                .filter(|&j| s.shapes[j].description() == desc)
                .collect();
            assert_eq!(r.needs_relation, same.len() > 1);
            let centre = |sh: &kosmos_train::shapes::Shape| {
                let [x, y, w, h] = sh.pixels;
                (x as f64 + w as f64 / 2.0, y as f64 + h as f64 / 2.0)
            };
            // "the left red circle": the target is the extreme of its description along the axis.
            if let Some(word) = ["left", "right", "top", "bottom"]
                .into_iter()
                .find(|w| r.text == format!("the {w} {desc}"))
            {
                assert!(r.needs_relation, "{} for a unique description", r.text);
                relational += 1;
                let (tx, ty) = centre(target);
                for &j in same.iter().filter(|&&j| j != r.target) {
                    let (ox, oy) = centre(&s.shapes[j]);
                    let ok = match word {
                        "left" => tx < ox,
                        "right" => tx > ox,
                        "top" => ty < oy,
                        _ => ty > oy,
                    };
                    assert!(ok, "{}: shape {j} is further {word}", r.text);
                }
                continue;
            }
            assert!(r.text.starts_with(&format!("the {desc}")), "{}", r.text);
            let rest = r.text[format!("the {desc}").len()..].trim();
            if rest.is_empty() {
                assert_eq!(same.len(), 1, "{} is ambiguous", r.text);
                continue;
            }
            let (rel, anchor) = ["left of", "right of", "above", "below"]
                .iter()
                .find_map(|rel| {
                    rest.strip_prefix(rel)
                        .map(|a| (*rel, a.trim().trim_start_matches("the ").to_string()))
                })
                .unwrap_or_else(|| panic!("no relation in {}", r.text));
            let anchors: Vec<_> = s.shapes.iter().filter(|sh| sh.description() == anchor).collect();
            assert_eq!(anchors.len(), 1, "anchor of {} not unique", r.text);
            let a = anchors[0];
            let holds = |sh: &kosmos_train::shapes::Shape| {
                let ((tx, ty), (ax, ay)) = (centre(sh), centre(a));
                match rel {
                    "left of" => tx < ax,
                    "right of" => tx > ax,
                    "above" => ty < ay,
                    _ => ty > ay,
                }
            };
            assert!(holds(target), "{} does not hold", r.text);
            relational += usize::from(r.needs_relation);
            // No other shape of the description stands in the relation, even loosely.
            let satisfying = same.iter().filter(|&&j| holds(&s.shapes[j])).count();
            assert_eq!(satisfying, 1, "{} names {satisfying} shapes", r.text);
        }
    }
    eprintln!("{total} expressions, {relational} need a relation");
    assert!(total > 600, "{total} expressions");
    assert!(relational * 4 > total, "{relational} of {total} need a relation");
}

/// Round trips derived by hand from the codec's formulas: a box of exactly 4x4 cells of a
/// 32-grid at the corner encodes to cells 0 and 3*32+3, decodes to the centres 0.5 and 3.5 cells,
/// so a 3x3-cell box inside the 4x4 one: IoU 9/16. A 2x2-cell box of a 4-grid decodes to a
/// one-cell box of centres: IoU 1/4.
#[test]
fn codec_ceiling_of_hand_computed_boxes() {
    let c = codec_ceiling(&[[0.0, 0.0, 0.125, 0.125]], 32);
    assert!((c.mean_iou - 9.0 / 16.0).abs() < 1e-12, "{c:?}");
    assert_eq!(c.accuracy_at_0_5, 1.0);
    let c = codec_ceiling(&[[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.125, 0.125]], 4);
    // Second box: one cell of a 4-grid is 0.25 wide; the box [0, 0.125] is inside cell 0, which
    // decodes to the whole cell (same cell): IoU 0.125^2 / 0.25^2 = 1/4.
    assert!((c.mean_iou - 0.25).abs() < 1e-12, "{c:?}");
    assert_eq!(c.accuracy_at_0_5, 0.0);
    assert_eq!(c.boxes, 2);
}

#[test]
fn written_data_set_reads_back_through_the_data_layer() {
    let dir = temp_dir("shapes");
    let c = config(24);
    let summary = write_dataset(&c, &dir).unwrap();
    assert_eq!(summary.images, 24);
    assert_eq!(summary.grounded_captions, 24);
    assert_eq!(summary.text_documents, 6);
    assert!(summary.codec.accuracy_at_0_5 >= 0.99, "{:?}", summary.codec);
    assert!(dir.join("images/000023.png").is_file());
    let written: ShapesConfig = serde_json::from_value(
        serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap()
            ["config"]
            .clone(),
    )
    .unwrap();
    assert_eq!(written, c);

    let mut data: DataConfig = toml::from_str(&std::fs::read_to_string(dir.join("data.toml")).unwrap()).unwrap();
    data.resolve_relative_to(&dir);
    let sources: Vec<Source> = data
        .sources
        .iter()
        .map(|s| Source::open(s, data.on_error).unwrap())
        .collect();
    let counts: Vec<usize> = sources.iter().map(|s| s.examples().len()).collect();
    let several: usize = (0..24).map(|i| scene(&c, i).shapes.len()).filter(|&n| n > 1).sum();
    assert_eq!(summary.single_phrase_captions, several);
    assert_eq!(counts, vec![24, several, summary.referring_expressions, 24, 6]);
    // One phrase at a time: the whole caption, one phrase tagged and boxed, the others plain.
    for e in sources[1].examples() {
        match &e.content {
            Content::Grounded { text, boxes, .. } => {
                assert!(text.starts_with("<grounding>An image of"), "{text}");
                assert_eq!(text.matches("<phrase>").count(), 1, "{text}");
                assert_eq!(boxes.len(), 1);
            }
            other => panic!("phrase record read as {other:?}"),
        }
    }
    // A referring expression becomes the comprehension markup of `kosmos refer`.
    match &sources[2].examples()[0].content {
        Content::Grounded { text, boxes, .. } => {
            assert!(text.starts_with("<grounding><phrase> the "), "{text}");
            assert!(text.ends_with("</phrase>"), "{text}");
            assert_eq!(boxes.len(), 1);
        }
        other => panic!("refexp record read as {other:?}"),
    }
    // And the loader collates them with the fixture tokenizer.
    let mut loader = DataLoader::with_collator(data, collator(collate_config(256))).unwrap();
    let batch = loader.next_batch(4).unwrap();
    assert_eq!(batch.input_ids.len(), 4);

    // MDETR-style files: one image entry per sentence, boxes in pixels xywh.
    let refexp: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("mdetr/final_shapes_refexp.json")).unwrap()).unwrap();
    assert_eq!(
        refexp["images"].as_array().unwrap().len(),
        summary.referring_expressions
    );
    assert_eq!(
        refexp["annotations"].as_array().unwrap().len(),
        summary.referring_expressions
    );
    let flickr: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("mdetr/final_flickr_separateGT_shapes.json")).unwrap())
            .unwrap();
    assert_eq!(flickr["annotations"].as_array().unwrap().len(), summary.shapes);
}

#[test]
fn bad_settings_are_refused_with_their_names() {
    let cases = [
        (
            ShapesConfig {
                min_side: 200,
                ..config(1)
            },
            "min_side",
        ),
        (
            ShapesConfig {
                max_shapes: 9,
                ..config(1)
            },
            "max_shapes",
        ),
        (
            ShapesConfig {
                min_cells: 20,
                ..config(1)
            },
            "cells",
        ),
        (
            ShapesConfig {
                min_fraction: 0.7,
                ..config(1)
            },
            "min_fraction 0.7",
        ),
    ];
    for (bad, name) in cases {
        let err = bad.validate().unwrap_err();
        assert!(err.to_string().contains(name), "{err}");
    }
}
