//! `kosmos-compare`: times this project's KOSMOS-2 on one model directory and one fixed input, the
//! Rust half of `scripts/bench/compare.py` (which times transformers on the same files).
//!
//! ```text
//! kosmos-compare --model DIR --inputs inputs.safetensors [--device flex|ndarray] [--repeats 5]
//!                [--new-tokens 32] [--attention fused|explicit] [--breakdown] [--serve]
//!                [--weights f32,bf16,q8]
//! ```
//!
//! `DIR` is a Hugging Face model directory (`config.json` plus `model.safetensors`);
//! `inputs.safetensors` holds `input_ids`, `attention_mask`, `image_embeds_position_mask` (int64
//! `[1, len]`) and `pixel_values` (f32 `[1, 3, H, W]`). After one warm-up repeat each repeat times:
//!
//! - `vision_s`: vision tower plus image-to-text projection (the image embeddings);
//! - `forward_s`: the full forward pass with logits at every position (`model(...)`);
//! - `ttft_s`: time to first token as [`generate`] measures it (vision, prompt prefill filling the
//!   KV cache, last-position logits on the host);
//! - `decode_per_token_s`: greedy decoding with the KV cache, per step after the first token;
//!   `tokens` are the new ids (EOS is blocked until `--new-tokens`, as transformers'
//!   `min_new_tokens` does, so both sides decode the same number of steps);
//! - `last_logits_head`: the first 16 logits of the last position of the forward pass, for the
//!   driver's f32 parity check;
//! - with `--breakdown`: the text decoder alone on the prompt, the head over every position and
//!   over the last one (also with the head weight stored transposed, `[embed, vocab]`, as a
//!   one-off copy), and per decode step the decoder (one cached token) and the head.
//!
//! `--weights` lists weight modes ([`WeightMode`]): besides the f32 model, one model per
//! reduced-precision mode shares its f32 weights and packs the decoder's projections and the
//! head ([`Kosmos2::pack_weights`]). Before timing, each packed mode's accuracy against f32 is
//! measured and reported in the header (`accuracy`): the greedy f32 tokens are fed to both models
//! (teacher forcing) and the logits of every step compared (largest absolute difference, largest
//! f32 logit, steps whose argmax agrees), and the packed model's own greedy tokens are compared
//! with f32's.
//!
//! Without `--serve` it prints one JSON object with a list of repeats (per mode). With `--serve` it prints
//! `{"ready": ...}` after loading and warming up, then answers each `run` line (or `run MODE`,
//! default the first of `--weights`) on stdin with one JSON line (one repeat), so that a driver
//! can alternate it with other implementations; it exits on `quit` or end of input.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use burn::prelude::*;
use burn::tensor::TensorData;
use clap::{Parser, ValueEnum};
use kosmos_core::AttentionImpl;
use kosmos_core::backend::{BackendTask, run_task};
use kosmos_core::packed::WeightMode;
use kosmos_infer::generate::{GenerationConfig, generate};
use kosmos_models::{Kosmos2, Kosmos2Input};
use safetensors::{Dtype, SafeTensors};
use serde_json::{Value, json};

/// Times KOSMOS-2 (vision, forward, time to first token, decode per token) on fixed inputs.
#[derive(Parser, Debug)]
#[command(name = "kosmos-compare", about)]
struct Cli {
    /// Hugging Face model directory (config.json + model.safetensors).
    #[arg(long)]
    model: PathBuf,
    /// Inputs: input_ids, attention_mask, image_embeds_position_mask, pixel_values.
    #[arg(long)]
    inputs: PathBuf,
    /// Backend: flex, ndarray (or a GPU backend compiled in).
    #[arg(long, default_value = "flex")]
    device: String,
    /// Timed repeats (ignored with --serve).
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// Untimed warm-up repeats before the first timed one.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// New tokens decoded greedily (EOS blocked until then).
    #[arg(long, default_value_t = 32)]
    new_tokens: usize,
    /// Attention kernel: Burn's fused operator (the `kosmos` default) or the explicit product.
    #[arg(long, value_enum, default_value_t = Attention::Fused)]
    attention: Attention,
    /// Also time the parts: decoder alone, head over all / the last position, one decode step.
    #[arg(long)]
    breakdown: bool,
    /// Answer `run` lines on stdin with one JSON repeat each (for an alternating driver).
    #[arg(long)]
    serve: bool,
    /// Weight modes to time, comma-separated: f32, bf16, q8 (packed copies for decode steps).
    #[arg(long, value_delimiter = ',', default_value = "f32")]
    weights: Vec<WeightMode>,
}

