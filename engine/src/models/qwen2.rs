//! `qwen2`: Qwen2 and Qwen2.5.
//!
//! Llama's block with biases on the query, key and value projections and RoPE over the two
//! halves of each head.

use crate::error::Result;
use crate::gguf::GgufFile;
use crate::rope::RopeStyle;

use super::ModelConfig;

/// Reads a `general.architecture = "qwen2"` file's config.
pub fn config(gguf: &GgufFile) -> Result<ModelConfig> {
    ModelConfig::common(gguf, "qwen2", RopeStyle::Halves)
}
