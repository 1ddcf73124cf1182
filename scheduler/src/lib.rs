//! Bidirectional prefill: fill a prompt's KV cache by computing chunks from the front while
//! loading stored chunk caches from the back, meeting where they cross at run time; then
//! compute the question tail for the first token. One compute worker and one I/O pool are
//! shared by every request in flight, and a policy decides who gets each.
//!
//! - [`dispatch`]: the decisions, without threads or clocks (tested deterministically).
//! - [`plan`]: a prompt's chunks → a [`PrefillRequest`]: which stored cache each chunk
//!   loads (the load back end only says what is stored) and where it is written back.
//! - [`sim`]: a discrete-event simulator of the same decisions with given costs.
//! - [`Scheduler`]: the real thing, generic over a [`ComputeBackend`] (the engine) and a
//!   [`LoadBackend`] (a KV store).
//! - [`sampling`]: how a decoding sequence picks its tokens and when it ends.
//!
//! The crate knows no model and no store: the engine implements [`ComputeBackend`], the KV
//! store [`LoadBackend`], so the decisions are tested here without either.

pub mod bounds;
pub mod decode;
pub mod dispatch;
pub mod error;
pub mod plan;
mod runtime;
pub mod sampling;
pub mod sim;
#[cfg(test)]
mod tests;
mod write_back;

use std::fmt;
use std::future::Future;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use decode::{RequestEvent, RequestStream};
pub use error::{BackendError, Result, SchedulerError, StoreError};
pub use plan::{
    ChunkCacheHint, LookupSummary, PlanOptions, PromptChunk, load_paid_share, plan,
    spread_recompute,
};
pub use runtime::{Scheduler, SchedulerStats};
pub use sampling::{FinishReason, GenerateParams, Sampler, Sampling};

named_enum! {
    /// How a request fills its cache.
    #[derive(Default)]
    pub enum Mode in "kebab-case" {
        /// Compute every chunk; never read the store.
        ComputeOnly,
        /// Load every stored chunk; compute only what is not stored, in order.
        LoadOnly,
        /// Compute from the front while loading from the back (the default).
        #[default]
        Bidirectional,
    }
}

impl Mode {
    /// Every mode, in display order.
    pub const ALL: [Mode; 3] = [Mode::ComputeOnly, Mode::LoadOnly, Mode::Bidirectional];
}

named_enum! {
    /// How the shared compute worker and I/O pool are given out across requests.
    #[derive(Default)]
    pub enum Policy in "kebab-case" {
        /// One request at a time, in arrival order: the oldest request has the compute worker
        /// and the whole I/O pool to itself until its first token, as if it were alone (each
        /// request bidirectional, no coordination across requests). A baseline.
        PerRequest,
        /// First come, first served: the oldest request with runnable work gets the slot, so
        /// the I/O pool loads ahead for later requests while the compute worker is busy.
        Fcfs,
        /// Compute goes first to work only it can do (uncached chunks, tails), stored chunks
        /// get what is left; within each class, and for I/O, the highest response ratio
        /// ((waiting + remaining) / remaining): the request closest to done first, aged by its
        /// wait so that none starves.
        #[default]
        Adaptive,
    }
}

named_enum! {
    /// Which tokens of a loaded chunk cache are recomputed in context ("blending").
    pub enum RecomputeRule in "kebab-case" {
        /// The tokens whose keys and values deviate most from the loaded ones, found at the
        /// first layers and narrowed layer by layer (CacheBlend).
        Deviation,
        /// The first tokens of each chunk (EPIC).
        Leading,
        /// The tokens the question attends to most over the loaded caches, the budget pooled
        /// across the request's chunks (query-aware, ProphetKV).
        Query,
        /// The same, the question probed over the first third of the layers only (a third of
        /// the probe's cost).
        QueryEarly,
    }
}

