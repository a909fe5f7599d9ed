//! Truncation (never through an image block, nothing-to-score dropped, skip/fail policies) and
//! packing (first fit, text-only, document ids, labels not crossing documents).

use kosmos_train::data::{
    Collator, Content, DataError, Encoded, Example, ImageRef, Item, Location, Overflow, Packer, pack,
};

use crate::common::*;

fn example(content: Content) -> Example {
    Example {
        location: Location::line("mem.jsonl", 1),
        content,
    }
}

fn text(s: &str) -> Example {
    example(Content::Text(s.into()))
}

fn with(max_len: usize, overflow: Overflow) -> Collator {
    let mut c = collate_config(max_len);
    c.overflow = overflow;
    collator(c)
}

#[test]
fn text_is_truncated_to_max_len_without_eos() {
    let full = cat(&[
        &[BOS],
        &pieces("A dog is sitting on the grass next to a red ball."),
        &[EOS],
    ]);
    let c = with(6, Overflow::Truncate);
    let e = c
        .encode(&text("A dog is sitting on the grass next to a red ball."))
        .unwrap()
        .unwrap();
    assert!(e.truncated);
    assert_eq!(e.input_ids, full[..6]);
    assert_eq!(e.labels, labels_except(&full[..6], |i| i == 0));
}

#[test]
fn truncation_never_cuts_an_image_block() {
    let img = ImageRef::File(image_a());
    let doc = example(Content::Interleaved(vec![
        Item::Text("A cat.".into()),
        Item::Image(img.clone()),
        Item::Text("A dog.".into()),
        Item::Image(img.clone()),
        Item::Text("The end.".into()),
    ]));
    let first = pieces("A cat.");
    let second_block = 1 + first.len() + SLOTS + 2 + pieces("A dog.").len();
    // a limit inside the second block: the cut moves before it and its image is dropped
    let c = with(second_block + 4, Overflow::Truncate);
    let e = c.encode(&doc).unwrap().unwrap();
    assert_eq!(e.len(), second_block);
    assert_eq!(e.images.len(), 1);
    assert_eq!(e.pixels.len(), 1);
    assert_eq!(e.image_embeds_position_mask.iter().sum::<u32>(), SLOTS as u32);
    // a limit inside the first block: only the first text remains
    let c = with(1 + first.len() + 3, Overflow::Truncate);
    let e = c.encode(&doc).unwrap().unwrap();
    assert_eq!(e.input_ids, cat(&[&[BOS], &first]));
    assert!(e.images.is_empty() && e.pixels.is_empty());
}

#[test]
fn examples_with_nothing_left_to_score_are_dropped() {
    let ex = example(Content::Instruction {
        image: Some(ImageRef::File(image_a())),
        prompt: "Describe the image in detail, please.".into(),
        response: "A dog.".into(),
    });
    assert!(with(14, Overflow::Truncate).encode(&ex).unwrap().is_none());
    // a caption cut right after the image block keeps nothing either
    let cap = example(Content::Caption {
        image: ImageRef::File(image_a()),
        caption: "A dog.".into(),
    });
    assert!(with(SLOTS + 3, Overflow::Truncate).encode(&cap).unwrap().is_none());
    assert!(with(SLOTS + 4, Overflow::Truncate).encode(&cap).unwrap().is_some());
}

#[test]
fn overflow_skip_and_fail() {
    let long = text("A dog is sitting on the grass next to a red ball.");
    assert!(with(6, Overflow::Skip).encode(&long).unwrap().is_none());
    let err = with(6, Overflow::Fail).encode(&long).unwrap_err();
    let n = pieces("A dog is sitting on the grass next to a red ball.").len() + 2;
    assert!(matches!(err, DataError::TooLong { length, max_len: 6, .. } if length == n));
    assert_eq!(err.to_string(), format!("mem.jsonl:1: {n} tokens, more than max_len 6"));
}

fn encoded(c: &Collator, s: &str) -> Encoded {
    c.encode(&text(s)).unwrap().unwrap()
}

