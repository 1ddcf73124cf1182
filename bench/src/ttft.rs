//! `ragcake bench ttft`: time to first token of compute-only, load-only and bidirectional
//! prefill across storage bandwidths, beside lower bounds from the same run's costs (T*,
//! the best chunk-level split, and a layer-level bound no schedule can beat),
//! and of the layer split (the front chunks computed, then each chunk's bottom layers
//! computed while its top layers are loaded).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use crate::layer_split::{LayerSplitConfig, choose_split, prefill_layer_split};
use clap::Args;
use futures::StreamExt;
use futures::future::BoxFuture;
use ragcake::engine::{Engine, KvRange, Tensor};
use ragcake::kvstore::object_store::ObjectStore;
use ragcake::kvstore::object_store::memory::InMemory;
use ragcake::kvstore::object_store::path::Path;
use ragcake::kvstore::{CacheKey, KvStore, StorageDtype, Throttle, open_url, throttled};
use ragcake::scheduler::bounds::{ChunkCosts, prefill_bounds};
use ragcake::scheduler::dispatch::chunk_starts;
use ragcake::scheduler::{
    ComputeBackend, Filled, LoadBackend, Mode, Policy, PrefillReport, PrefillRequest, PromptChunk,
    Scheduler, SchedulerConfig, plan,
};
use serde::Serialize;

use super::prefill::bench_tokens;
use super::report::{Stats, print_json, print_table, write_csv};
use super::ttft_dtypes;
use super::{ModelArgs, plot};

#[derive(Debug, Args)]
pub struct TtftArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Context lengths in tokens (chunks plus a short question tail).
    #[arg(long, value_delimiter = ',', default_value = "1024,4096")]
    contexts: Vec<usize>,
    /// Tokens per chunk.
    #[arg(long, default_value_t = 256)]
    chunk: usize,
    /// Read bandwidths of one request to sweep, MB/s; 0 = unthrottled memory.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64,0")]
    bandwidths: Vec<f64>,
    /// Loads in flight at once.
    #[arg(long, default_value_t = 4)]
    io_concurrency: usize,
    /// Timed repeats (median reported).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Also measure an S3 store (credentials and endpoint from AWS_* variables).
    #[arg(long, env = "RAGCAKE_BENCH_S3_URL")]
    s3_url: Option<String>,
    /// Also compare these storage dtypes of the stored caches at every bandwidth
    /// (load-only and bidirectional TTFT, bytes per token, agreement with full
    /// computation), written beside the CSV as `<name>-dtypes.csv`; e.g. `f32,f16,int8`.
    #[arg(long, value_delimiter = ',', value_parser = crate::named::<StorageDtype>())]
    dtypes: Vec<StorageDtype>,
    /// After each context's sweep, also measure the crossover: the per-read bandwidth
    /// where load-only is as fast as compute-only, interpolated (in 1/bandwidth) between the
    /// two swept bandwidths on either side, with compute-only measured again in turn with
    /// the other modes.
    #[arg(long)]
    crossover: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// CSV output (the plot goes beside it as .png).
    #[arg(long, default_value = "bench-results/ttft.csv")]
    csv: PathBuf,
}

