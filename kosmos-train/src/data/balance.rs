//! Cutting a step's rows into micro-batches of about equal cost (`balance_micro_batches`).
//!
//! A micro-batch is padded to its longest row. Drawn in order, rows of mixed lengths (a
//! referring expression of 30 tokens beside a caption of 60) make every micro-batch nearly as
//! long as the step's longest row, and much of the text compute goes to padding. The step's loss
//! is the mean over the scored tokens of all its micro-batches whatever rows each holds (see
//! `kosmos_train::trainer::accumulate_weighted_gradients`), so the rows may be regrouped freely:
//! [`balance`] sorts them by length and cuts the sorted list into `parts` contiguous runs, rows of
//! similar length together, choosing the cut points that make the most expensive part as cheap
//! as possible (micro-batches computed at the same time wait for the slowest). The number of rows
//! per part then varies: many short rows, fewer long ones.
//!
//! A part's cost is `rows × longest row + images × image_cost`: the text positions computed
//! (padding included) plus each image's forward pass counted in text positions (`image_cost`,
//! e.g. `Kosmos2Config::image_macs() / text_token_macs()`, which the trainer uses).
//!
//! The cut is exact (dynamic programming over the cut points, `parts × rows²` steps, a few
//! thousand for the shapes recipe's 32 rows) and deterministic: ties in length keep the draw
//! order, ties in cost take the earliest cut.

/// Sort `rows` by length (stable) and cut them into `parts` contiguous runs minimising the largest
/// run's cost, `rows × longest + images × image_cost`; `measure(row)` gives a row's `(tokens,
/// images)`. The runs come back shortest rows first. With at least `parts` rows no run is empty;
/// with fewer, the missing runs come back empty at the end. `parts = 0` is taken as 1.
pub fn balance<T>(rows: Vec<T>, parts: usize, image_cost: f64, measure: impl Fn(&T) -> (usize, usize)) -> Vec<Vec<T>> {
    let parts = parts.max(1);
    let mut rows: Vec<((usize, usize), T)> = rows.into_iter().map(|r| (measure(&r), r)).collect();
    rows.sort_by_key(|((len, _), _)| *len);
    let cuts = cut_points(&rows.iter().map(|(m, _)| *m).collect::<Vec<_>>(), parts, image_cost);
    let mut out: Vec<Vec<T>> = Vec::with_capacity(parts);
    let mut rest = rows.into_iter();
    let mut start = 0;
    for end in cuts {
        out.push(rest.by_ref().take(end - start).map(|(_, r)| r).collect());
        start = end;
    }
    out.resize_with(parts, Vec::new);
    out
}

/// The cost of `rows` (`(tokens, images)` each) as one micro-batch: the number of rows times the
/// longest, plus `images × image_cost`.
pub fn part_cost(rows: &[(usize, usize)], image_cost: f64) -> f64 {
    let longest = rows.iter().map(|&(len, _)| len).max().unwrap_or(0);
    let images: usize = rows.iter().map(|&(_, images)| images).sum();
    cost(rows.len(), longest, images, image_cost)
}

/// `rows × longest + images × image_cost`, the one formula of a part's cost.
fn cost(rows: usize, longest: usize, images: usize, image_cost: f64) -> f64 {
    (rows * longest) as f64 + images as f64 * image_cost
}

/// The end of each run (exclusive) for `sorted` (`(tokens, images)` in ascending length), at most
/// `parts` runs, none empty, the largest cost minimal.
fn cut_points(sorted: &[(usize, usize)], parts: usize, image_cost: f64) -> Vec<usize> {
    let n = sorted.len();
    let runs = parts.min(n);
    if runs <= 1 {
        return if n == 0 { Vec::new() } else { vec![n] };
    }
    // O(1) per run: sorted by length, so the run's last row is its longest; images by prefix sums.
    let mut images = vec![0usize; n + 1];
    for (k, &(_, m)) in sorted.iter().enumerate() {
        images[k + 1] = images[k] + m;
    }
    let run = |i: usize, j: usize| cost(j - i, sorted[j - 1].0, images[j] - images[i], image_cost);
    // best[k][j]: the smallest possible largest cost of cutting sorted[..j] into k + 1 runs;
    // from[k][j]: where the last of those runs starts.
    let mut best = vec![vec![f64::INFINITY; n + 1]; runs];
    let mut from = vec![vec![0usize; n + 1]; runs];
    for j in 1..=n {
        best[0][j] = run(0, j);
    }
    for k in 1..runs {
        for j in (k + 1)..=n {
            for i in k..j {
                let c = best[k - 1][i].max(run(i, j));
                if c < best[k][j] {
                    best[k][j] = c;
                    from[k][j] = i;
                }
            }
        }
    }
    let mut ends = vec![n];
    let mut j = n;
    for k in (1..runs).rev() {
        j = from[k][j];
        ends.push(j);
    }
    ends.reverse();
    ends
}
