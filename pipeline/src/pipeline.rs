//! [`Pipeline`]: the stages stacked with the standard layers, built from a configuration
//! or from parts, with `ask` and a streaming ask.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use ragcake_engine::{Engine, EngineConfig};
use ragcake_kvstore::{CacheKind, KvStore};
use ragcake_retriever::{Embedder, Retriever, VectorIndex};
use ragcake_scheduler::SchedulerStats;
use serde::Serialize;
use tokio::sync::mpsc;
use tower::util::BoxCloneSyncService;
use tower::{ServiceBuilder, ServiceExt};

use crate::config::PipelineConfig;
use crate::error::{PipelineError, Result};
use crate::metrics::{Metrics, MetricsLayer};
use crate::stages::{EngineScheduler, Generate, PlanLayer, PrefillLayer, RetrieveLayer};
use crate::types::{Answer, Ask, AskRequest, StreamEvent};

/// Builds a [`Pipeline`] from paths and locations, or from parts already built.
#[derive(Debug, Default)]
pub struct PipelineBuilder {
    config: PipelineConfig,
    engine_config: EngineConfig,
    model_path: Option<PathBuf>,
    embedder_dir: Option<PathBuf>,
    index_location: Option<String>,
    kv_url: Option<String>,
    calibration_dir: Option<PathBuf>,
    engine: Option<Arc<Engine>>,
    embedder: Option<Arc<Embedder>>,
    index: Option<Arc<dyn VectorIndex>>,
    kv: Option<Arc<KvStore>>,
}

impl PipelineBuilder {
    /// The settings.
    pub fn config(mut self, config: PipelineConfig) -> Self {
        self.config = config;
        self
    }

    /// How the engine loads the model (device, decode weights).
    pub fn engine_config(mut self, config: EngineConfig) -> Self {
        self.engine_config = config;
        self
    }

