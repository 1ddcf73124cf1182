//! `gemma3`: Gemma 3 (text).
//!
//! Every sixth layer attends globally, rotating with the file's base (1e6) and its linear
//! scaling; the others attend within a sliding window of `gemma3.attention.sliding_window`
//! positions and rotate with base 10,000 unscaled (the reference implementation, llama.cpp,
//! fixes both for this family; the file does not store them). Per-head RMSNorm of queries and
//! keys before rotation; RMSNorm before and after attention and before and after the GeGLU
//! (tanh GELU) feed-forward; embeddings multiplied by √hidden; RoPE over the two halves of
//! each head; output tied to the embeddings. The file's norm weights already include Gemma's
//! `1 +` offset (the converter folds it in), so they are applied as stored.

use crate::error::{EngineError, Result};
use crate::gguf::GgufFile;
use crate::rope::RopeStyle;

use super::{Activation, LayerAttention, ModelConfig};

/// One layer in this many attends globally, the last of each group.
const GLOBAL_EVERY: usize = 6;

/// The rotary base of the sliding-window layers.
const LOCAL_ROPE_THETA: f64 = 10_000.0;

/// Reads a `general.architecture = "gemma3"` file's config.
pub fn config(gguf: &GgufFile) -> Result<ModelConfig> {
    let mut config = ModelConfig::common(gguf, "gemma3", RopeStyle::Halves)?;
    let window = gguf
        .opt_usize("gemma3.attention.sliding_window")
        .ok_or_else(|| EngineError::Metadata {
            key: "gemma3.attention.sliding_window".into(),
            reason: "Gemma 3's local layers need their window".into(),
        })?;
    if window == 0 {
        return Err(EngineError::Metadata {
            key: "gemma3.attention.sliding_window".into(),
            reason: "a window of 0 positions".into(),
        });
    }
    for (i, layer) in config.layers.iter_mut().enumerate() {
        if !(i + 1).is_multiple_of(GLOBAL_EVERY) {
            *layer = LayerAttention {
                rope_theta: LOCAL_ROPE_THETA,
                rope_linear_scale: 1.0,
                window: Some(window),
            };
        }
    }
    config.qk_norm = true;
    config.post_norms = true;
    config.activation = Activation::GeluTanh;
    config.embedding_scale = Some((config.hidden_size as f64).sqrt());
    // The 27B model (62 layers) scales scores by its query width per head, not head_dim.
    if config.n_layers == 62 {
        config.attention_scale = ((config.hidden_size / config.n_heads) as f64).powf(-0.5);
    }
    config.final_logit_softcap = gguf
        .opt_f64("gemma3.final_logit_softcapping")
        .filter(|&c| c > 0.0);
    Ok(config)
}
