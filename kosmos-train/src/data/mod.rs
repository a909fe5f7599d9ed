//! The data layer of the training engine.
//!
//! * [`config`]: [`DataConfig`], the serde configuration (sources with kind, format, paths,
//!   weight, image root, GRIT settings, error and overflow policies, `max_len`, packing);
//! * [`record`]: the record layouts of the five source kinds and the [`Example`]s they become;
//! * [`grit`]: GRIT grounded captions (spans, boxes, scores) to `<phrase>` markup and boxes;
//! * [`source`]: reading JSONL manifests and WebDataset-style tar shards;
//! * [`collate`]: token ids, labels (image slots, padding and instruction prompts ignored),
//!   image-position masks, truncation, packing, batches and tensors;
//! * [`sampler`]: the weighted, seeded, resumable mixture sampler;
//! * [`balance`]: a step's rows regrouped into micro-batches of about equal cost (less padding);
//! * [`loader`]: everything together, batch by batch, with a checkpointable state;
//! * [`error`]: [`DataError`], naming `file:line` (or `shard.tar[member]`), key, expected and
//!   found.

pub mod balance;
pub mod collate;
pub mod config;
pub mod error;
pub mod grit;
pub mod loader;
pub mod record;
pub mod sampler;
pub mod source;

pub use balance::balance;
pub use collate::{Batch, CollateConfig, Collator, Encoded, Packer, TensorBatch, pack};
pub use config::{DataConfig, GritConfig, OnError, Overflow, SourceConfig, SourceFormat, SourceKind};
pub use error::{DataError, Location};
pub use grit::{GritEntry, GritRecord, GroundedCaption, GroundedPhrase, ground, select_phrases};
pub use loader::{DataLoader, DataState, LoaderStats};
pub use record::{Content, Example, ImageRef, Item};
pub use sampler::{Draw, MixtureSampler, SamplerState, SourceCursor};
pub use source::Source;
