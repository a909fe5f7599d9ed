//! The `generate`, `ground` and `refer` commands of the `kosmos` tool: argument types, the paper's
//! task prompts, and the run that loads a model directory on the chosen backend, generates, and
//! prints human-readable text or one JSON object per image.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::prelude::*;
use burn::tensor::DType;
use clap::{Args, ValueEnum};
use kosmos_core::backend::{BackendKind, BackendTask, run_task};
use kosmos_core::packed::WeightMode;
use kosmos_models::grounding::{BoxXyxy, bbox_to_tokens};
use kosmos_vision::RgbImage;
use kosmos_vision::preprocess::load_rgb;
use serde_json::json;

use crate::annotate::{Annotation, save_annotated};
use crate::generate::{GenerationConfig, TokenEvent};
use crate::pipeline::{Answer, Answers, Kosmos2Pipeline, Request, check_model_dir};

/// Where the model comes from, and where it runs.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// A local Hugging Face model directory (config.json, model.safetensors, tokenizer.json,
    /// preprocessor_config.json); with the `hub` feature also a hub repository id. Default (or
    /// `builtin`): the tiny shapes-world model compiled into this binary.
    #[arg(long, value_name = "DIR")]
    pub model: Option<String>,
    /// A LoRA adapter directory in PEFT's format (`adapter_config.json`,
    /// `adapter_model.safetensors`; what `kosmos train` writes to `final/adapter/`), merged into
    /// the model's weights at load time.
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,
    /// Backend and device: flex, ndarray, wgpu, cuda (optionally `cuda:1`). Default: the first
    /// compiled CPU backend.
    #[arg(long)]
    pub device: Option<String>,
    /// Parameter precision.
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    pub dtype: Precision,
    /// Attention kernel: Burn's fused attention, or the explicit softmax(QKᵀ)V product.
    #[arg(long, value_enum, default_value_t = AttentionKernel::Fused)]
    pub attention: AttentionKernel,
    /// Weights of the decode steps: f32 (exact), or a bf16 or Q8 (int8 in blocks of 32) copy of
    /// the text decoder's projections and the head, read by the one-row products of each new
    /// token (faster on the CPU; the prompt and the image keep the f32 weights).
    #[arg(long, value_name = "MODE", default_value = "f32")]
    pub weights: WeightMode,
}

impl ModelArgs {
    /// Load the model directory `dir` (with `--adapter` merged, in `--dtype`, with the
    /// `--attention` kernel) on `device`.
    pub fn load_pipeline<B: Backend>(&self, dir: &Path, device: &B::Device) -> Result<Kosmos2Pipeline<B>, String> {
        let mut pipeline =
            Kosmos2Pipeline::<B>::load_with_adapter(dir, self.adapter.as_deref(), device, self.dtype.dtype())
                .map_err(|e| e.to_string())?;
        pipeline.model.set_attention_impl(self.attention.implementation());
        pipeline.model.pack_weights(self.weights);
        Ok(pipeline)
    }
}

/// Attention kernel choice of the command line.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionKernel {
    /// Burn's fused attention module op (the default).
    Fused,
    /// Explicit scores, mask, softmax and product (transformers' eager attention).
    Explicit,
}

impl AttentionKernel {
    /// The model-side choice.
    pub fn implementation(self) -> kosmos_core::AttentionImpl {
        match self {
            Self::Fused => kosmos_core::AttentionImpl::Fused,
            Self::Explicit => kosmos_core::AttentionImpl::Explicit,
        }
    }
}

/// Parameter precision of a loaded model.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// 32-bit floats (parity with the reference).
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    Bf16,
}

impl Precision {
    /// The Burn dtype.
    pub fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::F16 => DType::F16,
            Self::Bf16 => DType::BF16,
        }
    }
}

