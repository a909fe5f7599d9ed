//! Sources: the examples of one configured source, read from JSONL manifests or WebDataset-style
//! tar shards.
//!
//! Records (text, spans, boxes: small) are parsed when the source is opened and kept in memory;
//! images are read when an example is collated (files by path, tar members by seeking to their
//! recorded offset), so a missing image file is reported then, with the record's `file:line`.
//! In a tar shard a sample's members share a key (the member name up to the first dot of its
//! basename, directories included, as WebDataset does): `000123.json` holds the record and
//! `000123.jpg` (or `000123.0.png`, `000123.1.png` for several images) the images; a sample
//! without a `.json` member, or whose record names an image the sample lacks, is an error of
//! that sample (`shard.tar[000123.json]`).
//!
//! Malformed lines and samples fail the opening or are skipped (and kept in
//! [`Source::skipped`]) according to `on_error`.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::config::{OnError, SourceConfig, SourceFormat};
use super::error::{DataError, Location};
use super::record::{Example, ImageRef, parse_record};

/// Extensions treated as image members of a tar sample.
pub const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "webp", "gif", "bmp"];

/// The examples of one source.
#[derive(Clone, Debug)]
pub struct Source {
    config: SourceConfig,
    files: Vec<PathBuf>,
    examples: Vec<Example>,
    skipped: Vec<String>,
}

impl Source {
    /// Read every file of the source. `on_error` applies unless the source overrides it.
    pub fn open(config: &SourceConfig, on_error: OnError) -> Result<Self, DataError> {
        let on_error = config.on_error.unwrap_or(on_error);
        let files = list_files(config)?;
        let mut source = Self {
            config: config.clone(),
            files: files.clone(),
            examples: Vec::new(),
            skipped: Vec::new(),
        };
        for file in &files {
            let mut handle = |r: Result<Example, DataError>| -> Result<(), DataError> {
                match r {
                    Ok(e) => source.examples.push(e),
                    Err(e) if on_error == OnError::Skip && e.is_record_error() => source.skipped.push(e.to_string()),
                    Err(e) => return Err(e),
                }
                Ok(())
            };
            match config.format {
                SourceFormat::Jsonl => read_jsonl(file, config, &mut handle)?,
                SourceFormat::Tar => read_tar(file, config, &mut handle)?,
            }
        }
        if source.examples.is_empty() {
            return Err(DataError::Source {
                name: config.name.clone(),
                message: format!(
                    "no valid records in {} file(s) ({} skipped)",
                    files.len(),
                    source.skipped.len()
                ),
            });
        }
        Ok(source)
    }

    /// The source's configuration.
    pub fn config(&self) -> &SourceConfig {
        &self.config
    }

    /// The files read, in order.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.examples.len()
    }

    /// Whether there are none (never true for an opened source).
    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    /// Example `index` (file order).
    pub fn get(&self, index: usize) -> Option<&Example> {
        self.examples.get(index)
    }

    /// All examples, in file order.
    pub fn examples(&self) -> &[Example] {
        &self.examples
    }

    /// The errors of the records skipped while opening (with `on_error = "skip"`).
    pub fn skipped(&self) -> &[String] {
        &self.skipped
    }
}

fn list_files(config: &SourceConfig) -> Result<Vec<PathBuf>, DataError> {
    let ext = match config.format {
        SourceFormat::Jsonl => "jsonl",
        SourceFormat::Tar => "tar",
    };
    let mut files = Vec::new();
    for path in &config.paths {
        if path.is_dir() {
            let entries = std::fs::read_dir(path).map_err(|source| DataError::Io {
                location: Location::file(path),
                source,
            })?;
            let mut found: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == ext))
                .collect();
            found.sort();
            files.extend(found);
        } else if path.is_file() {
            files.push(path.clone());
        } else {
            return Err(DataError::Source {
                name: config.name.clone(),
                message: format!("`{}` does not exist", path.display()),
            });
        }
    }
    if files.is_empty() {
        return Err(DataError::Source {
            name: config.name.clone(),
            message: format!("no *.{ext} files in {:?}", config.paths),
        });
    }
    Ok(files)
}

