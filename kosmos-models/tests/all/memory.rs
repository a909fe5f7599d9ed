//! Peak memory of loading the full-size model: one copy of the weights, not two.
//!
//! Ignored by default (it writes a 6.7 GB checkpoint). Run with
//! `cargo test --release -p kosmos-models --test all memory -- --ignored --nocapture`.

use std::io::Write;

use kosmos_models::{Kosmos2, Kosmos2Config};

use crate::TB;

fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Write a random f32 safetensors file tensor by tensor (the whole checkpoint never sits in
/// memory): the shapes of a freshly built model in HF's key layout.
fn write_random_checkpoint(dir: &std::path::Path, config: &Kosmos2Config) -> u64 {
    use burn_store::{BurnToPyTorchAdapter, ModuleSnapshot};
    let model = Kosmos2::<TB>::new(config, &Default::default());
    let mut tensors: Vec<(String, Vec<usize>)> = model
        .collect(None, Some(Box::new(BurnToPyTorchAdapter)), true)
        .into_iter()
        .map(|s| {
            let key = s.full_path().replace("text_model.model.decoder.", "text_model.model.");
            (key, s.shape.to_vec())
        })
        .collect();
    drop(model);
    tensors.sort();
    let mut header = serde_json::Map::new();
    let mut offset = 0u64;
    for (key, shape) in &tensors {
        let bytes = shape.iter().product::<usize>() as u64 * 4;
        header.insert(
            key.clone(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut header = serde_json::to_vec(&header).unwrap();
    while header.len() % 8 != 0 {
        header.push(b' ');
    }
    let mut file = std::io::BufWriter::new(std::fs::File::create(dir.join("model.safetensors")).unwrap());
    file.write_all(&(header.len() as u64).to_le_bytes()).unwrap();
    file.write_all(&header).unwrap();
    let mut state = 0x9E3779B97F4A7C15u64;
    let mut chunk = Vec::with_capacity(1 << 20);
    let mut remaining = offset / 4;
    while remaining > 0 {
        chunk.clear();
        for _ in 0..remaining.min(1 << 18) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let v = ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.02;
            chunk.extend_from_slice(&v.to_le_bytes());
        }
        remaining -= remaining.min(1 << 18);
        file.write_all(&chunk).unwrap();
    }
    file.flush().unwrap();
    offset
}

#[test]
#[ignore = "writes a 6.7 GB checkpoint; run explicitly (see the module docs)"]
fn loading_the_full_model_holds_one_copy_of_the_weights() {
    let dir = std::env::temp_dir().join(format!("kosmos-memory-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = Kosmos2Config::patch14_224();
    std::fs::write(dir.join("config.json"), "{}").unwrap();
    let weight_bytes = write_random_checkpoint(&dir, &config);
    // Reset the peak-RSS counter so that only loading is measured.
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
    let before = status_kib("VmRSS:") * 1024;
    let model = Kosmos2::<TB>::from_pretrained(&dir, &Default::default()).unwrap();
    let peak = status_kib("VmHWM:") * 1024;
    let after = status_kib("VmRSS:") * 1024;
    drop(model);
    std::fs::remove_dir_all(&dir).ok();
    let ratio = (peak - before) as f64 / weight_bytes as f64;
    eprintln!(
        "weights {:.2} GB; RSS before {:.2} GB, peak while loading {:.2} GB, after {:.2} GB; peak increase / weights = {ratio:.3}",
        weight_bytes as f64 / 1e9,
        before as f64 / 1e9,
        peak as f64 / 1e9,
        after as f64 / 1e9
    );
    assert!(ratio < 1.3, "loading peaked at {ratio:.2}x the weights");
}
