//! The KV store as the scheduler's load back end: keys are the store's content-addressed
//! keys, lookups are metadata requests, loads are verified gets, write-backs are puts, and
//! every failure becomes a miss the scheduler computes around. Which cache a prompt uses is
//! the scheduler's decision, not the store's.

use std::ops::Range;

use ragcake_engine::KvRange;
use ragcake_scheduler::{LoadBackend, LoadOutcome, MissReason, StoreError};

use crate::key::{CacheKey, CacheKind};
use crate::store::{KvStore, Lookup};

impl LoadBackend for KvStore {
    type Key = CacheKey;
    type Kv = KvRange;

    fn prefix_key(&self, parent: Option<&CacheKey>, tokens: &[u32]) -> CacheKey {
        CacheKey::prefix(&self.key_space(CacheKind::Prefix), parent, tokens)
    }

    fn salt_key(&self, salt: &str) -> CacheKey {
        CacheKey::salt(&self.key_space(CacheKind::Prefix), salt)
    }

    fn chunk_key(&self, context: &[u32], tokens: &[u32]) -> CacheKey {
        CacheKey::chunk(&self.key_space(CacheKind::Chunk), context, tokens)
    }

    async fn contains(&self, key: &CacheKey) -> Result<bool, StoreError> {
        KvStore::contains(self, key)
            .await
            .map_err(StoreError::backend)
    }

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

    async fn store(&self, key: &CacheKey, tokens: &[u32], kv: KvRange) -> Result<(), StoreError> {
        self.put(key, tokens, &kv)
            .await
            .map(|_| ())
            .map_err(StoreError::backend)
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
        Err(error) => LoadOutcome::Failed(StoreError::backend(error)),
    }
}
