//! `ragcake ask "…"` and `ragcake demo`: questions answered through the pipeline, with the
//! sources and the TTFT breakdown.

use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;
use ragcake::engine::scheduler::Mode;
use ragcake::ingest::{Ingest, IngestConfig};
use ragcake::pipeline::{Answer, AskOptions, AskRequest, Pipeline, PipelineConfig};
use ragcake::retriever::{ChunkOrder, QuestionSet};

use super::{ModelArgs, StoreArgs};

/// Options of one question.
#[derive(Debug, Clone, Args)]
pub struct QuestionArgs {
    /// Chunks retrieved into the prompt.
    #[arg(long, default_value_t = AskOptions::default().top_k)]
    top_k: usize,
    /// Most tokens to generate.
    #[arg(long, default_value_t = AskOptions::default().max_tokens)]
    max_tokens: usize,
    /// How the prompt cache is filled: compute-only, load-only, bidirectional.
    #[arg(long, default_value_t = Mode::Bidirectional)]
    mode: Mode,
    /// Load exact prefix caches only (never position-independent chunk caches).
    #[arg(long)]
    exact: bool,
    /// Chunks in relevance order (default: cached chunks last, where the loader starts).
    #[arg(long)]
    relevance_order: bool,
}

impl QuestionArgs {
    fn options(&self) -> AskOptions {
        AskOptions {
            top_k: self.top_k,
            max_tokens: self.max_tokens,
            mode: self.mode,
            exact: self.exact,
            order: if self.relevance_order {
                ChunkOrder::Relevance
            } else {
                ChunkOrder::CachedLast
            },
            ..AskOptions::default()
        }
    }
}

#[derive(Debug, Args)]
pub struct AskArgs {
    /// The question.
    question: String,
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    stores: StoreArgs,
    #[command(flatten)]
    options: QuestionArgs,
    /// Print the answer, sources and breakdown as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: AskArgs) -> anyhow::Result<()> {
    super::tokio_runtime()?.block_on(async {
        let pipeline =
            super::build_pipeline(&args.model, &args.stores, PipelineConfig::default()).await?;
        let answer = pipeline
            .ask(AskRequest::new(&args.question).with_options(args.options.options()))
            .await?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&answer)?);
        } else {
            println!("{}", answer.text.trim());
            println!();
            print_sources(&answer);
            println!("{}", breakdown_line(&answer));
        }
        Ok(())
    })
}

fn print_sources(answer: &Answer) {
    for s in &answer.sources {
        let cached = if s.cache.is_stored() {
            "cached"
        } else {
            "not cached"
        };
        println!("  [{:.2}] {} #{} ({cached})", s.score, s.doc_id, s.chunk_no);
    }
}

/// One line: TTFT and where it went.
fn breakdown_line(answer: &Answer) -> String {
    let b = &answer.breakdown;
    let p = &b.prefill;
    let meeting = p
        .meeting_point
        .map_or_else(|| "-".to_string(), |m| m.to_string());
    format!(
        "{}: TTFT {:.2} s (retrieve {:.3} s, plan {:.3} s with {} lookups, prefill {:.2} s: {} chunks computed, {} loaded, {:.1} MB, meeting at {meeting}){}; {} tokens decoded in {:.2} s",
        p.mode,
        b.ttft_secs,
        b.embed_secs + b.search_secs,
        b.plan_secs + b.lookup_secs,
        b.lookups.requests,
        p.ttft_secs,
        p.chunks_computed,
        p.chunks_loaded,
        p.bytes_loaded as f64 / 1e6,
        if b.degraded { " DEGRADED" } else { "" },
        b.generated_tokens,
        b.decode_secs
    )
}

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

#[derive(Debug, Args)]
pub struct DemoArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    stores: StoreArgs,
    #[command(flatten)]
    labelled: LabelledCorpus,
    /// Ask every question, not only those marked `demo = true`.
    #[arg(long)]
    all: bool,
}

/// The main job: ingest the demo corpus (indexing it and storing its chunk caches), then
/// answer the demo questions twice — compute-only, then bidirectional — and compare TTFT.
pub fn demo(args: DemoArgs) -> anyhow::Result<()> {
    super::tokio_runtime()?.block_on(async {
        let questions = QuestionSet::load(&args.labelled.questions)?;
        let pipeline = super::build_pipeline(&args.model, &args.stores, PipelineConfig::default()).await?;
        ingest_corpus(&pipeline, &args.labelled.corpus).await?;

        let chosen: Vec<_> = questions
            .questions
            .iter()
            .filter(|q| args.all || q.demo)
            .collect();
        let (mut compute_ttft, mut bidir_ttft, mut correct) = (0.0, 0.0, 0);
        for q in &chosen {
            println!("Q: {}", q.text);
            let mut answers = Vec::new();
            for mode in [Mode::ComputeOnly, Mode::Bidirectional] {
                let options = AskOptions {
                    mode,
                    ..AskOptions::default()
                };
                answers.push(
                    pipeline
                        .ask(AskRequest::new(&q.text).with_options(options))
                        .await?,
                );
            }
            let answer = &answers[1];
            println!("A: {}", answer.text.trim());
            print_sources(answer);
            for a in &answers {
                println!("  {}", breakdown_line(a));
            }
            let found = answer.text.contains(&q.answer);
            correct += usize::from(found);
            println!(
                "  expected {:?}: {}",
                q.answer,
                if found { "found" } else { "not found" }
            );
            println!();
            compute_ttft += answers[0].breakdown.ttft_secs;
            bidir_ttft += answer.breakdown.ttft_secs;
        }
        let n = chosen.len().max(1) as f64;
        println!(
            "{} questions: mean TTFT compute-only {:.2} s, bidirectional {:.2} s ({:.2}x); {correct} answers contain the expected fact",
            chosen.len(),
            compute_ttft / n,
            bidir_ttft / n,
            compute_ttft / bidir_ttft.max(1e-9)
        );
        Ok(())
    })
}

/// Indexes `corpus` and stores its chunk caches with the pipeline's own engine, embedder,
/// index and store (nothing is done twice: ingest is idempotent).
pub(super) async fn ingest_corpus(
    pipeline: &Pipeline,
    corpus: &std::path::Path,
) -> anyhow::Result<()> {
    let retriever = pipeline.retriever();
    let job = Ingest::new(
        pipeline.engine().clone(),
        retriever.embedder().clone(),
        retriever.index().clone(),
        Arc::clone(pipeline.kv()),
        IngestConfig::default(),
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
