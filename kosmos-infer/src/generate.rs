//! Text generation for KOSMOS-2: greedy search, seeded sampling (temperature, top-k, top-p),
//! beam search with length penalty, repetition penalty and n-gram blocking, EOS and extra stop
//! tokens, batches with left padding, and a per-token streaming callback.
//!
//! The decoding loops follow transformers 5.24 `GenerationMixin` (`_sample` and the vectorised
//! `_beam_search` of `generation/utils.py`) step for step, so that greedy and beam search give
//! the same tokens as `generate()` (checked against fixtures from
//! `scripts/make_generate_fixtures.py`). Sampling is reproducible from a seed but uses our own
//! random stream (ChaCha8), not PyTorch's.
//!
//! Positions: the prompt is run once (prefill) and each new token then extends the KV cache,
//! whose appends touch one 64-slot chunk (see [`kosmos_core::KvCache`]). Like transformers, a cached
//! step places its token at `cache length + 2`; the cache length counts a left-padded row's pads,
//! so on padded rows the positions jump by the number of pads after the prompt. This is
//! transformers' behaviour and is reproduced for parity. With `use_cache = false` every step
//! recomputes the whole sequence, whose positions skip pads; both agree on unpadded rows.

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use burn::prelude::*;
use burn::tensor::TensorData;
use kosmos_core::DecoderCache;
use kosmos_models::{Kosmos2, Kosmos2Error, Kosmos2Input, int_rows};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;

use crate::logits::{LogitsPipeline, log_softmax, softmax};

/// Maximum number of new tokens when neither the options nor `generation_config.json` set one
/// (the value of the KOSMOS-2 demo).
pub const DEFAULT_MAX_NEW_TOKENS: usize = 128;

/// When beam search stops (transformers' `early_stopping`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EarlyStopping {
    /// `False` (the default): stop when the best running beam, scored at the current length,
    /// cannot beat the worst finished one.
    #[default]
    Heuristic,
    /// `True`: stop as soon as `num_beams` hypotheses are finished.
    Always,
    /// `"never"`: the canonical criterion (best running beam scored at the maximum length when
    /// the length penalty is positive).
    Never,
}

/// Decoding parameters. The defaults are greedy search without penalties; the field names and
/// meanings are those of transformers' `GenerationConfig`, whose `generation_config.json` can
/// be read with [`GenerationConfig::from_json_file`].
#[derive(Clone, Debug, PartialEq)]
pub struct GenerationConfig {
    /// New tokens to generate at most (`None`: `max_length` if set, else
    /// [`DEFAULT_MAX_NEW_TOKENS`]).
    pub max_new_tokens: Option<usize>,
    /// Total length (prompt + new) at most, used only when `max_new_tokens` is `None`.
    pub max_length: Option<usize>,
    /// EOS is forbidden until this many tokens were generated.
    pub min_new_tokens: usize,
    /// Sample instead of taking the most likely token.
    pub do_sample: bool,
    /// Sampling temperature (applied only when sampling).
    pub temperature: f32,
    /// Keep the `k` most likely tokens when sampling (0 = off; transformers' default 50).
    pub top_k: usize,
    /// Nucleus sampling mass (1 = off).
    pub top_p: f64,
    /// Beams (1 = no beam search).
    pub num_beams: usize,
    /// Exponent of the length normalisation of finished beams (`score / len^penalty`).
    pub length_penalty: f32,
    /// Beam-search stopping rule.
    pub early_stopping: EarlyStopping,
    /// Sequences returned per input row (at most `num_beams`; 1 without beams).
    pub num_return_sequences: usize,
    /// Repetition penalty (1 = off).
    pub repetition_penalty: f32,
    /// Forbid repeating any n-gram of this size (0 = off; the KOSMOS-2 demo used 3).
    pub no_repeat_ngram_size: usize,
    /// Tokens that end a sequence (EOS plus any stop tokens).
    pub eos_token_ids: Vec<u32>,
    /// Token appended to finished rows of a batch (`None`: the first EOS id).
    pub pad_token_id: Option<u32>,
    /// Seed of the sampling stream.
    pub seed: u64,
    /// Reuse keys and values of earlier tokens (off: recompute the whole sequence each step).
    pub use_cache: bool,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: None,
            max_length: None,
            min_new_tokens: 0,
            do_sample: false,
            temperature: 1.0,
            top_k: 50,
            top_p: 1.0,
            num_beams: 1,
            length_penalty: 1.0,
            early_stopping: EarlyStopping::Heuristic,
            num_return_sequences: 1,
            repetition_penalty: 1.0,
            no_repeat_ngram_size: 0,
            eos_token_ids: vec![2],
            pad_token_id: Some(1),
            seed: 0,
            use_cache: true,
        }
    }
}

