//! The transformer every family runs ([`super::FAMILIES`]), driven by its [`ModelConfig`].
//!
//! Weights are dequantized at load time: on CPU, dense f32 matrix products are an order of
//! magnitude faster than the quantized kernels available to us, and the models this engine
//! targets are small. The KV cache is the engine's own [`KvCache`], so prefill can run over any
//! token range at any position and caches can be exported and imported.

use candle_core::{DType, Device, Storage, Tensor};
use rayon::prelude::*;

use super::fused_attention::{FusedAttention, KvHeads};
use super::row_ops;
use super::{Activation, GateUpLayout, ModelConfig, QkvLayout};
use crate::correction::LayerCorrection;
use crate::error::{EngineError, Result};
use crate::gguf::GgufFile;
use crate::kv::KvCache;
use crate::qmatrix::QMatrix;
use crate::rope::{LayerRopes, Rope};

/// Which logits a forward pass returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReturnLogits {
    /// None: the pass only fills the KV cache (prefill of a chunk in the middle of a prompt).
    None,
    /// The last position's, shape `[vocab]`.
    Last,
    /// Every position's, shape `[tokens, vocab]`.
    All,
}

struct Block {
    attn_norm: Tensor,
    /// Query, key and value projections stacked: `[(n_heads + 2·n_kv_heads)·head_dim, hidden]`,
    /// one matrix product instead of three.
    wqkv: Tensor,
    /// Their biases stacked the same way, when the file has them (Qwen2).
    qkv_bias: Option<Tensor>,
    /// Per-head RMSNorm weights of queries and keys (`[head_dim]`), when the family has them.
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    wo: Tensor,
    /// RMSNorm of the attention output before the residual add (Gemma).
    post_attn_norm: Option<Tensor>,
    ffn_norm: Tensor,
    /// Gate and up projections stacked: `[2·ffn, hidden]`.
    w_gate_up: Tensor,
    w_down: Tensor,
    /// RMSNorm of the feed-forward output before the residual add (Gemma).
    post_ffn_norm: Option<Tensor>,
    /// How many positions this layer's queries see, their own included: `None` for every
    /// one before them (global attention), `Some(w)` for a sliding window of `w`.
    window: Option<usize>,
    /// The same projections in quantized blocks ([`QMatrix`]) for decode steps, when enabled.
    decode: Option<DecodeWeights>,
}

/// Quantized copies of a block's projections ([`QMatrix`]: the GGUF's Q4_1 blocks, 8-bit
/// blocks for other types). Decode steps are bound by memory bandwidth, not arithmetic:
/// reading 5 to 8 bits per weight instead of 32 makes them several times faster, while
/// prefill keeps the dense f32 weights that its large products need. The question's probe,
/// which only ranks tokens, uses them too ([`Transformer::probe_weights`]).
struct DecodeWeights {
    /// The norms' weights and the biases as plain rows, for the slice-level decode path.
    attn_norm: Vec<f32>,
    ffn_norm: Vec<f32>,
    qkv_bias: Option<Vec<f32>>,
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
    post_attn_norm: Option<Vec<f32>>,
    post_ffn_norm: Option<Vec<f32>>,
    wqkv: QMatrix,
    wo: QMatrix,
    w_gate_up: QMatrix,
    w_down: QMatrix,
}

/// Forward passes over at most this many tokens use the quantized decode weights (and the
/// query rules' probe, which only ranks tokens, however long the question).
pub const DECODE_MAX_TOKENS: usize = 4;

/// The output norm and projection of decode steps.
struct DecodeHead {
    lm_head: QMatrix,
    output_norm: Vec<f32>,
}

/// A vector's values as f32.
fn plain(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

/// [`plain`] of an optional tensor.
fn plain_opt(t: &Option<Tensor>) -> Result<Option<Vec<f32>>> {
    t.as_ref().map(plain).transpose()
}

/// The decode copy of the matrix stacked from the GGUF tensors `names` (rows in order),
/// whose dequantized values are `dense`: their own Q4_1 blocks when every one is stored in
/// Q4_1 (the same weights), 8-bit blocks otherwise.
fn decode_matrix(gguf: &mut GgufFile, names: &[String], dense: &Tensor) -> Result<QMatrix> {
    let (rows, cols) = dense.dims2()?;
    let own = 'own: {
        let mut blocks = Vec::new();
        for name in names {
            // The first tensor in another type settles it: the rest are not read.
            let Some(b) = gguf.q4_1_blocks(name)? else {
                break 'own None;
            };
            blocks.extend(b);
        }
        QMatrix::from_q4_1(&blocks, rows, cols)
    };
    match own {
        Some(m) => Ok(m),
        None => Ok(QMatrix::quantize_q8(&plain(dense)?, rows, cols)),
    }
}

/// Queries per attention block: bounds the score matrix to `heads × QUERY_BLOCK × context`
/// floats however long the prompt is.
const QUERY_BLOCK: usize = 256;

/// A decoder-only transformer of any supported family.
pub struct Transformer {
    config: ModelConfig,
    embed: Tensor,
    /// `None` when the output projection is tied to the embedding.
    lm_head: Option<Tensor>,
    /// The output norm and quantized output projection for decode steps, when enabled.
    decode_head: Option<DecodeHead>,
    output_norm: Tensor,
    blocks: Vec<Block>,
    ropes: LayerRopes,
    device: Device,
    dtype: DType,
}

impl std::fmt::Debug for Transformer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the weights: hundreds of megabytes of numbers say less than the config.
        f.debug_tuple("Transformer").field(&self.config).finish()
    }
}

/// Reads tensors of one file, dequantized, with their shapes checked.
struct Weights<'a> {
    gguf: &'a mut GgufFile,
    device: &'a Device,
    dtype: DType,
}

impl Weights<'_> {
    /// The tensor `name` with shape `dims`.
    fn get(&mut self, name: &str, dims: &[usize]) -> Result<Tensor> {
        let t = self.gguf.dequantized(name, self.device, self.dtype)?;
        expect_dims(name, &t, dims)?;
        Ok(t)
    }

    /// The tensor `name` with shape `dims` when the file has it.
    fn optional(&mut self, name: &str, dims: &[usize]) -> Result<Option<Tensor>> {
        if self.gguf.has_tensor(name) {
            self.get(name, dims).map(Some)
        } else {
            Ok(None)
        }
    }
}

