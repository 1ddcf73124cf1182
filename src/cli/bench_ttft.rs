//! `ragcake bench ttft`: time to first token of compute-only, load-only and bidirectional
//! prefill across storage bandwidths, beside lower bounds from the same run's costs (T*,
//! the best chunk-level split, and a layer-level bound no schedule can beat),
//! and of the layer split (the front chunks computed, then each chunk's bottom layers
//! computed while its top layers are loaded).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use clap::Args;
use futures::StreamExt;
use futures::future::BoxFuture;
use ragcake::engine::scheduler::bounds::{Bounds, ChunkCosts, prefill_bounds};
use ragcake::engine::scheduler::dispatch::chunk_starts;
use ragcake::engine::scheduler::layer_split::{
    LayerSplitConfig, choose_split, prefill_layer_split,
};
use ragcake::engine::scheduler::{
    ComputeBackend, Filled, LoadBackend, Mode, Policy, PrefillReport, PrefillRequest, PromptChunk,
    Scheduler, SchedulerConfig, plan,
};
use ragcake::engine::{Engine, KvRange, Tensor};
use ragcake::kvstore::object_store::ObjectStore;
use ragcake::kvstore::object_store::memory::InMemory;
use ragcake::kvstore::object_store::path::Path;
use ragcake::kvstore::{CacheKey, CacheKind, KvStore, StorageDtype, Throttle, open_url, throttled};
use serde::Serialize;

use super::bench::bench_tokens;
use super::bench_ttft_dtypes;
use super::report::{Stats, print_json, print_table, write_csv};
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
    #[arg(long, value_delimiter = ',')]
    dtypes: Vec<StorageDtype>,
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
    /// T*: the chunk-level lower bound ([`prefill_bounds`]) from this run's costs — each
    /// chunk's fastest compute at its position, its import as loaded, one read's load time
    /// with the reads the store sustains at once — and the chunks its split computes.
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