impl RecomputeRule {
    /// Every rule, in display order.
    pub const ALL: [RecomputeRule; 4] = [
        RecomputeRule::Deviation,
        RecomputeRule::Leading,
        RecomputeRule::Query,
        RecomputeRule::QueryEarly,
    ];

    /// The question's probe pass this rule runs, as a share of one pass of the question
    /// through every layer of a model of `layers` (0: no probe).
    pub fn probe_share(&self, layers: usize) -> f64 {
        match self {
            Self::Query => 1.0,
            Self::QueryEarly => early_probe_layers(layers) as f64 / layers.max(1) as f64,
            Self::Deviation | Self::Leading => 0.0,
        }
    }
}

/// Layers the early query probe ([`RecomputeRule::QueryEarly`]) runs in a model of
/// `layers`: the first third, so it costs a third of the probe and ranks tokens by what the
/// question reads there.
pub fn early_probe_layers(layers: usize) -> usize {
    layers.div_ceil(3).max(1)
}

/// How a loaded position-independent chunk cache is blended into its prompt: which rule
/// picks the tokens recomputed in context, and what share of the chunk's tokens. A chunk
/// cache never saw the chunks before it; its recomputed tokens attend to them and carry
/// that into the rest of the prompt. Exact prefix caches are never recomputed.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Recompute {
    /// Which tokens.
    pub rule: RecomputeRule,
    /// Share of each loaded chunk's tokens, 0 to 1 (0: the chunk cache is used as loaded).
    pub ratio: f64,
    /// Whether the tokens after the chunks apply the engine's calibrated attention
    /// correction to the chunk's keys not recomputed (the engine's `correction`; ordinary
    /// attention when the model has no calibration).
    pub correct_attention: bool,
    /// `ratio` is the least share: the scheduler raises it, per request, to the share whose
    /// recomputation takes as long as the request's loads of those chunk caches take by its
    /// measured rates (CacheBlend's loading controller; [`load_paid_share`]). Off unless
    /// given, so a request naming a share gets that share.
    #[serde(default)]
    pub load_paid: bool,
}

impl Default for Recompute {
    /// The query-aware rule at 15% of the chunk-cache tokens: on the demo questions the
    /// highest top-1 agreement and lowest KL of the three rules at 15% or less, in both
    /// chunk orders (docs/benchmarks.md gives every rule and ratio).
    fn default() -> Self {
        Self {
            rule: RecomputeRule::Query,
            ratio: 0.15,
            correct_attention: true,
            load_paid: true,
        }
    }
}

impl Recompute {
    /// Chunk caches used as loaded, with ordinary attention.
    pub const NONE: Recompute = Recompute {
        rule: RecomputeRule::Deviation,
        ratio: 0.0,
        correct_attention: false,
        load_paid: false,
    };

    /// Checks the ratio.
    pub fn validate(&self) -> Result<()> {
        if self.ratio.is_finite() && (0.0..=1.0).contains(&self.ratio) {
            Ok(())
        } else {
            Err(SchedulerError::InvalidSetting(format!(
                "recompute ratio {} is not between 0 and 1",
                self.ratio
            )))
        }
    }

    /// Tokens recomputed of a chunk of `tokens` (at least one when the ratio is not 0).
    pub fn tokens(&self, tokens: usize) -> usize {
        if self.ratio <= 0.0 || tokens == 0 {
            return 0;
        }
        ((self.ratio * tokens as f64).round() as usize).clamp(1, tokens)
    }

    /// Expected cost of blending one chunk, as a share of computing it whole, for a model of
    /// `layers` layers: the recomputed share through every layer, plus for
    /// [`RecomputeRule::Deviation`] every token through the first layer and the narrowed
    /// set's projections at the next two.
    pub fn compute_share(&self, layers: usize) -> f64 {
        if self.ratio <= 0.0 {
            return 0.0;
        }
        let layers = layers.max(1) as f64;
        match self.rule {
            RecomputeRule::Leading | RecomputeRule::Query | RecomputeRule::QueryEarly => self.ratio,
            RecomputeRule::Deviation => (self.ratio + (1.0 + 2.0 * self.ratio) / layers).min(1.0),
        }
    }
}