/// Attention kernels (`--attention`).
#[derive(Clone, Copy, Debug, ValueEnum)]
enum Attention {
    /// Burn's fused attention operator.
    Fused,
    /// Explicit scores, mask, softmax, product.
    Explicit,
}

/// How many logits of the last position each repeat reports (`last_logits_head`).
const LOGITS_CHECKED: usize = 16;

/// The inputs of `inputs.safetensors`, on the host.
struct HostInputs {
    input_ids: Vec<i64>,
    attention_mask: Vec<i64>,
    image_mask: Vec<i64>,
    len: usize,
    pixels: Vec<f32>,
    pixel_shape: [usize; 4],
}

fn read_inputs(path: &Path) -> Result<HostInputs, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read `{}`: {e}", path.display()))?;
    let st =
        SafeTensors::deserialize(&bytes).map_err(|e| format!("`{}` is not a safetensors file: {e}", path.display()))?;
    let get = |name: &str| {
        st.tensor(name)
            .map_err(|_| format!("`{}` has no tensor `{name}`", path.display()))
    };
    let ints = |name: &str| -> Result<(Vec<i64>, Vec<usize>), String> {
        let t = get(name)?;
        if t.dtype() != Dtype::I64 {
            return Err(format!(
                "`{name}` in `{}` must be int64, is {:?}",
                path.display(),
                t.dtype()
            ));
        }
        let v = t
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        Ok((v, t.shape().to_vec()))
    };
    let (input_ids, ids_shape) = ints("input_ids")?;
    let (attention_mask, am_shape) = ints("attention_mask")?;
    let (image_mask, im_shape) = ints("image_embeds_position_mask")?;
    if ids_shape.len() != 2 || ids_shape[0] != 1 || ids_shape[1] == 0 {
        return Err(format!("input_ids must be [1, len], is {ids_shape:?}"));
    }
    if am_shape != ids_shape || im_shape != ids_shape {
        return Err(format!(
            "attention_mask {am_shape:?} and image_embeds_position_mask {im_shape:?} must match input_ids {ids_shape:?}"
        ));
    }
    let px = get("pixel_values")?;
    if px.dtype() != Dtype::F32 || px.shape().len() != 4 || px.shape()[0] != 1 {
        return Err(format!(
            "pixel_values must be f32 [1, 3, H, W], is {:?} {:?}",
            px.dtype(),
            px.shape()
        ));
    }
    let s = px.shape();
    let pixels = px
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect();
    Ok(HostInputs {
        len: ids_shape[1],
        input_ids,
        attention_mask,
        image_mask,
        pixels,
        pixel_shape: [s[0], s[1], s[2], s[3]],
    })
}

/// The timing job, run on the backend `--device` names.
struct Compare {
    cli: Cli,
    inputs: HostInputs,
}

fn secs(start: Instant) -> f64 {
    start.elapsed().as_secs_f64()
}

fn sync<B: Backend>(device: &B::Device) -> Result<(), String> {
    B::sync(device).map_err(|e| format!("backend failure: {e:?}"))
}

/// One timed repeat of every phase.
fn repeat<B: Backend>(
    model: &Kosmos2<B>,
    input: &Kosmos2Input<B>,
    config: &GenerationConfig,
    breakdown: bool,
    device: &B::Device,
) -> Result<Value, String> {
    let pixels = input.pixel_values.clone().expect("pixels are always given");
    let image_mask = input.image_embeds_position_mask.as_ref().expect("mask is always given");

    sync::<B>(device)?;
    let start = Instant::now();
    let embeds = model.image_embeds(pixels);
    sync::<B>(device)?;
    let vision_s = secs(start);

    let start = Instant::now();
    let out = model.forward(input).map_err(|e| e.to_string())?;
    sync::<B>(device)?;
    let forward_s = secs(start);
    // The first logits of the last position, for the driver's f32 parity check.
    let [_, len, vocab] = out.logits.dims();
    let logits_head: Vec<f32> = out
        .logits
        .slice([0..1, len - 1..len, 0..LOGITS_CHECKED.min(vocab)])
        .into_data()
        .convert::<f32>()
        .to_vec()
        .map_err(|e| format!("cannot read the logits: {e:?}"))?;

    let output = generate(model, input, config, None).map_err(|e| e.to_string())?;
    let t = output.timings;
    let decode_per_token_s = if t.decode_steps == 0 {
        0.0
    } else {
        t.decode.as_secs_f64() / t.decode_steps as f64
    };
    let mut record = json!({
        "vision_s": vision_s,
        "forward_s": forward_s,
        "ttft_s": t.prefill.as_secs_f64(),
        "decode_per_token_s": decode_per_token_s,
        "decode_steps": t.decode_steps,
        "tokens": output.new_tokens[0],
        "last_logits_head": logits_head,
    });
    if breakdown {
        let parts = parts(model, input, &embeds, image_mask, config, device)?;
        record.as_object_mut().expect("object").extend(parts);
    }
    Ok(record)
}

