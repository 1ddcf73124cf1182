//! `llama`: Llama 2 and 3.x, Mistral 7B, SmolLM2, TinyLlama.
//!
//! The reference block: RMSNorm before attention and before the SwiGLU feed-forward,
//! separate query/key/value projections (biases when the file has them), interleaved RoPE
//! (the converter permuted the query and key weights for it), every layer global. Llama 3's
//! per-pair frequency factors come as the tensor `rope_freqs.weight`, read at load.

use crate::error::Result;
use crate::gguf::GgufFile;
use crate::rope::RopeStyle;

use super::ModelConfig;

/// Reads a `general.architecture = "llama"` file's config.
pub fn config(gguf: &GgufFile) -> Result<ModelConfig> {
    ModelConfig::common(gguf, "llama", RopeStyle::Interleaved)
}
