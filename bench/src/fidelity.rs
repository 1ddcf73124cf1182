//! `ragcake bench fidelity`: how far answers built on reused caches are from full
//! computation. For every labelled question, the retrieved prompt is computed in full (the
//! reference: its greedy answer, and its next-token distributions with that answer fed back),
//! then filled from reused caches in each arm, which answers greedily and is fed the
//! reference answer the same way. Per arm: teacher-forced top-1 agreement and mean KL
//! divergence from the reference, first-token agreement, identical greedy answers, token F1
//! of the answer against the reference's, exact match and token F1 against the labelled
//! answer and whether the answer states it, the share of the naive→full gap closed, and TTFT.
//!
//! The questions are split (by [`LabelledQuestion::split`]) into a calibration part and an
//! evaluation part. The one thing this benchmark chooses — the cheapest rule and share that
//! reach the agreement target — is chosen on the calibration part; every reported figure is
//! the evaluation part's, with a bootstrap 95% interval over its questions. The calibration
//! part's rows go to a file of their own, so the choice can be checked.
//!
//! Arms: full computation (timed through the scheduler); exact prefix caches of the
//! reference stored in f16, bf16 and f32; the chunk caches the precompute job stored, loaded
//! with each recomputation rule at each ratio (ratio 0: naive, used as loaded), each also
//! with the calibrated attention correction when the model has one; and the fidelity levels
//! `fast` and `balanced` (the default: bidirectional, the default share raised to what the
//! loads pay for; `exact` is the exact prefix arms). The chunk-cache arms load from
//! the configured store with the memory tier off, so every load is a store read. Optionally
//! each with the retrieved chunks shuffled.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use clap::Args;
use futures::TryStreamExt;
use ragcake::engine::{Engine, GenerateParams, KvCache, ReturnLogits, Tensor};
use ragcake::kvstore::object_store::memory::InMemory;
use ragcake::kvstore::object_store::path::Path as StorePath;
use ragcake::kvstore::object_store::{ObjectStore, ObjectStoreExt};
use ragcake::kvstore::{CacheKey, KvStore, StorageDtype, Throttle, throttled};
use ragcake::pipeline::{Pipeline, PipelineConfig, Prompt};
use ragcake::retriever::eval::{exact_match, first_hit, states_fact, token_f1};
use ragcake::retriever::{ChunkOrder, LabelledQuestion, QuestionSet, RetrieveOptions, Split};
use ragcake::scheduler::{
    CacheKind, ChunkCacheHint, ChunkSpec, Fidelity, LoadBackend, Mode, PlanOptions, PrefillRequest,
    PromptChunk, Recompute, RecomputeRule, Scheduler, SchedulerConfig, StoredCache, plan,
    spread_recompute,
};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde::Serialize;

use super::labelled::LabelledCorpus;
use super::report::{Bootstrap, Interval, print_json, print_table, write_csv};
use super::{ModelArgs, StoreArgs, plot};

/// The model, stores and labelled questions a run over reference answers reads, and how
/// its prompts and answers are built (shared by `bench fidelity` and `calibrate`).
#[derive(Debug, Args)]
pub(super) struct LabelledRun {
    #[command(flatten)]
    pub(super) model: ModelArgs,
    #[command(flatten)]
    pub(super) stores: StoreArgs,
    #[command(flatten)]
    pub(super) labelled: LabelledCorpus,
    /// Chunks retrieved into each prompt.
    #[arg(long, default_value_t = ragcake::retriever::DEFAULT_TOP_K)]
    pub(super) top_k: usize,
    /// Greedy tokens of each answer (the teacher-forced positions).
    #[arg(long, default_value_t = 32)]
    pub(super) max_tokens: usize,
    /// Only the first N questions (of the calibration part, for `calibrate`).
    #[arg(long)]
    pub(super) limit: Option<usize>,
}