/// Decoding options; unset ones come from the model's `generation_config.json`, else greedy.
#[derive(Args, Debug, Clone, Default)]
pub struct DecodeArgs {
    /// New tokens at most (default: the model's generation_config.json, else 128).
    #[arg(long, value_name = "N")]
    pub max_new_tokens: Option<usize>,
    /// EOS is forbidden before this many new tokens.
    #[arg(long, value_name = "N")]
    pub min_new_tokens: Option<usize>,
    /// Beam search with K beams.
    #[arg(long, value_name = "K")]
    pub num_beams: Option<usize>,
    /// Beam search length penalty (score / length^P).
    #[arg(long, value_name = "P")]
    pub length_penalty: Option<f32>,
    /// Sample instead of greedy search (implied by --temperature, --top-k and --top-p).
    #[arg(long)]
    pub sample: bool,
    /// Sampling temperature.
    #[arg(long, value_name = "T")]
    pub temperature: Option<f32>,
    /// Sample among the K most likely tokens (0 = all).
    #[arg(long, value_name = "K")]
    pub top_k: Option<usize>,
    /// Nucleus sampling: the smallest set of tokens with probability mass P.
    #[arg(long, value_name = "P")]
    pub top_p: Option<f64>,
    /// Seed of the sampling stream (same seed, same output).
    #[arg(long, value_name = "S")]
    pub seed: Option<u64>,
    /// Never repeat an n-gram of this size (the KOSMOS-2 demo used 3).
    #[arg(long, value_name = "N")]
    pub no_repeat_ngram: Option<usize>,
    /// Penalise tokens already present (1 = off).
    #[arg(long, value_name = "R")]
    pub repetition_penalty: Option<f32>,
    /// Extra token ids that end generation (besides EOS); repeatable.
    #[arg(long = "stop-token", value_name = "ID")]
    pub stop_tokens: Vec<u32>,
}

impl DecodeArgs {
    /// Apply the options over a model's defaults.
    pub fn apply(&self, mut c: GenerationConfig) -> GenerationConfig {
        if let Some(v) = self.max_new_tokens {
            c.max_new_tokens = Some(v);
        }
        if let Some(v) = self.min_new_tokens {
            c.min_new_tokens = v;
        }
        if let Some(v) = self.num_beams {
            c.num_beams = v;
        }
        if let Some(v) = self.length_penalty {
            c.length_penalty = v;
        }
        if self.sample || self.temperature.is_some() || self.top_k.is_some() || self.top_p.is_some() {
            c.do_sample = true;
        }
        if let Some(v) = self.temperature {
            c.temperature = v;
        }
        if let Some(v) = self.top_k {
            c.top_k = v;
        }
        if let Some(v) = self.top_p {
            c.top_p = v;
        }
        if let Some(v) = self.seed {
            c.seed = v;
        }
        if let Some(v) = self.no_repeat_ngram {
            c.no_repeat_ngram_size = v;
        }
        if let Some(v) = self.repetition_penalty {
            c.repetition_penalty = v;
        }
        for &t in &self.stop_tokens {
            if !c.eos_token_ids.contains(&t) {
                c.eos_token_ids.push(t);
            }
        }
        c
    }
}

/// How results are written.
#[derive(Args, Debug, Clone, Default)]
pub struct OutputArgs {
    /// Print one JSON object per image (one per line) on stdout.
    #[arg(long)]
    pub json: bool,
    /// Draw the entities' boxes and phrases on the image and write it here (with several images,
    /// `-0`, `-1`, ... is inserted before the extension).
    #[arg(long, value_name = "OUT.png")]
    pub annotate: Option<PathBuf>,
}

/// The paper's task prompts (KOSMOS-2, Peng et al. 2023, and the model card's examples).
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// Brief caption: `An image of`.
    Caption,
    /// Detailed caption: `Describe this image in detail:`.
    DetailedCaption,
    /// Visual question answering: `Question: {question} Answer:`.
    Vqa,
    /// Grounded caption: `<grounding>An image of`.
    GroundedCaption,
    /// Grounded VQA: `<grounding> Question: {question} Answer:`.
    GroundedVqa,
    /// Phrase grounding / referring-expression comprehension: `<grounding><phrase> {phrase}</phrase>`.
    Comprehension,
    /// Referring-expression generation for a box:
    /// `<grounding><phrase> It</phrase><object>{box}</object> is`.
    ReferringGeneration,
}

impl Task {
    /// The prompt for this task; `question`, `phrase` and `bbox` are required where the task
    /// uses them.
    pub fn prompt(
        self,
        question: Option<&str>,
        phrase: Option<&str>,
        bbox: Option<BoxXyxy>,
        grid: usize,
    ) -> Result<String, String> {
        let need = |v: Option<&str>, flag: &str| {
            v.map(str::to_string)
                .ok_or_else(|| format!("--task {} needs {flag}", self.name()))
        };
        Ok(match self {
            Self::Caption => "An image of".into(),
            Self::DetailedCaption => "Describe this image in detail:".into(),
            Self::Vqa => format!("Question: {} Answer:", need(question, "--question")?),
            Self::GroundedCaption => "<grounding>An image of".into(),
            Self::GroundedVqa => format!("<grounding> Question: {} Answer:", need(question, "--question")?),
            Self::Comprehension => phrase_prompt(&need(phrase, "--phrase")?),
            Self::ReferringGeneration => {
                let b = bbox.ok_or_else(|| format!("--task {} needs --box x1,y1,x2,y2", self.name()))?;
                let [ul, lr] = bbox_to_tokens(b, grid).map_err(|e| format!("--box: {e}"))?;
                format!("<grounding><phrase> It</phrase><object>{ul}{lr}</object> is")
            }
        })
    }

