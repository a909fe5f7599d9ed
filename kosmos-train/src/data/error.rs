//! Errors of the data layer. Every error names where it comes from: `file:line` for a JSONL
//! manifest, `shard.tar[member]` for a tar shard, and the key, the expected and the found value
//! for a bad field.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Where a record comes from: a manifest line or a tar member.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Location {
    /// The manifest or shard file.
    pub file: PathBuf,
    /// 1-based line of a JSONL manifest.
    pub line: Option<usize>,
    /// Member (or sample key) of a tar shard.
    pub member: Option<Box<str>>,
}

impl Location {
    /// A JSONL line.
    pub fn line(file: impl Into<PathBuf>, line: usize) -> Self {
        Self {
            file: file.into(),
            line: Some(line),
            member: None,
        }
    }

    /// A tar member.
    pub fn member(file: impl Into<PathBuf>, member: impl Into<String>) -> Self {
        Self {
            file: file.into(),
            line: None,
            member: Some(member.into().into_boxed_str()),
        }
    }

    /// A whole file.
    pub fn file(file: impl Into<PathBuf>) -> Self {
        Self {
            file: file.into(),
            line: None,
            member: None,
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(member) = &self.member {
            write!(f, "[{member}]")?;
        }
        Ok(())
    }
}

/// Data-layer errors.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file could not be read (or a tar shard is corrupt).
    #[error("{location}: cannot read: {source}")]
    Io {
        /// The file (and line or member when known).
        location: Location,
        /// The OS or archive error.
        #[source]
        source: std::io::Error,
    },
    /// A line or member is not a well-formed record (bad JSON, wrong structure).
    #[error("{location}: malformed record: {message}")]
    Malformed {
        /// Where.
        location: Location,
        /// What is wrong.
        message: String,
    },
    /// A field has the wrong type or value.
    #[error("{location}: field `{key}`: expected {expected}, found {found}")]
    Field {
        /// Where.
        location: Location,
        /// The field, e.g. `noun_chunks[2]`.
        key: String,
        /// What was expected.
        expected: &'static str,
        /// What was found.
        found: String,
    },
    /// A referenced image does not exist.
    #[error("{location}: image `{image}` not found")]
    MissingImage {
        /// The record that references it.
        location: Location,
        /// The image path or member.
        image: String,
    },
    /// A referenced image could not be decoded.
    #[error("{location}: image `{image}`: {source}")]
    Image {
        /// The record that references it.
        location: Location,
        /// The image path or member.
        image: String,
        /// The decoder's error.
        #[source]
        source: Box<kosmos_vision::ImageError>,
    },
    /// The processor refused the record's text (e.g. phrases and boxes do not match).
    #[error("{location}: {source}")]
    Processor {
        /// The record.
        location: Location,
        /// The processor's error.
        #[source]
        source: Box<kosmos_models::processor::ProcessorError>,
    },
    /// A record is longer than `max_len` and the overflow policy refuses it.
    #[error("{location}: {length} tokens, more than max_len {max_len}")]
    TooLong {
        /// The record.
        location: Location,
        /// Its length in tokens.
        length: usize,
        /// The limit.
        max_len: usize,
    },
    /// A source cannot be used (no files, no valid records).
    #[error("source `{name}`: {message}")]
    Source {
        /// The source's name.
        name: String,
        /// What is wrong.
        message: String,
    },
    /// An invalid configuration.
    #[error("invalid data configuration: {0}")]
    Config(String),
    /// A sampler state that does not fit the sources.
    #[error("cannot restore the sampler state: {0}")]
    State(String),
    /// Too many examples in a row were skipped.
    #[error("{count} consecutive examples were skipped; the last one: {last}")]
    TooManySkips {
        /// How many.
        count: usize,
        /// The last error.
        last: Box<DataError>,
    },
}

impl DataError {
    /// The location of the record the error is about, if it is about one.
    pub fn location(&self) -> Option<&Location> {
        match self {
            Self::Io { location, .. }
            | Self::Malformed { location, .. }
            | Self::Field { location, .. }
            | Self::MissingImage { location, .. }
            | Self::Image { location, .. }
            | Self::Processor { location, .. }
            | Self::TooLong { location, .. } => Some(location),
            _ => None,
        }
    }

    /// Whether [`OnError::Skip`](crate::data::OnError::Skip) may skip it: errors about one record
    /// or one image (not configuration, state or whole-source errors).
    pub fn is_record_error(&self) -> bool {
        matches!(
            self,
            Self::Malformed { .. }
                | Self::Field { .. }
                | Self::MissingImage { .. }
                | Self::Image { .. }
                | Self::Processor { .. }
                | Self::TooLong { .. }
        ) || matches!(self, Self::Io { location, .. } if location.line.is_some() || location.member.is_some())
    }
}