/// The breakdown: decoder and head separately, on the prompt and per cached decode step.
fn parts<B: Backend>(
    model: &Kosmos2<B>,
    input: &Kosmos2Input<B>,
    embeds: &Tensor<B, 3>,
    image_mask: &Tensor<B, 2, Int>,
    config: &GenerationConfig,
    device: &B::Device,
) -> Result<serde_json::Map<String, Value>, String> {
    let image = Some((embeds, image_mask));
    let mask = input.attention_mask.as_ref();
    sync::<B>(device)?;
    let start = Instant::now();
    let hidden = model
        .text_hidden(&input.input_ids, mask, image, None)
        .map_err(|e| e.to_string())?;
    sync::<B>(device)?;
    let decoder_prompt_s = secs(start);

    let start = Instant::now();
    let logits = model.logits(hidden.clone());
    sync::<B>(device)?;
    let head_all_s = secs(start);
    drop(logits);

    let start = Instant::now();
    let last = model.last_logits(hidden.clone());
    sync::<B>(device)?;
    let head_last_s = secs(start);
    drop(last);

    // The tied head as it is stored (`[vocab, embed]`, used transposed) against a copy stored
    // `[embed, vocab]` once: what a pre-transposed head weight would cost.
    let weight = model.text_model.model.embed_tokens.weight.val();
    let stored = Tensor::<B, 2>::from_data(weight.transpose().into_data(), device);
    sync::<B>(device)?;
    let start = Instant::now();
    let all = burn::tensor::module::linear(hidden.clone(), stored.clone(), None);
    sync::<B>(device)?;
    let head_all_transposed_s = secs(start);
    drop(all);
    let start = Instant::now();
    let [_, t, _] = hidden.dims();
    let last = burn::tensor::module::linear(hidden.clone().narrow(1, t - 1, 1), stored, None);
    sync::<B>(device)?;
    let head_last_transposed_s = secs(start);
    drop(last);

    // Cached decode steps feeding a fixed token: the decoder step and the head (with the logits
    // brought to the host, as generation does) timed apart.
    let steps = config.max_new_tokens.unwrap_or(1).saturating_sub(1).max(1);
    let mut cache = model.new_cache();
    let [_, len] = input.input_ids.dims();
    model
        .text_hidden(&input.input_ids, mask, image, Some(&mut cache))
        .map_err(|e| e.to_string())?;
    let (mut step_decoder, mut step_head) = (0.0, 0.0);
    for step in 0..steps {
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(vec![4i64], [1, 1]), device);
        let total = len + step + 1;
        let mask = Tensor::<B, 2, Int>::from_data(TensorData::new(vec![1i64; total], [1, total]), device);
        sync::<B>(device)?;
        let start = Instant::now();
        let h = model
            .text_hidden(&ids, Some(&mask), None, Some(&mut cache))
            .map_err(|e| e.to_string())?;
        sync::<B>(device)?;
        step_decoder += secs(start);
        let start = Instant::now();
        let host = model.last_logits(h).into_data();
        step_head += secs(start);
        drop(host);
    }
    let mut out = serde_json::Map::new();
    out.insert("decoder_prompt_s".into(), json!(decoder_prompt_s));
    out.insert("head_all_s".into(), json!(head_all_s));
    out.insert("head_last_s".into(), json!(head_last_s));
    out.insert("head_all_transposed_s".into(), json!(head_all_transposed_s));
    out.insert("head_last_transposed_s".into(), json!(head_last_transposed_s));
    out.insert("step_decoder_s".into(), json!(step_decoder / steps as f64));
    out.insert("step_head_s".into(), json!(step_head / steps as f64));
    Ok(out)
}

