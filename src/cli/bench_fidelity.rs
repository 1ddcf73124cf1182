//! `ragcake bench fidelity`: how far answers built on reused caches are from full
//! computation. For every labelled question, the retrieved prompt is computed in full (the
//! reference: its greedy answer, and its next-token distributions with that answer fed back),
//! then filled from reused caches in each arm, which answers greedily and is fed the
//! reference answer the same way. Per arm: teacher-forced top-1 agreement and mean KL
//! divergence from the reference, first-token agreement, identical greedy answers, the
//! expected fact found, the share of the naive→full gap closed, and TTFT.
//!
//! Arms: full computation (timed through the scheduler); exact prefix caches of the
//! reference stored in f16, bf16 and f32; the chunk caches the precompute job stored, loaded
//! with each recomputation rule at each ratio (ratio 0: naive, used as loaded); and the
//! default mode (bidirectional, the default recomputation). Each in the retrieval order and
//! with the retrieved chunks shuffled.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use clap::Args;
use ragcake::engine::scheduler::{
    CacheKind, ChunkCacheHint, ChunkSpec, LoadBackend, Mode, PlanOptions, PrefillRequest,
    PromptChunk, Recompute, RecomputeRule, Scheduler, SchedulerConfig, StoredCache, plan,
    spread_recompute,
};
use ragcake::engine::{Engine, GenerateParams, KvCache, Logits, Tensor};
use ragcake::kvstore::object_store::memory::InMemory;
use ragcake::kvstore::object_store::path::Path as StorePath;
use ragcake::kvstore::{CacheKey, KvStore, StorageDtype};
use ragcake::pipeline::{Pipeline, PipelineConfig, Prompt};
use ragcake::retriever::{ChunkOrder, LabelledQuestion, QuestionSet, RetrieveOptions};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde::Serialize;

use super::ask::LabelledCorpus;
use super::report::{print_json, print_table, write_csv};
use super::{ModelArgs, StoreArgs, plot};

#[derive(Debug, Args)]
pub struct FidelityArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    stores: StoreArgs,
    #[command(flatten)]
    labelled: LabelledCorpus,
    /// Chunks retrieved into each prompt.
    #[arg(long, default_value_t = ragcake::retriever::DEFAULT_TOP_K)]
    top_k: usize,
    /// Greedy tokens generated per answer.
    #[arg(long, default_value_t = 32)]
    max_tokens: usize,
    /// Only the first N questions.
    #[arg(long)]
    limit: Option<usize>,
    /// Seed of the shuffled chunk order.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Recomputation rules measured.
    #[arg(long, value_delimiter = ',', default_value = "deviation,leading,query")]
    rules: Vec<RecomputeRule>,
    /// Recompute ratios measured for each rule (ratio 0, the naive arm, always runs).
    #[arg(long, value_delimiter = ',', default_value = "0.05,0.1,0.15,0.25,0.5")]
    ratios: Vec<f64>,
    /// Print the results as JSON.
    #[arg(long)]
    json: bool,
    /// CSV output (the plots go beside it as .png and _ttft.png).
    #[arg(long, default_value = "bench-results/fidelity.csv")]
    csv: PathBuf,
}

/// How an arm fills the prompt's cache.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Fill {
    /// Every chunk computed in context (the reference itself, timed through the scheduler).
    Full,
    /// Every chunk loaded from the prefix caches of the reference computation, stored in
    /// the given dtype.
    ExactPrefix(StorageDtype),
    /// Every retrieved chunk with a stored position-independent cache loaded (load-only),
    /// blended by recomputing a share of its tokens (ratio 0: used as loaded).
    Chunks(Recompute),
    /// The same with the chunk caches stored as int8 (computed as ingest computes them).
    Int8Chunks(Recompute),
    /// What a request with default options gets: bidirectional, the default recomputation.
    Default,
}

/// The storage dtypes of the exact arms.
const EXACT_DTYPES: [StorageDtype; 3] = [StorageDtype::F16, StorageDtype::Bf16, StorageDtype::F32];

