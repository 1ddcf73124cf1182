//! `ragcake calibrate`: chooses the model's attention correction (APE: the tail's attention
//! to loaded chunk caches at temperature T, their total mass scaled by S) on the calibration
//! part of a labelled question set, and writes it where the engine loads it.
//!
//! For every calibration question the retrieved prompt is computed in full (the reference:
//! its greedy answer and the next-token distributions with that answer fed back); then the
//! chunk caches the precompute job stored are loaded once, and for every (T, S) of a grid
//! the tail and the reference answer are computed over a copy of that cache — blended as
//! requests blend by default (the recomputation rule's tokens recomputed, the correction on
//! the rest). The objective is the mean KL(reference ‖ corrected) pooled over the
//! teacher-forced positions; the coarse grid's best point is refined on a grid of half the
//! step around it. T = S = 1 (ordinary attention) is always a grid point, so the chosen
//! correction never does worse on the calibration part than none. The evaluation part is
//! not read: `ragcake bench fidelity` reports the correction on it.

use std::path::PathBuf;

use clap::Args;
use ragcake::engine::{AttentionCalibration, AttentionCorrection, Engine, GenerateParams};
use ragcake::pipeline::{PipelineConfig, Prompt};
use ragcake::retriever::{QuestionSet, Split};
use ragcake::scheduler::{BlendChunk, Mode, Recompute, RecomputeRule};
use serde::Serialize;

use super::fidelity::{
    LabelledRun, Reference, argmax, chunk_caches, kl, reference, retrieved_prompt, teacher_forced,
};
use super::report::{print_table, write_csv};

#[derive(Debug, Args)]
pub struct CalibrateArgs {
    #[command(flatten)]
    run: LabelledRun,
    /// The recomputation rule blended with the correction [default: the default rule].
    #[arg(long, value_parser = crate::named::<RecomputeRule>())]
    rule: Option<RecomputeRule>,
    /// Its share of each loaded chunk's tokens [default: the default share].
    #[arg(long)]
    ratio: Option<f64>,
    /// Temperatures of the coarse grid.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "0.6,0.7,0.8,0.9,1.0,1.1,1.2"
    )]
    temperatures: Vec<f32>,
    /// Mass scales of the coarse grid.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "0.5,0.7,0.85,1.0,1.2,1.5"
    )]
    scales: Vec<f32>,
    /// Where the calibration is written (one file per model fingerprint)
    /// [default: $RAGCAKE_CALIBRATION, else $RAGCAKE_HOME/calibration].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Every grid point's figures, as CSV.
    #[arg(long, default_value = "bench-results/calibration.csv")]
    csv: PathBuf,
}

/// One grid point's figures over the calibration questions.
#[derive(Debug, Clone, Serialize)]
struct GridRow {
    temperature: f32,
    scale: f32,
    /// Which grid found it: `coarse` or `refined`.
    stage: &'static str,
    /// Mean KL(reference ‖ corrected), pooled over teacher-forced positions.
    kl_mean: f64,
    /// Teacher-forced top-1 agreement over the same positions.
    top1_agreement: f64,
    positions: usize,
    chosen: bool,
}

/// One calibration question, ready to be filled with any correction.
struct Case {
    reference: Reference,
    /// The prompt before the tail: the preamble computed, the chunk caches loaded.
    loaded: ragcake::engine::KvRange,
    blends: Vec<BlendChunk>,
    tail: Vec<u32>,
}

/// KL and agreement sums of one correction over every case.
#[derive(Debug, Default, Clone, Copy)]
struct Totals {
    kl: f64,
    top1: usize,
    positions: usize,
}

pub fn run(args: CalibrateArgs) -> anyhow::Result<()> {
    super::tokio_runtime()?.block_on(calibrate(args))
}

