//! The grounding codec and post-processing against transformers' `Kosmos2Processor`, plus a
//! randomized no-panic check of the parser.

use kosmos_core::testing::Fixture;
use kosmos_models::grounding::{
    bbox_to_tokens, caption_after_image, coordinate_to_patch_index, extract_entities_with_patch_indices,
    patch_index_to_coordinate, patch_index_token, post_process_generation,
};

fn json(name: &str) -> serde_json::Value {
    let fx = Fixture::open("kosmos2/processor");
    serde_json::from_str(&std::fs::read_to_string(fx.dir.join(name)).unwrap()).unwrap()
}

fn f4(v: &serde_json::Value) -> [f64; 4] {
    let a = v.as_array().unwrap();
    [0, 1, 2, 3].map(|i| a[i].as_f64().unwrap())
}

#[test]
fn codec_equals_transformers() {
    let codec = json("codec.json");
    let mut n = 0;
    for case in codec["coordinate_to_patch_index"].as_array().unwrap() {
        let grid = case["num_patches_per_side"].as_u64().unwrap() as usize;
        let ours = coordinate_to_patch_index(f4(&case["bbox"]), grid);
        if case["ok"].as_bool().unwrap() {
            let r = case["result"].as_array().unwrap();
            assert_eq!(
                ours.unwrap(),
                (r[0].as_i64().unwrap(), r[1].as_i64().unwrap()),
                "{case}"
            );
        } else {
            assert!(ours.is_err(), "{case}");
        }
        n += 1;
    }
    for case in codec["patch_index_to_coordinate"].as_array().unwrap() {
        let grid = case["num_patches_per_side"].as_u64().unwrap() as usize;
        let ours = patch_index_to_coordinate(case["ul_idx"].as_i64().unwrap(), case["lr_idx"].as_i64().unwrap(), grid);
        assert_eq!(ours, f4(&case["result"]), "{case}");
        n += 1;
    }
    for case in codec["convert_bbox_to_patch_index_tokens"].as_array().unwrap() {
        let b = case["bbox"].as_array().unwrap();
        let ours = if b.len() == 2 {
            // A (ul, lr) cell pair is written as given.
            Ok([
                patch_index_token(b[0].as_i64().unwrap()),
                patch_index_token(b[1].as_i64().unwrap()),
            ])
        } else {
            bbox_to_tokens(f4(&case["bbox"]), 32)
        };
        if case["ok"].as_bool().unwrap() {
            let r = case["result"].as_array().unwrap();
            assert_eq!(
                ours.unwrap(),
                [r[0].as_str().unwrap().to_string(), r[1].as_str().unwrap().to_string()],
                "{case}"
            );
        } else {
            assert!(ours.is_err(), "{case}");
        }
        n += 1;
    }
    assert!(n >= 120, "{n} codec cases");
}

#[test]
fn post_process_generation_equals_transformers() {
    let cases = json("post_process.json");
    let cases = cases["cases"].as_array().unwrap();
    assert!(cases.len() >= 30);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let expected = &case["cleanup"]["result"];
        let (clean, entities) = post_process_generation(text);
        assert_eq!(clean, expected[0].as_str().unwrap(), "clean text of {text:?}");
        let exp_entities = expected[1].as_array().unwrap();
        assert_eq!(entities.len(), exp_entities.len(), "entities of {text:?}: {entities:?}");
        for (ours, exp) in entities.iter().zip(exp_entities) {
            assert_eq!(ours.phrase, exp[0].as_str().unwrap(), "{text:?}");
            assert_eq!(
                ours.span,
                (exp[1][0].as_i64().unwrap(), exp[1][1].as_i64().unwrap()),
                "span in {text:?}"
            );
            let boxes: Vec<[f64; 4]> = exp[2].as_array().unwrap().iter().map(f4).collect();
            assert_eq!(ours.boxes, boxes, "boxes in {text:?}");
        }
        assert_eq!(
            caption_after_image(text),
            case["no_cleanup"]["result"].as_str().unwrap(),
            "uncleaned {text:?}"
        );
        if let Some(raw) = case
            .get("extract_entities_with_patch_indices")
            .filter(|r| r["ok"].as_bool() == Some(true))
        {
            let ours = extract_entities_with_patch_indices(caption_after_image(text));
            let exp = raw["result"].as_array().unwrap();
            assert_eq!(ours.len(), exp.len(), "raw entities of {text:?}");
            for (o, e) in ours.iter().zip(exp) {
                assert_eq!(o.phrase, e[0].as_str().unwrap());
                assert_eq!(
                    (o.span.0 as i64, o.span.1 as i64),
                    (e[1][0].as_i64().unwrap(), e[1][1].as_i64().unwrap())
                );
            }
        }
    }
}

/// Random strings built from tag fragments, digits, unicode and whitespace: the parser never
/// panics, spans stay inside the clean text, and every box comes from parsed indices.
#[test]
fn parser_never_panics_on_random_input() {
    let fragments = [
        "<phrase>",
        "</phrase>",
        "<object>",
        "</object>",
        "</delimiter_of_multi_objects/>",
        "<patch_index_",
        ">",
        "<",
        "0044",
        "1023",
        "9",
        "99999999999999999999999",
        "</image>",
        "<image>",
        "<grounding>",
        " ",
        "  ",
        "\n",
        "a dog",
        "é",
        "猫",
        "🐶",
        "<patch_index_0001>",
        "<patch_index_0002>",
        "\u{1c}",
        "\t",
    ];
    let mut state = 0x2545F4914F6CDD1Du64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..20_000 {
        let len = (next() % 24) as usize;
        let text: String = (0..len)
            .map(|_| fragments[(next() % fragments.len() as u64) as usize])
            .collect();
        let (clean, entities) = post_process_generation(&text);
        let n = clean.chars().count() as i64;
        for e in &entities {
            assert!(e.span.0 <= e.span.1 + n && e.span.1 <= n + 1, "{text:?}: {e:?}");
            assert!(!e.boxes.is_empty(), "{text:?}");
        }
    }
}
