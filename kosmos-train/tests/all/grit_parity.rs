//! The grounded markup built from GRIT spans equals transformers' `Kosmos2Processor` on the same
//! text, phrase spans and boxes (fixtures/train_data, scripts/make_train_data_fixtures.py).

use kosmos_core::testing::Fixture;
use kosmos_models::processor::{EncodeOptions, Prompt};
use kosmos_train::data::{
    Content, DataLoader, GritConfig, GritRecord, Location, OnError, SourceFormat, SourceKind, ground, select_phrases,
};
use serde_json::Value;

use crate::common::*;

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn grit_config(case: &Value) -> GritConfig {
    GritConfig {
        score_threshold: case["score_threshold"].as_f64().unwrap(),
        use_ref_exps: case["use_ref_exps"].as_bool().unwrap(),
        grounding_prefix: true,
    }
}

#[test]
fn grit_markup_matches_transformers_processor() {
    let fx = Fixture::open("train_data");
    let cases: Value = serde_json::from_str(&std::fs::read_to_string(fx.dir.join("cases.json")).unwrap()).unwrap();
    assert_eq!(cases["num_image_tokens"], SLOTS);
    let collator = collator(collate_config(512));
    let processor = collator.processor();
    for case in cases["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let location = Location::line(fx.dir.join("grit.jsonl"), case["line"].as_u64().unwrap() as usize);
        let record = GritRecord::from_json(&case["record"], &location).unwrap();
        let config = grit_config(case);
        let grounded = ground(&record, &config).unwrap();
        assert_eq!(grounded.text, case["text"].as_str().unwrap(), "{name}: tagged text");
        let kept = select_phrases(&record, &config).unwrap();
        let expected_spans: Vec<(usize, usize)> = case["kept_phrases"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p["span"][0].as_u64().unwrap() as usize,
                    p["span"][1].as_u64().unwrap() as usize,
                )
            })
            .collect();
        assert_eq!(
            kept.iter().map(|p| p.span).collect::<Vec<_>>(),
            expected_spans,
            "{name}: phrases"
        );
        for (p, e) in kept.iter().zip(case["kept_phrases"].as_array().unwrap()) {
            let boxes: Vec<[f64; 4]> = serde_json::from_value(e["boxes"].clone()).unwrap();
            assert_eq!(p.boxes, boxes, "{name}: boxes");
        }
        // processor string and ids (HF default add_eos_token=False)
        let prompt = Prompt {
            text: grounded.text.clone(),
            image: true,
            boxes: grounded.boxes.clone(),
            segments: vec![],
        };
        assert_eq!(
            processor.prompt_string(&prompt, 0).unwrap(),
            case["prompt_string"].as_str().unwrap(),
            "{name}: prompt string"
        );
        let enc = processor.encode(&[prompt], &EncodeOptions::default()).unwrap();
        assert_eq!(enc.input_ids[0], ids(&case["no_eos"]["input_ids"]), "{name}: ids");
        assert_eq!(
            enc.image_embeds_position_mask[0],
            ids(&case["no_eos"]["image_embeds_position_mask"]),
            "{name}: image mask"
        );
        assert_eq!(
            enc.attention_mask[0],
            ids(&case["no_eos"]["attention_mask"]),
            "{name}: attention"
        );
    }
}

#[test]
fn grit_jsonl_source_collates_to_transformers_ids_with_eos() {
    let fx = Fixture::open("train_data");
    let cases: Value = serde_json::from_str(&std::fs::read_to_string(fx.dir.join("cases.json")).unwrap()).unwrap();
    for (i, case) in cases["cases"].as_array().unwrap().iter().enumerate() {
        let name = case["name"].as_str().unwrap();
        // The fixture's manifest holds every record; each case has its own settings, so read the
        // whole manifest with this case's settings and take its line.
        let mut s = source(
            "grit",
            SourceKind::Grit,
            SourceFormat::Jsonl,
            vec![fx.dir.join("grit.jsonl")],
        );
        s.grit = grit_config(case);
        s.on_error = Some(OnError::Fail);
        let loader = DataLoader::with_collator(data_config(vec![s], 512), collator(collate_config(512))).unwrap();
        let example = &loader.sources()[0].examples()[i];
        assert_eq!(example.location.line, Some(i + 1));
        assert!(matches!(&example.content, Content::Grounded { text, .. } if text == case["text"].as_str().unwrap()));
        let batch = loader
            .collator()
            .collate_examples(std::slice::from_ref(example))
            .unwrap();
        let expected = ids(&case["eos"]["input_ids"]);
        assert_eq!(batch.input_ids[0], expected, "{name}: ids with EOS");
        assert_eq!(
            batch.image_embeds_position_mask[0],
            ids(&case["eos"]["image_embeds_position_mask"]),
            "{name}: image mask"
        );
        assert_eq!(batch.attention_mask[0], ids(&case["eos"]["attention_mask"]), "{name}");
        // labels: BOS and the image block (positions 0..=9) ignored, everything else scored
        let labels = labels_except(&expected, |t| t < 2 + SLOTS + 1);
        assert_eq!(batch.labels[0], labels, "{name}: labels");
        assert_eq!(batch.images_per_row, vec![1]);
    }
}