named_enum! {
    /// How close to full computation a request's answer is kept, as one word: the recompute
    /// settings and the caches it may load.
    pub enum Fidelity in "kebab-case" {
        /// The least recomputation: [`Fidelity::FAST_SHARE`] of the loaded chunk caches'
        /// tokens, whatever the loads cost.
        Fast,
        /// The default ([`Recompute::default`]): its share, raised to what the loads pay for.
        Balanced,
        /// Exact prefix caches only: the logits differ from full computation by the storage
        /// dtype's rounding.
        Exact,
    }
}

impl Fidelity {
    /// Every level, in display order.
    pub const ALL: [Fidelity; 3] = [Fidelity::Fast, Fidelity::Balanced, Fidelity::Exact];

    /// The share `fast` recomputes.
    pub const FAST_SHARE: f64 = 0.05;

    /// How a request at this level blends chunk caches, and whether it loads exact prefix
    /// caches only.
    pub fn settings(self) -> (Recompute, bool) {
        match self {
            Self::Fast => (
                Recompute {
                    ratio: Self::FAST_SHARE,
                    load_paid: false,
                    ..Recompute::default()
                },
                false,
            ),
            Self::Balanced => (Recompute::default(), false),
            Self::Exact => (Recompute::NONE, true),
        }
    }
}

/// Scheduler settings. The cost priors are only a starting point: both are re-estimated
/// from every finished step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SchedulerConfig {
    /// Who gets the compute worker and the I/O pool.
    pub policy: Policy,
    /// Loads in flight at once, across all requests.
    pub io_concurrency: usize,
    /// A load running longer than this fails (and its chunk is computed).
    pub load_timeout_secs: f64,
    /// Planning's metadata lookups unanswered this long after planning began are given
    /// up, their chunks computed (see [`PlanOptions::lookup_timeout_secs`]).
    pub lookup_timeout_secs: f64,
    /// A load abandoned after this many times its expected duration counts as stalled
    /// (the request is flagged degraded).
    pub stall_factor: f64,
    /// Prior compute cost per token…
    pub compute_secs_per_token: f64,
    /// …plus this much per token per position before it (attention).
    pub compute_secs_per_token_per_position: f64,
    /// Prior duration of one load per token.
    pub load_secs_per_token: f64,
    /// Write chunks computed in context back to the store as exact prefix caches.
    pub write_back: bool,
    /// Most sequences advanced by one decode step; the others wait their turn (first come,
    /// first served).
    pub max_decoding: usize,
    /// While answers are decoding, a chunk is computed in pieces of at most this many
    /// tokens with a decode step between them: the bound on a prefill step's share of the
    /// time between two output tokens.
    pub prefill_step_tokens: usize,
    /// The time per output token aimed at while prefill runs beside decode: a piece is cut
    /// so that, by the cost model, it and the last decode step together take about this
    /// long (at least [`MIN_PREFILL_PIECE`] tokens, at most `prefill_step_tokens`).
    /// 0 cuts pieces by `prefill_step_tokens` alone.
    pub tpot_target_secs: f64,
    /// Split the chunk where compute and loads meet at a layer boundary (its bottom layers
    /// computed while a ranged read loads the rest) where the cost model predicts a gain;
    /// off, every chunk goes whole to one side.
    pub layer_split: bool,
    /// Most bytes of KV waiting to be written back; the chunks of a request that would go
    /// past it are dropped (and counted), so a slow store costs write-backs, not memory.
    pub write_back_queue_bytes: usize,
    /// A write-back (its existence check and its put) still running after this long is
    /// given up and counted as failed.
    pub write_back_timeout_secs: f64,
}

/// Default of [`SchedulerConfig::tpot_target_secs`].
const TPOT_TARGET_DEFAULT: f64 = 0.25;

