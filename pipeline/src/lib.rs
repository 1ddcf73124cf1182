//! ragcake's pipeline: a question goes through retrieval (Qdrant), cache-aware planning
//! (which chunk caches are stored), the bidirectional prefill scheduler (compute from the
//! front, load from the back) and generation — each a tower service — and comes out as an
//! answer with its sources and TTFT breakdown. The question-answering HTTP service serves
//! it.
//!
//! - [`stages`]: the four stages as tower layers and services.
//! - [`pipeline`]: [`Pipeline`] and its builder; `ask` and a streaming ask.
//! - [`prompt`]: the prompt as token segments that line up with stored caches.
//! - [`metrics`]: Prometheus metrics and the layer that records them.
//! - [`config`]: the service's configuration file (HTTP, pipeline, request limits).
//! - [`http`]: the axum service: the native API (`/v1/ask`, `/healthz`, `/metrics`) and
//!   the OpenAI-compatible one (`/v1/chat/completions`, `/v1/models`).

pub mod config;
pub mod error;
pub mod http;
pub mod metrics;
pub mod pipeline;
pub mod prompt;
pub mod stages;
pub mod types;

pub use config::{
    ApiKey, HttpConfig, PipelineConfig, RequestLimits, ServiceConfig, WriteBackAdmission,
};
pub use error::{BoxError, PipelineError, Result};
pub use metrics::Metrics;
pub use pipeline::{
    ChunkCacheCheck, Health, IndexHealth, Pipeline, PipelineBuilder, SchedulerHealth,
};
pub use prompt::retrieved_chunks;
pub use ragcake_engine::{Prompt, PromptTemplate};
pub use types::{Answer, Ask, AskOptions, AskRequest, Breakdown, CitedChunk, StreamEvent};
