//! Embedded Qdrant (`qdrant-edge`): the index lives in a local directory, in process.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use qdrant_edge::external::uuid::Uuid;
use qdrant_edge::{
    Condition, CountRequest, DEFAULT_VECTOR_NAME, Distance, EdgeConfigBuilder, EdgeShard,
    EdgeVectorParamsBuilder, FieldCondition, Filter, HasIdCondition, JsonPath, Match, NamedQuery,
    Payload, PointId, PointInsertOperations, PointOperations, PointStructPersisted, QueryEnum,
    QueryRequest, ScoringQuery, ScrollRequest, UpdateOperation, VectorStructPersisted,
    WithPayloadInterface, WithVector,
};

use super::{ChunkId, IndexPoint, IndexedChunk, ScoredChunk, VectorIndex, check_dim, index_error};
use crate::error::{Result, RetrieverError};

/// Points of the document `doc_id`.
fn doc_filter(doc_id: &str) -> Result<Filter> {
    Ok(Filter::new_must(Condition::Field(
        FieldCondition::new_match(
            "doc_id"
                .parse::<JsonPath>()
                .map_err(|_| RetrieverError::Index("bad payload path".into()))?,
            Match::from(doc_id.to_string()),
        ),
    )))
}

/// The file qdrant-edge keeps its configuration in (present once a shard exists).
const EDGE_CONFIG_FILE: &str = "edge_config.json";

/// Embedded Qdrant in a directory. One process at a time may open a directory.
#[derive(Clone)]
pub struct EdgeIndex {
    /// Writes (an update and its flush) hold the lock exclusively: the shard's flush
    /// expects no operation in flight beside it.
    shard: Arc<RwLock<EdgeShard>>,
    dim: usize,
    path: PathBuf,
}

impl std::fmt::Debug for EdgeIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EdgeIndex({}, {} dims)", self.path.display(), self.dim)
    }
}

impl EdgeIndex {
    /// Opens the index in `dir`, creating it (cosine distance, `dim`-long vectors) when the
    /// directory holds none. An existing index with another vector length is an error.
    pub fn open(dir: &Path, dim: usize) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|source| RetrieverError::Io {
            path: dir.display().to_string(),
            source,
        })?;
        let in_use = |e: qdrant_edge::OperationError| {
            let message = e.to_string();
            if message.contains("WouldBlock") {
                RetrieverError::Index(format!(
                    "{} is already open (by this or another process): one handle at a time",
                    dir.display()
                ))
            } else {
                RetrieverError::Index(message)
            }
        };
        let shard = if dir.join(EDGE_CONFIG_FILE).is_file() {
            let shard = EdgeShard::load(dir, None).map_err(in_use)?;
            let found = shard
                .config()
                .vectors
                .get(DEFAULT_VECTOR_NAME)
                .map(|v| v.size)
                .ok_or_else(|| {
                    RetrieverError::Index(format!(
                        "{} holds no default dense vector",
                        dir.display()
                    ))
                })?;
            if found != dim {
                return Err(RetrieverError::DimensionMismatch {
                    expected: dim,
                    found,
                });
            }
            shard
        } else {
            let config = EdgeConfigBuilder::new()
                .vector(
                    DEFAULT_VECTOR_NAME,
                    EdgeVectorParamsBuilder::new(dim, Distance::Cosine).build(),
                )
                .build();
            EdgeShard::new(dir, config).map_err(in_use)?
        };
        Ok(Self {
            shard: Arc::new(RwLock::new(shard)),
            dim,
            path: dir.to_path_buf(),
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs a blocking read of the shard off the async threads.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&EdgeShard) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let shard = self.shard.clone();
        tokio::task::spawn_blocking(move || {
            let guard = shard.read().unwrap_or_else(|p| p.into_inner());
            f(&guard)
        })
        .await
        .map_err(|e| RetrieverError::Index(format!("index task failed: {e}")))?
    }

    /// Applies an update and flushes it (durable on return), alone.
    async fn write(&self, operation: UpdateOperation) -> Result<()> {
        let shard = self.shard.clone();
        tokio::task::spawn_blocking(move || {
            let guard = shard.write().unwrap_or_else(|p| p.into_inner());
            guard.update(operation).map_err(index_error)?;
            guard.flush();
            Ok(())
        })
        .await
        .map_err(|e| RetrieverError::Index(format!("index task failed: {e}")))?
    }
}