    /// The LLM: a llama-family GGUF file.
    pub fn model_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.model_path = Some(path.into());
        self
    }

    /// The embedding model's directory (all-MiniLM-L6-v2 layout).
    pub fn embedder_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.embedder_dir = Some(dir.into());
        self
    }

    /// The vector index: a directory (embedded Qdrant) or a Qdrant server URL.
    pub fn index_location(mut self, location: impl Into<String>) -> Self {
        self.index_location = Some(location.into());
        self
    }

    /// The KV store URL (`file://…`, `s3://…`, `memory://`).
    pub fn kv_url(mut self, url: impl Into<String>) -> Self {
        self.kv_url = Some(url.into());
        self
    }

    /// Where `ragcake calibrate` wrote attention corrections (one file per model
    /// fingerprint): the engine loaded from `model_path` applies its model's, if there is
    /// one, else the one bundled for it, if one ships (`None`: no correction). An engine
    /// given already loaded keeps its own.
    pub fn calibration_dir(mut self, dir: Option<PathBuf>) -> Self {
        self.calibration_dir = dir;
        self
    }

    /// An engine already loaded (instead of `model_path`).
    pub fn engine(mut self, engine: Arc<Engine>) -> Self {
        self.engine = Some(engine);
        self
    }

    /// An embedder already loaded (instead of `embedder_dir`).
    pub fn embedder(mut self, embedder: Arc<Embedder>) -> Self {
        self.embedder = Some(embedder);
        self
    }

    /// An index already open (instead of `index_location`).
    pub fn index(mut self, index: Arc<dyn VectorIndex>) -> Self {
        self.index = Some(index);
        self
    }

    /// A KV store already open (instead of `kv_url`).
    pub fn kv_store(mut self, kv: Arc<KvStore>) -> Self {
        self.kv = Some(kv);
        self
    }

    /// Loads what was given as paths, opens the index and the store, starts the scheduler
    /// and stacks the stages. Must run inside a tokio runtime.
    pub async fn build(self) -> Result<Pipeline> {
        let config = self.config;
        config.check()?;
        let missing = |what: &str| PipelineError::Config(format!("no {what} given"));
        let engine = match self.engine {
            Some(engine) => engine,
            None => {
                let path = self.model_path.ok_or_else(|| missing("model"))?;
                let engine_config = self.engine_config;
                let mut engine = blocking(move || Engine::load(&path, &engine_config)).await??;
                if let Some(dir) = &self.calibration_dir {
                    engine.load_calibration(dir)?;
                }
                Arc::new(engine)
            }
        };
        let embedder = match self.embedder {
            Some(embedder) => embedder,
            None => {
                let dir = self.embedder_dir.ok_or_else(|| missing("embedder"))?;
                Arc::new(blocking(move || Embedder::load(&dir)).await??)
            }
        };
        let index = match self.index {
            Some(index) => index,
            None => {
                let location = self.index_location.ok_or_else(|| missing("index"))?;
                ragcake_retriever::open_index(&location, &config.collection, embedder.dim())
                    .await
                    .map_err(PipelineError::from_retrieval)?
            }
        };
        let kv = match self.kv {
            Some(kv) => kv,
            None => {
                let url = self.kv_url.ok_or_else(|| missing("KV store"))?;
                let mut kv =
                    KvStore::open_for_engine_with(&url, &config.store, Vec::new(), &engine)?
                        .with_storage_dtype_for(CacheKind::Prefix, config.prefix_cache_dtype)
                        .with_storage_dtype_for(CacheKind::Chunk, config.chunk_cache_dtype);
                if config.memory_tier_bytes > 0 {
                    kv = kv.with_memory_tier(config.memory_tier_bytes);
                }
                Arc::new(kv)
            }
        };
        if kv.fingerprint() != engine.fingerprint() {
            return Err(PipelineError::Config(format!(
                "the KV store is for model {}, the engine runs {}",
                kv.fingerprint().short(),
                engine.fingerprint().short()
            )));
        }
        let retriever = Arc::new(
            Retriever::new(embedder, index, Some(engine.fingerprint().to_hex()))
                .map_err(PipelineError::from_retrieval)?,
        );
        let chunk_caches = match config.prompt.chunk_context(&engine) {
            Ok(context) => check_chunk_caches(&retriever, &kv, &context).await,
            Err(error) => ChunkCacheCheck::unchecked(&kv, error.to_string()),
        };
        if let Some(warning) = &chunk_caches.warning {
            tracing::warn!("{warning}");
        }
        let scheduler = Arc::new(EngineScheduler::start(
            engine.clone(),
            kv.clone(),
            config.scheduler.clone(),
        ));
        let metrics = Arc::new(Metrics::new());
        let stages = ServiceBuilder::new()
            .layer(RetrieveLayer::new(retriever.clone(), config.limits()))
            .layer(
                PlanLayer::new(
                    engine.clone(),
                    kv.clone(),
                    config.prompt.clone(),
                    config.write_back,
                )?
                .with_lookup_timeout(config.scheduler.lookup_timeout_secs),
            )
            .layer(PrefillLayer::new(scheduler.clone()))
            .service(Generate::new(engine.clone()));
        // Outside in: record metrics, refuse when the queue is full, bound the whole wait,
        // queue, bound the questions in flight.
        let service = ServiceBuilder::new()
            .layer(MetricsLayer::new(metrics.clone(), config.timeout_secs))
            .load_shed()
            .timeout(Duration::from_secs_f64(config.timeout_secs))
            .buffer(config.max_queue)
            .concurrency_limit(config.max_concurrent)
            .service(stages);
        Ok(Pipeline {
            service: BoxCloneSyncService::new(service),
            parts: Arc::new(Parts {
                engine,
                retriever,
                kv,
                scheduler,
                metrics,
                config,
                chunk_caches,
            }),
        })
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| PipelineError::Task(e.to_string()))
}

/// Chunks sampled from the index at start to compare their recorded chunk-cache keys with
/// the keys this service looks for.
const CHUNK_CACHE_SAMPLE: usize = 16;

/// Whether the chunk caches the index records are the ones this service will look for: a
/// service whose `chunk_cache_dtype` (or prompt preamble, compute dtype or device) differs
/// from what ingest used finds every chunk cache absent, and says so here instead of
/// silently computing everything.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChunkCacheCheck {
    /// Chunks sampled whose index entry records a chunk cache for this model.
    pub sampled: usize,
    /// Of those, the ones recorded under the key this service looks for.
    pub matching: usize,
    /// How this service looks chunk caches up (their storage dtype, part of the key).
    pub looked_up_as: ragcake_kvstore::StorageDtype,
    /// When some did not match: the storage dtype they were recorded in, if one of the
    /// others explains them (else their preamble, compute dtype or device differs).
    pub recorded_as: Option<ragcake_kvstore::StorageDtype>,
    /// What is wrong, when something is.
    pub warning: Option<String>,
}

impl ChunkCacheCheck {
    fn unchecked(kv: &KvStore, why: String) -> Self {
        Self {
            sampled: 0,
            matching: 0,
            looked_up_as: kv.storage_dtype(CacheKind::Chunk),
            recorded_as: None,
            warning: Some(format!("chunk caches not checked: {why}")),
        }
    }
}

