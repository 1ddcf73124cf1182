//! `ragcake bench retrieval`: ingest throughput with the time per stage, query latency
//! (embed + search + cache lookup) and recall@k on the labelled demo questions, on an index
//! of a few thousand chunks.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use ragcake::kvstore::KvStore;
use ragcake::retriever::eval::{first_hit, recall_at};
use ragcake::retriever::{
    EdgeIndex, Ingest, IngestConfig, IngestSummary, QuestionSet, RetrieveOptions, Retriever,
    VectorIndex,
};
use serde::Serialize;

use super::bench::{Stats, percentile};
use super::{ModelArgs, plot};

#[derive(Debug, Args)]
pub struct RetrievalArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The labelled corpus.
    #[arg(long, default_value = "demo/corpus")]
    corpus: PathBuf,
    /// Its labelled questions.
    #[arg(long, default_value = "demo/questions.toml")]
    questions: PathBuf,
    /// Where distractor documents come from (markdown files, searched recursively)
    /// [default: the crate sources in $CARGO_HOME/registry/src].
    #[arg(long)]
    distractors: Option<PathBuf>,
    /// Distractor bytes ingested with their KV caches (the full job).
    #[arg(long, default_value_t = 150_000)]
    kv_bytes: u64,
    /// Further distractor bytes indexed without KV caches (to grow the index).
    #[arg(long, default_value_t = 2_000_000)]
    index_bytes: u64,
    /// Chunk size in LLM tokens.
    #[arg(long, default_value_t = ragcake::retriever::DEFAULT_CHUNK_TOKENS)]
    chunk_tokens: usize,
    /// Timed retrievals per question.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// CSV output: `<name>-ingest.csv` and `<name>-query.csv` beside it, the plot as .png.
    #[arg(long, default_value = "bench-results/retrieval.csv")]
    csv: PathBuf,
}

/// One ingest run.
#[derive(Debug, Serialize)]
struct IngestRow {
    phase: &'static str,
    summary: IngestSummary,
    chunks_per_sec: f64,
    tokens_per_sec: f64,
}

/// Query latency and recall on an index of `index_chunks` chunks.
#[derive(Debug, Serialize)]
struct QueryRow {
    index_chunks: usize,
    questions: usize,
    embed_ms: Stats,
    search_ms: Stats,
    lookup_ms: Stats,
    total_ms: Stats,
    total_p90_ms: f64,
    /// (k, recall@k)
    recall: Vec<(usize, f64)>,
    mrr: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    ingest: Vec<IngestRow>,
    query: Vec<QueryRow>,
}

const RECALL_KS: [usize; 5] = [1, 2, 3, 5, 10];

pub async fn run(args: RetrievalArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.repeats > 0, "--repeats must be at least 1");
    let questions = QuestionSet::load(&args.questions)?;
    let work = tempfile::tempdir()?;
    let source = match &args.distractors {
        Some(dir) => dir.clone(),
        None => cargo_home().join("registry").join("src"),
    };
    let kv_dir = work.path().join("distractors-kv");
    let index_dir = work.path().join("distractors");
    let (kv_files, index_files) = copy_distractors(
        &source,
        &[(&kv_dir, args.kv_bytes), (&index_dir, args.index_bytes)],
    )?;
    eprintln!(
        "distractors from {}: {kv_files} files with KV, {index_files} index-only",
        source.display()
    );

    let engine = Arc::new(args.model.load()?);
    let embedder = Arc::new(super::load_embedder()?);
    let index: Arc<dyn VectorIndex> =
        Arc::new(EdgeIndex::open(&work.path().join("index"), embedder.dim())?);
    let (store, prefix) = ragcake::kvstore::open_url(
        &format!("file://{}", work.path().join("kv").display()),
        Vec::new(),
    )?;
    let kv = Arc::new(KvStore::for_engine(store, prefix, &engine));
    let ingest = |precompute_kv| {
        let config = IngestConfig {
            chunk_tokens: args.chunk_tokens,
            precompute_kv,
            ..IngestConfig::default()
        };
        Ingest::new(
            engine.clone(),
            embedder.clone(),
            index.clone(),
            kv.clone(),
            config,
        )
    };
    let retriever = Retriever::new(embedder.clone(), index.clone(), Some(kv.clone()))?;

    let mut report = Report {
        ingest: Vec::new(),
        query: Vec::new(),
    };
    let phases: [(&'static str, bool, Vec<PathBuf>); 2] = [
        ("full (index + KV)", true, vec![args.corpus.clone(), kv_dir]),
        ("index only", false, vec![index_dir]),
    ];
    for (phase, precompute_kv, inputs) in phases {
        eprintln!("ingest, {phase}: {}", display_paths(&inputs));
        let summary = ingest(precompute_kv)?.run(&inputs, &|_| {}).await?;
        anyhow::ensure!(
            summary.skipped.len() < summary.documents.max(1),
            "most files were skipped: {:?}",
            summary.skipped.first()
        );
        let secs = summary.secs.max(1e-9);
        let row = IngestRow {
            phase,
            chunks_per_sec: summary.chunks_indexed as f64 / secs,
            tokens_per_sec: summary.tokens_per_sec(),
            summary,
        };
        eprintln!(
            "  {} chunks, {} tokens in {:.1} s: {:.1} chunks/s, {:.0} tokens/s",
            row.summary.chunks_indexed,
            row.summary.tokens,
            row.summary.secs,
            row.chunks_per_sec,
            row.tokens_per_sec
        );
        report.ingest.push(row);
        let row = measure_queries(&retriever, &questions, args.repeats).await?;
        eprintln!(
            "  index of {} chunks: query {:.1} ms median (embed {:.1}, search {:.1}, lookup {:.1}); recall@1 {:.2}, @5 {:.2}",
            row.index_chunks,
            row.total_ms.median,
            row.embed_ms.median,
            row.search_ms.median,
            row.lookup_ms.median,
            row.recall[0].1,
            row.recall[3].1
        );
        report.query.push(row);
    }
    write_outputs(&args, &report)
}