/// The smallest prefill piece beside decode: below it the per-pass overhead outweighs what
/// a shorter wait between output tokens gains.
pub const MIN_PREFILL_PIECE: usize = 32;

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            policy: Policy::Adaptive,
            io_concurrency: 4,
            load_timeout_secs: 10.0,
            lookup_timeout_secs: plan::DEFAULT_LOOKUP_TIMEOUT_SECS,
            stall_factor: 4.0,
            // SmolLM2-135M on two CPU cores: ~350 tok/s near position 0, ~210 at 4k.
            compute_secs_per_token: 2.1e-3,
            compute_secs_per_token_per_position: 1.3e-6,
            // Pessimistic (23 KB per token at ~2 MB/s) until the first load is measured:
            // the compute worker starts from the front, as if loading were slow, and the
            // first finished load replaces this guess.
            load_secs_per_token: 1e-2,
            write_back: true,
            max_decoding: 16,
            prefill_step_tokens: 128,
            tpot_target_secs: TPOT_TARGET_DEFAULT,
            layer_split: true,
            // About 11k tokens of SmolLM2-135M's f32 KV.
            write_back_queue_bytes: 256 << 20,
            write_back_timeout_secs: 30.0,
        }
    }
}

/// Why a stored chunk was not used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "detail")]
pub enum MissReason {
    /// No object under the key.
    Absent,
    /// The object failed verification (corrupt, foreign model, wrong tokens…).
    Rejected(String),
    /// The store returned an error or timed out; the request loads nothing more.
    StoreFailed(String),
    /// The load took far longer than expected and the chunk was computed instead.
    Stalled,
}

impl MissReason {
    /// Whether this miss means the store misbehaved (the request is flagged degraded).
    pub fn degrades(&self) -> bool {
        matches!(self, Self::StoreFailed(_) | Self::Stalled)
    }
}

impl fmt::Display for MissReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Absent => f.write_str("absent"),
            Self::Rejected(why) => write!(f, "rejected: {why}"),
            Self::StoreFailed(why) => write!(f, "store failed: {why}"),
            Self::Stalled => f.write_str("stalled"),
        }
    }
}

/// A stored chunk that was not used, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Miss {
    /// Index of the chunk in the request.
    pub chunk: usize,
    /// Why.
    pub reason: MissReason,
}

/// Where a request's prefill time went.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PrefillReport {
    /// The mode it ran in.
    pub mode: Mode,
    /// Time from admission to the first token's logits, seconds.
    pub ttft_secs: f64,
    /// Compute worker time spent on this request's chunks and tail, seconds.
    pub compute_secs: f64,
    /// Compute worker time spent importing loaded caches, seconds.
    pub import_secs: f64,
    /// Sum of the durations of the loads whose data was used, seconds (loads overlap).
    pub load_secs: f64,
    /// Chunks in the context.
    pub chunks: usize,
    /// Chunks computed.
    pub chunks_computed: usize,
    /// Chunks loaded from the store.
    pub chunks_loaded: usize,
    /// Tokens computed, the tail included.
    pub tokens_computed: usize,
    /// Tokens loaded.
    pub tokens_loaded: usize,
    /// Bytes read from the store for loads that were used.
    pub bytes_loaded: u64,
    /// The first chunk the compute front found loaded or in flight (where the two sides
    /// met); the chunk count when everything was computed; none in compute-only mode.
    pub meeting_point: Option<usize>,
    /// Loads started.
    pub loads_issued: usize,
    /// Loads the compute worker overtook because computing was faster than waiting; they
    /// are stopped and their I/O slots reused.
    pub loads_abandoned: usize,
    /// Stored chunks not used, and why.
    pub misses: Vec<Miss>,
    /// The store failed or stalled: the request succeeded by computing instead.
    pub degraded: bool,
    /// Indices of the chunks computed (candidates for write-back).
    pub computed_chunks: Vec<usize>,
    /// Tokens of loaded chunk caches recomputed in context (blending; see [`Recompute`]),
    /// in the pass that computes the tail.
    #[serde(default)]
    pub tokens_recomputed: usize,
    /// Leading chunks filled in context — computed, or loaded from prefix caches — with no
    /// position-independent chunk cache before them. Their KV is what computing the whole
    /// prompt gives (up to the storage dtype's rounding of loaded prefix caches); the chunks
    /// after them attend to an approximation. Only these are written back as prefix caches.
    #[serde(default)]
    pub in_context_chunks: usize,
    /// Stored chunks filled split at a layer boundary (their bottom layers computed, their
    /// top layers loaded; see [`SchedulerConfig::layer_split`]). They count as loaded.
    #[serde(default)]
    pub chunks_split: usize,
    /// The first loaded layer of the last chunk split at a layer boundary (see
    /// [`layer_split`] for a whole request split at one layer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split_layer: Option<usize>,
    /// What each chunk cost in this run, in prompt order: the measurements a lower bound on
    /// the same work is built from (see [`bounds`]). Recorded by the shared scheduler, empty
    /// elsewhere; kept in process (not serialized), as it grows with the prompt.
    #[serde(skip)]
    pub chunk_timings: Vec<ChunkTiming>,
    /// Seconds of the pass that computed the question tail (blending included), in process
    /// only like `chunk_timings`.
    #[serde(skip)]
    pub tail_secs: f64,
}