/// Samples the index (the chunks nearest a neutral query) and checks each recorded chunk
/// cache key against the one `kv` derives for it after `context`.
async fn check_chunk_caches(
    retriever: &Retriever,
    kv: &KvStore,
    context: &[u32],
) -> ChunkCacheCheck {
    use ragcake_scheduler::LoadBackend;
    let looked_up_as = kv.storage_dtype(CacheKind::Chunk);
    let sample = async {
        let vector = retriever
            .embedder()
            .embed_one("overview")
            .map_err(|e| e.to_string())?;
        retriever
            .index()
            .search(&vector, CHUNK_CACHE_SAMPLE)
            .await
            .map_err(|e| e.to_string())
    };
    let sample = match tokio::time::timeout(Duration::from_secs(10), sample).await {
        Ok(Ok(sample)) => sample,
        Ok(Err(error)) => return ChunkCacheCheck::unchecked(kv, error),
        Err(_) => return ChunkCacheCheck::unchecked(kv, "the index did not answer in 10 s".into()),
    };
    let recorded: Vec<_> = sample
        .into_iter()
        .map(|scored| scored.chunk)
        .filter(|chunk| retriever.cache_status(chunk).is_stored())
        .collect();
    let matching = recorded
        .iter()
        .filter(|c| kv.chunk_key(context, &c.token_ids).to_hex() == c.kv_key)
        .count();
    let mut check = ChunkCacheCheck {
        sampled: recorded.len(),
        matching,
        looked_up_as,
        recorded_as: None,
        warning: None,
    };
    if matching == recorded.len() {
        return check;
    }
    let other = recorded
        .iter()
        .find(|c| kv.chunk_key(context, &c.token_ids).to_hex() != c.kv_key);
    check.recorded_as = other.and_then(|c| {
        ragcake_kvstore::StorageDtype::ALL
            .into_iter()
            .find(|&dtype| {
                kv.chunk_key_stored_as(dtype, context, &c.token_ids)
                    .to_hex()
                    == c.kv_key
            })
    });
    let why = match check.recorded_as {
        Some(dtype) => format!(
            "they were stored as {} and this service looks for {} (set pipeline.chunk_cache_dtype = \"{}\", or ingest again)",
            dtype,
            looked_up_as,
            dtype
        ),
        None => "they were computed after another preamble, in another compute dtype or on another kind of device (ingest again with this service's configuration)".into(),
    };
    check.warning = Some(format!(
        "{} of {} sampled chunks record a chunk cache this service will not look for, so it will compute them: {why}",
        recorded.len() - matching,
        recorded.len()
    ));
    check
}

struct Parts {
    engine: Arc<Engine>,
    retriever: Arc<Retriever>,
    kv: Arc<KvStore>,
    scheduler: Arc<EngineScheduler>,
    metrics: Arc<Metrics>,
    config: PipelineConfig,
    /// What the start-up check found of the index's recorded chunk caches.
    chunk_caches: ChunkCacheCheck,
}

/// A question-answering pipeline: retrieval, cache-aware planning, bidirectional prefill
/// and generation. Cheap to clone; clones share the scheduler and the queue.
#[derive(Clone)]
pub struct Pipeline {
    service: BoxCloneSyncService<Ask, Answer, PipelineError>,
    parts: Arc<Parts>,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("model", &self.parts.engine.path())
            .field("config", &self.parts.config)
            .finish_non_exhaustive()
    }
}

/// What [`Pipeline::health`] found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Health {
    /// Everything needed to answer is reachable.
    pub ok: bool,
    /// Whether the index answers.
    pub index: IndexHealth,
    /// Questions being answered now.
    pub in_flight: u64,
    /// The scheduler: its compute worker, queue and write-back backlog.
    pub scheduler: SchedulerHealth,
    /// Whether the index's recorded chunk caches are the ones this service looks for
    /// (checked at start).
    pub chunk_caches: ChunkCacheCheck,
}

/// The index's part of [`Health`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum IndexHealth {
    /// It answers, holding this many chunks.
    Up {
        /// Chunks in the index.
        chunks: usize,
    },
    /// It cannot be reached.
    Down {
        /// What the index said.
        error: String,
    },
}

/// The scheduler's part of [`Health`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SchedulerHealth {
    /// The compute worker is running.
    pub worker_alive: bool,
    /// Times it panicked in a step and was restarted.
    pub worker_restarts: u64,
    /// Prefills admitted and not finished (the compute worker's queue).
    pub queued_prefills: u64,
    /// Sequences decoding.
    pub decoding: u64,
    /// Bytes of KV waiting to be written back.
    pub write_back_pending_bytes: u64,
    /// Write-backs dropped because the queue was full, since start.
    pub write_backs_dropped: u64,
}

