//! The retriever's error type.

/// What can go wrong while chunking, embedding, indexing or searching.
#[derive(Debug, thiserror::Error)]
pub enum RetrieverError {
    /// The embedding model could not be loaded or run.
    #[error("embedder: {0}")]
    Embedder(String),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The vector index failed or is unreachable.
    #[error("vector index: {0}")]
    Index(String),
    /// The vector index holds vectors of another size than the embedder's.
    #[error("vector index has {found}-dimensional vectors, the embedder makes {expected}")]
    DimensionMismatch {
        /// The embedder's dimension.
        expected: usize,
        /// The index's.
        found: usize,
    },
    /// A stored point lacks a field or has one of the wrong type.
    #[error("point {id}: payload field {field:?} missing or invalid")]
    Payload {
        /// The point id.
        id: String,
        /// The field.
        field: &'static str,
    },
    /// The LLM's tokenizer failed on a chunk's text.
    #[error("tokenizer: {0}")]
    Tokenizer(#[source] crate::chunker::TokenizeError),
    /// A file or directory could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// A labelled question set could not be read.
    #[error("question set: {0}")]
    QuestionSet(String),
    /// A setting is out of range.
    #[error("invalid setting: {0}")]
    InvalidSetting(String),
}

/// The retriever's result type.
pub type Result<T, E = RetrieverError> = std::result::Result<T, E>;
