//! The `tokenizers` crate reads the fixture tokenizers exactly as transformers does: encode and
//! decode (with and without special tokens) equal the reference's.

use kosmos_core::testing::Fixture;
use kosmos_models::processor::Kosmos2Processor;

#[test]
fn encode_and_decode_equal_transformers() {
    let fx = Fixture::open("kosmos2/processor");
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fx.dir.join("tokenizer_cases.json")).unwrap()).unwrap();
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    let mut checked = 0;
    for (dir, case) in cases.as_object().unwrap() {
        let processor = Kosmos2Processor::from_dir(fx.dir.join("..").join(dir), 64).unwrap();
        let tok = processor.tokenizer();
        for e in case["encode"].as_array().unwrap() {
            let text = e["text"].as_str().unwrap();
            assert_eq!(
                tok.encode(text, false).unwrap().get_ids(),
                ids(&e["ids"]).as_slice(),
                "{dir}: encode {text:?}"
            );
            assert_eq!(
                tok.encode(text, true).unwrap().get_ids(),
                ids(&e["ids_with_special"]).as_slice(),
                "{dir}: encode with specials {text:?}"
            );
            assert_eq!(
                tok.decode(&ids(&e["ids"]), false).unwrap(),
                e["decode"].as_str().unwrap(),
                "{dir}: decode {text:?}"
            );
            checked += 1;
        }
        for d in case["decode"].as_array().unwrap() {
            let i = ids(&d["ids"]);
            assert_eq!(
                tok.decode(&i, false).unwrap(),
                d["decode"].as_str().unwrap(),
                "{dir}: decode"
            );
            assert_eq!(
                processor.decode(&i).unwrap(),
                d["decode_skip_special"].as_str().unwrap(),
                "{dir}: decode skipping specials"
            );
            checked += 1;
        }
    }
    assert!(checked >= 20, "{checked}");
}