fn point_id(id: ChunkId) -> PointId {
    PointId::Uuid(Uuid::from_bytes(id.0))
}

fn chunk_id(id: &PointId) -> Result<ChunkId> {
    match id {
        PointId::Uuid(uuid) => Ok(ChunkId(*uuid.as_bytes())),
        PointId::NumId(n) => Err(RetrieverError::Index(format!(
            "point {n} was not written by ragcake (numeric id)"
        ))),
    }
}

fn chunk_of(id: &PointId, payload: Option<Payload>) -> Result<IndexedChunk> {
    let id = chunk_id(id)?;
    let payload = payload.ok_or_else(|| RetrieverError::Payload {
        id: id.to_string(),
        field: "payload",
    })?;
    IndexedChunk::from_payload(
        id,
        serde_json::Value::Object(payload.0.into_iter().collect()),
    )
}

#[async_trait]
impl VectorIndex for EdgeIndex {
    fn dim(&self) -> usize {
        self.dim
    }

    async fn upsert(&self, points: Vec<IndexPoint>) -> Result<()> {
        if points.is_empty() {
            return Ok(());
        }
        let mut persisted = Vec::with_capacity(points.len());
        for point in points {
            check_dim(self.dim, &point.vector)?;
            let map = point.chunk.to_payload();
            persisted.push(PointStructPersisted {
                id: point_id(point.chunk.chunk_id()),
                vector: VectorStructPersisted::Single(point.vector),
                payload: Some(Payload(map.into_iter().collect())),
            });
        }
        // Durable on return: a killed ingest keeps what it reported as done.
        self.write(UpdateOperation::PointOperation(
            PointOperations::UpsertPoints(PointInsertOperations::PointsList(persisted)),
        ))
        .await
    }

    async fn search(&self, vector: &[f32], limit: usize) -> Result<Vec<ScoredChunk>> {
        check_dim(self.dim, vector)?;
        if limit == 0 {
            return Ok(Vec::new());
        }
        let request = QueryRequest {
            prefetches: Vec::new(),
            query: Some(ScoringQuery::Vector(QueryEnum::Nearest(
                NamedQuery::default_dense(vector.to_vec()),
            ))),
            filter: None,
            score_threshold: None,
            limit,
            offset: 0,
            params: None,
            with_vector: WithVector::Bool(false),
            with_payload: WithPayloadInterface::Bool(true),
        };
        let hits = self
            .read(move |shard| shard.query(request).map_err(index_error))
            .await?;
        hits.into_iter()
            .map(|hit| {
                Ok(ScoredChunk {
                    chunk: chunk_of(&hit.id, hit.payload)?,
                    score: hit.score,
                })
            })
            .collect()
    }

    async fn get(&self, ids: &[ChunkId]) -> Result<Vec<IndexedChunk>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<PointId> = ids.iter().copied().map(point_id).collect();
        let records = self
            .read(move |shard| {
                shard
                    .retrieve(&ids, Some(WithPayloadInterface::Bool(true)), None)
                    .map_err(index_error)
            })
            .await?;
        records
            .into_iter()
            .map(|r| chunk_of(&r.id, r.payload))
            .collect()
    }

    async fn doc_chunks(&self, doc_id: &str, limit: usize) -> Result<Vec<IndexedChunk>> {
        let request = ScrollRequest {
            limit: Some(limit.max(1)),
            filter: Some(doc_filter(doc_id)?),
            with_payload: Some(WithPayloadInterface::Bool(true)),
            with_vector: WithVector::Bool(false),
            ..ScrollRequest::default()
        };
        let (records, _) = self
            .read(move |shard| shard.scroll(request).map_err(index_error))
            .await?;
        records
            .into_iter()
            .map(|r| chunk_of(&r.id, r.payload))
            .collect()
    }

    async fn delete_doc_except(&self, doc_id: &str, keep: &[ChunkId]) -> Result<()> {
        let mut filter = doc_filter(doc_id)?;
        if !keep.is_empty() {
            let keep: HasIdCondition = keep.iter().copied().map(point_id).collect();
            filter.must_not = Some(vec![Condition::HasId(keep)]);
        }
        self.write(UpdateOperation::PointOperation(
            PointOperations::DeletePointsByFilter(filter),
        ))
        .await
    }

    async fn count(&self) -> Result<usize> {
        self.read(|shard| {
            shard
                .count(CountRequest {
                    filter: None,
                    exact: true,
                })
                .map_err(index_error)
        })
        .await
    }
}
