//! `phi3`: Phi-3 and Phi-3.5 mini (dense).
//!
//! Llama's block with the query, key and value projections fused into one matrix and the
//! gate and up projections fused into one (gate rows first), RoPE over the two halves of each
//! head. The long-context variants' per-frequency factors (`rope_factors_long/short`,
//! "longrope") are refused. A file's `phi3.attention.sliding_window` is not applied: the
//! reference implementation (llama.cpp) disables Phi-3's sliding window too, so every layer is
//! global here as there.

use crate::error::Result;
use crate::gguf::GgufFile;
use crate::rope::RopeStyle;

use super::{GateUpLayout, ModelConfig, QkvLayout};

/// Reads a `general.architecture = "phi3"` file's config.
pub fn config(gguf: &GgufFile) -> Result<ModelConfig> {
    ModelConfig::refuse_tensors(
        gguf,
        &[
            (
                "rope_factors_long.weight",
                "long-context RoPE factors (longrope)",
            ),
            (
                "rope_factors_short.weight",
                "long-context RoPE factors (longrope)",
            ),
        ],
    )?;
    let mut config = ModelConfig::common(gguf, "phi3", RopeStyle::Halves)?;
    config.qkv = QkvLayout::Fused;
    config.gate_up = GateUpLayout::Fused;
    Ok(config)
}
