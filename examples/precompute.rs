//! The batch precompute job as library calls: index a corpus in embedded Qdrant and store
//! every chunk's KV cache, the same work as `ragcake ingest`.
//!
//! ```sh
//! cargo run --release --example precompute -- demo/corpus
//! ```
//! The index and the caches go where `ragcake ask` and `ragcake serve` look by default
//! (`$RAGCAKE_HOME/data`), or to `RAGCAKE_INDEX` (a directory or a Qdrant server URL) and
//! `RAGCAKE_KV` (a store URL such as `file:///srv/kv` or `s3://bucket/kv`).

use std::path::PathBuf;
use std::sync::Arc;

use ragcake::engine::{Engine, EngineConfig};
use ragcake::ingest::{Ingest, IngestConfig, IngestEvent};
use ragcake::kvstore::KvStore;
use ragcake::model_cache::{MINILM, ModelCache, SMOLLM2};
use ragcake::retriever::Embedder;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let inputs: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    anyhow::ensure!(!inputs.is_empty(), "usage: precompute PATH…");

    // The default models, fetched into the model cache on first use.
    let models = ModelCache::default();
    let engine = Arc::new(Engine::load(
        models.fetch(&SMOLLM2)?.into_path(),
        &EngineConfig::default(),
    )?);
    let embedder = Arc::new(Embedder::load(&models.fetch(&MINILM)?.into_path())?);

    let index_location = ragcake::paths::default_index_location();
    let index = ragcake::retriever::open_index(&index_location, "ragcake", embedder.dim()).await?;
    let kv_url = ragcake::paths::default_kv_url();
    let kv = Arc::new(KvStore::open_for_engine(&kv_url, Vec::new(), &engine)?);

    let job = Ingest::new(engine, embedder, index, kv, IngestConfig::default())?;
    let summary = job
        .run(&inputs, &|event| match event {
            IngestEvent::Document {
                doc_id, new_chunks, ..
            } => println!("{doc_id}: {new_chunks} new chunks"),
            IngestEvent::Skipped { path, reason, .. } => {
                eprintln!("skipped {}: {reason}", path.display())
            }
            IngestEvent::Planned { .. } => {}
        })
        .await?;
    println!(
        "{} documents, {} chunks ({} new), {} KV caches computed, {:.1} MB stored in {:.1} s",
        summary.documents,
        summary.chunks,
        summary.chunks_indexed,
        summary.kv_computed,
        summary.bytes_stored as f64 / 1e6,
        summary.secs
    );
    Ok(())
}
