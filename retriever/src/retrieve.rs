//! Cache-aware retrieval: embed the question, search the index, read each hit's cache status
//! from its payload (what the precompute job stored; no store request), and rank and order
//! the chunks for the bidirectional prefill.

use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::embedder::Embedder;
use crate::error::{Result, RetrieverError};
use crate::index::{IndexedChunk, VectorIndex};

/// Where the retrieved chunks go in the prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ChunkOrder {
    /// Most relevant first.
    #[default]
    Relevance,
    /// Chunks without a stored cache first, cached ones last (each group by relevance):
    /// the compute worker takes the uncached ones from the front while the loader fetches
    /// the cached ones from the back.
    CachedLast,
}

/// How to retrieve.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RetrieveOptions {
    /// Chunks to return.
    pub top_k: usize,
    /// Hits fetched from the index before re-ranking (at least `top_k`).
    pub candidates: usize,
    /// A cached chunk ranks above an uncached one whose score is higher by less than this
    /// (0 = rank by score alone).
    pub prefer_cached_within: f32,
    /// Order of the chunks in the prompt.
    pub order: ChunkOrder,
}

/// Chunks retrieved into a prompt unless a request says otherwise.
pub const DEFAULT_TOP_K: usize = 3;

impl RetrieveOptions {
    /// The options for `top_k` chunks: twice as many candidates (at least 8) for re-ranking,
    /// ranked by score alone, in relevance order.
    pub fn for_top_k(top_k: usize) -> Self {
        Self {
            top_k,
            candidates: (top_k * 2).max(8),
            prefer_cached_within: 0.0,
            order: ChunkOrder::Relevance,
        }
    }
}

impl Default for RetrieveOptions {
    fn default() -> Self {
        Self::for_top_k(DEFAULT_TOP_K)
    }
}

/// Whether a chunk's position-independent KV cache is stored, as the precompute job recorded
/// it in the chunk's payload (a load verifies it; a cache lost since is a counted miss).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "status")]
pub enum CacheStatus {
    /// The precompute job stored the chunk's cache for this LLM.
    Stored,
    /// None recorded (or the retriever serves no LLM).
    Absent,
    /// The chunk was tokenized for another LLM: its stored cache (if any) is not usable by
    /// this one, and its text must be tokenized again.
    OtherModel,
}

impl CacheStatus {
    /// Whether the cache can be loaded.
    pub fn is_stored(&self) -> bool {
        matches!(self, Self::Stored)
    }
}

/// One retrieved chunk.
#[derive(Debug, Clone, PartialEq)]
pub struct RetrievedChunk {
    /// The chunk.
    pub chunk: IndexedChunk,
    /// Cosine similarity to the question.
    pub score: f32,
    /// Its KV cache.
    pub cache: CacheStatus,
}

/// What a retrieval returned, and where its time went.
#[derive(Debug, Clone, PartialEq)]
pub struct Retrieval {
    /// The chunks, in prompt order.
    pub chunks: Vec<RetrievedChunk>,
    /// Seconds embedding the question.
    pub embed_secs: f64,
    /// Seconds searching the index.
    pub search_secs: f64,
}

/// Embedder + index: questions in, ranked chunks out.
#[derive(Debug, Clone)]
pub struct Retriever {
    embedder: Arc<Embedder>,
    index: Arc<dyn VectorIndex>,
    llm: Option<String>,
}

impl Retriever {
    /// A retriever over `index`, whose vectors `embedder` made, for the LLM whose
    /// fingerprint (hex) is `llm`: a chunk's cache counts as stored when the precompute job
    /// recorded one for that LLM. Without an LLM, every chunk is `Absent`.
    pub fn new(
        embedder: Arc<Embedder>,
        index: Arc<dyn VectorIndex>,
        llm: Option<String>,
    ) -> Result<Self> {
        if embedder.dim() != index.dim() {
            return Err(RetrieverError::DimensionMismatch {
                expected: embedder.dim(),
                found: index.dim(),
            });
        }
        Ok(Self {
            embedder,
            index,
            llm,
        })
    }

    /// The embedder.
    pub fn embedder(&self) -> &Arc<Embedder> {
        &self.embedder
    }

    /// The index.
    pub fn index(&self) -> &Arc<dyn VectorIndex> {
        &self.index
    }