impl Transformer {
    /// Loads the model `config` describes from `gguf`, dequantized to `dtype` on `device`.
    /// With `quantized_decode` (CPU only), quantized copies of the projections ([`QMatrix`])
    /// serve decode steps of at most [`DECODE_MAX_TOKENS`] tokens.
    pub fn load(
        config: ModelConfig,
        gguf: &mut GgufFile,
        device: &Device,
        dtype: DType,
        quantized_decode: bool,
    ) -> Result<Self> {
        let quantized_decode = quantized_decode && device.is_cpu();
        config.validate()?;
        let mut weights = Weights {
            gguf,
            device,
            dtype,
        };
        let (h, hd) = (config.hidden_size, config.head_dim);
        let embed = weights.get("token_embd.weight", &[config.vocab_size, h])?;
        let lm_head = weights.optional("output.weight", &[config.vocab_size, h])?;
        let output_norm = weights.get("output_norm.weight", &[h])?;
        let q_width = config.n_heads * hd;
        let kv_width = config.n_kv_heads * hd;
        let qkv_width = q_width + 2 * kv_width;
        let ffn = config.ffn_size;
        let mut blocks = Vec::with_capacity(config.n_layers);
        for i in 0..config.n_layers {
            let name = |n: &str| format!("blk.{i}.{n}");
            let attn_norm = weights.get(&name("attn_norm.weight"), &[h])?;
            // The stacked names, for the decode copies read from the file's own blocks.
            let (wqkv, qkv_bias, qkv_names) = match config.qkv {
                QkvLayout::Separate => {
                    let wq = weights.get(&name("attn_q.weight"), &[q_width, h])?;
                    let wk = weights.get(&name("attn_k.weight"), &[kv_width, h])?;
                    let wv = weights.get(&name("attn_v.weight"), &[kv_width, h])?;
                    let bq = weights.optional(&name("attn_q.bias"), &[q_width])?;
                    let bk = weights.optional(&name("attn_k.bias"), &[kv_width])?;
                    let bv = weights.optional(&name("attn_v.bias"), &[kv_width])?;
                    let bias = match (bq, bk, bv) {
                        (None, None, None) => None,
                        (bq, bk, bv) => {
                            // A missing one of the three is a zero bias.
                            let or_zero = |b: Option<Tensor>, n: usize| -> Result<Tensor> {
                                Ok(match b {
                                    Some(b) => b,
                                    None => Tensor::zeros(n, dtype, device)?,
                                })
                            };
                            Some(Tensor::cat(
                                &[
                                    &or_zero(bq, q_width)?,
                                    &or_zero(bk, kv_width)?,
                                    &or_zero(bv, kv_width)?,
                                ],
                                0,
                            )?)
                        }
                    };
                    let names = ["attn_q.weight", "attn_k.weight", "attn_v.weight"]
                        .map(&name)
                        .to_vec();
                    (Tensor::cat(&[&wq, &wk, &wv], 0)?, bias, names)
                }
                QkvLayout::Fused => {
                    let w = weights.get(&name("attn_qkv.weight"), &[qkv_width, h])?;
                    let bias = weights.optional(&name("attn_qkv.bias"), &[qkv_width])?;
                    (w, bias, vec![name("attn_qkv.weight")])
                }
            };
            let (q_norm, k_norm) = if config.qk_norm {
                (
                    Some(weights.get(&name("attn_q_norm.weight"), &[hd])?),
                    Some(weights.get(&name("attn_k_norm.weight"), &[hd])?),
                )
            } else {
                (None, None)
            };
            let wo = weights.get(&name("attn_output.weight"), &[h, q_width])?;
            let post_attn_norm = match config.post_norms {
                true => Some(weights.get(&name("post_attention_norm.weight"), &[h])?),
                false => None,
            };
            let ffn_norm = weights.get(&name("ffn_norm.weight"), &[h])?;
            let (w_gate_up, gate_up_names) = match config.gate_up {
                GateUpLayout::Separate => {
                    let gate = weights.get(&name("ffn_gate.weight"), &[ffn, h])?;
                    let up = weights.get(&name("ffn_up.weight"), &[ffn, h])?;
                    (
                        Tensor::cat(&[&gate, &up], 0)?,
                        vec![name("ffn_gate.weight"), name("ffn_up.weight")],
                    )
                }
                GateUpLayout::Fused => (
                    weights.get(&name("ffn_up.weight"), &[2 * ffn, h])?,
                    vec![name("ffn_up.weight")],
                ),
            };
            let w_down = weights.get(&name("ffn_down.weight"), &[h, ffn])?;
            let post_ffn_norm = match config.post_norms {
                true => Some(weights.get(&name("post_ffw_norm.weight"), &[h])?),
                false => None,
            };
            let decode = if quantized_decode {
                let gguf = &mut *weights.gguf;
                Some(DecodeWeights {
                    attn_norm: plain(&attn_norm)?,
                    ffn_norm: plain(&ffn_norm)?,
                    qkv_bias: plain_opt(&qkv_bias)?,
                    q_norm: plain_opt(&q_norm)?,
                    k_norm: plain_opt(&k_norm)?,
                    post_attn_norm: plain_opt(&post_attn_norm)?,
                    post_ffn_norm: plain_opt(&post_ffn_norm)?,
                    wqkv: decode_matrix(gguf, &qkv_names, &wqkv)?,
                    wo: decode_matrix(gguf, &[name("attn_output.weight")], &wo)?,
                    w_gate_up: decode_matrix(gguf, &gate_up_names, &w_gate_up)?,
                    w_down: decode_matrix(gguf, &[name("ffn_down.weight")], &w_down)?,
                })
            } else {
                None
            };
            blocks.push(Block {
                attn_norm,
                wqkv,
                qkv_bias,
                q_norm,
                k_norm,
                wo,
                post_attn_norm,
                ffn_norm,
                w_gate_up,
                w_down,
                post_ffn_norm,
                window: config.layers[i].window,
                decode,
            });
        }
        let freq_factors = match weights.optional("rope_freqs.weight", &[hd / 2])? {
            Some(f) => Some(plain(&f)?),
            None => None,
        };
        let ropes = layer_ropes(&config, freq_factors.as_deref(), dtype, device)?;
        let decode_head = if quantized_decode {
            let gguf = &mut *weights.gguf;
            Some(DecodeHead {
                lm_head: match &lm_head {
                    Some(w) => decode_matrix(gguf, &["output.weight".to_string()], w)?,
                    None => decode_matrix(gguf, &["token_embd.weight".to_string()], &embed)?,
                },
                output_norm: plain(&output_norm)?,
            })
        } else {
            None
        };
        Ok(Self {
            config,
            embed,
            lm_head,
            decode_head,
            output_norm,
            blocks,
            ropes,
            device: device.clone(),
            dtype,
        })
    }

