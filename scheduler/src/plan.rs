//! Planning a prefill: which stored cache each chunk of a prompt loads, and where a chunk
//! computed in context is written back. The load back end only answers "what is stored
//! at this key?"; the choice between an exact prefix cache and a position-independent chunk
//! cache, and what the request's options allow, is made here.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde::{Deserialize, Serialize};

use super::dispatch::CostModel;
use super::{
    CacheKind, ChunkSpec, LoadBackend, Mode, PrefillRequest, Recompute, StoreError, StoredCache,
    WriteBack,
};

/// What the caller already knows of a chunk's position-independent cache, so planning need
/// not ask the store again (the vector index records what the precompute job stored).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChunkCacheHint {
    /// Not known: planning asks the store (one more metadata request).
    #[default]
    Unknown,
    /// Recorded as stored; the load still verifies it, and a miss is computed.
    Stored,
    /// Not stored, or not usable by this model.
    Absent,
}

/// One chunk of a prompt, before planning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptChunk {
    /// Its token ids.
    pub tokens: Vec<u32>,
    /// What is known of its position-independent cache.
    pub chunk_cache: ChunkCacheHint,
}

impl PromptChunk {
    /// A chunk whose cache status is unknown (planning looks it up).
    pub fn new(tokens: Vec<u32>) -> Self {
        Self {
            tokens,
            chunk_cache: ChunkCacheHint::Unknown,
        }
    }

    /// A chunk whose position-independent cache is known to be stored or not.
    pub fn with_chunk_cache(tokens: Vec<u32>, stored: bool) -> Self {
        Self {
            tokens,
            chunk_cache: if stored {
                ChunkCacheHint::Stored
            } else {
                ChunkCacheHint::Absent
            },
        }
    }
}

impl From<Vec<u32>> for PromptChunk {
    fn from(tokens: Vec<u32>) -> Self {
        Self::new(tokens)
    }
}

/// What a request allows planning to use.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanOptions {
    /// How the cache is filled (compute-only looks nothing up).
    pub mode: Mode,
    /// Only exact prefix caches: position-independent chunk caches are not used.
    pub exact: bool,
    /// How each position-independent chunk cache loaded is blended into the prompt.
    pub recompute: Recompute,
    /// The tokens position-independent chunk caches were computed after (the standard
    /// preamble the precompute job used; empty: alone at position 0). Part of their key.
    pub chunk_context: Arc<[u32]>,
    /// Salts every prefix key (see [`LoadBackend::salt_key`]): only caches written under
    /// the same salt are found, and the ones computed are written back under it.
    #[serde(default)]
    pub cache_salt: Option<Arc<str>>,
    /// Whether the chunks computed are written back (their prefix keys named as
    /// destinations). Off for a prompt no other request can reuse, such as one that starts
    /// with a conversation's own history.
    #[serde(default = "yes")]
    pub write_back: bool,
    /// Lookups still unanswered this many seconds after planning began are given up: their
    /// chunks are planned as not stored (computed) and counted as timed out, so a store
    /// that hangs costs a question this long, not the store client's own timeouts.
    /// Not finite: no deadline.
    #[serde(default = "default_lookup_timeout")]
    pub lookup_timeout_secs: f64,
}

fn yes() -> bool {
    true
}

/// Default of [`PlanOptions::lookup_timeout_secs`]: a metadata request answers in
/// milliseconds from a store that works; a chunk computed instead costs about a second.
pub const DEFAULT_LOOKUP_TIMEOUT_SECS: f64 = 1.0;

fn default_lookup_timeout() -> f64 {
    DEFAULT_LOOKUP_TIMEOUT_SECS
}

impl Default for PlanOptions {
    fn default() -> Self {
        Self {
            mode: Mode::default(),
            exact: false,
            recompute: Recompute::default(),
            chunk_context: Arc::from([]),
            cache_salt: None,
            write_back: true,
            lookup_timeout_secs: DEFAULT_LOOKUP_TIMEOUT_SECS,
        }
    }
}