/// One chunk's costs as one run saw them; `None` where the run did not do that work.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ChunkTiming {
    /// Seconds computing it in full at its position.
    pub computed_secs: Option<f64>,
    /// When the whole read of its stored cache started and ended, seconds after the
    /// request arrived (ranged reads of a layer split are not recorded).
    pub read_span: Option<(f64, f64)>,
    /// Seconds importing its loaded cache into the prompt's cache.
    pub imported_secs: Option<f64>,
}

/// The compute side: a model that appends tokens to a cache, and imports/exports ranges.
/// Called from the scheduler's one compute thread. A back end reports its own failures as
/// [`SchedulerError::Compute`] ([`SchedulerError::compute`]), so a caller can still recover
/// the model's error ([`SchedulerError::compute_error`]).
pub trait ComputeBackend: Send + Sync + 'static {
    /// A sequence's KV cache.
    type Cache: Send + 'static;
    /// A range of KV, as stored and loaded.
    type Kv: Send + 'static;
    /// The logits of the last token.
    type Logits: Send + 'static;

    /// An empty cache at position 0.
    fn new_cache(&self) -> Self::Cache;
    /// The most tokens one sequence may hold.
    fn max_tokens(&self) -> usize;
    /// Appends `tokens` to `cache`; returns the last token's logits when `logits` is set.
    fn compute(
        &self,
        cache: &mut Self::Cache,
        tokens: &[u32],
        logits: bool,
    ) -> Result<Option<Self::Logits>>;
    /// Appends a loaded range at the cache's next position.
    fn import(&self, cache: &mut Self::Cache, kv: &Self::Kv) -> Result<()>;
    /// Copies out the tokens `range` (cache indices).
    fn export(&self, cache: &Self::Cache, range: Range<usize>) -> Result<Self::Kv>;
    /// Bytes a range holds in memory (what it costs in the write-back queue).
    fn kv_bytes(&self, kv: &Self::Kv) -> usize;
    /// Computes the question `tail` after the whole context, blending in the loaded chunk
    /// caches `blends` in the same pass (their selected tokens recomputed in context, so
    /// they attend to the chunks before them); returns the last token's logits and how many
    /// tokens were recomputed.
    fn compute_tail(
        &self,
        cache: &mut Self::Cache,
        tail: &[u32],
        blends: &[BlendChunk],
    ) -> Result<(Self::Logits, usize)>;
    /// Transformer layers (a layer split loads the layers from its split point on).
    fn layers(&self) -> usize;
    /// Computes the bottom `layers` layers of `tokens` only, after the tokens those layers
    /// already hold; their top layers are filled later by [`ComputeBackend::fill_top`], or
    /// by computing the same tokens in full.
    fn compute_bottom(&self, cache: &mut Self::Cache, tokens: &[u32], layers: usize) -> Result<()>;
    /// Fills the top layers (`first_layer..`) of the oldest bottom-only tokens with a
    /// loaded range of those layers.
    fn fill_top(&self, cache: &mut Self::Cache, kv: &Self::Kv, first_layer: usize) -> Result<()>;
    /// One decode step of several sequences in one pass: appends `tokens[i]` to `caches[i]`
    /// and returns each sequence's next-token logits, in order. On an error no cache has
    /// grown.
    fn decode(&self, caches: &mut [&mut Self::Cache], tokens: &[u32]) -> Result<Vec<Self::Logits>>;
    /// Draws a token from `logits`.
    fn sample(&self, sampler: &mut Sampler, logits: &Self::Logits) -> Result<u32>;
    /// Whether `token` is one of the model's end-of-generation tokens.
    fn ends_generation(&self, token: u32) -> bool;
    /// The position the next token appended to `cache` takes.
    fn next_position(&self, cache: &Self::Cache) -> usize;
}

