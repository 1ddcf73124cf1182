//! The pipeline's error type.

/// What can go wrong while answering a question.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// The request is not valid (empty question, a setting out of range, too long).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The vector index is unreachable or failed: no answer without retrieval.
    #[error("retrieval unavailable: {0}")]
    RetrievalUnavailable(String),
    /// The retriever failed otherwise (embedding).
    #[error(transparent)]
    Retriever(#[from] ragcake_retriever::RetrieverError),
    /// The engine failed (tokenizing, prefill, generation).
    #[error(transparent)]
    Engine(#[from] ragcake_engine::EngineError),
    /// The scheduler failed to prefill or decode (a shut-down scheduler, a restarted
    /// worker, the model's own error inside [`ragcake_scheduler::SchedulerError::Compute`]).
    #[error(transparent)]
    Scheduler(#[from] ragcake_scheduler::SchedulerError),
    /// The KV store could not be opened.
    #[error(transparent)]
    KvStore(#[from] ragcake_kvstore::KvStoreError),
    /// A setting or the configuration file is invalid.
    #[error("configuration: {0}")]
    Config(String),
    /// Too many requests are waiting: try again later.
    #[error("overloaded: too many requests in flight, try again later")]
    Overloaded,
    /// The request took longer than the configured timeout.
    #[error("timed out after {0:.1} s")]
    Timeout(f64),
    /// A blocking task (model load, generation) panicked or was cancelled.
    #[error("internal task failed: {0}")]
    Task(String),
}

impl PipelineError {
    /// The error from a retriever failure: an index that is down is "unavailable", the rest
    /// keeps its own kind.
    pub(crate) fn from_retrieval(error: ragcake_retriever::RetrieverError) -> Self {
        match error {
            ragcake_retriever::RetrieverError::Index(why) => Self::RetrievalUnavailable(why),
            other => Self::Retriever(other),
        }
    }

    /// The error of the composed service, whatever layer raised it.
    pub fn from_box(error: BoxError, timeout_secs: f64) -> Self {
        let error = match error.downcast::<Self>() {
            Ok(own) => return *own,
            Err(other) => other,
        };
        if error.is::<tower::load_shed::error::Overloaded>() {
            Self::Overloaded
        } else if error.is::<tower::timeout::error::Elapsed>() {
            Self::Timeout(timeout_secs)
        } else {
            Self::Task(error.to_string())
        }
    }
}

/// The pipeline's result type.
pub type Result<T, E = PipelineError> = std::result::Result<T, E>;

/// The error type of the composed services: stage errors and those of standard layers
/// (timeout, load shedding), boxed.
pub type BoxError = tower::BoxError;
