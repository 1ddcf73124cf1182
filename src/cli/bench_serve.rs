//! `ragcake bench serve`: many requests arriving at random (Poisson) share one compute
//! worker and one I/O pool; throughput and TTFT of the adaptive bidirectional scheduler
//! against FCFS compute-only, FCFS load-only, per-request bidirectional (one request at a
//! time, no coordination) and FCFS bidirectional over the shared pool.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use ragcake::engine::scheduler::dispatch::chunk_starts;
use ragcake::engine::scheduler::{
    LoadBackend, Mode, Policy, PromptChunk, Scheduler, SchedulerConfig, plan,
};
use ragcake::engine::{Engine, TokenKind};
use ragcake::kvstore::object_store::ObjectStore;
use ragcake::kvstore::object_store::memory::InMemory;
use ragcake::kvstore::object_store::path::Path;
use ragcake::kvstore::{KvStore, Throttle, throttled};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use super::bench::bench_tokens;
use super::report::{Stats, percentile, print_json, print_table, write_csv};
use super::{ModelArgs, plot};

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Context tokens of each request (chunks), before the question tail.
    #[arg(long, default_value_t = 1024)]
    context: usize,
    /// Tokens per chunk.
    #[arg(long, default_value_t = 256)]
    chunk: usize,
    /// Requests per run.
    #[arg(long, default_value_t = 20)]
    requests: usize,
    /// Share of requests whose whole context is stored, partly stored (the first half), and
    /// not stored at all.
    #[arg(long, value_delimiter = ',', default_value = "0.5,0.25,0.25")]
    mix: Vec<f64>,
    /// Offered loads to sweep, as multiples of the compute-only capacity (one request per
    /// full-context compute time).
    #[arg(long, value_delimiter = ',', default_value = "0.8,1.5,4")]
    loads: Vec<f64>,
    /// Read bandwidth of one load, MB/s (0 = unthrottled memory).
    #[arg(long, default_value_t = 1.0)]
    bandwidth: f64,
    /// Loads in flight at once, across all requests.
    #[arg(long, default_value_t = 4)]
    io_concurrency: usize,
    /// Seed of the arrival times and request kinds (every policy gets the same trace).
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// CSV output (the plot goes beside it as .png).
    #[arg(long, default_value = "bench-results/serve.csv")]
    csv: PathBuf,
}

/// A way to serve the requests: the scheduler's policy and every request's mode.
#[derive(Debug, Clone, Copy)]
struct Contender {
    name: &'static str,
    policy: Policy,
    mode: Mode,
    /// One of the baselines the headline compares against (the shared-pool FCFS
    /// bidirectional scheduler is reported beside them: it already coordinates loads).
    baseline: bool,
}

const CONTENDERS: [Contender; 5] = [
    Contender {
        name: "fcfs compute-only",
        policy: Policy::Fcfs,
        mode: Mode::ComputeOnly,
        baseline: true,
    },
    Contender {
        name: "fcfs load-only",
        policy: Policy::Fcfs,
        mode: Mode::LoadOnly,
        baseline: true,
    },
    Contender {
        name: "per-request bidirectional",
        policy: Policy::PerRequest,
        mode: Mode::Bidirectional,
        baseline: true,
    },
    Contender {
        name: "fcfs bidirectional",
        policy: Policy::Fcfs,
        mode: Mode::Bidirectional,
        baseline: false,
    },
    Contender {
        name: "adaptive bidirectional",
        policy: Policy::Adaptive,
        mode: Mode::Bidirectional,
        baseline: false,
    },
];

/// How much of a request's context is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum Kind {
    Cached,
    Partial,
    Uncached,
}

/// One request of the trace.
struct TraceRequest {
    arrival: Duration,
    kind: Kind,
    chunks: Vec<Vec<u32>>,
}