#[derive(Debug, Args)]
pub struct FidelityArgs {
    #[command(flatten)]
    run: LabelledRun,
    /// Seed of the shuffled chunk order and of the bootstrap.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Also measure every arm with the retrieved chunks shuffled (twice the time).
    #[arg(long)]
    shuffled: bool,
    /// Teacher-forced top-1 agreement the chosen rule and share must reach on the
    /// calibration part.
    #[arg(long, default_value_t = 0.97)]
    agreement_target: f64,
    /// Recomputation rules measured.
    #[arg(long, value_delimiter = ',', default_value = "deviation,leading,query", value_parser = crate::named::<RecomputeRule>())]
    rules: Vec<RecomputeRule>,
    /// Recompute ratios measured for each rule (ratio 0, the naive arm, always runs).
    #[arg(long, value_delimiter = ',', default_value = "0.05,0.1,0.15,0.25,0.5")]
    ratios: Vec<f64>,
    /// Storage dtypes of the exact prefix cache arms.
    #[arg(long, value_delimiter = ',', default_value = "f16,bf16,f32", value_parser = crate::named::<StorageDtype>())]
    exact_dtypes: Vec<StorageDtype>,
    /// Leave out the int8 chunk-cache arms.
    #[arg(long)]
    no_int8: bool,
    /// Read the stored chunk caches at this bandwidth per read, MB/s (0: as fast as the
    /// store is): a slow store, where the loads take long enough for the `balanced` level's
    /// load-paid share to rise above its floor.
    #[arg(long, default_value_t = 0.0)]
    throttle_mb_s: f64,
    /// Print the results as JSON.
    #[arg(long)]
    json: bool,
    /// CSV output, the evaluation part (the calibration part goes beside it as
    /// _calibration.csv, the plots as .png, _ttft.png and _frontier.png).
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
    /// What a request at a fidelity level gets: bidirectional, the level's recomputation
    /// (`balanced` is the default: its share raised to what the loads pay for).
    Level(Fidelity),
}

/// A dtype's place among the exact arms' dtypes (and the exact stores).
fn exact_index(dtypes: &[StorageDtype], dtype: StorageDtype) -> usize {
    dtypes
        .iter()
        .position(|&d| d == dtype)
        .expect("an exact arm's dtype")
}

impl Fill {
    fn name(self) -> String {
        match self {
            Self::Full => "full computation".into(),
            Self::ExactPrefix(d) => format!("exact prefix caches ({d})"),
            Self::Chunks(r) if r.ratio == 0.0 && r.correct_attention => {
                "chunk caches, attention corrected".into()
            }
            Self::Chunks(r) if r.ratio == 0.0 => "naive chunk caches".into(),
            Self::Chunks(r) if r.correct_attention => format!(
                "chunk caches, {} {:.2}, attention corrected",
                r.rule, r.ratio
            ),
            Self::Chunks(r) => format!("chunk caches, {} {:.2}", r.rule, r.ratio),
            Self::Int8Chunks(r) if r.ratio == 0.0 => "naive chunk caches (int8)".into(),
            Self::Int8Chunks(r) => format!("chunk caches (int8), {} {:.2}", r.rule, r.ratio),
            Self::Level(level) => {
                let (r, _) = level.settings();
                let paid = if r.load_paid { "+, load-paid" } else { "" };
                format!("{level} ({} {:.2}{paid})", r.rule, r.ratio)
            }
        }
    }

    /// Which tokens of the loaded chunks are recomputed.
    fn rule(self) -> &'static str {
        match self {
            Self::Full => "all",
            Self::ExactPrefix(_) => "none",
            Self::Chunks(r) | Self::Int8Chunks(r) if r.ratio == 0.0 => "none",
            Self::Chunks(r) | Self::Int8Chunks(r) => r.rule.into(),
            Self::Level(level) => level.settings().0.rule.into(),
        }
    }

    /// Whether the tail corrects its attention to the loaded chunks (APE).
    fn corrected(self, engine_corrects: bool) -> bool {
        match self {
            Self::Chunks(r) | Self::Int8Chunks(r) => r.correct_attention && engine_corrects,
            Self::Level(level) => level.settings().0.correct_attention && engine_corrects,
            Self::Full | Self::ExactPrefix(_) => false,
        }
    }

    fn ratio(self) -> f64 {
        match self {
            Self::Full => 1.0,
            Self::ExactPrefix(_) => 0.0,
            Self::Chunks(r) | Self::Int8Chunks(r) => r.ratio,
            Self::Level(level) => level.settings().0.ratio,
        }
    }
}

/// The arms of a run, in table order; with `correcting` (the model has a calibrated
/// attention correction) each chunk-cache arm also with the correction.
fn arms(args: &FidelityArgs, correcting: bool) -> Vec<Fill> {
    let mut arms = vec![Fill::Full];
    arms.extend(args.exact_dtypes.iter().copied().map(Fill::ExactPrefix));
    let corrections: &[bool] = if correcting { &[false, true] } else { &[false] };
    for &correct_attention in corrections {
        arms.push(Fill::Chunks(Recompute {
            correct_attention,
            ..Recompute::NONE
        }));
    }
    for &rule in &args.rules {
        for &ratio in args.ratios.iter().filter(|&&r| r > 0.0) {
            for &correct_attention in corrections {
                arms.push(Fill::Chunks(Recompute {
                    rule,
                    ratio,
                    correct_attention,
                    load_paid: false,
                }));
            }
        }
    }
    arms.extend([Fidelity::Fast, Fidelity::Balanced].map(Fill::Level));
    // int8 chunk caches beside f16 ones: naive, and blended as the default blends.
    if !args.no_int8 {
        arms.extend([Recompute::NONE, Recompute::default()].map(Fill::Int8Chunks));
    }
    arms
}

