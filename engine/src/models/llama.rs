//! The llama model family (llama 1–3, Mistral, SmolLM, TinyLlama, …) loaded from GGUF.
//!
//! Weights are dequantized at load time: on CPU, dense f32 matrix products are an order of
//! magnitude faster than the quantized kernels available to us, and the models this engine
//! targets are small. The KV cache is the engine's own [`KvCache`], so prefill can run over any
//! token range at any position and caches can be exported and imported.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};

use crate::error::{EngineError, Result};
use crate::gguf::GgufFile;
use crate::kv::{KvCache, KvShape};
use crate::rope::Rope;

/// Architecture hyper-parameters read from the GGUF metadata.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LlamaConfig {
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
    /// RoPE base frequency.
    pub rope_theta: f64,
    /// Linear RoPE position scale (1.0 when unscaled).
    pub rope_linear_scale: f64,
    /// Positions the model was trained for; the engine's context window.
    pub context_length: usize,
    /// Vocabulary entries.
    pub vocab_size: usize,
}

impl LlamaConfig {
    /// Reads the hyper-parameters of a `general.architecture = "llama"` GGUF file.
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self> {
        let arch = gguf.string("general.architecture")?;
        if arch != "llama" {
            return Err(EngineError::UnsupportedArchitecture(arch.to_string()));
        }
        if gguf.opt_usize("llama.expert_count").unwrap_or(0) > 0 {
            return Err(EngineError::UnsupportedFeature(
                "mixture-of-experts llama models".into(),
            ));
        }
        let hidden_size = gguf.usize("llama.embedding_length")?;
        let n_heads = gguf.usize("llama.attention.head_count")?;
        let n_kv_heads = gguf
            .opt_usize("llama.attention.head_count_kv")
            .unwrap_or(n_heads);
        if n_heads == 0 || n_kv_heads == 0 || !n_heads.is_multiple_of(n_kv_heads) {
            return Err(EngineError::Metadata {
                key: "llama.attention.head_count_kv".into(),
                reason: format!(
                    "{n_heads} query heads cannot be grouped over {n_kv_heads} KV heads"
                ),
            });
        }
        let head_dim = gguf
            .opt_usize("llama.attention.key_length")
            .unwrap_or(hidden_size / n_heads);
        let rope_dim = gguf
            .opt_usize("llama.rope.dimension_count")
            .unwrap_or(head_dim);
        if rope_dim != head_dim || !head_dim.is_multiple_of(2) {
            return Err(EngineError::UnsupportedFeature(format!(
                "partial rotary embeddings ({rope_dim} of {head_dim} dimensions)"
            )));
        }
        let rope_linear_scale = match gguf.opt_string("llama.rope.scaling.type") {
            None | Some("none") => 1.0,
            Some("linear") => gguf.opt_f64("llama.rope.scaling.factor").unwrap_or(1.0),
            Some(other) => {
                return Err(EngineError::UnsupportedFeature(format!(
                    "RoPE scaling {other:?}"
                )));
            }
        };
        let vocab_size = match gguf.opt_usize("llama.vocab_size") {
            Some(v) => v,
            None => gguf.tensor_dims("token_embd.weight")?[0],
        };
        Ok(Self {
            n_layers: gguf.usize("llama.block_count")?,
            hidden_size,
            n_heads,
            n_kv_heads,
            head_dim,
            ffn_size: gguf.usize("llama.feed_forward_length")?,
            rms_eps: gguf
                .opt_f64("llama.attention.layer_norm_rms_epsilon")
                .unwrap_or(1e-5),
            rope_theta: gguf.opt_f64("llama.rope.freq_base").unwrap_or(10_000.0),
            rope_linear_scale,
            context_length: gguf.usize("llama.context_length")?,
            vocab_size,
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
}

/// Which logits a forward pass returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
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
    wo: Tensor,
    ffn_norm: Tensor,
    /// Gate and up projections stacked: `[2·ffn, hidden]`.
    w_gate_up: Tensor,
    w_down: Tensor,
    /// The same projections quantized to Q8_0 for decode steps, when enabled.
    decode: Option<DecodeWeights>,
}

/// Q8_0 copies of a block's projections. One-token decode steps are bound by memory
/// bandwidth, not arithmetic: reading 8.5 bits per weight instead of 32 makes them several
/// times faster, while prefill keeps the dense f32 weights that its large products need.
struct DecodeWeights {
    wqkv: QMatMul,
    wo: QMatMul,
    w_gate_up: QMatMul,
    w_down: QMatMul,
}

/// Forward passes over at most this many tokens use the quantized decode weights.
pub const DECODE_MAX_TOKENS: usize = 4;

fn quantized(w: &Tensor) -> Result<QMatMul> {
    let q = QTensor::quantize(&w.to_dtype(DType::F32)?, GgmlDType::Q8_0)?;
    Ok(QMatMul::QTensor(std::sync::Arc::new(q)))
}

/// Queries per attention block: bounds the score matrix to `heads × QUERY_BLOCK × context`
/// floats however long the prompt is.
const QUERY_BLOCK: usize = 256;

/// A llama-family transformer.
pub struct Llama {
    config: LlamaConfig,
    embed: Tensor,
    /// `None` when the output projection is tied to the embedding.
    lm_head: Option<Tensor>,
    /// Q8_0 output projection for decode steps, when enabled.
    lm_head_decode: Option<QMatMul>,
    output_norm: Tensor,
    blocks: Vec<Block>,
    rope: Rope,
    device: Device,
    dtype: DType,
}

impl std::fmt::Debug for Llama {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Llama")
            .field("config", &self.config)
            .field("device", &self.device)
            .field("dtype", &self.dtype)
            .finish()
    }
}

impl Llama {
    /// Loads the model's weights from `gguf`, dequantized to `dtype` on `device`. With
    /// `quantized_decode` (CPU only), Q8_0 copies of the projections serve decode steps of at
    /// most [`DECODE_MAX_TOKENS`] tokens.
    pub fn load(
        gguf: &mut GgufFile,
        device: &Device,
        dtype: DType,
        quantized_decode: bool,
    ) -> Result<Self> {
        let quantized_decode = quantized_decode && device.is_cpu();
        let config = LlamaConfig::from_gguf(gguf)?;
        let embed = gguf.dequantized("token_embd.weight", device, dtype)?;
        expect_dims(
            "token_embd.weight",
            &embed,
            &[config.vocab_size, config.hidden_size],
        )?;
        let lm_head = if gguf.has_tensor("output.weight") {
            let w = gguf.dequantized("output.weight", device, dtype)?;
            expect_dims(
                "output.weight",
                &w,
                &[config.vocab_size, config.hidden_size],
            )?;
            Some(w)
        } else {
            None
        };
        let output_norm = gguf.dequantized("output_norm.weight", device, dtype)?;
        let (h, hd) = (config.hidden_size, config.head_dim);
        let q_width = config.n_heads * hd;
        let kv_width = config.n_kv_heads * hd;
        let mut blocks = Vec::with_capacity(config.n_layers);
        for i in 0..config.n_layers {
            let mut w = |name: &str, dims: &[usize]| -> Result<Tensor> {
                let full = format!("blk.{i}.{name}.weight");
                let t = gguf.dequantized(&full, device, dtype)?;
                expect_dims(&full, &t, dims)?;
                Ok(t)
            };
            let attn_norm = w("attn_norm", &[h])?;
            let wq = w("attn_q", &[q_width, h])?;
            let wk = w("attn_k", &[kv_width, h])?;
            let wv = w("attn_v", &[kv_width, h])?;
            let wo = w("attn_output", &[h, q_width])?;
            let ffn_norm = w("ffn_norm", &[h])?;
            let gate = w("ffn_gate", &[config.ffn_size, h])?;
            let up = w("ffn_up", &[config.ffn_size, h])?;
            let w_down = w("ffn_down", &[h, config.ffn_size])?;
            let wqkv = Tensor::cat(&[&wq, &wk, &wv], 0)?;
            let w_gate_up = Tensor::cat(&[&gate, &up], 0)?;
            let decode = if quantized_decode {
                Some(DecodeWeights {
                    wqkv: quantized(&wqkv)?,
                    wo: quantized(&wo)?,
                    w_gate_up: quantized(&w_gate_up)?,
                    w_down: quantized(&w_down)?,
                })
            } else {
                None
            };
            blocks.push(Block {
                attn_norm,
                wqkv,
                wo,
                ffn_norm,
                w_gate_up,
                w_down,
                decode,
            });
        }
        let freq_factors = if gguf.has_tensor("rope_freqs.weight") {
            let f = gguf.dequantized("rope_freqs.weight", &Device::Cpu, DType::F32)?;
            Some(f.flatten_all()?.to_vec1::<f32>()?)
        } else {
            None
        };
        let rope = Rope::new(
            config.head_dim,
            config.rope_theta,
            freq_factors.as_deref(),
            config.rope_linear_scale,
            config.context_length,
            dtype,
            device,
        )?;
        let lm_head_decode = if quantized_decode {
            Some(quantized(lm_head.as_ref().unwrap_or(&embed))?)
        } else {
            None
        };
        Ok(Self {
            config,
            embed,
            lm_head,
            lm_head_decode,
            output_norm,
            blocks,
            rope,
            device: device.clone(),
            dtype,
        })
    }

