//! `kosmos`: the command-line tool of kosmos-burn.
//!
//! Subcommands grow with the project; today: `info` (compiled backends, devices, presets).

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kosmos_infer::info;

/// KOSMOS-1/KOSMOS-2 multimodal models on Burn.
#[derive(Parser, Debug)]
#[command(name = "kosmos", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Info { probe, device } => info::run(probe, device.as_deref()),
    };
    match result {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}
