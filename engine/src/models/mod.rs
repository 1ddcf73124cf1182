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

mod fused_attention;
pub mod gemma3;
pub mod llama;
pub mod phi3;
pub mod qwen2;
pub mod qwen3;
mod row_ops;
mod transformer;

use serde::Serialize;

pub use transformer::{
    Blend, DECODE_MAX_TOKENS, ReturnLogits, Selection, Transformer, early_probe_layers,
};

use crate::error::{EngineError, Result};
use crate::gguf::GgufFile;
use crate::kv::KvShape;
use crate::rope::RopeStyle;

/// Reads a family's [`ModelConfig`] from its GGUF metadata.
pub type ReadConfig = fn(&GgufFile) -> Result<ModelConfig>;

/// The widest attention head the engine runs.
pub const MAX_HEAD_DIM: usize = 1024;
/// The widest projection (heads × head width) the engine runs; hidden and feed-forward
/// sizes and the vocabulary may be 16 times this.
pub const MAX_WIDTH: usize = 1 << 16;
/// The longest context a model may declare (its rotary tables are sized by it).
pub const MAX_CONTEXT: usize = 1 << 20;

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
    let config = read(gguf)?;
    config.validate()?;
    Ok(config)
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
        let experts = gguf.opt_usize(&key("expert_count")).unwrap_or(0);
        if experts > 0 {
            return Err(EngineError::UnsupportedFeature(format!(
                "mixture-of-experts {arch} models ({experts} experts)"
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
        // As llama.cpp reads it: a factor without a type is linear, the legacy
        // `rope.scale_linear` key counts too, and a factor of 0 (or less) means unscaled.
        let factor = gguf
            .opt_f64(&key("rope.scaling.factor"))
            .or_else(|| gguf.opt_f64(&key("rope.scale_linear")))
            .filter(|&f| f > 0.0)
            .unwrap_or(1.0);
        let rope_linear_scale = match gguf.opt_string(&key("rope.scaling.type")) {
            None | Some("linear") => factor,
            Some("none") => 1.0,
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
        // Every layer has several tensors: a count the file's tensors cannot hold is refused
        // before anything is sized by it.
        if n_layers == 0 || n_layers > gguf.tensor_count() {
            return Err(EngineError::Metadata {
                key: key("block_count"),
                reason: format!(
                    "{n_layers} layers in a file of {} tensors",
                    gguf.tensor_count()
                ),
            });
        }
        // Biases the transformer does not apply: refused rather than silently dropped.
        for i in 0..n_layers {
            for name in ["attn_output", "ffn_gate", "ffn_up", "ffn_down"] {
                let tensor = format!("blk.{i}.{name}.bias");
                Self::refuse_tensors(gguf, &[(&tensor, "a bias on this projection")])?;
            }
        }
        Self::refuse_tensors(gguf, &[("output.bias", "a bias on the output projection")])?;
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

    /// Checks what the forward pass relies on: heads that group evenly, an even head width,
    /// one attention description per layer, windows of at least one position, and sizes
    /// within the engine's bounds.
    pub fn validate(&self) -> Result<()> {
        let invalid = |reason: String| EngineError::Metadata {
            key: format!("{}.*", self.family),
            reason,
        };
        if self.n_layers == 0 || self.layers.len() != self.n_layers {
            return Err(invalid(format!(
                "{} layer descriptions for {} layers",
                self.layers.len(),
                self.n_layers
            )));
        }
        if self.n_heads == 0
            || self.n_kv_heads == 0
            || !self.n_heads.is_multiple_of(self.n_kv_heads)
        {
            return Err(invalid(format!(
                "{} query heads over {} KV heads",
                self.n_heads, self.n_kv_heads
            )));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return Err(invalid(format!("heads of width {}", self.head_dim)));
        }
        if self.layers.iter().any(|l| l.window == Some(0)) {
            return Err(invalid("a sliding window of 0 positions".into()));
        }
        // Sizes the forward pass allocates by before a weight is read (rotary tables, head
        // widths): bounded here, so a corrupt value is an error, not an allocation.
        let widths = self.n_heads.checked_mul(self.head_dim);
        if self.head_dim > MAX_HEAD_DIM || widths.is_none_or(|w| w > MAX_WIDTH) {
            return Err(invalid(format!(
                "{} heads of width {} (at most {MAX_HEAD_DIM} wide, {MAX_WIDTH} in all)",
                self.n_heads, self.head_dim
            )));
        }
        for (what, size) in [
            ("hidden size", self.hidden_size),
            ("feed-forward size", self.ffn_size),
            ("vocabulary", self.vocab_size),
        ] {
            if size == 0 || size > MAX_WIDTH * 16 {
                return Err(invalid(format!("a {what} of {size}")));
            }
        }
        if self.context_length == 0 || self.context_length > MAX_CONTEXT {
            return Err(invalid(format!(
                "a context of {} positions (at most {MAX_CONTEXT})",
                self.context_length
            )));
        }
        Ok(())
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

#[cfg(test)]
mod tests {
    use candle_core::quantized::gguf_file::{self, Value};
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{DType, Device, Tensor};

    use super::*;

    /// A metadata-only file of `arch` (an embedding tensor and one per layer, as the layer
    /// count must be one the file's tensors can hold) with `extra` keys and tensors.
    fn config_of(arch: &str, extra: &[(&str, Value)], tensors: &[&str]) -> Result<ModelConfig> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        let key = |k: &str| format!("{arch}.{k}");
        let mut metadata: Vec<(String, Value)> = vec![
            ("general.architecture".into(), Value::String(arch.into())),
            (key("embedding_length"), Value::U32(64)),
            (key("block_count"), Value::U32(6)),
            (key("feed_forward_length"), Value::U32(128)),
            (key("attention.head_count"), Value::U32(4)),
            (key("attention.head_count_kv"), Value::U32(2)),
            (key("context_length"), Value::U32(256)),
            (key("attention.sliding_window"), Value::U32(16)),
        ];
        for (k, v) in extra {
            metadata.retain(|(existing, _)| existing != k);
            metadata.push((k.to_string(), v.clone()));
        }
        let embed = QTensor::quantize(
            &Tensor::zeros((32, 64), DType::F32, &Device::Cpu).unwrap(),
            GgmlDType::F32,
        )
        .unwrap();
        let layers: Vec<String> = (0..6)
            .map(|i| format!("blk.{i}.attn_norm.weight"))
            .collect();
        let mut named: Vec<(&str, &QTensor)> = vec![("token_embd.weight", &embed)];
        named.extend(layers.iter().map(|n| (n.as_str(), &embed)));
        named.extend(tensors.iter().map(|n| (*n, &embed)));
        let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let mut file = std::fs::File::create(&path).unwrap();
        gguf_file::write(&mut file, &metadata, &named).unwrap();
        config_from_gguf(&GgufFile::open(&path).unwrap())
    }

    #[test]
    fn each_family_reads_its_block_shape() {
        let llama = config_of("llama", &[], &[]).unwrap();
        assert_eq!(llama.rope_style, RopeStyle::Interleaved);
        assert_eq!((llama.vocab_size, llama.head_dim), (32, 16));
        assert!(llama.layers.iter().all(|l| l.window.is_none()));
        assert_eq!(
            config_of("qwen2", &[], &[]).unwrap().rope_style,
            RopeStyle::Halves
        );
        assert!(config_of("qwen3", &[], &[]).unwrap().qk_norm);
        let phi3 = config_of("phi3", &[], &[]).unwrap();
        assert_eq!(
            (phi3.qkv, phi3.gate_up),
            (QkvLayout::Fused, GateUpLayout::Fused)
        );
        assert!(
            phi3.layers.iter().all(|l| l.window.is_none()),
            "as llama.cpp: no window"
        );
        let gemma = config_of("gemma3", &[], &[]).unwrap();
        let windows: Vec<Option<usize>> = gemma.layers.iter().map(|l| l.window).collect();
        assert_eq!(
            windows,
            [Some(16), Some(16), Some(16), Some(16), Some(16), None]
        );
        assert_eq!(gemma.layers[0].rope_theta, 10_000.0);
        assert_eq!(gemma.embedding_scale, Some(8.0));
        assert_eq!(gemma.activation, Activation::GeluTanh);
        assert!(gemma.qk_norm && gemma.post_norms);
    }

    #[test]
    fn what_the_engine_does_not_implement_is_a_typed_error_naming_it() {
        let unsupported = |r: Result<ModelConfig>| match r {
            Err(EngineError::UnsupportedFeature(what)) => what,
            other => panic!("expected UnsupportedFeature, got {other:?}"),
        };
        let experts = config_of("qwen2", &[("qwen2.expert_count", Value::U32(8))], &[]);
        assert!(unsupported(experts).contains("mixture-of-experts"));
        let partial = config_of(
            "llama",
            &[("llama.rope.dimension_count", Value::U32(8))],
            &[],
        );
        assert!(unsupported(partial).contains("partial rotary"));
        let yarn = config_of(
            "qwen3",
            &[("qwen3.rope.scaling.type", Value::String("yarn".into()))],
            &[],
        );
        assert!(unsupported(yarn).contains("yarn"));
        let longrope = config_of("phi3", &[], &["rope_factors_long.weight"]);
        assert!(unsupported(longrope).contains("longrope"));
        let values = config_of(
            "llama",
            &[("llama.attention.value_length", Value::U32(8))],
            &[],
        );
        assert!(unsupported(values).contains("value heads"));
        match config_of("mamba", &[], &[]) {
            Err(e @ EngineError::UnsupportedArchitecture(_)) => {
                let text = e.to_string();
                assert!(text.contains("mamba") && text.contains("gemma3"), "{text}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn impossible_shapes_are_metadata_errors_not_panics() {
        let ungroupable = config_of(
            "llama",
            &[("llama.attention.head_count_kv", Value::U32(3))],
            &[],
        );
        assert!(matches!(ungroupable, Err(EngineError::Metadata { .. })));
        let no_heads = config_of(
            "llama",
            &[("llama.attention.head_count", Value::U32(0))],
            &[],
        );
        assert!(no_heads.is_err());
        let no_window = config_of(
            "gemma3",
            &[("gemma3.attention.sliding_window", Value::U32(0))],
            &[],
        );
        assert!(matches!(no_window, Err(EngineError::Metadata { .. })));
    }
}
