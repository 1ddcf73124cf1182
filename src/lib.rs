//! ragcake: retrieval-augmented generation with cache-aware, bidirectional prefill.
//!
//! This facade re-exports the workspace's crates and adds the model cache
//! ([`models`]) that fetches the default models, the default data locations
//! ([`paths`]), and [`default_pipeline_builder`], a pipeline on those defaults.

pub mod models;
pub mod paths;

pub use ragcake_engine as engine;
pub use ragcake_ingest as ingest;
pub use ragcake_kvstore as kvstore;
pub use ragcake_pipeline as pipeline;
pub use ragcake_retriever as retriever;
pub use ragcake_scheduler as scheduler;

/// A pipeline builder on the embedded defaults: the default LLM and embedder (fetched into
/// the model cache on first use), the index [`paths::default_index_location`] and the KV
/// store [`paths::default_kv_url`] (embedded Qdrant and a local directory unless
/// `RAGCAKE_INDEX` or `RAGCAKE_KV` say otherwise), and the model's attention correction
/// from [`paths::calibration_dir`] when `ragcake calibrate` wrote one, else the one bundled
/// for it ([`engine::correction::BUNDLED`]). Any of them can still be replaced on the
/// builder.
pub fn default_pipeline_builder() -> Result<pipeline::PipelineBuilder, models::ModelsError> {
    let cache = models::ModelCache::default();
    Ok(pipeline::Pipeline::builder()
        .model_path(cache.fetch(&models::SMOLLM2)?.into_path())
        .embedder_dir(cache.fetch(&models::MINILM)?.into_path())
        .index_location(paths::default_index_location())
        .kv_url(paths::default_kv_url())
        .calibration_dir(Some(paths::calibration_dir())))
}

/// The README's Rust snippets, compiled as doc tests so they keep up with the API.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
