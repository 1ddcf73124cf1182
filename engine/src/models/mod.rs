//! Model families behind one seam.
//!
//! Every family supported here is a decoder-only transformer; what differs between them is
//! data, not control flow: which norms a block has and where, whether the query/key/value
//! projections carry a bias or are fused in the file, per-head query/key norms, how rotary
//! embeddings pair a head's elements and which base each layer rotates with, sliding-window
//! or global attention per layer, the feed-forward activation, an embedding scale, a tied
//! output. A family's file reads its GGUF metadata into a [`ModelConfig`] that says all of
//! that; [`Transformer`] runs any such config, so chunked prefill, KV export / import /
//! re-rotation, blending, bottom-layer passes and batched decode are written once.
//!
//! Adding a family is one file here (a `config` function reading its metadata) and one line
//! in [`FAMILIES`].

pub mod gemma3;
pub mod llama;
pub mod phi3;
pub mod qwen2;
pub mod qwen3;
mod row_ops;
mod transformer;

use serde::Serialize;

pub use transformer::{Blend, DECODE_MAX_TOKENS, Logits, Selection, Transformer};

use crate::error::{EngineError, Result};
use crate::gguf::GgufFile;
use crate::kv::KvShape;
use crate::rope::RopeStyle;

/// Reads a family's [`ModelConfig`] from its GGUF metadata.
pub type ReadConfig = fn(&GgufFile) -> Result<ModelConfig>;

/// The supported families: `general.architecture` and the function reading its config.
pub const FAMILIES: &[(&str, ReadConfig)] = &[
    ("llama", llama::config),
    ("qwen2", qwen2::config),
    ("qwen3", qwen3::config),
    ("gemma3", gemma3::config),
    ("phi3", phi3::config),
];

/// The names of the supported families, for error messages.
pub fn family_names() -> Vec<&'static str> {
    FAMILIES.iter().map(|(name, _)| *name).collect()
}

/// Reads the model description of a GGUF file of any supported family.
pub fn config_from_gguf(gguf: &GgufFile) -> Result<ModelConfig> {
    let arch = gguf.string("general.architecture")?;
    let read = FAMILIES
        .iter()
        .find(|(name, _)| *name == arch)
        .map(|(_, read)| read)
        .ok_or_else(|| EngineError::UnsupportedArchitecture(arch.to_string()))?;
    read(gguf)
}

/// The feed-forward activation applied to the gate before it multiplies the up projection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// `x·σ(x)` (SwiGLU: llama, Qwen, Phi-3).
    Silu,
    /// GELU with the tanh approximation (GeGLU: Gemma).
    GeluTanh,
}

/// How the query, key and value projections are stored in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum QkvLayout {
    /// `attn_q`, `attn_k`, `attn_v`, each with an optional bias.
    Separate,
    /// One `attn_qkv` matrix, rows in query, key, value order (Phi-3).
    Fused,
}

/// How the gate and up projections of the feed-forward are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GateUpLayout {
    /// `ffn_gate` and `ffn_up`.
    Separate,
    /// One `ffn_up` matrix of twice the width, gate rows first (Phi-3).
    Fused,
}

/// What one layer's attention looks at and how it rotates.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LayerAttention {
    /// RoPE base frequency of this layer.
    pub rope_theta: f64,
    /// Linear RoPE position scale of this layer (1.0 when unscaled).
    pub rope_linear_scale: f64,
    /// `Some(w)`: a token sees the `w` most recent positions, itself included (sliding-window
    /// attention); `None`: every position before it.
    pub window: Option<usize>,
}

/// A model's hyper-parameters and the shape of its blocks, read from the GGUF metadata.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelConfig {
    /// `general.architecture`.
    pub family: String,
    /// Transformer blocks.
    pub n_layers: usize,
    /// Residual stream width.
    pub hidden_size: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `n_heads`).
    pub n_kv_heads: usize,
    /// Width of one attention head.
    pub head_dim: usize,
    /// Feed-forward inner width.
    pub ffn_size: usize,
    /// RMSNorm epsilon.
    pub rms_eps: f64,
    /// Positions the model was trained for; the engine's context window.
    pub context_length: usize,
    /// Vocabulary entries.
    pub vocab_size: usize,
    /// How rotary embeddings pair a head's elements.
    pub rope_style: RopeStyle,
    /// Each layer's rotary base and attention span.
    pub layers: Vec<LayerAttention>,
    /// How the attention projections are stored.
    pub qkv: QkvLayout,
    /// How the feed-forward's gate and up projections are stored.
    pub gate_up: GateUpLayout,
    /// Per-head RMSNorm of queries and keys before rotation (Qwen 3, Gemma 3).
    pub qk_norm: bool,
    /// RMSNorm of the attention output and of the feed-forward output before each is added
    /// to the residual stream (Gemma's "sandwich" norms).
    pub post_norms: bool,
    /// The feed-forward activation.
    pub activation: Activation,
    /// Factor the token embeddings are multiplied by (Gemma: `√hidden_size`).
    pub embedding_scale: Option<f64>,
    /// Factor attention scores are multiplied by (usually `1/√head_dim`).
    pub attention_scale: f64,
    /// `Some(c)`: output logits are squashed to `c·tanh(logit / c)` (a Gemma file may ask).
    pub final_logit_softcap: Option<f64>,
}