/// TTFT of one context over one backend, each mode the median (min, max) of the repeats.
#[derive(Debug, Serialize)]
struct Row {
    context: usize,
    backend: String,
    /// The bandwidth of one read, MB/s, for a throttled view of memory.
    read_mb_s: Option<f64>,
    /// Aggregate load throughput measured for this backend, MB/s.
    load_mb_s: f64,
    compute_only_s: f64,
    compute_only_min: f64,
    compute_only_max: f64,
    load_only_s: f64,
    load_only_min: f64,
    load_only_max: f64,
    /// The shared scheduler, splitting chunks at a layer where its cost model predicts a
    /// gain ([`SchedulerConfig::layer_split`]).
    bidirectional_s: f64,
    bidirectional_min: f64,
    bidirectional_max: f64,
    /// Chunks the bidirectional runs split at a layer (median).
    bidir_chunks_split: f64,
    /// The shared scheduler at the chunk level only (no layer split), in turn with
    /// `bidirectional` (each repeat alternates which goes first).
    chunk_level_s: f64,
    chunk_level_min: f64,
    chunk_level_max: f64,
    bidir_over_chunk_level: f64,
    /// T*: the chunk-level lower bound ([`prefill_bounds`]) from the costs this run's own
    /// prefills recorded ([`observed_costs`]) — each chunk's fastest compute at its position,
    /// its fastest read and import, the store's time per token in the load-only runs — and
    /// the chunks its split computes.
    t_star_s: f64,
    t_star_split: usize,
    /// The layer-level lower bound from the same costs: no schedule, with layer splits or
    /// without, can beat it.
    layer_bound_s: f64,
    /// The bidirectional median is below T* (with layer splits: below the layer bound) by
    /// more than its own spread: the costs were measured wrong.
    below_bound: bool,
    /// Chunks computed by bidirectional runs (median).
    bidir_chunks_computed: f64,
    bidir_over_t_star: f64,
    chunk_level_over_t_star: f64,
    bidir_over_best_single: f64,
    /// How far apart the two single modes are: |compute-only − load-only| over the faster.
    single_modes_apart: f64,
    /// Where the layer split divided the work (planned from the compute and load times
    /// measured in this run): chunks before `split_chunk` computed, layers from
    /// `split_layer` loaded.
    split_chunk: usize,
    split_layer: usize,
    /// The layer split's predicted TTFT.
    layer_split_predicted_s: f64,
    /// One request split at one layer for every chunk from `split_chunk` on
    /// ([`prefill_layer_split`]): bottom layers computed, top layers loaded.
    layer_split_s: f64,
    layer_split_min: f64,
    layer_split_max: f64,
    layer_split_over_bidir: f64,
}

/// One context, computed directly once, that every backend's row shares.
struct ContextBench<'a> {
    args: &'a TtftArgs,
    engine: &'a Arc<Engine>,
    context: usize,
    chunks: &'a [Vec<u32>],
    tail: &'a [u32],
    measured: &'a Computed,
}

/// A context's compute-only runs through the scheduler: their TTFTs and reports.
type ComputeOnlyRuns = Option<(Stats, Vec<PrefillReport>)>;