    /// The name as typed on the command line.
    pub fn name(self) -> String {
        self.to_possible_value()
            .map(|v| v.get_name().to_string())
            .unwrap_or_default()
    }
}

/// `<grounding><phrase> {phrase}</phrase>`, the comprehension prompt.
pub fn phrase_prompt(phrase: &str) -> String {
    format!("<grounding><phrase> {}</phrase>", phrase.trim())
}

/// `<grounding>` followed by the prompt (unless it already starts with it).
pub fn grounded_prompt(prompt: &str) -> String {
    if prompt.trim_start().starts_with("<grounding>") {
        prompt.to_string()
    } else {
        format!("<grounding>{prompt}")
    }
}

/// Parse `x1,y1,x2,y2` (normalised).
pub fn parse_box(s: &str) -> Result<BoxXyxy, String> {
    let v: Vec<f64> = s
        .split(',')
        .map(|p| p.trim().parse::<f64>())
        .collect::<Result<_, _>>()
        .map_err(|_| format!("--box `{s}`: expected four numbers x1,y1,x2,y2"))?;
    match v.as_slice() {
        &[x1, y1, x2, y2] => Ok([x1, y1, x2, y2]),
        _ => Err(format!("--box `{s}`: expected four numbers x1,y1,x2,y2")),
    }
}

/// What a run does with the answers.
#[derive(Clone, Debug, PartialEq)]
pub enum Mode {
    /// Print the text (and entities, if any).
    Generate,
    /// Grounded caption: print the clean text and each entity.
    Ground,
    /// Comprehension: print the box of the phrase.
    Refer {
        /// The phrase.
        phrase: String,
    },
}

/// One invocation: model, images, prompts, decoding and output options.
#[derive(Clone, Debug)]
pub struct Job {
    /// Model and device.
    pub model: ModelArgs,
    /// Image files (empty: text only).
    pub images: Vec<PathBuf>,
    /// One prompt for all images, or one per image.
    pub prompts: Vec<String>,
    /// Decoding options.
    pub decode: DecodeArgs,
    /// Output options.
    pub output: OutputArgs,
    /// What to print.
    pub mode: Mode,
}

/// The default device of this build (the first compiled backend).
pub fn default_device() -> String {
    BackendKind::default_compiled().map_or_else(|| "flex".into(), |k| k.name().to_string())
}

fn annotate_path(base: &Path, index: usize, count: usize) -> PathBuf {
    if count <= 1 {
        return base.to_path_buf();
    }
    let stem = base
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default();
    let name = match base.extension() {
        Some(ext) => format!("{stem}-{index}.{}", ext.to_string_lossy()),
        None => format!("{stem}-{index}"),
    };
    base.with_file_name(name)
}

/// Resolve `--model`: none or `builtin` is the embedded shapes-world model
/// ([`crate::builtin`]), otherwise a local directory or (with the `hub` feature) a hub
/// repository id.
pub fn resolve_model(model: Option<&str>) -> Result<PathBuf, String> {
    let model = match model {
        None => return crate::builtin::model_dir(),
        Some(m) if m == crate::builtin::BUILTIN_NAME && !Path::new(m).exists() => return crate::builtin::model_dir(),
        Some(m) => m,
    };
    let path = PathBuf::from(model);
    if path.exists() {
        return Ok(path);
    }
    #[cfg(feature = "hub")]
    {
        if model.contains('/') && !model.starts_with('.') && !model.starts_with('/') {
            return crate::hub::download(model);
        }
    }
    Err(format!("`{model}`: model directory not found"))
}

impl Job {
    fn requests(&self, images: Vec<RgbImage>) -> Result<Vec<Request>, String> {
        let n = images.len().max(1);
        let prompts: Vec<String> = match self.prompts.len() {
            0 => return Err("no prompt given".into()),
            1 => vec![self.prompts[0].clone(); n],
            k if k == n => self.prompts.clone(),
            k => return Err(format!("{k} prompts for {n} images: give one prompt, or one per image")),
        };
        if images.is_empty() {
            return Ok(prompts
                .into_iter()
                .map(|prompt| Request { image: None, prompt })
                .collect());
        }
        Ok(images
            .into_iter()
            .zip(prompts)
            .map(|(image, prompt)| Request {
                image: Some(image),
                prompt,
            })
            .collect())
    }