/// One arm's results over the questions of one part, each figure with its bootstrap 95%
/// interval over those questions (`_low`, `_high`).
#[derive(Debug, Clone, Serialize)]
struct ArmRow {
    name: String,
    /// The part of the question set these figures come from.
    split: &'static str,
    rule: &'static str,
    /// Share of each loaded chunk's tokens recomputed in context (1 for full computation).
    ratio: f64,
    /// Whether the tail corrected its attention to the loaded chunks (APE, calibrated).
    attention_corrected: bool,
    shuffled: bool,
    /// The rule and share chosen on the calibration part (see `--agreement-target`).
    chosen: bool,
    /// Where its loads came from.
    source: String,
    questions: usize,
    /// Teacher-forced: the reference answer fed back, the arm's top-1 next token equals the
    /// reference's (pooled over positions).
    top1_agreement: f64,
    top1_low: f64,
    top1_high: f64,
    /// Mean KL(reference ‖ arm) of the next-token distributions over the same positions.
    kl_mean: f64,
    kl_low: f64,
    kl_high: f64,
    first_token_agreement: f64,
    /// Share of greedy answers identical to the reference's.
    identical_answers: f64,
    /// Mean token F1 of the greedy answer against the reference's greedy answer.
    f1_vs_full: f64,
    f1_vs_full_low: f64,
    f1_vs_full_high: f64,
    /// Share of answers equal to the labelled answer after normalisation.
    exact_match: f64,
    exact_match_low: f64,
    exact_match_high: f64,
    /// Mean token F1 against the labelled answer.
    f1_vs_label: f64,
    f1_vs_label_low: f64,
    f1_vs_label_high: f64,
    /// Share of answers stating the labelled answer on word boundaries.
    fact_stated: f64,
    fact_stated_low: f64,
    fact_stated_high: f64,
    /// (top-1 agreement − naive's) / (1 − naive's), within the same part and chunk order.
    gap_closed: f64,
    /// Prompt tokens whose KV this request computed — chunks computed whole, tokens of
    /// loaded chunks recomputed, the preamble and the question — over prompt tokens.
    recomputed_share: f64,
    /// Tokens of loaded chunk caches recomputed over the tokens loaded from them.
    blend_share: f64,
    /// Mean time to first token's logits, seconds.
    ttft_secs: f64,
    ttft_low: f64,
    ttft_high: f64,
    /// Mean TTFT over full computation's mean TTFT on the same questions (paired).
    ttft_vs_full: f64,
    ttft_vs_full_low: f64,
    ttft_vs_full_high: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    /// Questions in each part.
    calibration_questions: usize,
    evaluation_questions: usize,
    /// Evaluation questions whose labelled document was among the retrieved chunks.
    evaluation_retrieved: usize,
    /// What was chosen on the calibration part, and its calibration agreement.
    chosen: Option<Choice>,
    /// The evaluation part's rows (the reported figures).
    arms: Vec<ArmRow>,
    /// The calibration part's rows (what the choice was made on).
    calibration: Vec<ArmRow>,
}

/// The rule and share chosen on the calibration part.
#[derive(Debug, Clone, Serialize)]
struct Choice {
    name: String,
    calibration_top1: f64,
    /// Whether it reached the target there (else it is the best agreement found).
    reached_target: bool,
}

/// One arm's measurements on one question in one chunk order.
#[derive(Debug, Default, Clone)]
struct Sample {
    positions: usize,
    top1: usize,
    kl: f64,
    first_token: bool,
    identical: bool,
    f1_vs_full: f64,
    exact_match: bool,
    f1_vs_label: f64,
    fact_stated: bool,
    computed_tokens: usize,
    recomputed_tokens: usize,
    loaded_tokens: usize,
    prompt_tokens: usize,
    ttft: f64,
}

/// The reference: full computation of one prompt.
pub(super) struct Reference {
    pub(super) answer: Vec<u32>,
    /// Its greedy answer's text.
    pub(super) text: String,
    /// Next-token log-probabilities at each teacher-forced position.
    pub(super) log_probs: Vec<Vec<f32>>,
}