/// Why generation could not run.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// A parameter is out of range.
    #[error("invalid generation option: {0}")]
    Config(String),
    /// `generation_config.json` could not be read.
    #[error("`{path}`: {message}")]
    File {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// The model rejected the inputs.
    #[error(transparent)]
    Model(#[from] Kosmos2Error),
}

fn ids_field(v: &Value) -> Option<Vec<u32>> {
    match v {
        Value::Number(n) => n.as_u64().map(|x| vec![x as u32]),
        Value::Array(a) => a.iter().map(|x| x.as_u64().map(|x| x as u32)).collect(),
        _ => None,
    }
}

impl GenerationConfig {
    /// Greedy search for at most `max_new_tokens` new tokens.
    pub fn greedy(max_new_tokens: usize) -> Self {
        Self {
            max_new_tokens: Some(max_new_tokens),
            ..Self::default()
        }
    }

    /// Override the defaults with the keys of a transformers `generation_config.json` (unknown
    /// keys are ignored, as transformers does).
    pub fn from_json_file(path: impl AsRef<Path>) -> Result<Self, GenerateError> {
        let path = path.as_ref();
        let err = |message: String| GenerateError::File {
            path: path.display().to_string(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let json: Value = serde_json::from_str(&text).map_err(|e| err(format!("not valid JSON: {e}")))?;
        Self::default().with_json(&json).map_err(|e| err(e.to_string()))
    }

    /// Defaults for a model directory: its `generation_config.json` when present, else the
    /// special ids of its `config.json` (`text_config.eos_token_id`, `pad_token_id`).
    pub fn for_model_dir(dir: impl AsRef<Path>) -> Result<Self, GenerateError> {
        let dir = dir.as_ref();
        let gen_path = dir.join("generation_config.json");
        if gen_path.is_file() {
            return Self::from_json_file(gen_path);
        }
        let config = dir.join("config.json");
        let mut out = Self::default();
        if let Ok(text) = std::fs::read_to_string(&config)
            && let Ok(json) = serde_json::from_str::<Value>(&text)
        {
            let t = &json["text_config"];
            if let Some(eos) = ids_field(&t["eos_token_id"]) {
                out.eos_token_ids = eos;
            }
            if let Some(pad) = t["pad_token_id"].as_u64() {
                out.pad_token_id = Some(pad as u32);
            }
        }
        Ok(out)
    }

    /// Apply the keys of a `generation_config.json` object.
    pub fn with_json(mut self, json: &Value) -> Result<Self, GenerateError> {
        let bad = |key: &str, v: &Value| GenerateError::Config(format!("`{key}` has an unexpected value {v}"));
        let uint = |key: &str| -> Result<Option<usize>, GenerateError> {
            match &json[key] {
                Value::Null => Ok(None),
                v => v.as_u64().map(|x| Some(x as usize)).ok_or_else(|| bad(key, v)),
            }
        };
        let float = |key: &str| -> Result<Option<f64>, GenerateError> {
            match &json[key] {
                Value::Null => Ok(None),
                v => v.as_f64().map(Some).ok_or_else(|| bad(key, v)),
            }
        };
        if let Some(v) = uint("max_new_tokens")? {
            self.max_new_tokens = Some(v);
        }
        if let Some(v) = uint("max_length")? {
            self.max_length = Some(v);
        }
        if let Some(v) = uint("min_new_tokens")? {
            self.min_new_tokens = v;
        }
        if let Some(v) = json["do_sample"].as_bool() {
            self.do_sample = v;
        }
        if let Some(v) = float("temperature")? {
            self.temperature = v as f32;
        }
        if let Some(v) = uint("top_k")? {
            self.top_k = v;
        }
        if let Some(v) = float("top_p")? {
            self.top_p = v;
        }
        if let Some(v) = uint("num_beams")? {
            self.num_beams = v;
        }
        if let Some(v) = float("length_penalty")? {
            self.length_penalty = v as f32;
        }
        match &json["early_stopping"] {
            Value::Null => {}
            Value::Bool(true) => self.early_stopping = EarlyStopping::Always,
            Value::Bool(false) => self.early_stopping = EarlyStopping::Heuristic,
            Value::String(s) if s == "never" => self.early_stopping = EarlyStopping::Never,
            v => return Err(bad("early_stopping", v)),
        }
        if let Some(v) = uint("num_return_sequences")? {
            self.num_return_sequences = v;
        }
        if let Some(v) = float("repetition_penalty")? {
            self.repetition_penalty = v as f32;
        }
        if let Some(v) = uint("no_repeat_ngram_size")? {
            self.no_repeat_ngram_size = v;
        }
        match &json["eos_token_id"] {
            Value::Null => {}
            v => self.eos_token_ids = ids_field(v).ok_or_else(|| bad("eos_token_id", v))?,
        }
        if let Some(v) = uint("pad_token_id")? {
            self.pad_token_id = Some(v as u32);
        }
        if let Some(v) = json["use_cache"].as_bool() {
            self.use_cache = v;
        }
        Ok(self)
    }

    /// New tokens allowed after a prompt of `prompt_len` tokens.
    pub fn max_new_for(&self, prompt_len: usize) -> usize {
        match (self.max_new_tokens, self.max_length) {
            (Some(n), _) => n,
            (None, Some(total)) => total.saturating_sub(prompt_len),
            (None, None) => DEFAULT_MAX_NEW_TOKENS,
        }
    }

    /// Check the parameters' ranges.
    pub fn validate(&self) -> Result<(), GenerateError> {
        let fail = |m: String| Err(GenerateError::Config(m));
        if self.num_beams == 0 {
            return fail("num_beams must be at least 1".into());
        }
        if self.num_return_sequences == 0 || self.num_return_sequences > self.num_beams {
            return fail(format!(
                "num_return_sequences ({}) must be between 1 and num_beams ({})",
                self.num_return_sequences, self.num_beams
            ));
        }
        if self.do_sample && self.num_beams > 1 {
            return fail("beam sampling (do_sample with num_beams > 1) is not supported".into());
        }
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return fail(format!("temperature must be positive, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return fail(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return fail(format!(
                "repetition_penalty must be positive, got {}",
                self.repetition_penalty
            ));
        }
        if !self.length_penalty.is_finite() {
            return fail(format!("length_penalty must be finite, got {}", self.length_penalty));
        }
        Ok(())
    }

    /// The logits processors these parameters ask for.
    pub fn pipeline(&self) -> LogitsPipeline {
        LogitsPipeline {
            min_new_tokens: self.min_new_tokens,
            eos_token_ids: self.eos_token_ids.clone(),
            repetition_penalty: self.repetition_penalty,
            no_repeat_ngram_size: self.no_repeat_ngram_size,
            sample: self.do_sample,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
        }
    }

    fn fill_token(&self) -> u32 {
        self.pad_token_id
            .or_else(|| self.eos_token_ids.first().copied())
            .unwrap_or(0)
    }
}

/// One generated token, as the streaming callback sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenEvent {
    /// Row of the batch (for beam search: returned sequence index).
    pub row: usize,
    /// Index of the token among the row's new tokens.
    pub index: usize,
    /// The token id.
    pub token: u32,
}

/// Where the time went.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Timings {
    /// Image encoding plus the prompt's forward pass, up to the first logits on the host.
    pub prefill: Duration,
    /// All later steps.
    pub decode: Duration,
    /// Forward passes after the prefill.
    pub decode_steps: usize,
}

