//! # kosmos-vision
//!
//! The vision side of KOSMOS on Burn, generic over `B: Backend`:
//!
//! * [`clip`]: the CLIP ViT image encoder (HF `CLIPVisionModel` layout), its pooled output, and the
//!   KOSMOS-2 image features; bicubic position interpolation for other resolutions;
//! * [`projection`]: KOSMOS-2's image-to-text projection (latent-query cross-attention);
//! * [`perceiver`]: KOSMOS-1's Flamingo-style perceiver resampler;
//! * [`freeze`]: freezing the vision tower (all of it, or all but the last layer) for training;
//! * [`preprocess`] and [`resize`]: image decoding and CLIP preprocessing equal to HF's
//!   `CLIPImageProcessor` (PIL backend), with a PIL-compatible antialiased bicubic resampler;
//!
//! Key maps of the reference checkpoints live with the others in `kosmos_core::loader`.

pub mod clip;
pub mod freeze;
pub mod perceiver;
pub mod preprocess;
pub mod projection;
pub mod resize;

pub use clip::{ClipVisionConfig, ClipVisionModel, ClipVisionOutput};
pub use perceiver::{PerceiverResampler, PerceiverResamplerConfig};
pub use preprocess::{ImageError, ImageProcessor, ImageProcessorConfig, RgbImage};
pub use projection::{ImageToTextProjection, ImageToTextProjectionConfig};