#[test]
fn packing_is_first_fit_in_order_with_document_ids() {
    let c = with(20, Overflow::Truncate);
    let docs = ["A dog.", "The cat sleeps on the sofa.", "A red ball.", "Two people."];
    let enc: Vec<Encoded> = docs.iter().map(|d| encoded(&c, d)).collect();
    let lens: Vec<usize> = enc.iter().map(Encoded::len).collect();
    // expected first-fit placement, computed from the lengths
    let mut rows: Vec<(usize, Vec<usize>)> = Vec::new();
    for (i, &l) in lens.iter().enumerate() {
        match rows.iter_mut().find(|r| r.0 + l <= 20) {
            Some(r) => {
                r.0 += l;
                r.1.push(i);
            }
            None => rows.push((l, vec![i])),
        }
    }
    assert!(
        rows.iter().any(|r| r.1.len() > 1),
        "{lens:?}: the test should pack something"
    );
    let packed = pack(enc.clone(), 20);
    let placement: Vec<Vec<usize>> = packed
        .iter()
        .map(|r| r.iter().map(|e| enc.iter().position(|x| x == e).unwrap()).collect())
        .collect();
    assert_eq!(placement, rows.iter().map(|r| r.1.clone()).collect::<Vec<_>>());

    let batch = c.collate(packed).unwrap();
    for (r, row) in rows.iter().enumerate() {
        let ids: Vec<u32> = row.1.iter().flat_map(|&i| enc[i].input_ids.clone()).collect();
        let labels: Vec<i64> = row.1.iter().flat_map(|&i| enc[i].labels.clone()).collect();
        let docs: Vec<u32> = row
            .1
            .iter()
            .enumerate()
            .flat_map(|(d, &i)| std::iter::repeat_n(d as u32 + 1, lens[i]))
            .collect();
        assert_eq!(batch.input_ids[r][..ids.len()], ids);
        assert_eq!(batch.labels[r][..ids.len()], labels);
        assert_eq!(batch.document_ids[r][..ids.len()], docs);
        // every document starts with an unscored BOS: no label crosses documents
        for (t, &id) in ids.iter().enumerate() {
            if id == BOS {
                assert_eq!(labels[t], IGN);
            }
        }
    }
}

#[test]
fn image_examples_keep_their_own_rows() {
    let c = with(64, Overflow::Truncate);
    let cap = c
        .encode(&example(Content::Caption {
            image: ImageRef::File(image_a()),
            caption: "A dog.".into(),
        }))
        .unwrap()
        .unwrap();
    let mut packer = Packer::new(64, 2, true);
    packer.push(encoded(&c, "A dog.")).unwrap();
    packer.push(cap.clone()).unwrap();
    packer.push(encoded(&c, "A cat.")).unwrap(); // joins the text row
    assert!(packer.rows_full());
    assert!(packer.push(cap).is_err()); // no row for another image example
    let rows = packer.into_rows();
    assert_eq!(rows.iter().map(Vec::len).collect::<Vec<_>>(), vec![2, 1]);
    let mut cfg = collate_config(64);
    cfg.pad_to_max_len = true;
    let batch = c.with_config(cfg).unwrap().collate(rows).unwrap();
    assert_eq!(batch.seq_len(), 64);
    assert_eq!(batch.images_per_row, vec![0, 1]);
}

/// A packed row's loss is the token-weighted mean of its documents' losses alone: packed
/// documents do not see each other (block mask, positions restarting per document).
#[test]
fn packed_documents_score_as_if_alone() {
    use burn::prelude::*;
    use kosmos_train::trainer::{batch_loss, scored_tokens};
    type B = burn::backend::Flex;
    let dir = kosmos_core::testing::repo_root().join("fixtures/generate/model");
    let latents = kosmos_models::Kosmos2Config::from_json_file(dir.join("config.json"))
        .unwrap()
        .latent_query_num;
    let mut config = collate_config(64);
    config.packing = true;
    let c = Collator::from_model_dir(&dir, latents, config).unwrap();
    let e1 = c.encode(&text("A dog is sitting on the grass.")).unwrap().unwrap();
    let e2 = c
        .encode(&text("Two people are riding horses next to a red ball."))
        .unwrap()
        .unwrap();
    let rows = pack([e1.clone(), e2.clone()], 64);
    assert_eq!(rows.len(), 1, "both documents share one row");
    let packed = c.collate(rows).unwrap();
    assert!(packed.document_ids[0].contains(&2));
    let device = Default::default();
    let model = kosmos_models::Kosmos2::<B>::from_pretrained(&dir, &device).unwrap();
    let loss = |b: &kosmos_train::data::Batch| -> f64 { batch_loss(&model, b, &device).unwrap().into_scalar().elem() };
    let (a, b) = (c.collate(vec![vec![e1]]).unwrap(), c.collate(vec![vec![e2]]).unwrap());
    let (na, nb) = (scored_tokens(&a) as f64, scored_tokens(&b) as f64);
    assert_eq!(scored_tokens(&packed) as f64, na + nb);
    let expected = (loss(&a) * na + loss(&b) * nb) / (na + nb);
    let got = loss(&packed);
    eprintln!("packed loss {got:.7}, documents alone {expected:.7}");
    assert!((got - expected).abs() <= 1e-5 * expected.abs(), "{got} vs {expected}");
}