/// A dtype's place in [`EXACT_DTYPES`] (and among the exact stores).
fn exact_index(dtype: StorageDtype) -> usize {
    EXACT_DTYPES
        .iter()
        .position(|&d| d == dtype)
        .expect("an exact arm's dtype")
}

impl Fill {
    fn name(self) -> String {
        match self {
            Self::Full => "full computation".into(),
            Self::ExactPrefix(d) => format!("exact prefix caches ({})", d.name()),
            Self::Chunks(r) if r.ratio == 0.0 => "naive chunk caches".into(),
            Self::Chunks(r) => format!("chunk caches, {} {:.2}", r.rule, r.ratio),
            Self::Int8Chunks(r) if r.ratio == 0.0 => "naive chunk caches (int8)".into(),
            Self::Int8Chunks(r) => format!("chunk caches (int8), {} {:.2}", r.rule, r.ratio),
            Self::Default => format!(
                "default mode ({} {:.2})",
                Recompute::default().rule,
                Recompute::default().ratio
            ),
        }
    }

    /// Which tokens of the loaded chunks are recomputed.
    fn rule(self) -> &'static str {
        match self {
            Self::Full => "all",
            Self::ExactPrefix(_) => "none",
            Self::Chunks(r) | Self::Int8Chunks(r) if r.ratio == 0.0 => "none",
            Self::Chunks(r) | Self::Int8Chunks(r) => r.rule.as_str(),
            Self::Default => Recompute::default().rule.as_str(),
        }
    }

    fn ratio(self) -> f64 {
        match self {
            Self::Full => 1.0,
            Self::ExactPrefix(_) => 0.0,
            Self::Chunks(r) | Self::Int8Chunks(r) => r.ratio,
            Self::Default => Recompute::default().ratio,
        }
    }
}

/// The arms of a run, in table order.
fn arms(args: &FidelityArgs) -> Vec<Fill> {
    let mut arms = vec![Fill::Full];
    arms.extend(EXACT_DTYPES.map(Fill::ExactPrefix));
    arms.push(Fill::Chunks(Recompute::NONE));
    for &rule in &args.rules {
        for &ratio in args.ratios.iter().filter(|&&r| r > 0.0) {
            arms.push(Fill::Chunks(Recompute { rule, ratio }));
        }
    }
    arms.push(Fill::Default);
    // int8 chunk caches beside f16 ones: naive, and blended as the default blends.
    arms.extend([Recompute::NONE, Recompute::default()].map(Fill::Int8Chunks));
    arms
}

/// One arm's results over every question.
#[derive(Debug, Clone, Serialize)]
struct ArmRow {
    name: String,
    rule: &'static str,
    /// Share of each loaded chunk's tokens recomputed in context (1 for full computation).
    ratio: f64,
    shuffled: bool,
    /// Teacher-forced: the reference answer fed back, the arm's top-1 next token equals the
    /// reference's.
    top1_agreement: f64,
    /// Mean KL(reference ‖ arm) of the next-token distributions over the same positions.
    kl_mean: f64,
    first_token_agreement: f64,
    /// Greedy answers equal to the reference's.
    identical_answers: usize,
    /// Answers containing the labelled fact.
    expected_found: usize,
    /// (top-1 agreement − naive's) / (1 − naive's), within the same chunk order.
    gap_closed: f64,
    /// Prompt tokens whose KV this request computed — chunks computed whole, tokens of
    /// loaded chunks recomputed, the preamble and the question — over prompt tokens.
    recomputed_share: f64,
    /// Tokens of loaded chunk caches recomputed over the tokens loaded from them.
    blend_share: f64,
    /// Mean time to first token's logits, seconds.
    ttft_secs: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    questions: usize,
    arms: Vec<ArmRow>,
}

/// Sums over the questions of one arm.
#[derive(Debug, Default, Clone)]
struct Tally {
    positions: usize,
    top1: usize,
    kl: f64,
    first_token: usize,
    identical: usize,
    found: usize,
    computed_tokens: usize,
    recomputed_tokens: usize,
    loaded_tokens: usize,
    prompt_tokens: usize,
    ttft: f64,
    questions: usize,
}