impl ContextBench<'_> {
    /// One backend's row. Every repeat runs the contenders in turn, each repeat starting
    /// one later; compute-only is one of them where `compute_only` is not measured yet (it
    /// reads nothing, so later rows of the context reuse it).
    async fn backend(
        &self,
        name: String,
        read_mb_s: Option<f64>,
        store: Arc<KvStore>,
        keys: &[CacheKey],
        compute_only: &mut ComputeOnlyRuns,
    ) -> anyhow::Result<Row> {
        let (args, engine, chunks, tail) = (self.args, self.engine, self.chunks, self.tail);
        let (load_total, bytes) = measure_loads(&store, keys, chunks, args.io_concurrency).await?;
        let (load_one, _) = measure_loads(&store, &keys[..1], &chunks[..1], 1).await?;
        let config = bench_scheduler_config(args.io_concurrency);
        let chunk_level = Scheduler::start(
            engine.clone(),
            store.clone(),
            SchedulerConfig {
                layer_split: false,
                ..config.clone()
            },
        );
        let scheduler = Scheduler::start(engine.clone(), store.clone(), config);
        // (mode, whether layer splits are allowed)
        let mut contenders = vec![
            (Mode::LoadOnly, true),
            (Mode::Bidirectional, true),
            (Mode::Bidirectional, false),
        ];
        if compute_only.is_none() {
            contenders.insert(0, (Mode::ComputeOnly, true));
        }
        let mut runs = vec![(Vec::new(), Vec::new()); contenders.len()];
        for repeat in 0..args.repeats {
            for turn in 0..contenders.len() {
                let which = (turn + repeat) % contenders.len();
                let (mode, layer_split) = contenders[which];
                let scheduler = if layer_split {
                    &scheduler
                } else {
                    &chunk_level
                };
                let (ttft, reports, _) = time_prefills(&store, chunks, tail, mode, 1, |r| {
                    Box::pin(scheduler.prefill(r))
                })
                .await?;
                runs[which].0.push(ttft.median);
                runs[which].1.extend(reports);
            }
        }
        let mut runs = runs
            .into_iter()
            .map(|(ttft, reports)| (Stats::of(ttft), reports));
        if compute_only.is_none() {
            *compute_only = runs.next();
        }
        let mut next = || runs.next().expect("one per contender");
        let ((load_only, load_only_reports), (bidirectional, bidir_reports)) = (next(), next());
        let (chunk_level, chunk_level_reports) = next();
        let median = |f: &dyn Fn(&PrefillReport) -> usize| {
            Stats::of(bidir_reports.iter().map(|r| f(r) as f64).collect()).median
        };
        let (computed, split_chunks) =
            (median(&|r| r.chunks_computed), median(&|r| r.chunks_split));

        let loads = LoadTimes {
            total: load_total,
            one: load_one,
            concurrency: args.io_concurrency,
        };
        let n = chunks.len();
        let (split, predicted) =
            choose_split(&self.measured.each, |m| loads.of(m, n), engine.layers());
        let split_config = LayerSplitConfig {
            split,
            io_concurrency: args.io_concurrency,
            load_timeout_secs: SchedulerConfig::default().load_timeout_secs,
        };
        let (layer_split, reports, _) = time_prefills(
            &store,
            chunks,
            tail,
            Mode::Bidirectional,
            args.repeats,
            |r| {
                Box::pin(prefill_layer_split(
                    engine.clone(),
                    store.clone(),
                    r,
                    &split_config,
                ))
            },
        )
        .await?;
        for report in &reports {
            anyhow::ensure!(
                report.chunks_loaded == n - split.chunk.min(n),
                "a layer-split run did not load every top: {:?}",
                report.misses
            );
        }
        let (compute_only, compute_only_reports) = compute_only.as_ref().expect("measured");
        let (costs, tail_cost) = observed_costs(
            self.measured,
            chunks,
            compute_only_reports,
            &load_only_reports,
            &[bidir_reports, chunk_level_reports].concat(),
        )?;
        let bounds = prefill_bounds(&costs, tail_cost);
        let t_star = bounds.chunk_level;
        let spread = bidirectional.max - bidirectional.min;
        let below_bound = bidirectional.median < bounds.layer_level - spread
            || chunk_level.median < t_star - (chunk_level.max - chunk_level.min);
        if below_bound {
            eprintln!(
                "  warning: {name}: measured below the bounds ({bounds:?}): the costs were measured wrong"
            );
        }
        let best_single = compute_only.median.min(load_only.median);
        eprintln!(
            "  {name}: compute-only {:.2} s, load-only {:.2} s, bidirectional {:.2} s, chunk level {:.2} s, T* {t_star:.2} s, layer split at chunk {} layer {} {:.2} s",
            compute_only.median,
            load_only.median,
            bidirectional.median,
            chunk_level.median,
            split.chunk,
            split.layer,
            layer_split.median
        );
        Ok(Row {
            context: self.context,
            backend: name,
            read_mb_s,
            load_mb_s: bytes as f64 / 1e6 / load_total,
            compute_only_s: compute_only.median,
            compute_only_min: compute_only.min,
            compute_only_max: compute_only.max,
            load_only_s: load_only.median,
            load_only_min: load_only.min,
            load_only_max: load_only.max,
            bidirectional_s: bidirectional.median,
            bidirectional_min: bidirectional.min,
            bidirectional_max: bidirectional.max,
            bidir_chunks_split: split_chunks,
            chunk_level_s: chunk_level.median,
            chunk_level_min: chunk_level.min,
            chunk_level_max: chunk_level.max,
            bidir_over_chunk_level: bidirectional.median / chunk_level.median,
            t_star_s: t_star,
            t_star_split: bounds.chunk_split,
            layer_bound_s: bounds.layer_level,
            below_bound,
            bidir_chunks_computed: computed,
            bidir_over_t_star: bidirectional.median / t_star,
            chunk_level_over_t_star: chunk_level.median / t_star,
            bidir_over_best_single: bidirectional.median / best_single,
            single_modes_apart: (compute_only.median - load_only.median).abs() / best_single,
            split_chunk: split.chunk,
            split_layer: split.layer,
            layer_split_predicted_s: predicted + self.measured.tail_secs,
            layer_split_s: layer_split.median,
            layer_split_min: layer_split.min,
            layer_split_max: layer_split.max,
            layer_split_over_bidir: layer_split.median / chunk_level.median,
        })
    }
}

