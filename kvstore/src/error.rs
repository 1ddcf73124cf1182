//! The KV store's error types.

/// Why a stored blob was not used. Callers treat every rejection as a cache miss.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RejectReason {
    /// Not a readable safetensors blob (truncated, garbled header, bad offsets).
    #[error("malformed blob: {0}")]
    Malformed(String),
    /// Written by another program or an unknown version of this one.
    #[error("unknown format {format:?} version {version:?}")]
    UnknownFormat {
        /// The `format` metadata found.
        format: String,
        /// The `format_version` metadata found.
        version: String,
    },
    /// A metadata entry is missing or unparsable.
    #[error("metadata {0:?} missing or invalid")]
    Metadata(String),
    /// Computed by another model.
    #[error("model fingerprint {found} differs from {expected}")]
    LlmMismatch {
        /// The loaded model's fingerprint.
        expected: String,
        /// The blob's.
        found: String,
    },
    /// Stored under another key than the one it was read from.
    #[error("blob belongs to key {found}, not {expected}")]
    KeyMismatch {
        /// The key asked for.
        expected: String,
        /// The key recorded in the blob.
        found: String,
    },
    /// Holds another number of tokens than the request.
    #[error("{found} tokens stored, {expected} expected")]
    TokenCountMismatch {
        /// Tokens the request needs.
        expected: usize,
        /// Tokens in the blob.
        found: usize,
    },
    /// The token ids it was computed from differ.
    #[error("token ids differ from the request's")]
    TokenMismatch,
    /// An element type the reader does not accept.
    #[error("dtype {0:?} not accepted")]
    Dtype(String),
    /// A tensor is missing or has the wrong shape.
    #[error("tensor {name}: {reason}")]
    Shape {
        /// The tensor.
        name: String,
        /// What was wrong.
        reason: String,
    },
    /// Larger than any cache its key can name: refused before it is read.
    #[error("object of {size} bytes exceeds the {limit} bytes a cache of this model can take")]
    Oversized {
        /// The object's size.
        size: u64,
        /// The most a cache can take.
        limit: u64,
    },
    /// A tensor's bytes do not match their checksum.
    #[error("checksum mismatch in tensor {0}")]
    Checksum(String),
}

/// Errors of the KV store.
#[derive(Debug, thiserror::Error)]
pub enum KvStoreError {
    /// The backend failed (network, permissions, disk).
    #[error("object store: {0}")]
    ObjectStore(#[from] object_store::Error),
    /// A blob exists but failed verification.
    #[error("rejected blob {path}: {reason}")]
    Rejected {
        /// The object's path.
        path: String,
        /// Why.
        reason: RejectReason,
    },
    /// Reading a blob of a local directory failed.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// What failed.
        source: std::io::Error,
    },
    /// A setting out of its range.
    #[error("{0}")]
    Config(String),
    /// A store URL that cannot be used.
    #[error("invalid store URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL.
        url: String,
        /// What was wrong.
        reason: String,
    },
    /// Encoding or converting tensors failed.
    #[error("engine: {0}")]
    Engine(#[from] ragcake_engine::EngineError),
    /// Encoding the blob failed.
    #[error("encoding: {0}")]
    Encode(String),
    /// A background decode task died (a bug, reported rather than propagated as a panic).
    #[error("decode task failed: {0}")]
    Task(String),
    /// A layer range outside the blob.
    #[error("layers {start}..{end} requested from a blob of {n_layers} layers")]
    LayerRange {
        /// First layer asked for.
        start: usize,
        /// One past the last.
        end: usize,
        /// Layers in the blob.
        n_layers: usize,
    },
}

impl From<candle_core::Error> for KvStoreError {
    fn from(e: candle_core::Error) -> Self {
        Self::Engine(e.into())
    }
}

/// The KV store's result type.
pub type Result<T, E = KvStoreError> = std::result::Result<T, E>;
