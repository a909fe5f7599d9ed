//! Collation of every source kind read from JSONL: exact ids, label masks, image masks and
//! pixels; expected ids are built from the tokenizer's own pieces and the known tag ids.

use kosmos_train::data::{Batch, DataLoader, SourceFormat, SourceKind};
use kosmos_vision::preprocess::{ImageProcessor, ImageProcessorConfig};

use crate::TB;
use crate::common::*;

/// One source of `kind` with the given JSONL lines (images a.png, b.png next to it); all of its
/// examples in file order, one per row.
fn collate_jsonl(kind: SourceKind, lines: &[String]) -> Batch {
    let dir = temp_dir("collate");
    copy_images(&dir);
    let manifest = write(&dir, "m.jsonl", lines);
    let config = data_config(vec![source("s", kind, SourceFormat::Jsonl, vec![manifest])], 256);
    let loader = DataLoader::with_collator(config, collator(collate_config(256))).unwrap();
    loader
        .collator()
        .collate_examples(loader.sources()[0].examples())
        .unwrap()
}

fn assert_row(batch: &Batch, row: usize, ids: &[u32], labels: &[i64], image_mask: &[u32]) {
    let n = ids.len();
    assert_eq!(&batch.input_ids[row][..n], ids, "ids of row {row}");
    assert_eq!(&batch.labels[row][..n], labels, "labels of row {row}");
    assert_eq!(
        &batch.image_embeds_position_mask[row][..n],
        image_mask,
        "image mask of row {row}"
    );
    assert!(batch.input_ids[row][n..].iter().all(|&i| i == PAD), "padding ids");
    assert!(batch.labels[row][n..].iter().all(|&l| l == IGN), "padding labels");
    assert_eq!(batch.attention_mask[row].iter().filter(|&&a| a == 1).count(), n);
    assert!(batch.attention_mask[row][..n].iter().all(|&a| a == 1));
}

/// Image-slot mask for a sequence with image blocks starting at `starts`.
fn slot_mask(len: usize, starts: &[usize]) -> Vec<u32> {
    let mut m = vec![0; len];
    for &s in starts {
        m[s + 1..s + 1 + SLOTS].fill(1);
    }
    m
}

fn preprocessed(path: &std::path::Path) -> Vec<f32> {
    let config = ImageProcessorConfig::from_json_file(tokenizer_dir().join("preprocessor_config.json")).unwrap();
    let p = ImageProcessor::new(config).unwrap();
    p.normalize(&p.resize_and_crop(&p.load(path).unwrap()))
}

#[test]
fn text_documents_are_bos_text_eos_with_bos_ignored() {
    let batch = collate_jsonl(
        SourceKind::Text,
        &[
            r#"{"text": "A dog is sitting on the grass."}"#.into(),
            r#"{"text": "The cat sleeps.", "meta": {"ignored": true}}"#.into(),
        ],
    );
    let a = cat(&[&[BOS], &pieces("A dog is sitting on the grass."), &[EOS]]);
    let b = cat(&[&[BOS], &pieces("The cat sleeps."), &[EOS]]);
    assert_eq!(batch.seq_len(), a.len().max(b.len()));
    assert_row(&batch, 0, &a, &labels_except(&a, |i| i == 0), &vec![0; a.len()]);
    assert_row(&batch, 1, &b, &labels_except(&b, |i| i == 0), &vec![0; b.len()]);
    assert_eq!(batch.images_per_row, vec![0, 0]);
    assert!(batch.pixel_values.is_empty() && batch.image_size.is_none());
    assert_eq!(batch.document_ids[1][..b.len()], vec![1; b.len()]);
    assert!(batch.document_ids[1][b.len()..].iter().all(|&d| d == 0));
}

#[test]
fn captions_ignore_the_whole_image_block() {
    let batch = collate_jsonl(
        SourceKind::Caption,
        &[
            r#"{"image": "a.png", "caption": "A red ball on the grass."}"#.into(),
            r#"{"image": "b.png", "text": "Two people."}"#.into(),
        ],
    );
    for (row, text) in ["A red ball on the grass.", "Two people."].iter().enumerate() {
        let ids = cat(&[&[BOS], &image_block(), &pieces(text), &[EOS]]);
        // BOS, <image>, 8 slots and </image> (positions 0..=9+1) are not scored.
        let labels = labels_except(&ids, |i| i < 2 + SLOTS + 1);
        assert_row(&batch, row, &ids, &labels, &slot_mask(ids.len(), &[1]));
    }
    assert_eq!(batch.images_per_row, vec![1, 1]);
    assert_eq!(batch.image_size, Some((28, 28)));
    let a = preprocessed(&image_a());
    let b = preprocessed(&image_b());
    assert_eq!(batch.pixel_values, [a, b].concat());
    let t = batch.to_tensors::<TB>(&Default::default());
    assert_eq!(t.pixel_values.unwrap().dims(), [2, 3, 28, 28]);
    assert_eq!(t.input_ids.dims(), [2, batch.seq_len()]);
    let labels = t.labels.into_data().convert::<i64>().to_vec::<i64>().unwrap();
    assert_eq!(labels, batch.labels.concat());
}