    /// The model's hyper-parameters.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The rotary embedding tables of every layer (for moving cached keys to other
    /// positions).
    pub fn ropes(&self) -> &LayerRopes {
        &self.ropes
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The compute dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// An empty KV cache for this model whose first token sits at `base_position`.
    pub fn new_cache(&self, base_position: usize) -> KvCache {
        KvCache::new(
            self.config.kv_shape(),
            base_position,
            self.dtype,
            &self.device,
        )
    }

    /// Runs `tokens` through the model at positions `cache.next_position()..`, attending to
    /// everything already in `cache`, and appends their keys and values to it. Tokens held
    /// by the bottom layers only (see [`Transformer::forward_bottom`]) are the first ones
    /// recomputed: the same tokens, so their bottom layers are overwritten with equal values.
    /// Always the dense weights, however few the tokens: a prompt's KV does not depend on
    /// how it was cut into passes beyond float summation order.
    ///
    /// Returns the requested logits (f32) or `None` for [`ReturnLogits::None`].
    pub fn forward(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        logits: ReturnLogits,
    ) -> Result<Option<Tensor>> {
        self.forward_with(tokens, cache, logits, false)
    }

    /// A decode step: [`Transformer::forward`] of at most [`DECODE_MAX_TOKENS`] generated tokens,
    /// through the quantized copies of the weights when the model keeps them (its logits
    /// differ from the dense path's by the 8-bit rounding of activations, and of weights not
    /// stored in Q4_1). Returns the last token's logits.
    pub fn decode(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Tensor> {
        if tokens.len() == 1 && self.row_decode_head().is_some() {
            return Ok(self.decode_batch(tokens, &mut [cache])?.squeeze(0)?);
        }
        let quantized = tokens.len() <= DECODE_MAX_TOKENS;
        self.forward_with(tokens, cache, ReturnLogits::Last, quantized)?
            .ok_or(EngineError::EmptyInput)
    }

    fn forward_with(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        logits: ReturnLogits,
        quantized: bool,
    ) -> Result<Option<Tensor>> {
        let layers = self.blocks.len();
        let x = self.run_blocks(tokens, cache, layers, cache.len(), quantized)?;
        cache.commit(tokens.len());
        self.head(&x, logits, quantized)
    }

    /// The requested logits (f32) of the hidden states `x` of the last tokens.
    fn head(&self, x: &Tensor, logits: ReturnLogits, quantized: bool) -> Result<Option<Tensor>> {
        let (t, _) = x.dims2()?;
        let x = match logits {
            ReturnLogits::None => return Ok(None),
            ReturnLogits::Last => x.narrow(0, t - 1, 1)?,
            ReturnLogits::All => x.clone(),
        };
        let x = self.norm(&x, &self.output_norm)?;
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let quant = self
            .decode_head
            .as_ref()
            .filter(|_| quantized)
            .map(|d| &d.lm_head);
        let out = self.softcap(linear(&x, head, quant)?.to_dtype(DType::F32)?)?;
        Ok(Some(match logits {
            ReturnLogits::Last => out.squeeze(0)?,
            _ => out,
        }))
    }

    /// Runs `tokens` through the bottom `layers` layers only, after the tokens those layers
    /// already hold ([`KvCache::partial_len`]), and writes their keys and values there. The
    /// top layers of these tokens are filled later from a ranged read of a stored cache
    /// ([`KvCache::fill_top`]): the layer dimension of bidirectional prefill, where a
    /// chunk's bottom layers are computed while its top layers are loaded.
    pub fn forward_bottom(&self, tokens: &[u32], cache: &mut KvCache, layers: usize) -> Result<()> {
        if layers == 0 || layers >= self.blocks.len() {
            return Err(EngineError::KvMismatch(format!(
                "a layer split computes 1 to {} of {} layers, not {layers}",
                self.blocks.len() - 1,
                self.blocks.len()
            )));
        }
        if cache.partial_len() > 0 && cache.partial_layers() != layers {
            return Err(EngineError::KvMismatch(format!(
                "the cache holds partial tokens in {} bottom layers, not {layers}",
                cache.partial_layers()
            )));
        }
        self.run_blocks(
            tokens,
            cache,
            layers,
            cache.len() + cache.partial_len(),
            false,
        )?;
        cache.commit_bottom(tokens.len(), layers);
        Ok(())
    }

    /// The embeddings of `tokens`, scaled as the family asks.
    fn embed_tokens(&self, tokens: &[u32]) -> Result<Tensor> {
        let x = self
            .embed
            .index_select(&Tensor::new(tokens, &self.device)?, 0)?;
        Ok(match self.config.embedding_scale {
            Some(scale) => (x * scale)?,
            None => x,
        })
    }

    /// The output logits squashed by the family's final soft cap, if it has one.
    fn softcap(&self, logits: Tensor) -> Result<Tensor> {
        Ok(match self.config.final_logit_softcap {
            Some(cap) => ((logits / cap)?.tanh()? * cap)?,
            None => logits,
        })
    }

    /// RMSNorm over the last dimension with the model's epsilon.
    fn norm(&self, x: &Tensor, weight: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(
            x,
            weight,
            self.config.rms_eps as f32,
        )?)
    }

    /// The checks every pass over `tokens` makes against `cache` (not empty, in the
    /// vocabulary, the model's cache shape).
    fn check_input(&self, tokens: &[u32], cache: &KvCache) -> Result<()> {
        if tokens.is_empty() {
            return Err(EngineError::EmptyInput);
        }
        if let Some(&id) = tokens
            .iter()
            .find(|&&id| id as usize >= self.config.vocab_size)
        {
            return Err(EngineError::TokenOutOfRange {
                id,
                vocab_size: self.config.vocab_size,
            });
        }
        if cache.shape() != self.config.kv_shape() {
            return Err(EngineError::KvMismatch(format!(
                "cache shape {:?} is not this model's {:?}",
                cache.shape(),
                self.config.kv_shape()
            )));
        }
        Ok(())
    }

    /// Whether `tokens` more tokens fit from position `start` on.
    fn check_room(&self, start: usize, tokens: usize) -> Result<()> {
        let needed = start + tokens;
        if needed > self.config.context_length {
            return Err(EngineError::ContextOverflow {
                needed,
                max: self.config.context_length,
            });
        }
        Ok(())
    }

    /// The checks every forward pass makes, then the first `layers` blocks over `tokens`
    /// written at cache index `offset`; returns the hidden states after them.
    fn run_blocks(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        layers: usize,
        offset: usize,
        quantized: bool,
    ) -> Result<Tensor> {
        self.check_input(tokens, cache)?;
        let t = tokens.len();
        self.check_room(cache.base_position() + offset, t)?;
        cache.reserve(t)?;
        let mut x = self.embed_tokens(tokens)?;
        let rows: Vec<usize> = (offset..offset + t).collect();
        for (i, block) in self.blocks.iter().take(layers).enumerate() {
            let decode = block.decode.as_ref().filter(|_| quantized);
            let (q, k, v) = self.project_qkv(i, &x, &rows, cache, decode)?;
            let (keys, values) = cache.write_layer_at(i, offset, &k, &v)?;
            let correction = cache.layer_correction(i);
            x = self.attend_and_mlp(block, &x, &q, &keys, &values, &rows, decode, correction)?;
        }
        Ok(x)
    }

    /// Recomputes, in context, a selection of the tokens of a chunk whose keys and values
    /// were loaded into `cache` at indices `offset..offset + tokens.len()` (a
    /// position-independent chunk cache placed after other chunks): the selected tokens
    /// attend to everything before them — the chunks before, and the chunk's own keys and
    /// values, loaded or recomputed — and their keys and values replace the loaded ones at
    /// every layer they are computed at. This is what "blending" a loaded chunk cache
    /// means (CacheBlend, EPIC): the loaded cache never saw the chunks before it, and the
    /// recomputed tokens carry that attention into the rest of the prompt.
    ///
    /// Returns how many tokens were recomputed through every layer.
    pub fn recompute(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        offset: usize,
        selection: Selection,
    ) -> Result<usize> {
        let blend = Blend {
            tokens,
            offset,
            selection,
        };
        Ok(self.blend_pass(&[blend], &[], cache)?.1)
    }

    /// Blends the loaded chunks `blends` ([`Transformer::recompute`] of each) and appends `tail`
    /// after them, all in one pass over the weights (a pass over few tokens costs about as
    /// much as over many: it reads every weight once). Returns the tail's logits and how
    /// many tokens were recomputed.
    pub fn forward_blended(
        &self,
        tail: &[u32],
        cache: &mut KvCache,
        blends: &[Blend<'_>],
        logits: ReturnLogits,
    ) -> Result<(Option<Tensor>, usize)> {
        if tail.is_empty() {
            return Err(EngineError::EmptyInput);
        }
        let (x, recomputed) = self.blend_pass(blends, tail, cache)?;
        let x = x.narrow(0, x.dim(0)? - tail.len(), tail.len())?;
        Ok((self.head(&x, logits, false)?, recomputed))
    }

    /// One pass over the blends' selected tokens (narrowed layer by layer where the rule
    /// says) and the `tail` appended after the cache. Returns the hidden states of the rows
    /// still computed at the top (the tail's last) and the tokens recomputed.
    fn blend_pass(
        &self,
        blends: &[Blend<'_>],
        tail: &[u32],
        cache: &mut KvCache,
    ) -> Result<(Tensor, usize)> {
        let len = cache.len();
        let mut previous_end = 0;
        for blend in blends {
            self.check_input(blend.tokens, cache)?;
            let end = blend.offset + blend.tokens.len();
            if blend.offset < previous_end || end > len || cache.partial_len() > 0 {
                return Err(EngineError::KvMismatch(format!(
                    "tokens {}..{end} are not whole, in order, in a cache of {len} tokens",
                    blend.offset
                )));
            }
            previous_end = end;
        }
        if !tail.is_empty() {
            self.check_input(tail, cache)?;
            self.check_room(cache.base_position() + len, tail.len())?;
            cache.reserve(tail.len())?;
        }
        // Per blend: the chunk-relative rows computed, and where they are narrowed.
        let mut groups: Vec<RowPlan> = blends
            .iter()
            .map(|b| b.selection.plan(b.tokens.len()))
            .collect();
        if blends.iter().any(|b| b.selection.probes_query()) {
            self.select_by_query(blends, &mut groups, tail, cache)?;
        }
        let ids: Vec<u32> = blends
            .iter()
            .zip(&groups)
            .flat_map(|(b, g)| g.rows.iter().map(|&r| b.tokens[r]))
            .chain(tail.iter().copied())
            .collect();
        if ids.is_empty() {
            return Err(EngineError::EmptyInput);
        }
        let mut x = self.embed_tokens(&ids)?;
        let tail_rows: Vec<usize> = (len..len + tail.len()).collect();
        for (layer, block) in self.blocks.iter().enumerate() {
            let blend_rows: Vec<usize> = blends
                .iter()
                .zip(&groups)
                .flat_map(|(b, g)| g.rows.iter().map(|&r| b.offset + r))
                .collect();
            let rows: Vec<usize> = blend_rows.iter().chain(&tail_rows).copied().collect();
            let (mut q, k, v) = self.project_qkv(layer, &x, &rows, cache, None)?;
            let m = blend_rows.len();
            // Narrowing, decided before the loaded keys and values are overwritten: per
            // blend, the rows kept above this layer (all, when it does not narrow here).
            let mut kept: Vec<u32> = Vec::with_capacity(rows.len());
            let mut first = 0;
            for group in groups.iter_mut() {
                let n = group.rows.len();
                let keep = group
                    .narrowing
                    .iter()
                    .find(|(at, _)| *at == layer)
                    .map(|&(_, keep)| keep)
                    .filter(|&keep| keep < n);
                match keep {
                    Some(keep) => {
                        let indices = &blend_rows[first..first + n];
                        let (loaded_k, loaded_v) = cache.rows(layer, indices)?;
                        let chosen = most_deviating(
                            &k.narrow(1, first, n)?,
                            &v.narrow(1, first, n)?,
                            &loaded_k,
                            &loaded_v,
                            keep,
                        )?;
                        group.rows = chosen.iter().map(|&i| group.rows[i as usize]).collect();
                        kept.extend(chosen.iter().map(|&i| first as u32 + i));
                    }
                    None => kept.extend(first as u32..(first + n) as u32),
                }
                first += n;
            }
            kept.extend(m as u32..rows.len() as u32);
            // Every token computed at this layer has its keys and values in context: all
            // are written, also those the narrowing drops from the layers above. The views
            // attended over end at the last row written: the tail's, else the last blend's.
            let blend_views = match m {
                0 => None,
                _ => Some(cache.write_rows(
                    layer,
                    &blend_rows,
                    &k.narrow(1, 0, m)?,
                    &v.narrow(1, 0, m)?,
                )?),
            };
            let (mut keys, mut values) = match blend_views {
                Some(views) if tail.is_empty() => views,
                _ => {
                    let t = tail.len();
                    cache.write_layer_at(layer, len, &k.narrow(1, m, t)?, &v.narrow(1, m, t)?)?
                }
            };
            let mut rows = rows;
            if kept.len() < rows.len() {
                let index = Tensor::new(kept.as_slice(), &self.device)?;
                x = x.index_select(&index, 0)?;
                q = q.index_select(&index, 0)?;
                rows = kept.iter().map(|&i| rows[i as usize]).collect();
                let end = rows[rows.len() - 1] + 1;
                keys = keys.narrow(1, 0, end)?;
                values = values.narrow(1, 0, end)?;
            }
            let correction = cache.layer_correction(layer);
            x = self.attend_and_mlp(block, &x, &q, &keys, &values, &rows, None, correction)?;
        }
        cache.commit(tail.len());
        let recomputed = groups.iter().map(|g| g.rows.len()).sum();
        Ok((x, recomputed))
    }

    /// Fills the rows of the blends with [`Selection::Query`] or
    /// [`Selection::QueryEarly`]: their budgets pooled, the tokens of those chunks that
    /// the `tail`, run over the cache as loaded, attends to most (attention summed over its
    /// tokens, heads and every layer probed). The probe's keys and
    /// values of the tail are written after the cache but not committed: the blended pass
    /// overwrites them.
    fn select_by_query(
        &self,
        blends: &[Blend<'_>],
        groups: &mut [RowPlan],
        tail: &[u32],
        cache: &mut KvCache,
    ) -> Result<()> {
        if tail.is_empty() {
            return Err(EngineError::InvalidSetting(
                "selecting the tokens a question attends to needs the question".into(),
            ));
        }
        let len = cache.len();
        let mut x = self.embed_tokens(tail)?;
        let rows: Vec<usize> = (len..len + tail.len()).collect();
        let scale = self.config.attention_scale;
        let mut mass = Tensor::zeros(len, DType::F32, &self.device)?;
        let depth = if blends
            .iter()
            .any(|b| matches!(b.selection, Selection::Query(_)))
        {
            self.blocks.len()
        } else {
            early_probe_layers(self.blocks.len())
        };
        let last = depth - 1;
        for (layer, block) in self.blocks.iter().enumerate().take(depth) {
            let weights = self.probe_weights(block);
            let (q, k, v) = self.project_qkv(layer, &x, &rows, cache, weights)?;
            let (keys, values) = cache.write_layer_at(layer, len, &k, &v)?;
            let probs = attention_probs(&q, &keys, &rows, scale, block.window)?;
            mass = (mass + probs.sum(0)?.narrow(0, 0, len)?)?;
            if layer < last {
                // The probe ranks the chunk tokens by what the question reads uncorrected.
                x = self.attend_and_mlp(block, &x, &q, &keys, &values, &rows, weights, None)?;
            }
        }
        let mass: Vec<f32> = mass.to_vec1()?;
        let budget: usize = blends
            .iter()
            .map(|b| match b.selection {
                Selection::Query(n) | Selection::QueryEarly(n) => n.min(b.tokens.len()),
                _ => 0,
            })
            .sum();
        let mut candidates: Vec<(usize, usize)> = blends
            .iter()
            .enumerate()
            .filter(|(_, b)| b.selection.probes_query())
            .flat_map(|(i, b)| (0..b.tokens.len()).map(move |r| (i, r)))
            .collect();
        candidates.sort_by(|&(a, ra), &(b, rb)| {
            let (ma, mb) = (mass[blends[a].offset + ra], mass[blends[b].offset + rb]);
            mb.total_cmp(&ma)
        });
        candidates.truncate(budget);
        candidates.sort_unstable();
        for (i, row) in candidates {
            groups[i].rows.push(row);
        }
        Ok(())
    }

    /// The weights the question's probe ([`Transformer::select_by_query`]) runs on: the
    /// block's quantized decode copies where decode steps use them (f32 on the CPU) and the
    /// CPU has the VNNI kernels that multiply many rows at once, else the dense ones. The
    /// probe only ranks the chunk tokens, and a pass over a question's few tokens is bound
    /// by reading the weights: the quantized copies are a quarter (8-bit) to an eighth (the
    /// file's Q4_1 blocks) of the dense f32 bytes. Its keys and values are overwritten by
    /// the blended pass, which runs on the dense weights as every prefill does.
    fn probe_weights<'a>(&self, block: &'a Block) -> Option<&'a DecodeWeights> {
        let fast = self.row_decode_head().is_some() && crate::qmatrix::vnni_available();
        block.decode.as_ref().filter(|_| fast)
    }

    /// The first half of a block for tokens at the cache indices `rows`: their queries,
    /// keys and values, rotated for their positions. Keys and values are `[n_kv, t, hd]`.
    fn project_qkv(
        &self,
        layer: usize,
        x: &Tensor,
        rows: &[usize],
        cache: &KvCache,
        decode: Option<&DecodeWeights>,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let qkv = self.qkv(&self.blocks[layer], x, decode)?;
        self.rotated_qkv(layer, &qkv, cache.base_position(), rows)
    }

    /// The stacked query, key and value projections of the normalised `x` (with their
    /// biases): `[t, (n_heads + 2·n_kv)·hd]`.
    fn qkv(&self, block: &Block, x: &Tensor, decode: Option<&DecodeWeights>) -> Result<Tensor> {
        let h = self.norm(x, &block.attn_norm)?;
        let qkv = linear(&h, &block.wqkv, decode.map(|d| &d.wqkv))?;
        Ok(match &block.qkv_bias {
            Some(bias) => qkv.broadcast_add(bias)?,
            None => qkv,
        })
    }

    /// Queries `[t, n_heads, hd]`, keys and values `[n_kv, t, hd]` of layer `layer`'s
    /// projections `qkv` of tokens at the cache indices `rows` of a cache starting at
    /// position `base`: queries and keys normalised per head where the family does, then
    /// rotated for their positions with the layer's table.
    fn rotated_qkv(
        &self,
        layer: usize,
        qkv: &Tensor,
        base: usize,
        rows: &[usize],
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let cfg = &self.config;
        let block = &self.blocks[layer];
        let (t, _) = qkv.dims2()?;
        let (hd, nh, nkv) = (cfg.head_dim, cfg.n_heads, cfg.n_kv_heads);
        let mut q = qkv.narrow(1, 0, nh * hd)?.reshape((t, nh, hd))?;
        let mut k = qkv.narrow(1, nh * hd, nkv * hd)?.reshape((t, nkv, hd))?;
        let v = qkv
            .narrow(1, (nh + nkv) * hd, nkv * hd)?
            .reshape((t, nkv, hd))?;
        if let (Some(q_norm), Some(k_norm)) = (&block.q_norm, &block.k_norm) {
            q = self.norm(&q.contiguous()?, q_norm)?;
            k = self.norm(&k.contiguous()?, k_norm)?;
        }
        let rope = self.ropes.layer(layer)?;
        let consecutive = rows.windows(2).all(|w| w[1] == w[0] + 1);
        let (q, k) = if consecutive {
            (
                rope.apply(&q, base + rows[0])?,
                rope.apply(&k, base + rows[0])?,
            )
        } else {
            let positions: Vec<u32> = rows.iter().map(|&r| (base + r) as u32).collect();
            (
                rope.apply_at(&q, &positions)?,
                rope.apply_at(&k, &positions)?,
            )
        };
        Ok((q, k.transpose(0, 1)?, v.transpose(0, 1)?))
    }

    /// The second half of a block: attention of the queries `q` (tokens at the cache
    /// indices `rows`) over `keys`/`values`, then the feed-forward; returns the new hidden
    /// states of the tokens.
    #[allow(clippy::too_many_arguments)]
    fn attend_and_mlp(
        &self,
        block: &Block,
        x: &Tensor,
        q: &Tensor,
        keys: &Tensor,
        values: &Tensor,
        rows: &[usize],
        decode: Option<&DecodeWeights>,
        correction: Option<LayerCorrection<'_>>,
    ) -> Result<Tensor> {
        let scale = self.config.attention_scale;
        let attn = attention(q, keys, values, rows, scale, block.window, correction)?;
        self.output_and_mlp(block, x, &attn, decode)
    }

    /// The attention output projection added to `x`, then the feed-forward.
    fn output_and_mlp(
        &self,
        block: &Block,
        x: &Tensor,
        attn: &Tensor,
        decode: Option<&DecodeWeights>,
    ) -> Result<Tensor> {
        let mut out = linear(attn, &block.wo, decode.map(|d| &d.wo))?;
        if let Some(norm) = &block.post_attn_norm {
            out = self.norm(&out, norm)?;
        }
        let x = (x + out)?;
        let h = self.norm(&x, &block.ffn_norm)?;
        let gate_up = linear(&h, &block.w_gate_up, decode.map(|d| &d.w_gate_up))?;
        let act = self.gated_activation(&gate_up)?;
        let mut mlp = linear(&act, &block.w_down, decode.map(|d| &d.w_down))?;
        if let Some(norm) = &block.post_ffn_norm {
            mlp = self.norm(&mlp, norm)?;
        }
        Ok((x + mlp)?)
    }

    /// `act(gate) · up` of the stacked feed-forward projections `[t, 2·ffn]`: in one pass
    /// over plain rows for f32 on the CPU, else by tensor operations.
    fn gated_activation(&self, gate_up: &Tensor) -> Result<Tensor> {
        let cfg = &self.config;
        let (t, width) = gate_up.dims2()?;
        if gate_up.device().is_cpu() && gate_up.dtype() == DType::F32 {
            let rows = gate_up.flatten_all()?.to_vec1::<f32>()?;
            let act = row_ops::gated_rows_parallel(&rows, width / 2, cfg.activation);
            return Ok(Tensor::from_vec(act, (t, width / 2), gate_up.device())?);
        }
        let gate = gate_up.narrow(1, 0, cfg.ffn_size)?;
        let up = gate_up.narrow(1, cfg.ffn_size, cfg.ffn_size)?;
        let gate = match cfg.activation {
            Activation::Silu => candle_nn::ops::silu(&gate)?,
            Activation::GeluTanh => gate.gelu()?,
        };
        Ok((gate * up)?)
    }

    /// One decode step of several sequences: `tokens[i]` is appended to `caches[i]`. The
    /// projections and the feed-forward run as one matrix product over all the rows, so
    /// the weights are read once for the batch; attention runs per sequence over its own
    /// cache. Through the quantized decode weights when the model keeps them, like
    /// [`Transformer::decode`], whose logits row `i` equals up to float summation order.
    /// Returns the logits `[batch, vocab]` (f32). On an error no cache has changed length.
    pub fn decode_batch(&self, tokens: &[u32], caches: &mut [&mut KvCache]) -> Result<Tensor> {
        if tokens.is_empty() || tokens.len() != caches.len() {
            return Err(EngineError::KvMismatch(format!(
                "a decode batch of {} tokens for {} caches",
                tokens.len(),
                caches.len()
            )));
        }
        for (token, cache) in tokens.iter().zip(caches.iter_mut()) {
            self.check_input(std::slice::from_ref(token), cache)?;
            if cache.partial_len() > 0 {
                return Err(EngineError::KvMismatch(
                    "a cache in a layer-split prefill cannot decode".into(),
                ));
            }
            self.check_room(cache.next_position(), 1)?;
            cache.reserve(1)?;
        }
        if let Some(head) = self.row_decode_head() {
            return self.decode_rows(tokens, caches, head);
        }
        let mut x = self.embed_tokens(tokens)?;
        let scale = self.config.attention_scale;
        for (layer, block) in self.blocks.iter().enumerate() {
            let decode = block.decode.as_ref();
            let qkv = self.qkv(block, &x, decode)?;
            let mut outputs = Vec::with_capacity(tokens.len());
            for (i, cache) in caches.iter_mut().enumerate() {
                let row = [cache.len()];
                let (q, k, v) =
                    self.rotated_qkv(layer, &qkv.narrow(0, i, 1)?, cache.base_position(), &row)?;
                let (keys, values) = cache.write_layer(layer, &k, &v)?;
                let correction = cache.layer_correction(layer);
                outputs.push(attention(
                    &q,
                    &keys,
                    &values,
                    &row,
                    scale,
                    block.window,
                    correction,
                )?);
            }
            let attn = Tensor::cat(&outputs, 0)?;
            x = self.output_and_mlp(block, &x, &attn, decode)?;
        }
        for cache in caches.iter_mut() {
            cache.commit(1);
        }
        self.head(&x, ReturnLogits::All, true)?
            .ok_or(EngineError::EmptyInput)
    }
}

impl Transformer {
    /// The decode head when decode steps take the slice-level path ([`Transformer::decode_rows`]):
    /// quantized weights kept, f32 activations and caches on the CPU.
    fn row_decode_head(&self) -> Option<&DecodeHead> {
        self.decode_head
            .as_ref()
            .filter(|_| self.dtype == DType::F32 && self.device.is_cpu())
    }

    /// [`Transformer::decode_batch`] on plain rows: the projections through [`QMatrix`], the
    /// norms, rotations, attention and activation by [`row_ops`], one tensor per cache write.
    /// The caches are checked and have room for one more token.
    fn decode_rows(
        &self,
        tokens: &[u32],
        caches: &mut [&mut KvCache],
        head: &DecodeHead,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let (hd, nh, nkv) = (cfg.head_dim, cfg.n_heads, cfg.n_kv_heads);
        let (q_width, kv_width) = (nh * hd, nkv * hd);
        let qkv_width = q_width + 2 * kv_width;
        let eps = cfg.rms_eps as f32;
        let scale = cfg.attention_scale as f32;
        let rows = tokens.len();
        let mut x = plain(&self.embed_tokens(tokens)?)?;
        // Each sequence's rotation angles, per distinct table (layers sharing a base share
        // their angles).
        let angle_sets: Vec<Vec<Angles>> = self
            .ropes
            .tables()
            .iter()
            .map(|rope| {
                caches
                    .iter()
                    .map(|c| rope.angles_at(c.next_position()))
                    .collect()
            })
            .collect();
        let style = cfg.rope_style;
        let mut normed = vec![0f32; x.len()];
        let mut attn = vec![0f32; rows * q_width];
        for (layer, block) in self.blocks.iter().enumerate() {
            let w = block.decode.as_ref().ok_or_else(|| {
                EngineError::KvMismatch("decode weights missing for a layer".into())
            })?;
            row_ops::rms_norm_rows(&x, &w.attn_norm, eps, &mut normed);
            let mut qkv = w.wqkv.matmul(&normed);
            let angles = &angle_sets[self.ropes.table_of(layer)?];
            for (i, cache) in caches.iter_mut().enumerate() {
                let row = &mut qkv[i * qkv_width..(i + 1) * qkv_width];
                if let Some(bias) = &w.qkv_bias {
                    row_ops::add_into(row, bias);
                }
                if let (Some(q_norm), Some(k_norm)) = (&w.q_norm, &w.k_norm) {
                    row_ops::rms_norm_in_place(&mut row[..q_width], q_norm, eps);
                    row_ops::rms_norm_in_place(&mut row[q_width..q_width + kv_width], k_norm, eps);
                }
                let (cos, sin) = &angles[i];
                row_ops::rope_heads(&mut row[..q_width + kv_width], hd, style, cos, sin);
                let k = Tensor::from_slice(
                    &row[q_width..q_width + kv_width],
                    (nkv, 1, hd),
                    &self.device,
                )?;
                let v = Tensor::from_slice(&row[q_width + kv_width..], (nkv, 1, hd), &self.device)?;
                cache.write_layer(layer, &k, &v)?;
            }
            // Each sequence attends over its own cache: in parallel when there are enough
            // of them to outweigh the hand-off between threads.
            let attend = |(i, (cache, out)): (usize, (&&mut KvCache, &mut [f32]))| {
                let query = &qkv[i * qkv_width..i * qkv_width + q_width];
                let own = cache.len();
                cache.with_layer_buffers(layer, |keys, values, capacity| {
                    let layout = row_ops::KvLayout {
                        n_heads: nh,
                        n_kv_heads: nkv,
                        head_dim: hd,
                        capacity,
                    };
                    let seen = first_visible(own, block.window)..own + 1;
                    let scores = row_ops::ScoreRule {
                        scale,
                        correction: cache.layer_correction(layer),
                    };
                    row_ops::attend_one(query, keys, values, layout, seen, scores, out)
                })
            };
            if rows >= PARALLEL_ATTENTION_ROWS {
                caches
                    .par_iter()
                    .zip(attn.par_chunks_mut(q_width))
                    .enumerate()
                    .try_for_each(attend)?;
            } else {
                caches
                    .iter()
                    .zip(attn.chunks_mut(q_width))
                    .enumerate()
                    .try_for_each(attend)?;
            }
            let mut out = w.wo.matmul(&attn);
            if let Some(norm) = &w.post_attn_norm {
                row_ops::rms_norm_in_place(&mut out, norm, eps);
            }
            row_ops::add_into(&mut x, &out);
            row_ops::rms_norm_rows(&x, &w.ffn_norm, eps, &mut normed);
            let act =
                row_ops::gated_rows(&w.w_gate_up.matmul(&normed), cfg.ffn_size, cfg.activation);
            let mut out = w.w_down.matmul(&act);
            if let Some(norm) = &w.post_ffn_norm {
                row_ops::rms_norm_in_place(&mut out, norm, eps);
            }
            row_ops::add_into(&mut x, &out);
        }
        for cache in caches.iter_mut() {
            cache.commit(1);
        }
        row_ops::rms_norm_rows(&x, &head.output_norm, eps, &mut normed);
        let logits = head.lm_head.matmul(&normed);
        self.softcap(Tensor::from_vec(
            logits,
            (rows, head.lm_head.rows()),
            &self.device,
        )?)
    }
}

/// cos and sin of one position's rotation angles, one per rotated pair.
type Angles = (Vec<f32>, Vec<f32>);

/// Decode batches of at least this many sequences attend in parallel.
const PARALLEL_ATTENTION_ROWS: usize = 4;

/// A loaded chunk to blend in: its tokens, the cache index of its first, and which of its
/// tokens to recompute.
#[derive(Debug, Clone, Copy)]
pub struct Blend<'a> {
    /// The chunk's token ids.
    pub tokens: &'a [u32],
    /// Cache index of its first token.
    pub offset: usize,
    /// Which tokens are recomputed.
    pub selection: Selection,
}

/// Which tokens of a loaded chunk [`Transformer::recompute`] runs in context.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "rule", content = "tokens")]
pub enum Selection {
    /// The chunk's first `n` tokens, through every layer (EPIC, arXiv 2410.15332): a
    /// chunk cache's first tokens are where it differs most, acting as attention sinks
    /// in the middle of the prompt.
    Leading(usize),
    /// The `n` tokens whose keys and values deviate most from the loaded ones (CacheBlend,
    /// arXiv 2405.16444): every token through the first layer, the `2n` most deviating at
    /// the second, the `n` most deviating at the third and above.
    Deviation(usize),
    /// The tokens the question attends to most over the loaded caches (query-aware, as
    /// ProphetKV, arXiv 2602.02579), through every layer: the question is first run over the
    /// cache as loaded (on the quantized decode weights where the model keeps them: the
    /// probe only ranks), and the `n` of every blend with this rule in the pass are pooled, so
    /// the chunks the question reads get the budget. Needs the question in the pass.
    Query(usize),
    /// The same, with the question's probe run over the first third of the layers only
    /// ([`early_probe_layers`]): a third of the probe's cost, the tokens ranked by what the
    /// question reads there. Pooled with `Query` blends of the same pass (the probe then
    /// runs every layer).
    QueryEarly(usize),
}

impl Selection {
    /// The selection a request's [`Recompute`](ragcake_scheduler::Recompute) setting makes
    /// for a chunk of `tokens`; none when nothing is recomputed. The rules are the
    /// scheduler's names for the selections (deviation, leading, query, query-early).
    pub fn for_recompute(recompute: &ragcake_scheduler::Recompute, tokens: usize) -> Option<Self> {
        use ragcake_scheduler::RecomputeRule;
        let n = recompute.tokens(tokens);
        (n > 0).then_some(match recompute.rule {
            RecomputeRule::Deviation => Self::Deviation(n),
            RecomputeRule::Leading => Self::Leading(n),
            RecomputeRule::Query => Self::Query(n),
            RecomputeRule::QueryEarly => Self::QueryEarly(n),
        })
    }
}

/// Layers the early query probe runs ([`Selection::QueryEarly`]) in a model of `layers`:
/// the scheduler's cost model counts the same layers.
pub use ragcake_scheduler::early_probe_layers;

/// The tokens of one chunk a blend computes: the rows (token indices within the chunk)
/// still computed, and the layers at which they are narrowed to how many.
struct RowPlan {
    rows: Vec<usize>,
    narrowing: Vec<(usize, usize)>,
}

impl Selection {
    /// Whether the question's probe chooses the tokens.
    fn probes_query(&self) -> bool {
        matches!(self, Self::Query(_) | Self::QueryEarly(_))
    }

