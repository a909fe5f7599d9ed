//! Examples (what a source yields) and the parsing of JSON records into them.
//!
//! Record layouts, one JSON object per JSONL line or per tar sample (`key.json`); unknown fields
//! are ignored:
//!
//! | kind          | fields |
//! |---------------|--------|
//! | `text`        | `text` |
//! | `caption`     | `image`, `caption` (alias `text`) |
//! | `interleaved` | `items`: list of `{"text": ...}` or `{"image": ...}`, in reading order |
//! | `grit`        | `image`, `caption`, `noun_chunks`, `ref_exps` (see [`crate::data::grit`]) |
//! | `instruction` | `prompt`, `response`, optional `image` |
//!
//! In a JSONL manifest `image` is a path relative to the source's `image_root`. In a tar shard it
//! names a member of the same sample by its extension (`"jpg"`, `"0.png"` for `key.0.png`); a
//! single-image record may omit it when the sample has exactly one image member.

use std::path::PathBuf;

use kosmos_models::processor::PhraseBoxes;
use serde_json::{Map, Value};

use super::config::{GritConfig, SourceKind};
use super::error::{DataError, Location};
use super::grit::{self, GritRecord};

/// Where an image's bytes are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageRef {
    /// A file on disk.
    File(PathBuf),
    /// A member of a tar shard (read by seeking to `offset`).
    TarMember {
        /// The shard.
        shard: PathBuf,
        /// The member's name.
        member: String,
        /// Offset of the member's data in the shard.
        offset: u64,
        /// Size of the member's data.
        size: u64,
    },
}

impl ImageRef {
    /// A printable name (`path` or `shard.tar[member]`).
    pub fn name(&self) -> String {
        match self {
            Self::File(p) => p.display().to_string(),
            Self::TarMember { shard, member, .. } => format!("{}[{member}]", shard.display()),
        }
    }
}

/// One item of an interleaved document.
#[derive(Clone, Debug, PartialEq)]
pub enum Item {
    /// Text.
    Text(String),
    /// An image.
    Image(ImageRef),
}

/// The content of an example, by source kind.
#[derive(Clone, Debug, PartialEq)]
pub enum Content {
    /// A text-only document.
    Text(String),
    /// An image and its caption.
    Caption {
        /// The image.
        image: ImageRef,
        /// The caption.
        caption: String,
    },
    /// Text and images in reading order.
    Interleaved(Vec<Item>),
    /// A grounded caption: text with `<phrase>..</phrase>` tags (and the `<grounding>` prefix)
    /// and the boxes of each phrase, as HF's `Kosmos2Processor` takes them.
    Grounded {
        /// The image.
        image: ImageRef,
        /// Tagged text.
        text: String,
        /// Boxes per phrase, in order.
        boxes: Vec<PhraseBoxes>,
    },
    /// An instruction: the prompt is not scored, the response is.
    Instruction {
        /// The image the prompt is about, if any.
        image: Option<ImageRef>,
        /// The prompt.
        prompt: String,
        /// The response.
        response: String,
    },
}

impl Content {
    /// The images, in order.
    pub fn images(&self) -> Vec<&ImageRef> {
        match self {
            Self::Text(_) => vec![],
            Self::Caption { image, .. } | Self::Grounded { image, .. } => vec![image],
            Self::Instruction { image, .. } => image.iter().collect(),
            Self::Interleaved(items) => items
                .iter()
                .filter_map(|i| match i {
                    Item::Image(r) => Some(r),
                    Item::Text(_) => None,
                })
                .collect(),
        }
    }
}

/// One example with its origin.
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    /// Where it was read.
    pub location: Location,
    /// What it holds.
    pub content: Content,
}

/// Describes a JSON value for error messages ("string \"abc\"", "number 3", "array of 6").
pub fn describe(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("boolean {b}"),
        Value::Number(n) => format!("number {n}"),
        Value::String(s) if s.chars().count() > 40 => {
            format!("string \"{}...\"", s.chars().take(40).collect::<String>())
        }
        Value::String(s) => format!("string \"{s}\""),
        Value::Array(a) => format!("array of {}", a.len()),
        Value::Object(_) => "object".into(),
    }
}

/// Field access with `file:line` / key / expected / found errors.
pub(crate) struct Fields<'a> {
    pub(crate) object: &'a Map<String, Value>,
    pub(crate) location: &'a Location,
}