impl Timings {
    /// Decode steps per second (one token per row per step).
    pub fn steps_per_second(&self) -> f64 {
        if self.decode.is_zero() {
            0.0
        } else {
            self.decode_steps as f64 / self.decode.as_secs_f64()
        }
    }
}

/// What [`generate`] returns.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerationOutput {
    /// The full sequences as transformers returns them: prompt (padding included) plus new
    /// tokens, finished rows filled with the pad id up to the longest; `num_return_sequences`
    /// rows per input row, best first.
    pub sequences: Vec<Vec<u32>>,
    /// Length of the (padded) prompt.
    pub prompt_len: usize,
    /// The new tokens of each sequence, up to and including its EOS, without filling.
    pub new_tokens: Vec<Vec<u32>>,
    /// Beam search: each returned hypothesis' length-normalised log-probability.
    pub sequence_scores: Option<Vec<f32>>,
    /// Timings.
    pub timings: Timings,
}

/// Runs the model step by step, with or without the KV cache, and can reorder its rows.
struct Runner<'m, B: Backend> {
    model: &'m Kosmos2<B>,
    device: Device<B>,
    cache: Option<DecoderCache<B>>,
    /// Image embeddings and the prompt's image-position mask rows (kept for no-cache steps).
    image: Option<(Tensor<B, 3>, Vec<Vec<i64>>)>,
    /// The attention mask rows so far.
    attention: Vec<Vec<i64>>,
    /// Left padding of each row's prompt (skipped by the repetition penalty).
    left_pads: Vec<usize>,
}

