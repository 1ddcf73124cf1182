//! `ragcake ingest PATH…`: the batch job that indexes a corpus and precomputes its chunk
//! KV caches.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use ragcake::ingest::{Ingest, IngestConfig, IngestEvent, IngestSummary, Shard};
use ragcake::pipeline::{PipelineConfig, ServiceConfig};

use ragcake_bench::{ModelArgs, StoreArgs};

#[derive(Debug, Args)]
pub struct IngestArgs {
    /// Text and markdown files, or directories to read recursively.
    #[arg(required = true)]
    paths: Vec<PathBuf>,
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    stores: StoreArgs,
    /// Chunk size in LLM tokens.
    #[arg(long, default_value_t = ragcake::retriever::DEFAULT_CHUNK_TOKENS)]
    chunk_tokens: usize,
    /// Take only part i of N of the documents (the same split on every machine).
    #[arg(long, value_name = "i/N")]
    shard: Option<Shard>,
    /// Chunks embedded and upserted together.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Index only; do not compute KV caches.
    #[arg(long)]
    no_kv: bool,
    /// The corpus moved: a document indexed from another path is replaced (without it, such
    /// a document stops the run before anything of it is deleted — it may be another
    /// input's document of the same id).
    #[arg(long)]
    allow_moved: bool,
    /// The service's TOML configuration: chunk caches are computed after its prompt
    /// template's preamble (the service finds them only with the same template).
    #[arg(long, env = "RAGCAKE_CONFIG")]
    config: Option<PathBuf>,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: IngestArgs) -> anyhow::Result<()> {
    ragcake_bench::tokio_runtime()?.block_on(ingest(args))
}

async fn ingest(args: IngestArgs) -> anyhow::Result<()> {
    let engine = Arc::new(args.model.load()?);
    let embedder = Arc::new(ragcake_bench::load_embedder()?);
    let index = args.stores.open_index(embedder.dim()).await?;
    // The service's settings: its prompt template (chunk caches are computed after its
    // preamble) and how it stores chunk caches, both part of their keys.
    let service = match &args.config {
        Some(path) => ServiceConfig::load(path)?.pipeline,
        None => PipelineConfig::default(),
    };
    let kv = Arc::new(args.stores.open_kv(&engine, &service)?);
    let template = service.prompt;
    let config = IngestConfig {
        chunk_tokens: args.chunk_tokens,
        shard: args.shard.unwrap_or(Shard::ALL),
        batch: args.batch,
        precompute_kv: !args.no_kv,
        template,
        allow_moved: args.allow_moved,
    };
    let job = Ingest::new(engine, embedder, index, kv, config)?;
    let bar = Mutex::new(None::<ProgressBar>);
    let progress = |event: IngestEvent| {
        let mut bar = bar.lock().unwrap_or_else(|p| p.into_inner());
        match event {
            IngestEvent::Planned { files, bytes } => {
                let b = ProgressBar::new(bytes);
                b.set_style(
                    ProgressStyle::with_template(
                        "{spinner} [{elapsed_precise}] {wide_bar} {binary_bytes}/{binary_total_bytes} ETA {eta} {msg}",
                    )
                    .expect("a valid template"),
                );
                b.set_message(format!("{files} files"));
                *bar = Some(b);
            }
            IngestEvent::Document {
                doc_id,
                bytes,
                chunks,
                new_chunks,
            } => {
                if let Some(b) = bar.as_ref() {
                    b.inc(bytes);
                    b.set_message(format!("{doc_id}: {new_chunks}/{chunks} chunks new"));
                }
                tracing::info!(%doc_id, chunks, new_chunks, "document ingested");
            }
            IngestEvent::Skipped {
                path,
                bytes,
                reason,
            } => {
                let line = format!("skipped {}: {reason}", path.display());
                match bar.as_ref() {
                    Some(b) => {
                        b.inc(bytes);
                        b.println(line);
                    }
                    None => eprintln!("{line}"),
                }
            }
        }
    };
    let summary = job.run(&args.paths, &progress).await;
    if let Some(b) = bar.lock().unwrap_or_else(|p| p.into_inner()).take() {
        b.finish_and_clear();
    }
    let summary = summary?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print_summary(&summary);
    }
    Ok(())
}

fn print_summary(s: &IngestSummary) {
    println!(
        "{} documents, {} chunks, {} tokens in {:.1} s ({:.0} tokens/s)",
        s.documents,
        s.chunks,
        s.tokens,
        s.secs,
        s.tokens_per_sec()
    );
    println!(
        "this run: {} chunks indexed, {} KV caches computed ({} tokens), {:.1} MB stored",
        s.chunks_indexed,
        s.kv_computed,
        s.kv_tokens,
        s.bytes_stored as f64 / 1e6
    );
    println!(
        "time: chunking {:.1} s, embedding {:.1} s, KV compute {:.1} s, KV upload {:.1} s, index {:.1} s",
        s.chunk_secs, s.embed_secs, s.kv_compute_secs, s.kv_store_secs, s.index_secs
    );
    if s.other_shards > 0 {
        println!("{} documents belong to other shards", s.other_shards);
    }
    if !s.skipped.is_empty() {
        println!("{} files skipped:", s.skipped.len());
        for (path, reason) in &s.skipped {
            println!("  {path}: {reason}");
        }
    }
    if s.did_no_work() {
        println!("nothing new: everything was already indexed and stored");
    }
}
