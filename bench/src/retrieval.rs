//! `ragcake bench retrieval`: ingest throughput with the time per stage, query latency
//! (embed + search + cache lookup) and recall@k on the labelled demo questions, on an index
//! of a few thousand chunks.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use ragcake::ingest::{Ingest, IngestConfig, IngestSummary};
use ragcake::kvstore::KvStore;
use ragcake::retriever::eval::{first_hit, recall_at};
use ragcake::retriever::{EdgeIndex, QuestionSet, RetrieveOptions, Retriever, VectorIndex};
use serde::Serialize;

use super::report::{Stats, percentile, print_json, print_table, write_csv};
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

/// One ingest run: counts, throughput, and seconds per stage.
#[derive(Debug, Serialize)]
struct IngestRow {
    phase: &'static str,
    documents: usize,
    chunks: usize,
    tokens: usize,
    secs: f64,
    chunks_per_s: f64,
    tokens_per_s: f64,
    chunk_s: f64,
    embed_s: f64,
    kv_compute_s: f64,
    kv_store_s: f64,
    index_s: f64,
    kv_computed: usize,
    bytes_stored: u64,
}

impl IngestRow {
    fn new(phase: &'static str, s: &IngestSummary) -> Self {
        Self {
            phase,
            documents: s.documents,
            chunks: s.chunks_indexed,
            tokens: s.tokens,
            secs: s.secs,
            chunks_per_s: s.chunks_indexed as f64 / s.secs.max(1e-9),
            tokens_per_s: s.tokens_per_sec(),
            chunk_s: s.chunk_secs,
            embed_s: s.embed_secs,
            kv_compute_s: s.kv_compute_secs,
            kv_store_s: s.kv_store_secs,
            index_s: s.index_secs,
            kv_computed: s.kv_computed,
            bytes_stored: s.bytes_stored,
        }
    }
}

/// Query latency (medians unless named) and recall on an index of `index_chunks` chunks.
#[derive(Debug, Serialize)]
struct QueryRow {
    index_chunks: usize,
    questions: usize,
    embed_ms_p50: f64,
    search_ms_p50: f64,
    total_ms_p50: f64,
    total_ms_p90: f64,
    total_ms_max: f64,
    mrr: f64,
    recall_at_1: f64,
    recall_at_2: f64,
    recall_at_3: f64,
    recall_at_5: f64,
    recall_at_10: f64,
}

impl QueryRow {
    /// (k, recall@k) for each k of [`RECALL_KS`].
    fn recall(&self) -> [(usize, f64); 5] {
        let at = [
            self.recall_at_1,
            self.recall_at_2,
            self.recall_at_3,
            self.recall_at_5,
            self.recall_at_10,
        ];
        std::array::from_fn(|i| (RECALL_KS[i], at[i]))
    }
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
    let kv_url = format!("file://{}", work.path().join("kv").display());
    let kv = Arc::new(KvStore::open_for_engine(&kv_url, Vec::new(), &engine)?);
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
    let retriever = Retriever::new(
        embedder.clone(),
        index.clone(),
        Some(kv.fingerprint().to_hex()),
    )?;

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
        let row = IngestRow::new(phase, &summary);
        eprintln!(
            "  {} chunks, {} tokens in {:.1} s: {:.1} chunks/s, {:.0} tokens/s",
            row.chunks, row.tokens, row.secs, row.chunks_per_s, row.tokens_per_s
        );
        report.ingest.push(row);
        let row = measure_queries(&retriever, &questions, args.repeats).await?;
        eprintln!(
            "  index of {} chunks: query {:.1} ms median (embed {:.1}, search {:.1}); recall@1 {:.2}, @5 {:.2}",
            row.index_chunks,
            row.total_ms_p50,
            row.embed_ms_p50,
            row.search_ms_p50,
            row.recall_at_1,
            row.recall_at_5
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
    let (mut embed, mut search, mut total) = (Vec::new(), Vec::new(), Vec::new());
    let mut first_hits = Vec::new();
    for q in &questions.questions {
        for _ in 0..repeats {
            let r = retriever.retrieve(&q.text, &options).await?;
            embed.push(r.embed_secs * 1e3);
            search.push(r.search_secs * 1e3);
            total.push((r.embed_secs + r.search_secs) * 1e3);
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
    let recall = recall_at(&per_question, &RECALL_KS);
    let total_ms = Stats::of(total.clone());
    Ok(QueryRow {
        index_chunks: retriever.index().count().await?,
        questions: per_question.len(),
        embed_ms_p50: Stats::of(embed).median,
        search_ms_p50: Stats::of(search).median,
        total_ms_p50: total_ms.median,
        total_ms_p90: percentile(&total, 0.9),
        total_ms_max: total_ms.max,
        mrr,
        recall_at_1: recall[0].1,
        recall_at_2: recall[1].1,
        recall_at_3: recall[2].1,
        recall_at_5: recall[3].1,
        recall_at_10: recall[4].1,
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
    let found = ragcake::ingest::discover(&[source.to_path_buf()])
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
    let stem = args.csv.with_extension("");
    write_csv(
        &PathBuf::from(format!("{}-ingest.csv", stem.display())),
        &report.ingest,
    )?;
    write_csv(
        &PathBuf::from(format!("{}-query.csv", stem.display())),
        &report.query,
    )?;
    let png = args.csv.with_extension("png");
    let series: Vec<plot::Series> = report
        .query
        .iter()
        .map(|r| plot::Series {
            name: format!("index of {} chunks", r.index_chunks),
            points: r.recall().iter().map(|&(k, v)| (k as f64, v)).collect(),
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
        return print_json(report);
    }
    print_table(
        &report.ingest,
        &[
            "phase",
            "documents",
            "chunks",
            "tokens",
            "secs",
            "chunks_per_s",
            "tokens_per_s",
            "embed_s",
            "kv_compute_s",
            "kv_store_s",
            "index_s",
        ],
    )?;
    print_table(
        &report.query,
        &[
            "index_chunks",
            "embed_ms_p50",
            "search_ms_p50",
            "total_ms_p50",
            "total_ms_p90",
            "recall_at_1",
            "recall_at_3",
            "recall_at_5",
            "mrr",
        ],
    )
}