/// How a load ended. The dispatcher sees it without the data (`LoadOutcome<()>`).
#[derive(Debug, Clone, PartialEq)]
pub enum LoadOutcome<Kv = ()> {
    /// A verified cache, and the bytes read.
    Loaded {
        /// The cache.
        kv: Kv,
        /// Bytes read from the store.
        bytes: u64,
    },
    /// Nothing usable under the key.
    Missing(MissReason),
    /// The store failed.
    Failed(StoreError),
}

impl<Kv> LoadOutcome<Kv> {
    /// The outcome without its data, and the data.
    pub fn take_kv(self) -> (LoadOutcome, Option<Kv>) {
        match self {
            Self::Loaded { kv, bytes } => (LoadOutcome::Loaded { kv: (), bytes }, Some(kv)),
            Self::Missing(reason) => (LoadOutcome::Missing(reason), None),
            Self::Failed(error) => (LoadOutcome::Failed(error), None),
        }
    }
}

named_enum! {
    /// What a stored cache holds.
    #[derive(PartialOrd, Ord)]
    pub enum CacheKind in "lowercase" {
        /// KV of a chunk computed in context, after the chunks before it: exact, valid only
        /// after the same chain of chunks.
        Prefix,
        /// KV of a chunk computed on its own: position-independent (re-rotated to where it is
        /// placed), approximate (no attention to the chunks before it).
        Chunk,
    }
}