/// How close compute-only and load-only must be at the crossover, and how many bandwidths
/// the benchmark tries to get there.
const CROSSOVER_APART: f64 = 0.10;
const CROSSOVER_ATTEMPTS: usize = 3;

/// The per-read bandwidth (MB/s, two decimals) where load-only would take `compute`
/// seconds, between the two adjacent measured bandwidths (`(MB/s, load-only s)`) whose
/// load-only times lie on either side of it, load-only taken as `a + b / bandwidth` through
/// those two; none without such a pair, or where that bandwidth is measured already.
fn crossover_bandwidth(points: &[(f64, f64)], compute: f64) -> Option<f64> {
    let mut points = points.to_vec();
    points.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mb = points.windows(2).find_map(|w| {
        let ((slow_mb, slow_t), (fast_mb, fast_t)) = (w[0], w[1]);
        if !(slow_t >= compute && compute >= fast_t) || slow_t == fast_t {
            return None;
        }
        let b = (slow_t - fast_t) / (1.0 / slow_mb - 1.0 / fast_mb);
        let a = fast_t - b / fast_mb;
        let mb = b / (compute - a);
        (mb.is_finite() && mb > 0.0).then(|| (mb * 100.0).round() / 100.0)
    })?;
    (!points.iter().any(|p| p.0 == mb)).then_some(mb)
}

/// What one backend needs: a name, the object store, its path prefix.
type Backend = (String, Arc<dyn ObjectStore>, Path);

/// A view of a store that gets a row, with its per-read bandwidth (MB/s) where throttled.
type View = (Backend, Option<f64>);

/// `memory` read at `mb` MB/s per read (0: unthrottled), and its name in the results.
pub(super) fn throttled_view(
    memory: &Arc<dyn ObjectStore>,
    mb: f64,
) -> (String, Arc<dyn ObjectStore>) {
    let (name, bytes_per_second) = if mb > 0.0 {
        (format!("{mb} MB/s per read"), Some(mb * 1e6))
    } else {
        ("memory".to_string(), None)
    };
    let throttle = Throttle {
        bytes_per_second,
        ..Throttle::NONE
    };
    (name, throttled(memory.clone(), throttle))
}

/// The scheduler the TTFT benchmarks time: first come first served, `io_concurrency`
/// reads, no write-back (the caches are stored already).
pub(super) fn bench_scheduler_config(io_concurrency: usize) -> SchedulerConfig {
    SchedulerConfig {
        policy: Policy::Fcfs,
        io_concurrency,
        write_back: false,
        ..SchedulerConfig::default()
    }
}

/// The local directory backend's name.
const LOCAL: &str = "local dir";

