//! # kosmos-core
//!
//! The language side of KOSMOS-1 and KOSMOS-2 on [Burn](https://burn.dev): the MAGNETO decoder
//! (pre-LN plus sub-LayerNorm), XPOS and sinusoidal positions, multi-head attention with an
//! append-only KV cache, configurations and presets, safetensors weight loading with typed errors,
//! and the one place that maps a backend name to a Burn backend.
//!
//! All model code is generic over `B: Backend`; nothing branches on the backend.

pub mod activation;
pub mod attention;
pub mod backend;
pub mod decoder;
pub mod fused;
pub mod gemv;
pub mod loader;
pub mod lora;
pub mod memory;
pub mod packed;
pub mod positions;
pub mod presets;
pub mod testing;

pub use activation::Activation;
pub use attention::{
    AttentionImpl, AttentionMask, KvCache, MultiHeadAttention, MultiHeadAttentionConfig, PositionTreatment,
};
pub use decoder::{Decoder, DecoderCache, DecoderConfig, DecoderLayer, FeedForward, FeedForwardConfig};
pub use loader::{
    KeyMap, LoadError, LoadReport, TensorFile, cast_floats, load_safetensors, load_safetensors_files, save_safetensors,
};
pub use lora::{LoraAdapter, LoraConfig, LoraSlot};
pub use packed::{PackedWeight, WeightMode};
pub use positions::{SinusoidalPositions, SinusoidalPositionsConfig, Xpos, XposConfig};
