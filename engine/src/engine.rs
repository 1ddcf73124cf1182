//! [`Engine`]: a loaded model with its tokenizer, chat format and fingerprint.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::chat::{ChatMessage, ChatPiece, ChatTemplate};
use crate::correction::{AttentionCalibration, AttentionCorrection};
use crate::error::{EngineError, Result};
use crate::generate::{GenerateParams, Generation, Sampler, generate};
use crate::gguf::{GgufFile, LlmFingerprint};
use crate::kv::{KvCache, KvRange, KvShape};
use crate::models::{Blend, ModelConfig, ReturnLogits, Selection, Transformer, config_from_gguf};
use crate::tokenizer::{Follows, Tokenizer};
use ragcake_scheduler::{BlendChunk, ComputeBackend, Result as SchedulerResult, SchedulerError};

/// Where the engine computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// The CPU (always available).
    #[default]
    Cpu,
    /// A CUDA GPU by ordinal; needs the `cuda` feature.
    Cuda(usize),
}

impl DeviceChoice {
    /// The candle device, or an error when this build cannot use it.
    pub fn device(&self) -> Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            #[cfg(feature = "cuda")]
            Self::Cuda(ordinal) => Ok(Device::new_cuda(*ordinal)?),
            #[cfg(not(feature = "cuda"))]
            Self::Cuda(_) => Err(EngineError::UnsupportedFeature(
                "CUDA device requested but this build has no `cuda` feature".into(),
            )),
        }
    }
}

/// How to load a model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineConfig {
    /// Where to compute.
    pub device: DeviceChoice,
    /// Compute dtype of weights and KV; when unset f32 on the CPU (its matrix kernels are
    /// fastest in f32) and bf16 on a GPU (tensor cores, half the memory traffic).
    pub dtype: Option<DTypeChoice>,
    /// Keep quantized copies of the weights for decode steps (CPU only): the GGUF's own Q4_1
    /// blocks, 8-bit blocks for other types. Decode is bound by memory bandwidth, so this
    /// makes it several times faster; its logits differ from the dense f32 path by the 8-bit
    /// rounding of activations (and of weights not stored in Q4_1). Prefill runs on the dense
    /// weights either way; the query rules' probe, which only ranks the tokens a blend
    /// recomputes, uses the quantized copies when they are kept.
    #[serde(default = "default_true")]
    pub quantized_decode: bool,
}

fn default_true() -> bool {
    true
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            device: DeviceChoice::Cpu,
            dtype: None,
            quantized_decode: true,
        }
    }
}

ragcake_scheduler::named_enum! {
    /// Compute precision.
    pub enum DTypeChoice in "lowercase" {
        /// 32-bit float.
        F32,
        /// 16-bit float.
        F16,
        /// bfloat16.
        Bf16,
    }
}

impl DTypeChoice {
    /// The dtype an engine on `device` computes in unless told: f32 on a CPU, bf16 on a GPU.
    pub fn default_for(device: &Device) -> Self {
        if device.is_cpu() {
            Self::F32
        } else {
            Self::Bf16
        }
    }
}

impl From<DTypeChoice> for DType {
    fn from(d: DTypeChoice) -> Self {
        match d {
            DTypeChoice::F32 => DType::F32,
            DTypeChoice::F16 => DType::F16,
            DTypeChoice::Bf16 => DType::BF16,
        }
    }
}

/// A loaded model ready to prefill and generate.
#[derive(Debug)]
pub struct Engine {
    model: Transformer,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    fingerprint: LlmFingerprint,
    path: PathBuf,
    /// Applied by the tokens after loaded chunk caches that ask for it
    /// ([`Recompute::correct_attention`](ragcake_scheduler::Recompute)); the identity
    /// until a calibration is loaded.
    attention_correction: AttentionCorrection,
}

/// The result of [`Engine::complete`]: the generation and where the time went.
#[derive(Debug, Clone, Serialize)]
pub struct Completion {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// What was generated.
    pub generation: Generation,
    /// Time to the first token: prefill of the whole prompt plus the first sample.
    pub ttft: Duration,
}

