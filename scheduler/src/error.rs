//! The scheduler's error type.

use std::sync::Arc;
use std::time::Duration;

/// A compute back end's error, shared: one failed decode step fails every sequence in it.
pub type BackendError = Arc<dyn std::error::Error + Send + Sync + 'static>;

/// What can go wrong while planning, prefilling or decoding a request.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SchedulerError {
    /// A prompt, chunk or logits row with nothing in it where something is required.
    #[error("empty input: at least one token is required")]
    EmptyInput,
    /// A request's setting (ratio, sampling, layer split) is out of range.
    #[error("invalid setting: {0}")]
    InvalidSetting(String),
    /// The request needs more positions than the model's context window.
    #[error("context overflow: {needed} positions needed, the model's context is {max}")]
    ContextOverflow {
        /// Positions the request needs.
        needed: usize,
        /// The model's context length.
        max: usize,
    },
    /// The scheduler was shut down before the request finished.
    #[error("the scheduler is shut down")]
    ShutDown,
    /// The request was cancelled (its caller went away).
    #[error("the request was cancelled")]
    Cancelled,
    /// The compute worker panicked in this request's step and was restarted.
    #[error("the compute worker failed in this request's step ({panic}) and was restarted")]
    WorkerPanicked {
        /// The panic's message.
        panic: String,
    },
    /// The compute back end (the model) failed.
    #[error("compute: {0}")]
    Compute(BackendError),
    /// A loaded chunk the plan relied on was not there when it was imported.
    #[error("a loaded chunk went missing before it was imported")]
    LoadedChunkMissing,
    /// The simulator found a request it cannot finish (a bug in a policy or its costs).
    #[error("simulation: {0}")]
    Simulation(String),
}

impl SchedulerError {
    /// Wraps a compute back end's error.
    pub fn compute(error: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::Compute(Arc::new(error))
    }

    /// The compute back end's error, when this is one of type `E`.
    pub fn compute_error<E: std::error::Error + 'static>(&self) -> Option<&E> {
        match self {
            Self::Compute(error) => error.downcast_ref::<E>(),
            _ => None,
        }
    }
}

/// Why a KV store could not answer: its own error, or the deadline the scheduler gave it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The load back end failed (its own error, kept).
    #[error("{0}")]
    Backend(BackendError),
    /// No answer within the scheduler's deadline.
    #[error("timed out after {0:?}")]
    TimedOut(Duration),
    /// The store is down (the simulator's failing store).
    #[error("store unavailable")]
    Unavailable,
}

impl StoreError {
    /// Wraps a load back end's error.
    pub fn backend(error: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::Backend(Arc::new(error))
    }
}

/// Equal when of the same kind with the same message: two failures of a store read the same.
impl PartialEq for StoreError {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Backend(a), Self::Backend(b)) => a.to_string() == b.to_string(),
            (Self::TimedOut(a), Self::TimedOut(b)) => a == b,
            (Self::Unavailable, Self::Unavailable) => true,
            _ => false,
        }
    }
}

/// The scheduler's result type.
pub type Result<T, E = SchedulerError> = std::result::Result<T, E>;