/// What one backend needs: a name, the object store, its path prefix.
type Backend = (String, Arc<dyn ObjectStore>, Path);

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
        let (compute_each, tail_secs, kv) = (&measured.each, measured.tail_secs, &measured.kv);
        let compute_total: f64 = compute_each.iter().sum();
        eprintln!(
            "context {context}: {} chunks, compute {compute_total:.2} s + tail {tail_secs:.3} s",
            chunks.len()
        );

        let memory: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let dir = tempfile::tempdir()?;
        let mut stores: Vec<(Backend, Vec<Backend>)> = Vec::new();
        let throttled_views = args
            .bandwidths
            .iter()
            .map(|&mb| {
                let (name, store) = throttled_view(&memory, mb);
                (name, store, Path::default())
            })
            .collect();
        stores.push((
            ("memory".into(), memory.clone(), Path::default()),
            throttled_views,
        ));
        let local_url = format!("file://{}", dir.path().display());
        let (local, prefix) = open_url(&local_url, Vec::new())?;
        let local: Backend = (LOCAL.into(), local, prefix);
        stores.push((local.clone(), vec![local]));
        if let Some(url) = &args.s3_url {
            let (s3, prefix) = open_url(&format!("{url}/ttft-{}", std::process::id()), Vec::new())?;
            let s3: Backend = ("s3".into(), s3, prefix);
            stores.push((s3.clone(), vec![s3]));
        }

        let mut compute_only: Option<Stats> = None;
        for ((_, target, prefix), views) in stores {
            let writer = KvStore::for_engine(target, prefix.clone(), &engine);
            let keys = writer.prefix_chain(chunks.iter().map(Vec::as_slice));
            for ((key, tokens), range) in keys.iter().zip(&chunks).zip(kv) {
                writer.put(key, tokens, range).await?;
            }
            for (name, view, _) in views {
                // The local directory as users open it: by URL, its loads reading files
                // straight into the caches' buffers.
                let store = Arc::new(if name == LOCAL {
                    KvStore::open_for_engine(&local_url, Vec::new(), &engine)?
                } else {
                    KvStore::for_engine(view, prefix.clone(), &engine)
                });
                let (load_total, bytes) =
                    measure_loads(&store, &keys, &chunks, args.io_concurrency).await?;
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
                let run_mode = async |mode: Mode| -> anyhow::Result<(Stats, f64)> {
                    let (ttft, reports, _) =
                        time_prefills(&store, &chunks, &tail, mode, args.repeats, |r| {
                            Box::pin(scheduler.prefill(r))
                        })
                        .await?;
                    let computed = reports.iter().map(|r| r.chunks_computed as f64);
                    Ok((ttft, Stats::of(computed.collect()).median))
                };
                if compute_only.is_none() {
                    compute_only = Some(run_mode(Mode::ComputeOnly).await?.0);
                }
                let (load_only, _) = run_mode(Mode::LoadOnly).await?;
                // Splitting at layers or not, in turns: each repeat swaps which goes first.
                let (mut with_split, mut without) = (Vec::new(), Vec::new());
                let (mut computed, mut split_chunks) = (Vec::new(), Vec::new());
                for repeat in 0..args.repeats {
                    for split_first in [repeat % 2 == 0, repeat % 2 == 1] {
                        let scheduler = if split_first {
                            &scheduler
                        } else {
                            &chunk_level
                        };
                        let (ttft, reports, _) =
                            time_prefills(&store, &chunks, &tail, Mode::Bidirectional, 1, |r| {
                                Box::pin(scheduler.prefill(r))
                            })
                            .await?;
                        if split_first {
                            with_split.push(ttft.median);
                            computed.push(reports[0].chunks_computed as f64);
                            split_chunks.push(reports[0].chunks_split as f64);
                        } else {
                            without.push(ttft.median);
                        }
                    }
                }
                let bidirectional = Stats::of(with_split);
                let chunk_level = Stats::of(without);
                let computed = Stats::of(computed).median;
                let split_chunks = Stats::of(split_chunks).median;
                let import_each = import_secs(&engine, &store, kv)?;
                let loads = LoadTimes {
                    total: load_total,
                    one: load_one,
                    concurrency: args.io_concurrency,
                };
                let n = chunks.len();
                let (split, predicted) =
                    choose_split(compute_each, |m| loads.of(m, n), engine.layers());
                let split_config = LayerSplitConfig {
                    split,
                    io_concurrency: args.io_concurrency,
                    load_timeout_secs: SchedulerConfig::default().load_timeout_secs,
                };
                let (layer_split, reports, _) = time_prefills(
                    &store,
                    &chunks,
                    &tail,
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
                let compute_only = compute_only.expect("measured");
                let bounds = loads.bounds(&measured, &import_each);
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
                    "  {name}: compute-only {:.2} s, load-only {:.2} s, bidirectional {:.2} s, T* {t_star:.2} s, layer split at chunk {} layer {} {:.2} s",
                    compute_only.median,
                    load_only.median,
                    bidirectional.median,
                    split.chunk,
                    split.layer,
                    layer_split.median
                );
                rows.push(Row {
                    context,
                    backend: name,
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
                    split_chunk: split.chunk,
                    split_layer: split.layer,
                    layer_split_predicted_s: predicted + tail_secs,
                    layer_split_s: layer_split.median,
                    layer_split_min: layer_split.min,
                    layer_split_max: layer_split.max,
                    layer_split_over_bidir: layer_split.median / chunk_level.median,
                });
            }
        }
        if args.dtypes.len() > 1 {
            eprintln!("context {context}: storage dtypes {:?}", args.dtypes);
            let context = bench_ttft_dtypes::Context {
                engine: &engine,
                chunks: &chunks,
                tail: &tail,
                kv,
                logits: &measured.logits,
            };
            dtype_rows.extend(
                bench_ttft_dtypes::compare(
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
        bench_ttft_dtypes::write_outputs(&args.csv, &dtype_rows, args.json)?;
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
    prefill: impl Fn(PrefillRequest<CacheKey>) -> BoxFuture<'a, ragcake::engine::Result<Filled<Engine>>>,
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

/// Seconds to import each chunk's cache, in the dtype a load from `store` gives it, into a
/// cache (the fastest of two).
fn import_secs(engine: &Engine, store: &KvStore, kv: &[KvRange]) -> anyhow::Result<Vec<f64>> {
    let loaded = store.storage_dtype(CacheKind::Prefix).loaded_dtype();
    let once = || -> anyhow::Result<Vec<f64>> {
        let mut cache = engine.new_cache();
        kv.iter()
            .map(|range| {
                let stored = range.to_dtype(loaded)?;
                let started = Instant::now();
                engine.import(&mut cache, &stored)?;
                Ok(started.elapsed().as_secs_f64())
            })
            .collect()
    };
    let (a, b) = (once()?, once()?);
    Ok(a.iter().zip(&b).map(|(x, y)| x.min(*y)).collect())
}

/// Measured load times: all chunks with the loader's concurrency, and one chunk alone.
struct LoadTimes {
    total: f64,
    one: f64,
    concurrency: usize,
}

impl LoadTimes {
    /// The lower bounds from this run's costs: each chunk's fastest compute, its import,
    /// one read's load, and as many reads at once as the store sustained (the measured
    /// aggregate over one read's time, at most the concurrency).
    fn bounds(&self, computed: &Computed, import_each: &[f64]) -> Bounds {
        let n = computed.fastest.len();
        let parallel = (n as f64 * self.one / self.total).clamp(1.0, self.concurrency as f64);
        let chunks: Vec<ChunkCosts> = computed
            .fastest
            .iter()
            .zip(import_each)
            .map(|(&compute, &import)| ChunkCosts {
                compute,
                load: self.one,
                import,
            })
            .collect();
        prefill_bounds(&chunks, computed.tail_fastest, parallel)
    }

    /// Seconds to load `m` of `n` chunks: bounded by rounds of concurrent single loads
    /// (latency, per-read bandwidth) and by the aggregate rate.
    fn of(&self, m: usize, n: usize) -> f64 {
        let rounds = m.div_ceil(self.concurrency) as f64 * self.one;
        rounds.max(self.total * m as f64 / n as f64)
    }
}

fn write_outputs(args: &TtftArgs, rows: &[Row]) -> anyhow::Result<()> {
    write_csv(&args.csv, rows)?;
    if let Some(&context) = args.contexts.iter().max() {
        let png = args.csv.with_extension("png");
        let swept: Vec<&Row> = rows
            .iter()
            .filter(|r| r.context == context && r.backend.ends_with("per read"))
            .collect();
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
