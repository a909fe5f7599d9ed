//! Reduced-precision weights (`kosmos_core::packed`): the weight modes' names, the Q8 block format
//! on hand-made values, the flex kernel against Burn's operations on the dequantized weight (the
//! path every other backend takes), and the error of each mode against the f32 weight, bounded
//! from the format itself.

use burn::tensor::{Distribution, Tensor, bf16};
use kosmos_core::packed::{self, HostWeights, PackedWeight, Q8_BLOCK, Simd, WeightMode, quantize_q8};

use crate::common::TB;

fn host(t: Tensor<TB, 2>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec::<f32>().unwrap()
}

#[test]
fn weight_modes_parse_and_print() {
    for mode in WeightMode::ALL {
        assert_eq!(mode.name().parse::<WeightMode>().unwrap(), mode);
        assert_eq!(mode.to_string(), mode.name());
    }
    assert_eq!("Q8".parse::<WeightMode>().unwrap(), WeightMode::Q8);
    assert_eq!(WeightMode::default(), WeightMode::F32);
    let err = "int4".parse::<WeightMode>().unwrap_err();
    assert!(err.contains("`int4`") && err.contains("q8"), "{err}");
    assert_eq!(WeightMode::Q8.bytes_per_weight(), 1.125);
    assert_eq!(WeightMode::Bf16.bytes_per_weight(), 2.0);
    assert!(PackedWeight::<TB>::pack(Tensor::zeros([4, 4], &Default::default()), WeightMode::F32).is_none());
}

#[test]
fn q8_blocks_by_hand() {
    // Two rows of 40 columns: a full block and a tail of 8 (padded with zeros to 64).
    let cols = 40;
    let mut values = vec![0f32; 2 * cols];
    // Block 0: max |w| = 127, so the scale is exactly 1; -63.5 rounds away from zero.
    values[..4].copy_from_slice(&[127.0, -63.5, 0.49, -127.0]);
    // Block 1 (the tail): max 2.54, scale 0.02: 2.54 -> 127, -1 -> -50.
    values[32] = 2.54;
    values[33] = -1.0;
    // Row 1 stays zero: scale 0, every value 0.
    let (q, scales) = quantize_q8(&values, 2, cols);
    assert_eq!(q.len(), 2 * 2 * Q8_BLOCK);
    assert_eq!(scales.len(), 4);
    assert_eq!(&q[..4], &[127, -64, 0, -127]);
    assert!(q[4..32].iter().all(|&v| v == 0));
    assert_eq!(scales[0], 1.0);
    assert_eq!((q[32], q[33]), (127, -50));
    assert!((scales[1] - 0.02).abs() < 1e-8, "{}", scales[1]);
    assert!(q[34..64].iter().all(|&v| v == 0), "padding and zeros");
    assert_eq!(&scales[2..], &[0.0, 0.0]);
    assert!(q[64..].iter().all(|&v| v == 0));
}

#[test]
fn q8_error_is_at_most_half_a_step() {
    let device = Default::default();
    let (rows, cols) = (7, 100);
    let w = Tensor::<TB, 2>::random([rows, cols], Distribution::Normal(0.0, 1.0), &device);
    let values = host(w.clone());
    let (q, scales) = quantize_q8(&values, rows, cols);
    let blocks = cols.div_ceil(Q8_BLOCK);
    let packed = PackedWeight::pack_rows(w, WeightMode::Q8).unwrap();
    assert_eq!(packed.dims(), [rows, cols]);
    let deq = host(packed.dequantize());
    for r in 0..rows {
        for c in 0..cols {
            let s = scales[r * blocks + c / Q8_BLOCK];
            let v = q[r * blocks * Q8_BLOCK + c] as f32 * s;
            assert_eq!(deq[r * cols + c], v, "dequantize() is q * scale at ({r}, {c})");
            assert!((v - values[r * cols + c]).abs() <= 0.5 * s * (1.0 + 1e-6), "({r}, {c})");
        }
    }
}

/// `|ours - reference| <= 1e-6 + 1e-5 * Σ_i |x_i w_i|`: the two differ only in the order of the
/// f32 additions (and, for Q8, in applying the scale per block or per weight), whose rounding
/// error is bounded by the sum of the terms' magnitudes (times k·ε in the worst case; 1e-5 is
/// about 80 ε, ample for these sizes' random-walk errors).
fn assert_reordered_sum(ours: &[f32], want: &[f32], x: &[f32], w: &[f32], rows: usize, k: usize, n: usize, what: &str) {
    for r in 0..rows {
        for o in 0..n {
            let terms: f32 = (0..k).map(|i| (x[r * k + i] * w[o * k + i]).abs()).sum();
            let (a, b) = (ours[r * n + o], want[r * n + o]);
            assert!(
                (a - b).abs() <= 1e-6 + 1e-5 * terms,
                "{what}: row {r} output {o}: {a} against {b} (terms {terms})"
            );
        }
    }
}