impl From<Mode> for PlanOptions {
    fn from(mode: Mode) -> Self {
        Self {
            mode,
            ..Self::default()
        }
    }
}

/// What the lookups before a prefill found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LookupSummary {
    /// Chunks with an exact prefix cache.
    pub prefix_hits: usize,
    /// Of those, the ones after the prompt's first chunk (the preamble): this context was
    /// filled before beyond its preamble — a repeated prompt, or an earlier turn.
    #[serde(default)]
    pub repeated_context_hits: usize,
    /// Chunks with only a position-independent chunk cache.
    pub chunk_hits: usize,
    /// Lookups that failed (the store is down): those chunks are planned as computed.
    pub errors: usize,
    /// Lookups given up at the planning deadline (the store hangs): those chunks are
    /// planned as computed.
    #[serde(default)]
    pub timed_out: usize,
    /// Metadata requests sent to the store.
    pub requests: usize,
    /// Chunk caches were planned, but the prompt does not start with the context they were
    /// computed after (another system prompt, or history): they are a further
    /// approximation.
    #[serde(default)]
    pub other_context: bool,
}

/// Concurrent metadata lookups while planning a prefill.
const LOOKUP_CONCURRENCY: usize = 16;

/// Plans a prefill of `chunks` then `tail`: each chunk loads its exact prefix cache when one
/// is stored, else (unless `exact`) its position-independent cache when one is stored, and
/// names its prefix key as its write-back destination unless a cache is stored there. One
/// metadata request per chunk when the chunk cache's status is known, two when it is not;
/// none in compute-only mode. A failed lookup, or one unanswered at the deadline
/// ([`PlanOptions::lookup_timeout_secs`]), plans the chunk as computed and is counted.
pub async fn plan<L: LoadBackend>(
    loader: &L,
    chunks: Vec<PromptChunk>,
    tail: Vec<u32>,
    options: PlanOptions,
) -> (PrefillRequest<L::Key>, LookupSummary) {
    let prefix_keys = loader.salted_prefix_chain(
        options.cache_salt.as_deref(),
        chunks.iter().map(|c| c.tokens.as_slice()),
    );
    // Futures built up front (no closure inside the stream), so the planning future stays
    // `Send` for callers that spawn it.
    let deadline = Duration::try_from_secs_f64(options.lookup_timeout_secs)
        .ok()
        .map(|timeout| tokio::time::Instant::now() + timeout);
    let lookups: Vec<_> = chunks
        .iter()
        .zip(&prefix_keys)
        .map(|(chunk, prefix)| within(deadline, locate(loader, prefix, chunk, &options)))
        .collect();
    let found = futures::stream::iter(lookups)
        .buffered(LOOKUP_CONCURRENCY)
        .collect::<Vec<_>>()
        .await;
    let mut summary = LookupSummary::default();
    let mut chunks = chunks
        .into_iter()
        .zip(prefix_keys)
        .zip(found)
        .enumerate()
        .map(|(i, ((chunk, prefix), (found, requests)))| {
            summary.requests += requests;
            let (stored, looked_up) = match found {
                Ok(stored) => (stored, options.mode != Mode::ComputeOnly),
                Err(LookupFailure::Failed(error)) => {
                    tracing::warn!(%error, "KV lookup failed; the chunk will be computed");
                    summary.errors += 1;
                    (None, false)
                }
                Err(LookupFailure::TimedOut) => {
                    summary.timed_out += 1;
                    (None, false)
                }
            };
            let write_back = match stored.as_ref().map(|s| s.kind) {
                Some(CacheKind::Prefix) => {
                    summary.prefix_hits += 1;
                    summary.repeated_context_hits += usize::from(i > 0);
                    None // already stored
                }
                Some(CacheKind::Chunk) => {
                    summary.chunk_hits += 1;
                    Some(WriteBack::Store(prefix))
                }
                None if looked_up => Some(WriteBack::Store(prefix)),
                None => Some(WriteBack::StoreIfAbsent(prefix)),
            }
            .filter(|_| options.write_back);
            ChunkSpec {
                tokens: chunk.tokens.into(),
                stored,
                write_back,
                // Set below, once every chunk's cache is known.
                recompute: Recompute::NONE,
            }
        })
        .collect::<Vec<_>>();
    if summary.timed_out > 0 {
        tracing::warn!(
            timed_out = summary.timed_out,
            secs = options.lookup_timeout_secs,
            "KV lookups unanswered at the planning deadline; those chunks will be computed"
        );
    }
    spread_recompute(&mut chunks, options.recompute, &options.chunk_context);
    summary.other_context =
        summary.chunk_hits > 0 && !starts_with_context(&chunks, &options.chunk_context);
    let request = PrefillRequest {
        chunks,
        tail,
        mode: options.mode,
    };
    (request, summary)
}