/// `[rows, len]` int tensor from host rows.
pub(crate) fn int_tensor<B: Backend>(rows: &[Vec<i64>], device: &Device<B>) -> Tensor<B, 2, Int> {
    let b = rows.len();
    let t = rows.first().map_or(0, Vec::len);
    let flat: Vec<i64> = rows.iter().flatten().copied().collect();
    Tensor::from_data(TensorData::new(flat, [b, t]), device)
}

/// Token-id rows widened to `i64`.
pub(crate) fn id_rows(rows: &[Vec<u32>]) -> Vec<Vec<i64>> {
    rows.iter().map(|r| r.iter().map(|&v| v as i64).collect()).collect()
}

fn host_rows<B: Backend>(logits: Tensor<B, 2>) -> Vec<Vec<f32>> {
    let [_, v] = logits.dims();
    let data = logits.into_data().convert::<f32>().to_vec::<f32>().expect("f32 logits");
    data.chunks(v).map(<[f32]>::to_vec).collect()
}

impl<'m, B: Backend> Runner<'m, B> {
    fn prefill(&mut self, input: &Kosmos2Input<B>, ids: &[Vec<u32>]) -> Result<Vec<Vec<f32>>, GenerateError> {
        if let Some(pixels) = &input.pixel_values {
            let mask = input
                .image_embeds_position_mask
                .as_ref()
                .ok_or_else(|| Kosmos2Error::Input("pixel_values given without image_embeds_position_mask".into()))?;
            self.image = Some((self.model.image_embeds(pixels.clone()), int_rows(mask)));
        }
        self.run(ids)
    }

    /// Forward the rows (the whole sequences without cache, the new tokens with one).
    fn run(&mut self, ids: &[Vec<u32>]) -> Result<Vec<Vec<f32>>, GenerateError> {
        let first = self.cache.as_ref().is_none_or(DecoderCache::is_empty);
        let t = ids[0].len();
        let input_ids = int_tensor::<B>(&id_rows(ids), &self.device);
        let mask = int_tensor::<B>(&self.attention, &self.device);
        let image = match &self.image {
            Some((embeds, rows)) if first => {
                let rows: Vec<Vec<i64>> = rows
                    .iter()
                    .map(|r| {
                        let mut r = r.clone();
                        r.resize(t, 0);
                        r
                    })
                    .collect();
                Some((embeds.clone(), int_tensor::<B>(&rows, &self.device)))
            }
            _ => None,
        };
        let hidden = self.model.text_hidden(
            &input_ids,
            Some(&mask),
            image.as_ref().map(|(e, m)| (e, m)),
            self.cache.as_mut(),
        )?;
        Ok(host_rows(self.model.last_logits(hidden)))
    }

