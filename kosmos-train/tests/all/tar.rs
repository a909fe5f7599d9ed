//! WebDataset-style tar shards: every source kind collates exactly as the same records from a
//! JSONL manifest; member grouping by key; errors name `shard.tar[member]`.

use kosmos_train::data::{Batch, DataError, DataLoader, ImageRef, OnError, SourceFormat, SourceKind};

use crate::common::*;

fn png(which: char) -> Vec<u8> {
    std::fs::read(if which == 'a' { image_a() } else { image_b() }).unwrap()
}

fn json(s: &str) -> Vec<u8> {
    s.as_bytes().to_vec()
}

fn all_rows(kind: SourceKind, format: SourceFormat, path: std::path::PathBuf) -> Batch {
    let config = data_config(vec![source("s", kind, format, vec![path])], 256);
    let loader = DataLoader::with_collator(config, collator(collate_config(256))).unwrap();
    loader
        .collator()
        .collate_examples(loader.sources()[0].examples())
        .unwrap()
}

/// Tar members, in order: (name, bytes).
type Members = Vec<(&'static str, Vec<u8>)>;

/// (kind, tar members, equivalent JSONL lines)
fn cases() -> Vec<(SourceKind, Members, Vec<String>)> {
    let grit = concat!(
        r#""caption": "A dog next to a ball", "noun_chunks": [[0, 5, 0.0, 0.0, 0.5, 0.5, 0.9], "#,
        r#"[14, 20, 0.25, 0.5, 1.0, 1.0, 0.8]], "ref_exps": []"#
    );
    vec![
        (
            SourceKind::Text,
            vec![
                ("000.json", json(r#"{"text": "A dog is sitting on the grass."}"#)),
                ("001.json", json(r#"{"text": "The cat sleeps."}"#)),
            ],
            vec![
                r#"{"text": "A dog is sitting on the grass."}"#.into(),
                r#"{"text": "The cat sleeps."}"#.into(),
            ],
        ),
        (
            SourceKind::Caption,
            vec![
                ("000.png", png('a')),
                ("000.json", json(r#"{"caption": "A red ball."}"#)),
                ("001.json", json(r#"{"caption": "Two people.", "image": "png"}"#)),
                ("001.png", png('b')),
            ],
            vec![
                r#"{"image": "a.png", "caption": "A red ball."}"#.into(),
                r#"{"image": "b.png", "caption": "Two people."}"#.into(),
            ],
        ),
        (
            SourceKind::Grit,
            vec![("g/x1.json", json(&format!("{{{grit}}}"))), ("g/x1.png", png('b'))],
            vec![format!(r#"{{"image": "b.png", {grit}}}"#)],
        ),
        (
            SourceKind::Interleaved,
            vec![
                ("doc.0.png", png('a')),
                ("doc.1.png", png('b')),
                (
                    "doc.json",
                    json(
                        r#"{"items": [{"text": "A cat."}, {"image": "0.png"}, {"text": "A dog."},
                            {"image": "1.png"}]}"#,
                    ),
                ),
            ],
            vec![
                r#"{"items": [{"text": "A cat."}, {"image": "a.png"}, {"text": "A dog."}, {"image": "b.png"}]}"#.into(),
            ],
        ),
        (
            SourceKind::Instruction,
            vec![
                ("q1.json", json(r#"{"prompt": "What is it?", "response": "A dog."}"#)),
                ("q1.png", png('a')),
                ("q2.json", json(r#"{"prompt": "Name a color.", "response": "Red."}"#)),
            ],
            vec![
                r#"{"image": "a.png", "prompt": "What is it?", "response": "A dog."}"#.into(),
                r#"{"prompt": "Name a color.", "response": "Red."}"#.into(),
            ],
        ),
    ]
}

#[test]
fn every_kind_from_tar_equals_jsonl() {
    for (kind, members, lines) in cases() {
        let dir = temp_dir("tar");
        copy_images(&dir);
        let shard = dir.join("00000.tar");
        tar_shard(&shard, &members);
        let manifest = write(&dir, "m.jsonl", &lines);
        let from_tar = all_rows(kind, SourceFormat::Tar, shard.clone());
        let from_jsonl = all_rows(kind, SourceFormat::Jsonl, manifest);
        assert_eq!(from_tar.input_ids, from_jsonl.input_ids, "{kind:?}: ids");
        assert_eq!(from_tar.labels, from_jsonl.labels, "{kind:?}: labels");
        assert_eq!(
            from_tar.image_embeds_position_mask, from_jsonl.image_embeds_position_mask,
            "{kind:?}"
        );
        assert_eq!(from_tar.images_per_row, from_jsonl.images_per_row, "{kind:?}");
        assert_eq!(from_tar.pixel_values, from_jsonl.pixel_values, "{kind:?}: pixels");
        assert!(
            from_tar
                .locations
                .iter()
                .flatten()
                .all(|l| l.file == shard && l.member.is_some())
        );
    }
}

#[test]
fn tar_members_are_grouped_by_key_and_read_by_offset() {
    let dir = temp_dir("tar-keys");
    let shard = dir.join("s.tar");
    tar_shard(
        &shard,
        &[
            ("a/000.json", json(r#"{"caption": "x"}"#)),
            ("b/000.json", json(r#"{"caption": "y"}"#)),
            ("a/000.png", png('a')),
            ("b/000.png", png('b')),
        ],
    );
    let config = data_config(
        vec![source("s", SourceKind::Caption, SourceFormat::Tar, vec![shard.clone()])],
        64,
    );
    let loader = DataLoader::with_collator(config, collator(collate_config(64))).unwrap();
    let examples = loader.sources()[0].examples();
    assert_eq!(examples.len(), 2);
    assert_eq!(examples[0].location.member.as_deref(), Some("a/000.json"));
    let images = examples[1].content.images();
    let ImageRef::TarMember {
        member, offset, size, ..
    } = images[0]
    else {
        panic!("tar member expected")
    };
    assert_eq!(member, "b/000.png");
    let bytes = std::fs::read(&shard).unwrap();
    assert_eq!(
        &bytes[*offset as usize..(*offset + *size) as usize],
        png('b').as_slice()
    );
}

#[test]
fn tar_sample_errors_name_the_member() {
    let dir = temp_dir("tar-errors");
    let shard = dir.join("bad.tar");
    tar_shard(
        &shard,
        &[
            ("000.json", json(r#"{"caption": "ok"}"#)),
            ("000.png", png('a')),
            ("001.png", png('a')),                                     // no json
            ("002.json", json(r#"{"caption": "x", "image": "jpg"}"#)), // names a missing member
            ("002.png", png('a')),
            ("003.json", json(r#"{"caption": 5}"#)), // wrong type
            ("003.png", png('a')),
            ("004.json", json(r#"{"caption": "two images"}"#)), // ambiguous
            ("004.0.png", png('a')),
            ("004.1.png", png('b')),
            ("005.json", json("{not json")),
        ],
    );
    let mut s = source("s", SourceKind::Caption, SourceFormat::Tar, vec![shard.clone()]);
    let config = data_config(vec![s.clone()], 64);
    let err = DataLoader::with_collator(config, collator(collate_config(64)))
        .err()
        .unwrap();
    assert!(matches!(&err, DataError::Malformed { location, .. } if location.member.as_deref() == Some("001")));
    assert!(
        err.to_string().starts_with(&format!("{}[001]", shard.display())),
        "{err}"
    );

    s.on_error = Some(OnError::Skip);
    let loader = DataLoader::with_collator(data_config(vec![s], 64), collator(collate_config(64))).unwrap();
    let source = &loader.sources()[0];
    assert_eq!(source.len(), 1);
    let skipped = source.skipped();
    assert_eq!(skipped.len(), 5, "{skipped:#?}");
    assert!(
        skipped[1].contains("[002.json]") && skipped[1].contains("image `002.jpg` not found"),
        "{}",
        skipped[1]
    );
    assert!(
        skipped[2].contains("[003.json]: field `caption`: expected a string, found number 5"),
        "{}",
        skipped[2]
    );
    assert!(skipped[3].contains("[004.json]: field `image`"), "{}", skipped[3]);
    assert!(
        skipped[4].contains("[005.json]: malformed record: invalid JSON"),
        "{}",
        skipped[4]
    );
}