pub async fn run(args: FidelityArgs) -> anyhow::Result<()> {
    for ratio in &args.ratios {
        Recompute {
            ratio: *ratio,
            ..Recompute::NONE
        }
        .validate()?;
    }
    anyhow::ensure!(
        (0.0..=1.0).contains(&args.agreement_target),
        "--agreement-target must lie in [0, 1]"
    );
    // Above 1 GB/s the throttle cannot wait per byte (it would read as unlimited).
    anyhow::ensure!(
        args.throttle_mb_s == 0.0 || (args.throttle_mb_s > 0.0 && args.throttle_mb_s < 1000.0),
        "--throttle-mb-s must be 0 (none) or a bandwidth below 1000 MB/s"
    );
    let questions = QuestionSet::load(&args.run.labelled.questions)?;
    let mut config = PipelineConfig::default();
    // The arms must not leave prefix caches for each other.
    config.scheduler.write_back = false;
    // Every chunk-cache load a store read: with the memory tier on, every arm after the
    // first would load a question's chunk caches from RAM.
    config.memory_tier_bytes = 0;
    let pipeline = super::build_pipeline(&args.run.model, &args.run.stores, config).await?;
    super::labelled::ingest_corpus(&pipeline, &args.run.labelled.corpus).await?;
    let store_source = args
        .run
        .stores
        .kv
        .clone()
        .unwrap_or_else(ragcake::paths::default_kv_url);
    let engine = pipeline.engine().clone();
    let chunk_context = pipeline.config().prompt.chunk_context(&engine)?;
    let mut scheduler_config = SchedulerConfig {
        write_back: false,
        ..SchedulerConfig::default()
    };
    // The chunk-cache arms' store: the pipeline's, or the same objects read through a
    // bandwidth limit.
    let (chunk_store, store_source) = if args.throttle_mb_s > 0.0 {
        let config = pipeline.config();
        let (objects, prefix) =
            ragcake::kvstore::open_url_with(&store_source, &config.store, Vec::new())?;
        // Copied into memory first: object_store's throttle reads streams only, and a
        // local directory answers with files.
        let objects = in_memory_copy(&objects, &prefix).await?;
        let throttle = Throttle {
            bytes_per_second: Some(args.throttle_mb_s * 1e6),
            ..Throttle::NONE
        };
        // A load slower than the scheduler's deadline would be abandoned and its chunk
        // computed: the arm would measure computation, not the slow store it is about.
        scheduler_config.load_timeout_secs = 600.0;
        let store = KvStore::for_engine(throttled(objects, throttle), prefix, &engine)
            .with_storage_dtype_for(CacheKind::Prefix, config.prefix_cache_dtype)
            .with_storage_dtype_for(CacheKind::Chunk, config.chunk_cache_dtype);
        let source = format!(
            "{store_source}, copied to memory, at {} MB/s per read",
            args.throttle_mb_s
        );
        (Arc::new(store), source)
    } else {
        (pipeline.kv().clone(), store_source)
    };
    let stored = Scheduler::start(
        engine.clone(),
        chunk_store.clone(),
        scheduler_config.clone(),
    );
    // One in-memory store of the reference's prefix caches per storage dtype.
    let exact: Vec<(Arc<KvStore>, Scheduler<Engine, KvStore>)> = args
        .exact_dtypes
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
        max_tokens: args.run.max_tokens,
        ..GenerateParams::default()
    };

    let correcting = !engine.attention_correction().is_identity();
    let arms = arms(&args, correcting);
    let chosen: Vec<&LabelledQuestion> = questions
        .questions
        .iter()
        .take(args.run.limit.unwrap_or(usize::MAX))
        .collect();
    let orders = if args.shuffled { 2 } else { 1 };
    let mut rng = StdRng::seed_from_u64(args.seed);
    // samples[order][arm][question]
    let mut samples = vec![vec![Vec::with_capacity(chosen.len()); arms.len()]; orders];
    let mut retrieved = Vec::with_capacity(chosen.len());
    for (n, q) in chosen.iter().enumerate() {
        let (prompt, doc_retrieved) = retrieved_prompt(&pipeline, q, args.run.top_k).await?;
        retrieved.push(doc_retrieved);
        // The preamble stays first.
        let mut shuffled = prompt.clone();
        shuffled.chunks[1..].shuffle(&mut rng);
        store_chunk_caches(&engine, &int8, &chunk_context, &prompt).await?;
        for (order, prompt) in [prompt, shuffled].into_iter().take(orders).enumerate() {
            let exact_stores: Vec<&KvStore> = exact.iter().map(|(s, _)| &**s).collect();
            let reference = reference(&engine, &prompt, &params, &exact_stores).await?;
            let mut row = vec![Sample::default(); arms.len()];
            // The arms take turns going first, so none always runs after the same one.
            for k in 0..arms.len() {
                let i = (k + n) % arms.len();
                let fill = arms[i];
                let (scheduler, request) = match fill {
                    Fill::Full => (&stored, computed(&prompt)),
                    Fill::ExactPrefix(dtype) => {
                        let (store, scheduler) = &exact[exact_index(&args.exact_dtypes, dtype)];
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
                            &chunk_store,
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
                    Fill::Level(level) => {
                        let request = chunk_caches(
                            &chunk_store,
                            &chunk_context,
                            &prompt,
                            Mode::default(),
                            level.settings().0,
                        );
                        (&stored, request)
                    }
                };
                row[i] = measure(&engine, scheduler, request, &reference, &params, q).await?;
            }
            for (arm, sample) in row.into_iter().enumerate() {
                samples[order][arm].push(sample);
            }
        }
        eprintln!("{}/{} questions", n + 1, chosen.len());
    }
    let sources: Vec<String> = arms
        .iter()
        .map(|fill| match fill {
            Fill::Full => "-".to_string(),
            Fill::ExactPrefix(_) | Fill::Int8Chunks(_) => "in-memory object store".to_string(),
            Fill::Chunks(_) | Fill::Level(_) => format!("{store_source} (memory tier off)"),
        })
        .collect();
    let part = |split: Split| -> Vec<usize> {
        (0..chosen.len())
            .filter(|&i| chosen[i].split() == split)
            .collect()
    };
    let (calibration_part, evaluation_part) = (part(Split::Calibration), part(Split::Evaluation));
    let table = |split: Split, members: &[usize]| {
        rows(
            &arms, &sources, &samples, split, members, args.seed, correcting,
        )
    };
    let mut calibration = table(Split::Calibration, &calibration_part);
    let mut evaluation = table(Split::Evaluation, &evaluation_part);
    let choice = choose(&arms, &calibration, args.agreement_target);
    if let Some((index, _)) = &choice {
        calibration[*index].chosen = true;
        evaluation[*index].chosen = true;
    }
    let report = Report {
        calibration_questions: calibration_part.len(),
        evaluation_questions: evaluation_part.len(),
        evaluation_retrieved: evaluation_part.iter().filter(|&&i| retrieved[i]).count(),
        chosen: choice.map(|(_, c)| c),
        arms: evaluation,
        calibration,
    };
    write_outputs(&args, &report)
}