impl Engine {
    /// Loads a GGUF model of any supported family ([`crate::models::FAMILIES`]).
    pub fn load(path: impl AsRef<Path>, config: &EngineConfig) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let device = config.device.device()?;
        let dtype = DType::from(config.dtype.unwrap_or(DTypeChoice::default_for(&device)));
        let mut gguf = GgufFile::open(&path)?;
        // Architecture and tokenizer first: an unsupported file fails before weights load.
        let model_config = config_from_gguf(&gguf)?;
        let tokenizer = Tokenizer::from_gguf(&gguf)?;
        let token_text = |id: Option<u32>| {
            id.and_then(|id| tokenizer.token_bytes(id))
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default()
        };
        let template = ChatTemplate::new(
            gguf.opt_string("tokenizer.chat_template"),
            &token_text(tokenizer.bos()),
            &token_text(tokenizer.eos()),
        )?;
        let fingerprint = gguf.fingerprint()?;
        let model = Transformer::load(
            model_config,
            &mut gguf,
            &device,
            dtype,
            config.quantized_decode,
        )?;
        if tokenizer.vocab_size() > model.config().vocab_size {
            return Err(EngineError::Tokenizer(format!(
                "{} tokens but the model embeds only {}",
                tokenizer.vocab_size(),
                model.config().vocab_size
            )));
        }
        tracing::info!(
            path = %path.display(),
            fingerprint = %fingerprint.short(),
            family = %model.config().family,
            layers = model.config().n_layers,
            "model loaded"
        );
        Ok(Self {
            model,
            tokenizer,
            template,
            fingerprint,
            path,
            attention_correction: AttentionCorrection::IDENTITY,
        })
    }

    /// Loads this model's attention calibration from `dir` (written by `ragcake
    /// calibrate`, named by the fingerprint) when there is one, else the one bundled for it
    /// ([`crate::correction::BUNDLED`]) when one ships; returns it. A file that is
    /// malformed or names another model is an error, never applied.
    pub fn load_calibration(&mut self, dir: &Path) -> Result<Option<AttentionCalibration>> {
        let (calibration, source) = match AttentionCalibration::load(dir, self.fingerprint)? {
            Some(c) => (Some(c), "calibration directory"),
            None => (AttentionCalibration::bundled(self.fingerprint)?, "bundled"),
        };
        if let Some(c) = &calibration {
            self.attention_correction = c.correction;
            tracing::info!(
                temperature = c.correction.temperature,
                scale = c.correction.scale,
                source,
                "attention correction loaded"
            );
        }
        Ok(calibration)
    }

    /// Sets the attention correction the tokens after loaded chunk caches apply.
    pub fn set_attention_correction(&mut self, correction: AttentionCorrection) -> Result<()> {
        correction.validate()?;
        self.attention_correction = correction;
        Ok(())
    }

    /// The attention correction the tokens after loaded chunk caches apply.
    pub fn attention_correction(&self) -> AttentionCorrection {
        self.attention_correction
    }

    /// [`ComputeBackend::compute_tail`] with an explicit correction of the tail's attention
    /// to the chunks that ask for it (a calibration tries several on one loaded cache).
    pub fn compute_tail_corrected(
        &self,
        cache: &mut KvCache,
        tail: &[u32],
        blends: &[BlendChunk],
        correction: AttentionCorrection,
    ) -> Result<(Tensor, usize)> {
        let spans: Vec<std::ops::Range<usize>> = blends
            .iter()
            .filter(|b| b.recompute.correct_attention)
            .map(|b| b.start..b.start + b.tokens.len())
            .collect();
        cache.correct_attention(&spans, correction)?;
        let blends: Vec<Blend<'_>> = blends
            .iter()
            .filter_map(|b| {
                let selection = Selection::for_recompute(&b.recompute, b.tokens.len())?;
                Some(Blend {
                    tokens: &b.tokens,
                    offset: b.start,
                    selection,
                })
            })
            .collect();
        if blends.is_empty() {
            let logits = self.append(cache, tail, PREFILL_BATCH, true)?;
            return Ok((logits.ok_or(EngineError::EmptyInput)?, 0));
        }
        let (logits, recomputed) =
            self.model
                .forward_blended(tail, cache, &blends, ReturnLogits::Last)?;
        Ok((logits.ok_or(EngineError::EmptyInput)?, recomputed))
    }

    /// The model: forward passes at explicit positions, blending, decode steps.
    pub fn model(&self) -> &Transformer {
        &self.model
    }

    /// The model's hyper-parameters and block shape.
    pub fn config(&self) -> &ModelConfig {
        self.model.config()
    }

    /// The shape of this model's KV cache.
    pub fn kv_shape(&self) -> KvShape {
        self.model.config().kv_shape()
    }

    /// The model's context window in positions.
    pub fn context_length(&self) -> usize {
        self.model.config().context_length
    }

    /// The device the model computes on.
    pub fn device(&self) -> &Device {
        self.model.device()
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The chat format.
    pub fn template(&self) -> &ChatTemplate {
        &self.template
    }

    /// The model's fingerprint, which KV caches are tagged with.
    pub fn fingerprint(&self) -> LlmFingerprint {
        self.fingerprint
    }

    /// The GGUF file the model came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// An empty KV cache starting at position 0.
    pub fn new_cache(&self) -> KvCache {
        self.model.new_cache(0)
    }

    /// Tokenizes a conversation in the model's chat format, ready for the assistant's reply.
    /// The template's text is tokenized with its special tokens, the messages' contents as
    /// plain text (a message cannot forge a turn).
    pub fn chat_tokens(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        let pieces = self.template.pieces(messages, true)?;
        self.encode_pieces(&pieces, Follows::Start)
    }

    /// The tokens of rendered chat pieces standing where `follows` says in a prompt: markup
    /// with special tokens recognised, contents without; at the prompt's start, BOS first
    /// when the tokenizer adds one and the template did not write it.
    pub fn encode_pieces(&self, pieces: &[ChatPiece], follows: Follows) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        for piece in pieces {
            let (text, special) = match piece {
                ChatPiece::Markup(text) => (text, true),
                ChatPiece::Content { text, .. } => (text, false),
            };
            let here = self.tokenizer.after(&ids, follows);
            ids.extend(self.tokenizer.encode_after(here, text, special)?);
        }
        if follows == Follows::Start
            && self.tokenizer.add_bos()
            && let Some(bos) = self.tokenizer.bos()
            && ids.first() != Some(&bos)
        {
            ids.insert(0, bos);
        }
        Ok(ids)
    }

    /// Appends `tokens` to `cache` in pieces of at most `chunk_size` tokens and returns the
    /// logits of the last one. Equal, within float tolerance, to one pass over all of them.
    pub fn prefill(
        &self,
        cache: &mut KvCache,
        tokens: &[u32],
        chunk_size: usize,
    ) -> Result<Tensor> {
        self.append(cache, tokens, chunk_size, true)?
            .ok_or(EngineError::EmptyInput)
    }

    /// Appends `tokens` to `cache` in pieces of at most `chunk_size` tokens; returns the last
    /// token's logits when `last_logits` is set.
    pub fn append(
        &self,
        cache: &mut KvCache,
        tokens: &[u32],
        chunk_size: usize,
        last_logits: bool,
    ) -> Result<Option<Tensor>> {
        self.check_room(cache.next_position(), tokens)?;
        let chunk_size = chunk_size.max(1);
        let mut logits = None;
        let chunks: Vec<&[u32]> = tokens.chunks(chunk_size).collect();
        for (i, chunk) in chunks.iter().enumerate() {
            let want = if last_logits && i + 1 == chunks.len() {
                ReturnLogits::Last
            } else {
                ReturnLogits::None
            };
            logits = self.model.forward(chunk, cache, want)?;
        }
        Ok(logits)
    }

    /// Checks that `tokens` is not empty and fits from position `start` on. Checked up
    /// front so a too-long prompt leaves the cache untouched.
    fn check_room(&self, start: usize, tokens: &[u32]) -> Result<()> {
        if tokens.is_empty() {
            return Err(EngineError::EmptyInput);
        }
        let needed = start + tokens.len();
        let max = self.model.config().context_length;
        if needed > max {
            return Err(EngineError::ContextOverflow { needed, max });
        }
        Ok(())
    }

    /// Appends a stored KV range to `cache`, moving its keys to the cache's next position.
    pub fn import(&self, cache: &mut KvCache, range: &KvRange) -> Result<()> {
        cache.import(range, self.model.ropes())
    }

    /// Computes the bottom `layers` layers of `tokens` only, in pieces of at most
    /// `chunk_size`, after the tokens those layers already hold; see [`Transformer::forward_bottom`].
    pub fn append_bottom(
        &self,
        cache: &mut KvCache,
        tokens: &[u32],
        chunk_size: usize,
        layers: usize,
    ) -> Result<()> {
        self.check_room(cache.next_position() + cache.partial_len(), tokens)?;
        for piece in tokens.chunks(chunk_size.max(1)) {
            self.model.forward_bottom(piece, cache, layers)?;
        }
        Ok(())
    }

    /// Fills the top layers (`first_layer..`) of the oldest tokens [`Engine::append_bottom`]
    /// computed with a loaded range of those layers; see [`KvCache::fill_top`].
    pub fn fill_top(&self, cache: &mut KvCache, range: &KvRange, first_layer: usize) -> Result<()> {
        cache.fill_top(range, first_layer, self.model.ropes())
    }

    /// Generates after a prefill; see [`generate`].
    pub fn generate(
        &self,
        cache: &mut KvCache,
        first_logits: &Tensor,
        params: &GenerateParams,
        on_text: impl FnMut(&str) -> ControlFlow<()>,
    ) -> Result<Generation> {
        generate(
            &self.model,
            &self.tokenizer,
            cache,
            first_logits,
            params,
            on_text,
        )
    }

    /// Prefills `prompt` (token ids) into a fresh cache and generates, measuring TTFT.
    pub fn complete(
        &self,
        prompt: &[u32],
        params: &GenerateParams,
        on_text: impl FnMut(&str) -> ControlFlow<()>,
    ) -> Result<Completion> {
        let started = Instant::now();
        let mut cache = self.new_cache();
        let logits = self.prefill(&mut cache, prompt, PREFILL_BATCH)?;
        let ttft = started.elapsed();
        let generation = self.generate(&mut cache, &logits, params, on_text)?;
        Ok(Completion {
            prompt_tokens: prompt.len(),
            generation,
            ttft,
        })
    }
}

