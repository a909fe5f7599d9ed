//! `kosmos`: the command-line tool of kosmos-burn.
//!
//! `info` (compiled backends, devices, presets), `generate` (any prompt, paper task presets),
//! `ground` (grounded captions with boxes), `refer` (the box of a phrase), `train` (a training
//! run from a TOML configuration, or its continuation from a checkpoint), `data shapes` (the
//! synthetic grounding world) and `eval` (grounding benchmarks).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use kosmos_infer::commands::{
    DecodeArgs, Job, Mode, ModelArgs, OutputArgs, Task, grounded_prompt, parse_box, phrase_prompt,
};
use kosmos_infer::eval::{EvalJob, EvalTask, locate};
use kosmos_infer::{info, train};

/// KOSMOS-1/KOSMOS-2 multimodal models on Burn.
#[derive(Parser, Debug)]
#[command(name = "kosmos", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Debug)]
struct ImageArgs {
    /// Input image (PNG, JPEG, WebP, GIF, BMP); repeat for a batch.
    #[arg(long = "image", value_name = "PATH")]
    images: Vec<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum DataCommand {
    /// Write the synthetic shapes world: images with coloured shapes, grounded captions,
    /// referring expressions, captions and text in the training formats, MDETR-style annotation
    /// files, a `data.toml` and a `summary.json` (with the location codec's ceiling).
    Shapes {
        /// Number of images.
        #[arg(long, default_value_t = 1000)]
        n: usize,
        /// Seed (the data set is a pure function of the settings).
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Output directory (created).
        #[arg(long)]
        out: PathBuf,
        /// Settings from a TOML file (the fields of `ShapesConfig`); --n and --seed override it.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Location grid side the boxes must be representable on.
        #[arg(long)]
        grid: Option<usize>,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug)]
struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// An annotation file in MDETR's COCO-style layout, or a directory written by
    /// `kosmos data shapes`.
    #[arg(long, value_name = "PATH")]
    data: PathBuf,
    /// Directory of the pictures (default: the data directory, or the annotation file's).
    #[arg(long, value_name = "DIR")]
    images: Option<PathBuf>,
    /// Evaluate only the first N sentences.
    #[arg(long, value_name = "N")]
    limit: Option<usize>,
    /// Prompts per generation batch (left-padded; 1 decodes each prompt alone). As in
    /// transformers, cached decode steps place a padded row's new tokens at positions shifted by
    /// its padding, which costs a model with absolute positions accuracy: the recorded figures
    /// use 1.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// New tokens per answer.
    #[arg(long, default_value_t = 16)]
    max_new_tokens: usize,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
    /// Write every prediction to this JSONL file.
    #[arg(long, value_name = "FILE")]
    predictions: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum EvalCommand {
    /// Referring-expression comprehension: accuracy at IoU >= 0.5 (RefCOCO/+/g files).
    Refexp(EvalArgs),
    /// Phrase grounding: recall@1 at IoU >= 0.5 (Flickr30k Entities separate-GT files).
    Grounding(EvalArgs),
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Evaluate grounding against annotation files.
    Eval {
        #[command(subcommand)]
        command: EvalCommand,
    },
    /// Data-set tools.
    Data {
        #[command(subcommand)]
        command: DataCommand,
    },
    /// Print the compiled backends, their devices and the model presets with their sizes.
    Info {
        /// Also run a small computation on each compiled backend to check its device works.
        #[arg(long)]
        probe: bool,
        /// Only probe this device (e.g. `flex`, `wgpu`, `cuda:0`).
        #[arg(long)]
        device: Option<String>,
    },
    /// Generate text for a prompt, with or without images.
    Generate {
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        images: ImageArgs,
        /// The prompt; repeat to give one per image.
        #[arg(long = "prompt", value_name = "TEXT", required_unless_present = "task")]
        prompts: Vec<String>,
        /// A paper task preset instead of --prompt.
        #[arg(long, value_enum, conflicts_with = "prompts")]
        task: Option<Task>,
        /// The question of the vqa tasks.
        #[arg(long)]
        question: Option<String>,
        /// The phrase of the comprehension task.
        #[arg(long)]
        phrase: Option<String>,
        /// The normalised box `x1,y1,x2,y2` of the referring-generation task.
        #[arg(long = "box", value_name = "X1,Y1,X2,Y2")]
        bbox: Option<String>,
        #[command(flatten)]
        decode: DecodeArgs,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Grounded captioning: the caption with each phrase's boxes.
    Ground {
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        images: ImageArgs,
        /// Text after `<grounding>`.
        #[arg(long, default_value = "An image of")]
        prompt: String,
        #[command(flatten)]
        decode: DecodeArgs,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Referring-expression comprehension: the box of a phrase.
    Refer {
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        images: ImageArgs,
        /// The referring expression.
        #[arg(long)]
        phrase: String,
        #[command(flatten)]
        decode: DecodeArgs,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Export a training checkpoint as a Hugging Face model directory (config.json,
    /// model.safetensors, tokenizer and processor files).
    Export {
        /// A checkpoint directory, a run's `checkpoints/` directory or the run directory (the
        /// newest checkpoint).
        #[arg(long, value_name = "DIR")]
        checkpoint: PathBuf,
        /// The model directory to write.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Backend and device that load the weights (default: the first compiled CPU backend).
        #[arg(long)]
        device: Option<String>,
    },
    /// Draw a run's loss curve as an SVG picture (from its `metrics.jsonl`).
    Plot {
        /// The run directory (its `metrics.jsonl`) or the metrics file itself.
        #[arg(long, value_name = "RUN_DIR|metrics.jsonl")]
        run: PathBuf,
        /// Where to write the picture.
        #[arg(long, value_name = "FILE.svg")]
        out: PathBuf,
        /// The title above the plot.
        #[arg(long, default_value = "training loss")]
        title: String,
    },
    /// Train from a TOML configuration, or continue a run from its checkpoint.
    Train {
        /// The training configuration (see the book's training chapter).
        #[arg(long, value_name = "FILE.toml", required_unless_present = "resume")]
        config: Option<PathBuf>,
        /// Continue the run of this checkpoint, `checkpoints/` or run directory (the newest
        /// checkpoint); with --config, it must be the run's configuration.
        #[arg(long, value_name = "DIR")]
        resume: Option<PathBuf>,
        /// Stop after this step (a checkpoint is written there); --resume continues later.
        #[arg(long, value_name = "STEP")]
        stop_after: Option<u64>,
        /// Backend and device: flex, ndarray, wgpu, cuda, cuda:1 (default: the first compiled).
        #[arg(long)]
        device: Option<String>,
        /// This node's rank in a multi-node run (over `nodes.rank` of the configuration).
        #[arg(long, value_name = "RANK")]
        node_rank: Option<u32>,
        /// This node's address in a multi-node run, ws://HOST:PORT (over `nodes.address`).
        #[arg(long, value_name = "ADDRESS")]
        node_address: Option<String>,
    },
    /// Serve the global orchestrator of a multi-node training run (`[nodes]` of the training
    /// configuration) until stopped.
    Orchestrator {
        /// The port to listen on (the port of `nodes.orchestrator`).
        #[arg(long)]
        port: u16,
    },
}

fn run(command: Command) -> Result<(), String> {
    let job = match command {
        Command::Info { probe, device } => {
            print!("{}", info::run(probe, device.as_deref())?);
            return Ok(());
        }
        Command::Eval { command } => {
            let (task, args) = match command {
                EvalCommand::Refexp(a) => (EvalTask::Refexp, a),
                EvalCommand::Grounding(a) => (EvalTask::Grounding, a),
            };
            return eval(task, args);
        }
        Command::Data {
            command:
                DataCommand::Shapes {
                    n,
                    seed,
                    out,
                    config,
                    grid,
                    json,
                },
        } => return data_shapes(n, seed, &out, config.as_deref(), grid, json),
        Command::Plot { run, out, title } => return train::plot(&run, &out, &title),
        Command::Export {
            checkpoint,
            out,
            device,
        } => {
            let device = device.unwrap_or_else(kosmos_infer::commands::default_device);
            return train::export(&checkpoint, &out, &device);
        }
        Command::Train {
            config,
            resume,
            stop_after,
            device,
            node_rank,
            node_address,
        } => {
            let device = device.unwrap_or_else(kosmos_infer::commands::default_device);
            let node = kosmos_train::trainer::NodeOverrides {
                rank: node_rank,
                address: node_address,
            };
            print!(
                "{}",
                train::run(config.as_deref(), resume.as_deref(), stop_after, &device, node)?
            );
            return Ok(());
        }
        Command::Orchestrator { port } => {
            eprintln!("serving the multi-node orchestrator on port {port} (stop with Ctrl-C)");
            return kosmos_train::collective::serve_orchestrator(port).map_err(|e| e.to_string());
        }
        Command::Generate {
            model,
            images,
            prompts,
            task,
            question,
            phrase,
            bbox,
            decode,
            output,
        } => {
            let prompts = match task {
                Some(task) => {
                    let bbox = bbox.as_deref().map(parse_box).transpose()?;
                    // The location grid of the released model; a tokenizer with another grid
                    // takes explicit location tags in --prompt.
                    vec![task.prompt(question.as_deref(), phrase.as_deref(), bbox, 32)?]
                }
                None => prompts,
            };
            Job {
                model,
                images: images.images,
                prompts,
                decode,
                output,
                mode: Mode::Generate,
            }
        }
        Command::Ground {
            model,
            images,
            prompt,
            decode,
            output,
        } => Job {
            model,
            images: images.images,
            prompts: vec![grounded_prompt(&prompt)],
            decode,
            output,
            mode: Mode::Ground,
        },
        Command::Refer {
            model,
            images,
            phrase,
            decode,
            output,
        } => Job {
            model,
            images: images.images,
            prompts: vec![phrase_prompt(&phrase)],
            decode,
            output,
            mode: Mode::Refer { phrase },
        },
    };
    if job.images.is_empty() && !matches!(job.mode, Mode::Generate) {
        return Err("give an image with --image PATH".into());
    }
    job.run()
}

fn main() -> ExitCode {
    kosmos_infer::install_panic_hook();
    let cli = Cli::parse();
    match std::panic::catch_unwind(|| run(cli.command)) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(err)) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
        Err(_) => ExitCode::FAILURE,
    }
}

fn data_shapes(
    n: usize,
    seed: u64,
    out: &std::path::Path,
    config: Option<&std::path::Path>,
    grid: Option<usize>,
    json: bool,
) -> Result<(), String> {
    use kosmos_train::shapes::{ShapesConfig, write_dataset};
    let mut settings = match config {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
            toml::from_str::<ShapesConfig>(&text).map_err(|e| format!("{}: {e}", path.display()))?
        }
        None => ShapesConfig::default(),
    };
    settings.n = n;
    settings.seed = seed;
    if let Some(grid) = grid {
        settings.grid = grid;
    }
    let summary = write_dataset(&settings, out).map_err(|e| e.to_string())?;
    if json {
        println!("{}", serde_json::to_string(&summary).map_err(|e| e.to_string())?);
    } else {
        let c = &summary.codec;
        println!(
            "wrote {} images with {} shapes to {}: {} grounded captions (and {} with one phrase grounded), {} referring expressions ({} need a relation), {} text documents",
            summary.images,
            summary.shapes,
            out.display(),
            summary.grounded_captions,
            summary.single_phrase_captions,
            summary.referring_expressions,
            summary.relational,
            summary.text_documents
        );
        println!(
            "location codec ceiling on the {} boxes ({}x{} grid): accuracy at IoU >= 0.5 {:.4}, mean IoU {:.4}, min IoU {:.4}",
            c.boxes, c.grid, c.grid, c.accuracy_at_0_5, c.mean_iou, c.min_iou
        );
    }
    Ok(())
}

fn eval(task: EvalTask, args: EvalArgs) -> Result<(), String> {
    let (annotations, images) = locate(task, &args.data, args.images.as_deref())?;
    let report = EvalJob {
        task,
        model: args.model,
        annotations,
        images,
        limit: args.limit,
        batch: args.batch,
        max_new_tokens: args.max_new_tokens,
    }
    .run()?;
    if let Some(path) = &args.predictions {
        let lines: Vec<String> = report
            .predictions
            .iter()
            .map(|p| serde_json::to_string(p).map_err(|e| e.to_string()))
            .collect::<Result<_, _>>()?;
        std::fs::write(path, lines.join("\n") + "\n").map_err(|e| format!("{}: {e}", path.display()))?;
    }
    let metric = match task {
        EvalTask::Refexp => "accuracy",
        EvalTask::Grounding => "recall_at_1",
    };
    if args.json {
        let obj = serde_json::json!({
            "task": task,
            "annotations": report.annotations,
            "sentences": report.sentences,
            "metric": metric,
            "iou_threshold": 0.5,
            "value": report.score.value,
            "correct": report.score.correct,
            "total": report.score.total,
            "seconds": report.seconds,
        });
        println!("{obj}");
    } else {
        println!(
            "{metric} at IoU >= 0.5: {:.4} ({} / {}) over {} sentences of {} in {:.1} s",
            report.score.value,
            report.score.correct,
            report.score.total,
            report.sentences,
            report.annotations.display(),
            report.seconds
        );
    }
    Ok(())
}
