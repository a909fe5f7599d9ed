//! The mixture sampler: determinism from the seed, weights, per-epoch shuffles, and exact
//! resumption (N draws straight == N/2, save, restore, N/2), also through the loader.

use std::collections::HashSet;

use kosmos_train::data::{DataError, DataLoader, DataState, MixtureSampler, SamplerState, SourceFormat, SourceKind};

use crate::common::*;

fn sources() -> Vec<(String, f64, usize)> {
    vec![
        ("grit".into(), 3.0, 7),
        ("text".into(), 1.0, 5),
        ("never".into(), 0.0, 4),
    ]
}

fn draws(sampler: &mut MixtureSampler, n: usize) -> Vec<(usize, usize, u64)> {
    (0..n)
        .map(|_| {
            let d = sampler.next_draw();
            (d.source, d.index, d.epoch)
        })
        .collect()
}

#[test]
fn draws_are_deterministic_from_the_seed() {
    let a = draws(&mut MixtureSampler::new(11, &sources()).unwrap(), 500);
    let b = draws(&mut MixtureSampler::new(11, &sources()).unwrap(), 500);
    let c = draws(&mut MixtureSampler::new(12, &sources()).unwrap(), 500);
    assert_eq!(a, b);
    assert_ne!(a, c);
}

#[test]
fn weights_set_the_mixture_and_zero_weight_is_never_drawn() {
    let d = draws(&mut MixtureSampler::new(5, &sources()).unwrap(), 20_000);
    let grit = d.iter().filter(|x| x.0 == 0).count() as f64 / d.len() as f64;
    assert!((grit - 0.75).abs() < 0.015, "{grit}");
    assert!(d.iter().all(|x| x.0 != 2));
}

#[test]
fn each_epoch_is_a_fresh_permutation() {
    let d = draws(&mut MixtureSampler::new(3, &sources()).unwrap(), 2_000);
    let grit: Vec<(usize, u64)> = d.iter().filter(|x| x.0 == 0).map(|x| (x.1, x.2)).collect();
    let mut orders = HashSet::new();
    for (e, chunk) in grit.chunks_exact(7).enumerate() {
        assert!(chunk.iter().all(|x| x.1 == e as u64), "epoch numbers");
        let mut idx: Vec<usize> = chunk.iter().map(|x| x.0).collect();
        orders.insert(idx.clone());
        idx.sort();
        assert_eq!(idx, (0..7).collect::<Vec<_>>(), "epoch {e} is a permutation");
    }
    assert!(orders.len() > 10, "epochs are shuffled differently");
}

#[test]
fn resuming_from_a_saved_state_continues_exactly() {
    let n = 301;
    let straight = draws(&mut MixtureSampler::new(9, &sources()).unwrap(), n);
    let mut first = MixtureSampler::new(9, &sources()).unwrap();
    let mut resumed = draws(&mut first, n / 2);
    // through JSON, as a checkpoint would store it
    let saved = serde_json::to_string(&first.state()).unwrap();
    let state: SamplerState = serde_json::from_str(&saved).unwrap();
    assert_eq!(state.position, (n / 2) as u64);
    // sources may come in another order: cursors are matched by name
    let mut reordered: Vec<(String, f64, usize)> = sources();
    reordered.reverse();
    let mut second = MixtureSampler::new(9, &sources()).unwrap();
    second.restore(&state).unwrap();
    resumed.extend(draws(&mut second, n - n / 2));
    assert_eq!(straight, resumed);
    let mut other_order = MixtureSampler::new(9, &reordered).unwrap();
    other_order.restore(&state).unwrap();
    assert_eq!(other_order.state().sources.len(), 3);
}

#[test]
fn restoring_a_state_of_other_data_is_refused() {
    let mut s = MixtureSampler::new(9, &sources()).unwrap();
    draws(&mut s, 10);
    let state = s.state();
    let mut other_seed = MixtureSampler::new(10, &sources()).unwrap();
    assert!(matches!(other_seed.restore(&state), Err(DataError::State(m)) if m.contains("seed")));
    let mut grown = sources();
    grown[0].2 = 8;
    let mut grown = MixtureSampler::new(9, &grown).unwrap();
    let err = grown.restore(&state).unwrap_err();
    assert!(
        err.to_string()
            .contains("`grit` had 7 examples when saved, it has 8 now"),
        "{err}"
    );
    let mut renamed = sources();
    renamed[1].0 = "web".into();
    let mut renamed = MixtureSampler::new(9, &renamed).unwrap();
    assert!(renamed.restore(&state).unwrap_err().to_string().contains("`text`"));
}

fn loader(packing: bool) -> DataLoader {
    let dir = temp_dir("loader-resume");
    copy_images(&dir);
    let text: Vec<String> = (0..9)
        .map(|i| {
            format!(
                r#"{{"text": "Document {i} is about a dog{}."}}"#,
                " and a cat".repeat(i % 4)
            )
        })
        .collect();
    let captions: Vec<String> = (0..4)
        .map(|i| {
            format!(
                r#"{{"image": "{}", "caption": "Caption {i}."}}"#,
                if i % 2 == 0 { "a.png" } else { "b.png" }
            )
        })
        .collect();
    let t = write(&dir, "t.jsonl", &text);
    let c = write(&dir, "c.jsonl", &captions);
    let mut config = data_config(
        vec![
            source("text", SourceKind::Text, SourceFormat::Jsonl, vec![t]),
            source("captions", SourceKind::Caption, SourceFormat::Jsonl, vec![c]),
        ],
        48,
    );
    config.packing = packing;
    DataLoader::with_collator(config, collator(collate_config(48))).unwrap()
}

#[test]
fn loader_batches_resume_exactly() {
    for packing in [false, true] {
        let mut straight = loader(packing);
        let all: Vec<_> = (0..8).map(|_| straight.next_batch(3).unwrap()).collect();
        let mut first = loader(packing);
        let mut resumed: Vec<_> = (0..4).map(|_| first.next_batch(3).unwrap()).collect();
        let state: DataState = serde_json::from_str(&serde_json::to_string(&first.state()).unwrap()).unwrap();
        if packing {
            // a packed batch ends when an example does not fit: it is held back, and the state
            // is the one before it
            assert!(state.position < first.stats().drawn, "{state:?}");
        }
        let mut second = loader(packing);
        second.restore(&state).unwrap();
        resumed.extend((0..4).map(|_| second.next_batch(3).unwrap()));
        for (i, (a, b)) in all.iter().zip(&resumed).enumerate() {
            assert_eq!(a.input_ids, b.input_ids, "packing {packing}: batch {i}");
            assert_eq!(a.labels, b.labels);
            assert_eq!(a.pixel_values, b.pixel_values);
            let names = |b: &kosmos_train::data::Batch| -> Vec<Vec<(String, Option<usize>)>> {
                b.locations
                    .iter()
                    .map(|r| {
                        r.iter()
                            .map(|l| (l.file.file_name().unwrap().to_string_lossy().into_owned(), l.line))
                            .collect()
                    })
                    .collect()
            };
            assert_eq!(names(a), names(b));
        }
        if packing {
            assert!(
                all.iter().any(|b| b.locations.iter().any(|r| r.len() > 1)),
                "some rows are packed"
            );
        }
    }
}