async fn calibrate(args: CalibrateArgs) -> anyhow::Result<()> {
    let default = Recompute::default();
    let recompute = Recompute {
        rule: args.rule.unwrap_or(default.rule),
        ratio: args.ratio.unwrap_or(default.ratio),
        correct_attention: true,
        // The share calibrated on is the one the correction will be measured with.
        load_paid: false,
    };
    recompute.validate()?;
    anyhow::ensure!(
        !args.temperatures.is_empty() && !args.scales.is_empty(),
        "the grid needs at least one temperature and one scale"
    );
    for &t in &args.temperatures {
        AttentionCorrection::new(t, 1.0)?;
    }
    for &s in &args.scales {
        AttentionCorrection::new(1.0, s)?;
    }
    let questions = QuestionSet::load(&args.run.labelled.questions)?;
    let mut config = PipelineConfig::default();
    config.scheduler.write_back = false;
    config.memory_tier_bytes = 0;
    // The correction being calibrated is given explicitly; whatever file exists is ignored.
    let mut model = args.run.model.clone();
    model.no_attention_correction = true;
    let pipeline = super::build_pipeline(&model, &args.run.stores, config).await?;
    super::labelled::ingest_corpus(&pipeline, &args.run.labelled.corpus).await?;
    let engine = pipeline.engine().clone();
    let context = pipeline.config().prompt.chunk_context(&engine)?;
    let params = GenerateParams {
        max_tokens: args.run.max_tokens,
        ..GenerateParams::default()
    };
    let calibration: Vec<_> = questions
        .questions
        .iter()
        .filter(|q| q.split() == Split::Calibration)
        .take(args.run.limit.unwrap_or(usize::MAX))
        .collect();
    anyhow::ensure!(!calibration.is_empty(), "no calibration questions");

    let mut cases = Vec::with_capacity(calibration.len());
    for (n, question) in calibration.iter().enumerate() {
        let (prompt, _) = retrieved_prompt(&pipeline, question, args.run.top_k).await?;
        let reference = reference(&engine, &prompt, &params, &[]).await?;
        if let Some(case) = load_case(
            &engine,
            pipeline.kv(),
            &context,
            &prompt,
            recompute,
            reference,
        )
        .await?
        {
            cases.push(case);
        }
        eprintln!(
            "{}/{} calibration questions prepared",
            n + 1,
            calibration.len()
        );
    }
    anyhow::ensure!(
        !cases.is_empty(),
        "no calibration question loads a stored chunk cache: run `ragcake ingest` first"
    );

    let mut grid: Vec<GridRow> = Vec::new();
    let evaluate = |grid: &mut Vec<GridRow>, t: f32, s: f32, stage: &'static str| {
        evaluate_point(&engine, &cases, grid, (t, s), stage)
    };
    // The identity first: what the correction is measured against.
    evaluate(&mut grid, 1.0, 1.0, "coarse")?;
    for &t in &args.temperatures {
        for &s in &args.scales {
            evaluate(&mut grid, t, s, "coarse")?;
        }
    }
    let best = |grid: &[GridRow]| {
        grid.iter()
            .enumerate()
            .min_by(|a, b| a.1.kl_mean.total_cmp(&b.1.kl_mean))
            .map(|(i, _)| i)
            .expect("the grid has points")
    };
    let coarse = grid[best(&grid)].clone();
    let half_step = |values: &[f32], at: f32| {
        let mut sorted = values.to_vec();
        sorted.sort_by(f32::total_cmp);
        let step = sorted
            .windows(2)
            .map(|w| w[1] - w[0])
            .filter(|d| *d > 0.0)
            .fold(f32::INFINITY, f32::min);
        if step.is_finite() {
            step / 2.0
        } else {
            at * 0.05
        }
    };
    let (dt, ds) = (
        half_step(&args.temperatures, coarse.temperature),
        half_step(&args.scales, coarse.scale),
    );
    for t in [
        coarse.temperature - dt,
        coarse.temperature,
        coarse.temperature + dt,
    ] {
        for s in [coarse.scale - ds, coarse.scale, coarse.scale + ds] {
            if AttentionCorrection::new(t, s).is_ok() {
                evaluate(&mut grid, t, s, "refined")?;
            }
        }
    }
    let chosen = best(&grid);
    grid[chosen].chosen = true;
    let identity = grid
        .iter()
        .find(|r| r.temperature == 1.0 && r.scale == 1.0)
        .expect("the identity was evaluated")
        .clone();
    let winner = grid[chosen].clone();

    let calibration = AttentionCalibration {
        fingerprint: engine.fingerprint().to_hex(),
        correction: AttentionCorrection::new(winner.temperature, winner.scale)?,
        method: format!(
            "grid search, minimum teacher-forced KL vs full computation, blended with {} {:.2}, \
             top {} chunks, {} answer tokens, {}",
            recompute.rule,
            recompute.ratio,
            args.run.top_k,
            args.run.max_tokens,
            args.run.labelled.questions.display()
        ),
        questions: cases.len(),
        kl_uncorrected: identity.kl_mean,
        kl_corrected: winner.kl_mean,
    };
    let dir = args
        .out
        .clone()
        .unwrap_or_else(ragcake::paths::calibration_dir);
    let path = calibration.save(&dir)?;
    write_csv(&args.csv, &grid)?;
    print_table(
        &grid,
        &[
            "temperature",
            "scale",
            "stage",
            "kl_mean",
            "top1_agreement",
            "chosen",
        ],
    )?;
    println!(
        "T {:.3}, S {:.3} on {} calibration questions: KL {:.4} -> {:.4}, top-1 {:.3} -> {:.3}",
        winner.temperature,
        winner.scale,
        cases.len(),
        identity.kl_mean,
        winner.kl_mean,
        identity.top1_agreement,
        winner.top1_agreement
    );
    println!(
        "written to {} (grid: {})",
        path.display(),
        args.csv.display()
    );
    Ok(())
}

