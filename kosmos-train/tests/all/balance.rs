//! `balance_micro_batches`: the regrouping of a step's rows ([`kosmos_train::data::balance`]) —
//! every row kept, sorted by length, the cut optimal against brute force — and a trainer step
//! with it equal to the step without (same rows, same mean).

use kosmos_train::Trainer;
use kosmos_train::data::balance;
use kosmos_train::data::balance::part_cost;

use crate::trainer::config;

/// A small deterministic generator (xorshift64*).
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

/// Rows `(id, tokens, images)`.
fn rows(rng: &mut Rng, n: usize) -> Vec<(usize, usize, usize)> {
    (0..n)
        .map(|id| (id, 1 + rng.below(12) as usize, rng.below(3) as usize))
        .collect()
}

fn measure(r: &(usize, usize, usize)) -> (usize, usize) {
    (r.1, r.2)
}

fn largest(parts: &[Vec<(usize, usize, usize)>], image_cost: f64) -> f64 {
    parts
        .iter()
        .map(|p| part_cost(&p.iter().map(measure).collect::<Vec<_>>(), image_cost))
        .fold(0.0, f64::max)
}

/// The smallest largest cost over every way of cutting `sorted` into `parts` non-empty
/// contiguous runs.
fn brute_force(sorted: &[(usize, usize)], parts: usize, image_cost: f64) -> f64 {
    if parts == 1 {
        return part_cost(sorted, image_cost);
    }
    (1..=sorted.len() - (parts - 1))
        .map(|i| part_cost(&sorted[..i], image_cost).max(brute_force(&sorted[i..], parts - 1, image_cost)))
        .fold(f64::INFINITY, f64::min)
}

#[test]
fn every_row_is_kept_in_stable_length_order() {
    let mut rng = Rng(7);
    for n in 0..40 {
        for parts in 1..5 {
            let input = rows(&mut rng, n);
            let out = balance(input.clone(), parts, 3.5, measure);
            assert_eq!(out.len(), parts);
            let mut expected = input;
            expected.sort_by_key(|r| r.1); // stable: draw order among equal lengths
            assert_eq!(out.concat(), expected, "n {n} parts {parts}");
            if n >= parts {
                assert!(out.iter().all(|p| !p.is_empty()), "empty part, n {n} parts {parts}");
            } else {
                assert!(out[n..].iter().all(Vec::is_empty) && out[..n].iter().all(|p| p.len() == 1));
            }
        }
    }
}

#[test]
fn the_cut_is_optimal() {
    let mut rng = Rng(11);
    for trial in 0..300 {
        let n = 1 + rng.below(9) as usize;
        let parts = 1 + rng.below(4) as usize;
        let image_cost = [0.0, 1.0, 7.5][trial % 3];
        let input = rows(&mut rng, n);
        let out = balance(input.clone(), parts, image_cost, measure);
        let mut sorted: Vec<(usize, usize)> = input.iter().map(measure).collect();
        sorted.sort_by_key(|r| r.0);
        let best = brute_force(&sorted, parts.min(n), image_cost);
        assert_eq!(largest(&out, image_cost), best, "trial {trial}: n {n} parts {parts}");
    }
}

/// A step like the shapes recipe's: 24 short rows (30 tokens) and 8 long ones (60) in two
/// micro-batches. In draw order both are padded to 60: 16 x 60 = 960 positions each. Sorted, a
/// cut after k short rows costs max(30k, 60(32 - k)): 660 at k = 21 and at k = 22; the earliest
/// best cut is kept, 21 | 11.
#[test]
fn a_skewed_step_gets_cheaper() {
    let long = |i: usize| if i % 4 == 3 { 60 } else { 30 };
    let input: Vec<(usize, usize, usize)> = (0..32).map(|i| (i, long(i), 0)).collect();
    let drawn: Vec<Vec<_>> = input.chunks(16).map(<[_]>::to_vec).collect();
    assert_eq!(largest(&drawn, 0.0), 960.0);
    let out = balance(input, 2, 0.0, measure);
    assert_eq!((out[0].len(), out[1].len()), (21, 11));
    assert_eq!(largest(&out, 0.0), 660.0);
    // An image per row costing 30 positions: a cut after k short rows costs
    // max(60k, 90(32 - k)), best at k = 19 (max(1,140, 1,170)); k = 20 gives 1,200.
    let input: Vec<(usize, usize, usize)> = (0..32).map(|i| (i, long(i), 1)).collect();
    let out = balance(input, 2, 30.0, measure);
    assert_eq!((out[0].len(), out[1].len()), (19, 13));
    assert_eq!(largest(&out, 30.0), 1170.0);
}