#[test]
fn flex_kernel_matches_burn_operations_on_the_dequantized_weight() {
    let device = Default::default();
    // A short input with a tail block, and one large enough to be split over threads.
    for (k, n) in [(100, 70), (512, 642)] {
        let w = Tensor::<TB, 2>::random([k, n], Distribution::Normal(0.0, 0.05), &device);
        for mode in [WeightMode::Bf16, WeightMode::Q8] {
            let packed = PackedWeight::pack(w.clone(), mode).unwrap();
            assert_eq!(packed.dims(), [n, k]);
            assert_eq!(packed.mode(), mode);
            let deq = host(packed.dequantize());
            for rows in [1, 3, 8] {
                let what = format!("{mode} {k}x{n}, {rows} row(s)");
                let x = Tensor::<TB, 2>::random([rows, k], Distribution::Normal(0.0, 1.0), &device);
                let xs = host(x.clone());
                let ours = host(packed.matmul(x.clone()));
                let want = host(packed.matmul_reference(x));
                assert_reordered_sum(&ours, &want, &xs, &deq, rows, k, n, &what);

                // The same kernel on host slices: bit for bit what `matmul` gave (so `matmul`
                // did run the kernel), on one thread and on three.
                let half: Vec<bf16>;
                let (q, scales);
                let weights = match mode {
                    WeightMode::Bf16 => {
                        half = deq.iter().map(|&v| bf16::from_f32(v)).collect();
                        HostWeights::Bf16(&half)
                    }
                    _ => {
                        (q, scales) = quantize_q8(&host(w.clone().transpose()), n, k);
                        HostWeights::Q8 { q: &q, scales: &scales }
                    }
                };
                // Every instruction set this processor has (portable, AVX2, AVX-512) against the
                // reference; the detected one is what `matmul` ran.
                for simd in Simd::available() {
                    for threads in [1, 3] {
                        let direct = packed::host_product(&xs, rows, k, n, weights, threads, simd);
                        let what = format!("{what}, {simd:?}, {threads} thread(s)");
                        assert_reordered_sum(&direct, &want, &xs, &deq, rows, k, n, &what);
                        if simd == Simd::detected() {
                            let same = direct.iter().zip(&ours).all(|(a, b)| a.to_bits() == b.to_bits());
                            assert!(same, "{what}: the host kernel differs from matmul");
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn packed_products_stay_within_the_format_error_of_f32() {
    let device = Default::default();
    let (k, n, rows) = (256, 96, 2);
    let w = Tensor::<TB, 2>::random([k, n], Distribution::Normal(0.0, 0.05), &device);
    let x = Tensor::<TB, 2>::random([rows, k], Distribution::Normal(0.0, 1.0), &device);
    let exact = host(x.clone().matmul(w.clone()));
    let (xs, wt) = (host(x.clone()), host(w.clone().transpose()));
    let (_, scales) = quantize_q8(&wt, n, k);
    let blocks = k / Q8_BLOCK;
    for mode in [WeightMode::Bf16, WeightMode::Q8] {
        let ours = host(PackedWeight::pack(w.clone(), mode).unwrap().matmul(x.clone()));
        let changed = ours.iter().zip(&exact).filter(|(a, b)| a != b).count();
        assert!(
            changed > ours.len() / 2,
            "{mode}: the packed weights should change most outputs ({changed})"
        );
        for r in 0..rows {
            for o in 0..n {
                let terms: f32 = (0..k).map(|i| (xs[r * k + i] * wt[o * k + i]).abs()).sum();
                // bf16 rounds each weight to nearest with 8 significant bits: relative error
                // <= 2^-9. Q8 is within half a step (scale / 2) of each weight.
                let format = match mode {
                    WeightMode::Bf16 => terms / 512.0,
                    _ => (0..k)
                        .map(|i| xs[r * k + i].abs() * 0.5 * scales[o * blocks + i / Q8_BLOCK])
                        .sum(),
                };
                let d = (ours[r * n + o] - exact[r * n + o]).abs();
                assert!(
                    d <= format * 1.001 + 1e-6 + 1e-5 * terms,
                    "{mode}: ({r}, {o}) off by {d}, bound {format}"
                );
            }
        }
    }
}