impl ModelConfig {
    /// The hyper-parameters every family stores under the same `{arch}.*` keys, with
    /// llama's block shape: separate projections, SiLU, no extra norms, every layer global
    /// with the file's rotary base. A family's `config` starts here and changes what differs.
    pub fn common(gguf: &GgufFile, arch: &str, rope_style: RopeStyle) -> Result<Self> {
        let key = |name: &str| format!("{arch}.{name}");
        if gguf.opt_usize(&key("expert_count")).unwrap_or(0) > 0 {
            return Err(EngineError::UnsupportedFeature(format!(
                "mixture-of-experts {arch} models ({} experts)",
                gguf.opt_usize(&key("expert_count")).unwrap_or(0)
            )));
        }
        let hidden_size = gguf.usize(&key("embedding_length"))?;
        let n_heads = gguf.usize(&key("attention.head_count"))?;
        let n_kv_heads = gguf
            .opt_usize(&key("attention.head_count_kv"))
            .unwrap_or(n_heads);
        if n_heads == 0 || n_kv_heads == 0 || !n_heads.is_multiple_of(n_kv_heads) {
            return Err(EngineError::Metadata {
                key: key("attention.head_count_kv"),
                reason: format!(
                    "{n_heads} query heads cannot be grouped over {n_kv_heads} KV heads"
                ),
            });
        }
        let head_dim = gguf
            .opt_usize(&key("attention.key_length"))
            .unwrap_or(hidden_size / n_heads);
        let value_dim = gguf
            .opt_usize(&key("attention.value_length"))
            .unwrap_or(head_dim);
        if value_dim != head_dim {
            return Err(EngineError::UnsupportedFeature(format!(
                "value heads of width {value_dim} beside key heads of width {head_dim}"
            )));
        }
        let rope_dim = gguf
            .opt_usize(&key("rope.dimension_count"))
            .unwrap_or(head_dim);
        if rope_dim != head_dim || head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(EngineError::UnsupportedFeature(format!(
                "partial rotary embeddings ({rope_dim} of {head_dim} dimensions)"
            )));
        }
        let rope_linear_scale = match gguf.opt_string(&key("rope.scaling.type")) {
            None | Some("none") => 1.0,
            Some("linear") => gguf.opt_f64(&key("rope.scaling.factor")).unwrap_or(1.0),
            Some(other) => {
                return Err(EngineError::UnsupportedFeature(format!(
                    "RoPE scaling {other:?}"
                )));
            }
        };
        let vocab_size = match gguf.opt_usize(&key("vocab_size")) {
            Some(v) => v,
            None => *gguf
                .tensor_dims("token_embd.weight")?
                .first()
                .ok_or_else(|| EngineError::Tensor {
                    name: "token_embd.weight".into(),
                    reason: "a rank-0 tensor where a [vocab, hidden] matrix belongs".into(),
                })?,
        };
        let n_layers = gguf.usize(&key("block_count"))?;
        let rope_theta = gguf.opt_f64(&key("rope.freq_base")).unwrap_or(10_000.0);
        Ok(Self {
            family: arch.to_string(),
            n_layers,
            hidden_size,
            n_heads,
            n_kv_heads,
            head_dim,
            ffn_size: gguf.usize(&key("feed_forward_length"))?,
            rms_eps: gguf
                .opt_f64(&key("attention.layer_norm_rms_epsilon"))
                .unwrap_or(1e-5),
            context_length: gguf.usize(&key("context_length"))?,
            vocab_size,
            rope_style,
            layers: vec![
                LayerAttention {
                    rope_theta,
                    rope_linear_scale,
                    window: None,
                };
                n_layers
            ],
            qkv: QkvLayout::Separate,
            gate_up: GateUpLayout::Separate,
            qk_norm: false,
            post_norms: false,
            activation: Activation::Silu,
            embedding_scale: None,
            attention_scale: (head_dim as f64).powf(-0.5),
            final_logit_softcap: None,
        })
    }

    /// The shape of this model's KV cache.
    pub fn kv_shape(&self) -> KvShape {
        KvShape {
            n_layers: self.n_layers,
            n_kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
        }
    }

    /// Refuses tensors a file holds for a feature the engine does not implement: silently
    /// ignoring them would compute another function.
    pub(crate) fn refuse_tensors(gguf: &GgufFile, names: &[(&str, &str)]) -> Result<()> {
        for (name, feature) in names {
            if gguf.has_tensor(name) {
                return Err(EngineError::UnsupportedFeature(format!(
                    "{feature} (tensor {name})"
                )));
            }
        }
        Ok(())
    }
}