/// The same steps with and without `balance_micro_batches` (mixed rows: GRIT with an image,
/// text alone): the same rows, so the same loss and gradient norm up to float rounding.
#[test]
fn a_balanced_step_equals_the_drawn_one() {
    let text = crate::common::temp_dir("balance-text").join("text.jsonl");
    std::fs::write(
        &text,
        "{\"text\": \"A man in a blue shirt is holding a dog.\"}\n{\"text\": \"Two.\"}\n{\"text\": \"Two people are riding horses in the park today.\"}\n",
    )
    .unwrap();
    let sources = format!(
        "[[data.sources]]\nname = \"text\"\nkind = \"text\"\npaths = [\"{}\"]\n",
        text.display()
    );
    let run = |name: &str, balanced: bool| {
        let top = format!(
            "batch_size = 3\ngrad_accumulation = 2\nparallel_micro_batches = 2\nbalance_micro_batches = {balanced}"
        );
        let c = config(name, 3, &top, "lr = 1e-4", &sources);
        assert_eq!(c.balance_micro_batches, balanced);
        let mut t = Trainer::<crate::trainer::AB>::new(c, Default::default()).unwrap();
        (0..3).map(|_| t.train_step().unwrap()).collect::<Vec<_>>()
    };
    let (drawn, balanced) = (run("balance-off", false), run("balance-on", true));
    for (a, b) in drawn.iter().zip(&balanced) {
        eprintln!(
            "step {}: loss {:.7} / {:.7}, grad norm {:.7} / {:.7}, tokens {} / {}",
            a.step, a.loss, b.loss, a.grad_norm, b.grad_norm, a.tokens, b.tokens
        );
        assert_eq!((a.tokens, a.scored_tokens), (b.tokens, b.scored_tokens));
    }
    // Step 1: the same parameters and rows; only the order of the sums differs.
    let (a, b) = (&drawn[0], &balanced[0]);
    assert!(
        (a.loss - b.loss).abs() <= 1e-5 * a.loss.abs(),
        "{} vs {}",
        a.loss,
        b.loss
    );
    assert!(
        (a.grad_norm - b.grad_norm).abs() <= 1e-4 * a.grad_norm,
        "{} vs {}",
        a.grad_norm,
        b.grad_norm
    );
    // Later steps: parameters differ by the rounding of the earlier updates (AdamW moves each by
    // at most about lr = 1e-4).
    for (a, b) in drawn.iter().zip(&balanced).skip(1) {
        assert!(
            (a.loss - b.loss).abs() <= 1e-3 * a.loss.abs(),
            "step {}: {} vs {}",
            a.step,
            a.loss,
            b.loss
        );
    }
}

/// The price of an image in text positions, from the shapes-world architecture
/// (`assets/shapes/init/config.json`: text width 128, 4 layers, FFN 512, vocabulary 1,234; vision
/// 64 px, patch 8, width 96, MLP 384, 2 layers; 16 latents), counted by hand:
/// text per token 4 x (4 x 128² + 2 x 128 x 512) + 128 x 1,234 = 786,432 + 157,952 = 944,384;
/// image: patch embedding 64 x 192 x 96 = 1,179,648; per layer 65 tokens x (4 x 96² + 2 x 96 x
/// 384) + 2 x 65² x 96 = 7,188,480 + 811,200 = 7,999,680, two layers 15,999,360; projection
/// 65 x 96 x 128 + 16 x 128² x 2 + 81 x 128² x 2 + 2 x 16 x 81 x 128 = 798,720 + 524,288 +
/// 2,654,208 + 331,776 = 4,308,992; in all 21,488,000, about 22.75 text positions.
#[test]
fn an_image_costs_what_the_architecture_says() {
    let config = kosmos_models::Kosmos2Config::from_json_file(
        kosmos_core::testing::repo_root().join("assets/shapes/init/config.json"),
    )
    .unwrap();
    assert_eq!(config.text_token_macs(), 944_384);
    assert_eq!(config.image_macs(), 21_488_000);
}