    /// The rows computed from the first layer of a chunk of `n` tokens, and their narrowing.
    fn plan(&self, n: usize) -> RowPlan {
        let (rows, narrowing) = match *self {
            Self::Leading(k) => ((0..k.min(n)).collect(), Vec::new()),
            Self::Deviation(0) | Self::Query(_) | Self::QueryEarly(_) => (Vec::new(), Vec::new()),
            Self::Deviation(k) => ((0..n).collect(), vec![(1, (2 * k).min(n)), (2, k.min(n))]),
        };
        RowPlan { rows, narrowing }
    }
}

/// Indices (ascending) of the `keep` tokens whose recomputed keys and values (`[n_kv, t,
/// hd]`) are farthest, in squared L2 distance, from the loaded ones.
fn most_deviating(
    k: &Tensor,
    v: &Tensor,
    loaded_k: &Tensor,
    loaded_v: &Tensor,
    keep: usize,
) -> Result<Vec<u32>> {
    let distance = |a: &Tensor, b: &Tensor| -> Result<Tensor> {
        let d = (a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?;
        Ok(d.sqr()?.sum(2)?.sum(0)?)
    };
    let deviation: Vec<f32> = (distance(k, loaded_k)? + distance(v, loaded_v)?)?.to_vec1()?;
    let mut order: Vec<u32> = (0..deviation.len() as u32).collect();
    order.sort_by(|&a, &b| deviation[b as usize].total_cmp(&deviation[a as usize]));
    order.truncate(keep);
    order.sort_unstable();
    Ok(order)
}

/// `x · wᵀ`, through the quantized copy when one is given.
fn linear(x: &Tensor, w: &Tensor, quantized: Option<&QMatrix>) -> Result<Tensor> {
    Ok(match quantized {
        Some(q) => {
            let (t, _) = x.dims2()?;
            Tensor::from_vec(q.matmul(&plain(x)?), (t, q.rows()), x.device())?
                .to_dtype(x.dtype())?
        }
        None => x.matmul(&w.t()?)?,
    })
}

/// Causal grouped-query attention of `q` (`[t, n_heads, hd]`) over `keys`/`values`
/// (`[n_kv, context, hd]`), where query `i` is the token at cache index `rows[i]` (ascending)
/// and sees the keys up to and including its own — with a `window`, only the last `window`
/// of them. Returns `[t, n_heads·hd]`.
///
/// Queries are processed in blocks of [`QUERY_BLOCK`] tokens, each attending only to keys
/// from the first its first row sees to its own last row, so memory stays linear in the
/// context, the upper triangle of the score matrix is never computed beyond one block, and a
/// sliding-window layer reads only its window. Key/value heads are never repeated: the query
/// heads sharing one KV head are stacked as extra rows of one matrix product.
fn attention(
    q: &Tensor,
    keys: &Tensor,
    values: &Tensor,
    rows: &[usize],
    scale: f64,
    window: Option<usize>,
    correction: Option<LayerCorrection<'_>>,
) -> Result<Tensor> {
    if let Some(out) = fused_cpu_attention(q, keys, values, rows, scale, window, correction)? {
        return Ok(out);
    }
    blocked_attention(q, keys, values, rows, scale, window, correction)
}

/// [`attention`] by the fused kernel ([`FusedAttention`]) when the queries, keys and values
/// are f32 on the CPU and each head's rows are contiguous; `None` otherwise.
fn fused_cpu_attention(
    q: &Tensor,
    keys: &Tensor,
    values: &Tensor,
    rows: &[usize],
    scale: f64,
    window: Option<usize>,
    correction: Option<LayerCorrection<'_>>,
) -> Result<Option<Tensor>> {
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    if !(f32_cpu(q) && f32_cpu(keys) && f32_cpu(values)) {
        return Ok(None);
    }
    let (t, nh, hd) = q.dims3()?;
    let nkv = keys.dim(0)?;
    let queries = q.flatten_all()?.to_vec1::<f32>()?;
    let (k_storage, k_layout) = keys.storage_and_layout();
    let (v_storage, v_layout) = values.storage_and_layout();
    let (Storage::Cpu(k), Storage::Cpu(v)) = (&*k_storage, &*v_storage) else {
        return Ok(None);
    };
    let rows_contiguous = |layout: &candle_core::Layout| layout.stride()[1..] == [hd, 1];
    if !(rows_contiguous(k_layout) && rows_contiguous(v_layout)) {
        return Ok(None);
    }
    let out = FusedAttention {
        n_heads: nh,
        n_kv_heads: nkv,
        head_dim: hd,
        scale: scale as f32,
        rows,
        window,
        correction,
    }
    .run(&queries, kv_heads(k, k_layout)?, kv_heads(v, v_layout)?);
    Ok(Some(Tensor::from_vec(out, (t, nh * hd), q.device())?))
}

/// One layer's keys or values in `storage` as the fused kernel reads them.
fn kv_heads<'a>(
    storage: &'a candle_core::CpuStorage,
    layout: &candle_core::Layout,
) -> Result<KvHeads<'a>> {
    Ok(KvHeads {
        data: &storage.as_slice::<f32>()?[layout.start_offset()..],
        head_stride: layout.stride()[0],
    })
}

