//! `kosmos`: the command-line tool of kosmos-burn.
//!
//! `info` (compiled backends, devices, presets), `generate` (any prompt, paper task presets),
//! `ground` (grounded captions with boxes), `refer` (the box of a phrase) and `train` (a training
//! run from a TOML configuration, or its continuation from a checkpoint).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use kosmos_infer::commands::{
    DecodeArgs, Job, Mode, ModelArgs, OutputArgs, Task, grounded_prompt, parse_box, phrase_prompt,
};
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
enum Command {
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
    },
}

fn run(command: Command) -> Result<(), String> {
    let job = match command {
        Command::Info { probe, device } => {
            print!("{}", info::run(probe, device.as_deref())?);
            return Ok(());
        }
        Command::Train {
            config,
            resume,
            stop_after,
            device,
        } => {
            let device = device.unwrap_or_else(kosmos_infer::commands::default_device);
            print!(
                "{}",
                train::run(config.as_deref(), resume.as_deref(), stop_after, &device)?
            );
            return Ok(());
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
    // One line on stderr, never a backtrace, for failures that surface as panics (a GPU driver
    // missing, an allocation failure).
    std::panic::set_hook(Box::new(|info| {
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown failure".into());
        let first = message.lines().next().unwrap_or_default();
        eprintln!("error: internal failure: {first}");
    }));
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
