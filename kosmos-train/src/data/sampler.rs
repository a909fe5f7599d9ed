//! The mixture sampler: draws `(source, example)` pairs by weight, deterministically from a seed,
//! and resumes exactly from a saved [`SamplerState`].
//!
//! * Draw number `p` (the sampler's position) picks its source from a uniform number that is a
//!   pure function of `(seed, p)` (SplitMix64 hashing), compared with the cumulative normalised
//!   weights; so the source sequence does not depend on anything but the seed and the weights.
//! * Each source walks through its examples epoch by epoch; epoch `e` of source `s` is a
//!   Fisher-Yates permutation seeded from `(seed, name of s, e)`. A source's cursor (how many
//!   examples it has yielded) fixes its epoch and offset.
//! * The state is the seed, the position and every source's cursor (by name, with the source's
//!   size so that a changed data set is refused rather than silently reshuffled).
//!
//! The generator is implemented here (SplitMix64, Lemire's multiply-shift for ranges) so that
//! the sequence cannot change with a dependency's version.

use serde::{Deserialize, Serialize};

use super::error::DataError;

/// SplitMix64's finaliser: a bijective 64-bit mix.
pub fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a hash of a string (stable across runs and platforms).
pub fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01B3)
    })
}

/// A small deterministic generator (SplitMix64).
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// Seeded generator.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix64(self.0.wrapping_sub(0x9E37_79B9_7F4A_7C15))
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }
}

/// The permutation of `0..len` used for `epoch` of the source `name`.
pub fn epoch_permutation(seed: u64, name: &str, epoch: u64, len: usize) -> Vec<u32> {
    let mut rng = SplitMix64::new(mix64(seed ^ mix64(fnv1a(name) ^ mix64(epoch))));
    let mut perm: Vec<u32> = (0..len as u32).collect();
    for i in (1..len).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        perm.swap(i, j);
    }
    perm
}

/// One source's cursor in a [`SamplerState`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceCursor {
    /// The source's name.
    pub name: String,
    /// Its number of examples when the state was saved.
    pub len: u64,
    /// How many examples it has yielded.
    pub consumed: u64,
}

/// Everything needed to resume the sampler (store it in a checkpoint).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SamplerState {
    /// The seed.
    pub seed: u64,
    /// Number of draws so far.
    pub position: u64,
    /// Cursors of the sources.
    pub sources: Vec<SourceCursor>,
}

/// One draw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Draw {
    /// Index of the source (configuration order).
    pub source: usize,
    /// Index of the example within the source.
    pub index: usize,
    /// The source's epoch the example belongs to.
    pub epoch: u64,
    /// The sampler position of this draw.
    pub position: u64,
}

/// Weighted, seeded, resumable sampling over several sources.
#[derive(Clone, Debug)]
pub struct MixtureSampler {
    seed: u64,
    names: Vec<String>,
    lens: Vec<usize>,
    cumulative: Vec<f64>,
    consumed: Vec<u64>,
    position: u64,
    permutations: Vec<Option<(u64, Vec<u32>)>>,
}

impl MixtureSampler {
    /// A sampler over `(name, weight, number of examples)` sources.
    pub fn new(seed: u64, sources: &[(String, f64, usize)]) -> Result<Self, DataError> {
        if sources.is_empty() {
            return Err(DataError::Config("the sampler needs at least one source".into()));
        }
        if let Some((name, ..)) = sources
            .iter()
            .find(|(_, w, n)| !(w.is_finite() && *w >= 0.0) || *n == 0)
        {
            return Err(DataError::Config(format!(
                "source `{name}`: weights must be finite and >= 0 and sources non-empty"
            )));
        }
        let total: f64 = sources.iter().map(|s| s.1).sum();
        if total <= 0.0 {
            return Err(DataError::Config("every source has weight 0".into()));
        }
        let mut acc = 0.0;
        let mut cumulative: Vec<f64> = sources
            .iter()
            .map(|s| {
                acc += s.1 / total;
                acc
            })
            .collect();
        // Guard the last positive-weight source against rounding (acc may be 0.9999999).
        if let Some(last) = sources.iter().rposition(|s| s.1 > 0.0) {
            for c in &mut cumulative[last..] {
                *c = f64::INFINITY;
            }
        }
        Ok(Self {
            seed,
            names: sources.iter().map(|s| s.0.clone()).collect(),
            lens: sources.iter().map(|s| s.2).collect(),
            cumulative,
            consumed: vec![0; sources.len()],
            position: 0,
            permutations: vec![None; sources.len()],
        })
    }

    /// Number of draws so far.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// The source drawn at `position` (a pure function of the seed, the weights and `position`).
    pub fn source_at(&self, position: u64) -> usize {
        let bits = mix64(self.seed ^ mix64(position ^ 0x6D69_7874_7572_6521));
        let u = (bits >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
        self.cumulative
            .iter()
            .position(|&c| u < c)
            .unwrap_or(self.cumulative.len() - 1)
    }

    /// Draw the next example.
    pub fn next_draw(&mut self) -> Draw {
        let position = self.position;
        let source = self.source_at(position);
        let len = self.lens[source] as u64;
        let consumed = self.consumed[source];
        let (epoch, offset) = (consumed / len, consumed % len);
        let cached = matches!(&self.permutations[source], Some((e, _)) if *e == epoch);
        if !cached {
            let perm = epoch_permutation(self.seed, &self.names[source], epoch, len as usize);
            self.permutations[source] = Some((epoch, perm));
        }
        let index = self.permutations[source]
            .as_ref()
            .map_or(0, |(_, p)| p[offset as usize]) as usize;
        self.consumed[source] += 1;
        self.position += 1;
        Draw {
            source,
            index,
            epoch,
            position,
        }
    }

    /// The state to save.
    pub fn state(&self) -> SamplerState {
        SamplerState {
            seed: self.seed,
            position: self.position,
            sources: self
                .names
                .iter()
                .zip(&self.lens)
                .zip(&self.consumed)
                .map(|((name, &len), &consumed)| SourceCursor {
                    name: name.clone(),
                    len: len as u64,
                    consumed,
                })
                .collect(),
        }
    }

    /// Continue from a saved state. The seed must be the same and every source must be in the
    /// state with the same size (sources may be listed in another order); a source missing from
    /// the state, or one the state has but the sampler does not, is refused.
    pub fn restore(&mut self, state: &SamplerState) -> Result<(), DataError> {
        if state.seed != self.seed {
            return Err(DataError::State(format!(
                "saved with seed {}, the sampler has seed {}",
                state.seed, self.seed
            )));
        }
        if state.sources.len() != self.names.len() {
            return Err(DataError::State(format!(
                "saved with {} sources, the sampler has {}",
                state.sources.len(),
                self.names.len()
            )));
        }
        let mut consumed = vec![0; self.names.len()];
        let mut seen = vec![false; self.names.len()];
        for cursor in &state.sources {
            let i = self
                .names
                .iter()
                .position(|n| *n == cursor.name)
                .ok_or_else(|| DataError::State(format!("unknown source `{}`", cursor.name)))?;
            if cursor.len != self.lens[i] as u64 {
                return Err(DataError::State(format!(
                    "source `{}` had {} examples when saved, it has {} now",
                    cursor.name, cursor.len, self.lens[i]
                )));
            }
            if std::mem::replace(&mut seen[i], true) {
                return Err(DataError::State(format!("source `{}` appears twice", cursor.name)));
            }
            consumed[i] = cursor.consumed;
        }
        self.consumed = consumed;
        self.position = state.position;
        Ok(())
    }
}