/// Times `repeats` retrievals of every question (after one warm-up) and ranks the labelled
/// document among the top 10.
async fn measure_queries(
    retriever: &Retriever,
    questions: &QuestionSet,
    repeats: usize,
) -> anyhow::Result<QueryRow> {
    let options = RetrieveOptions {
        top_k: 10,
        candidates: 10,
        ..RetrieveOptions::default()
    };
    retriever.retrieve("warm-up", &options).await?;
    let (mut embed, mut search, mut lookup, mut total) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut first_hits = Vec::new();
    for q in &questions.questions {
        for _ in 0..repeats {
            let r = retriever.retrieve(&q.text, &options).await?;
            embed.push(r.embed_secs * 1e3);
            search.push(r.search_secs * 1e3);
            lookup.push(r.lookup_secs * 1e3);
            total.push((r.embed_secs + r.search_secs + r.lookup_secs) * 1e3);
            first_hits.push(first_hit(&r.chunks, &q.doc));
        }
    }
    // Retrieval is deterministic: every repeat ranks alike; count each question once.
    let per_question: Vec<Option<usize>> = first_hits.iter().step_by(repeats).copied().collect();
    let mrr = per_question
        .iter()
        .map(|r| r.map_or(0.0, |r| 1.0 / r as f64))
        .sum::<f64>()
        / per_question.len() as f64;
    Ok(QueryRow {
        index_chunks: retriever.index().count().await?,
        questions: per_question.len(),
        total_p90_ms: percentile(&total, 0.9),
        embed_ms: Stats::of(embed),
        search_ms: Stats::of(search),
        lookup_ms: Stats::of(lookup),
        total_ms: Stats::of(total),
        recall: recall_at(&per_question, &RECALL_KS),
        mrr,
    })
}

fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from(".cargo"))
}

/// Copies markdown files of at least 2 kB from `source` (in path order) into each target
/// directory until it holds its byte budget, under unique names (many crates have a
/// README.md). Returns how many files each got.
fn copy_distractors(source: &Path, targets: &[(&Path, u64); 2]) -> anyhow::Result<(usize, usize)> {
    let mut files = Vec::new();
    let found = ragcake::retriever::ingest::discover(&[source.to_path_buf()])
        .with_context(|| format!("listing distractors under {}", source.display()))?;
    for file in found {
        if file.path.extension().is_some_and(|e| e == "md") {
            let len = std::fs::metadata(&file.path)?.len();
            if len >= 2048 {
                files.push((file.path, len));
            }
        }
    }
    files.sort();
    let mut files = files.into_iter();
    let mut counts = [0usize; 2];
    for (slot, (dir, budget)) in targets.iter().enumerate() {
        std::fs::create_dir_all(dir)?;
        let mut used = 0u64;
        while used < *budget {
            let Some((path, len)) = files.next() else {
                break;
            };
            let name = format!(
                "{:05}-{}",
                counts[0] + counts[1],
                path.file_name().unwrap_or_default().to_string_lossy()
            );
            std::fs::copy(&path, dir.join(name))?;
            used += len;
            counts[slot] += 1;
        }
    }
    anyhow::ensure!(
        counts[0] + counts[1] > 0 || targets.iter().all(|t| t.1 == 0),
        "no markdown files of 2 kB or more under {}",
        source.display()
    );
    Ok((counts[0], counts[1]))
}