    /// One step: `seqs` are the full sequences including the token just chosen.
    fn step(&mut self, seqs: &[Vec<u32>]) -> Result<Vec<Vec<f32>>, GenerateError> {
        for row in self.attention.iter_mut() {
            row.push(1);
        }
        if self.cache.is_some() {
            let last: Vec<Vec<u32>> = seqs.iter().map(|s| vec![*s.last().expect("non-empty")]).collect();
            self.run(&last)
        } else {
            self.run(seqs)
        }
    }

    /// Row `i` becomes row `src[i]` (beam reordering and expansion).
    fn select_rows(&mut self, src: &[usize]) {
        let index = Tensor::<B, 1, Int>::from_data(
            TensorData::new(src.iter().map(|&i| i as i64).collect::<Vec<_>>(), [src.len()]),
            &self.device,
        );
        if let Some(cache) = self.cache.as_mut() {
            cache.reorder(index.clone());
        }
        if let Some((embeds, rows)) = self.image.take() {
            let rows = src.iter().map(|&i| rows[i].clone()).collect();
            self.image = Some((embeds.select(0, index), rows));
        }
        self.attention = src.iter().map(|&i| self.attention[i].clone()).collect();
        self.left_pads = src.iter().map(|&i| self.left_pads[i]).collect();
    }
}

/// Generate from a prompt batch (left-padded when rows differ in length). `on_token` is called
/// for each new token as soon as it is chosen (greedy and sampling), or for the returned tokens
/// of each hypothesis when beam search ends (beams are only settled then).
pub fn generate<B: Backend>(
    model: &Kosmos2<B>,
    input: &Kosmos2Input<B>,
    config: &GenerationConfig,
    on_token: Option<&mut dyn FnMut(TokenEvent)>,
) -> Result<GenerationOutput, GenerateError> {
    config.validate()?;
    let [b, t] = input.input_ids.dims();
    if b == 0 || t == 0 {
        return Err(GenerateError::Config("the prompt batch is empty".into()));
    }
    let ids: Vec<Vec<u32>> = int_rows(&input.input_ids)
        .into_iter()
        .map(|r| r.into_iter().map(|v| v as u32).collect())
        .collect();
    let attention = match &input.attention_mask {
        Some(m) => {
            if m.dims() != [b, t] {
                return Err(GenerateError::Config(format!(
                    "attention_mask is {:?}, input_ids {:?}",
                    m.dims(),
                    [b, t]
                )));
            }
            int_rows(m)
        }
        None => vec![vec![1; t]; b],
    };
    if let Some(row) = attention.iter().position(|r| r[t - 1] == 0) {
        return Err(GenerateError::Config(format!(
            "row {row} ends in padding: generation needs left padding"
        )));
    }
    let left_pads = attention
        .iter()
        .map(|r| r.iter().position(|&v| v != 0).unwrap_or(0))
        .collect();
    let runner = Runner {
        model,
        device: input.input_ids.device(),
        cache: config.use_cache.then(|| model.new_cache()),
        image: None,
        attention,
        left_pads,
    };
    let max_new = config.max_new_for(t);
    if config.num_beams > 1 {
        beam_search(runner, input, ids, config, max_new, on_token)
    } else {
        sample(runner, input, ids, config, max_new, on_token)
    }
}

fn argmax(scores: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &s) in scores.iter().enumerate() {
        // First maximum wins (torch.argmax); NaN never wins.
        if s > scores[best] || (scores[best].is_nan() && !s.is_nan()) {
            best = i;
        }
    }
    best as u32
}

fn draw(scores: &[f32], rng: &mut ChaCha8Rng) -> u32 {
    let probs = softmax(scores);
    let total: f64 = probs.iter().map(|&p| p as f64).sum();
    let u = rng.random::<f64>() * total;
    let mut acc = 0.0f64;
    let mut last = 0;
    for (i, &p) in probs.iter().enumerate() {
        if p > 0.0 {
            acc += p as f64;
            last = i;
            if acc > u {
                return i as u32;
            }
        }
    }
    last as u32
}