/// The reference: full computation of one prompt.
struct Reference {
    answer: Vec<u32>,
    /// Next-token log-probabilities at each teacher-forced position.
    log_probs: Vec<Vec<f32>>,
}

pub async fn run(args: FidelityArgs) -> anyhow::Result<()> {
    for ratio in &args.ratios {
        Recompute {
            rule: RecomputeRule::Deviation,
            ratio: *ratio,
        }
        .validate()?;
    }
    let questions = QuestionSet::load(&args.labelled.questions)?;
    let mut config = PipelineConfig::default();
    // The arms must not leave prefix caches for each other.
    config.scheduler.write_back = false;
    let pipeline = super::build_pipeline(&args.model, &args.stores, config).await?;
    super::ask::ingest_corpus(&pipeline, &args.labelled.corpus).await?;
    let engine = pipeline.engine().clone();
    let chunk_context = pipeline.config().prompt.chunk_context(&engine)?;
    let scheduler_config = SchedulerConfig {
        write_back: false,
        ..SchedulerConfig::default()
    };
    let stored = Scheduler::start(
        engine.clone(),
        pipeline.kv().clone(),
        scheduler_config.clone(),
    );
    // One in-memory store of the reference's prefix caches per storage dtype.
    let exact: Vec<(Arc<KvStore>, Scheduler<Engine, KvStore>)> = EXACT_DTYPES
        .iter()
        .map(|d| {
            let store = Arc::new(
                KvStore::for_engine(Arc::new(InMemory::new()), StorePath::default(), &engine)
                    .with_storage_dtype(*d),
            );
            let scheduler =
                Scheduler::start(engine.clone(), store.clone(), scheduler_config.clone());
            (store, scheduler)
        })
        .collect();
    // The corpus's chunk caches stored as int8, filled as prompts need them.
    let int8 = Arc::new(
        KvStore::for_engine(Arc::new(InMemory::new()), StorePath::default(), &engine)
            .with_storage_dtype(StorageDtype::Int8),
    );
    let int8_scheduler = Scheduler::start(engine.clone(), int8.clone(), scheduler_config.clone());
    let params = GenerateParams {
        max_tokens: args.max_tokens,
        ..GenerateParams::default()
    };

    let arms = arms(&args);
    let chosen: Vec<&LabelledQuestion> = questions
        .questions
        .iter()
        .take(args.limit.unwrap_or(usize::MAX))
        .collect();
    let mut rng = StdRng::seed_from_u64(args.seed);
    let mut tallies = vec![Tally::default(); arms.len() * 2];
    for (n, q) in chosen.iter().enumerate() {
        let prompt = retrieved_prompt(&pipeline, &q.text, args.top_k).await?;
        // The preamble stays first.
        let mut shuffled = prompt.clone();
        shuffled.chunks[1..].shuffle(&mut rng);
        store_chunk_caches(&engine, &int8, &chunk_context, &prompt).await?;
        for (order, prompt) in [prompt, shuffled].into_iter().enumerate() {
            let exact_stores: Vec<&KvStore> = exact.iter().map(|(s, _)| &**s).collect();
            let reference = reference(&engine, &prompt, &params, &exact_stores).await?;
            // The arms take turns going first, so none always runs after the same one.
            for k in 0..arms.len() {
                let i = (k + n) % arms.len();
                let fill = arms[i];
                let (scheduler, request) = match fill {
                    Fill::Full => (&stored, computed(&prompt)),
                    Fill::ExactPrefix(dtype) => {
                        let (store, scheduler) = &exact[exact_index(dtype)];
                        let options = PlanOptions {
                            mode: Mode::LoadOnly,
                            exact: true,
                            ..PlanOptions::default()
                        };
                        let (chunks, tail) = (prompt.chunks.clone(), prompt.tail.clone());
                        (scheduler, plan(&**store, chunks, tail, options).await.0)
                    }
                    Fill::Chunks(recompute) => {
                        let request = chunk_caches(
                            pipeline.kv(),
                            &chunk_context,
                            &prompt,
                            Mode::LoadOnly,
                            recompute,
                        );
                        (&stored, request)
                    }
                    Fill::Int8Chunks(recompute) => {
                        let request =
                            chunk_caches(&int8, &chunk_context, &prompt, Mode::LoadOnly, recompute);
                        (&int8_scheduler, request)
                    }
                    Fill::Default => {
                        let request = chunk_caches(
                            pipeline.kv(),
                            &chunk_context,
                            &prompt,
                            Mode::default(),
                            Recompute::default(),
                        );
                        (&stored, request)
                    }
                };
                let tally = &mut tallies[order * arms.len() + i];
                measure(&engine, scheduler, request, &reference, &params, q, tally).await?;
            }
        }
        eprintln!("{}/{} questions", n + 1, chosen.len());
    }
    let rows = rows(&arms, &tallies);
    let report = Report {
        questions: chosen.len(),
        arms: rows,
    };
    write_outputs(&args, &report)
}