/// [`attention`] by tensor operations, query block by query block: the path of every
/// device and dtype the fused kernel does not take.
#[allow(clippy::too_many_arguments)]
fn blocked_attention(
    q: &Tensor,
    keys: &Tensor,
    values: &Tensor,
    rows: &[usize],
    scale: f64,
    window: Option<usize>,
    correction: Option<LayerCorrection<'_>>,
) -> Result<Tensor> {
    let (t, nh, hd) = q.dims3()?;
    let nkv = keys.dim(0)?;
    let group = nh / nkv;
    let device = q.device();
    // [n_kv, t, group, hd]: token-major inside each KV head, so a block of tokens is a
    // contiguous run of rows once copied.
    let q = (q * scale)?.reshape((t, nkv, group, hd))?.transpose(0, 1)?;
    let mut outputs = Vec::with_capacity(t.div_ceil(QUERY_BLOCK));
    let mut s = 0;
    while s < t {
        let len = QUERY_BLOCK.min(t - s);
        let block_rows = &rows[s..s + len];
        let kv_end = block_rows[len - 1] + 1;
        let kv_start = first_visible(block_rows[0], window);
        let span = kv_end - kv_start;
        let qb = q
            .narrow(1, s, len)?
            .contiguous()?
            .reshape((nkv, len * group, hd))?;
        let kb = keys.narrow(1, kv_start, span)?;
        let vb = values.narrow(1, kv_start, span)?;
        let mut scores = qb.matmul(&kb.t()?)?.to_dtype(DType::F32)?;
        let masked = len > 1 || window.is_some_and(|w| span > w);
        let keys = kv_start..kv_end;
        let corrected = correction.and_then(|c| score_correction(&c, block_rows, keys.clone()));
        // Each `[len, 1, span]` term broadcast over the heads; the mask and the correction's
        // offset are summed first, so the scores take one addition (a pass over them costs
        // more than building the terms).
        let per_row = |values: Vec<f32>| -> Result<Tensor> {
            Ok(Tensor::from_vec(values, (len, 1, span), device)?)
        };
        let (factor, offset) = corrected.map_or((None, None), |c| (c.factor, Some(c.offset)));
        if let Some(factor) = factor {
            scores = scores
                .reshape((nkv, len, group, span))?
                .broadcast_mul(&per_row(factor)?)?
                .reshape((nkv, len * group, span))?;
        }
        let added = match (masked, offset) {
            (false, offset) => offset,
            (true, None) => Some(mask_values(block_rows, keys, window)),
            (true, Some(mut offset)) => {
                let mask = mask_values(block_rows, keys, window);
                offset.iter_mut().zip(mask).for_each(|(o, m)| *o += m);
                Some(offset)
            }
        };
        if let Some(added) = added {
            scores = scores
                .reshape((nkv, len, group, span))?
                .broadcast_add(&per_row(added)?)?
                .reshape((nkv, len * group, span))?;
        }
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(vb.dtype())?;
        let out = probs.matmul(&vb)?; // [n_kv, len·group, hd]
        outputs.push(out.reshape((nkv, len, group, hd))?);
        s += len;
    }
    let out = Tensor::cat(&outputs, 1)?; // [n_kv, t, group, hd]
    Ok(out.transpose(0, 1)?.reshape((t, nh * hd))?)
}

