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
//! - [`http`]: the axum service (`/v1/ask`, OpenAI-compatible `/v1/chat/completions`,
//!   `/healthz`, `/metrics`) and its configuration file.

pub mod error;
pub mod http;
pub mod metrics;
pub mod pipeline;
pub mod prompt;
pub mod stages;
pub mod types;

pub use error::{BoxError, PipelineError, Result};
pub use http::{HttpConfig, ServiceConfig};
pub use metrics::Metrics;
pub use pipeline::{Health, Pipeline, PipelineBuilder, PipelineConfig};
pub use prompt::PromptTemplate;
pub use types::{Answer, Ask, AskOptions, AskRequest, Breakdown, Source, StreamEvent};