/// Greedy search and sampling (transformers' `_sample`).
fn sample<B: Backend>(
    mut runner: Runner<'_, B>,
    input: &Kosmos2Input<B>,
    mut seqs: Vec<Vec<u32>>,
    config: &GenerationConfig,
    max_new: usize,
    mut on_token: Option<&mut dyn FnMut(TokenEvent)>,
) -> Result<GenerationOutput, GenerateError> {
    let prompt_len = seqs[0].len();
    let b = seqs.len();
    let pipeline = config.pipeline();
    let eos: HashSet<u32> = config.eos_token_ids.iter().copied().collect();
    let fill = config.fill_token();
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    let mut new_tokens = vec![Vec::new(); b];
    let mut unfinished = vec![true; b];
    let mut timings = Timings::default();
    if max_new == 0 {
        return Ok(GenerationOutput {
            sequences: seqs,
            prompt_len,
            new_tokens,
            sequence_scores: None,
            timings,
        });
    }
    let start = Instant::now();
    let mut logits = runner.prefill(input, &seqs)?;
    timings.prefill = start.elapsed();
    let decode_start = Instant::now();
    for step in 0..max_new {
        for (row, scores) in logits.iter_mut().enumerate() {
            let token = if unfinished[row] {
                pipeline.apply(scores, &seqs[row], runner.left_pads[row], step);
                let token = if config.do_sample {
                    draw(scores, &mut rng)
                } else {
                    argmax(scores)
                };
                new_tokens[row].push(token);
                if let Some(cb) = on_token.as_mut() {
                    cb(TokenEvent {
                        row,
                        index: step,
                        token,
                    });
                }
                if eos.contains(&token) {
                    unfinished[row] = false;
                }
                token
            } else {
                fill
            };
            seqs[row].push(token);
        }
        if !unfinished.iter().any(|&u| u) || step + 1 == max_new {
            break;
        }
        logits = runner.step(&seqs)?;
        timings.decode_steps += 1;
    }
    timings.decode = decode_start.elapsed();
    Ok(GenerationOutput {
        sequences: seqs,
        prompt_len,
        new_tokens,
        sequence_scores: None,
        timings,
    })
}

/// A finished (or placeholder) hypothesis of beam search.
#[derive(Clone, Debug)]
struct Hypothesis {
    seq: Vec<u32>,
    score: f32,
    finished: bool,
}

/// Indices of the `k` largest values, in descending order (ties: lower index first). Partitions
/// first, so a step over `beams x vocab` candidates sorts only the `k` kept.
fn top_indices(values: &[f32], k: usize) -> Vec<usize> {
    let order = |a: &usize, b: &usize| values[*b].total_cmp(&values[*a]).then(a.cmp(b));
    let mut idx: Vec<usize> = (0..values.len()).collect();
    if k < idx.len() {
        idx.select_nth_unstable_by(k, order);
        idx.truncate(k);
    }
    idx.sort_by(order);
    idx
}