/// Retrieves the chunks for `question` (in relevance order) and builds the prompt the
/// pipeline would.
async fn retrieved_prompt(
    pipeline: &Pipeline,
    question: &str,
    top_k: usize,
) -> anyhow::Result<Prompt> {
    let options = RetrieveOptions {
        order: ChunkOrder::Relevance,
        ..RetrieveOptions::for_top_k(top_k)
    };
    let retrieval = pipeline.retriever().retrieve(question, &options).await?;
    let template = &pipeline.config().prompt;
    Ok(template.prompt(pipeline.engine(), None, &[], question, &retrieval.chunks)?)
}

/// Computes `prompt` in full: the greedy answer and the teacher-forced distributions; also
/// stores each chunk's prefix cache in each of `exact_stores` for the exact arms.
async fn reference(
    engine: &Engine,
    prompt: &Prompt,
    params: &GenerateParams,
    exact_stores: &[&KvStore],
) -> anyhow::Result<Reference> {
    let mut cache = engine.new_cache();
    for chunk in &prompt.chunks {
        engine.append(&mut cache, &chunk.tokens, chunk.tokens.len(), false)?;
    }
    for store in exact_stores {
        let keys = store.prefix_chain(prompt.chunks.iter().map(|c| c.tokens.as_slice()));
        let mut start = 0;
        for (key, chunk) in keys.iter().zip(&prompt.chunks) {
            let kv = cache.export(start..start + chunk.tokens.len())?;
            store.put(key, &chunk.tokens, &kv).await?;
            start += chunk.tokens.len();
        }
    }
    let first = engine
        .append(&mut cache, &prompt.tail, prompt.tail.len(), true)?
        .ok_or_else(|| anyhow::anyhow!("no logits"))?;
    let prompt_len = cache.len();
    let generation = engine.generate(&mut cache, &first, params, |_| {
        std::ops::ControlFlow::Continue(())
    })?;
    cache.truncate(prompt_len);
    let log_probs = teacher_forced(engine, &mut cache, &first, &generation.tokens)?;
    Ok(Reference {
        answer: generation.tokens,
        log_probs,
    })
}

/// Next-token log-probabilities after the prompt in `cache` (whose last logits are
/// `first`) and after each token of `answer` fed in one pass.
fn teacher_forced(
    engine: &Engine,
    cache: &mut KvCache,
    first: &Tensor,
    answer: &[u32],
) -> anyhow::Result<Vec<Vec<f32>>> {
    let mut rows = vec![first.to_vec1::<f32>()?];
    if !answer.is_empty() {
        let all = engine
            .model()
            .forward(answer, cache, Logits::All)?
            .ok_or_else(|| anyhow::anyhow!("no logits"))?;
        rows.extend(all.to_vec2::<f32>()?);
    }
    Ok(rows.into_iter().map(log_softmax).collect())
}

fn log_softmax(mut row: Vec<f32>) -> Vec<f32> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = row.iter().map(|&x| ((x - max) as f64).exp()).sum();
    let log_sum = sum.ln() as f32 + max;
    for x in &mut row {
        *x -= log_sum;
    }
    row
}

fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i)
}

/// KL(p ‖ q) of two log-probability rows.
fn kl(p: &[f32], q: &[f32]) -> f64 {
    p.iter()
        .zip(q)
        .map(|(&lp, &lq)| (lp as f64).exp() * (lp as f64 - lq as f64))
        .sum()
}

