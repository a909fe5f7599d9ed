//! Logits processors: the score transformations applied before each token is chosen.
//!
//! Each processor works on one row of next-token scores (`&mut [f32]`, one entry per vocabulary
//! id) given that row's token ids so far (prompt, padding included, plus generated tokens), and
//! equals the transformers 5.24 class of the same name (`generation/logits_process.py`): the same
//! arithmetic in f32, the same tie rules, `-inf` as the filter value. Tests compare them with
//! fixtures written by `scripts/make_generate_fixtures.py`.
//!
//! [`LogitsPipeline`] chains them in the order transformers' `generate()` builds them: first the
//! processors (minimum length, repetition penalty, n-gram blocking), then, when sampling, the
//! warpers (temperature, top-k, top-p).

use std::collections::HashSet;

/// Divide every score by `temperature` (transformers' `TemperatureLogitsWarper`).
pub fn temperature(scores: &mut [f32], temperature: f32) {
    for s in scores.iter_mut() {
        *s /= temperature;
    }
}

/// Keep the `k` highest scores (and every score equal to the k-th); the rest become `-inf`
/// (`TopKLogitsWarper` with `min_tokens_to_keep = 1`). `k = 0` or `k >= len` keeps everything.
pub fn top_k(scores: &mut [f32], k: usize) {
    if k == 0 || k >= scores.len() {
        return;
    }
    let mut sorted: Vec<f32> = scores.to_vec();
    // k-th largest value: select on the descending order; NaN sorts last.
    let (_, kth, _) = sorted.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    let kth = *kth;
    for s in scores.iter_mut() {
        if *s < kth {
            *s = f32::NEG_INFINITY;
        }
    }
}

