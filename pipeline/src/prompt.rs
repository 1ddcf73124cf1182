//! The retrieved chunks as prompt chunks; the template itself is the engine's
//! ([`ragcake_engine::prompt`]), shared with the precompute job.

use ragcake_engine::Engine;
use ragcake_retriever::RetrievedChunk;
use ragcake_scheduler::PromptChunk;

use crate::error::Result;

/// Each retrieved chunk's own tokens, with what retrieval knows of its chunk cache. A
/// chunk's token ids come from the index when `engine`'s LLM made them (so they match its
/// stored cache); a chunk tokenized for another LLM is tokenized again and has no usable
/// cache.
pub fn retrieved_chunks(engine: &Engine, retrieved: &[RetrievedChunk]) -> Result<Vec<PromptChunk>> {
    let fingerprint = engine.fingerprint().to_hex();
    retrieved
        .iter()
        .map(|hit| {
            let tokens = if hit.chunk.llm == fingerprint {
                hit.chunk.token_ids.clone()
            } else {
                engine.tokenizer().encode(&hit.chunk.text, false)?
            };
            Ok(PromptChunk::with_chunk_cache(tokens, hit.cache.is_stored()))
        })
        .collect()
}
