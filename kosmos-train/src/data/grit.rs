//! GRIT grounded captions (the KOSMOS-2 paper's GRIT-20M record format) to the input of
//! `Kosmos2Processor`: text with `<phrase>..</phrase>` tags plus the boxes of every phrase — the
//! same `text` + `bboxes` pair that transformers' processor takes, so that the processor then
//! writes `<object><patch_index_a><patch_index_b>..</object>` after each phrase.
//!
//! A record has a `caption` and two lists of entries, `noun_chunks` and `ref_exps`, each entry
//! `[start, end, x1, y1, x2, y2, score]`: a character span of the caption (Python string
//! indices, i.e. Unicode scalar values, end exclusive), a box normalised to `[0, 1]` (`xyxy`) and
//! the detector's confidence.
//!
//! The conversion, step by step (the parity script `scripts/make_train_data_fixtures.py` does the
//! same in a few lines of Python):
//!
//! 1. **Entries**: the noun chunks, then (with `use_ref_exps`) the referring expressions.
//! 2. **Threshold**: keep entries with `score >= score_threshold`. Only kept entries are checked
//!    further: the span must lie inside the caption with `start < end`; box coordinates are
//!    clamped to `[0, 1]` and must then satisfy `x2 > x1`, `y2 > y1`.
//! 3. **Several boxes per phrase**: kept entries with the same span form one phrase; its boxes
//!    are in entry order, exact duplicates dropped; its score is the highest of its entries.
//! 4. **Overlaps**: phrases are visited by descending score, then ascending start, then
//!    descending end (longer first); a phrase whose span overlaps an already accepted one
//!    (`a.start < b.end && b.start < a.end`) is dropped. Nested spans therefore lose to the
//!    more confident span, whichever is longer.
//! 5. **Markup**: accepted phrases in text order; `<phrase>` goes before the spaces that precede
//!    the span (so the phrase reads `<phrase> a dog</phrase>`, as KOSMOS-2 writes it), `</phrase>`
//!    right after the span; the text starts with `<grounding>` when `grounding_prefix` is set.

use kosmos_models::grounding::BoxXyxy;
use kosmos_models::processor::PhraseBoxes;
use serde_json::Value;

use super::config::GritConfig;
use super::error::DataError;
use super::record::{Fields, describe};

/// One GRIT entry.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GritEntry {
    /// First character of the span.
    pub start: usize,
    /// One past the last character.
    pub end: usize,
    /// Normalised `(x1, y1, x2, y2)`.
    pub bbox: BoxXyxy,
    /// Detector confidence.
    pub score: f64,
}

/// A GRIT record (the fields the conversion uses).
#[derive(Clone, Debug, PartialEq)]
pub struct GritRecord {
    /// The caption.
    pub caption: String,
    /// Noun-chunk entries.
    pub noun_chunks: Vec<GritEntry>,
    /// Referring-expression entries.
    pub ref_exps: Vec<GritEntry>,
}

/// An accepted phrase.
#[derive(Clone, Debug, PartialEq)]
pub struct GroundedPhrase {
    /// Character span in the caption.
    pub span: (usize, usize),
    /// Its boxes (clamped), in entry order.
    pub boxes: Vec<BoxXyxy>,
    /// The highest score of its entries.
    pub score: f64,
}

/// The conversion's result.
#[derive(Clone, Debug, PartialEq)]
pub struct GroundedCaption {
    /// Text with `<phrase>` tags (and the `<grounding>` prefix).
    pub text: String,
    /// Boxes per phrase, in text order (the processor's `boxes`).
    pub boxes: Vec<PhraseBoxes>,
    /// The accepted phrases, in text order.
    pub phrases: Vec<GroundedPhrase>,
}

const ENTRY_LAYOUT: &str = "[start, end, x1, y1, x2, y2, score] (7 finite numbers, integral non-negative span)";

fn parse_entries(f: &Fields<'_>, key: &str) -> Result<Vec<GritEntry>, DataError> {
    let mut out = Vec::new();
    for (i, v) in f.opt_array(key)?.iter().enumerate() {
        let k = format!("{key}[{i}]");
        let nums: Option<Vec<f64>> = match v {
            Value::Array(a) if a.len() == 7 => a.iter().map(Value::as_f64).collect(),
            _ => None,
        };
        let nums = nums
            .filter(|n| n.iter().all(|x| x.is_finite()))
            .ok_or_else(|| f.error(&k, ENTRY_LAYOUT, describe(v)))?;
        let span_ok = |x: f64| x >= 0.0 && x.fract() == 0.0 && x < u32::MAX as f64;
        if !span_ok(nums[0]) || !span_ok(nums[1]) {
            return Err(f.error(&k, ENTRY_LAYOUT, format!("span [{}, {}]", nums[0], nums[1])));
        }
        out.push(GritEntry {
            start: nums[0] as usize,
            end: nums[1] as usize,
            bbox: [nums[2], nums[3], nums[4], nums[5]],
            score: nums[6],
        });
    }
    Ok(out)
}