    /// Retrieves the chunks for `question`.
    pub async fn retrieve(&self, question: &str, options: &RetrieveOptions) -> Result<Retrieval> {
        let started = Instant::now();
        let embedder = self.embedder.clone();
        let text = question.to_string();
        let vector = tokio::task::spawn_blocking(move || embedder.embed_one(&text))
            .await
            .map_err(|e| RetrieverError::Embedder(format!("embedding task failed: {e}")))??;
        let embed_secs = started.elapsed().as_secs_f64();

        let started = Instant::now();
        let limit = options.candidates.max(options.top_k);
        let hits = self.index.search(&vector, limit).await?;
        let search_secs = started.elapsed().as_secs_f64();

        let chunks = hits
            .into_iter()
            .map(|hit| RetrievedChunk {
                cache: self.cache_status(&hit.chunk),
                chunk: hit.chunk,
                score: hit.score,
            })
            .collect();
        Ok(Retrieval {
            chunks: rank(chunks, options),
            embed_secs,
            search_secs,
        })
    }

    /// The chunk's cache status for this retriever's LLM, from its payload.
    pub fn cache_status(&self, chunk: &IndexedChunk) -> CacheStatus {
        match &self.llm {
            None => CacheStatus::Absent,
            Some(llm) if *llm != chunk.llm => CacheStatus::OtherModel,
            Some(_) if chunk.kv_key.is_empty() => CacheStatus::Absent,
            Some(_) => CacheStatus::Stored,
        }
    }
}

/// Keeps the best `top_k` (a cached chunk gets `prefer_cached_within` added to its score
/// for the ranking) and puts them in the requested order.
pub fn rank(mut chunks: Vec<RetrievedChunk>, options: &RetrieveOptions) -> Vec<RetrievedChunk> {
    let ranked = |c: &RetrievedChunk| {
        c.score
            + if c.cache.is_stored() {
                options.prefer_cached_within
            } else {
                0.0
            }
    };
    // Stable: equal ranks keep the index's order.
    chunks.sort_by(|a, b| ranked(b).total_cmp(&ranked(a)));
    chunks.truncate(options.top_k);
    if options.order == ChunkOrder::CachedLast {
        chunks.sort_by_key(|c| c.cache.is_stored());
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hit(name: &str, score: f32, stored: bool) -> RetrievedChunk {
        RetrievedChunk {
            chunk: IndexedChunk {
                id: None,
                doc_id: name.into(),
                chunk_no: 0,
                text: name.into(),
                token_count: 1,
                token_ids: vec![1],
                source: name.into(),
                llm: String::new(),
                kv_key: String::new(),
                doc_hash: String::new(),
            },
            score,
            cache: if stored {
                CacheStatus::Stored
            } else {
                CacheStatus::Absent
            },
        }
    }

    fn names(chunks: &[RetrievedChunk]) -> Vec<&str> {
        chunks.iter().map(|c| c.chunk.doc_id.as_str()).collect()
    }

    #[test]
    fn ranking_by_score_keeps_the_top_k() {
        let hits = vec![
            hit("a", 0.5, false),
            hit("b", 0.9, true),
            hit("c", 0.7, false),
        ];
        let options = RetrieveOptions {
            top_k: 2,
            ..RetrieveOptions::default()
        };
        assert_eq!(names(&rank(hits, &options)), ["b", "c"]);
    }

    #[test]
    fn a_cached_chunk_wins_among_near_equal_scores_only() {
        let hits = vec![
            hit("a", 0.80, false),
            hit("b", 0.78, true),
            hit("c", 0.60, true),
        ];
        let options = RetrieveOptions {
            top_k: 2,
            prefer_cached_within: 0.05,
            ..RetrieveOptions::default()
        };
        assert_eq!(names(&rank(hits, &options)), ["b", "a"]);
    }

    #[test]
    fn cached_last_puts_uncached_chunks_first_by_relevance() {
        let hits = vec![
            hit("a", 0.9, true),
            hit("b", 0.8, false),
            hit("c", 0.7, true),
            hit("d", 0.6, false),
        ];
        let options = RetrieveOptions {
            top_k: 4,
            order: ChunkOrder::CachedLast,
            ..RetrieveOptions::default()
        };
        assert_eq!(names(&rank(hits, &options)), ["b", "d", "a", "c"]);
    }
}
