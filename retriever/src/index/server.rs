//! A Qdrant server (or cluster) through the official gRPC client.

use async_trait::async_trait;
use qdrant_client::Payload;
use qdrant_client::Qdrant;
use qdrant_client::qdrant::point_id::PointIdOptions;
use qdrant_client::qdrant::vectors_config::Config as VectorsConfigKind;
use qdrant_client::qdrant::{
    Condition, CountPointsBuilder, CreateCollectionBuilder, CreateFieldIndexCollectionBuilder,
    DeletePointsBuilder, Distance, FieldType, Filter, GetPointsBuilder, PointId, PointStruct,
    Query, QueryPointsBuilder, ScrollPointsBuilder, UpsertPointsBuilder, VectorParamsBuilder,
};

use super::{ChunkId, IndexPoint, IndexedChunk, ScoredChunk, VectorIndex, check_dim, index_error};
use crate::error::{Result, RetrieverError};

/// A collection on a Qdrant server.
pub struct QdrantServerIndex {
    client: Qdrant,
    collection: String,
    dim: usize,
}

impl std::fmt::Debug for QdrantServerIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QdrantServerIndex")
            .field("collection", &self.collection)
            .field("dim", &self.dim)
            .finish_non_exhaustive()
    }
}

impl QdrantServerIndex {
    /// Connects to the server at `url` (gRPC, e.g. `http://localhost:6334`; the API key from
    /// `QDRANT_API_KEY` when set) and opens `collection`, creating it (cosine, `dim`-long
    /// vectors, a keyword index on `doc_id`) when it does not exist.
    pub async fn connect(url: &str, collection: &str, dim: usize) -> Result<Self> {
        let mut builder = Qdrant::from_url(url).skip_compatibility_check();
        if let Ok(key) = std::env::var("QDRANT_API_KEY")
            && !key.is_empty()
        {
            builder = builder.api_key(key);
        }
        let client = builder.build().map_err(index_error)?;
        let exists = client
            .collection_exists(collection)
            .await
            .map_err(|e| RetrieverError::Index(format!("Qdrant at {url}: {e}")))?;
        if exists {
            let info = client
                .collection_info(collection)
                .await
                .map_err(index_error)?;
            let found = info
                .result
                .and_then(|i| i.config)
                .and_then(|c| c.params)
                .and_then(|p| p.vectors_config)
                .and_then(|v| v.config)
                .and_then(|c| match c {
                    VectorsConfigKind::Params(p) => Some(p.size as usize),
                    VectorsConfigKind::ParamsMap(_) => None,
                })
                .ok_or_else(|| {
                    RetrieverError::Index(format!(
                        "collection {collection} has no single unnamed vector"
                    ))
                })?;
            if found != dim {
                return Err(RetrieverError::DimensionMismatch {
                    expected: dim,
                    found,
                });
            }
        } else {
            client
                .create_collection(
                    CreateCollectionBuilder::new(collection)
                        .vectors_config(VectorParamsBuilder::new(dim as u64, Distance::Cosine)),
                )
                .await
                .map_err(index_error)?;
            client
                .create_field_index(
                    CreateFieldIndexCollectionBuilder::new(
                        collection,
                        "doc_id",
                        FieldType::Keyword,
                    )
                    .wait(true),
                )
                .await
                .map_err(index_error)?;
        }
        Ok(Self {
            client,
            collection: collection.to_string(),
            dim,
        })
    }

    /// Deletes the collection (tests and re-ingests from scratch).
    pub async fn drop_collection(self) -> Result<()> {
        self.client
            .delete_collection(&self.collection)
            .await
            .map_err(index_error)?;
        Ok(())
    }
}

fn point_id(id: ChunkId) -> PointId {
    PointId::from(id.to_string())
}

fn chunk_of(
    id: Option<PointId>,
    payload: std::collections::HashMap<String, qdrant_client::qdrant::Value>,
) -> Result<IndexedChunk> {
    let id = match id.and_then(|p| p.point_id_options) {
        Some(PointIdOptions::Uuid(uuid)) => ChunkId::parse(&uuid),
        _ => None,
    }
    .ok_or_else(|| RetrieverError::Index("a point without a ragcake (UUID) id".into()))?;
    IndexedChunk::from_payload(id, serde_json::Value::from(Payload::from(payload)))
}

#[async_trait]
impl VectorIndex for QdrantServerIndex {
    fn dim(&self) -> usize {
        self.dim
    }

    async fn upsert(&self, points: Vec<IndexPoint>) -> Result<()> {
        if points.is_empty() {
            return Ok(());
        }
        let mut structs = Vec::with_capacity(points.len());
        for point in points {
            check_dim(self.dim, &point.vector)?;
            let payload = Payload::try_from(serde_json::Value::Object(point.chunk.to_payload()))
                .map_err(index_error)?;
            structs.push(PointStruct::new(
                point_id(point.chunk.chunk_id()),
                point.vector,
                payload,
            ));
        }
        self.client
            .upsert_points(UpsertPointsBuilder::new(&self.collection, structs).wait(true))
            .await
            .map_err(index_error)?;
        Ok(())
    }

    async fn search(&self, vector: &[f32], limit: usize) -> Result<Vec<ScoredChunk>> {
        check_dim(self.dim, vector)?;
        if limit == 0 {
            return Ok(Vec::new());
        }
        let response = self
            .client
            .query(
                QueryPointsBuilder::new(&self.collection)
                    .query(Query::new_nearest(vector.to_vec()))
                    .limit(limit as u64)
                    .with_payload(true),
            )
            .await
            .map_err(index_error)?;
        response
            .result
            .into_iter()
            .map(|hit| {
                Ok(ScoredChunk {
                    chunk: chunk_of(hit.id, hit.payload)?,
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
        let response = self
            .client
            .get_points(GetPointsBuilder::new(&self.collection, ids).with_payload(true))
            .await
            .map_err(index_error)?;
        response
            .result
            .into_iter()
            .map(|p| chunk_of(p.id, p.payload))
            .collect()
    }

    async fn doc_chunks(&self, doc_id: &str, limit: usize) -> Result<Vec<IndexedChunk>> {
        let filter = Filter::must([Condition::matches("doc_id", doc_id.to_string())]);
        let response = self
            .client
            .scroll(
                ScrollPointsBuilder::new(&self.collection)
                    .filter(filter)
                    .limit(limit.max(1) as u32)
                    .with_payload(true),
            )
            .await
            .map_err(index_error)?;
        response
            .result
            .into_iter()
            .map(|p| chunk_of(p.id, p.payload))
            .collect()
    }

    async fn delete_doc_except(&self, doc_id: &str, keep: &[ChunkId]) -> Result<()> {
        let mut filter = Filter::must([Condition::matches("doc_id", doc_id.to_string())]);
        if !keep.is_empty() {
            filter.must_not = vec![Condition::has_id(keep.iter().copied().map(point_id))];
        }
        self.client
            .delete_points(
                DeletePointsBuilder::new(&self.collection)
                    .points(filter)
                    .wait(true),
            )
            .await
            .map_err(index_error)?;
        Ok(())
    }

    async fn count(&self) -> Result<usize> {
        let response = self
            .client
            .count(CountPointsBuilder::new(&self.collection).exact(true))
            .await
            .map_err(index_error)?;
        Ok(response.result.map_or(0, |r| r.count as usize))
    }
}