impl GritRecord {
    /// Read `caption`, `noun_chunks` and `ref_exps` (missing lists are empty).
    pub fn from_json(value: &Value, location: &super::Location) -> Result<Self, DataError> {
        Self::from_fields(&Fields::new(value, location)?)
    }

    pub(crate) fn from_fields(f: &Fields<'_>) -> Result<Self, DataError> {
        Ok(Self {
            caption: f.str("caption")?.to_string(),
            noun_chunks: parse_entries(f, "noun_chunks")?,
            ref_exps: parse_entries(f, "ref_exps")?,
        })
    }
}

/// The phrases the conversion keeps (steps 1-4), in text order.
pub fn select_phrases(record: &GritRecord, config: &GritConfig) -> Result<Vec<GroundedPhrase>, String> {
    let n_chars = record.caption.chars().count();
    let lists: &[(&str, &[GritEntry])] = if config.use_ref_exps {
        &[("noun_chunks", &record.noun_chunks), ("ref_exps", &record.ref_exps)]
    } else {
        &[("noun_chunks", &record.noun_chunks)]
    };
    let mut groups: Vec<GroundedPhrase> = Vec::new();
    for (name, entries) in lists {
        for (i, e) in entries.iter().enumerate() {
            if e.score < config.score_threshold {
                continue;
            }
            if !(e.start < e.end && e.end <= n_chars) {
                return Err(format!(
                    "{name}[{i}]: span [{}, {}) is not inside the caption's {n_chars} characters",
                    e.start, e.end
                ));
            }
            let b = e.bbox.map(|x| x.clamp(0.0, 1.0));
            if !(b[2] > b[0] && b[3] > b[1]) {
                return Err(format!(
                    "{name}[{i}]: box {:?} (clamped to [0, 1]) must have x2 > x1 and y2 > y1",
                    e.bbox
                ));
            }
            match groups.iter_mut().find(|g| g.span == (e.start, e.end)) {
                Some(g) => {
                    if !g.boxes.contains(&b) {
                        g.boxes.push(b);
                    }
                    g.score = g.score.max(e.score);
                }
                None => groups.push(GroundedPhrase {
                    span: (e.start, e.end),
                    boxes: vec![b],
                    score: e.score,
                }),
            }
        }
    }
    let mut order: Vec<&GroundedPhrase> = groups.iter().collect();
    order.sort_by(|a, b| {
        b.score
            .total_cmp(&a.score)
            .then(a.span.0.cmp(&b.span.0))
            .then(b.span.1.cmp(&a.span.1))
    });
    let mut kept: Vec<GroundedPhrase> = Vec::new();
    for g in order {
        if kept.iter().all(|k| !(g.span.0 < k.span.1 && k.span.0 < g.span.1)) {
            kept.push(g.clone());
        }
    }
    kept.sort_by_key(|g| g.span.0);
    Ok(kept)
}

/// Convert a GRIT record (all five steps).
pub fn ground(record: &GritRecord, config: &GritConfig) -> Result<GroundedCaption, String> {
    let phrases = select_phrases(record, config)?;
    let caption = &record.caption;
    let chars: Vec<(usize, char)> = caption.char_indices().collect();
    let byte_at = |c: usize| chars.get(c).map_or(caption.len(), |&(b, _)| b);
    let mut text = String::with_capacity(caption.len() + 24 * phrases.len() + 12);
    if config.grounding_prefix {
        text.push_str("<grounding>");
    }
    let mut pos = 0;
    for p in &phrases {
        let mut start = p.span.0;
        while start > pos && chars[start - 1].1 == ' ' {
            start -= 1;
        }
        text.push_str(&caption[byte_at(pos)..byte_at(start)]);
        text.push_str("<phrase>");
        text.push_str(&caption[byte_at(start)..byte_at(p.span.1)]);
        text.push_str("</phrase>");
        pos = p.span.1;
    }
    text.push_str(&caption[byte_at(pos)..]);
    let boxes = phrases.iter().map(|p| PhraseBoxes::Coords(p.boxes.clone())).collect();
    Ok(GroundedCaption { text, boxes, phrases })
}