impl Pipeline {
    /// A builder.
    pub fn builder() -> PipelineBuilder {
        PipelineBuilder::default()
    }

    /// Answers `request`.
    pub async fn ask(&self, request: AskRequest) -> Result<Answer> {
        self.service.clone().oneshot(Ask::new(request)).await
    }

    /// Answers `request` as a stream: the sources, the text as it is generated, then the
    /// whole answer. Dropping the stream cancels the question (its prefill and decode stop).
    pub fn ask_stream(
        &self,
        request: AskRequest,
    ) -> impl Stream<Item = Result<StreamEvent>> + Send + 'static {
        let (events, receiver) = mpsc::unbounded_channel();
        let ask = Ask {
            stream: Some(events),
            ..Ask::new(request)
        };
        let service = self.service.clone();
        let task = tokio::spawn(async move { service.oneshot(ask).await.err() });
        let state = StreamState {
            receiver,
            task: Some(task),
        };
        futures::stream::unfold(state, |mut state| async move {
            if let Some(event) = state.receiver.recv().await {
                return Some((Ok(event), state));
            }
            // Every sender is gone: the question ended; report its error, if any.
            let task = state.task.take()?;
            match task.await {
                Ok(None) => None,
                Ok(Some(error)) => Some((Err(error), state)),
                Err(join) => Some((Err(PipelineError::Task(join.to_string())), state)),
            }
        })
    }

    /// The service behind [`Pipeline::ask`], to wrap in more layers.
    pub fn service(&self) -> BoxCloneSyncService<Ask, Answer, PipelineError> {
        self.service.clone()
    }

    /// Whether the index answers, and how busy the pipeline is.
    pub async fn health(&self) -> Health {
        let index = match self.parts.retriever.index().count().await {
            Ok(chunks) => IndexHealth::Up { chunks },
            Err(error) => IndexHealth::Down {
                error: error.to_string(),
            },
        };
        let stats = self.parts.scheduler.stats();
        Health {
            ok: matches!(index, IndexHealth::Up { .. }) && stats.worker_alive,
            index,
            in_flight: stats.in_flight,
            scheduler: SchedulerHealth {
                worker_alive: stats.worker_alive,
                worker_restarts: stats.worker_restarts,
                queued_prefills: stats.in_flight,
                decoding: stats.decoding,
                write_back_pending_bytes: stats.write_back_pending_bytes,
                write_backs_dropped: stats.write_backs_dropped,
            },
            chunk_caches: self.parts.chunk_caches.clone(),
        }
    }

    /// The engine.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.parts.engine
    }

    /// The retriever.
    pub fn retriever(&self) -> &Arc<Retriever> {
        &self.parts.retriever
    }

    /// The KV store.
    pub fn kv(&self) -> &Arc<KvStore> {
        &self.parts.kv
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.parts.metrics
    }

    /// The scheduler's counters.
    pub fn scheduler_stats(&self) -> SchedulerStats {
        self.parts.scheduler.stats()
    }

    /// Waits until every write-back queued so far is finished (written, found already
    /// stored, or failed), or until `timeout` has passed; `progress` sees the scheduler's
    /// counters every 100 ms meanwhile. Returns the bytes still waiting (0: all finished).
    /// A process about to exit calls it, else its queued write-backs are lost with it.
    pub async fn finish_write_backs(
        &self,
        timeout: Duration,
        mut progress: impl FnMut(&SchedulerStats),
    ) -> u64 {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let stats = self.scheduler_stats();
            if stats.write_back_pending_bytes == 0 {
                return 0;
            }
            if tokio::time::Instant::now() >= deadline {
                return stats.write_back_pending_bytes;
            }
            progress(&stats);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The metrics in the Prometheus (OpenMetrics) text format, the scheduler's counters
    /// brought up to date first.
    pub fn metrics_text(&self) -> String {
        self.parts
            .metrics
            .observe_scheduler(&self.scheduler_stats());
        self.parts.metrics.encode()
    }

    /// The settings it was built with.
    pub fn config(&self) -> &PipelineConfig {
        &self.parts.config
    }

    /// What the start-up check found of the index's recorded chunk caches.
    pub fn chunk_cache_check(&self) -> &ChunkCacheCheck {
        &self.parts.chunk_caches
    }
}

/// A streaming ask in progress: aborting its task when the stream is dropped cancels it.
struct StreamState {
    receiver: mpsc::UnboundedReceiver<StreamEvent>,
    task: Option<tokio::task::JoinHandle<Option<PipelineError>>>,
}

impl Drop for StreamState {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}
