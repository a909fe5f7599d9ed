//! Malformed lines and missing images: `file:line` errors, or skipped and counted, by flag.

use kosmos_train::data::{DataError, DataLoader, OnError, SourceFormat, SourceKind};

use crate::common::*;

fn lines() -> Vec<String> {
    vec![
        r#"{"image": "a.png", "caption": "Line one."}"#.into(),
        r#"{"image": "a.png", "caption": "Line two."#.into(), // truncated JSON
        "".into(),                                            // blank: ignored
        r#"{"image": "a.png", "caption": ["not", "a", "string"]}"#.into(),
        r#"{"caption": "No image field."}"#.into(),
        r#"[1, 2, 3]"#.into(),
        r#"{"image": "a.png", "caption": "Line seven."}"#.into(),
    ]
}

#[test]
fn malformed_lines_fail_with_file_and_line() {
    let dir = temp_dir("malformed");
    copy_images(&dir);
    let manifest = write(&dir, "m.jsonl", &lines());
    let config = data_config(
        vec![source(
            "s",
            SourceKind::Caption,
            SourceFormat::Jsonl,
            vec![manifest.clone()],
        )],
        64,
    );
    let err = DataLoader::with_collator(config, collator(collate_config(64)))
        .err()
        .unwrap();
    let msg = err.to_string();
    assert!(
        matches!(&err, DataError::Malformed { location, .. } if location.line == Some(2)),
        "{msg}"
    );
    assert!(
        msg.starts_with(&format!("{}:2: malformed record: invalid JSON", manifest.display())),
        "{msg}"
    );
}

#[test]
fn malformed_lines_are_skipped_by_flag_with_their_reasons() {
    let dir = temp_dir("malformed-skip");
    copy_images(&dir);
    let manifest = write(&dir, "m.jsonl", &lines());
    let mut config = data_config(
        vec![source(
            "s",
            SourceKind::Caption,
            SourceFormat::Jsonl,
            vec![manifest.clone()],
        )],
        64,
    );
    config.on_error = OnError::Skip;
    let loader = DataLoader::with_collator(config, collator(collate_config(64))).unwrap();
    let source = &loader.sources()[0];
    let kept: Vec<usize> = source.examples().iter().map(|e| e.location.line.unwrap()).collect();
    assert_eq!(kept, vec![1, 7]);
    let m = manifest.display();
    assert_eq!(source.skipped().len(), 4, "{:#?}", source.skipped());
    assert!(source.skipped()[0].starts_with(&format!("{m}:2: malformed record: invalid JSON")));
    assert_eq!(
        source.skipped()[1],
        format!("{m}:4: field `caption`: expected a string, found array of 3")
    );
    assert_eq!(
        source.skipped()[2],
        format!("{m}:5: field `image`: expected an image path (string), found nothing (missing field)")
    );
    assert_eq!(
        source.skipped()[3],
        format!("{m}:6: field `(record)`: expected a JSON object, found array of 3")
    );
}

#[test]
fn grit_entry_errors_name_the_entry() {
    let dir = temp_dir("grit-errors");
    copy_images(&dir);
    let manifest = write(
        &dir,
        "g.jsonl",
        &[
            r#"{"image": "a.png", "caption": "A dog.", "noun_chunks": [[0, 5, 0.1, 0.1, 0.5]]}"#.into(),
            r#"{"image": "a.png", "caption": "A dog.", "noun_chunks": [[0, 50, 0.1, 0.1, 0.5, 0.5, 0.9]]}"#.into(),
            r#"{"image": "a.png", "caption": "A dog.", "noun_chunks": [[0, 5, 0.5, 0.1, 0.5, 0.5, 0.9]]}"#.into(),
            r#"{"image": "a.png", "caption": "A dog.", "noun_chunks": [[0, 50, 0.1, 0.1, 0.5, 0.5, 0.1]]}"#.into(),
        ],
    );
    let mut config = data_config(
        vec![source(
            "g",
            SourceKind::Grit,
            SourceFormat::Jsonl,
            vec![manifest.clone()],
        )],
        64,
    );
    config.on_error = OnError::Skip;
    let loader = DataLoader::with_collator(config, collator(collate_config(64))).unwrap();
    let source = &loader.sources()[0];
    let m = manifest.display();
    // line 4's bad span is below the threshold: the entry is dropped before it is checked
    assert_eq!(source.examples().len(), 1);
    assert_eq!(source.examples()[0].location.line, Some(4));
    assert_eq!(
        source.skipped()[0],
        format!(
            "{m}:1: field `noun_chunks[0]`: expected [start, end, x1, y1, x2, y2, score] (7 finite numbers, \
             integral non-negative span), found array of 5"
        )
    );
    assert!(
        source.skipped()[1].starts_with(&format!("{m}:2: malformed record: noun_chunks[0]: span [0, 50)")),
        "{}",
        source.skipped()[1]
    );
    assert!(
        source.skipped()[2].contains("must have x2 > x1"),
        "{}",
        source.skipped()[2]
    );
}

