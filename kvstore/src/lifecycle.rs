//! The storage lifecycle: what a store holds, and garbage collection by age and by size.
//!
//! Works on any backend and needs no model: it reads a listing (paths, sizes,
//! last-modified times) under a store's prefix, where caches lie at
//! `{model 16 hex}/{kind}/{2 hex}/{64 hex}.safetensors`. Objects of any other shape are
//! counted but never deleted. Prefix caches (written back by requests, cheap to lose) go
//! before chunk caches (the precompute job's work); within a kind, the oldest write first.
//! Object stores keep no access time, so "oldest" means written longest ago.

use std::time::{Duration, SystemTime};

use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use serde::Serialize;

use crate::error::Result;
use crate::key::{CacheKey, CacheKind};

/// One object under a store's prefix, as a listing shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredObject {
    /// Its path in the store.
    pub location: Path,
    /// The model directory (16 hex) and key, when the path is a cache's.
    pub cache: Option<(String, CacheKey)>,
    /// Bytes.
    pub size: u64,
    /// When it was written.
    pub last_modified: SystemTime,
}

impl StoredObject {
    /// The kind of cache this object holds, if it is one.
    pub fn kind(&self) -> Option<CacheKind> {
        self.cache.as_ref().map(|(_, key)| key.kind())
    }
}

/// The model directory and key of a cache's path (`…/{model}/{kind}/{xx}/{hex}.safetensors`).
pub(crate) fn parse_cache_path(location: &Path) -> Option<(String, CacheKey)> {
    let parts: Vec<_> = location.parts().collect();
    let n = parts.len();
    if n < 4 {
        return None;
    }
    let [model, kind, fan, file] = [n - 4, n - 3, n - 2, n - 1].map(|i| parts[i].as_ref());
    let hex = file.strip_suffix(".safetensors")?;
    let key = CacheKey::from_hex(kind.parse::<CacheKind>().ok()?, hex)?;
    let is_hex16 = model.len() == 16 && model.bytes().all(|b| b.is_ascii_hexdigit());
    (is_hex16 && hex.starts_with(fan)).then(|| (model.to_string(), key))
}

/// Every object under `prefix` of `store`, with its size and age.
pub async fn inventory(store: &dyn ObjectStore, prefix: &Path) -> Result<Vec<StoredObject>> {
    let prefix = (!prefix.as_ref().is_empty()).then_some(prefix);
    let metas: Vec<_> = store.list(prefix).try_collect().await?;
    let mut objects: Vec<StoredObject> = metas
        .into_iter()
        .map(|meta| StoredObject {
            cache: parse_cache_path(&meta.location),
            location: meta.location,
            size: meta.size,
            last_modified: meta.last_modified.into(),
        })
        .collect();
    objects.sort_by(|a, b| a.location.cmp(&b.location));
    Ok(objects)
}

/// Totals of one model's caches of one kind (or of the objects that are no cache).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GroupStats {
    /// The model directory (16 hex); `None` for objects that are no cache.
    pub model: Option<String>,
    /// `prefix` or `chunk`; `None` for objects that are no cache.
    pub kind: Option<&'static str>,
    /// Objects.
    pub objects: u64,
    /// Bytes.
    pub bytes: u64,
    /// Seconds since the oldest was written.
    pub oldest_age_secs: u64,
    /// Seconds since the newest was written.
    pub newest_age_secs: u64,
}

/// Totals per model and kind, caches first (sorted by model, prefix before chunk), then
/// the objects that are no cache, if any.
pub fn summarize(objects: &[StoredObject], now: SystemTime) -> Vec<GroupStats> {
    let age = |t: SystemTime| now.duration_since(t).unwrap_or_default().as_secs();
    let mut groups: std::collections::BTreeMap<(u8, Option<String>, u8), GroupStats> =
        Default::default();
    for object in objects {
        let (order, model, kind) = match &object.cache {
            Some((model, key)) => (0, Some(model.clone()), Some(eviction_rank(key.kind()))),
            None => (1, None, None),
        };
        let group = groups
            .entry((order, model.clone(), kind.unwrap_or(0)))
            .or_insert_with(|| GroupStats {
                model,
                kind: object.kind().map(<&str>::from),
                objects: 0,
                bytes: 0,
                oldest_age_secs: 0,
                newest_age_secs: u64::MAX,
            });
        group.objects += 1;
        group.bytes += object.size;
        group.oldest_age_secs = group.oldest_age_secs.max(age(object.last_modified));
        group.newest_age_secs = group.newest_age_secs.min(age(object.last_modified));
    }
    groups.into_values().collect()
}