/// Read a JSONL manifest, calling `sink` with every record (or its error). Blank lines are
/// ignored; line numbers are 1-based. Relative image paths resolve against the source's
/// `image_root` (default: the manifest's directory).
pub fn read_jsonl(
    path: &Path,
    config: &SourceConfig,
    sink: &mut dyn FnMut(Result<Example, DataError>) -> Result<(), DataError>,
) -> Result<(), DataError> {
    let file = File::open(path).map_err(|source| DataError::Io {
        location: Location::file(path),
        source,
    })?;
    let root = config
        .image_root
        .clone()
        .unwrap_or_else(|| path.parent().map(Path::to_path_buf).unwrap_or_default());
    let mut reader = BufReader::new(file);
    let mut buf = Vec::new();
    let mut line_no = 0;
    loop {
        buf.clear();
        let n = reader.read_until(b'\n', &mut buf).map_err(|source| DataError::Io {
            location: Location::line(path, line_no + 1),
            source,
        })?;
        if n == 0 {
            return Ok(());
        }
        line_no += 1;
        let location = Location::line(path, line_no);
        let result = (|| {
            let text = std::str::from_utf8(&buf).map_err(|e| DataError::Malformed {
                location: location.clone(),
                message: format!("not UTF-8: {e}"),
            })?;
            if text.trim().is_empty() {
                return Ok(None);
            }
            let value: Value = serde_json::from_str(text).map_err(|e| DataError::Malformed {
                location: location.clone(),
                message: format!("invalid JSON: {e}"),
            })?;
            let mut resolve = |reference: Option<&str>, key: &str, required: bool| match reference {
                Some(r) => Ok(Some(ImageRef::File(root.join(r)))),
                None if required => Err(DataError::Field {
                    location: location.clone(),
                    key: key.into(),
                    expected: "an image path (string)",
                    found: "nothing (missing field)".into(),
                }),
                None => Ok(None),
            };
            let content = parse_record(&value, config.kind, &config.grit, &location, &mut resolve)?;
            Ok(Some(Example {
                location: location.clone(),
                content,
            }))
        })();
        match result {
            Ok(None) => {}
            Ok(Some(example)) => sink(Ok(example))?,
            Err(e) => sink(Err(e))?,
        }
    }
}

struct Member {
    name: String,
    offset: u64,
    size: u64,
}

#[derive(Default)]
struct TarSample {
    key: String,
    json: Option<(String, Result<Vec<u8>, std::io::Error>)>,
    members: Vec<(String, Member)>,
}

/// Split a member name into its WebDataset key and extension (`dir/000123.0.jpg` ->
/// `("dir/000123", "0.jpg")`).
pub fn split_key(name: &str) -> Option<(&str, &str)> {
    let base_start = name.rfind('/').map_or(0, |i| i + 1);
    let dot = name[base_start..].find('.')? + base_start;
    Some((&name[..dot], &name[dot + 1..]))
}