/// Tokens per forward pass when the scheduler computes a chunk.
pub const PREFILL_BATCH: usize = 512;

/// The engine as the scheduler's compute back end: its errors travel as
/// [`SchedulerError::Compute`], from which [`SchedulerError::compute_error`] recovers the
/// [`EngineError`].
impl ComputeBackend for Engine {
    type Cache = KvCache;
    type Kv = KvRange;
    type Logits = Tensor;

    fn new_cache(&self) -> KvCache {
        Engine::new_cache(self)
    }

    fn max_tokens(&self) -> usize {
        self.model.config().context_length
    }

    fn compute(
        &self,
        cache: &mut KvCache,
        tokens: &[u32],
        logits: bool,
    ) -> SchedulerResult<Option<Tensor>> {
        self.append(cache, tokens, PREFILL_BATCH, logits)
            .map_err(SchedulerError::compute)
    }

    fn import(&self, cache: &mut KvCache, kv: &KvRange) -> SchedulerResult<()> {
        Engine::import(self, cache, kv).map_err(SchedulerError::compute)
    }

    fn export(&self, cache: &KvCache, range: std::ops::Range<usize>) -> SchedulerResult<KvRange> {
        cache.export(range).map_err(SchedulerError::compute)
    }

    fn kv_bytes(&self, kv: &KvRange) -> usize {
        kv.bytes()
    }