fn display_paths(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn write_outputs(args: &RetrievalArgs, report: &Report) -> anyhow::Result<()> {
    super::create_parent_dir(&args.csv)?;
    let stem = args.csv.with_extension("");
    let ingest_csv = PathBuf::from(format!("{}-ingest.csv", stem.display()));
    let query_csv = PathBuf::from(format!("{}-query.csv", stem.display()));
    let mut csv = String::from(
        "phase,documents,chunks,tokens,secs,chunks_per_s,tokens_per_s,chunk_s,embed_s,kv_compute_s,kv_store_s,index_s,kv_computed,bytes_stored\n",
    );
    for r in &report.ingest {
        let s = &r.summary;
        csv += &format!(
            "{},{},{},{},{:.2},{:.2},{:.1},{:.2},{:.2},{:.2},{:.2},{:.2},{},{}\n",
            r.phase,
            s.documents,
            s.chunks_indexed,
            s.tokens,
            s.secs,
            r.chunks_per_sec,
            r.tokens_per_sec,
            s.chunk_secs,
            s.embed_secs,
            s.kv_compute_secs,
            s.kv_store_secs,
            s.index_secs,
            s.kv_computed,
            s.bytes_stored
        );
    }
    std::fs::write(&ingest_csv, csv)?;
    let mut csv = String::from(
        "index_chunks,questions,embed_ms_p50,search_ms_p50,lookup_ms_p50,total_ms_p50,total_ms_p90,total_ms_max,mrr",
    );
    for k in RECALL_KS {
        csv += &format!(",recall_at_{k}");
    }
    csv.push('\n');
    for r in &report.query {
        csv += &format!(
            "{},{},{:.2},{:.2},{:.2},{:.2},{:.2},{:.2},{:.3}",
            r.index_chunks,
            r.questions,
            r.embed_ms.median,
            r.search_ms.median,
            r.lookup_ms.median,
            r.total_ms.median,
            r.total_p90_ms,
            r.total_ms.max,
            r.mrr
        );
        for (_, recall) in &r.recall {
            csv += &format!(",{recall:.3}");
        }
        csv.push('\n');
    }
    std::fs::write(&query_csv, csv)?;
    eprintln!(
        "CSV written to {} and {}",
        ingest_csv.display(),
        query_csv.display()
    );

    let png = args.csv.with_extension("png");
    let series: Vec<plot::Series> = report
        .query
        .iter()
        .map(|r| plot::Series {
            name: format!("index of {} chunks", r.index_chunks),
            points: r.recall.iter().map(|&(k, v)| (k as f64, v)).collect(),
        })
        .collect();
    plot::line_plot_or_warn(
        &png,
        "recall@k on the labelled demo questions",
        "k (chunks retrieved)",
        "recall@k",
        &series,
        false,
    );

    if args.json {
        println!("{}", serde_json::to_string_pretty(report)?);
        return Ok(());
    }
    println!(
        "{:<18} {:>6} {:>7} {:>8} {:>7} {:>8} {:>9} {:>8} {:>9} {:>8} {:>8}",
        "ingest",
        "docs",
        "chunks",
        "tokens",
        "secs",
        "chunk/s",
        "tokens/s",
        "embed s",
        "KV s",
        "upload",
        "index"
    );
    for r in &report.ingest {
        let s = &r.summary;
        println!(
            "{:<18} {:>6} {:>7} {:>8} {:>7.1} {:>8.1} {:>9.0} {:>8.1} {:>9.1} {:>8.1} {:>8.1}",
            r.phase,
            s.documents,
            s.chunks_indexed,
            s.tokens,
            s.secs,
            r.chunks_per_sec,
            r.tokens_per_sec,
            s.embed_secs,
            s.kv_compute_secs,
            s.kv_store_secs,
            s.index_secs
        );
    }
    println!(
        "{:<12} {:>9} {:>9} {:>9} {:>9} {:>9} {:>6} {:>6} {:>6} {:>6}",
        "index",
        "embed ms",
        "search ms",
        "lookup ms",
        "total ms",
        "p90 ms",
        "R@1",
        "R@3",
        "R@5",
        "MRR"
    );
    for r in &report.query {
        println!(
            "{:<12} {:>9.1} {:>9.2} {:>9.2} {:>9.1} {:>9.1} {:>6.2} {:>6.2} {:>6.2} {:>6.2}",
            format!("{} chunks", r.index_chunks),
            r.embed_ms.median,
            r.search_ms.median,
            r.lookup_ms.median,
            r.total_ms.median,
            r.total_p90_ms,
            r.recall[0].1,
            r.recall[2].1,
            r.recall[3].1,
            r.mrr
        );
    }
    Ok(())
}
