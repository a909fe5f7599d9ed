//! Learning-rate schedules against transformers' definitions (`transformers/optimization.py`,
//! written out here from their formulas) and hand-computed values.

use kosmos_train::schedule::{Decay, LrSchedule};

/// `get_linear_schedule_with_warmup`'s lambda.
fn hf_linear(step: u64, warmup: u64, total: u64) -> f64 {
    if step < warmup {
        return step as f64 / warmup.max(1) as f64;
    }
    (0.0f64).max((total as f64 - step as f64) / (total.saturating_sub(warmup)).max(1) as f64)
}

/// `get_cosine_schedule_with_warmup`'s lambda (`num_cycles = 0.5`), and with `min_lr_rate` as in
/// `get_cosine_with_min_lr_schedule_with_warmup`.
fn hf_cosine(step: u64, warmup: u64, total: u64, min_lr_rate: f64) -> f64 {
    if step < warmup {
        return step as f64 / warmup.max(1) as f64;
    }
    let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
    let factor = 0.5 * (1.0 + (std::f64::consts::PI * 2.0 * 0.5 * progress).cos());
    (factor * (1.0 - min_lr_rate) + min_lr_rate).max(0.0)
}

/// `get_constant_schedule_with_warmup`'s lambda.
fn hf_constant(step: u64, warmup: u64) -> f64 {
    if step < warmup {
        step as f64 / warmup.max(1) as f64
    } else {
        1.0
    }
}

fn schedule(decay: Decay, min_lr: f64) -> LrSchedule {
    LrSchedule {
        lr: 3e-4,
        min_lr,
        warmup_steps: 10,
        total_steps: 110,
        decay,
    }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-15 + 1e-12 * b.abs()
}

#[test]
fn schedules_match_transformers_formulas() {
    for i in 0..=110 {
        let s = schedule(Decay::Linear, 0.0);
        assert!(close(s.lr_at(i), 3e-4 * hf_linear(i, 10, 110)), "linear at {i}");
        let s = schedule(Decay::Cosine, 0.0);
        assert!(close(s.lr_at(i), 3e-4 * hf_cosine(i, 10, 110, 0.0)), "cosine at {i}");
        let s = schedule(Decay::Cosine, 3e-5);
        assert!(
            close(s.lr_at(i), 3e-4 * hf_cosine(i, 10, 110, 0.1)),
            "cosine min_lr at {i}"
        );
        let s = schedule(Decay::Constant, 0.0);
        assert!(close(s.lr_at(i), 3e-4 * hf_constant(i, 10)), "constant at {i}");
    }
}

#[test]
fn schedule_hand_values() {
    let linear = schedule(Decay::Linear, 0.0);
    let cosine = schedule(Decay::Cosine, 0.0);
    // warmup from 0: the first step has learning rate 0, step 5 half the peak
    assert_eq!(linear.lr_at(0), 0.0);
    assert!(close(linear.lr_at(5), 1.5e-4));
    assert!(close(linear.lr_at(10), 3e-4) && close(cosine.lr_at(10), 3e-4));
    // half way through the decay both are at half the peak; a quarter in, cosine is at
    // (1 + cos(pi/4)) / 2 = 0.853553...
    assert!(close(linear.lr_at(60), 1.5e-4) && close(cosine.lr_at(60), 1.5e-4));
    assert!(close(linear.lr_at(35), 2.25e-4));
    assert!(close(cosine.lr_at(35), 3e-4 * 0.853_553_390_593_273_8));
    // the end, and past it (cosine does not rise again)
    assert_eq!(linear.lr_at(110), 0.0);
    assert!(cosine.lr_at(110).abs() < 1e-20 && cosine.lr_at(200).abs() < 1e-20);
    let floor = schedule(Decay::Linear, 3e-5);
    assert!(close(floor.lr_at(60), 3e-5 + 0.5 * 2.7e-4));
    assert!(close(floor.lr_at(500), 3e-5));
    // no warmup
    let no_warmup = LrSchedule {
        warmup_steps: 0,
        ..linear
    };
    assert!(close(no_warmup.lr_at(0), 3e-4));
}