/// The logits of every greedy step with the tokens given (teacher forcing): the prompt's last
/// position, then one cached step per token but the last.
fn forced_logits<B: Backend>(
    model: &Kosmos2<B>,
    input: &Kosmos2Input<B>,
    tokens: &[u32],
    device: &B::Device,
) -> Result<Vec<Vec<f32>>, String> {
    let pixels = input.pixel_values.clone().expect("pixels are always given");
    let image_mask = input.image_embeds_position_mask.as_ref().expect("mask is always given");
    let embeds = model.image_embeds(pixels);
    let mut cache = model.new_cache();
    let [_, len] = input.input_ids.dims();
    let host = |logits: Tensor<B, 2>| -> Result<Vec<f32>, String> {
        logits
            .into_data()
            .convert::<f32>()
            .to_vec()
            .map_err(|e| format!("cannot read the logits: {e:?}"))
    };
    let h = model
        .text_hidden(
            &input.input_ids,
            input.attention_mask.as_ref(),
            Some((&embeds, image_mask)),
            Some(&mut cache),
        )
        .map_err(|e| e.to_string())?;
    let mut out = vec![host(model.last_logits(h))?];
    for (step, &token) in tokens.iter().take(tokens.len().saturating_sub(1)).enumerate() {
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(vec![token as i64], [1, 1]), device);
        let total = len + step + 1;
        let mask = Tensor::<B, 2, Int>::from_data(TensorData::new(vec![1i64; total], [1, total]), device);
        let h = model
            .text_hidden(&ids, Some(&mask), None, Some(&mut cache))
            .map_err(|e| e.to_string())?;
        out.push(host(model.last_logits(h))?);
    }
    Ok(out)
}

fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .fold(
            (0, f32::NEG_INFINITY),
            |(bi, bv), (i, &x)| if x > bv { (i, x) } else { (bi, bv) },
        )
        .0
}

/// A packed model's logits and greedy tokens against the f32 model's (see the module doc).
fn accuracy<B: Backend>(
    reference: &Kosmos2<B>,
    packed: &Kosmos2<B>,
    input: &Kosmos2Input<B>,
    config: &GenerationConfig,
    device: &B::Device,
) -> Result<Value, String> {
    let tokens = generate(reference, input, config, None)
        .map_err(|e| e.to_string())?
        .new_tokens[0]
        .clone();
    let own = generate(packed, input, config, None)
        .map_err(|e| e.to_string())?
        .new_tokens[0]
        .clone();
    let want = forced_logits(reference, input, &tokens, device)?;
    let got = forced_logits(packed, input, &tokens, device)?;
    let (mut max_diff, mut max_logit, mut sum_sq_diff, mut sum_sq, mut agree) = (0f32, 0f32, 0f64, 0f64, 0);
    for (w, g) in want.iter().zip(&got) {
        for (a, b) in w.iter().zip(g) {
            max_diff = max_diff.max((a - b).abs());
            max_logit = max_logit.max(a.abs());
            sum_sq_diff += ((a - b) as f64).powi(2);
            sum_sq += (*a as f64).powi(2);
        }
        agree += usize::from(argmax(w) == argmax(g));
    }
    let same_prefix = tokens.iter().zip(&own).take_while(|(a, b)| a == b).count();
    let same = tokens.iter().zip(&own).filter(|(a, b)| a == b).count();
    Ok(json!({
        "steps": want.len(),
        "max_abs_logit_diff": max_diff,
        "max_abs_logit": max_logit,
        "relative_rms_logit_diff": (sum_sq_diff / sum_sq.max(f64::MIN_POSITIVE)).sqrt(),
        "forced_argmax_agree": agree,
        "greedy_tokens": own.len(),
        "greedy_same_prefix": same_prefix,
        "greedy_same": same,
    }))
}

fn emit(value: &Value) -> Result<(), String> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{value}")
        .and_then(|_| out.flush())
        .map_err(|e| format!("cannot write to stdout: {e}"))
}

impl BackendTask for Compare {
    type Output = Result<(), String>;