/// Nucleus filtering (`TopPLogitsWarper`, `min_tokens_to_keep = 1`): sort ascending, take the
/// softmax's running sum and drop every token whose running sum is `<= 1 - top_p`; the most likely
/// token always stays. `top_p >= 1` keeps everything.
pub fn top_p(scores: &mut [f32], top_p: f64) {
    if top_p >= 1.0 || scores.is_empty() {
        return;
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    // Stable ascending sort (torch.sort on CPU is stable for equal keys).
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let probs = softmax_ordered(scores, &order);
    // torch: the threshold is a Python float compared with an f32 tensor (cast to f32); the
    // running sum accumulates in f64 and is stored as f32.
    let threshold = (1.0 - top_p) as f32;
    let mut cumulative = 0.0f64;
    let last = order.len() - 1;
    let mut remove = Vec::new();
    for (rank, (&id, p)) in order.iter().zip(probs).enumerate() {
        cumulative += p as f64;
        if (cumulative as f32) <= threshold && rank != last {
            remove.push(id);
        }
    }
    for id in remove {
        scores[id] = f32::NEG_INFINITY;
    }
}

/// Softmax of `scores` visited in `order` (f32, max-subtracted, as torch computes it).
fn softmax_ordered(scores: &[f32], order: &[usize]) -> Vec<f32> {
    let max = order.iter().map(|&i| scores[i]).fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return vec![1.0 / order.len() as f32; order.len()];
    }
    let exps: Vec<f32> = order.iter().map(|&i| (scores[i] - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

/// Softmax of a row (f32, max-subtracted); `-inf` scores get probability 0.
pub fn softmax(scores: &[f32]) -> Vec<f32> {
    let order: Vec<usize> = (0..scores.len()).collect();
    softmax_ordered(scores, &order)
}

/// Log-softmax of a row (what beam search accumulates), as torch's `log_softmax` computes it:
/// `x - max - ln(sum(exp(x - max)))`.
pub fn log_softmax(scores: &mut [f32]) {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return;
    }
    let sum: f32 = scores.iter().map(|&s| (s - max).exp()).sum();
    let log_sum = sum.ln();
    for s in scores.iter_mut() {
        *s = *s - max - log_sum;
    }
}

/// Penalise every id that occurs in `ids` (`RepetitionPenaltyLogitsProcessor`): a negative score is
/// multiplied by `penalty`, a positive one divided by it, once per distinct id. Ids beyond the
/// vocabulary are ignored.
pub fn repetition_penalty(scores: &mut [f32], ids: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    let mut seen = HashSet::new();
    for &id in ids {
        let i = id as usize;
        if i < scores.len() && seen.insert(i) {
            let s = scores[i];
            scores[i] = if s < 0.0 { s * penalty } else { s / penalty };
        }
    }
}

/// The ids that would complete an n-gram of size `n` already present in `ids`
/// (`NoRepeatNGramLogitsProcessor`): every earlier window whose first `n - 1` tokens equal the
/// last `n - 1` tokens of `ids` bans its last token.
pub fn banned_ngram_tokens(ids: &[u32], n: usize) -> Vec<u32> {
    let len = ids.len();
    if n == 0 || len < n {
        return Vec::new();
    }
    let prefix = &ids[len + 1 - n..];
    let mut banned = Vec::new();
    for start in 0..=(len - n) {
        let window = &ids[start..start + n];
        if &window[..n - 1] == prefix {
            banned.push(window[n - 1]);
        }
    }
    banned
}

/// Set the scores of ids that would repeat an n-gram of size `n` to `-inf`.
pub fn no_repeat_ngram(scores: &mut [f32], ids: &[u32], n: usize) {
    for id in banned_ngram_tokens(ids, n) {
        if let Some(s) = scores.get_mut(id as usize) {
            *s = f32::NEG_INFINITY;
        }
    }
}

/// Forbid the end-of-sequence ids while fewer than `min_new` tokens were generated
/// (`MinNewTokensLengthLogitsProcessor`).
pub fn min_new_tokens(scores: &mut [f32], generated: usize, min_new: usize, eos: &[u32]) {
    if generated < min_new {
        for &e in eos {
            if let Some(s) = scores.get_mut(e as usize) {
                *s = f32::NEG_INFINITY;
            }
        }
    }
}

/// The processors of one generation run, applied in transformers' order.
#[derive(Clone, Debug, PartialEq)]
pub struct LogitsPipeline {
    /// Generated tokens before which EOS is forbidden.
    pub min_new_tokens: usize,
    /// End-of-sequence ids (for `min_new_tokens`).
    pub eos_token_ids: Vec<u32>,
    /// Repetition penalty (1 = off).
    pub repetition_penalty: f32,
    /// No-repeat n-gram size (0 = off).
    pub no_repeat_ngram_size: usize,
    /// Whether the warpers below apply (sampling).
    pub sample: bool,
    /// Temperature (1 = off).
    pub temperature: f32,
    /// Top-k (0 = off).
    pub top_k: usize,
    /// Top-p (1 = off).
    pub top_p: f64,
}

impl LogitsPipeline {
    /// Process one row of scores; `ids` is the row's full sequence so far, the first
    /// `left_pads` of them its left padding, and `generated` how many were generated. As in
    /// transformers, the repetition penalty skips the left padding (its `prompt_ignore_length`)
    /// while n-gram blocking sees the whole row.
    pub fn apply(&self, scores: &mut [f32], ids: &[u32], left_pads: usize, generated: usize) {
        if self.min_new_tokens > 0 {
            min_new_tokens(scores, generated, self.min_new_tokens, &self.eos_token_ids);
        }
        repetition_penalty(scores, &ids[left_pads.min(ids.len())..], self.repetition_penalty);
        if self.no_repeat_ngram_size > 0 {
            no_repeat_ngram(scores, ids, self.no_repeat_ngram_size);
        }
        if self.sample {
            if self.temperature != 1.0 {
                temperature(scores, self.temperature);
            }
            top_k(scores, self.top_k);
            top_p(scores, self.top_p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_keeps_ties_of_the_kth_value() {
        let mut s = vec![1.0, 3.0, 2.0, 3.0, 0.5];
        top_k(&mut s, 2);
        assert_eq!(
            s,
            vec![f32::NEG_INFINITY, 3.0, f32::NEG_INFINITY, 3.0, f32::NEG_INFINITY]
        );
        let mut s = vec![1.0, 2.0, 2.0, 0.0];
        top_k(&mut s, 2);
        assert_eq!(s, vec![f32::NEG_INFINITY, 2.0, 2.0, f32::NEG_INFINITY]);
        let mut s = vec![1.0, 2.0];
        top_k(&mut s, 0);
        assert_eq!(s, vec![1.0, 2.0]);
    }

    #[test]
    fn top_p_keeps_the_best_token_and_the_nucleus() {
        // Probabilities ~ [0.665, 0.245, 0.090] for scores [2, 1, 0].
        let mut s = vec![0.0, 2.0, 1.0];
        top_p(&mut s, 0.5);
        assert_eq!(s, vec![f32::NEG_INFINITY, 2.0, f32::NEG_INFINITY]);
        let mut s = vec![0.0, 2.0, 1.0];
        top_p(&mut s, 0.8);
        assert_eq!(s, vec![f32::NEG_INFINITY, 2.0, 1.0]);
        let mut s = vec![0.0, 2.0, 1.0];
        top_p(&mut s, 0.0);
        assert_eq!(s, vec![f32::NEG_INFINITY, 2.0, f32::NEG_INFINITY]);
    }

    #[test]
    fn repetition_penalty_counts_each_id_once() {
        let mut s = vec![2.0, -2.0, 1.0];
        repetition_penalty(&mut s, &[0, 0, 1, 7], 2.0);
        assert_eq!(s, vec![1.0, -4.0, 1.0]);
    }

    #[test]
    fn ngram_bans_completions_of_seen_ngrams() {
        // 1 2 3 ... 1 2 -> 3 banned (n = 3); 2 -> {3, 9} for n = 2 after "2 3 2 9 2".
        assert_eq!(banned_ngram_tokens(&[1, 2, 3, 4, 1, 2], 3), vec![3]);
        assert_eq!(banned_ngram_tokens(&[2, 3, 2, 9, 2], 2), vec![3, 9]);
        assert!(banned_ngram_tokens(&[1, 2], 3).is_empty());
        assert!(banned_ngram_tokens(&[1, 2, 3], 0).is_empty());
        // n = 1 bans every token seen.
        assert_eq!(banned_ngram_tokens(&[5, 6, 5], 1), vec![5, 6, 5]);
    }

    #[test]
    fn log_softmax_normalises() {
        let mut s = vec![1.0, 2.0, 3.0, f32::NEG_INFINITY];
        log_softmax(&mut s);
        let total: f32 = s.iter().map(|v| v.exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
        assert_eq!(s[3], f32::NEG_INFINITY);
    }

    #[test]
    fn min_new_tokens_forbids_eos_early_only() {
        let mut s = vec![0.0; 4];
        min_new_tokens(&mut s, 1, 2, &[2]);
        assert_eq!(s[2], f32::NEG_INFINITY);
        let mut s = vec![0.0; 4];
        min_new_tokens(&mut s, 2, 2, &[2]);
        assert_eq!(s[2], 0.0);
    }
}