/// What a correction does to the scores of the queries at the cache indices `rows` over
/// `keys`, each row by `keys.len()` values: multiplied by `factor` (none at temperature 1,
/// the calibrated case of both bundled models), then `offset` added (1 and 0 where it does
/// not apply).
struct ScoreCorrection {
    factor: Option<Vec<f32>>,
    offset: Vec<f32>,
}

/// The [`ScoreCorrection`] of `correction` for a block; `None` when it applies nowhere in
/// the block.
fn score_correction(
    correction: &LayerCorrection<'_>,
    rows: &[usize],
    keys: std::ops::Range<usize>,
) -> Option<ScoreCorrection> {
    let corrected: Vec<bool> = keys.clone().map(|k| correction.corrects(k)).collect();
    if !rows.iter().any(|&r| correction.applies_to(r)) || !corrected.contains(&true) {
        return None;
    }
    let span = corrected.len();
    let scaled = correction.factor != 1.0;
    let mut factor = vec![1f32; if scaled { rows.len() * span } else { 0 }];
    let mut offset = vec![0f32; rows.len() * span];
    for (i, &row) in rows.iter().enumerate() {
        if !correction.applies_to(row) {
            continue;
        }
        for (j, _) in corrected.iter().enumerate().filter(|(_, c)| **c) {
            if scaled {
                factor[i * span + j] = correction.factor;
            }
            offset[i * span + j] = correction.offset;
        }
    }
    Some(ScoreCorrection {
        factor: scaled.then_some(factor),
        offset,
    })
}