/// Which kind goes first when space is needed: prefix caches (0), then chunk caches (1).
fn eviction_rank(kind: CacheKind) -> u8 {
    match kind {
        CacheKind::Prefix => 0,
        CacheKind::Chunk => 1,
    }
}

/// What garbage collection deletes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcPolicy {
    /// Delete caches until all caches under the prefix take at most this many bytes.
    pub max_bytes: Option<u64>,
    /// Delete caches written longer ago than this.
    pub older_than: Option<Duration>,
    /// Only caches of this kind are deleted (both kinds when `None`).
    pub kind: Option<CacheKind>,
}

/// What a garbage collection deletes, decided from a listing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcPlan {
    /// The caches to delete, in the order they go.
    pub delete: Vec<StoredObject>,
    /// Bytes of caches before.
    pub cache_bytes_before: u64,
    /// Bytes of caches left after.
    pub cache_bytes_after: u64,
    /// `max_bytes` was set and cannot be reached with the caches the policy may delete.
    pub over_budget: bool,
}

/// Decides what `policy` deletes from `objects` at time `now`: every cache of the allowed
/// kinds older than `older_than`, then, while the caches take more than `max_bytes`,
/// prefix caches before chunk caches, oldest first. Objects that are no cache never go.
pub fn plan_gc(objects: &[StoredObject], policy: &GcPolicy, now: SystemTime) -> GcPlan {
    let caches: Vec<&StoredObject> = objects.iter().filter(|o| o.cache.is_some()).collect();
    let before: u64 = caches.iter().map(|o| o.size).sum();
    let mut candidates: Vec<&StoredObject> = caches
        .into_iter()
        .filter(|o| policy.kind.is_none() || o.kind() == policy.kind)
        .collect();
    candidates.sort_by_key(|o| {
        (
            o.kind().map(eviction_rank),
            o.last_modified,
            o.location.clone(),
        )
    });
    let expired = |o: &StoredObject| {
        policy.older_than.is_some_and(|limit| {
            now.duration_since(o.last_modified)
                .is_ok_and(|age| age > limit)
        })
    };
    let mut remaining = before;
    let mut delete = Vec::new();
    for object in candidates {
        let over = policy.max_bytes.is_some_and(|max| remaining > max);
        if expired(object) || over {
            remaining -= object.size;
            delete.push(object.clone());
        }
    }
    GcPlan {
        delete,
        cache_bytes_before: before,
        cache_bytes_after: remaining,
        over_budget: policy.max_bytes.is_some_and(|max| remaining > max),
    }
}