    fn run<B: Backend>(self, device: B::Device) -> Self::Output {
        let cli = &self.cli;
        let h = &self.inputs;
        let start = Instant::now();
        if cli.weights.is_empty() {
            return Err("--weights needs at least one mode".into());
        }
        let mut model = Kosmos2::<B>::from_pretrained(&cli.model, &device).map_err(|e| e.to_string())?;
        model.set_attention_impl(match cli.attention {
            Attention::Fused => AttentionImpl::Fused,
            Attention::Explicit => AttentionImpl::Explicit,
        });
        sync::<B>(&device)?;
        let load_s = secs(start);
        let int = |v: &[i64]| Tensor::<B, 2, Int>::from_data(TensorData::new(v.to_vec(), [1, h.len]), &device);
        let input = Kosmos2Input {
            input_ids: int(&h.input_ids),
            attention_mask: Some(int(&h.attention_mask)),
            image_embeds_position_mask: Some(int(&h.image_mask)),
            pixel_values: Some(Tensor::<B, 4>::from_data(
                TensorData::new(h.pixels.clone(), h.pixel_shape),
                &device,
            )),
        };
        let mut config = GenerationConfig::greedy(cli.new_tokens);
        config.min_new_tokens = cli.new_tokens;
        // One model per weight mode; the packed ones share the f32 model's weights (a clone of a
        // module shares its tensors) and add their packed copies.
        let mut models: Vec<(WeightMode, Kosmos2<B>)> = Vec::new();
        let mut accuracies = serde_json::Map::new();
        let mut pack_s = serde_json::Map::new();
        for &mode in &cli.weights {
            if models.iter().any(|(m, _)| *m == mode) {
                continue;
            }
            let mut m = model.clone();
            let start = Instant::now();
            m.pack_weights(mode);
            sync::<B>(&device)?;
            pack_s.insert(mode.to_string(), json!(secs(start)));
            if mode != WeightMode::F32 {
                accuracies.insert(mode.to_string(), accuracy(&model, &m, &input, &config, &device)?);
            }
            models.push((mode, m));
        }
        drop(model);
        for (_, model) in &models {
            for _ in 0..cli.warmup {
                repeat(model, &input, &config, cli.breakdown, &device)?;
            }
        }
        let header = json!({
            "implementation": "kosmos-burn",
            "device": cli.device,
            "attention": format!("{:?}", cli.attention).to_lowercase(),
            "load_s": load_s,
            "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            "weights": models.iter().map(|(m, _)| m.to_string()).collect::<Vec<_>>(),
            "pack_s": pack_s,
            "accuracy": accuracies,
            // Bytes of the process on 2 MiB pages (`kosmos_core::memory`); null off Linux.
            "huge_page_bytes": kosmos_core::memory::process_huge_bytes(),
        });
        let find = |name: &str| -> Result<&Kosmos2<B>, String> {
            let mode: WeightMode = name.parse()?;
            models
                .iter()
                .find(|(m, _)| *m == mode)
                .map(|(_, model)| model)
                .ok_or_else(|| format!("weight mode `{mode}` was not loaded (--weights)"))
        };
        if cli.serve {
            let mut ready = header;
            ready["ready"] = json!(true);
            emit(&ready)?;
            for line in std::io::stdin().lock().lines() {
                let line = line.map_err(|e| format!("cannot read stdin: {e}"))?;
                let words: Vec<&str> = line.split_whitespace().collect();
                match words.as_slice() {
                    ["run"] => emit(&repeat(&models[0].1, &input, &config, cli.breakdown, &device)?)?,
                    ["run", mode] => emit(&repeat(find(mode)?, &input, &config, cli.breakdown, &device)?)?,
                    ["quit"] => break,
                    [] => {}
                    _ => {
                        return Err(format!(
                            "unknown command `{}` on stdin (expected `run`, `run MODE` or `quit`)",
                            line.trim()
                        ));
                    }
                }
            }
            Ok(())
        } else {
            let mut all = header;
            for (mode, model) in &models {
                let repeats = (0..cli.repeats)
                    .map(|_| repeat(model, &input, &config, cli.breakdown, &device))
                    .collect::<Result<Vec<_>, _>>()?;
                let key = if *mode == WeightMode::F32 {
                    "repeats".to_string()
                } else {
                    format!("repeats_{mode}")
                };
                all[key] = json!(repeats);
            }
            emit(&all)
        }
    }
}

fn main() -> ExitCode {
    // One line on stderr, never a backtrace.
    kosmos_infer::install_panic_hook();
    let cli = Cli::parse();
    let result = std::panic::catch_unwind(move || -> Result<(), String> {
        if cli.new_tokens == 0 {
            return Err("--new-tokens must be at least 1".into());
        }
        let inputs = read_inputs(&cli.inputs)?;
        let device = cli.device.clone();
        run_task(&device, Compare { cli, inputs }).map_err(|e| e.to_string())?
    });
    match result {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
        Err(_) => ExitCode::FAILURE,
    }
}