/// The first cache index the token at cache index `row` sees: 0 for global attention, the
/// start of its window otherwise.
fn first_visible(row: usize, window: Option<usize>) -> usize {
    window.map_or(0, |w| (row + 1).saturating_sub(w))
}

/// Attention probabilities of the queries `q` (`[t, n_heads, hd]`, tokens at the cache
/// indices `rows`) over `keys` (`[n_kv, context, hd]`), summed over the query heads:
/// `[t, kv_end]` (f32), `kv_end` the key after the last row's own.
fn attention_probs(
    q: &Tensor,
    keys: &Tensor,
    rows: &[usize],
    scale: f64,
    window: Option<usize>,
) -> Result<Tensor> {
    let (t, nh, hd) = q.dims3()?;
    let nkv = keys.dim(0)?;
    let group = nh / nkv;
    let kv_end = rows[t - 1] + 1;
    let q = (q * scale)?
        .reshape((t, nkv, group, hd))?
        .transpose(0, 1)?
        .contiguous()?
        .reshape((nkv, t * group, hd))?;
    let scores = q.matmul(&keys.narrow(1, 0, kv_end)?.t()?)?;
    let mask = attention_mask(rows, 0..kv_end, window, q.device())?.to_dtype(scores.dtype())?;
    let scores = scores
        .reshape((nkv, t, group, kv_end))?
        .broadcast_add(&mask)?
        .to_dtype(DType::F32)?;
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    Ok(probs.sum(2)?.sum(0)?)
}

/// `[rows, 1, keys.len()]` additive mask over the cache indices `keys`: the query at cache
/// index `rows[i]` sees the keys up to and including its own, and with a `window` only the
/// last `window` of them.
fn attention_mask(
    rows: &[usize],
    keys: std::ops::Range<usize>,
    window: Option<usize>,
    device: &Device,
) -> Result<Tensor> {
    let span = keys.end - keys.start;
    let mask = mask_values(rows, keys, window);
    Ok(Tensor::from_vec(mask, (rows.len(), 1, span), device)?)
}

/// The values of [`attention_mask`], row after row.
fn mask_values(rows: &[usize], keys: std::ops::Range<usize>, window: Option<usize>) -> Vec<f32> {
    let span = keys.end - keys.start;
    let mut mask = vec![0f32; rows.len() * span];
    for (i, &row) in rows.iter().enumerate() {
        let line = &mut mask[i * span..(i + 1) * span];
        let first = first_visible(row, window).max(keys.start) - keys.start;
        let last = (row + 1).clamp(keys.start, keys.end) - keys.start;
        line[..first].fill(f32::NEG_INFINITY);
        line[last..].fill(f32::NEG_INFINITY);
    }
    mask
}

/// The rotary tables of every layer of `config`: one per distinct base and scale.
fn layer_ropes(
    config: &ModelConfig,
    freq_factors: Option<&[f32]>,
    dtype: DType,
    device: &Device,
) -> Result<LayerRopes> {
    let mut keys: Vec<(u64, u64)> = Vec::new();
    let mut tables = Vec::new();
    let mut of_layer = Vec::with_capacity(config.layers.len());
    for layer in &config.layers {
        let key = (
            layer.rope_theta.to_bits(),
            layer.rope_linear_scale.to_bits(),
        );
        let index = match keys.iter().position(|k| *k == key) {
            Some(index) => index,
            None => {
                tables.push(Rope::new(
                    config.rope_style,
                    config.head_dim,
                    layer.rope_theta,
                    freq_factors,
                    layer.rope_linear_scale,
                    config.context_length,
                    dtype,
                    device,
                )?);
                keys.push(key);
                tables.len() - 1
            }
        };
        of_layer.push(index);
    }
    LayerRopes::new(tables, of_layer)
}

