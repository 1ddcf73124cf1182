//! The engine's error type.

use std::path::PathBuf;

/// Everything that can go wrong while loading a model, tokenizing or running inference.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The model file could not be opened or read.
    #[error("cannot read model file {path}: {source}")]
    Io {
        /// The file that failed.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// The file is not a readable GGUF file (bad magic, bad header, bad metadata).
    #[error("not a valid GGUF file {path}: {reason}")]
    InvalidGguf {
        /// The file that failed.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// The file ends before the tensor data it declares.
    #[error(
        "GGUF file {path} is truncated: tensor {tensor} needs bytes up to {needed}, file has {actual}"
    )]
    Truncated {
        /// The file that failed.
        path: PathBuf,
        /// The first tensor whose data lies past the end.
        tensor: String,
        /// The end offset that tensor needs.
        needed: u64,
        /// The file's length.
        actual: u64,
    },
    /// The GGUF describes a model family this engine does not implement.
    #[error(
        "unsupported model architecture {0:?} (supported: {supported})",
        supported = crate::models::family_names().join(", ")
    )]
    UnsupportedArchitecture(String),
    /// A GGUF describes a feature of a supported family that this engine does not implement.
    #[error("unsupported model feature: {0}")]
    UnsupportedFeature(String),
    /// A metadata key the model needs is absent or of the wrong type.
    #[error("GGUF metadata key {key:?} is missing or invalid: {reason}")]
    Metadata {
        /// The key.
        key: String,
        /// What was wrong with it.
        reason: String,
    },
    /// A tensor the model needs is absent or has the wrong shape.
    #[error("GGUF tensor {name:?}: {reason}")]
    Tensor {
        /// The tensor's name.
        name: String,
        /// What was wrong with it.
        reason: String,
    },
    /// The model's chat template could not be compiled or rendered.
    #[error("chat template: {0}")]
    ChatTemplate(String),
    /// The tokenizer could not be built or failed on some input.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A prompt or token range with no tokens where at least one is required.
    #[error("empty input: at least one token is required")]
    EmptyInput,
    /// A token id outside the model's vocabulary.
    #[error("token id {id} is outside the vocabulary of {vocab_size} tokens")]
    TokenOutOfRange {
        /// The offending id.
        id: u32,
        /// The vocabulary size.
        vocab_size: usize,
    },
    /// The request needs more positions than the model's context window.
    #[error("context overflow: {needed} positions needed, the model's context is {max}")]
    ContextOverflow {
        /// Positions the request needs.
        needed: usize,
        /// The model's context length.
        max: usize,
    },
    /// A KV range does not fit the cache it is imported into, or a range request is out of bounds.
    #[error("KV cache: {0}")]
    KvMismatch(String),
    /// An invalid generation, blending or correction setting (sampling settings are the
    /// scheduler's: [`EngineError::Scheduler`]).
    #[error("invalid generation setting: {0}")]
    InvalidSetting(String),
    /// Sampling settings out of range, or a scheduler failure surfaced through the engine.
    #[error("scheduler: {0}")]
    Scheduler(#[from] ragcake_scheduler::SchedulerError),
    /// An error from the tensor library.
    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

/// The engine's result type.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;