/// Deletes what `plan` names (an object already gone counts as deleted). Returns the
/// objects and bytes deleted.
pub async fn collect_garbage(store: &dyn ObjectStore, plan: &GcPlan) -> Result<(u64, u64)> {
    /// Deletes in flight at once.
    const CONCURRENCY: usize = 16;
    let deleted: Vec<u64> = futures::stream::iter(&plan.delete)
        .map(|object| async move {
            match store.delete(&object.location).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(object.size),
                Err(e) => Err(e),
            }
        })
        .buffer_unordered(CONCURRENCY)
        .try_collect()
        .await?;
    Ok((deleted.len() as u64, deleted.iter().sum()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ragcake_engine::LlmFingerprint;

    fn object(kind: CacheKind, n: u8, size: u64, age_secs: u64, now: SystemTime) -> StoredObject {
        let model = LlmFingerprint([7; 32]);
        let key = match kind {
            CacheKind::Prefix => CacheKey::prefix(&model, None, &[n as u32]),
            CacheKind::Chunk => CacheKey::chunk(&model, &[], &[n as u32]),
        };
        let location = Path::from(format!("kv/{}", key.relative_path(&model)));
        StoredObject {
            cache: parse_cache_path(&location),
            location,
            size,
            last_modified: now - Duration::from_secs(age_secs),
        }
    }

    fn names(plan: &GcPlan) -> Vec<(Option<CacheKind>, u64)> {
        plan.delete.iter().map(|o| (o.kind(), o.size)).collect()
    }

    #[test]
    fn cache_paths_parse_and_other_objects_do_not() {
        let now = SystemTime::now();
        let o = object(CacheKind::Chunk, 1, 10, 0, now);
        assert_eq!(o.kind(), Some(CacheKind::Chunk));
        for other in [
            "kv/README",
            "kv/0123456789abcdef/chunk/zz/abc.safetensors",
            "kv/not-a-model-dir/chunk/00/00.safetensors",
        ] {
            assert_eq!(parse_cache_path(&Path::from(other)), None, "{other}");
        }
    }

    #[test]
    fn a_size_budget_evicts_prefix_caches_before_chunk_caches_oldest_first() {
        let now = SystemTime::now();
        let objects = vec![
            object(CacheKind::Chunk, 1, 100, 500, now),
            object(CacheKind::Prefix, 2, 100, 10, now),
            object(CacheKind::Prefix, 3, 100, 20, now),
            object(CacheKind::Chunk, 4, 100, 900, now),
        ];
        let policy = GcPolicy {
            max_bytes: Some(150),
            ..GcPolicy::default()
        };
        let plan = plan_gc(&objects, &policy, now);
        // Both prefix caches (older first), then the oldest chunk cache.
        assert_eq!(
            plan.delete
                .iter()
                .map(|o| o.last_modified)
                .collect::<Vec<_>>(),
            vec![
                now - Duration::from_secs(20),
                now - Duration::from_secs(10),
                now - Duration::from_secs(900)
            ]
        );
        assert_eq!(
            (plan.cache_bytes_before, plan.cache_bytes_after),
            (400, 100)
        );
        assert!(!plan.over_budget);
    }

    #[test]
    fn a_kind_filter_never_deletes_the_other_kind_and_reports_an_unreachable_budget() {
        let now = SystemTime::now();
        let objects = vec![
            object(CacheKind::Chunk, 1, 100, 500, now),
            object(CacheKind::Prefix, 2, 100, 10, now),
        ];
        let policy = GcPolicy {
            max_bytes: Some(50),
            kind: Some(CacheKind::Prefix),
            ..GcPolicy::default()
        };
        let plan = plan_gc(&objects, &policy, now);
        assert_eq!(names(&plan), vec![(Some(CacheKind::Prefix), 100)]);
        assert!(plan.over_budget);
    }

    #[test]
    fn an_age_limit_deletes_only_what_is_older_and_never_other_objects() {
        let now = SystemTime::now();
        let mut objects = vec![
            object(CacheKind::Chunk, 1, 100, 500, now),
            object(CacheKind::Prefix, 2, 100, 10, now),
        ];
        objects.push(StoredObject {
            location: Path::from("kv/notes.txt"),
            cache: None,
            size: 5,
            last_modified: now - Duration::from_secs(10_000),
        });
        let policy = GcPolicy {
            older_than: Some(Duration::from_secs(60)),
            ..GcPolicy::default()
        };
        let plan = plan_gc(&objects, &policy, now);
        assert_eq!(names(&plan), vec![(Some(CacheKind::Chunk), 100)]);
        assert_eq!(plan_gc(&objects, &GcPolicy::default(), now).delete, vec![]);
        let stats = summarize(&objects, now);
        assert_eq!(stats.len(), 3);
        assert_eq!(stats[0].kind, Some("prefix"));
        assert_eq!(stats[2].kind, None);
        assert_eq!((stats[2].objects, stats[2].bytes), (1, 5));
    }
}
