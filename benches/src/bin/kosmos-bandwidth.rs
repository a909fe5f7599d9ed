//! `kosmos-bandwidth`: this machine's memory read rate, the floor under a decode step.
//!
//! ```text
//! kosmos-bandwidth [--gib 2] [--threads 2] [--repeats 5] [--huge-pages]
//! ```
//!
//! A decode step of a large model reads every weight once and does about two flops per weight,
//! so its time is bounded below by (bytes of weights) / (read rate). This program measures the
//! read rate the way such a step reads: a buffer much larger than the caches (default 2 GiB of
//! f32, written once so every page is resident) summed by `--threads` threads, each over one
//! contiguous part, with several independent accumulators (AVX-512 where the processor has it).
//! It prints one JSON object: the best and median rate over `--repeats` passes, in GB/s
//! (10^9 bytes per second). `scripts/bench/compare.py` runs it before and after its timings, so
//! each comparison table states how fast the machine's memory was while it ran, on 4 KiB pages
//! and (`--huge-pages`) on the 2 MiB pages the model's weights are given
//! ([`kosmos_core::memory`]).

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use serde_json::json;

/// Measures the memory read rate (GB/s) of a large buffer summed by a few threads.
#[derive(Parser, Debug)]
#[command(name = "kosmos-bandwidth", about)]
struct Cli {
    /// Buffer size in GiB (use several times the last-level cache).
    #[arg(long, default_value_t = 2.0)]
    gib: f64,
    /// Threads reading (each reads one contiguous part).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Timed passes over the buffer (after one untimed pass).
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// Put the buffer on 2 MiB pages (`kosmos_core::memory::advise`, as the model's weights are)
    /// instead of the 4 KiB pages a plain allocation gets.
    #[arg(long)]
    huge_pages: bool,
}

/// Floats summed per step: four 16-float vectors, enough independent additions in flight to keep
/// the loads, not the adder, the limit.
const LANES: usize = 64;

/// Sums `values` (the length need not be a multiple of [`LANES`]).
fn sum_portable(values: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut chunks = values.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (a, v) in acc.iter_mut().zip(chunk) {
            *a += v;
        }
    }
    acc.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

/// [`sum_portable`] with AVX-512: four 16-float accumulators, one 64-byte load each per step.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn sum_avx512(values: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let mut chunks = values.chunks_exact(LANES);
    let mut acc = [_mm512_setzero_ps(); 4];
    for chunk in &mut chunks {
        let p = chunk.as_ptr();
        for (j, a) in acc.iter_mut().enumerate() {
            // SAFETY: the chunk holds `LANES` = 4 x 16 floats.
            *a = _mm512_add_ps(*a, unsafe { _mm512_loadu_ps(p.add(16 * j)) });
        }
    }
    let total = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
    _mm512_reduce_add_ps(total) + chunks.remainder().iter().sum::<f32>()
}

/// The fastest sum this processor supports.
fn sum(values: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the processor supports AVX-512F (checked just above).
        return unsafe { sum_avx512(values) };
    }
    sum_portable(values)
}

/// One pass: every thread sums its part; returns the seconds taken and the total (kept so the
/// reads cannot be optimised away).
fn pass(buffer: &[f32], threads: usize) -> (f64, f32) {
    let part = buffer.len().div_ceil(threads);
    let start = Instant::now();
    let total = std::thread::scope(|scope| {
        let handles: Vec<_> = buffer.chunks(part).map(|p| scope.spawn(move || sum(p))).collect();
        handles.into_iter().map(|h| h.join().unwrap_or(f32::NAN)).sum::<f32>()
    });
    (start.elapsed().as_secs_f64(), total)
}

fn run(cli: &Cli) -> Result<serde_json::Value, String> {
    if !(cli.gib > 0.0 && cli.gib <= 64.0) {
        return Err(format!("--gib must be in (0, 64], found {}", cli.gib));
    }
    if cli.threads == 0 || cli.repeats == 0 {
        return Err("--threads and --repeats must be at least 1".into());
    }
    let len = (cli.gib * (1u64 << 30) as f64 / 4.0) as usize;
    let mut buffer = Vec::new();
    buffer
        .try_reserve_exact(len)
        .map_err(|_| format!("cannot allocate {} GiB for the buffer", cli.gib))?;
    // Written once, so the pages are resident before the timed reads (and the sum is exact:
    // every partial sum of ones below 2^24 per lane is representable).
    buffer.resize(len, 1.0f32);
    let huge_bytes = if cli.huge_pages {
        // SAFETY: the f32 buffer's memory viewed as its bytes (same span, u8 has no alignment).
        let bytes: &[u8] = unsafe { std::slice::from_raw_parts(buffer.as_ptr().cast::<u8>(), buffer.len() * 4) };
        let moved = kosmos_core::memory::advise(bytes);
        if moved == 0 {
            return Err("--huge-pages: the kernel moved none of the buffer to huge pages \
                        (/sys/kernel/mm/transparent_hugepage/enabled is `never`, or Linux is older than 6.1)"
                .into());
        }
        moved
    } else {
        0
    };
    let bytes = (len * 4) as f64;
    let _ = pass(&buffer, cli.threads);
    let mut rates = Vec::with_capacity(cli.repeats);
    let mut check = 0.0f32;
    for _ in 0..cli.repeats {
        let (seconds, total) = pass(&buffer, cli.threads);
        rates.push(bytes / seconds / 1e9);
        check = total;
    }
    let mut sorted = rates.clone();
    sorted.sort_by(f64::total_cmp);
    Ok(json!({
        "bytes": len * 4,
        "threads": cli.threads,
        "huge_page_bytes": huge_bytes,
        "best_gb_s": sorted[sorted.len() - 1],
        "median_gb_s": sorted[sorted.len() / 2],
        "rates_gb_s": rates,
        "checksum": check,
    }))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(report) => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