    fn compute_tail(
        &self,
        cache: &mut KvCache,
        tail: &[u32],
        blends: &[BlendChunk],
    ) -> SchedulerResult<(Tensor, usize)> {
        self.compute_tail_corrected(cache, tail, blends, self.attention_correction)
            .map_err(SchedulerError::compute)
    }

    fn layers(&self) -> usize {
        self.model.config().kv_shape().n_layers
    }

    fn compute_bottom(
        &self,
        cache: &mut KvCache,
        tokens: &[u32],
        layers: usize,
    ) -> SchedulerResult<()> {
        self.append_bottom(cache, tokens, PREFILL_BATCH, layers)
            .map_err(SchedulerError::compute)
    }

    fn fill_top(
        &self,
        cache: &mut KvCache,
        kv: &KvRange,
        first_layer: usize,
    ) -> SchedulerResult<()> {
        Engine::fill_top(self, cache, kv, first_layer).map_err(SchedulerError::compute)
    }

    fn decode(&self, caches: &mut [&mut KvCache], tokens: &[u32]) -> SchedulerResult<Vec<Tensor>> {
        let logits = self
            .model
            .decode_batch(tokens, caches)
            .map_err(SchedulerError::compute)?;
        (0..tokens.len())
            .map(|i| logits.get(i).map_err(SchedulerError::compute))
            .collect()
    }

    fn sample(&self, sampler: &mut Sampler, logits: &Tensor) -> SchedulerResult<u32> {
        crate::generate::sample(sampler, logits).map_err(SchedulerError::compute)
    }

    fn ends_generation(&self, token: u32) -> bool {
        self.tokenizer.is_end_of_generation(token)
    }

    fn next_position(&self, cache: &KvCache) -> usize {
        cache.next_position()
    }
}