pub async fn run(args: TtftArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.repeats > 0 && args.chunk > 0 && args.io_concurrency > 0);
    let engine = Arc::new(args.model.load()?);
    let tail = engine
        .tokenizer()
        .encode("\nQuestion: what does the context say?", false)?;
    let (mut rows, mut dtype_rows) = (Vec::new(), Vec::new());
    for &context in &args.contexts {
        let tokens = bench_tokens(&engine, context);
        let chunks: Vec<Vec<u32>> = tokens.chunks(args.chunk).map(<[u32]>::to_vec).collect();
        let measured = measure_compute(&engine, &chunks, &tail, args.repeats)?;
        let kv = &measured.kv;
        let compute_total: f64 = measured.each.iter().sum();
        eprintln!(
            "context {context}: {} chunks, compute {compute_total:.2} s + tail {:.3} s",
            chunks.len(),
            measured.tail_secs
        );

        let memory: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let dir = tempfile::tempdir()?;
        // Each store, and the views of it measured.
        let mut stores: Vec<(Backend, Vec<View>)> = Vec::new();
        let throttled_views = args
            .bandwidths
            .iter()
            .map(|&mb| {
                let (name, store) = throttled_view(&memory, mb);
                ((name, store, Path::default()), (mb > 0.0).then_some(mb))
            })
            .collect();
        stores.push((
            ("memory".into(), memory.clone(), Path::default()),
            throttled_views,
        ));
        let local_url = format!("file://{}", dir.path().display());
        let (local, prefix) = open_url(&local_url, Vec::new())?;
        let local: Backend = (LOCAL.into(), local, prefix);
        stores.push((local.clone(), vec![(local, None)]));
        if let Some(url) = &args.s3_url {
            let (s3, prefix) = open_url(&format!("{url}/ttft-{}", std::process::id()), Vec::new())?;
            let s3: Backend = ("s3".into(), s3, prefix);
            stores.push((s3.clone(), vec![(s3, None)]));
        }

        let bench = ContextBench {
            args: &args,
            engine: &engine,
            context,
            chunks: &chunks,
            tail: &tail,
            measured: &measured,
        };
        let mut compute_only = None;
        let first_row = rows.len();
        for ((_, target, prefix), views) in stores {
            let writer = KvStore::for_engine(target, prefix.clone(), &engine);
            let keys = writer.prefix_chain(chunks.iter().map(Vec::as_slice));
            for ((key, tokens), range) in keys.iter().zip(&chunks).zip(kv) {
                writer.put(key, tokens, range).await?;
            }
            for ((name, view, _), read_mb_s) in views {
                // The local directory as users open it: by URL, its loads reading files
                // straight into the caches' buffers.
                let store = Arc::new(if name == LOCAL {
                    KvStore::open_for_engine(&local_url, Vec::new(), &engine)?
                } else {
                    KvStore::for_engine(view, prefix.clone(), &engine)
                });
                rows.push(
                    bench
                        .backend(name, read_mb_s, store, &keys, &mut compute_only)
                        .await?,
                );
            }
        }
        if args.crossover {
            // The compute-only time to meet: the context's, then each attempt's own (the
            // machine's speed drifts between runs).
            let mut compute = rows[first_row].compute_only_s;
            for _ in 0..CROSSOVER_ATTEMPTS {
                let points: Vec<(f64, f64)> = rows[first_row..]
                    .iter()
                    .filter_map(|r| Some((r.read_mb_s?, r.load_only_s)))
                    .collect();
                let Some(mb) = crossover_bandwidth(&points, compute) else {
                    eprintln!(
                        "  no crossover: no two measured bandwidths put load-only on both sides of compute-only ({compute:.2} s), or it is measured already"
                    );
                    break;
                };
                let (name, view) = throttled_view(&memory, mb);
                let store = Arc::new(KvStore::for_engine(view, Path::default(), &engine));
                let keys = store.prefix_chain(chunks.iter().map(Vec::as_slice));
                // Its own compute-only runs, in turn with the others: the two single modes
                // compared here are measured side by side.
                let mut fresh = None;
                let row = bench
                    .backend(name, Some(mb), store, &keys, &mut fresh)
                    .await?;
                eprintln!(
                    "  crossover at {mb} MB/s per read: compute-only and load-only {:.0}% apart, bidirectional {:.2}x the better one",
                    100.0 * row.single_modes_apart,
                    row.bidir_over_best_single
                );
                let met = row.single_modes_apart <= CROSSOVER_APART;
                compute = row.compute_only_s;
                rows.push(row);
                if met {
                    break;
                }
            }
        }
        if args.dtypes.len() > 1 {
            eprintln!("context {context}: storage dtypes {:?}", args.dtypes);
            let context = ttft_dtypes::Context {
                engine: &engine,
                chunks: &chunks,
                tail: &tail,
                kv,
                logits: &measured.logits,
            };
            dtype_rows.extend(
                ttft_dtypes::compare(
                    &context,
                    &args.dtypes,
                    &args.bandwidths,
                    args.io_concurrency,
                    args.repeats,
                )
                .await?,
            );
        }
    }
    if !dtype_rows.is_empty() {
        ttft_dtypes::write_outputs(&args.csv, &dtype_rows, args.json)?;
    }
    write_outputs(&args, &rows)
}