/// The prompt as a request in `mode` that loads `stored(chunk)` for each chunk (computing
/// the others), blending loaded chunk caches by `recompute`, and writes nothing back.
fn request_for(
    prompt: &Prompt,
    mode: Mode,
    recompute: Recompute,
    stored: impl Fn(&PromptChunk) -> Option<StoredCache<CacheKey>>,
) -> PrefillRequest<CacheKey> {
    PrefillRequest {
        chunks: prompt
            .chunks
            .iter()
            .map(|chunk| ChunkSpec {
                tokens: chunk.tokens.as_slice().into(),
                stored: stored(chunk),
                write_back: None,
                recompute,
            })
            .collect(),
        tail: prompt.tail.clone(),
        mode,
    }
}

/// Every chunk computed.
fn computed(prompt: &Prompt) -> PrefillRequest<CacheKey> {
    request_for(prompt, Mode::ComputeOnly, Recompute::NONE, |_| None)
}

/// Every chunk whose position-independent cache the precompute job stored (after
/// `context`) may load it, blended by `recompute`; the others are computed. No prefix
/// cache is used (the store may hold some from earlier runs).
fn chunk_caches(
    store: &KvStore,
    context: &[u32],
    prompt: &Prompt,
    mode: Mode,
    recompute: Recompute,
) -> PrefillRequest<CacheKey> {
    let mut request = request_for(prompt, mode, recompute, |chunk| {
        (chunk.chunk_cache == ChunkCacheHint::Stored).then(|| StoredCache {
            key: store.chunk_key(context, &chunk.tokens),
            kind: CacheKind::Chunk,
        })
    });
    spread_recompute(&mut request.chunks, recompute, context);
    request
}

/// Computes and stores in `store` the chunk caches `prompt` has stored ones of, as the
/// precompute job computes them: after `context`, at the positions that follow it.
async fn store_chunk_caches(
    engine: &Engine,
    store: &KvStore,
    context: &[u32],
    prompt: &Prompt,
) -> anyhow::Result<()> {
    for chunk in &prompt.chunks {
        let key = store.chunk_key(context, &chunk.tokens);
        if chunk.chunk_cache != ChunkCacheHint::Stored || store.contains(&key).await? {
            continue;
        }
        let mut cache = engine.new_cache();
        engine.append(&mut cache, context, context.len().max(1), false)?;
        let start = cache.len();
        engine.append(&mut cache, &chunk.tokens, chunk.tokens.len(), false)?;
        let range = cache.export(start..cache.len())?;
        store.put(&key, &chunk.tokens, &range).await?;
    }
    Ok(())
}

/// Runs one arm on one prompt and adds its agreement with the reference to `tally`.
async fn measure(
    engine: &Engine,
    scheduler: &Scheduler<Engine, KvStore>,
    request: PrefillRequest<CacheKey>,
    reference: &Reference,
    params: &GenerateParams,
    question: &LabelledQuestion,
    tally: &mut Tally,
) -> anyhow::Result<()> {
    let prompt_tokens =
        request.chunks.iter().map(|c| c.tokens.len()).sum::<usize>() + request.tail.len();
    let started = Instant::now();
    let filled = scheduler.prefill(request).await?;
    tally.ttft += started.elapsed().as_secs_f64();
    tally.computed_tokens += filled.report.tokens_computed + filled.report.tokens_recomputed;
    tally.recomputed_tokens += filled.report.tokens_recomputed;
    tally.loaded_tokens += filled.report.tokens_loaded;
    tally.prompt_tokens += prompt_tokens;
    let mut cache = filled.cache;
    let prompt_len = cache.len();
    let generation = engine.generate(&mut cache, &filled.logits, params, |_| {
        std::ops::ControlFlow::Continue(())
    })?;
    cache.truncate(prompt_len);
    let log_probs = teacher_forced(engine, &mut cache, &filled.logits, &reference.answer)?;
    for (i, (p, q)) in reference.log_probs.iter().zip(&log_probs).enumerate() {
        let same = argmax(p) == argmax(q);
        tally.top1 += usize::from(same);
        if i == 0 {
            tally.first_token += usize::from(same);
        }
        tally.kl += kl(p, q);
        tally.positions += 1;
    }
    tally.identical += usize::from(generation.tokens == reference.answer);
    tally.found += usize::from(generation.text.contains(&question.answer));
    tally.questions += 1;
    Ok(())
}