    /// Run on the chosen backend; prints results to stdout and progress to stderr.
    pub fn run(self) -> Result<(), String> {
        let device = self.model.device.clone().unwrap_or_else(default_device);
        // Cheap checks first: the model directory and every image, before loading weights.
        let dir = resolve_model(self.model.model.as_deref())?;
        check_model_dir(&dir).map_err(|e| e.to_string())?;
        let images = self
            .images
            .iter()
            .map(|p| load_rgb(p, kosmos_vision::ImageProcessorConfig::DEFAULT_MAX_PIXELS).map_err(|e| e.to_string()))
            .collect::<Result<Vec<_>, _>>()?;
        let requests = self.requests(images)?;
        run_task(
            &device,
            Run {
                job: self,
                dir,
                requests,
            },
        )
        .map_err(|e| e.to_string())?
    }
}

struct Run {
    job: Job,
    dir: PathBuf,
    requests: Vec<Request>,
}

fn progress(enabled: bool, message: &str) {
    if enabled {
        eprintln!("{message}");
    }
}

impl BackendTask for Run {
    type Output = Result<(), String>;

    fn run<B: Backend>(self, device: B::Device) -> Self::Output {
        let job = &self.job;
        // Progress goes to stderr, and only to a terminal (logs and pipes get results and errors).
        let human = !job.output.json && std::io::stderr().is_terminal();
        let start = Instant::now();
        progress(human, &format!("loading {} ...", self.dir.display()));
        let pipeline = job.model.load_pipeline::<B>(&self.dir, &device)?;
        progress(human, &format!("loaded in {:.1} s", start.elapsed().as_secs_f64()));
        let config = job.decode.apply(pipeline.generation.clone());
        let mut count = 0usize;
        let mut on_token = |_: TokenEvent| {
            count += 1;
            if human {
                eprint!("\rgenerating: {count} tokens");
                let _ = std::io::stderr().flush();
            }
        };
        let answers = pipeline
            .run(&self.requests, &config, Some(&mut on_token))
            .map_err(|e| e.to_string())?;
        if human {
            eprintln!();
        }
        for (i, answer) in answers.answers.iter().enumerate() {
            let image = job.images.get(i);
            if job.output.json {
                println!(
                    "{}",
                    answer_json(answer, image, &self.requests[i].prompt, &answers, &job.mode)
                );
            } else {
                print!("{}", answer_text(answer, image, &answers, &job.mode));
            }
            if let (Some(out), Some(img)) = (&job.output.annotate, &self.requests[i].image) {
                let path = annotate_path(out, i, self.requests.len());
                let rgb = image::RgbImage::from_raw(img.width as u32, img.height as u32, img.pixels.clone())
                    .ok_or("image buffer size mismatch")?;
                let notes: Vec<Annotation> = answer
                    .entities
                    .iter()
                    .map(|e| {
                        Annotation::new(
                            e.phrase.clone(),
                            e.boxes
                                .iter()
                                .map(|b| [b[0] as f32, b[1] as f32, b[2] as f32, b[3] as f32])
                                .collect(),
                        )
                    })
                    .collect();
                save_annotated(&rgb, &notes, &path).map_err(|e| e.to_string())?;
                progress(human, &format!("wrote {}", path.display()));
            }
        }
        Ok(())
    }
}

fn round6(v: f64) -> f64 {
    (v * 1e6).round() / 1e6
}

/// The JSON object printed for one image.
pub fn answer_json(answer: &Answer, image: Option<&PathBuf>, prompt: &str, all: &Answers, mode: &Mode) -> String {
    let entities: Vec<serde_json::Value> = answer
        .entities
        .iter()
        .map(|e| {
            json!({
                "phrase": e.phrase,
                "span": [e.span.0, e.span.1],
                "boxes": e.boxes.iter().map(|b| [round6(b[0]), round6(b[1]), round6(b[2]), round6(b[3])]).collect::<Vec<_>>(),
            })
        })
        .collect();
    let t = &all.timings;
    let mut obj = json!({
        "image": image.map(|p| p.display().to_string()),
        "prompt": prompt,
        "text": answer.text,
        "clean_text": answer.clean_text,
        "entities": entities,
        "token_ids": answer.token_ids,
        "prompt_token_ids": answer.prompt_token_ids,
        "timings": {
            "preprocess_ms": all.preprocess.as_secs_f64() * 1e3,
            "prefill_ms": t.prefill.as_secs_f64() * 1e3,
            "decode_ms": t.decode.as_secs_f64() * 1e3,
            "tokens_per_s": t.steps_per_second(),
        },
    });
    if let Some(s) = answer.score {
        obj["score"] = json!(s);
    }
    if let Mode::Refer { phrase } = mode {
        obj["phrase"] = json!(phrase);
        obj["box"] = json!(refer_box(answer).map(|b| [round6(b[0]), round6(b[1]), round6(b[2]), round6(b[3])]));
    }
    obj.to_string()
}

