//! A labelled corpus — documents and questions with their answers — as the demo, the
//! fidelity benchmark and the calibration read it, and its ingest.

use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;
use ragcake::ingest::{Ingest, IngestConfig};
use ragcake::pipeline::Pipeline;

/// A corpus and its labelled questions.
#[derive(Debug, Args)]
pub struct LabelledCorpus {
    /// The corpus, ingested first (nothing is redone when it is already there).
    #[arg(long, default_value = "demo/corpus")]
    pub corpus: PathBuf,
    /// Its labelled questions (`[[question]]` tables with `text`, `doc`, `answer`).
    #[arg(long, default_value = "demo/questions.toml")]
    pub questions: PathBuf,
}

/// Indexes `corpus` and stores its chunk caches with the pipeline's own engine, embedder,
/// index and store (nothing is done twice: ingest is idempotent).
pub async fn ingest_corpus(pipeline: &Pipeline, corpus: &std::path::Path) -> anyhow::Result<()> {
    let retriever = pipeline.retriever();
    let job = Ingest::new(
        pipeline.engine().clone(),
        retriever.embedder().clone(),
        retriever.index().clone(),
        Arc::clone(pipeline.kv()),
        IngestConfig {
            template: pipeline.config().prompt.clone(),
            ..IngestConfig::default()
        },
    )?;
    let summary = job.run(&[corpus.to_path_buf()], &|_| {}).await?;
    println!(
        "corpus {}: {} documents, {} chunks ({} indexed now, {} KV caches computed now, {:.1} s)\n",
        corpus.display(),
        summary.documents,
        summary.chunks,
        summary.chunks_indexed,
        summary.kv_computed,
        summary.secs
    );
    Ok(())
}