#[test]
fn grit_records_become_grounded_markup() {
    // "A dog" [0, 5) box (0, 0, 0.5, 0.5) -> cells 0, 495; "a ball" [14, 20) two boxes:
    // (0.25, 0.5, 1, 1) -> 520, 1023 and (0, 0, 0.5, 0.5); "grass" below the threshold.
    let line = r#"{"image": "a.png", "caption": "A dog next to a ball on grass.",
        "noun_chunks": [[0, 5, 0.0, 0.0, 0.5, 0.5, 0.9], [14, 20, 0.25, 0.5, 1.0, 1.0, 0.8],
                        [14, 20, 0.0, 0.0, 0.5, 0.5, 0.7], [24, 29, 0.1, 0.1, 0.2, 0.2, 0.3]],
        "ref_exps": []}"#
        .replace('\n', " ");
    let batch = collate_jsonl(SourceKind::Grit, &[line]);
    let ids = cat(&[
        &[BOS],
        &image_block(),
        &[GROUNDING, PHRASE],
        &pieces("A dog"),
        &[PHRASE_END, OBJECT, patch(0), patch(495), OBJECT_END],
        &pieces("next to"),
        &[PHRASE],
        &pieces("a ball"),
        &[
            PHRASE_END,
            OBJECT,
            patch(520),
            patch(1023),
            DELIMITER,
            patch(0),
            patch(495),
            OBJECT_END,
        ],
        &pieces("on grass."),
        &[EOS],
    ]);
    let labels = labels_except(&ids, |i| i < 2 + SLOTS + 1);
    assert_row(&batch, 0, &ids, &labels, &slot_mask(ids.len(), &[1]));
    // the first scored label is `<grounding>`, predicted from the last image position
    assert_eq!(batch.labels[0][2 + SLOTS + 1], GROUNDING as i64);
}

#[test]
fn interleaved_documents_have_several_image_blocks() {
    let line = r#"{"items": [{"text": "A cat."}, {"image": "a.png"}, {"text": "A dog sleeps."},
        {"image": "b.png"}, {"text": "The end."}]}"#
        .replace('\n', " ");
    let batch = collate_jsonl(SourceKind::Interleaved, &[line]);
    let first = pieces("A cat.");
    let second = pieces("A dog sleeps.");
    let ids = cat(&[
        &[BOS],
        &first,
        &image_block(),
        &second,
        &image_block(),
        &pieces("The end."),
        &[EOS],
    ]);
    let b1 = 1 + first.len();
    let b2 = b1 + SLOTS + 2 + second.len();
    let in_block = |i: usize| (b1..b1 + SLOTS + 2).contains(&i) || (b2..b2 + SLOTS + 2).contains(&i);
    let labels = labels_except(&ids, |i| i == 0 || in_block(i));
    assert_row(&batch, 0, &ids, &labels, &slot_mask(ids.len(), &[b1, b2]));
    assert_eq!(batch.images_per_row, vec![2]);
    assert_eq!(
        batch.pixel_values,
        [preprocessed(&image_a()), preprocessed(&image_b())].concat()
    );
    assert_eq!(
        batch.to_tensors::<TB>(&Default::default()).pixel_values.unwrap().dims(),
        [2, 3, 28, 28]
    );
}

#[test]
fn instruction_prompts_are_not_scored() {
    let batch = collate_jsonl(
        SourceKind::Instruction,
        &[
            r#"{"image": "a.png", "prompt": "What is in the image?", "response": "A dog."}"#.into(),
            r#"{"prompt": "Name a color.", "response": "Red."}"#.into(),
        ],
    );
    let prompt = pieces("What is in the image?");
    let ids = cat(&[&[BOS], &image_block(), &prompt, &pieces("A dog."), &[EOS]]);
    let prompt_len = 1 + SLOTS + 2 + prompt.len();
    assert_row(
        &batch,
        0,
        &ids,
        &labels_except(&ids, |i| i < prompt_len),
        &slot_mask(ids.len(), &[1]),
    );
    let prompt = pieces("Name a color.");
    let ids = cat(&[&[BOS], &prompt, &pieces("Red."), &[EOS]]);
    assert_row(
        &batch,
        1,
        &ids,
        &labels_except(&ids, |i| i < 1 + prompt.len()),
        &vec![0; ids.len()],
    );
    // scored labels are exactly the response and EOS
    let scored: Vec<i64> = batch.labels[1].iter().copied().filter(|&l| l != IGN).collect();
    let expected: Vec<i64> = cat(&[&pieces("Red."), &[EOS]]).iter().map(|&i| i as i64).collect();
    assert_eq!(scored, expected);
    assert_eq!(batch.images_per_row, vec![1, 0]);
}

#[test]
fn labels_match_the_loss_convention() {
    // causal_lm_loss compares logits[t] with labels[t + 1]: with the caption's labels, the first
    // scored target is the caption's first token, predicted at the `</image>` position.
    let batch = collate_jsonl(
        SourceKind::Caption,
        &[r#"{"image": "a.png", "caption": "A dog."}"#.into()],
    );
    let first_scored = batch.labels[0].iter().position(|&l| l != IGN).unwrap();
    assert_eq!(batch.input_ids[0][first_scored - 1], EOI);
    assert_eq!(batch.labels[0][first_scored], pieces("A dog.")[0] as i64);
}

#[test]
fn batches_feed_the_loss() {
    use burn::prelude::*;
    let batch = collate_jsonl(
        SourceKind::Instruction,
        &[
            r#"{"image": "a.png", "prompt": "What is in the image?", "response": "A dog."}"#.into(),
            r#"{"prompt": "Name a color.", "response": "Red."}"#.into(),
        ],
    );
    let t = batch.to_tensors::<TB>(&Default::default());
    let [rows, len] = t.labels.dims();
    let vocab = 1435;
    // uniform logits: the loss is ln(vocab) whatever is counted, and finite only if something is
    let logits = Tensor::<TB, 3>::zeros([rows, len, vocab], &Default::default());
    let loss = kosmos_models::loss::causal_lm_loss(logits, t.labels).into_scalar();
    assert!((loss - (vocab as f32).ln()).abs() < 1e-4, "{loss}");
}