/// The load side: where caches of chunks would be stored, whether they are, and the
/// stored caches themselves, fetched concurrently from tokio tasks. It stores and reports;
/// which cache a prompt uses is decided by the scheduler's planning ([`plan::plan`]).
pub trait LoadBackend: Send + Sync + 'static {
    /// Where a chunk's cache is stored.
    type Key: Clone + Send + Sync + 'static;
    /// A loaded cache.
    type Kv: Send + 'static;

    /// The key of the cache of `tokens` computed in context after the chunks whose chain
    /// ends at `parent` (`None`: at the start of the prompt).
    fn prefix_key(&self, parent: Option<&Self::Key>, tokens: &[u32]) -> Self::Key;

    /// The prefix keys of `chunks` in prompt order, each chained to the one before.
    fn prefix_chain<'a>(&self, chunks: impl IntoIterator<Item = &'a [u32]>) -> Vec<Self::Key> {
        self.salted_prefix_chain(None, chunks)
    }

    /// The root that the prefix chains of a cache salt hang from (as vLLM's `cache_salt`):
    /// prefix caches computed under different salts never share a key, so one tenant
    /// cannot tell from its hits what another has sent.
    fn salt_key(&self, salt: &str) -> Self::Key;

    /// [`LoadBackend::prefix_chain`] under `salt`, if any: the first chunk's key chained to
    /// the salt's root, the others to it.
    fn salted_prefix_chain<'a>(
        &self,
        salt: Option<&str>,
        chunks: impl IntoIterator<Item = &'a [u32]>,
    ) -> Vec<Self::Key> {
        let root = salt.map(|s| self.salt_key(s));
        let mut keys: Vec<Self::Key> = Vec::new();
        for chunk in chunks {
            let key = self.prefix_key(keys.last().or(root.as_ref()), chunk);
            keys.push(key);
        }
        keys
    }

    /// The key of the position-independent cache of `tokens` computed after `context`
    /// (the standard preamble; empty: alone at position 0), storing only their own KV.
    fn chunk_key(&self, context: &[u32], tokens: &[u32]) -> Self::Key;

    /// Whether a cache is stored at `key`: one metadata request, no data read.
    fn contains(
        &self,
        key: &Self::Key,
    ) -> impl Future<Output = std::result::Result<bool, StoreError>> + Send;

    /// Fetches and verifies the cache of `tokens` stored at `key`.
    fn load(
        &self,
        key: &Self::Key,
        tokens: &[u32],
    ) -> impl Future<Output = LoadOutcome<Self::Kv>> + Send;

    /// Fetches and verifies only `layers` of the cache of `tokens` stored at `key`
    /// (ranged reads: the top layers of a layer split).
    fn load_layers(
        &self,
        key: &Self::Key,
        tokens: &[u32],
        layers: Range<usize>,
    ) -> impl Future<Output = LoadOutcome<Self::Kv>> + Send;

    /// Stores the cache of `tokens` at `key` (write-back of a chunk computed in context).
    fn store(
        &self,
        key: &Self::Key,
        tokens: &[u32],
        kv: Self::Kv,
    ) -> impl Future<Output = std::result::Result<(), StoreError>> + Send;
}

/// A loaded position-independent chunk cache to blend into the prompt.
#[derive(Debug, Clone)]
pub struct BlendChunk {
    /// The chunk's token ids.
    pub tokens: Arc<[u32]>,
    /// Cache index of its first token.
    pub start: usize,
    /// Which of its tokens are recomputed, and how many.
    pub recompute: Recompute,
}

/// A stored cache a chunk may load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredCache<K> {
    /// Where it is.
    pub key: K,
    /// What it holds.
    pub kind: CacheKind,
}

/// Where the cache of a chunk computed in context is written back (only when no
/// position-independent cache came before it in the prompt: see
/// [`PrefillReport::in_context_chunks`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteBack<K> {
    /// Planning found nothing stored at the key: store there.
    Store(K),
    /// Planning did not look (compute-only, or the lookup failed): store there unless a
    /// cache is already there (one metadata request, after the reply).
    StoreIfAbsent(K),
}

/// One chunk of a request.
#[derive(Debug, Clone)]
pub struct ChunkSpec<K> {
    /// The chunk's token ids.
    pub tokens: Arc<[u32]>,
    /// The stored cache to load, when planning found one.
    pub stored: Option<StoredCache<K>>,
    /// Where to write its cache back when it is computed in context; none when its prefix
    /// cache is already stored.
    pub write_back: Option<WriteBack<K>>,
    /// How a position-independent chunk cache loaded for it is blended in
    /// ([`Recompute::NONE`] for exact prefix caches and chunks with nothing stored).
    pub recompute: Recompute,
}

impl<K> ChunkSpec<K> {
    /// Whether planning gave it a position-independent chunk cache to load (approximate:
    /// blended in, and never followed by a write-back).
    pub fn loads_chunk_cache(&self) -> bool {
        self.stored
            .as_ref()
            .is_some_and(|s| s.kind == CacheKind::Chunk)
    }
}