/// Read a tar shard, calling `sink` with every sample's record (or its error).
pub fn read_tar(
    path: &Path,
    config: &SourceConfig,
    sink: &mut dyn FnMut(Result<Example, DataError>) -> Result<(), DataError>,
) -> Result<(), DataError> {
    let io = |source: std::io::Error, member: Option<&str>| DataError::Io {
        location: match member {
            Some(m) => Location::member(path, m),
            None => Location::file(path),
        },
        source,
    };
    let file = File::open(path).map_err(|e| io(e, None))?;
    let mut archive = tar::Archive::new(BufReader::new(file));
    let mut samples: Vec<TarSample> = Vec::new();
    let mut by_key: HashMap<String, usize> = HashMap::new();
    let mut last_member: Option<String> = None;
    let entries = archive.entries().map_err(|e| io(e, None))?;
    for entry in entries {
        let mut entry = match entry {
            Ok(e) => e,
            Err(e) => {
                // A corrupt or truncated shard: report after the last good member.
                let after = last_member.as_deref().map(|m| format!("after {m}"));
                sink(Err(io(e, after.as_deref())))?;
                break;
            }
        };
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name = match entry.path() {
            Ok(p) => p.to_string_lossy().into_owned(),
            Err(e) => {
                sink(Err(io(e, last_member.as_deref())))?;
                continue;
            }
        };
        last_member = Some(name.clone());
        let base = name.rsplit('/').next().unwrap_or(&name);
        if base.starts_with('.') || base.starts_with("__") {
            continue; // hidden files, __MACOSX
        }
        let Some((key, ext)) = split_key(&name) else {
            sink(Err(DataError::Malformed {
                location: Location::member(path, name.as_str()),
                message: "member name has no extension, so it belongs to no sample".into(),
            }))?;
            continue;
        };
        let (key, ext) = (key.to_string(), ext.to_ascii_lowercase());
        let index = *by_key.entry(key.clone()).or_insert_with(|| {
            samples.push(TarSample {
                key: key.clone(),
                ..TarSample::default()
            });
            samples.len() - 1
        });
        let sample = &mut samples[index];
        if ext == "json" {
            let mut bytes = Vec::new();
            let read = entry.read_to_end(&mut bytes).map(|_| bytes);
            sample.json = Some((name, read));
        } else {
            let member = Member {
                offset: entry.raw_file_position(),
                size: entry.size(),
                name: name.clone(),
            };
            sample.members.push((ext, member));
        }
    }
    for sample in samples {
        sink(tar_example(path, config, sample))?;
    }
    Ok(())
}

fn tar_example(path: &Path, config: &SourceConfig, sample: TarSample) -> Result<Example, DataError> {
    let Some((json_name, bytes)) = sample.json else {
        return Err(DataError::Malformed {
            location: Location::member(path, sample.key.as_str()),
            message: format!("sample `{}` has no .json member", sample.key),
        });
    };
    let location = Location::member(path, json_name.as_str());
    let bytes = bytes.map_err(|source| DataError::Io {
        location: location.clone(),
        source,
    })?;
    let value: Value = serde_json::from_slice(&bytes).map_err(|e| DataError::Malformed {
        location: location.clone(),
        message: format!("invalid JSON: {e}"),
    })?;
    let to_ref = |m: &Member| ImageRef::TarMember {
        shard: path.to_path_buf(),
        member: m.name.clone(),
        offset: m.offset,
        size: m.size,
    };
    let is_image = |ext: &str| IMAGE_EXTENSIONS.contains(&ext.rsplit('.').next().unwrap_or(ext));
    let mut resolve = |reference: Option<&str>, key: &str, required: bool| match reference {
        Some(r) => {
            let r = r.to_ascii_lowercase();
            // Accept the extension (`jpg`, `0.png`) or the full member name.
            let found = sample
                .members
                .iter()
                .find(|(ext, m)| *ext == r || m.name.to_ascii_lowercase() == r);
            match found {
                Some((_, m)) => Ok(Some(to_ref(m))),
                None => Err(DataError::MissingImage {
                    location: location.clone(),
                    image: format!("{}.{r}", sample.key),
                }),
            }
        }
        None => {
            let images: Vec<&Member> = sample
                .members
                .iter()
                .filter(|(ext, _)| is_image(ext))
                .map(|(_, m)| m)
                .collect();
            match images.as_slice() {
                [one] => Ok(Some(to_ref(one))),
                [] if !required => Ok(None),
                [] => Err(DataError::MissingImage {
                    location: location.clone(),
                    image: format!("{}.{{{}}}", sample.key, IMAGE_EXTENSIONS.join(",")),
                }),
                many => Err(DataError::Field {
                    location: location.clone(),
                    key: key.into(),
                    expected: "the image member's extension (the sample has several images)",
                    found: format!(
                        "nothing (members {:?})",
                        many.iter().map(|m| &m.name).collect::<Vec<_>>()
                    ),
                }),
            }
        }
    };
    let content = parse_record(&value, config.kind, &config.grit, &location, &mut resolve)?;
    Ok(Example { location, content })
}
