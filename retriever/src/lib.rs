//! ragcake's retriever: documents split into chunks on the LLM's tokens, embedded with
//! all-MiniLM-L6-v2 on candle, indexed in Qdrant (embedded or server), and cache-aware
//! retrieval. It needs neither the engine nor the KV store: the chunker takes any
//! tokenizer, and a chunk's cache status is what the precompute job recorded in the index.
//!
//! - [`chunker`]: token-bounded chunks on paragraph, sentence and word borders.
//! - [`embedder`]: sentence embeddings (BERT, mean pooling, L2 normalised).
//! - [`index`]: the [`VectorIndex`] trait, [`EdgeIndex`] and [`QdrantServerIndex`].
//! - [`retrieve`]: question → ranked, ordered chunks with their cache status.
//! - [`eval`]: labelled questions, their calibration/evaluation split, recall@k and
//!   answer metrics (exact match, token F1, the labelled fact stated).

pub mod chunker;
pub mod embedder;
pub mod error;
pub mod eval;
pub mod index;
pub mod retrieve;

pub use chunker::{Chunker, DEFAULT_CHUNK_TOKENS, TextChunk, Tokenize, TokenizeError};
pub use embedder::Embedder;
pub use error::{Result, RetrieverError};
pub use eval::{LabelledQuestion, QuestionSet, Split};
pub use index::{
    ChunkId, EdgeIndex, IndexPoint, IndexedChunk, QdrantServerIndex, ScoredChunk, VectorIndex,
};
pub use retrieve::{
    CacheStatus, ChunkOrder, DEFAULT_TOP_K, Retrieval, RetrieveOptions, RetrievedChunk, Retriever,
};

/// Opens the vector index named by `location`: a Qdrant server URL (`http://…`,
/// `https://…`; collection `collection`), or else a directory for embedded Qdrant.
pub async fn open_index(
    location: &str,
    collection: &str,
    dim: usize,
) -> Result<std::sync::Arc<dyn VectorIndex>> {
    if location.starts_with("http://") || location.starts_with("https://") {
        Ok(std::sync::Arc::new(
            QdrantServerIndex::connect(location, collection, dim).await?,
        ))
    } else {
        let dir = location.strip_prefix("file://").unwrap_or(location);
        Ok(std::sync::Arc::new(EdgeIndex::open(
            std::path::Path::new(dir),
            dim,
        )?))
    }
}
