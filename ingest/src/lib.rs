//! ragcake's batch precompute job: read a corpus, chunk it on the LLM's tokens, embed and
//! index the chunks (retriever), compute each chunk's position-independent KV cache (engine)
//! and store it (KV store). It composes the three crates the way the pipeline does, so the
//! retriever itself needs neither the engine nor the store.
//!
//! Idempotent, resumable and shardable: see [`Ingest`].

pub mod error;
pub mod job;

pub use error::{BadShard, IngestError, NotADocument, Result};
pub use job::{
    Ingest, IngestConfig, IngestEvent, IngestSummary, Shard, SourceFile, TEXT_EXTENSIONS, discover,
    read_document,
};