/// A prompt to prefill: ordered chunks (the preamble first), then the question tail.
#[derive(Debug, Clone)]
pub struct PrefillRequest<K> {
    /// The context's chunks in prompt order.
    pub chunks: Vec<ChunkSpec<K>>,
    /// The question tail: computed last, over the whole cache (at least one token).
    pub tail: Vec<u32>,
    /// How to fill the cache.
    pub mode: Mode,
}

/// A filled cache, the first token's logits, and the breakdown.
pub struct Filled<C: ComputeBackend> {
    /// The cache holding the whole prompt.
    pub cache: C::Cache,
    /// Logits of the prompt's last token.
    pub logits: C::Logits,
    /// Where the time went.
    pub report: PrefillReport,
}

impl<C: ComputeBackend> fmt::Debug for Filled<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Filled")
            .field("report", &self.report)
            .finish_non_exhaustive()
    }
}

/// Checks a request before it is admitted: a tail, no empty chunk, and room in the
/// context. Returns the position of each chunk's first token, then the tail's.
pub fn check_request<S>(request: &PrefillRequest<S>, max_tokens: usize) -> Result<Vec<usize>> {
    if request.tail.is_empty() {
        return Err(SchedulerError::EmptyInput);
    }
    if request.chunks.iter().any(|c| c.tokens.is_empty()) {
        return Err(SchedulerError::InvalidSetting(
            "a chunk has no tokens".into(),
        ));
    }
    for chunk in &request.chunks {
        chunk.recompute.validate()?;
    }
    let starts = dispatch::chunk_starts(request.chunks.iter().map(|c| c.tokens.len()));
    let needed = starts[starts.len() - 1] + request.tail.len();
    if needed > max_tokens {
        return Err(SchedulerError::ContextOverflow {
            needed,
            max: max_tokens,
        });
    }
    Ok(starts)
}

/// How many leading chunks were filled in context: up to the first one loaded (not
/// computed) from a position-independent chunk cache.
pub fn in_context_chunks<K>(chunks: &[ChunkSpec<K>], computed: &[usize]) -> usize {
    chunks
        .iter()
        .enumerate()
        .position(|(i, chunk)| !computed.contains(&i) && chunk.loads_chunk_cache())
        .unwrap_or(chunks.len())
}

/// A load that fails once it has run for `timeout` (a stalled store must not hold a
/// request).
pub async fn load_within<Kv>(
    timeout: Duration,
    load: impl Future<Output = LoadOutcome<Kv>>,
) -> LoadOutcome<Kv> {
    tokio::time::timeout(timeout, load)
        .await
        .unwrap_or_else(|_| LoadOutcome::Failed(StoreError::TimedOut(timeout)))
}

/// Declares a string-named enum of unit variants whose names, in `case` (`"kebab-case"`,
/// `"lowercase"`), are one set for serde (configuration, HTTP bodies) and for strum's
/// `Display`, `FromStr`, `&'static str` conversion and `VariantNames` (the command line,
/// logs, metadata). Derives `Debug`, `Clone`, `Copy`, `PartialEq`, `Eq` and `Hash` too; more
/// derives and docs go in the attributes. The invoking crate depends on serde and strum.
#[macro_export]
macro_rules! named_enum {
    (
        $(#[$attr:meta])*
        $vis:vis enum $name:ident in $case:literal {
            $($(#[$variant_attr:meta])* $variant:ident,)+
        }
    ) => {
        $(#[$attr])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[derive(::serde::Serialize, ::serde::Deserialize)]
        #[derive(::strum::Display, ::strum::EnumString, ::strum::IntoStaticStr)]
        #[derive(::strum::VariantNames)]
        #[serde(rename_all = $case)]
        #[strum(serialize_all = $case)]
        $vis enum $name {
            $($(#[$variant_attr])* $variant,)+
        }
    };
}
