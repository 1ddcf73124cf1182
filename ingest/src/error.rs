//! The ingest job's error type.

/// What can stop the precompute job (a bad file does not: it is skipped and counted).
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// Chunking, embedding or the vector index failed.
    #[error(transparent)]
    Retriever(#[from] ragcake_retriever::RetrieverError),
    /// The LLM engine failed (tokenizing, computing a chunk's KV).
    #[error(transparent)]
    Engine(#[from] ragcake_engine::EngineError),
    /// The KV store failed.
    #[error(transparent)]
    KvStore(#[from] ragcake_kvstore::KvStoreError),
    /// An input file or directory could not be listed.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// A setting is out of range, or the parts do not fit together.
    #[error("invalid setting: {0}")]
    InvalidSetting(String),
    /// A document id is indexed already from another file: replacing its chunks would
    /// delete another input's document.
    #[error(
        "document id {doc_id:?} is indexed from {indexed}, not {given}: two inputs give the \
         same id (the input's own name starts each id; ingest them under different names or \
         into separate indexes), or the corpus moved (then pass --allow-moved)"
    )]
    OtherSource {
        /// The document id.
        doc_id: String,
        /// The file the indexed chunks came from.
        indexed: String,
        /// The file this run read.
        given: String,
    },
    /// A worker task of the job failed.
    #[error("{0}")]
    Task(String),
}

/// Why a file is not a document: it is skipped, counted and listed, and the job goes on.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NotADocument {
    /// It could not be read.
    #[error("unreadable: {0}")]
    Unreadable(#[source] std::sync::Arc<std::io::Error>),
    /// It has no bytes.
    #[error("empty")]
    Empty,
    /// Its first bytes hold a NUL: a binary file with a text name.
    #[error("binary (contains NUL bytes)")]
    Binary,
    /// It is not UTF-8 text.
    #[error("not UTF-8 (invalid byte at {valid_up_to})")]
    NotUtf8 {
        /// Where the first invalid byte is.
        valid_up_to: usize,
    },
    /// It holds only whitespace.
    #[error("only whitespace")]
    OnlyWhitespace,
}

/// A `--shard` that is not `i/N` with `0 <= i < N`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("shard {0:?} is not i/N with 0 <= i < N")]
pub struct BadShard(pub String);

/// The ingest job's result type.
pub type Result<T, E = IngestError> = std::result::Result<T, E>;