/// Plans and times `repeats` prefills of the context by `prefill`; returns the TTFTs,
/// every run's report and the last run's logits of the prompt's last token.
pub(super) async fn time_prefills<'a>(
    store: &KvStore,
    chunks: &[Vec<u32>],
    tail: &[u32],
    mode: Mode,
    repeats: usize,
    prefill: impl Fn(
        PrefillRequest<CacheKey>,
    ) -> BoxFuture<'a, ragcake::scheduler::Result<Filled<Engine>>>,
) -> anyhow::Result<(Stats, Vec<PrefillReport>, Tensor)> {
    let (mut ttft, mut reports, mut logits) = (Vec::new(), Vec::new(), None);
    for _ in 0..repeats {
        let chunks = chunks.iter().cloned().map(PromptChunk::from).collect();
        let (request, _) = plan(store, chunks, tail.to_vec(), mode.into()).await;
        let started = Instant::now();
        let done = prefill(request).await?;
        // GPU kernels run asynchronously: the first token exists once the device is done.
        done.logits.device().synchronize()?;
        ttft.push(started.elapsed().as_secs_f64());
        reports.push(done.report);
        logits = Some(done.logits);
    }
    let logits = logits.ok_or_else(|| anyhow::anyhow!("no repeats"))?;
    Ok((Stats::of(ttft), reports, logits))
}

/// Full computation of a context, measured.
struct Computed {
    /// Seconds per chunk at its position (median of the repeats).
    each: Vec<f64>,
    /// Seconds of the question tail.
    tail_secs: f64,
    /// The fastest of the repeats, per chunk and for the tail: a bound's costs.
    fastest: Vec<f64>,
    tail_fastest: f64,
    /// The KV of every chunk in context (from the last repeat, so the context is not
    /// computed once more just to be stored).
    kv: Vec<KvRange>,
    /// Logits of the prompt's last token.
    logits: Tensor,
}

/// Computes the context `repeats` times, timing each chunk and the tail.
fn measure_compute(
    engine: &Engine,
    chunks: &[Vec<u32>],
    tail: &[u32],
    repeats: usize,
) -> anyhow::Result<Computed> {
    let mut per_chunk = vec![Vec::new(); chunks.len()];
    let mut tails = Vec::new();
    let mut kv = Vec::new();
    let mut logits = None;
    for _ in 0..repeats {
        let mut cache = engine.new_cache();
        for (i, chunk) in chunks.iter().enumerate() {
            let started = Instant::now();
            engine.append(&mut cache, chunk, 512, false)?;
            per_chunk[i].push(started.elapsed().as_secs_f64());
        }
        let started = Instant::now();
        logits = engine.append(&mut cache, tail, 512, true)?;
        tails.push(started.elapsed().as_secs_f64());
        let starts = chunk_starts(chunks.iter().map(Vec::len));
        kv = starts
            .windows(2)
            .map(|w| cache.export(w[0]..w[1]))
            .collect::<Result<_, _>>()?;
    }
    let per_chunk: Vec<Stats> = per_chunk.into_iter().map(Stats::of).collect();
    let tails = Stats::of(tails);
    Ok(Computed {
        each: per_chunk.iter().map(|t| t.median).collect(),
        fastest: per_chunk.iter().map(|t| t.min).collect(),
        tail_secs: tails.median,
        tail_fastest: tails.min,
        kv,
        logits: logits.ok_or_else(|| anyhow::anyhow!("no repeats or no logits"))?,
    })
}

