//! What goes into the pipeline and what comes out.

use std::time::Instant;

use ragcake_engine::{ChatMessage, FinishReason};
use ragcake_retriever::{CacheStatus, ChunkOrder};
use ragcake_scheduler::{Fidelity, LookupSummary, Mode, PrefillReport, Recompute};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// How to answer one question. Every field has a default, so a JSON body may set any
/// subset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AskOptions {
    /// Chunks retrieved into the prompt.
    pub top_k: usize,
    /// Upper bound on generated tokens.
    pub max_tokens: usize,
    /// Decode on past the model's end-of-generation tokens, to `max_tokens` (vLLM's
    /// `ignore_eos`): for load tests and benchmarks that need answers of a known length.
    pub ignore_eos: bool,
    /// 0 = greedy; higher samples more freely.
    pub temperature: f64,
    /// Nucleus sampling threshold.
    pub top_p: f64,
    /// Seed of the sampler (a sampled answer can be reproduced).
    pub seed: u64,
    /// How the prompt's KV cache is filled.
    pub mode: Mode,
    /// Chunk order in the prompt. `cached-last` puts chunks with a stored cache at the back,
    /// where the loader starts, and the others at the front, where the compute worker starts.
    pub order: ChunkOrder,
    /// Load only prefix caches (computed in context, after the same chunks); position-
    /// independent chunk caches, which lack attention across chunks, are not used. The
    /// logits then differ from full computation by the storage dtype's rounding only (f16 by
    /// default); the tests check this, not identity.
    pub exact: bool,
    /// A cached chunk ranks above an uncached one scoring higher by less than this.
    pub prefer_cached_within: f32,
    /// How a loaded position-independent chunk cache is blended into the prompt: which of
    /// its tokens are recomputed in context (`deviation`, `leading` or `query`) and what
    /// share (`ratio`, 0 to 1; 0 uses the caches as loaded). Not used with `exact`.
    pub recompute: Recompute,
    /// A fidelity level instead of `exact` and `recompute`: `fast` (5% recomputed),
    /// `balanced` (the default share, raised to what the loads pay for) or `exact` (exact
    /// prefix caches only).
    pub fidelity: Option<Fidelity>,
    /// Salts the keys of everything before the retrieved chunks (system prompt, history)
    /// and what follows them in the prompt: only requests with the same salt share those
    /// caches, and the breakdown reports only their hits (vLLM's `cache_salt`). With API
    /// keys configured, the key's own salt comes first, so a client cannot take another's.
    pub cache_salt: Option<String>,
}

impl AskOptions {
    /// The recompute settings and whether only exact prefix caches load: the fidelity
    /// level's when one is named, else `recompute` and `exact`.
    pub fn blending(&self) -> (Recompute, bool) {
        match self.fidelity {
            Some(level) => level.settings(),
            None => (self.recompute, self.exact),
        }
    }
}

impl Default for AskOptions {
    fn default() -> Self {
        Self {
            top_k: ragcake_retriever::DEFAULT_TOP_K,
            max_tokens: 128,
            ignore_eos: false,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            mode: Mode::Bidirectional,
            order: ChunkOrder::CachedLast,
            exact: false,
            prefer_cached_within: 0.0,
            recompute: Recompute::default(),
            fidelity: None,
            cache_salt: None,
        }
    }
}

/// A question, with optional conversation history and system prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AskRequest {
    /// The question retrieval runs on and the model answers.
    pub question: String,
    /// Earlier turns of the conversation (user and assistant messages), oldest first.
    #[serde(default)]
    pub history: Vec<ChatMessage>,
    /// Replaces the pipeline's system prompt.
    #[serde(default)]
    pub system: Option<String>,
    /// How to answer.
    #[serde(default)]
    pub options: AskOptions,
}

impl AskRequest {
    /// A question with the default options.
    pub fn new(question: impl Into<String>) -> Self {
        Self {
            question: question.into(),
            history: Vec::new(),
            system: None,
            options: AskOptions::default(),
        }
    }

    /// The same question with `options`.
    pub fn with_options(mut self, options: AskOptions) -> Self {
        self.options = options;
        self
    }
}

/// A retrieved chunk the answer was built on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CitedChunk {
    /// The document.
    pub doc_id: String,
    /// The chunk's number in it.
    pub chunk_no: u32,
    /// Similarity to the question.
    pub score: f32,
    /// The chunk's text.
    pub text: String,
    /// Whether the precompute job stored its position-independent KV cache.
    pub cache: CacheStatus,
}

/// Where an answer's time went, and how its prompt cache was filled.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Breakdown {
    /// From the request to the first token's logits: retrieval, planning and prefill.
    pub ttft_secs: f64,
    /// From the request to the last token.
    pub total_secs: f64,
    /// Embedding the question.
    pub embed_secs: f64,
    /// Searching the vector index.
    pub search_secs: f64,
    /// Planning the prefill: looking up what the store holds for the prompt's chunks
    /// (metadata requests only).
    pub lookup_secs: f64,
    /// Building the prompt's token segments.
    pub prompt_secs: f64,
    /// Prompt tokens (preamble, chunks and question).
    pub prompt_tokens: usize,
    /// Caches the plan found: exact prefix caches, position-independent chunk caches,
    /// failed lookups.
    pub lookups: LookupSummary,
    /// The prefill: mode, compute and load time, chunks computed vs loaded, meeting point,
    /// misses and why.
    pub prefill: PrefillReport,
    /// Generated tokens.
    pub generated_tokens: usize,
    /// Decoding after the first token.
    pub decode_secs: f64,
    /// The KV store or a lookup failed and the answer was computed instead.
    pub degraded: bool,
}

/// An answer with its sources and timing breakdown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Answer {
    /// The generated text.
    pub text: String,
    /// Why generation ended.
    pub finish_reason: FinishReason,
    /// The chunks in the prompt, in prompt order.
    pub sources: Vec<CitedChunk>,
    /// Where the time went.
    pub breakdown: Breakdown,
}

/// What a streaming ask yields, in order: the sources, text pieces, then the answer.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamEvent {
    /// The chunks the answer is built on (before the first token).
    Sources(Vec<CitedChunk>),
    /// A piece of generated text (never a split UTF-8 character).
    Text(String),
    /// The complete answer with its breakdown.
    Done(Box<Answer>),
}

/// A question travelling through the stages.
#[derive(Debug)]
pub struct Ask {
    /// The request.
    pub request: AskRequest,
    /// When it arrived (TTFT is measured from here).
    pub started: Instant,
    /// Where streamed events go, for a streaming ask.
    pub stream: Option<mpsc::UnboundedSender<StreamEvent>>,
}

impl Ask {
    /// A non-streaming ask starting now.
    pub fn new(request: AskRequest) -> Self {
        Self {
            request,
            started: Instant::now(),
            stream: None,
        }
    }
}