/// The first box of the first entity (the referred phrase's box), if the model produced one.
pub fn refer_box(answer: &Answer) -> Option<BoxXyxy> {
    answer.entities.iter().find_map(|e| e.boxes.first().copied())
}

fn fmt_box(b: &BoxXyxy) -> String {
    format!("({:.3}, {:.3}, {:.3}, {:.3})", b[0], b[1], b[2], b[3])
}

/// The human-readable report for one image.
pub fn answer_text(answer: &Answer, image: Option<&PathBuf>, all: &Answers, mode: &Mode) -> String {
    let mut s = String::new();
    if let Some(p) = image {
        s += &format!("image: {}\n", p.display());
    }
    match mode {
        Mode::Refer { phrase } => match refer_box(answer) {
            Some(b) => s += &format!("{phrase}: {}\n", fmt_box(&b)),
            None => s += &format!("{phrase}: no box generated (text: {})\n", answer.text),
        },
        Mode::Generate | Mode::Ground => {
            s += &format!("{}\n", answer.clean_text);
            if matches!(mode, Mode::Generate) && answer.text.trim() != answer.clean_text.trim() {
                s += &format!("raw: {}\n", answer.text);
            }
            for e in &answer.entities {
                let boxes: Vec<String> = e.boxes.iter().map(fmt_box).collect();
                s += &format!("  {} [{}, {}): {}\n", e.phrase, e.span.0, e.span.1, boxes.join(" "));
            }
        }
    }
    let t = &all.timings;
    s += &format!(
        "({} new tokens; prefill {:.0} ms, decode {:.0} ms, {:.1} tokens/s)\n",
        answer.token_ids.len(),
        t.prefill.as_secs_f64() * 1e3,
        t.decode.as_secs_f64() * 1e3,
        t.steps_per_second()
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_prompts() {
        assert_eq!(Task::Caption.prompt(None, None, None, 32).unwrap(), "An image of");
        assert_eq!(
            Task::GroundedVqa.prompt(Some("What is it?"), None, None, 32).unwrap(),
            "<grounding> Question: What is it? Answer:"
        );
        assert_eq!(
            Task::Comprehension.prompt(None, Some("a dog "), None, 32).unwrap(),
            "<grounding><phrase> a dog</phrase>"
        );
        let b = [0.390625, 0.046875, 0.984375, 0.828125];
        assert_eq!(
            Task::ReferringGeneration.prompt(None, None, Some(b), 32).unwrap(),
            "<grounding><phrase> It</phrase><object><patch_index_0044><patch_index_0863></object> is"
        );
        assert!(
            Task::Vqa
                .prompt(None, None, None, 32)
                .unwrap_err()
                .contains("--question")
        );
        assert!(
            Task::ReferringGeneration
                .prompt(None, None, None, 32)
                .unwrap_err()
                .contains("--box")
        );
    }

    #[test]
    fn boxes_parse() {
        assert_eq!(parse_box("0.1, 0.2,0.3,0.4").unwrap(), [0.1, 0.2, 0.3, 0.4]);
        assert!(parse_box("0.1,0.2,0.3").is_err());
        assert!(parse_box("a,b,c,d").is_err());
    }

    #[test]
    fn grounding_prefix_is_added_once() {
        assert_eq!(grounded_prompt("An image of"), "<grounding>An image of");
        assert_eq!(grounded_prompt("<grounding> Hi"), "<grounding> Hi");
    }

    #[test]
    fn annotate_paths_get_indices_for_batches() {
        let p = Path::new("out/pic.png");
        assert_eq!(annotate_path(p, 0, 1), PathBuf::from("out/pic.png"));
        assert_eq!(annotate_path(p, 1, 3), PathBuf::from("out/pic-1.png"));
    }

    #[test]
    fn decode_args_override_and_imply_sampling() {
        let args = DecodeArgs {
            top_p: Some(0.9),
            stop_tokens: vec![7, 2],
            ..DecodeArgs::default()
        };
        let c = args.apply(GenerationConfig::default());
        assert!(c.do_sample);
        assert_eq!(c.top_p, 0.9);
        assert_eq!(c.eos_token_ids, vec![2, 7]);
        let c = DecodeArgs::default().apply(GenerationConfig::default());
        assert!(!c.do_sample);
    }
}