/// Seconds to load every chunk with `concurrency` reads in flight, and the bytes read.
async fn measure_loads(
    store: &KvStore,
    keys: &[CacheKey],
    chunks: &[Vec<u32>],
    concurrency: usize,
) -> anyhow::Result<(f64, u64)> {
    let started = Instant::now();
    let loaded: Vec<_> = futures::stream::iter(keys.iter().zip(chunks))
        .map(|(key, tokens)| store.get(key, Some(tokens)))
        .buffered(concurrency)
        .collect()
        .await;
    let secs = started.elapsed().as_secs_f64();
    let mut bytes = 0;
    for lookup in loaded {
        let range = lookup?
            .hit()
            .ok_or_else(|| anyhow::anyhow!("a stored chunk did not load"))?;
        bytes += range.bytes() as u64;
    }
    Ok((secs, bytes))
}

/// Measured load times: all chunks with the loader's concurrency, and one chunk alone.
struct LoadTimes {
    total: f64,
    one: f64,
    concurrency: usize,
}

impl LoadTimes {
    /// Seconds to load `m` of `n` chunks: bounded by rounds of concurrent single loads
    /// (latency, per-read bandwidth) and by the aggregate rate.
    fn of(&self, m: usize, n: usize) -> f64 {
        let rounds = m.div_ceil(self.concurrency) as f64 * self.one;
        rounds.max(self.total * m as f64 / n as f64)
    }
}

