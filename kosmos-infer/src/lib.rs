//! # kosmos-infer
//!
//! Inference front end of kosmos-burn: the `kosmos` command-line tool and the helpers it uses
//! (`kosmos train` runs `kosmos-train`'s trainer).

pub mod annotate;
pub mod builtin;
pub mod commands;
pub mod eval;
mod font;
pub mod generate;
#[cfg(feature = "hub")]
pub mod hub;
pub mod info;
pub mod logits;
pub mod pipeline;
pub mod train;

/// Report a panic as one `error: internal failure: ...` line on stderr (its first line), never a
/// backtrace: failures that surface as panics (a GPU driver missing, an allocation failure) read
/// like every other error of the command-line tools. Installed by `kosmos` and `kosmos-compare`.
pub fn install_panic_hook() {
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
}
