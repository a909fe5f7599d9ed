//! Shared helpers: the tiny tokenizer, expected ids derived from the tokenizer itself, temporary
//! directories, JSONL files and tar shards.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use kosmos_core::testing::repo_root;
use kosmos_train::data::{
    CollateConfig, Collator, DataConfig, OnError, Overflow, SourceConfig, SourceFormat, SourceKind,
};

pub const BOS: u32 = 0;
pub const PAD: u32 = 1;
pub const EOS: u32 = 2;
pub const BOI: u32 = 401;
pub const EOI: u32 = 402;
pub const PHRASE: u32 = 405;
pub const PHRASE_END: u32 = 406;
pub const OBJECT: u32 = 407;
pub const OBJECT_END: u32 = 408;
pub const DELIMITER: u32 = 409;
pub const GROUNDING: u32 = 410;
pub const IGN: i64 = -100;
/// Image slots of the tiny model (`num_image_tokens` = 8).
pub const SLOTS: usize = 8;

pub fn patch(k: u32) -> u32 {
    411 + k
}

pub fn tokenizer_dir() -> PathBuf {
    repo_root().join("fixtures/kosmos2/tokenizer")
}

pub fn image_a() -> PathBuf {
    repo_root().join("fixtures/generate/images/a.png")
}

pub fn image_b() -> PathBuf {
    repo_root().join("fixtures/generate/images/b.png")
}

/// The tokenizer's own ids for a text piece (no special tokens).
pub fn pieces(text: &str) -> Vec<u32> {
    let tok = tokenizers::Tokenizer::from_file(tokenizer_dir().join("tokenizer.json")).unwrap();
    tok.encode(text, false).unwrap().get_ids().to_vec()
}

/// `<image>`, the slot ids 4..4+8 (unk + 1 ..), `</image>`.
pub fn image_block() -> Vec<u32> {
    let mut v = vec![BOI];
    v.extend(4..4 + SLOTS as u32);
    v.push(EOI);
    v
}

/// Concatenate id pieces.
pub fn cat(parts: &[&[u32]]) -> Vec<u32> {
    parts.iter().flat_map(|p| p.iter().copied()).collect()
}

/// Labels equal to the ids with `ignored` positions set to -100.
pub fn labels_except(ids: &[u32], ignored: impl Fn(usize) -> bool) -> Vec<i64> {
    ids.iter()
        .enumerate()
        .map(|(i, &id)| if ignored(i) { IGN } else { id as i64 })
        .collect()
}

pub fn collate_config(max_len: usize) -> CollateConfig {
    CollateConfig {
        max_len,
        add_eos: true,
        overflow: Overflow::Truncate,
        pad_to_max_len: false,
        packing: false,
    }
}

pub fn collator(config: CollateConfig) -> Collator {
    Collator::from_model_dir(tokenizer_dir(), SLOTS, config).unwrap()
}

/// A fresh directory under the target dir's tmp.
pub fn temp_dir(name: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "kosmos-train-tests-{}-{name}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub fn write(dir: &Path, name: &str, lines: &[String]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

/// Copy the test images into `dir`.
pub fn copy_images(dir: &Path) {
    std::fs::copy(image_a(), dir.join("a.png")).unwrap();
    std::fs::copy(image_b(), dir.join("b.png")).unwrap();
}

pub fn source(name: &str, kind: SourceKind, format: SourceFormat, paths: Vec<PathBuf>) -> SourceConfig {
    SourceConfig {
        name: name.into(),
        kind,
        format,
        paths,
        weight: 1.0,
        image_root: None,
        grit: Default::default(),
        on_error: None,
    }
}

pub fn data_config(sources: Vec<SourceConfig>, max_len: usize) -> DataConfig {
    DataConfig {
        sources,
        seed: 7,
        max_len,
        packing: false,
        pad_to_max_len: false,
        add_eos: true,
        overflow: Overflow::Truncate,
        on_error: OnError::Fail,
        max_consecutive_skips: 100,
    }
}

/// Write a tar shard with the given members, in order.
pub fn tar_shard(path: &Path, members: &[(&str, Vec<u8>)]) {
    let file = std::fs::File::create(path).unwrap();
    let mut builder = ::tar::Builder::new(file);
    for (name, data) in members {
        let mut header = ::tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder.append_data(&mut header, name, data.as_slice()).unwrap();
    }
    builder.finish().unwrap();
}