    /// The model's hyper-parameters.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// The rotary embedding tables (for moving cached keys to other positions).
    pub fn rope(&self) -> &Rope {
        &self.rope
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
    /// by the bottom layers only (see [`Llama::forward_bottom`]) are the first ones
    /// recomputed: the same tokens, so their bottom layers are overwritten with equal values.
    ///
    /// Returns the requested logits (f32) or `None` for [`Logits::None`].
    pub fn forward(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        logits: Logits,
    ) -> Result<Option<Tensor>> {
        let layers = self.blocks.len();
        let x = self.run_blocks(tokens, cache, layers, cache.len())?;
        cache.commit(tokens.len());
        let t = tokens.len();
        let x = match logits {
            Logits::None => return Ok(None),
            Logits::Last => x.narrow(0, t - 1, 1)?,
            Logits::All => x,
        };
        let x = candle_nn::ops::rms_norm(&x, &self.output_norm, self.config.rms_eps as f32)?;
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let quant = self
            .lm_head_decode
            .as_ref()
            .filter(|_| t <= DECODE_MAX_TOKENS);
        let out = linear(&x, head, quant)?.to_dtype(DType::F32)?;
        Ok(Some(match logits {
            Logits::Last => out.squeeze(0)?,
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
        self.run_blocks(tokens, cache, layers, cache.len() + cache.partial_len())?;
        cache.commit_bottom(tokens.len(), layers);
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
    ) -> Result<Tensor> {
        let t = tokens.len();
        if t == 0 {
            return Err(EngineError::EmptyInput);
        }
        let start = cache.base_position() + offset;
        if start + t > self.config.context_length {
            return Err(EngineError::ContextOverflow {
                needed: start + t,
                max: self.config.context_length,
            });
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
        cache.reserve(t)?;
        let ids = Tensor::new(tokens, &self.device)?;
        let mut x = self.embed.index_select(&ids, 0)?;
        for (i, block) in self.blocks.iter().take(layers).enumerate() {
            x = self.block_forward(block, i, &x, start, offset, cache)?;
        }
        Ok(x)
    }

    fn block_forward(
        &self,
        block: &Block,
        layer: usize,
        x: &Tensor,
        start: usize,
        offset: usize,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let (t, _) = x.dims2()?;
        let (hd, nh, nkv) = (cfg.head_dim, cfg.n_heads, cfg.n_kv_heads);
        let eps = cfg.rms_eps as f32;

        let decode = block.decode.as_ref().filter(|_| t <= DECODE_MAX_TOKENS);
        let h = candle_nn::ops::rms_norm(x, &block.attn_norm, eps)?;
        let qkv = linear(&h, &block.wqkv, decode.map(|d| &d.wqkv))?;
        let q = qkv.narrow(1, 0, nh * hd)?.reshape((t, nh, hd))?;
        let k = qkv.narrow(1, nh * hd, nkv * hd)?.reshape((t, nkv, hd))?;
        let v = qkv
            .narrow(1, (nh + nkv) * hd, nkv * hd)?
            .reshape((t, nkv, hd))?;
        let q = self.rope.apply(&q, start)?;
        let k = self.rope.apply(&k, start)?;
        let (keys, values) =
            cache.write_layer_at(layer, offset, &k.transpose(0, 1)?, &v.transpose(0, 1)?)?;
        let attn = attention(&q, &keys, &values, offset, (hd as f64).powf(-0.5))?;
        let x = (x + linear(&attn, &block.wo, decode.map(|d| &d.wo))?)?;

        let h = candle_nn::ops::rms_norm(&x, &block.ffn_norm, eps)?;
        let gate_up = linear(&h, &block.w_gate_up, decode.map(|d| &d.w_gate_up))?;
        let gate = gate_up.narrow(1, 0, cfg.ffn_size)?;
        let up = gate_up.narrow(1, cfg.ffn_size, cfg.ffn_size)?;
        let act = (candle_nn::ops::silu(&gate)? * up)?;
        let mlp = linear(&act, &block.w_down, decode.map(|d| &d.w_down))?;
        Ok((x + mlp)?)
    }
}

/// `x · wᵀ`, through the quantized copy when one is given.
fn linear(x: &Tensor, w: &Tensor, quantized: Option<&QMatMul>) -> Result<Tensor> {
    Ok(match quantized {
        Some(q) => q.forward(x)?,
        None => x.matmul(&w.t()?)?,
    })
}

/// Causal grouped-query attention of `q` (`[t, n_heads, hd]`, the tokens after the first
/// `past` cached ones) over `keys`/`values` (`[n_kv, past + t, hd]`). Returns `[t, n_heads·hd]`.
///
/// Queries are processed in blocks of [`QUERY_BLOCK`] tokens, each attending only to keys up to
/// its own last position, so memory stays linear in the context and the upper triangle of
/// the score matrix is never computed beyond one block. Key/value heads are never repeated:
/// the query heads sharing one KV head are stacked as extra rows of one matrix product.
fn attention(
    q: &Tensor,
    keys: &Tensor,
    values: &Tensor,
    past: usize,
    scale: f64,
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
        let kv_end = past + s + len;
        let qb = q
            .narrow(1, s, len)?
            .contiguous()?
            .reshape((nkv, len * group, hd))?;
        let kb = keys.narrow(1, 0, kv_end)?;
        let vb = values.narrow(1, 0, kv_end)?;
        let scores = qb.matmul(&kb.t()?)?;
        let scores = if len > 1 {
            let mask = causal_mask(len, kv_end, device)?.to_dtype(scores.dtype())?;
            scores
                .reshape((nkv, len, group, kv_end))?
                .broadcast_add(&mask)?
                .reshape((nkv, len * group, kv_end))?
        } else {
            scores
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?
            .to_dtype(vb.dtype())?;
        let out = probs.matmul(&vb)?; // [n_kv, len·group, hd]
        outputs.push(out.reshape((nkv, len, group, hd))?);
        s += len;
    }
    let out = Tensor::cat(&outputs, 1)?; // [n_kv, t, group, hd]
    Ok(out.transpose(0, 1)?.reshape((t, nh * hd))?)
}

/// `[len, 1, kv_end]` additive mask for the last `len` query positions over `kv_end` keys:
/// query `i` (at key index `kv_end - len + i`) sees keys up to and including its own.
fn causal_mask(len: usize, kv_end: usize, device: &Device) -> Result<Tensor> {
    let first = kv_end - len;
    let mut mask = vec![0f32; len * kv_end];
    for i in 0..len {
        let row = &mut mask[i * kv_end..(i + 1) * kv_end];
        row[first + i + 1..].fill(f32::NEG_INFINITY);
    }
    Ok(Tensor::from_vec(mask, (len, 1, kv_end), device)?)
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
        let mask = causal_mask(3, 5, &Device::Cpu).unwrap();
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
        let got = attention(&q, &k, &v, past, scale).unwrap();
        // Reference: each query head against its KV head, full mask, no blocking.
        let mut heads = Vec::new();
        for h in 0..nh {
            let qh = q.narrow(1, h, 1).unwrap().squeeze(1).unwrap();
            let kh = k.get(h / (nh / nkv)).unwrap();
            let vh = v.get(h / (nh / nkv)).unwrap();
            let scores = (qh.matmul(&kh.t().unwrap()).unwrap() * scale).unwrap();
            let mask = causal_mask(t, past + t, &dev).unwrap().squeeze(1).unwrap();
            let p = candle_nn::ops::softmax_last_dim(&(scores + mask).unwrap()).unwrap();
            heads.push(p.matmul(&vh).unwrap());
        }
        let expected = Tensor::stack(&heads, 1)
            .unwrap()
            .reshape((t, nh * hd))
            .unwrap();
        let diff = crate::test_util::max_abs_diff(&got, &expected);
        assert!(diff < 1e-5, "{diff}");
    }
}