/// Whether the first chunk is `context` (not empty), the one chunk caches were computed
/// after.
fn starts_with_context<K>(chunks: &[ChunkSpec<K>], context: &[u32]) -> bool {
    !context.is_empty()
        && chunks
            .first()
            .is_some_and(|first| *first.tokens == *context)
}

/// Sets how each chunk cache of a request is blended: the request's budget —
/// `recompute.ratio` of the tokens loaded from chunk caches — spread over the chunk caches
/// that need it (chunks with another kind of cache, or none, get none). A chunk cache right
/// after the context it was computed after (the first chunk after the standard preamble)
/// holds this prompt's own KV there, up to storage rounding: it needs none, and its share
/// goes to the chunks after it, which never saw the chunks before them. Only the chunks that
/// need blending get the attention correction (the others are attended to as computed).
pub fn spread_recompute<K>(chunks: &mut [ChunkSpec<K>], recompute: Recompute, context: &[u32]) {
    // Chunk 1 sits right after the context its cache was computed after.
    let after_context = starts_with_context(chunks, context);
    let needs = |i: usize, c: &ChunkSpec<K>| c.loads_chunk_cache() && !(after_context && i == 1);
    let (mut loaded, mut needing) = (0, 0);
    for (i, c) in chunks.iter().enumerate() {
        if c.loads_chunk_cache() {
            loaded += c.tokens.len();
        }
        if needs(i, c) {
            needing += c.tokens.len();
        }
    }
    let ratio = if needing == 0 {
        0.0
    } else {
        (recompute.ratio * loaded as f64 / needing as f64).min(1.0)
    };
    for (i, chunk) in chunks.iter_mut().enumerate() {
        chunk.recompute = if needs(i, &*chunk) {
            Recompute { ratio, ..recompute }
        } else {
            Recompute::NONE
        };
    }
}

/// The share of the load-paid chunk caches' tokens (those whose [`Recompute::load_paid`]
/// is set) whose recomputation takes, by `costs`, as long as loading those caches takes
/// with `io_concurrency` loads in flight — less the query rules' probe of the tail (in a
/// model of `layers`), which the same budget pays for. `starts` are the chunks' cache indices, `tail_start` the
/// tail's. 0 when no chunk is load-paid, and until a load has finished (the prior load
/// cost is a guess: a fresh service's first request keeps the floor); at most 1. What the loads pay for is compute the
/// prompt needs anyway (a slow store buys more recomputation, a local one little): the
/// tail's pass runs after the last load, so the recomputation adds to TTFT at most the time
/// the loads took.
pub fn load_paid_share<K>(
    chunks: &[ChunkSpec<K>],
    starts: &[usize],
    tail: (usize, usize),
    costs: &CostModel,
    io_concurrency: usize,
    layers: usize,
) -> f64 {
    if !costs.loads_observed() {
        return 0.0;
    }
    let (tail_start, tail_tokens) = tail;
    let (mut loads, mut compute, mut count, mut probe_share) = (0.0, 0.0, 0usize, 0.0f64);
    for (chunk, &start) in chunks.iter().zip(starts) {
        if !(chunk.loads_chunk_cache() && chunk.recompute.load_paid) {
            continue;
        }
        loads += costs.load_secs(chunk.tokens.len());
        compute += costs.compute_secs(chunk.tokens.len(), start);
        count += 1;
        probe_share = probe_share.max(chunk.recompute.rule.probe_share(layers));
    }
    if count == 0 || compute <= 0.0 {
        return 0.0;
    }
    // Loads in flight together take about the longest of them: their sum over the slots.
    let load_wall = loads / io_concurrency.clamp(1, count) as f64;
    let probe = probe_share * costs.compute_secs(tail_tokens, tail_start);
    ((load_wall - probe) / compute).clamp(0.0, 1.0)
}

