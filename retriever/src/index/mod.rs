//! The vector index: chunks with their embeddings, searched by cosine similarity.
//!
//! One small trait, [`VectorIndex`], and two backends that pass the same conformance
//! tests: [`EdgeIndex`] (embedded Qdrant in a local directory, the default) and
//! [`QdrantServerIndex`] (a Qdrant server through its gRPC client).

mod edge;
mod server;

use std::fmt;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub use edge::EdgeIndex;
pub use server::QdrantServerIndex;

use crate::error::{Result, RetrieverError};

/// A chunk's identity: 16 bytes derived from its document, position and text, so the
/// same chunk of the same document gets the same id on every run and machine. Written as
/// a UUID (the form both Qdrant backends take as a point id).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; 16]);

impl ChunkId {
    /// The id of chunk `chunk_no` of `doc_id` with text `text`.
    pub fn new(doc_id: &str, chunk_no: u32, text: &str) -> Self {
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"ragcake-chunk-id-v1\0");
        hasher.update(&(doc_id.len() as u64).to_le_bytes());
        hasher.update(doc_id.as_bytes());
        hasher.update(&chunk_no.to_le_bytes());
        hasher.update(text.as_bytes());
        let mut id = [0u8; 16];
        id.copy_from_slice(&hasher.finalize().as_bytes()[..16]);
        Self(id)
    }

    /// Parses the UUID form.
    pub fn parse(s: &str) -> Option<Self> {
        let hex: String = s.chars().filter(|&c| c != '-').collect();
        if hex.len() != 32 {
            return None;
        }
        let mut id = [0u8; 16];
        for (i, byte) in id.iter_mut().enumerate() {
            *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(Self(id))
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, byte) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

/// A chunk as the index keeps it (the point's payload).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IndexedChunk {
    /// The point id.
    #[serde(skip)]
    pub id: Option<ChunkId>,
    /// The document: its path relative to the ingested root.
    pub doc_id: String,
    /// Position of the chunk in its document.
    pub chunk_no: u32,
    /// The chunk's text.
    pub text: String,
    /// Token count of the text for the LLM below.
    pub token_count: usize,
    /// The text's token ids for that LLM (so the engine computes exactly what is cached).
    pub token_ids: Vec<u32>,
    /// The file it came from, as given to the ingest job.
    pub source: String,
    /// Fingerprint of the LLM whose tokenizer made `token_ids` (hex).
    pub llm: String,
    /// Key of the chunk's position-independent KV cache for that LLM (hex), set once the
    /// precompute job has stored it; empty when no cache was stored. Retrieval reads the
    /// cache status from it instead of asking the store.
    #[serde(default)]
    pub kv_key: String,
    /// blake3 of the whole document's text (hex): a changed document is re-ingested.
    pub doc_hash: String,
}

impl IndexedChunk {
    /// The point id; every chunk read from an index has one.
    pub fn chunk_id(&self) -> ChunkId {
        self.id
            .unwrap_or_else(|| ChunkId::new(&self.doc_id, self.chunk_no, &self.text))
    }

    pub(crate) fn to_payload(&self) -> serde_json::Map<String, serde_json::Value> {
        match serde_json::to_value(self) {
            Ok(serde_json::Value::Object(map)) => map,
            // A struct of strings and numbers always serializes to an object.
            _ => serde_json::Map::new(),
        }
    }

    pub(crate) fn from_payload(id: ChunkId, payload: serde_json::Value) -> Result<Self> {
        let mut chunk: Self =
            serde_json::from_value(payload).map_err(|_| RetrieverError::Payload {
                id: id.to_string(),
                field: "chunk fields",
            })?;
        chunk.id = Some(id);
        Ok(chunk)
    }
}

/// A chunk and its embedding, to upsert.
#[derive(Debug, Clone, PartialEq)]
pub struct IndexPoint {
    /// The chunk.
    pub chunk: IndexedChunk,
    /// Its embedding (unit length).
    pub vector: Vec<f32>,
}

/// A search hit.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoredChunk {
    /// The chunk.
    pub chunk: IndexedChunk,
    /// Cosine similarity to the query.
    pub score: f32,
}

/// A store of chunk embeddings searched by cosine similarity.
#[async_trait]
pub trait VectorIndex: Send + Sync + fmt::Debug {
    /// Length of the vectors it holds.
    fn dim(&self) -> usize;

    /// Inserts or replaces points (by chunk id). Durable when it returns.
    async fn upsert(&self, points: Vec<IndexPoint>) -> Result<()>;

    /// The `limit` chunks most similar to `vector`, best first.
    async fn search(&self, vector: &[f32], limit: usize) -> Result<Vec<ScoredChunk>>;

    /// The chunks with these ids that exist (in no particular order).
    async fn get(&self, ids: &[ChunkId]) -> Result<Vec<IndexedChunk>>;

    /// Up to `limit` chunks of the document `doc_id` (in no particular order).
    async fn doc_chunks(&self, doc_id: &str, limit: usize) -> Result<Vec<IndexedChunk>>;

    /// Deletes the chunks of `doc_id` whose ids are not in `keep` (a document that changed
    /// leaves no stale chunks behind).
    async fn delete_doc_except(&self, doc_id: &str, keep: &[ChunkId]) -> Result<()>;

    /// Number of chunks.
    async fn count(&self) -> Result<usize>;
}

/// An index backend's error, as text.
pub(crate) fn index_error(e: impl fmt::Display) -> RetrieverError {
    RetrieverError::Index(e.to_string())
}

/// Checks a vector's length against the index's.
pub(crate) fn check_dim(expected: usize, vector: &[f32]) -> Result<()> {
    if vector.len() != expected {
        return Err(RetrieverError::DimensionMismatch {
            expected,
            found: vector.len(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_ids_are_stable_and_round_trip_as_uuids() {
        let id = ChunkId::new("docs/a.md", 3, "text");
        assert_eq!(id, ChunkId::new("docs/a.md", 3, "text"));
        assert_ne!(id, ChunkId::new("docs/a.md", 4, "text"));
        assert_ne!(id, ChunkId::new("docs/b.md", 3, "text"));
        let uuid = id.to_string();
        assert_eq!(uuid.len(), 36);
        assert_eq!(ChunkId::parse(&uuid), Some(id));
        assert_eq!(ChunkId::parse("not-a-uuid"), None);
    }
}