fn expect_dims(name: &str, t: &Tensor, dims: &[usize]) -> Result<()> {
    if t.dims() == dims {
        Ok(())
    } else {
        Err(EngineError::Tensor {
            name: name.to_string(),
            reason: format!("expected shape {dims:?}, found {:?}", t.dims()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causal_mask_hides_only_future_keys() {
        let mask = attention_mask(&[2, 3, 4], 0..5, None, &Device::Cpu).unwrap();
        let rows: Vec<Vec<f32>> = mask.squeeze(1).unwrap().to_vec2().unwrap();
        let inf = f32::NEG_INFINITY;
        assert_eq!(rows[0], vec![0.0, 0.0, 0.0, inf, inf]);
        assert_eq!(rows[1], vec![0.0, 0.0, 0.0, 0.0, inf]);
        assert_eq!(rows[2], vec![0.0; 5]);
    }

    #[test]
    fn blocked_attention_equals_plain_softmax_attention() {
        // 300 queries over 40 cached + 300 new keys: two query blocks, a partial one last.
        let dev = Device::Cpu;
        let (t, past, nh, nkv, hd) = (300, 40, 4, 2, 8);
        let q = Tensor::randn(0f32, 1.0, (t, nh, hd), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (nkv, past + t, hd), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (nkv, past + t, hd), &dev).unwrap();
        let scale = (hd as f64).powf(-0.5);
        let rows: Vec<usize> = (past..past + t).collect();
        // Reference: each query head against its KV head, full mask, no blocking.
        let expected = reference_attention(&q, &k, &v, &rows, None);
        for (name, path) in PATHS {
            let got = path(&q, &k, &v, &rows, scale, None, None).unwrap();
            let diff = crate::test_util::max_abs_diff(&got, &expected);
            assert!(diff < 1e-5, "{name}: {diff}");
        }
    }

    /// The fused kernel (f32 on the CPU) and the blocked tensor path (every other device
    /// and dtype): both are checked against the same references.
    type AttentionPath = fn(
        &Tensor,
        &Tensor,
        &Tensor,
        &[usize],
        f64,
        Option<usize>,
        Option<LayerCorrection<'_>>,
    ) -> Result<Tensor>;
    const PATHS: [(&str, AttentionPath); 2] =
        [("fused", attention), ("blocked", blocked_attention)];

    /// Reference attention: each query head against its KV head over the whole cache, with
    /// the mask built position by position.
    fn reference_attention(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        rows: &[usize],
        window: Option<usize>,
    ) -> Tensor {
        let (t, nh, hd) = q.dims3().unwrap();
        let (nkv, context, _) = k.dims3().unwrap();
        let scale = (hd as f64).powf(-0.5);
        let mut mask = vec![0f32; t * context];
        for (i, &row) in rows.iter().enumerate() {
            for key in 0..context {
                let visible = key <= row && window.is_none_or(|w| row - key < w);
                if !visible {
                    mask[i * context + key] = f32::NEG_INFINITY;
                }
            }
        }
        let mask = Tensor::from_vec(mask, (t, context), &Device::Cpu).unwrap();
        let heads: Vec<Tensor> = (0..nh)
            .map(|h| {
                let qh = q.narrow(1, h, 1).unwrap().squeeze(1).unwrap();
                let kh = k.get(h / (nh / nkv)).unwrap();
                let vh = v.get(h / (nh / nkv)).unwrap();
                let scores = (qh.matmul(&kh.t().unwrap()).unwrap() * scale).unwrap();
                let p = candle_nn::ops::softmax_last_dim(&(scores + &mask).unwrap()).unwrap();
                p.matmul(&vh).unwrap()
            })
            .collect();
        Tensor::stack(&heads, 1)
            .unwrap()
            .reshape((t, nh * hd))
            .unwrap()
    }

    #[test]
    fn sliding_window_attention_sees_exactly_the_last_window_positions() {
        let dev = Device::Cpu;
        let (past, t, nh, nkv, hd) = (90, 300, 4, 1, 8);
        let q = Tensor::randn(0f32, 1.0, (t, nh, hd), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (nkv, past + t, hd), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (nkv, past + t, hd), &dev).unwrap();
        let scale = (hd as f64).powf(-0.5);
        let rows: Vec<usize> = (past..past + t).collect();
        // Windows shorter than a query block, longer than one, longer than the context.
        for window in [1, 7, 16, 300, 1000] {
            let expected = reference_attention(&q, &k, &v, &rows, Some(window));
            for (name, path) in PATHS {
                let got = path(&q, &k, &v, &rows, scale, Some(window), None).unwrap();
                let diff = crate::test_util::max_abs_diff(&got, &expected);
                assert!(diff < 1e-5, "{name}, window {window}: {diff}");
            }
        }
        // Scattered rows (a blend's selected tokens), one row alone (a decode step).
        let scattered = [3usize, 40, 41, 200, 389];
        let qs = Tensor::randn(0f32, 1.0, (scattered.len(), nh, hd), &dev).unwrap();
        for rows in [&scattered[..], &scattered[4..]] {
            let qs = qs.narrow(0, 5 - rows.len(), rows.len()).unwrap();
            let expected = reference_attention(&qs, &k, &v, rows, Some(16));
            for (name, path) in PATHS {
                let got = path(&qs, &k, &v, rows, scale, Some(16), None).unwrap();
                let diff = crate::test_util::max_abs_diff(&got, &expected);
                assert!(diff < 1e-5, "{name}, rows {rows:?}: {diff}");
            }
        }
        // And the window changes the result: it is not global attention.
        let global = attention(&q, &k, &v, &rows, scale, None, None).unwrap();
        let local = attention(&q, &k, &v, &rows, scale, Some(16), None).unwrap();
        assert!(crate::test_util::max_abs_diff(&global, &local) > 0.1);
    }

    /// The corrected attention of one query head, written apart from the kernels: the
    /// three groups (the keys before the chunks and recomputed ones, the loaded chunk keys
    /// at temperature `t`, the tail) each normalised alone, then merged by their
    /// log-sum-exp, the chunk group's mass scaled by `s`.
    fn merged_by_log_sum_exp(
        scores: &[f64],
        values: &[Vec<f64>],
        chunk: &[bool],
        t: f64,
        s: f64,
    ) -> Vec<f64> {
        let groups: [Box<dyn Fn(usize) -> bool>; 2] =
            [Box::new(|j| !chunk[j]), Box::new(|j| chunk[j])];
        let mut total = 0.0;
        let mut out = vec![0.0; values[0].len()];
        for (g, member) in groups.iter().enumerate() {
            let (temperature, mass) = if g == 1 { (t, s) } else { (1.0, 1.0) };
            let keys: Vec<usize> = (0..scores.len()).filter(|&j| member(j)).collect();
            let lse = keys
                .iter()
                .map(|&j| (scores[j] / temperature).exp())
                .sum::<f64>()
                .ln();
            let weight = mass * lse.exp();
            for &j in &keys {
                let p = (scores[j] / temperature - lse).exp();
                for (o, v) in out.iter_mut().zip(&values[j]) {
                    *o += weight * p * v;
                }
            }
            total += weight;
        }
        out.iter().map(|o| o / total).collect()
    }

    #[test]
    fn corrected_attention_is_the_log_sum_exp_merge_of_its_groups_and_the_identity_changes_nothing()
    {
        let dev = Device::Cpu;
        // Keys 0..4 a preamble, 4..20 loaded chunks (key 9 recomputed in context), 20..26
        // the tail; queries 16..26: chunk rows (never corrected) and tail rows.
        let (context, queries_from, nh, nkv, hd) = (26, 20, 2, 1, 8);
        let rows: Vec<usize> = (16..context).collect();
        let q = Tensor::randn(0f32, 1.0, (rows.len(), nh, hd), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (nkv, context, hd), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (nkv, context, hd), &dev).unwrap();
        let scale = (hd as f64).powf(-0.5);
        let mut keys = vec![false; queries_from];
        keys[4..20].fill(true);
        keys[9] = false;
        let (t, s) = (0.7f32, 0.6f32);
        let correction = LayerCorrection {
            factor: 1.0 / t,
            offset: s.ln(),
            queries_from,
            keys: &keys,
        };
        let plain = attention(&q, &k, &v, &rows, scale, None, None).unwrap();
        let identity = LayerCorrection {
            factor: 1.0,
            offset: 0.0,
            ..correction
        };
        let same = attention(&q, &k, &v, &rows, scale, None, Some(identity)).unwrap();
        let bits = |t: &Tensor| -> Vec<u32> {
            let rows: Vec<Vec<f32>> = t.to_vec2().unwrap();
            rows.concat().iter().map(|x| x.to_bits()).collect()
        };
        assert_eq!(bits(&plain), bits(&same));
        let got: Vec<Vec<f32>> = attention(&q, &k, &v, &rows, scale, None, Some(correction))
            .unwrap()
            .to_vec2()
            .unwrap();
        let plain: Vec<Vec<f32>> = plain.to_vec2().unwrap();
        let qv: Vec<Vec<Vec<f32>>> = q.to_vec3().unwrap();
        let kv: Vec<Vec<f32>> = k.get(0).unwrap().to_vec2().unwrap();
        let vv: Vec<Vec<f64>> = v
            .get(0)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap()
            .iter()
            .map(|r| r.iter().map(|&x| x as f64).collect())
            .collect();
        for (i, &row) in rows.iter().enumerate() {
            if row < queries_from {
                assert_eq!(got[i], plain[i], "a chunk row is never corrected");
                continue;
            }
            for h in 0..nh {
                let seen = row + 1;
                let scores: Vec<f64> = (0..seen)
                    .map(|j| {
                        let dot: f32 = qv[i][h].iter().zip(&kv[j]).map(|(a, b)| a * b).sum();
                        dot as f64 * scale
                    })
                    .collect();
                let chunk: Vec<bool> = (0..seen).map(|j| keys.get(j) == Some(&true)).collect();
                let want = merged_by_log_sum_exp(&scores, &vv[..seen], &chunk, t as f64, s as f64);
                for (d, w) in want.iter().enumerate() {
                    let g = got[i][h * hd + d] as f64;
                    assert!((g - w).abs() < 1e-4, "row {row} head {h}: {g} vs {w}");
                }
            }
        }
        // The decode kernel corrects the same way.
        let row = context - 1;
        let layout = row_ops::KvLayout {
            n_heads: nh,
            n_kv_heads: nkv,
            head_dim: hd,
            capacity: context,
        };
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let query = flat(&q.get(rows.len() - 1).unwrap());
        let mut out = vec![0f32; nh * hd];
        let (kf, vf) = (flat(&k), flat(&v));
        row_ops::attend_one(
            &query,
            &kf,
            &vf,
            layout,
            0..row + 1,
            row_ops::ScoreRule {
                scale: scale as f32,
                correction: Some(correction),
            },
            &mut out,
        );
        for (a, b) in out.iter().zip(&got[rows.len() - 1]) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }
}
