//! `kosmos info`: what this build can run on, and the model presets with their sizes.

use std::fmt::Write as _;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::Instant;

use burn::prelude::*;
use kosmos_core::backend::{BackendKind, BackendTask, DeviceSpec, run_task};
use kosmos_core::presets::LanguageModelPreset;

/// A 256x256 matmul on the device, to check that the backend works and time it roughly.
struct Probe;

impl BackendTask for Probe {
    type Output = (String, f64);

    fn run<B: Backend>(self, device: B::Device) -> (String, f64) {
        let start = Instant::now();
        let a = Tensor::<B, 2>::ones([256, 256], &device);
        let s: f32 = a.clone().matmul(a).sum().into_scalar().elem();
        assert_eq!(s, 256.0 * 256.0 * 256.0, "wrong result from the device");
        (format!("{device:?}"), start.elapsed().as_secs_f64() * 1e3)
    }
}

/// Human-readable parameter count.
pub fn human_count(n: usize) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.1}M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1}K", n as f64 / 1e3),
        n => n.to_string(),
    }
}

/// The report `kosmos info` prints. With `probe`, each compiled backend (or only `device`) runs
/// a small product and reports its device or the error.
pub fn run(probe: bool, device: Option<&str>) -> Result<String, String> {
    let mut out = String::new();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    writeln!(out, "kosmos-burn {} (Burn 0.21.0)", env!("CARGO_PKG_VERSION")).unwrap();
    writeln!(out, "\nBackends:").unwrap();
    for kind in BackendKind::ALL {
        let status = if kind.is_compiled() { "compiled" } else { "not compiled" };
        let devices = match kind {
            BackendKind::Flex | BackendKind::Ndarray => format!("cpu ({threads} threads)"),
            BackendKind::Wgpu => "default adapter, or wgpu:N for discrete GPU N".to_string(),
            BackendKind::Cuda => "cuda:N (N = 0.. CUDA devices)".to_string(),
        };
        let default = if Some(kind) == BackendKind::default_compiled() {
            ", default"
        } else {
            ""
        };
        writeln!(out, "  {:<8} {status:<13} {devices}{default}", kind.name()).unwrap();
    }
    if probe || device.is_some() {
        writeln!(out, "\nProbe (256x256 matmul):").unwrap();
        let targets: Vec<String> = match device {
            Some(d) => {
                d.parse::<DeviceSpec>().map_err(|e| e.to_string())?;
                vec![d.to_string()]
            }
            None => BackendKind::compiled().iter().map(|k| k.name().to_string()).collect(),
        };
        for name in targets {
            let line = match catch_unwind(AssertUnwindSafe(|| run_task(&name, Probe))) {
                Ok(Ok((dev, ms))) => format!("ok, {dev}, {ms:.1} ms"),
                Ok(Err(e)) => format!("unavailable: {e}"),
                Err(panic) => {
                    let msg = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "backend failed to start".into());
                    format!("unavailable: {}", msg.lines().next().unwrap_or_default())
                }
            };
            writeln!(out, "  {name:<8} {line}").unwrap();
        }
    }
    writeln!(out, "\nModel presets (parameters computed from the configuration):").unwrap();
    for p in LanguageModelPreset::all() {
        let d = &p.decoder;
        writeln!(
            out,
            "  {:<13} {:>7}  {} layers x {} wide, {} heads, FFN {}, vocab {}, {}",
            p.name,
            human_count(p.num_params()),
            d.layers,
            d.embed_dim,
            d.attention_heads,
            d.ffn_dim,
            p.vocab_size,
            if d.xpos_scale_base.is_some() {
                "XPOS"
            } else {
                "sinusoidal positions"
            }
        )
        .unwrap();
        writeln!(out, "  {:<13}          {}", "", p.description).unwrap();
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_lists_backends_and_presets() {
        let text = run(true, None).unwrap();
        assert!(text.contains("flex     compiled"), "{text}");
        assert!(text.contains("kosmos1-lm"), "{text}");
        assert!(text.contains("1.34B"), "{text}");
        assert!(text.contains("ok, "), "probe of the default backend: {text}");
    }

    #[test]
    fn unknown_device_is_an_error() {
        assert!(run(false, Some("tpu")).unwrap_err().contains("unknown device"));
    }

    #[test]
    fn counts_are_human_readable() {
        assert_eq!(human_count(1_340_180_480), "1.34B");
        assert_eq!(human_count(2_500_000), "2.5M");
        assert_eq!(human_count(999), "999");
    }
}