/// Each chunk's costs as this context's runs saw them, and the tail's: the fastest of every
/// observation of the same work, so the bounds built from them hold for every run they came
/// from. Compute at each chunk's position: the direct measurement and the scheduler's
/// compute-only runs; reads and imports: every run that read or imported the chunk whole;
/// the store's time per chunk: its share (by tokens) of the load-only runs' read phase, from
/// the first read's start to the last read's end — the store at the run's I/O concurrency.
fn observed_costs(
    direct: &Computed,
    chunks: &[Vec<u32>],
    compute_only: &[PrefillReport],
    load_only: &[PrefillReport],
    others: &[PrefillReport],
) -> anyhow::Result<(Vec<ChunkCosts>, f64)> {
    let fastest = |values: &mut dyn Iterator<Item = f64>| values.fold(f64::INFINITY, f64::min);
    let every = || compute_only.iter().chain(load_only).chain(others);
    let read_phase = fastest(&mut load_only.iter().map(|r| {
        let spans = r.chunk_timings.iter().filter_map(|t| t.read_span);
        let (first, last) = spans.fold((f64::INFINITY, 0.0f64), |(a, b), (s, e)| {
            (a.min(s), b.max(e))
        });
        last - first
    }));
    let tokens: usize = chunks.iter().map(Vec::len).sum();
    let costs = chunks
        .iter()
        .enumerate()
        .map(|(i, chunk)| {
            let timings = || every().filter_map(move |r| r.chunk_timings.get(i));
            let costs = ChunkCosts {
                compute: direct.fastest[i].min(fastest(
                    &mut compute_only
                        .iter()
                        .filter_map(|r| r.chunk_timings.get(i)?.computed_secs),
                )),
                read: fastest(&mut timings().filter_map(|t| t.read_span.map(|(s, e)| e - s))),
                store: read_phase * chunk.len() as f64 / tokens as f64,
                import: fastest(&mut timings().filter_map(|t| t.imported_secs)),
            };
            anyhow::ensure!(
                [costs.compute, costs.read, costs.store, costs.import]
                    .iter()
                    .all(|c| c.is_finite()),
                "chunk {i} was not both computed and loaded in the runs: {costs:?}"
            );
            Ok(costs)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let tail = direct
        .tail_fastest
        .min(fastest(&mut compute_only.iter().map(|r| r.tail_secs)));
    Ok((costs, tail))
}

fn write_outputs(args: &TtftArgs, rows: &[Row]) -> anyhow::Result<()> {
    write_csv(&args.csv, rows)?;
    if let Some(&context) = args.contexts.iter().max() {
        let png = args.csv.with_extension("png");
        let mut swept: Vec<&Row> = rows
            .iter()
            .filter(|r| r.context == context && r.read_mb_s.is_some())
            .collect();
        swept.sort_by(|a, b| a.load_mb_s.total_cmp(&b.load_mb_s));
        let line = |name: &str, f: &dyn Fn(&Row) -> f64| plot::Series {
            name: name.to_string(),
            points: swept.iter().map(|r| (r.load_mb_s, f(r))).collect(),
        };
        let series = [
            line("compute-only", &|r| r.compute_only_s),
            line("load-only", &|r| r.load_only_s),
            line("bidirectional", &|r| r.bidirectional_s),
            line("bidirectional, chunk level", &|r| r.chunk_level_s),
            line("T* (chunk-level bound)", &|r| r.t_star_s),
            line("layer-level bound", &|r| r.layer_bound_s),
            line("layer split", &|r| r.layer_split_s),
        ];
        let title = format!(
            "TTFT, {context}-token context, {} concurrent reads",
            args.io_concurrency
        );
        plot::line_plot_or_warn(
            &png,
            &title,
            "load throughput (MB/s, log)",
            "TTFT (s)",
            &series,
            true,
        );
    }
    if args.json {
        return print_json(rows);
    }
    print_table(
        rows,
        &[
            "context",
            "backend",
            "load_mb_s",
            "compute_only_s",
            "load_only_s",
            "bidirectional_s",
            "bidir_chunks_split",
            "chunk_level_s",
            "t_star_s",
            "t_star_split",
            "layer_bound_s",
            "below_bound",
            "bidir_over_t_star",
            "chunk_level_over_t_star",
            "bidir_over_best_single",
            "single_modes_apart",
            "layer_split_s",
            "split_chunk",
            "split_layer",
        ],
    )?;
    let mean = |f: &dyn Fn(&Row) -> f64| rows.iter().map(f).sum::<f64>() / rows.len().max(1) as f64;
    println!(
        "mean speedup of bidirectional: {:.2}x over compute-only, {:.2}x over load-only",
        mean(&|r| r.compute_only_s / r.bidirectional_s),
        mean(&|r| r.load_only_s / r.bidirectional_s)
    );
    let ratio_summary = |label: &str, ratio: &dyn Fn(&Row) -> f64| {
        let worst = rows.iter().map(ratio).fold(0.0, f64::max);
        let best = rows.iter().map(ratio).fold(f64::INFINITY, f64::min);
        println!(
            "{label}: mean {:.2}, best {best:.2}, worst {worst:.2}",
            mean(ratio)
        );
    };
    ratio_summary("bidirectional with layer splits / chunk level only", &|r| {
        r.bidir_over_chunk_level
    });
    ratio_summary(
        "one request split at one layer / chunk-level bidirectional",
        &|r| r.layer_split_over_bidir,
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::crossover_bandwidth;

    #[test]
    fn the_crossover_is_interpolated_in_inverse_bandwidth_between_the_bracketing_points() {
        // Load-only = 0.5 + 10 / bandwidth: 5.5 s at 2 MB/s, 3 s at 4; compute-only 4.5 s
        // meets it at 10 / 4 = 2.5 MB/s.
        let points = [(16.0, 1.125), (2.0, 5.5), (4.0, 3.0), (1.0, 10.5)];
        assert_eq!(crossover_bandwidth(&points, 4.5), Some(2.5));
        // Faster than every load, slower than every load, or already measured: none.
        assert_eq!(crossover_bandwidth(&points, 0.5), None);
        assert_eq!(crossover_bandwidth(&points, 11.0), None);
        assert_eq!(crossover_bandwidth(&points, 3.0), None);
    }
}
