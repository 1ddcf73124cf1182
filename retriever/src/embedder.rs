//! Sentence embeddings with all-MiniLM-L6-v2 (a BERT encoder) on candle: the model's own
//! WordPiece tokenizer, mean pooling over the real tokens, L2 normalisation — the
//! sentence-transformers recipe for this model.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use crate::error::{Result, RetrieverError};

/// Texts embedded in one forward pass.
pub const EMBED_BATCH: usize = 32;

/// A sentence embedder: BERT weights, config and tokenizer from a model directory.
pub struct Embedder {
    model: BertModel,
    tokenizer: Tokenizer,
    device: Device,
    dim: usize,
    max_tokens: usize,
}

impl std::fmt::Debug for Embedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedder")
            .field("dim", &self.dim)
            .field("max_tokens", &self.max_tokens)
            .finish_non_exhaustive()
    }
}

impl Embedder {
    /// Loads `model.safetensors`, `config.json` and `tokenizer.json` from `dir` (and the
    /// sequence limit from `sentence_bert_config.json` when present; longer texts are
    /// truncated, as sentence-transformers does).
    pub fn load(dir: &Path) -> Result<Self> {
        let read = |name: &str| {
            std::fs::read(dir.join(name)).map_err(|source| RetrieverError::Io {
                path: dir.join(name).display().to_string(),
                source,
            })
        };
        let config_bytes = read("config.json")?;
        let config: Config = serde_json::from_slice(&config_bytes)
            .map_err(|e| RetrieverError::Embedder(format!("config.json: {e}")))?;
        let dim = config_dim(&config_bytes)?;
        let max_tokens = std::fs::read(dir.join("sentence_bert_config.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v.get("max_seq_length")?.as_u64())
            .map_or(512, |n| n as usize);
        let mut tokenizer = Tokenizer::from_bytes(read("tokenizer.json")?)
            .map_err(|e| RetrieverError::Embedder(format!("tokenizer.json: {e}")))?;
        // The file pads every input to a fixed length; pad a batch to its longest instead
        // (the mask makes both give the same vectors) and truncate at the model's limit.
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::BatchLongest,
            ..PaddingParams::default()
        }));
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_tokens,
                ..TruncationParams::default()
            }))
            .map_err(|e| RetrieverError::Embedder(format!("truncation: {e}")))?;
        let device = Device::Cpu;
        let weights = dir.join("model.safetensors");
        if !weights.is_file() {
            return Err(RetrieverError::Embedder(format!(
                "{} not found",
                weights.display()
            )));
        }
        // SAFETY: the weights file is mapped read-only and not modified while mapped
        // (it lives in the model cache, written once).
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[weights], DType::F32, &device)? };
        let model = BertModel::load(vb, &config)?;
        Ok(Self {
            model,
            tokenizer,
            device,
            dim,
            max_tokens,
        })
    }

    /// The length of the vectors.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Tokens of a text the model sees; the rest is cut off.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// Embeds one text.
    pub fn embed_one(&self, text: &str) -> Result<Vec<f32>> {
        let mut vectors = self.embed(&[text])?;
        Ok(vectors.remove(0))
    }

    /// Embeds texts in batches of [`EMBED_BATCH`]: unit-length vectors, one per text.
    pub fn embed<S: AsRef<str> + Send + Sync>(&self, texts: &[S]) -> Result<Vec<Vec<f32>>> {
        let mut out = Vec::with_capacity(texts.len());
        for batch in texts.chunks(EMBED_BATCH) {
            out.extend(self.embed_batch(batch)?);
        }
        Ok(out)
    }

    fn embed_batch<S: AsRef<str> + Send + Sync>(&self, texts: &[S]) -> Result<Vec<Vec<f32>>> {
        let inputs: Vec<&str> = texts.iter().map(AsRef::as_ref).collect();
        let encodings = self
            .tokenizer
            .encode_batch(inputs, true)
            .map_err(|e| RetrieverError::Embedder(format!("tokenizing: {e}")))?;
        let rows = encodings.len();
        let width = encodings.first().map_or(0, |e| e.len());
        let flat = |f: &dyn Fn(&tokenizers::Encoding) -> &[u32]| -> Vec<u32> {
            encodings.iter().flat_map(|e| f(e).to_vec()).collect()
        };
        let ids = Tensor::from_vec(flat(&|e| e.get_ids()), (rows, width), &self.device)?;
        let types = Tensor::from_vec(flat(&|e| e.get_type_ids()), (rows, width), &self.device)?;
        let mask = Tensor::from_vec(
            flat(&|e| e.get_attention_mask()),
            (rows, width),
            &self.device,
        )?;
        let hidden = self.model.forward(&ids, &types, Some(&mask))?; // [rows, width, dim]
        // Mean over the real tokens only.
        let mask = mask.to_dtype(DType::F32)?.unsqueeze(2)?; // [rows, width, 1]
        let summed = hidden.broadcast_mul(&mask)?.sum(1)?; // [rows, dim]
        let counts = mask.sum(1)?.clamp(1e-9, f32::MAX)?; // [rows, 1]
        let mean = summed.broadcast_div(&counts)?;
        let norms = mean.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f32::MAX)?;
        Ok(mean.broadcast_div(&norms)?.to_vec2::<f32>()?)
    }
}

fn config_dim(config: &[u8]) -> Result<usize> {
    serde_json::from_slice::<serde_json::Value>(config)
        .ok()
        .and_then(|v| v.get("hidden_size")?.as_u64())
        .map(|n| n as usize)
        .ok_or_else(|| RetrieverError::Embedder("config.json has no hidden_size".into()))
}