/// Every object of `store` under `prefix`, copied into a new in-memory store.
async fn in_memory_copy(
    store: &Arc<dyn ObjectStore>,
    prefix: &StorePath,
) -> anyhow::Result<Arc<dyn ObjectStore>> {
    let memory = InMemory::new();
    let objects: Vec<_> = store.list(Some(prefix)).try_collect().await?;
    for object in objects {
        let bytes = store.get(&object.location).await?.bytes().await?;
        memory.put(&object.location, bytes.into()).await?;
    }
    Ok(Arc::new(memory))
}

/// Retrieves the chunks for `question` (in relevance order) and builds the prompt the
/// pipeline would; also says whether the labelled document was among the chunks.
pub(super) async fn retrieved_prompt(
    pipeline: &Pipeline,
    question: &LabelledQuestion,
    top_k: usize,
) -> anyhow::Result<(Prompt, bool)> {
    let options = RetrieveOptions {
        order: ChunkOrder::Relevance,
        ..RetrieveOptions::for_top_k(top_k)
    };
    let retrieval = pipeline
        .retriever()
        .retrieve(&question.text, &options)
        .await?;
    let template = &pipeline.config().prompt;
    let prompt = template.prompt(
        pipeline.engine(),
        None,
        &[],
        &question.text,
        ragcake::pipeline::retrieved_chunks(pipeline.engine(), &retrieval.chunks)?,
    )?;
    Ok((
        prompt,
        first_hit(&retrieval.chunks, &question.doc).is_some(),
    ))
}

/// Computes `prompt` in full: the greedy answer and the teacher-forced distributions; also
/// stores each chunk's prefix cache in each of `exact_stores` for the exact arms.
pub(super) async fn reference(
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
        text: generation.text,
        log_probs,
    })
}

/// Next-token log-probabilities after the prompt in `cache` (whose last logits are
/// `first`) and after each token of `answer` fed in one pass.
pub(super) fn teacher_forced(
    engine: &Engine,
    cache: &mut KvCache,
    first: &Tensor,
    answer: &[u32],
) -> anyhow::Result<Vec<Vec<f32>>> {
    let mut rows = vec![first.to_vec1::<f32>()?];
    if !answer.is_empty() {
        let all = engine
            .model()
            .forward(answer, cache, ReturnLogits::All)?
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

pub(super) fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i)
}

