//! [`KvStore`]: put, get and look up chunk KV caches in any object store.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use candle_core::{DType, Device};
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutPayload};
use ragcake_engine::{Engine, KvRange, KvShape, LlmFingerprint};
use serde::Serialize;

use crate::error::{KvStoreError, RejectReason, Result};
use crate::format::{self, Expectation, StorageDtype};
use crate::key::{CacheKey, CacheKind, tokens_hash};
use crate::url::{StoreClientConfig, open_url_parts};

/// The longest cache a blob may hold unless the store is told (the model's context).
const DEFAULT_MAX_TOKENS: usize = 128 << 10;

/// Counters of a store's traffic.
#[derive(Debug, Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    rejected: AtomicU64,
    memory_hits: AtomicU64,
    evictions: AtomicU64,
    puts: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    read_micros: AtomicU64,
}

/// A snapshot of a store's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct StoreStats {
    /// Gets that returned a cache.
    pub hits: u64,
    /// Gets that found nothing usable (absent or rejected).
    pub misses: u64,
    /// Blobs that failed verification (also counted as misses).
    pub rejected: u64,
    /// Hits served by the memory tier.
    pub memory_hits: u64,
    /// Entries evicted from the memory tier.
    pub evictions: u64,
    /// Successful puts.
    pub puts: u64,
    /// Bytes read from the backend.
    pub bytes_read: u64,
    /// Bytes written to the backend.
    pub bytes_written: u64,
    /// Total time spent in backend reads, microseconds.
    pub read_micros: u64,
}

/// A byte-bounded LRU of decoded caches, in front of the backend.
struct MemoryTier {
    capacity_bytes: usize,
    used_bytes: usize,
    /// Decoded caches with the blake3 of the token ids they were computed from.
    entries: lru::LruCache<CacheKey, (KvRange, [u8; 32])>,
}

impl MemoryTier {
    fn get(&mut self, key: &CacheKey) -> Option<(KvRange, [u8; 32])> {
        self.entries.get(key).cloned()
    }

    /// Inserts and returns how many entries were evicted to make room.
    fn insert(&mut self, key: CacheKey, range: KvRange, tokens_hash: [u8; 32]) -> u64 {
        let size = range.bytes();
        if size > self.capacity_bytes {
            return 0;
        }
        if let Some((old, _)) = self.entries.pop(&key) {
            self.used_bytes -= old.bytes();
        }
        let mut evicted = 0;
        while self.used_bytes + size > self.capacity_bytes {
            match self.entries.pop_lru() {
                Some((_, (old, _))) => {
                    self.used_bytes -= old.bytes();
                    evicted += 1;
                }
                None => break,
            }
        }
        self.used_bytes += size;
        self.entries.put(key, (range, tokens_hash));
        evicted
    }

    fn remove(&mut self, key: &CacheKey) {
        if let Some((old, _)) = self.entries.pop(key) {
            self.used_bytes -= old.bytes();
        }
    }
}

/// Chunk KV caches of one model in an object store, verified on every read.
pub struct KvStore {
    store: Arc<dyn ObjectStore>,
    /// The same store when it is a local directory: whole-blob reads then go to its files
    /// directly, straight into the loaded cache's buffers.
    local: Option<Arc<LocalFileSystem>>,
    prefix: Path,
    model: LlmFingerprint,
    shape: KvShape,
    /// Storage dtype of prefix caches (exact: f32 by default, so a loaded prefix cache is
    /// the computed KV bit for bit) and of position-independent chunk caches (approximate
    /// anyway: f16 by default, half the bytes to load).
    prefix_dtype: StorageDtype,
    chunk_dtype: StorageDtype,
    /// The dtype the engine computes caches in: part of every key, with the device kind and
    /// the storage dtype, so a cache computed in bf16 on a GPU is never loaded as exact by
    /// an f32 replica on a CPU (and the other way round).
    compute_dtype: DType,
    device: Device,
    /// The longest cache a blob may hold (the model's context): bounds the size of an
    /// object a read accepts before reading it.
    max_tokens: usize,
    tier: Option<Mutex<MemoryTier>>,
    counters: Counters,
}