impl<'a> Fields<'a> {
    pub(crate) fn new(value: &'a Value, location: &'a Location) -> Result<Self, DataError> {
        match value {
            Value::Object(object) => Ok(Self { object, location }),
            other => Err(DataError::Field {
                location: location.clone(),
                key: "(record)".into(),
                expected: "a JSON object",
                found: describe(other),
            }),
        }
    }

    pub(crate) fn error(&self, key: &str, expected: &'static str, found: String) -> DataError {
        DataError::Field {
            location: self.location.clone(),
            key: key.into(),
            expected,
            found,
        }
    }

    pub(crate) fn opt_str(&self, key: &str) -> Result<Option<&'a str>, DataError> {
        match self.object.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(self.error(key, "a string", describe(other))),
        }
    }

    pub(crate) fn str(&self, key: &str) -> Result<&'a str, DataError> {
        self.opt_str(key)?
            .ok_or_else(|| self.error(key, "a string", "nothing (missing field)".into()))
    }

    /// The first present key of `keys` (aliases), as a string.
    pub(crate) fn str_alias(&self, keys: &[&str]) -> Result<&'a str, DataError> {
        for key in keys {
            if let Some(s) = self.opt_str(key)? {
                return Ok(s);
            }
        }
        Err(self.error(keys[0], "a string", "nothing (missing field)".into()))
    }

    pub(crate) fn opt_array(&self, key: &str) -> Result<&'a [Value], DataError> {
        match self.object.get(key) {
            None | Some(Value::Null) => Ok(&[]),
            Some(Value::Array(a)) => Ok(a),
            Some(other) => Err(self.error(key, "an array", describe(other))),
        }
    }
}

/// How a source turns a record's image reference into an [`ImageRef`]: called with the reference
/// (`None` when the record names none), the field's key (for errors) and whether the kind
/// requires an image; returns `None` only for an optional image that is absent.
pub type ImageResolver<'a> = dyn FnMut(Option<&str>, &str, bool) -> Result<Option<ImageRef>, DataError> + 'a;

/// Parse one record of `kind`.
pub fn parse_record(
    value: &Value,
    kind: SourceKind,
    grit_config: &GritConfig,
    location: &Location,
    resolve: &mut ImageResolver<'_>,
) -> Result<Content, DataError> {
    let f = Fields::new(value, location)?;
    let mut required = |reference: Option<&str>, key: &str| -> Result<ImageRef, DataError> {
        resolve(reference, key, true)?.ok_or_else(|| DataError::MissingImage {
            location: location.clone(),
            image: format!("({key})"),
        })
    };
    Ok(match kind {
        SourceKind::Text => Content::Text(f.str("text")?.to_string()),
        SourceKind::Caption => {
            let caption = f.str_alias(&["caption", "text"])?.to_string();
            Content::Caption {
                image: required(f.opt_str("image")?, "image")?,
                caption,
            }
        }
        SourceKind::Interleaved => {
            let items = f.opt_array("items")?;
            if items.is_empty() {
                return Err(f.error(
                    "items",
                    "a non-empty array",
                    describe(f.object.get("items").unwrap_or(&Value::Null)),
                ));
            }
            let mut out = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                let key = format!("items[{i}]");
                let expected = "an object with one string field, `text` or `image`";
                let Value::Object(o) = item else {
                    return Err(f.error(&key, expected, describe(item)));
                };
                match (o.get("text"), o.get("image")) {
                    (Some(Value::String(t)), None) => out.push(Item::Text(t.clone())),
                    (None, Some(Value::String(p))) => out.push(Item::Image(required(Some(p), &key)?)),
                    (Some(other), None) | (None, Some(other)) => {
                        return Err(f.error(&key, expected, describe(other)));
                    }
                    _ => return Err(f.error(&key, expected, format!("an object with keys {:?}", keys(o)))),
                }
            }
            Content::Interleaved(out)
        }
        SourceKind::Grit => {
            let record = GritRecord::from_fields(&f)?;
            let grounded = grit::ground(&record, grit_config).map_err(|message| DataError::Malformed {
                location: location.clone(),
                message,
            })?;
            Content::Grounded {
                image: required(f.opt_str("image")?, "image")?,
                text: grounded.text,
                boxes: grounded.boxes,
            }
        }
        SourceKind::Instruction => {
            let prompt = f.str("prompt")?.to_string();
            let response = f.str("response")?.to_string();
            let image = resolve(f.opt_str("image")?, "image", false)?;
            Content::Instruction {
                image,
                prompt,
                response,
            }
        }
    })
}

fn keys(o: &Map<String, Value>) -> Vec<&str> {
    o.keys().map(String::as_str).collect()
}