/// Beam search (transformers' vectorised `_beam_search`, without sampling).
fn beam_search<B: Backend>(
    mut runner: Runner<'_, B>,
    input: &Kosmos2Input<B>,
    prompts: Vec<Vec<u32>>,
    config: &GenerationConfig,
    max_new: usize,
    on_token: Option<&mut dyn FnMut(TokenEvent)>,
) -> Result<GenerationOutput, GenerateError> {
    const NEG: f32 = -1.0e9;
    let k = config.num_beams;
    let b = prompts.len();
    let prompt_len = prompts[0].len();
    let max_length = prompt_len + max_new;
    let pipeline = config.pipeline();
    let eos: HashSet<u32> = config.eos_token_ids.iter().copied().collect();
    let keep = 2.max(1 + eos.len()) * k;
    let lp = config.length_penalty;
    let mut timings = Timings::default();

    // Running beams per batch item (flattened row = item * k + beam).
    let mut running: Vec<Vec<u32>> = prompts.iter().flat_map(|p| std::iter::repeat_n(p.clone(), k)).collect();
    let mut running_scores: Vec<f32> = (0..b * k).map(|r| if r % k == 0 { 0.0 } else { NEG }).collect();
    let mut finished: Vec<Vec<Hypothesis>> = prompts
        .iter()
        .map(|p| {
            vec![
                Hypothesis {
                    seq: p.clone(),
                    score: NEG,
                    finished: false,
                };
                k
            ]
        })
        .collect();
    let mut improvable = vec![true; b];

    if max_new > 0 {
        let start = Instant::now();
        let first = runner.prefill(input, &prompts)?;
        timings.prefill = start.elapsed();
        // Expand each row to its beams (transformers expands the prompt before the prefill).
        let expand: Vec<usize> = (0..b * k).map(|r| r / k).collect();
        runner.select_rows(&expand);
        let mut logits: Vec<Vec<f32>> = expand.iter().map(|&i| first[i].clone()).collect();
        let decode_start = Instant::now();
        let mut cur_len = prompt_len;
        loop {
            // b. Log-probabilities, processed, accumulated.
            for (row, scores) in logits.iter_mut().enumerate() {
                log_softmax(scores);
                pipeline.apply(scores, &running[row], runner.left_pads[row], cur_len - prompt_len);
            }
            let vocab = logits[0].len();
            let mut all_hit = true;
            let mut next_running = Vec::with_capacity(b * k);
            let mut next_scores = Vec::with_capacity(b * k);
            let mut source = Vec::with_capacity(b * k);
            for item in 0..b {
                let mut acc = Vec::with_capacity(k * vocab);
                for beam in 0..k {
                    let row = item * k + beam;
                    let base = running_scores[row];
                    acc.extend(logits[row].iter().map(|&s| s + base));
                }
                // c. Top candidates over all beams.
                let top = top_indices(&acc, keep);
                let cand: Vec<(usize, u32, f32)> = top
                    .iter()
                    .map(|&i| (item * k + i / vocab, (i % vocab) as u32, acc[i]))
                    .collect();
                // d. Which candidates end their sequence.
                let hits: Vec<bool> = cand
                    .iter()
                    .map(|&(_, tok, _)| eos.contains(&tok) || cur_len + 1 >= max_length)
                    .collect();
                all_hit &= hits.iter().all(|&h| h);
                // e. The best candidates that go on.
                let cont: Vec<f32> = cand
                    .iter()
                    .zip(&hits)
                    .map(|(&(_, _, s), &h)| if h { s + NEG } else { s })
                    .collect();
                for i in top_indices(&cont, k) {
                    let (row, tok, _) = cand[i];
                    let mut seq = running[row].clone();
                    seq.push(tok);
                    next_running.push(seq);
                    next_scores.push(cont[i]);
                    source.push(row);
                }
                // f. Finished hypotheses: the top `k` candidates that hit a stop, length-normalised.
                let generated = (cur_len + 1 - prompt_len) as f32;
                let norm = generated.powf(lp);
                let full = finished[item].iter().all(|h| h.finished) && config.early_stopping == EarlyStopping::Always;
                let mut merged: Vec<Hypothesis> = finished[item].clone();
                for (i, &(row, tok, s)) in cand.iter().enumerate() {
                    let mut score = s / norm;
                    if full {
                        score += NEG;
                    }
                    if !improvable[item] {
                        score += NEG;
                    }
                    let just_finished = hits[i] && i < k;
                    if !just_finished {
                        score += NEG;
                    }
                    let mut seq = running[row].clone();
                    seq.push(tok);
                    merged.push(Hypothesis {
                        seq,
                        score,
                        finished: just_finished,
                    });
                }
                let scores: Vec<f32> = merged.iter().map(|h| h.score).collect();
                finished[item] = top_indices(&scores, k).into_iter().map(|i| merged[i].clone()).collect();
            }
            running = next_running;
            running_scores = next_scores;
            cur_len += 1;
            // g. Can running beams still beat the finished ones?
            for item in 0..b {
                let hypothetical = if config.early_stopping == EarlyStopping::Never && lp > 0.0 {
                    max_length - prompt_len
                } else {
                    cur_len - prompt_len
                };
                let best = running_scores[item * k] / (hypothetical as f32).powf(lp);
                let worst = finished[item].iter().map(|h| h.score).fold(f32::INFINITY, f32::min);
                let beatable = finished[item]
                    .iter()
                    .any(|h| best > if h.finished { worst } else { NEG });
                improvable[item] &= beatable;
            }
            let open =
                !(finished.iter().flatten().all(|h| h.finished) && config.early_stopping == EarlyStopping::Always);
            if !(improvable.iter().any(|&x| x) && open && !all_hit) {
                break;
            }
            runner.select_rows(&source);
            logits = runner.step(&running)?;
            timings.decode_steps += 1;
        }
        timings.decode = decode_start.elapsed();
    }

    // 5. The best `num_return_sequences` per item, filled to the longest.
    let fill = config.fill_token();
    let r = config.num_return_sequences;
    let chosen: Vec<&Hypothesis> = finished.iter().flat_map(|f| f.iter().take(r)).collect();
    let longest = chosen.iter().map(|h| h.seq.len()).max().unwrap_or(prompt_len);
    let mut sequences = Vec::with_capacity(chosen.len());
    let mut new_tokens = Vec::with_capacity(chosen.len());
    let mut scores = Vec::with_capacity(chosen.len());
    for h in &chosen {
        let mut s = h.seq.clone();
        new_tokens.push(s[prompt_len..].to_vec());
        s.resize(longest, fill);
        sequences.push(s);
        scores.push(h.score);
    }
    if let Some(cb) = on_token {
        for (row, toks) in new_tokens.iter().enumerate() {
            for (index, &token) in toks.iter().enumerate() {
                cb(TokenEvent { row, index, token });
            }
        }
    }
    Ok(GenerationOutput {
        sequences,
        prompt_len,
        new_tokens,
        sequence_scores: Some(scores),
        timings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_overrides_defaults() {
        let json: Value = serde_json::json!({
            "max_new_tokens": 7, "do_sample": true, "top_k": 0, "top_p": 0.9, "num_beams": 3,
            "early_stopping": "never", "eos_token_id": [2, 5], "pad_token_id": 1, "no_repeat_ngram_size": 3,
            "transformers_version": "5.24.0"
        });
        let c = GenerationConfig::default().with_json(&json).unwrap();
        assert_eq!(c.max_new_tokens, Some(7));
        assert!(c.do_sample);
        assert_eq!(c.top_k, 0);
        assert_eq!(c.top_p, 0.9);
        assert_eq!(c.num_beams, 3);
        assert_eq!(c.early_stopping, EarlyStopping::Never);
        assert_eq!(c.eos_token_ids, vec![2, 5]);
        assert_eq!(c.no_repeat_ngram_size, 3);
        let bad = serde_json::json!({"num_beams": "three"});
        assert!(GenerationConfig::default().with_json(&bad).is_err());
    }

    #[test]
    fn max_new_tokens_resolution() {
        let mut c = GenerationConfig::default();
        assert_eq!(c.max_new_for(10), DEFAULT_MAX_NEW_TOKENS);
        c.max_length = Some(20);
        assert_eq!(c.max_new_for(15), 5);
        assert_eq!(c.max_new_for(25), 0);
        c.max_new_tokens = Some(3);
        assert_eq!(c.max_new_for(15), 3);
    }

    #[test]
    fn validation_names_the_option() {
        let c = GenerationConfig {
            num_return_sequences: 2,
            ..GenerationConfig::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("num_return_sequences"));
        let c = GenerationConfig {
            top_p: 0.0,
            ..GenerationConfig::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("top_p"));
        let c = GenerationConfig {
            do_sample: true,
            num_beams: 2,
            ..GenerationConfig::default()
        };
        assert!(c.validate().is_err());
    }

    #[test]
    fn top_indices_keep_the_largest_in_order() {
        let v = [0.5, 2.0, -1.0, 2.0, 3.0, 0.0];
        assert_eq!(top_indices(&v, 3), vec![4, 1, 3]);
        assert_eq!(top_indices(&v, 0), Vec::<usize>::new());
        assert_eq!(top_indices(&v, 10), vec![4, 1, 3, 0, 5, 2]);
    }

    #[test]
    fn argmax_takes_the_first_maximum() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 1.0]), 1);
    }

    #[test]
    fn sampling_follows_the_distribution() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let scores = [0.0f32, (3.0f32).ln(), f32::NEG_INFINITY];
        let mut counts = [0usize; 3];
        for _ in 0..20_000 {
            counts[draw(&scores, &mut rng) as usize] += 1;
        }
        assert_eq!(counts[2], 0);
        let p1 = counts[1] as f64 / 20_000.0;
        assert!((p1 - 0.75).abs() < 0.015, "p1 = {p1}");
    }
}