fn rows(arms: &[Fill], tallies: &[Tally]) -> Vec<ArmRow> {
    let mut rows = Vec::new();
    for (order, group) in tallies.chunks(arms.len()).enumerate() {
        let top1 = |t: &Tally| t.top1 as f64 / t.positions.max(1) as f64;
        let naive = group
            .iter()
            .zip(arms)
            .find(|(_, f)| **f == Fill::Chunks(Recompute::NONE))
            .map_or(0.0, |(t, _)| top1(t));
        for (t, &fill) in group.iter().zip(arms) {
            let shuffled = order == 1;
            let n = t.questions.max(1) as f64;
            rows.push(ArmRow {
                name: if shuffled {
                    format!("{}, shuffled", fill.name())
                } else {
                    fill.name()
                },
                rule: fill.rule(),
                ratio: fill.ratio(),
                shuffled,
                top1_agreement: top1(t),
                kl_mean: t.kl / t.positions.max(1) as f64,
                first_token_agreement: t.first_token as f64 / n,
                identical_answers: t.identical,
                expected_found: t.found,
                gap_closed: if naive < 1.0 {
                    (top1(t) - naive) / (1.0 - naive)
                } else {
                    1.0
                },
                recomputed_share: t.computed_tokens as f64 / t.prompt_tokens.max(1) as f64,
                blend_share: t.recomputed_tokens as f64 / t.loaded_tokens.max(1) as f64,
                ttft_secs: t.ttft / n,
            });
        }
    }
    rows
}

fn write_outputs(args: &FidelityArgs, report: &Report) -> anyhow::Result<()> {
    write_csv(&args.csv, &report.arms)?;
    // One line per rule and chunk order, from the naive arm (ratio 0) up.
    let mut lines: Vec<(String, Vec<&ArmRow>)> = Vec::new();
    for shuffled in [false, true] {
        for rule in RecomputeRule::ALL.map(|r| r.as_str()) {
            let points: Vec<&ArmRow> = report
                .arms
                .iter()
                .filter(|r| r.shuffled == shuffled && r.name.contains("chunk caches"))
                .filter(|r| r.rule == rule || r.rule == "none")
                .collect();
            if points.len() > 1 {
                let order = if shuffled { ", shuffled" } else { "" };
                lines.push((format!("{rule}{order}"), points));
            }
        }
    }
    let series = |y: fn(&ArmRow) -> f64| -> Vec<plot::Series> {
        lines
            .iter()
            .map(|(name, rows)| plot::Series {
                name: name.clone(),
                points: rows.iter().map(|r| (r.ratio, y(r))).collect(),
            })
            .collect()
    };
    let title = |what: &str| format!("{what}, {} questions", report.questions);
    plot::line_plot_or_warn(
        &args.csv.with_extension("png"),
        &title("Agreement with full computation"),
        "share of each loaded chunk recomputed",
        "teacher-forced top-1 agreement",
        &series(|r| r.top1_agreement),
        false,
    );
    let stem = args.csv.file_stem().unwrap_or_default().to_string_lossy();
    plot::line_plot_or_warn(
        &args.csv.with_file_name(format!("{stem}_ttft.png")),
        &title("Time to first token"),
        "share of each loaded chunk recomputed",
        "TTFT, seconds",
        &series(|r| r.ttft_secs),
        false,
    );
    if args.json {
        return print_json(report);
    }
    println!(
        "{} questions, greedy answers of {} tokens at most",
        report.questions, args.max_tokens
    );
    print_table(
        &report.arms,
        &[
            "name",
            "top1_agreement",
            "kl_mean",
            "first_token_agreement",
            "identical_answers",
            "expected_found",
            "gap_closed",
            "recomputed_share",
            "blend_share",
            "ttft_secs",
        ],
    )
}