/// KL(p ‖ q) of two log-probability rows.
pub(super) fn kl(p: &[f32], q: &[f32]) -> f64 {
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
pub(super) fn chunk_caches(
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

/// Runs one arm on one prompt and measures its agreement with the reference.
async fn measure(
    engine: &Engine,
    scheduler: &Scheduler<Engine, KvStore>,
    request: PrefillRequest<CacheKey>,
    reference: &Reference,
    params: &GenerateParams,
    question: &LabelledQuestion,
) -> anyhow::Result<Sample> {
    let prompt_tokens =
        request.chunks.iter().map(|c| c.tokens.len()).sum::<usize>() + request.tail.len();
    let started = Instant::now();
    let filled = scheduler.prefill(request).await?;
    let mut sample = Sample {
        ttft: started.elapsed().as_secs_f64(),
        computed_tokens: filled.report.tokens_computed + filled.report.tokens_recomputed,
        recomputed_tokens: filled.report.tokens_recomputed,
        loaded_tokens: filled.report.tokens_loaded,
        prompt_tokens,
        ..Sample::default()
    };
    let mut cache = filled.cache;
    let prompt_len = cache.len();
    let generation = engine.generate(&mut cache, &filled.logits, params, |_| {
        std::ops::ControlFlow::Continue(())
    })?;
    cache.truncate(prompt_len);
    let log_probs = teacher_forced(engine, &mut cache, &filled.logits, &reference.answer)?;
    for (i, (p, q)) in reference.log_probs.iter().zip(&log_probs).enumerate() {
        let same = argmax(p) == argmax(q);
        sample.top1 += usize::from(same);
        if i == 0 {
            sample.first_token = same;
        }
        sample.kl += kl(p, q);
        sample.positions += 1;
    }
    sample.identical = generation.tokens == reference.answer;
    sample.f1_vs_full = token_f1(&generation.text, &reference.text);
    sample.exact_match = exact_match(&generation.text, &question.answer);
    sample.f1_vs_label = token_f1(&generation.text, &question.answer);
    sample.fact_stated = states_fact(&generation.text, &question.answer);
    Ok(sample)
}

/// The rows of one part (`members`: its questions' indices) for every chunk order and arm,
/// with intervals from one bootstrap over those questions shared by every arm.
fn rows(
    arms: &[Fill],
    sources: &[String],
    samples: &[Vec<Vec<Sample>>],
    split: Split,
    members: &[usize],
    seed: u64,
    correcting: bool,
) -> Vec<ArmRow> {
    let bootstrap = Bootstrap::new(members.len(), seed);
    let n = members.len();
    let mut rows = Vec::new();
    for (order, by_arm) in samples.iter().enumerate() {
        // The part's samples of one arm, in `members` order.
        let of =
            |arm: usize| -> Vec<&Sample> { members.iter().map(|&q| &by_arm[arm][q]).collect() };
        let ratio_of =
            |xs: &[&Sample], idx: &[usize], num: fn(&Sample) -> f64, den: fn(&Sample) -> f64| {
                let (a, b) = idx
                    .iter()
                    .fold((0.0, 0.0), |(a, b), &i| (a + num(xs[i]), b + den(xs[i])));
                if b > 0.0 { a / b } else { f64::NAN }
            };
        let mean_of = |xs: &[&Sample], idx: &[usize], f: fn(&Sample) -> f64| {
            idx.iter().map(|&i| f(xs[i])).sum::<f64>() / idx.len().max(1) as f64
        };
        let top1 = |s: &Sample| s.top1 as f64;
        let positions = |s: &Sample| s.positions as f64;
        let full = arms.iter().position(|f| *f == Fill::Full).map(of);
        let naive = arms
            .iter()
            .position(|f| *f == Fill::Chunks(Recompute::NONE))
            .map(|i| ratio_of(&of(i), &(0..n).collect::<Vec<_>>(), top1, positions));
        for (arm, &fill) in arms.iter().enumerate() {
            let xs = of(arm);
            let interval = |stat: &dyn Fn(&[usize]) -> f64| bootstrap.interval(n, stat);
            let top1_agreement = interval(&|idx| ratio_of(&xs, idx, top1, positions));
            let kl_mean = interval(&|idx| ratio_of(&xs, idx, |s| s.kl, positions));
            let f1_vs_full = interval(&|idx| mean_of(&xs, idx, |s| s.f1_vs_full));
            let exact = interval(&|idx| mean_of(&xs, idx, |s| f64::from(u8::from(s.exact_match))));
            let f1_vs_label = interval(&|idx| mean_of(&xs, idx, |s| s.f1_vs_label));
            let fact = interval(&|idx| mean_of(&xs, idx, |s| f64::from(u8::from(s.fact_stated))));
            let ttft = interval(&|idx| mean_of(&xs, idx, |s| s.ttft));
            let ttft_vs_full = match &full {
                Some(full) => {
                    interval(&|idx| mean_of(&xs, idx, |s| s.ttft) / mean_of(full, idx, |s| s.ttft))
                }
                None => Interval {
                    value: f64::NAN,
                    low: f64::NAN,
                    high: f64::NAN,
                },
            };
            let all: Vec<usize> = (0..n).collect();
            let shuffled = order == 1;
            rows.push(ArmRow {
                name: if shuffled {
                    format!("{}, shuffled", fill.name())
                } else {
                    fill.name()
                },
                split: split.into(),
                rule: fill.rule(),
                ratio: fill.ratio(),
                attention_corrected: fill.corrected(correcting),
                shuffled,
                chosen: false,
                source: sources[arm].clone(),
                questions: n,
                top1_agreement: top1_agreement.value,
                top1_low: top1_agreement.low,
                top1_high: top1_agreement.high,
                kl_mean: kl_mean.value,
                kl_low: kl_mean.low,
                kl_high: kl_mean.high,
                first_token_agreement: mean_of(&xs, &all, |s| f64::from(u8::from(s.first_token))),
                identical_answers: mean_of(&xs, &all, |s| f64::from(u8::from(s.identical))),
                f1_vs_full: f1_vs_full.value,
                f1_vs_full_low: f1_vs_full.low,
                f1_vs_full_high: f1_vs_full.high,
                exact_match: exact.value,
                exact_match_low: exact.low,
                exact_match_high: exact.high,
                f1_vs_label: f1_vs_label.value,
                f1_vs_label_low: f1_vs_label.low,
                f1_vs_label_high: f1_vs_label.high,
                fact_stated: fact.value,
                fact_stated_low: fact.low,
                fact_stated_high: fact.high,
                gap_closed: match naive {
                    Some(naive) if naive < 1.0 => (top1_agreement.value - naive) / (1.0 - naive),
                    _ => 1.0,
                },
                recomputed_share: ratio_of(
                    &xs,
                    &all,
                    |s| s.computed_tokens as f64,
                    |s| s.prompt_tokens as f64,
                ),
                blend_share: ratio_of(
                    &xs,
                    &all,
                    |s| s.recomputed_tokens as f64,
                    |s| s.loaded_tokens as f64,
                )
                .max(0.0),
                ttft_secs: ttft.value,
                ttft_low: ttft.low,
                ttft_high: ttft.high,
                ttft_vs_full: ttft_vs_full.value,
                ttft_vs_full_low: ttft_vs_full.low,
                ttft_vs_full_high: ttft_vs_full.high,
            });
        }
    }
    rows
}

/// The cheapest blended arm (least recomputation, then the higher agreement) whose
/// teacher-forced agreement on the calibration part reaches `target`, in retrieval order;
/// if none does, the one with the highest agreement. Its index in the rows, and what it is.
fn choose(arms: &[Fill], calibration: &[ArmRow], target: f64) -> Option<(usize, Choice)> {
    let candidates: Vec<usize> = (0..arms.len())
        .filter(|&i| matches!(arms[i], Fill::Chunks(r) if r.ratio > 0.0))
        .filter(|&i| calibration[i].top1_agreement.is_finite())
        .collect();
    let by_agreement = |a: &usize, b: &usize| {
        calibration[*a]
            .top1_agreement
            .total_cmp(&calibration[*b].top1_agreement)
    };
    let reaching: Vec<usize> = candidates
        .iter()
        .copied()
        .filter(|&i| calibration[i].top1_agreement >= target)
        .collect();
    let pick = if reaching.is_empty() {
        candidates.iter().copied().max_by(by_agreement)
    } else {
        reaching.iter().copied().min_by(|a, b| {
            calibration[*a]
                .blend_share
                .total_cmp(&calibration[*b].blend_share)
                .then(by_agreement(b, a))
        })
    }?;
    Some((
        pick,
        Choice {
            name: calibration[pick].name.clone(),
            calibration_top1: calibration[pick].top1_agreement,
            reached_target: !reaching.is_empty(),
        },
    ))
}

/// What the printed table shows of a row: each figure with its interval.
#[derive(Serialize)]
struct Shown {
    name: String,
    top1_agreement: String,
    f1_vs_full: String,
    f1_vs_label: String,
    fact_stated: String,
    exact_match: f64,
    blend_share: f64,
    ttft_secs: f64,
    ttft_vs_full: String,
}

/// Whether a row is an f16 chunk-cache arm, drawn on its rule's line (at ratio 0, on every
/// rule's line); the other arms are points of their own.
fn on_a_line(row: &ArmRow) -> bool {
    (row.name.starts_with("chunk caches, ") || row.name.starts_with("naive chunk caches"))
        && !row.name.contains("int8")
}

fn write_outputs(args: &FidelityArgs, report: &Report) -> anyhow::Result<()> {
    write_csv(&args.csv, &report.arms)?;
    let stem = args.csv.file_stem().unwrap_or_default().to_string_lossy();
    let beside = |suffix: &str| args.csv.with_file_name(format!("{stem}{suffix}"));
    write_csv(&beside("_calibration.csv"), &report.calibration)?;
    // One line per rule, chunk order and attention correction, from ratio 0 up, over the
    // f16 chunk-cache arms.
    let mut lines: Vec<(String, Vec<&ArmRow>)> = Vec::new();
    for shuffled in [false, true] {
        for corrected in [false, true] {
            for rule in RecomputeRule::ALL.map(<&str>::from) {
                let mut points: Vec<&ArmRow> = report
                    .arms
                    .iter()
                    .filter(|r| on_a_line(r) && r.shuffled == shuffled)
                    .filter(|r| r.attention_corrected == corrected)
                    .filter(|r| r.rule == rule || r.ratio == 0.0)
                    .collect();
                if points.len() > 1 {
                    let order = if shuffled { ", shuffled" } else { "" };
                    let correction = if corrected {
                        ", attention corrected"
                    } else {
                        ""
                    };
                    points.sort_by(|a, b| a.ratio.total_cmp(&b.ratio));
                    lines.push((format!("{rule}{correction}{order}"), points));
                }
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
    let title = |what: &str| {
        format!(
            "{what}, {} evaluation questions",
            report.evaluation_questions
        )
    };
    plot::line_plot_or_warn(
        &args.csv.with_extension("png"),
        &title("Agreement with full computation"),
        "share of each loaded chunk recomputed",
        "teacher-forced top-1 agreement",
        &series(|r| r.top1_agreement),
        false,
    );
    plot::line_plot_or_warn(
        &beside("_ttft.png"),
        &title("Time to first token"),
        "share of each loaded chunk recomputed",
        "TTFT, seconds",
        &series(|r| r.ttft_secs),
        false,
    );
    // The frontier a user chooses on: every arm, agreement with its interval against TTFT.
    let mut groups: Vec<plot::IntervalSeries> = lines
        .iter()
        .map(|(name, rows)| plot::IntervalSeries {
            name: name.clone(),
            joined: true,
            points: rows.iter().map(|r| frontier_point(r)).collect(),
        })
        .collect();
    for row in report.arms.iter().filter(|r| !on_a_line(r)) {
        groups.push(plot::IntervalSeries {
            name: row.name.clone(),
            joined: false,
            points: vec![frontier_point(row)],
        });
    }
    plot::interval_plot_or_warn(
        &beside("_frontier.png"),
        &title("Agreement against TTFT"),
        "TTFT over full computation's",
        "teacher-forced top-1 agreement (95% interval)",
        &groups,
    );
    if args.json {
        return print_json(report);
    }
    println!(
        "{} calibration and {} evaluation questions (labelled document retrieved for {} of \
         them), greedy answers of {} tokens at most; figures are the evaluation part's, \
         [95% bootstrap interval over its questions]",
        report.calibration_questions,
        report.evaluation_questions,
        report.evaluation_retrieved,
        args.run.max_tokens
    );
    match &report.chosen {
        Some(c) if c.reached_target => println!(
            "chosen on the calibration part: {} (the least recomputation reaching top-1 \
             agreement {}: {:.3} there)",
            c.name, args.agreement_target, c.calibration_top1
        ),
        Some(c) => println!(
            "no rule and share reached top-1 agreement {} on the calibration part; the best, \
             chosen: {} ({:.3} there)",
            args.agreement_target, c.name, c.calibration_top1
        ),
        None => {}
    }
    let shown: Vec<Shown> = report
        .arms
        .iter()
        .map(|r| Shown {
            name: if r.chosen {
                format!("{} (chosen)", r.name)
            } else {
                r.name.clone()
            },
            top1_agreement: interval_text(r.top1_agreement, r.top1_low, r.top1_high),
            f1_vs_full: interval_text(r.f1_vs_full, r.f1_vs_full_low, r.f1_vs_full_high),
            f1_vs_label: interval_text(r.f1_vs_label, r.f1_vs_label_low, r.f1_vs_label_high),
            fact_stated: interval_text(r.fact_stated, r.fact_stated_low, r.fact_stated_high),
            exact_match: r.exact_match,
            blend_share: r.blend_share,
            ttft_secs: r.ttft_secs,
            ttft_vs_full: interval_text(r.ttft_vs_full, r.ttft_vs_full_low, r.ttft_vs_full_high),
        })
        .collect();
    print_table(
        &shown,
        &[
            "name",
            "top1_agreement",
            "f1_vs_full",
            "f1_vs_label",
            "fact_stated",
            "exact_match",
            "blend_share",
            "ttft_secs",
            "ttft_vs_full",
        ],
    )
}

fn interval_text(value: f64, low: f64, high: f64) -> String {
    Interval { value, low, high }.show()
}

/// A row as a point of the frontier plot: (TTFT over full's, agreement, its interval).
fn frontier_point(row: &ArmRow) -> plot::IntervalPoint {
    plot::IntervalPoint {
        x: row.ttft_vs_full,
        y: row.top1_agreement,
        low: row.top1_low,
        high: row.top1_high,
    }
}
