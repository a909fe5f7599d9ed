//! The data loader: sources + mixture sampler + collator, yielding batches, with a resumable
//! state.
//!
//! Each batch draws examples from the [`MixtureSampler`], encodes them with the [`Collator`]
//! and places them with a [`Packer`]. A draw whose record fails (missing or undecodable image,
//! processor refusal) is skipped or stops the loader according to the source's `on_error`;
//! an example dropped by the overflow policy is skipped and counted. When a batch is full, the
//! example that did not fit is kept for the next batch, and [`DataLoader::state`] reports the
//! sampler state *before* that example, so that a restored loader draws it again: batches after
//! a restore are identical to the batches of an uninterrupted run.
//!
//! With `on_error = "fail"`, an error ends the batch being built; the examples already drawn for
//! it are not returned (the sampler has moved past them). Restore a saved state to retry.

use std::collections::VecDeque;

use kosmos_models::processor::Kosmos2Processor;
use kosmos_vision::preprocess::ImageProcessor;

use super::collate::{Batch, CollateConfig, Collator, Encoded, Packer};
use super::config::{DataConfig, OnError};
use super::error::DataError;
use super::sampler::{Draw, MixtureSampler, SamplerState};
use super::source::Source;

/// What the loader saves in a checkpoint.
pub type DataState = SamplerState;

/// Counters of what the loader left out.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LoaderStats {
    /// Draws so far (including skipped ones).
    pub drawn: u64,
    /// Draws skipped because of a record error (`on_error = "skip"`).
    pub skipped: u64,
    /// Examples dropped by the overflow policy (or with nothing to score).
    pub dropped: u64,
    /// Examples truncated to `max_len`.
    pub truncated: u64,
    /// The most recent skip reasons (at most 32).
    pub recent_errors: VecDeque<String>,
}

/// Sources, sampler and collator together.
pub struct DataLoader {
    config: DataConfig,
    sources: Vec<Source>,
    sampler: MixtureSampler,
    collator: Collator,
    pending: Option<(Encoded, SamplerState)>,
    stats: LoaderStats,
}

impl DataLoader {
    /// Open every source of `config` and set up the sampler and the collator.
    pub fn new(config: DataConfig, processor: Kosmos2Processor, images: ImageProcessor) -> Result<Self, DataError> {
        config.validate()?;
        let collator = Collator::new(processor, images, CollateConfig::from(&config))?;
        Self::with_collator(config, collator)
    }

    /// As [`DataLoader::new`] with a ready collator (its settings are replaced by the
    /// configuration's).
    pub fn with_collator(config: DataConfig, collator: Collator) -> Result<Self, DataError> {
        config.validate()?;
        let collator = collator.with_config(CollateConfig::from(&config))?;
        let sources = config
            .sources
            .iter()
            .map(|s| Source::open(s, config.on_error))
            .collect::<Result<Vec<_>, _>>()?;
        let entries: Vec<(String, f64, usize)> = sources
            .iter()
            .map(|s| (s.config().name.clone(), s.config().weight, s.len()))
            .collect();
        let sampler = MixtureSampler::new(config.seed, &entries)?;
        Ok(Self {
            config,
            sources,
            sampler,
            collator,
            pending: None,
            stats: LoaderStats::default(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &DataConfig {
        &self.config
    }

    /// The opened sources.
    pub fn sources(&self) -> &[Source] {
        &self.sources
    }

    /// The collator.
    pub fn collator(&self) -> &Collator {
        &self.collator
    }

    /// What was left out so far.
    pub fn stats(&self) -> &LoaderStats {
        &self.stats
    }

    /// The state to store in a checkpoint.
    pub fn state(&self) -> DataState {
        match &self.pending {
            Some((_, before)) => before.clone(),
            None => self.sampler.state(),
        }
    }

    /// Continue from a stored state (see [`MixtureSampler::restore`]).
    pub fn restore(&mut self, state: &DataState) -> Result<(), DataError> {
        self.sampler.restore(state)?;
        self.pending = None;
        Ok(())
    }

    fn note(&mut self, e: String) {
        if self.stats.recent_errors.len() == 32 {
            self.stats.recent_errors.pop_front();
        }
        self.stats.recent_errors.push_back(e);
    }

    /// Draw and encode the next usable example; also returns the draw and the sampler state
    /// before it.
    pub fn next_example(&mut self) -> Result<(Draw, Encoded, SamplerState), DataError> {
        let mut consecutive = 0;
        loop {
            let before = self.sampler.state();
            let draw = self.sampler.next_draw();
            self.stats.drawn += 1;
            let source = &self.sources[draw.source];
            let on_error = source.config().on_error.unwrap_or(self.config.on_error);
            let example = source
                .get(draw.index)
                .ok_or_else(|| DataError::State("draw out of range".into()))?;
            let error = match self.collator.encode(example) {
                Ok(Some(e)) => {
                    self.stats.truncated += e.truncated as u64;
                    return Ok((draw, e, before));
                }
                Ok(None) => {
                    self.stats.dropped += 1;
                    DataError::TooLong {
                        location: example.location.clone(),
                        length: 0,
                        max_len: self.config.max_len,
                    }
                }
                Err(e) if on_error == OnError::Skip && e.is_record_error() => {
                    self.stats.skipped += 1;
                    self.note(e.to_string());
                    e
                }
                Err(e) => return Err(e),
            };
            consecutive += 1;
            if consecutive >= self.config.max_consecutive_skips.max(1) {
                return Err(DataError::TooManySkips {
                    count: consecutive,
                    last: Box::new(error),
                });
            }
        }
    }

    /// The next batch of `batch_size` rows (with packing, rows may hold several documents).
    pub fn next_batch(&mut self, batch_size: usize) -> Result<Batch, DataError> {
        let rows = self.next_rows(batch_size)?;
        self.collate(rows)
    }

    /// The rows of the next batch of `batch_size` rows, not yet collated (each row one example,
    /// or several packed ones); [`DataLoader::collate`] makes them a batch. Drawing the rows of
    /// several batches first and regrouping them (see [`crate::data::balance`]) changes which
    /// micro-batch holds a row, not what is drawn.
    pub fn next_rows(&mut self, batch_size: usize) -> Result<Vec<Vec<Encoded>>, DataError> {
        let mut packer = Packer::new(self.config.max_len, batch_size.max(1), self.config.packing);
        loop {
            if packer.rows_full() && !self.config.packing {
                break;
            }
            let (encoded, before) = match self.pending.take() {
                Some(p) => p,
                None => {
                    let (_, e, before) = self.next_example()?;
                    (e, before)
                }
            };
            if let Err(back) = packer.push(encoded) {
                self.pending = Some((*back, before));
                break;
            }
        }
        Ok(packer.into_rows())
    }

    /// Collate rows (from [`DataLoader::next_rows`]) into a right-padded batch.
    pub fn collate(&self, rows: Vec<Vec<Encoded>>) -> Result<Batch, DataError> {
        self.collator.collate(rows)
    }
}
