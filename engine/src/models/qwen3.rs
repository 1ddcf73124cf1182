//! `qwen3`: Qwen3 (dense).
//!
//! Llama's block with a per-head RMSNorm of queries and keys before rotation, no biases,
//! RoPE over the two halves of each head.

use crate::error::Result;
use crate::gguf::GgufFile;
use crate::rope::RopeStyle;

use super::ModelConfig;

/// Reads a `general.architecture = "qwen3"` file's config.
pub fn config(gguf: &GgufFile) -> Result<ModelConfig> {
    let mut config = ModelConfig::common(gguf, "qwen3", RopeStyle::Halves)?;
    config.qk_norm = true;
    Ok(config)
}