impl std::fmt::Debug for KvStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvStore")
            .field("store", &self.store.to_string())
            .field("prefix", &self.prefix)
            .field("model", &self.model)
            .finish()
    }
}

/// The result of a lookup that reads data: the cache, or why there is none.
#[derive(Debug, Clone)]
pub enum Lookup {
    /// A verified cache.
    Hit(KvRange),
    /// No object under the key.
    Absent,
    /// An object that failed verification; never returned as data.
    Rejected(RejectReason),
}

impl Lookup {
    /// The cache, if this is a hit.
    pub fn hit(self) -> Option<KvRange> {
        match self {
            Self::Hit(r) => Some(r),
            _ => None,
        }
    }
}

impl KvStore {
    /// A store of caches of the model `model` (with cache dimensions `shape`) under `prefix`
    /// of `store`. Loaded caches are placed on `device`.
    pub fn new(
        store: Arc<dyn ObjectStore>,
        prefix: Path,
        model: LlmFingerprint,
        shape: KvShape,
        device: Device,
    ) -> Self {
        Self {
            store,
            local: None,
            prefix,
            model,
            shape,
            prefix_dtype: StorageDtype::F32,
            chunk_dtype: StorageDtype::F16,
            compute_dtype: DType::F32,
            device,
            max_tokens: DEFAULT_MAX_TOKENS,
            tier: None,
            counters: Counters::default(),
        }
    }

    /// A store of `engine`'s caches (its fingerprint, cache shape and device).
    pub fn for_engine(store: Arc<dyn ObjectStore>, prefix: Path, engine: &Engine) -> Self {
        Self::new(
            store,
            prefix,
            engine.fingerprint(),
            engine.kv_shape(),
            engine.device().clone(),
        )
        .with_compute_dtype(engine.new_cache().dtype())
        .with_max_tokens(engine.context_length())
    }

    /// A store at `url` (see [`open_url`](crate::open_url)) of caches of the model `model`. A local
    /// directory's loads read each tensor from its file straight into the cache's buffer.
    pub fn open(
        url: &str,
        options: impl IntoIterator<Item = (String, String)>,
        model: LlmFingerprint,
        shape: KvShape,
        device: Device,
    ) -> Result<Self> {
        let opened = open_url_parts(url, &StoreClientConfig::default(), options)?;
        let store = Self::new(opened.store, opened.prefix, model, shape, device);
        Ok(Self {
            local: opened.local,
            ..store
        })
    }

    /// A store of `engine`'s caches at `url`, as [`KvStore::open`] opens it.
    pub fn open_for_engine(
        url: &str,
        options: impl IntoIterator<Item = (String, String)>,
        engine: &Engine,
    ) -> Result<Self> {
        Self::open_for_engine_with(url, &StoreClientConfig::default(), options, engine)
    }

    /// [`KvStore::open_for_engine`], with cloud requests bounded by `client`.
    pub fn open_for_engine_with(
        url: &str,
        client: &StoreClientConfig,
        options: impl IntoIterator<Item = (String, String)>,
        engine: &Engine,
    ) -> Result<Self> {
        let opened = open_url_parts(url, client, options)?;
        let store = Self::for_engine(opened.store, opened.prefix, engine);
        Ok(Self {
            local: opened.local,
            ..store
        })
    }

    /// No blob holds more than `tokens` tokens (the model's context; 128k unless said).
    pub fn with_max_tokens(mut self, tokens: usize) -> Self {
        self.max_tokens = tokens;
        self
    }

    /// The most bytes a blob's header may take: fixed entries and a checksum and a tensor
    /// entry per layer, with room to spare.
    pub fn max_header_bytes(&self) -> u64 {
        4096 + 1024 * self.shape.n_layers as u64
    }