#[derive(Debug, Serialize)]
struct Row {
    load: f64,
    offered_rps: f64,
    contender: &'static str,
    /// Requests finished per second, first arrival to last first token.
    throughput_rps: f64,
    mean_ttft_s: f64,
    p50_ttft_s: f64,
    p99_ttft_s: f64,
    max_ttft_s: f64,
    /// Mean TTFT per request kind.
    mean_ttft_cached_s: f64,
    mean_ttft_partial_s: f64,
    mean_ttft_uncached_s: f64,
    chunks_computed: usize,
    chunks_loaded: usize,
    /// Loads overtaken by the compute worker (their I/O was spent for nothing).
    loads_abandoned: usize,
    failed: usize,
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.chunk > 0 && args.context >= args.chunk && args.requests > 0);
    anyhow::ensure!(args.io_concurrency > 0 && !args.loads.is_empty());
    anyhow::ensure!(
        args.mix.len() == 3
            && args.mix.iter().all(|&w| w >= 0.0)
            && args.mix.iter().sum::<f64>() > 0.0,
        "--mix takes three non-negative weights: cached,partial,uncached"
    );
    let engine = Arc::new(args.model.load()?);
    let tail = engine
        .tokenizer()
        .encode("\nQuestion: what does the context say?", false)?;
    let base: Vec<Vec<u32>> = bench_tokens(&engine, args.context)
        .chunks(args.chunk)
        .map(<[u32]>::to_vec)
        .collect();

    // The stored context: its exact prefix caches, computed once; the time it takes is the
    // compute-only service time of one request.
    let memory: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let writer = KvStore::for_engine(memory.clone(), Path::default(), &engine);
    let started = Instant::now();
    let mut cache = engine.new_cache();
    for chunk in &base {
        engine.append(&mut cache, chunk, args.chunk, false)?;
    }
    engine.append(&mut cache, &tail, args.chunk, true)?;
    let service_secs = started.elapsed().as_secs_f64();
    let keys = writer.prefix_chain(base.iter().map(Vec::as_slice));
    let starts = chunk_starts(base.iter().map(Vec::len));
    for ((key, tokens), w) in keys.iter().zip(&base).zip(starts.windows(2)) {
        writer.put(key, tokens, &cache.export(w[0]..w[1])?).await?;
    }
    drop(cache);
    eprintln!(
        "{} chunks of {} tokens; one request computed alone: {service_secs:.2} s",
        base.len(),
        args.chunk
    );

    let view = throttled(
        memory,
        Throttle {
            bytes_per_second: (args.bandwidth > 0.0).then_some(args.bandwidth * 1e6),
            ..Throttle::NONE
        },
    );
    let store = Arc::new(KvStore::for_engine(view, Path::default(), &engine));
    let mut rows = Vec::new();
    for &load in &args.loads {
        let rate = load / service_secs;
        let trace = make_trace(&engine, &base, &args, rate);
        for contender in CONTENDERS {
            let row = serve(&engine, &store, &tail, &trace, contender, &args).await?;
            eprintln!(
                "  load {load}: {:<24} {:.3} req/s, TTFT mean {:.2} s, p99 {:.2} s",
                contender.name, row.throughput_rps, row.mean_ttft_s, row.p99_ttft_s
            );
            rows.push(Row {
                load,
                offered_rps: rate,
                ..row
            });
        }
    }
    write_outputs(&args, &rows)
}

/// Requests with exponential inter-arrival times at `rate` per second; each is a copy of
/// the stored context, made unique from its first chunk (uncached) or its middle chunk
/// (partly cached) on, so the prefix keys from there on are absent.
fn make_trace(
    engine: &Engine,
    base: &[Vec<u32>],
    args: &ServeArgs,
    rate: f64,
) -> Vec<TraceRequest> {
    let mut rng = StdRng::seed_from_u64(args.seed);
    let total: f64 = args.mix.iter().sum();
    let mut next_unique = 1000u32;
    let mut at = 0.0f64;
    (0..args.requests)
        .map(|_| {
            at += -(1.0 - rng.random::<f64>()).ln() / rate;
            let pick = rng.random::<f64>() * total;
            let kind = if pick < args.mix[0] {
                Kind::Cached
            } else if pick < args.mix[0] + args.mix[1] {
                Kind::Partial
            } else {
                Kind::Uncached
            };
            let mut chunks = base.to_vec();
            let diverge = match kind {
                Kind::Cached => None,
                Kind::Partial => Some(chunks.len() / 2),
                Kind::Uncached => Some(0),
            };
            if let Some(i) = diverge {
                while engine.tokenizer().kind(next_unique) != Some(TokenKind::Normal)
                    || chunks[i][0] == next_unique
                {
                    next_unique += 1;
                }
                chunks[i][0] = next_unique;
                next_unique += 1;
            }
            TraceRequest {
                arrival: Duration::from_secs_f64(at),
                kind,
                chunks,
            }
        })
        .collect()
}