/// Raises the recompute share of every load-paid chunk cache to `share` where it is lower.
pub(crate) fn raise_load_paid<K>(chunks: &mut [ChunkSpec<K>], share: f64) {
    for chunk in chunks {
        if chunk.loads_chunk_cache() && chunk.recompute.load_paid {
            chunk.recompute.ratio = chunk.recompute.ratio.max(share);
        }
    }
}

/// Why a chunk's lookup found nothing to plan with.
#[derive(Debug)]
enum LookupFailure {
    /// The store answered with an error.
    Failed(StoreError),
    /// The store had not answered at the planning deadline.
    TimedOut,
}

/// A chunk's lookup, and the metadata requests it took.
type Located<K> = (Result<Option<StoredCache<K>>, LookupFailure>, usize);

/// `lookup`, given up at `deadline` (one request counted: at least one was sent).
async fn within<K>(
    deadline: Option<tokio::time::Instant>,
    lookup: impl Future<Output = Located<K>>,
) -> Located<K> {
    match deadline {
        None => lookup.await,
        Some(deadline) => tokio::time::timeout_at(deadline, lookup)
            .await
            .unwrap_or((Err(LookupFailure::TimedOut), 1)),
    }
}

/// The cache one chunk loads, and the metadata requests it took to find out.
async fn locate<L: LoadBackend>(
    loader: &L,
    prefix: &L::Key,
    chunk: &PromptChunk,
    options: &PlanOptions,
) -> Located<L::Key> {
    if options.mode == Mode::ComputeOnly {
        return (Ok(None), 0);
    }
    match loader.contains(prefix).await {
        Ok(true) => {
            let stored = StoredCache {
                key: prefix.clone(),
                kind: CacheKind::Prefix,
            };
            return (Ok(Some(stored)), 1);
        }
        Ok(false) => {}
        Err(error) => return (Err(LookupFailure::Failed(error)), 1),
    }
    if options.exact {
        return (Ok(None), 1);
    }
    let key = loader.chunk_key(&options.chunk_context, &chunk.tokens);
    let (stored, requests) = match chunk.chunk_cache {
        ChunkCacheHint::Stored => (Ok(true), 1),
        ChunkCacheHint::Absent => (Ok(false), 1),
        ChunkCacheHint::Unknown => (loader.contains(&key).await, 2),
    };
    let stored = stored.map_err(LookupFailure::Failed).map(|stored| {
        stored.then_some(StoredCache {
            key,
            kind: CacheKind::Chunk,
        })
    });
    (stored, requests)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::{Dispatcher, chunk_starts};
    use crate::{RecomputeRule, SchedulerConfig};

    /// A preamble computed, then `chunk caches` loaded with `recompute`, each of `tokens`.
    fn chunks(tokens: usize, chunk_caches: usize, recompute: Recompute) -> Vec<ChunkSpec<u32>> {
        let preamble = ChunkSpec {
            tokens: vec![1; 16].into(),
            stored: None,
            write_back: None,
            recompute: Recompute::NONE,
        };
        let loaded = (0..chunk_caches).map(|i| ChunkSpec {
            tokens: vec![2; tokens].into(),
            stored: Some(StoredCache {
                key: i as u32,
                kind: CacheKind::Chunk,
            }),
            write_back: None,
            recompute,
        });
        std::iter::once(preamble).chain(loaded).collect()
    }

    /// Costs of 1 ms per computed token (no attention term) and `load` per loaded token,
    /// one load of 100 tokens observed at that rate.
    fn costs(load: f64) -> CostModel {
        let mut costs = unobserved_costs(load);
        costs.observe_load(100, 100.0 * load);
        costs
    }

    fn unobserved_costs(load: f64) -> CostModel {
        Dispatcher::new(SchedulerConfig {
            compute_secs_per_token: 1e-3,
            compute_secs_per_token_per_position: 0.0,
            load_secs_per_token: load,
            ..SchedulerConfig::default()
        })
        .costs()
        .clone()
    }

    fn share(chunks: &[ChunkSpec<u32>], costs: &CostModel, io: usize) -> f64 {
        let starts = chunk_starts(chunks.iter().map(|c| c.tokens.len()));
        load_paid_share(
            chunks,
            &starts,
            (*starts.last().unwrap(), 10),
            costs,
            io,
            30,
        )
    }

    #[test]
    fn the_share_the_loads_pay_for_is_their_time_over_the_compute_time() {
        let leading = Recompute {
            rule: RecomputeRule::Leading,
            ratio: 0.05,
            correct_attention: false,
            load_paid: true,
        };
        let request = chunks(100, 4, leading);
        // Loads of 0.2 ms a token, two at a time: 400 tokens in 40 ms of wall time, against
        // 400 ms of compute: a tenth.
        assert!((share(&request, &costs(2e-4), 2) - 0.1).abs() < 1e-9);
        // A store ten times slower pays for all of it, and no more.
        assert_eq!(share(&request, &costs(2e-2), 2), 1.0);
        // The query rule's probe of the 10-token tail (10 ms) comes out of the same time.
        let query = Recompute {
            rule: RecomputeRule::Query,
            ..leading
        };
        assert!((share(&chunks(100, 4, query), &costs(2e-4), 2) - 0.075).abs() < 1e-9);
        // Nothing load-paid, nothing raised.
        let fixed = Recompute {
            load_paid: false,
            ..leading
        };
        assert_eq!(share(&chunks(100, 4, fixed), &costs(2e-4), 2), 0.0);
        // Before any load has finished the prior is a guess: the floor is kept.
        assert_eq!(share(&request, &unobserved_costs(2e-2), 2), 0.0);
    }

    #[test]
    fn raising_to_the_paid_share_keeps_higher_shares_and_fixed_ones() {
        let paid = Recompute {
            ratio: 0.2,
            load_paid: true,
            ..Recompute::default()
        };
        let mut request = chunks(100, 2, paid);
        request[2].recompute.load_paid = false;
        raise_load_paid(&mut request, 0.1);
        assert_eq!(request[1].recompute.ratio, 0.2);
        raise_load_paid(&mut request, 0.3);
        assert_eq!(request[1].recompute.ratio, 0.3);
        // The fixed share and the computed preamble are left as they were.
        assert_eq!(request[2].recompute.ratio, 0.2);
        assert_eq!(request[0].recompute, Recompute::NONE);
    }

    #[test]
    fn the_early_query_probe_costs_a_third_of_the_full_one_and_the_others_none() {
        assert_eq!(RecomputeRule::Query.probe_share(30), 1.0);
        assert_eq!(RecomputeRule::QueryEarly.probe_share(30), 10.0 / 30.0);
        // Never no layer at all, and a third rounded up.
        assert_eq!(RecomputeRule::QueryEarly.probe_share(1), 1.0);
        assert_eq!(RecomputeRule::QueryEarly.probe_share(18), 6.0 / 18.0);
        assert_eq!(RecomputeRule::Leading.probe_share(30), 0.0);
        assert_eq!(RecomputeRule::Deviation.probe_share(30), 0.0);
        assert_eq!(
            "query-early".parse::<RecomputeRule>(),
            Ok(RecomputeRule::QueryEarly)
        );
    }
}
