//! Logits processors against transformers' classes on fixture scores
//! (`scripts/make_generate_fixtures.py`, `fixtures/generate/processors.*`).

use kosmos_core::testing::Fixture;
use kosmos_infer::logits::{LogitsPipeline, no_repeat_ngram, repetition_penalty, softmax, temperature, top_k, top_p};

struct Case {
    scores: Vec<Vec<f32>>,
    ids: Vec<Vec<u32>>,
    io: kosmos_core::TensorFile,
}

fn rows_f32(io: &kosmos_core::TensorFile, key: &str) -> Vec<Vec<f32>> {
    let data = io.data(key).unwrap();
    let cols = data.shape[1];
    data.convert::<f32>()
        .to_vec::<f32>()
        .unwrap()
        .chunks(cols)
        .map(<[f32]>::to_vec)
        .collect()
}

fn case() -> Case {
    let fx = Fixture::open("generate");
    let io = fx.file("processors.safetensors");
    let ids_data = io.data("input_ids").unwrap();
    let cols = ids_data.shape[1];
    let ids = ids_data
        .convert::<i64>()
        .to_vec::<i64>()
        .unwrap()
        .chunks(cols)
        .map(|r| r.iter().map(|&v| v as u32).collect())
        .collect();
    Case {
        scores: rows_f32(&io, "scores"),
        ids,
        io,
    }
}

/// Same filtered set (`-inf` in the same places) and values within f32 rounding.
fn assert_rows(ours: &[Vec<f32>], key: &str, io: &kosmos_core::TensorFile) {
    let reference = rows_f32(io, key);
    assert_eq!(ours.len(), reference.len(), "{key}: rows");
    let mut filtered = 0;
    for (r, (a, b)) in ours.iter().zip(&reference).enumerate() {
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            if y.is_infinite() {
                assert_eq!(x, y, "{key}: row {r} id {i} must be filtered");
                filtered += 1;
            } else {
                assert!(
                    (x - y).abs() <= 1e-6 + 1e-6 * y.abs(),
                    "{key}: row {r} id {i}: ours {x}, reference {y}"
                );
            }
        }
    }
    println!("{key}: {filtered} filtered entries, equal");
}

fn map_rows(c: &Case, f: impl Fn(&mut Vec<f32>, &[u32])) -> Vec<Vec<f32>> {
    c.scores
        .iter()
        .zip(&c.ids)
        .map(|(s, ids)| {
            let mut s = s.clone();
            f(&mut s, ids);
            s
        })
        .collect()
}

#[test]
fn each_processor_equals_transformers() {
    let c = case();
    assert_rows(&map_rows(&c, |s, _| temperature(s, 0.7)), "temperature_0.7", &c.io);
    assert_rows(&map_rows(&c, |s, _| top_k(s, 5)), "top_k_5", &c.io);
    assert_rows(&map_rows(&c, |s, _| top_p(s, 0.8)), "top_p_0.8", &c.io);
    assert_rows(&map_rows(&c, |s, _| top_p(s, 0.3)), "top_p_0.3", &c.io);
    assert_rows(
        &map_rows(&c, |s, ids| repetition_penalty(s, ids, 1.3)),
        "repetition_penalty_1.3",
        &c.io,
    );
    assert_rows(
        &map_rows(&c, |s, ids| no_repeat_ngram(s, ids, 3)),
        "no_repeat_ngram_3",
        &c.io,
    );
    assert_rows(
        &map_rows(&c, |s, ids| no_repeat_ngram(s, ids, 2)),
        "no_repeat_ngram_2",
        &c.io,
    );
}

#[test]
fn sampling_chain_equals_generates_processor_list() {
    let c = case();
    let pipeline = LogitsPipeline {
        min_new_tokens: 0,
        eos_token_ids: vec![2],
        repetition_penalty: 1.3,
        no_repeat_ngram_size: 3,
        sample: true,
        temperature: 0.7,
        top_k: 5,
        top_p: 0.8,
    };
    let chained = map_rows(&c, |s, ids| pipeline.apply(s, ids, 0, 0));
    assert_rows(&chained, "chain", &c.io);
    // The distribution sampling draws from.
    let probs: Vec<Vec<f32>> = chained.iter().map(|s| softmax(s)).collect();
    let reference = rows_f32(&c.io, "chain_softmax");
    for (a, b) in probs.iter().flatten().zip(reference.iter().flatten()) {
        assert!((a - b).abs() <= 1e-6, "softmax: ours {a}, reference {b}");
    }
}