    /// The largest object a blob of `tokens` tokens (when known, else of the longest cache
    /// a blob may hold) can be: its header, and keys and values of every layer in f32, the
    /// widest storage dtype. A read refuses a larger object before reading it.
    pub fn max_blob_bytes(&self, tokens: Option<usize>) -> u64 {
        let tokens = tokens.unwrap_or(self.max_tokens) as u64;
        8 + self.max_header_bytes() + self.shape.values_per_token() as u64 * tokens * 4
    }

    /// Caches are computed in `dtype` (f32 unless said).
    pub fn with_compute_dtype(mut self, dtype: DType) -> Self {
        self.compute_dtype = dtype;
        self
    }

    /// What the keys of caches of `kind` are derived from besides their tokens: the model,
    /// the compute dtype, the kind of device and the storage dtype. Two stores whose caches
    /// differ in any of them never share a key.
    pub fn key_space(&self, kind: CacheKind) -> LlmFingerprint {
        self.key_space_stored_as(self.storage_dtype(kind))
    }

    /// The key space of caches stored as `storage` (see [`KvStore::key_space`]).
    fn key_space_stored_as(&self, storage: StorageDtype) -> LlmFingerprint {
        let device = match self.device.location() {
            candle_core::DeviceLocation::Cpu => "cpu",
            candle_core::DeviceLocation::Cuda { .. } => "cuda",
            candle_core::DeviceLocation::Metal { .. } => "metal",
        };
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"ragcake-kv-key-space-v1\0");
        hasher.update(&self.model.0);
        for part in [
            format::dtype_name(self.compute_dtype),
            device,
            <&str>::from(storage),
        ] {
            hasher.update(part.as_bytes()).update(&[0]);
        }
        LlmFingerprint(*hasher.finalize().as_bytes())
    }

    /// The key the chunk cache of `tokens` computed after `context` would have if this
    /// store kept chunk caches as `storage`: tells which dtype another writer (an ingest
    /// run with other settings) stored a recorded key in.
    pub fn chunk_key_stored_as(
        &self,
        storage: StorageDtype,
        context: &[u32],
        tokens: &[u32],
    ) -> CacheKey {
        CacheKey::chunk(&self.key_space_stored_as(storage), context, tokens)
    }

    /// Keeps up to `capacity_bytes` of decoded caches in memory (LRU).
    pub fn with_memory_tier(mut self, capacity_bytes: usize) -> Self {
        self.tier = Some(Mutex::new(MemoryTier {
            capacity_bytes,
            used_bytes: 0,
            entries: lru::LruCache::unbounded(),
        }));
        self
    }

    /// Stores every kind of cache as `dtype`.
    pub fn with_storage_dtype(mut self, dtype: StorageDtype) -> Self {
        self.prefix_dtype = dtype;
        self.chunk_dtype = dtype;
        self
    }

    /// Stores caches of `kind` as `dtype` (prefix caches f32, chunk caches f16 by default).
    pub fn with_storage_dtype_for(mut self, kind: CacheKind, dtype: StorageDtype) -> Self {
        match kind {
            CacheKind::Prefix => self.prefix_dtype = dtype,
            CacheKind::Chunk => self.chunk_dtype = dtype,
        }
        self
    }

    /// How caches of `kind` are stored.
    pub fn storage_dtype(&self, kind: CacheKind) -> StorageDtype {
        match kind {
            CacheKind::Prefix => self.prefix_dtype,
            CacheKind::Chunk => self.chunk_dtype,
        }
    }

    /// The fingerprint of the model whose caches this store holds.
    pub fn fingerprint(&self) -> LlmFingerprint {
        self.model
    }

    /// The dimensions of the caches this store holds.
    pub fn shape(&self) -> KvShape {
        self.shape
    }

    /// The backend.
    pub fn object_store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// The object path of `key`.
    pub fn path_of(&self, key: &CacheKey) -> Path {
        Path::from(format!("{}/{}", self.model_dir(), key.object_name()))
    }

    /// The directory holding this model's caches: `{prefix}/{model fingerprint, 16 hex}`.
    pub fn model_dir(&self) -> Path {
        self.prefix.clone().join(self.model.short())
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> StoreStats {
        let c = &self.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StoreStats {
            hits: l(&c.hits),
            misses: l(&c.misses),
            rejected: l(&c.rejected),
            memory_hits: l(&c.memory_hits),
            evictions: l(&c.evictions),
            puts: l(&c.puts),
            bytes_read: l(&c.bytes_read),
            bytes_written: l(&c.bytes_written),
            read_micros: l(&c.read_micros),
        }
    }

    fn tier_get(&self, key: &CacheKey) -> Option<(KvRange, [u8; 32])> {
        let tier = self.tier.as_ref()?;
        tier.lock().ok()?.get(key)
    }

    fn tier_insert(&self, key: CacheKey, range: &KvRange, tokens_hash: [u8; 32]) {
        if let Some(tier) = &self.tier
            && let Ok(mut tier) = tier.lock()
        {
            let evicted = tier.insert(key, range.clone(), tokens_hash);
            self.counters
                .evictions
                .fetch_add(evicted, Ordering::Relaxed);
        }
    }

    /// Whether a cache is stored under `key`: a metadata request, no data read.
    pub async fn contains(&self, key: &CacheKey) -> Result<bool> {
        if self.tier_get(key).is_some() {
            return Ok(true);
        }
        match self.store.head(&self.path_of(key)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Stores the KV of `tokens` under `key`. The object appears whole or not at all.
    /// Returns the bytes written.
    pub async fn put(&self, key: &CacheKey, tokens: &[u32], range: &KvRange) -> Result<usize> {
        if range.shape() != self.shape {
            return Err(KvStoreError::Encode(format!(
                "range shape {:?} is not the store's {:?}",
                range.shape(),
                self.shape
            )));
        }
        let dtype = self.storage_dtype(key.kind());
        let blob = format::encode(key, &self.model, tokens, range, dtype)?;
        let blob = bytes::Bytes::from(blob);
        let len = blob.len();
        self.store
            .put(&self.path_of(key), PutPayload::from(blob.clone()))
            .await?;
        self.counters.puts.fetch_add(1, Ordering::Relaxed);
        self.counters
            .bytes_written
            .fetch_add(len as u64, Ordering::Relaxed);
        // The memory tier holds what a read would return; without one, nothing to convert.
        if self.tier.is_some() {
            let loaded = match dtype {
                StorageDtype::Int8 => {
                    let expected = Expectation {
                        key,
                        model: &self.model,
                        shape: self.shape,
                        tokens: Some(tokens),
                    };
                    format::decode(&blob, &expected, &self.device)
                        .map_err(|reason| KvStoreError::Encode(reason.to_string()))?
                        .1
                }
                float => range.to_dtype(float.loaded_dtype())?,
            };
            self.tier_insert(*key, &loaded, tokens_hash(tokens));
        }
        Ok(len)
    }

    /// Loads the cache stored under `key`, verified against the model and (when given) the
    /// token ids it must have been computed from. Absent and rejected blobs are misses.
    pub async fn get(&self, key: &CacheKey, tokens: Option<&[u32]>) -> Result<Lookup> {
        if let Some((range, hash)) = self.tier_get(key) {
            // The same token check as a read from the backend.
            if tokens.is_some_and(|t| tokens_hash(t) != hash) {
                return Ok(self.reject(&self.path_of(key), RejectReason::TokenMismatch));
            }
            self.counters.hits.fetch_add(1, Ordering::Relaxed);
            self.counters.memory_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(Lookup::Hit(range));
        }
        let path = self.path_of(key);
        #[cfg(unix)]
        if self.local.is_some() {
            return self.get_local(&path, key, tokens, None).await;
        }
        let started = Instant::now();
        let limit = self.max_blob_bytes(tokens.map(<[u32]>::len));
        let bytes = match self.store.get(&path).await {
            // The size is in the response's headers: an object too large for any cache
            // this key can name is refused before its body is read.
            Ok(got) if got.meta.size > limit => {
                let size = got.meta.size;
                return Ok(self.reject(&path, RejectReason::Oversized { size, limit }));
            }
            Ok(got) => got.bytes().await?,
            Err(object_store::Error::NotFound { .. }) => {
                self.counters.misses.fetch_add(1, Ordering::Relaxed);
                return Ok(Lookup::Absent);
            }
            Err(e) => return Err(e.into()),
        };
        self.record_read(bytes.len(), started);
        // Verification and decoding are CPU work: off the async workers, so other reads
        // keep flowing while this one is checked.
        let (key_copy, model, shape, device) = (*key, self.model, self.shape, self.device.clone());
        let tokens = tokens.map(<[u32]>::to_vec);
        let decoded = tokio::task::spawn_blocking(move || {
            let expected = Expectation {
                key: &key_copy,
                model: &model,
                shape,
                tokens: tokens.as_deref(),
            };
            format::decode(&bytes, &expected, &device)
        })
        .await
        .map_err(|e| KvStoreError::Task(e.to_string()))?;
        match decoded {
            Ok((blob, range)) => Ok(self.hit(key, range, Some(blob.tokens_hash))),
            Err(reason) => Ok(self.reject(&path, reason)),
        }
    }

    /// A verified cache read from the backend: counted, and kept in the memory tier when
    /// it is the whole cache (`tokens_hash` given).
    fn hit(&self, key: &CacheKey, range: KvRange, tokens_hash: Option<[u8; 32]>) -> Lookup {
        self.counters.hits.fetch_add(1, Ordering::Relaxed);
        if let Some(hash) = tokens_hash {
            self.tier_insert(*key, &range, hash);
        }
        Lookup::Hit(range)
    }

    /// [`KvStore::get`] (or, with `layers`, [`KvStore::get_layers`]) from a local
    /// directory's file, read straight into the cache's buffers off the async workers.
    #[cfg(unix)]
    async fn get_local(
        &self,
        path: &Path,
        key: &CacheKey,
        tokens: Option<&[u32]>,
        layers: Option<Range<usize>>,
    ) -> Result<Lookup> {
        use crate::local::{Limits, LocalRead, read_blob};
        let local = self.local.as_ref().expect("a local store");
        let file = local.path_to_filesystem(path)?;
        let limits = Limits {
            blob_bytes: self.max_blob_bytes(tokens.map(<[u32]>::len)),
            header_bytes: self.max_header_bytes(),
        };
        let whole = layers.is_none();
        let (key_copy, model, shape, device) = (*key, self.model, self.shape, self.device.clone());
        let tokens = tokens.map(<[u32]>::to_vec);
        let started = Instant::now();
        let read = tokio::task::spawn_blocking(move || {
            let expected = Expectation {
                key: &key_copy,
                model: &model,
                shape,
                tokens: tokens.as_deref(),
            };
            read_blob(&file, &limits, &expected, layers, &device).map_err(|source| {
                KvStoreError::Io {
                    path: file.display().to_string(),
                    source,
                }
            })
        })
        .await
        .map_err(|e| KvStoreError::Task(e.to_string()))??;
        match read {
            LocalRead::Absent => {
                self.counters.misses.fetch_add(1, Ordering::Relaxed);
                Ok(Lookup::Absent)
            }
            LocalRead::Hit { bytes, blob, range } => {
                self.record_read(bytes as usize, started);
                Ok(self.hit(key, range, whole.then_some(blob.tokens_hash)))
            }
            LocalRead::Rejected(reason) => Ok(self.reject(path, reason)),
        }
    }

    fn record_read(&self, bytes: usize, started: Instant) {
        self.counters
            .bytes_read
            .fetch_add(bytes as u64, Ordering::Relaxed);
        self.counters
            .read_micros
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
    }

    fn reject(&self, path: &Path, reason: RejectReason) -> Lookup {
        tracing::warn!(%path, %reason, "stored KV cache rejected, treated as a miss");
        self.counters.rejected.fetch_add(1, Ordering::Relaxed);
        self.counters.misses.fetch_add(1, Ordering::Relaxed);
        Lookup::Rejected(reason)
    }

    /// Loads only `layers` of the cache under `key` with ranged reads: the header, then the
    /// keys and values of those layers (two byte ranges, one request batch).
    pub async fn get_layers(
        &self,
        key: &CacheKey,
        tokens: Option<&[u32]>,
        layers: Range<usize>,
    ) -> Result<Lookup> {
        if layers.start >= layers.end || layers.end > self.shape.n_layers {
            return Err(KvStoreError::LayerRange {
                start: layers.start,
                end: layers.end,
                n_layers: self.shape.n_layers,
            });
        }
        let path = self.path_of(key);
        #[cfg(unix)]
        if self.local.is_some() {
            return self.get_local(&path, key, tokens, Some(layers)).await;
        }
        let started = Instant::now();
        // The first read also gives the object's size: ranges past its end (a truncated
        // object) are then refused as malformed instead of failing as requests.
        let options = GetOptions {
            range: Some(GetRange::Bounded(0..8)),
            ..GetOptions::default()
        };
        let (size, len_bytes) = match self.store.get_opts(&path, options).await {
            Ok(got) => (got.meta.size, got.bytes().await?),
            Err(object_store::Error::NotFound { .. }) => {
                self.counters.misses.fetch_add(1, Ordering::Relaxed);
                return Ok(Lookup::Absent);
            }
            Err(e) => return Err(e.into()),
        };
        let header_len = match format::header_len(&len_bytes, size, self.max_header_bytes()) {
            Ok(len) => len,
            Err(reason) => return Ok(self.reject(&path, reason)),
        };
        let header = self.store.get_range(&path, 8..8 + header_len).await?;
        let expected = Expectation {
            key,
            model: &self.model,
            shape: self.shape,
            tokens,
        };
        let checked = format::parse_header(&header, size)
            .and_then(|parsed| format::check_header(&parsed, &expected, Some(layers)));
        let format::CheckedHeader {
            meta,
            blob,
            tensors,
        } = match checked {
            Ok(found) => found,
            Err(reason) => return Ok(self.reject(&path, reason)),
        };
        // Keys of consecutive layers are adjacent, and so are values.
        let data_start = 8 + header_len;
        let ranges: Vec<Range<u64>> = tensors
            .iter()
            .map(|(_, i)| {
                data_start + i.data_offsets.0 as u64..data_start + i.data_offsets.1 as u64
            })
            .collect();
        let chunks = self.store.get_ranges(&path, &ranges).await?;
        self.record_read(
            8 + header.len() + chunks.iter().map(|c| c.len()).sum::<usize>(),
            started,
        );
        let slices: Vec<&[u8]> = chunks.iter().map(|c| c.as_ref()).collect();
        match format::range_from_tensors(&tensors, slices, &meta, &blob, &self.device) {
            Ok(range) => Ok(self.hit(key, range, None)),
            Err(reason) => Ok(self.reject(&path, reason)),
        }
    }

    /// Deletes the cache under `key` (absent is fine).
    pub async fn delete(&self, key: &CacheKey) -> Result<()> {
        if let Some(tier) = &self.tier
            && let Ok(mut tier) = tier.lock()
        {
            tier.remove(key);
        }
        match self.store.delete(&self.path_of(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Every key stored for this model, of both kinds.
    pub async fn list(&self) -> Result<Vec<CacheKey>> {
        let objects = crate::lifecycle::inventory(&*self.store, &self.model_dir()).await?;
        let mut keys: Vec<CacheKey> = objects
            .into_iter()
            .filter_map(|o| o.cache.map(|(_, key)| key))
            .collect();
        keys.sort();
        Ok(keys)
    }
}
