//! `ragcake ask "…"` and `ragcake demo`: questions answered through the pipeline, with the
//! sources and the TTFT breakdown.

use clap::Args;
use ragcake::pipeline::{Answer, AskOptions, AskRequest, Pipeline, PipelineConfig};
use ragcake::retriever::{ChunkOrder, QuestionSet};
use ragcake::scheduler::{Fidelity, Mode};

use ragcake_bench::labelled::{LabelledCorpus, ingest_corpus};
use ragcake_bench::{ModelArgs, StoreArgs, build_pipeline, named, tokio_runtime};

/// Options of one question.
#[derive(Debug, Clone, Args)]
pub struct QuestionArgs {
    /// Chunks retrieved into the prompt.
    #[arg(long, default_value_t = AskOptions::default().top_k)]
    top_k: usize,
    /// Most tokens to generate.
    #[arg(long, default_value_t = AskOptions::default().max_tokens)]
    max_tokens: usize,
    /// How the prompt cache is filled.
    #[arg(long, default_value_t = Mode::Bidirectional, value_parser = named::<Mode>())]
    mode: Mode,
    /// Load exact prefix caches only (never position-independent chunk caches).
    #[arg(long)]
    exact: bool,
    /// How close to full computation: fast (5% of loaded chunk-cache tokens recomputed),
    /// balanced (the default share, raised to what the loads pay for) or exact (as
    /// `--exact`) [default: the default share and rule].
    #[arg(long, value_parser = named::<Fidelity>())]
    fidelity: Option<Fidelity>,
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
            fidelity: self.fidelity,
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
    /// Longest wait, before exiting, for the chunks computed to be written back as prefix
    /// caches (seconds; 0: none). What is still queued then is lost with the process.
    #[arg(long, default_value_t = 10.0)]
    write_back_wait_secs: f64,
}

pub fn run(args: AskArgs) -> anyhow::Result<()> {
    tokio_runtime()?.block_on(async {
        let pipeline = build_pipeline(&args.model, &args.stores, PipelineConfig::default()).await?;
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
        finish_write_backs(&pipeline, args.write_back_wait_secs).await;
        Ok(())
    })
}

/// Waits up to `wait_secs` for the chunks this process computed to be written back, saying
/// so on stderr: a process that exits drops what is still queued.
async fn finish_write_backs(pipeline: &Pipeline, wait_secs: f64) {
    let stats = pipeline.scheduler_stats();
    let queued = stats.write_backs
        + stats.write_backs_skipped
        + stats.write_back_failures
        + stats.write_backs_dropped;
    if stats.write_back_pending_bytes == 0 && queued == 0 {
        return; // nothing was computed to write back
    }
    let timeout = std::time::Duration::try_from_secs_f64(wait_secs).unwrap_or_default();
    let mut said = None;
    let left = pipeline
        .finish_write_backs(timeout, |stats| {
            let mb = (stats.write_back_pending_bytes as f64 / 1e6 * 10.0).round() / 10.0;
            if said != Some(mb) {
                eprintln!("writing back computed chunk caches: {mb:.1} MB to go");
                said = Some(mb);
            }
        })
        .await;
    let stats = pipeline.scheduler_stats();
    if left > 0 {
        eprintln!(
            "gave up waiting for write-backs after {:.0} s: {:.1} MB not written (they are computed again next time)",
            timeout.as_secs_f64(),
            left as f64 / 1e6
        );
    } else {
        eprintln!(
            "write-backs finished: {} written, {} already stored, {} failed, {} dropped (queue full)",
            stats.write_backs,
            stats.write_backs_skipped,
            stats.write_back_failures,
            stats.write_backs_dropped
        );
    }
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
        "{}: TTFT {:.2} s (retrieve {:.3} s, plan {:.3} s with {} lookups{}: {} prefix caches ({} of a repeated context) / {} chunk caches, prefill {:.2} s: {} chunks computed, {} loaded, {:.1} MB, {} tokens recomputed to blend chunk caches, meeting at {meeting}){}; {} tokens decoded in {:.2} s",
        p.mode,
        b.ttft_secs,
        b.embed_secs + b.search_secs,
        b.prompt_secs + b.lookup_secs,
        b.lookups.requests,
        match (b.lookups.timed_out, b.lookups.errors) {
            (0, 0) => String::new(),
            (t, e) => format!(" ({t} unanswered at the deadline, {e} failed)"),
        },
        b.lookups.prefix_hits,
        b.lookups.repeated_context_hits,
        b.lookups.chunk_hits,
        p.ttft_secs,
        p.chunks_computed,
        p.chunks_loaded,
        p.bytes_loaded as f64 / 1e6,
        p.tokens_recomputed,
        if b.degraded { " DEGRADED" } else { "" },
        b.generated_tokens,
        b.decode_secs
    )
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
/// answer each demo question as a user would meet it — for the first time, in the default
/// mode, over the chunk caches ingest stored — and then by full computation, printing both
/// answers, whether they agree, where loaded caches came from, and TTFT.
pub fn demo(args: DemoArgs) -> anyhow::Result<()> {
    tokio_runtime()?.block_on(async {
        let questions = QuestionSet::load(&args.labelled.questions)?;
        // Nothing written back: every run meets its questions as new ones (a full
        // computation's prefix caches would make the next run's default answers replays).
        let mut config = PipelineConfig::default();
        config.scheduler.write_back = false;
        let pipeline = build_pipeline(&args.model, &args.stores, config).await?;
        ingest_corpus(&pipeline, &args.labelled.corpus).await?;

        let chosen: Vec<_> = questions
            .questions
            .iter()
            .filter(|q| args.all || q.demo)
            .collect();
        let (mut ttft, mut found, mut same) = ([0.0; 2], [0; 2], 0);
        for q in &chosen {
            println!("Q: {}", q.text);
            let mut answers = Vec::new();
            // The default mode first: a new question finds only what ingest stored (and the
            // shared preamble's prefix cache), not caches a full computation just wrote.
            for (i, mode) in [Mode::Bidirectional, Mode::ComputeOnly].into_iter().enumerate() {
                let options = AskOptions {
                    mode,
                    ..AskOptions::default()
                };
                let before = pipeline.kv().stats();
                let answer = pipeline
                    .ask(AskRequest::new(&q.text).with_options(options))
                    .await?;
                let after = pipeline.kv().stats();
                let label = if i == 0 { "default" } else { "full computation" };
                println!("A ({label}): {}", answer.text.trim());
                if i == 0 {
                    print_sources(&answer);
                }
                let memory = after.memory_hits - before.memory_hits;
                let store = after.hits - before.hits - memory;
                println!(
                    "  {}; loaded from the store {store}, from memory {memory}",
                    breakdown_line(&answer)
                );
                let has = answer.text.contains(&q.answer);
                found[i] += usize::from(has);
                ttft[i] += answer.breakdown.ttft_secs;
                println!(
                    "  expected {:?}: {}",
                    q.answer,
                    if has { "found" } else { "not found" }
                );
                answers.push(answer);
            }
            let agree = answers[0].text == answers[1].text;
            same += usize::from(agree);
            println!(
                "  same answer as full computation: {}\n",
                if agree { "yes" } else { "no" }
            );
        }
        let n = chosen.len().max(1) as f64;
        println!(
            "{} new questions: mean TTFT default {:.2} s, full computation {:.2} s ({:.2}x); expected fact found {} (default) vs {} (full computation); {same} answers the same as full computation's",
            chosen.len(),
            ttft[0] / n,
            ttft[1] / n,
            ttft[1] / ttft[0].max(1e-9),
            found[0],
            found[1],
        );
        Ok(())
    })
}
