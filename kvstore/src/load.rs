//! The KV store as the scheduler's load back end: loads are verified gets, write-backs are
//! puts, and every failure becomes a miss the scheduler computes around.

use std::ops::Range;

use futures::StreamExt;
use ragcake_engine::KvRange;
use ragcake_engine::scheduler::{
    ChunkSpec, LoadBackend, LoadOutcome, MissReason, Mode, PrefillRequest,
};

use crate::key::{CacheKey, CacheKind};
use crate::store::{KvStore, Lookup};

impl LoadBackend for KvStore {
    type Source = CacheKey;
    type Kv = KvRange;

    async fn load(&self, key: &CacheKey, tokens: &[u32]) -> LoadOutcome<KvRange> {
        outcome(self.get(key, Some(tokens)).await)
    }

    async fn load_layers(
        &self,
        key: &CacheKey,
        tokens: &[u32],
        layers: Range<usize>,
    ) -> LoadOutcome<KvRange> {
        outcome(self.get_layers(key, Some(tokens), layers).await)
    }

    async fn store(&self, key: &CacheKey, tokens: &[u32], kv: KvRange) -> Result<(), String> {
        self.put(key, tokens, &kv)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

/// A lookup as the scheduler sees it: a verified cache, a miss and why, or a failed store.
fn outcome(lookup: crate::Result<Lookup>) -> LoadOutcome<KvRange> {
    match lookup {
        Ok(Lookup::Hit(kv)) => {
            let bytes = kv.bytes() as u64;
            LoadOutcome::Loaded { kv, bytes }
        }
        Ok(Lookup::Absent) => LoadOutcome::Missing(MissReason::Absent),
        Ok(Lookup::Rejected(reason)) => {
            LoadOutcome::Missing(MissReason::Rejected(reason.to_string()))
        }
        Err(error) => LoadOutcome::Failed(error.to_string()),
    }
}

/// What the lookups before a prefill found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LookupSummary {
    /// Chunks with an exact prefix cache.
    pub prefix_hits: usize,
    /// Chunks with only a position-independent chunk cache.
    pub chunk_hits: usize,
    /// Lookups that failed (the store is down): those chunks are planned as computed.
    pub errors: usize,
}

impl KvStore {
    /// Plans a prefill of `chunks` then `tail`: looks up each chunk's exact prefix cache,
    /// then its position-independent cache (metadata requests only, no data read), and
    /// names each chunk's prefix key as its write-back destination.
    pub async fn plan_prefill(
        &self,
        chunks: Vec<Vec<u32>>,
        tail: Vec<u32>,
        mode: Mode,
    ) -> (PrefillRequest<CacheKey>, LookupSummary) {
        let prefix_keys = CacheKey::prefix_chain(&self.model(), chunks.iter().map(Vec::as_slice));
        // Futures built up front (no closure inside the stream), so the planning future
        // stays `Send` for callers that spawn it.
        let lookups: Vec<_> = chunks
            .iter()
            .zip(&prefix_keys)
            .map(|(tokens, prefix)| self.lookup(*prefix, tokens, mode))
            .collect();
        let found = futures::stream::iter(lookups)
            .buffered(LOOKUP_CONCURRENCY)
            .collect::<Vec<_>>()
            .await;
        let mut summary = LookupSummary::default();
        let chunks = chunks
            .into_iter()
            .zip(prefix_keys)
            .zip(found)
            .map(|((tokens, prefix), found)| {
                let stored = match found {
                    Ok(stored) => stored,
                    Err(error) => {
                        tracing::warn!(%error, "KV lookup failed; the chunk will be computed");
                        summary.errors += 1;
                        None
                    }
                };
                match stored.map(|k| k.kind()) {
                    Some(CacheKind::Prefix) => summary.prefix_hits += 1,
                    Some(CacheKind::Chunk) => summary.chunk_hits += 1,
                    None => {}
                }
                ChunkSpec {
                    tokens: tokens.into(),
                    stored,
                    write_back: Some(prefix),
                }
            })
            .collect();
        (PrefillRequest { chunks, tail, mode }, summary)
    }
}

impl KvStore {
    /// The cache to load for one chunk: its exact prefix cache, else its chunk cache.
    async fn lookup(
        &self,
        prefix: CacheKey,
        tokens: &[u32],
        mode: Mode,
    ) -> crate::Result<Option<CacheKey>> {
        if mode == Mode::ComputeOnly {
            return Ok(None);
        }
        if self.contains(&prefix).await? {
            return Ok(Some(prefix));
        }
        let chunk = CacheKey::chunk(&self.model(), tokens);
        Ok(self.contains(&chunk).await?.then_some(chunk))
    }
}

/// Concurrent metadata lookups while planning a prefill.
const LOOKUP_CONCURRENCY: usize = 16;