/// Scores the correction (`t`, `s`) on every case and adds its row to `grid`, unless the
/// grid has it already.
fn evaluate_point(
    engine: &Engine,
    cases: &[Case],
    grid: &mut Vec<GridRow>,
    (t, s): (f32, f32),
    stage: &'static str,
) -> anyhow::Result<()> {
    if grid.iter().any(|r| r.temperature == t && r.scale == s) {
        return Ok(());
    }
    let totals = score(engine, cases, AttentionCorrection::new(t, s)?)?;
    let positions = totals.positions.max(1) as f64;
    let row = GridRow {
        temperature: t,
        scale: s,
        stage,
        kl_mean: totals.kl / positions,
        top1_agreement: totals.top1 as f64 / positions,
        positions: totals.positions,
        chosen: false,
    };
    eprintln!(
        "T {t:.3} S {s:.3}: KL {:.4}, top-1 {:.3}",
        row.kl_mean, row.top1_agreement
    );
    grid.push(row);
    Ok(())
}

/// The prompt up to its tail as requests fill it by default: the preamble and any chunk
/// without a stored cache computed, the others loaded from `store`. `None` when no chunk
/// has a stored cache (nothing to correct).
async fn load_case(
    engine: &Engine,
    store: &ragcake::kvstore::KvStore,
    context: &[u32],
    prompt: &Prompt,
    recompute: Recompute,
    reference: Reference,
) -> anyhow::Result<Option<Case>> {
    let request = chunk_caches(store, context, prompt, Mode::LoadOnly, recompute);
    let mut cache = engine.new_cache();
    let mut blends = Vec::new();
    for spec in &request.chunks {
        let start = cache.len();
        let loaded = match &spec.stored {
            Some(stored) => store.get(&stored.key, Some(&spec.tokens)).await?.hit(),
            None => None,
        };
        match loaded {
            Some(range) => {
                engine.import(&mut cache, &range)?;
                blends.push(BlendChunk {
                    tokens: spec.tokens.clone(),
                    start,
                    recompute: spec.recompute,
                });
            }
            None => {
                engine.append(&mut cache, &spec.tokens, spec.tokens.len(), false)?;
            }
        }
    }
    if blends.is_empty() {
        return Ok(None);
    }
    Ok(Some(Case {
        reference,
        loaded: cache.export(0..cache.len())?,
        blends,
        tail: request.tail,
    }))
}

/// The KL and agreement of `correction` on every case: the tail blended and corrected on a
/// fresh copy of the loaded cache, then the reference answer fed in one pass.
fn score(
    engine: &Engine,
    cases: &[Case],
    correction: AttentionCorrection,
) -> anyhow::Result<Totals> {
    let mut totals = Totals::default();
    for case in cases {
        let mut cache = engine.new_cache();
        engine.import(&mut cache, &case.loaded)?;
        let (first, _) =
            engine.compute_tail_corrected(&mut cache, &case.tail, &case.blends, correction)?;
        let log_probs = teacher_forced(engine, &mut cache, &first, &case.reference.answer)?;
        for (p, q) in case.reference.log_probs.iter().zip(&log_probs) {
            totals.kl += kl(p, q);
            totals.top1 += usize::from(argmax(p) == argmax(q));
            totals.positions += 1;
        }
    }
    Ok(totals)
}