#[test]
fn missing_images_fail_or_are_skipped_when_drawn() {
    let dir = temp_dir("missing-image");
    copy_images(&dir);
    let manifest = write(
        &dir,
        "m.jsonl",
        &[
            r#"{"image": "a.png", "caption": "Present."}"#.into(),
            r#"{"image": "gone.png", "caption": "Missing."}"#.into(),
        ],
    );
    let mut config = data_config(
        vec![source(
            "s",
            SourceKind::Caption,
            SourceFormat::Jsonl,
            vec![manifest.clone()],
        )],
        64,
    );
    // fail: some draw of the first epoch hits line 2
    let mut loader = DataLoader::with_collator(config.clone(), collator(collate_config(64))).unwrap();
    let err = (0..2).find_map(|_| loader.next_batch(1).err()).unwrap();
    assert!(
        matches!(&err, DataError::MissingImage { location, image }
            if location.line == Some(2) && image.ends_with("gone.png")),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        format!(
            "{}:2: image `{}` not found",
            manifest.display(),
            dir.join("gone.png").display()
        )
    );
    // skip: every batch is the present one; the skips are counted with their reason
    config.on_error = OnError::Skip;
    let mut loader = DataLoader::with_collator(config, collator(collate_config(64))).unwrap();
    for _ in 0..4 {
        let batch = loader.next_batch(1).unwrap();
        assert_eq!(batch.locations[0][0].line, Some(1));
    }
    let stats = loader.stats();
    assert!(stats.skipped >= 1 && stats.drawn == 4 + stats.skipped, "{stats:?}");
    assert!(stats.recent_errors[0].contains(":2: image"), "{stats:?}");
}

#[test]
fn a_source_of_only_bad_records_is_refused() {
    let dir = temp_dir("all-bad");
    let manifest = write(&dir, "m.jsonl", &["{".into(), "nope".into()]);
    let mut config = data_config(
        vec![source("bad", SourceKind::Text, SourceFormat::Jsonl, vec![manifest])],
        64,
    );
    config.on_error = OnError::Skip;
    let err = DataLoader::with_collator(config, collator(collate_config(64)))
        .err()
        .unwrap();
    assert!(matches!(&err, DataError::Source { name, .. } if name == "bad"), "{err}");
    assert!(err.to_string().contains("2 skipped"), "{err}");
}

#[test]
fn endless_skips_stop() {
    let dir = temp_dir("endless");
    let manifest = write(&dir, "m.jsonl", &[r#"{"image": "gone.png", "caption": "x"}"#.into()]);
    let mut config = data_config(
        vec![source("s", SourceKind::Caption, SourceFormat::Jsonl, vec![manifest])],
        64,
    );
    config.on_error = OnError::Skip;
    config.max_consecutive_skips = 5;
    let mut loader = DataLoader::with_collator(config, collator(collate_config(64))).unwrap();
    let err = loader.next_batch(1).err().unwrap();
    assert!(matches!(err, DataError::TooManySkips { count: 5, .. }), "{err}");
}