/// Replays the trace against a fresh scheduler run by `contender`.
async fn serve(
    engine: &Arc<Engine>,
    store: &Arc<KvStore>,
    tail: &[u32],
    trace: &[TraceRequest],
    contender: Contender,
    args: &ServeArgs,
) -> anyhow::Result<Row> {
    let config = SchedulerConfig {
        policy: contender.policy,
        io_concurrency: args.io_concurrency,
        // Computed chunks are not stored back, so the mix stays what the trace says.
        write_back: false,
        ..SchedulerConfig::default()
    };
    let scheduler = Arc::new(Scheduler::start(engine.clone(), store.clone(), config));
    let epoch = tokio::time::Instant::now();
    let tasks: Vec<_> = trace
        .iter()
        .map(|request| {
            let scheduler = scheduler.clone();
            let store = store.clone();
            let chunks = request.chunks.clone();
            let tail = tail.to_vec();
            let arrival = epoch + request.arrival;
            tokio::spawn(async move {
                tokio::time::sleep_until(arrival).await;
                let chunks = chunks.into_iter().map(PromptChunk::from).collect();
                let (request, _) = plan(&*store, chunks, tail, contender.mode.into()).await;
                let done = scheduler.prefill(request).await;
                let ttft = arrival.elapsed().as_secs_f64();
                done.map(|p| (ttft, p.report))
            })
        })
        .collect();
    let mut ttfts = Vec::new();
    let mut by_kind: [Vec<f64>; 3] = Default::default();
    let (mut computed, mut loaded, mut abandoned, mut failed) = (0, 0, 0, 0);
    for (task, request) in tasks.into_iter().zip(trace) {
        match task.await? {
            Ok((ttft, report)) => {
                ttfts.push(ttft);
                by_kind[request.kind as usize].push(ttft);
                computed += report.chunks_computed;
                loaded += report.chunks_loaded;
                abandoned += report.loads_abandoned;
            }
            Err(e) => {
                eprintln!("    request failed: {e}");
                failed += 1;
            }
        }
    }
    let makespan = epoch.elapsed().as_secs_f64() - trace[0].arrival.as_secs_f64();
    anyhow::ensure!(!ttfts.is_empty(), "every request failed");
    let mean = |xs: &[f64]| {
        if xs.is_empty() {
            f64::NAN
        } else {
            xs.iter().sum::<f64>() / xs.len() as f64
        }
    };
    let mean_ttft_s = mean(&ttfts);
    let stats = Stats::of(ttfts.clone());
    Ok(Row {
        load: 0.0,
        offered_rps: 0.0,
        contender: contender.name,
        throughput_rps: ttfts.len() as f64 / makespan,
        mean_ttft_s,
        p50_ttft_s: stats.median,
        p99_ttft_s: percentile(&ttfts, 0.99),
        max_ttft_s: stats.max,
        mean_ttft_cached_s: mean(&by_kind[Kind::Cached as usize]),
        mean_ttft_partial_s: mean(&by_kind[Kind::Partial as usize]),
        mean_ttft_uncached_s: mean(&by_kind[Kind::Uncached as usize]),
        chunks_computed: computed,
        chunks_loaded: loaded,
        loads_abandoned: abandoned,
        failed,
    })
}

fn write_outputs(args: &ServeArgs, rows: &[Row]) -> anyhow::Result<()> {
    write_csv(&args.csv, rows)?;
    let png = args.csv.with_extension("png");
    let series: Vec<plot::Series> = CONTENDERS
        .iter()
        .map(|c| plot::Series {
            name: c.name.to_string(),
            points: rows
                .iter()
                .filter(|r| r.contender == c.name)
                .map(|r| (r.throughput_rps, r.p99_ttft_s))
                .collect(),
        })
        .collect();
    let title = format!(
        "p99 TTFT vs throughput, {} tokens, {} MB/s per read",
        args.context, args.bandwidth
    );
    plot::line_plot_or_warn(
        &png,
        &title,
        "throughput (requests/s)",
        "p99 TTFT (s)",
        &series,
        false,
    );
    if args.json {
        return print_json(rows);
    }
    print_table(
        rows,
        &[
            "load",
            "contender",
            "throughput_rps",
            "mean_ttft_s",
            "p50_ttft_s",
            "p99_ttft_s",
            "mean_ttft_cached_s",
            "mean_ttft_partial_s",
            "mean_ttft_uncached_s",
            "chunks_computed",
            "chunks_loaded",
        ],
    )?;
    // The headline: at the highest offered load (every contender saturated), adaptive
    // throughput and p99 against the best baseline's, and against shared-pool FCFS.
    if let Some(&top) = args.loads.iter().max_by(|a, b| a.total_cmp(b)) {
        let at_top: Vec<&Row> = rows.iter().filter(|r| r.load == top).collect();
        let find = |name: &str| at_top.iter().find(|r| r.contender == name).copied();
        let best = at_top
            .iter()
            .filter(|r| {
                CONTENDERS
                    .iter()
                    .any(|c| c.baseline && c.name == r.contender)
            })
            .max_by(|a, b| a.throughput_rps.total_cmp(&b.throughput_rps))
            .copied();
        if let Some(adaptive) = find("adaptive bidirectional") {
            for base in [best, find("fcfs bidirectional")].into_iter().flatten() {
                println!(
                    "at load {top}: adaptive {:.3} req/s vs {} {:.3} req/s = {:+.0}% throughput; p99 TTFT {:.2} s vs {:.2} s",
                    adaptive.throughput_rps,
                    base.contender,
                    base.throughput_rps,
                    (adaptive.throughput_rps / base.throughput_rps - 1.0) * 100.0,
                    adaptive.p99_ttft_s,
                    base.p99_ttft_s
                );
            }
        }
    }
    Ok(())
}
