//! `ragcake bench ttft --dtypes f32,f16,int8`: the same context's stored caches in each
//! storage dtype, behind each throttled bandwidth: load-only and bidirectional TTFT, the
//! bytes a cached token costs, and whether the first token and its logits stay those of
//! full computation. The dtypes take turns going first in every repeat.

use std::sync::Arc;

use ragcake::engine::{DType, Engine, KvRange, Tensor};
use ragcake::kvstore::object_store::ObjectStore;
use ragcake::kvstore::object_store::memory::InMemory;
use ragcake::kvstore::object_store::path::Path;
use ragcake::kvstore::{CacheKind, KvStore, StorageDtype};
use ragcake::scheduler::{LoadBackend, Mode, Scheduler};
use serde::Serialize;

use super::report::{Stats, print_json, print_table, write_csv};
use super::ttft::{bench_scheduler_config, throttled_view, time_prefills};

/// One storage dtype at one bandwidth.
#[derive(Debug, Serialize)]
pub(super) struct DtypeRow {
    /// Context tokens (the chunks; the question tail comes on top).
    context: usize,
    backend: String,
    dtype: String,
    bytes_per_token: f64,
    load_only_s: f64,
    load_only_min: f64,
    load_only_max: f64,
    bidirectional_s: f64,
    bidirectional_min: f64,
    bidirectional_max: f64,
    /// Chunks the bidirectional runs computed (median).
    bidir_chunks_computed: f64,
    /// The load-only prompt's next token is full computation's.
    same_first_token: bool,
    /// Largest difference of the load-only prompt's last logits from full computation's.
    max_logit_diff: f64,
}

/// What the comparison needs from the context already measured.
pub(super) struct Context<'a> {
    pub engine: &'a Arc<Engine>,
    pub chunks: &'a [Vec<u32>],
    pub tail: &'a [u32],
    /// Full computation's KV of every chunk in context.
    pub kv: &'a [KvRange],
    /// Full computation's logits of the prompt's last token.
    pub logits: &'a Tensor,
}

/// Load-only and bidirectional TTFT of `context` for every dtype in `dtypes` behind every
/// bandwidth in `bandwidths` (MB/s per read, 0 = unthrottled memory).
pub(super) async fn compare(
    context: &Context<'_>,
    dtypes: &[StorageDtype],
    bandwidths: &[f64],
    io_concurrency: usize,
    repeats: usize,
) -> anyhow::Result<Vec<DtypeRow>> {
    let engine = context.engine;
    let memory: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let tokens: usize = context.chunks.iter().map(Vec::len).sum();
    // Each dtype's caches are stored once (their keys differ), as prefix caches: the
    // prompt's chunks in order, each continuing the ones before it.
    let mut bytes_per_token = Vec::new();
    let mut keys = Vec::new();
    for &dtype in dtypes {
        let writer = store(engine, memory.clone(), dtype);
        let chain = writer.prefix_chain(context.chunks.iter().map(Vec::as_slice));
        let mut bytes = 0;
        for ((key, tokens), range) in chain.iter().zip(context.chunks).zip(context.kv) {
            bytes += writer.put(key, tokens, range).await?;
        }
        bytes_per_token.push(bytes as f64 / tokens as f64);
        keys.push(chain);
    }
    let mut rows = Vec::new();
    for &mb in bandwidths {
        let (backend, view) = throttled_view(&memory, mb);
        let config = bench_scheduler_config(io_concurrency);
        let contenders: Vec<_> = dtypes
            .iter()
            .map(|&dtype| {
                let store = Arc::new(store(engine, view.clone(), dtype));
                let scheduler = Scheduler::start(engine.clone(), store.clone(), config.clone());
                (store, scheduler)
            })
            .collect();
        let n = dtypes.len();
        let mut samples = vec![Samples::default(); n];
        for repeat in 0..repeats {
            for turn in 0..n {
                let d = (turn + repeat) % n;
                let (store, scheduler) = &contenders[d];
                for mode in [Mode::LoadOnly, Mode::Bidirectional] {
                    let (ttft, reports, logits) =
                        time_prefills(store, context.chunks, context.tail, mode, 1, |r| {
                            Box::pin(scheduler.prefill(r))
                        })
                        .await?;
                    let report = &reports[0];
                    let sample = &mut samples[d];
                    match mode {
                        Mode::LoadOnly => {
                            anyhow::ensure!(
                                report.chunks_loaded == context.chunks.len(),
                                "a load-only run did not load every chunk: {:?}",
                                report.misses
                            );
                            sample.load_only.push(ttft.median);
                            sample.logits = Some(logits);
                        }
                        _ => {
                            sample.bidirectional.push(ttft.median);
                            sample.computed.push(report.chunks_computed as f64);
                        }
                    }
                }
            }
        }
        for (d, sample) in samples.into_iter().enumerate() {
            let logits = sample.logits.expect("a load-only run");
            let (same_first_token, max_logit_diff) = agreement(context.logits, &logits)?;
            let load_only = Stats::of(sample.load_only);
            let bidirectional = Stats::of(sample.bidirectional);
            eprintln!(
                "  {backend}, {}: load-only {:.2} s, bidirectional {:.2} s, max |Δ logit| {max_logit_diff:.4}",
                dtypes[d], load_only.median, bidirectional.median
            );
            rows.push(DtypeRow {
                context: tokens,
                backend: backend.clone(),
                dtype: dtypes[d].to_string(),
                bytes_per_token: bytes_per_token[d],
                load_only_s: load_only.median,
                load_only_min: load_only.min,
                load_only_max: load_only.max,
                bidirectional_s: bidirectional.median,
                bidirectional_min: bidirectional.min,
                bidirectional_max: bidirectional.max,
                bidir_chunks_computed: Stats::of(sample.computed).median,
                same_first_token,
                max_logit_diff,
            });
        }
    }
    Ok(rows)
}

/// One dtype's measurements at one bandwidth.
#[derive(Debug, Clone, Default)]
struct Samples {
    load_only: Vec<f64>,
    bidirectional: Vec<f64>,
    computed: Vec<f64>,
    logits: Option<Tensor>,
}

/// A store of `engine`'s caches over `backend` keeping prefix caches as `dtype`.
fn store(engine: &Engine, backend: Arc<dyn ObjectStore>, dtype: StorageDtype) -> KvStore {
    KvStore::for_engine(backend, Path::default(), engine)
        .with_storage_dtype_for(CacheKind::Prefix, dtype)
}

/// Whether `b` picks `a`'s next token, and the largest difference of their logits.
fn agreement(a: &Tensor, b: &Tensor) -> anyhow::Result<(bool, f64)> {
    let (a, b) = (
        a.to_dtype(DType::F32)?.flatten_all()?,
        b.to_dtype(DType::F32)?.flatten_all()?,
    );
    let same = a.argmax(0)?.to_scalar::<u32>()? == b.argmax(0)?.to_scalar::<u32>()?;
    let diff = (a - b)?.abs()?.max(0)?.to_scalar::<f32>()?;
    Ok((same, f64::from(diff)))
}

/// Writes `rows` to `<csv stem>-dtypes.csv` and prints them.
pub(super) fn write_outputs(
    csv: &std::path::Path,
    rows: &[DtypeRow],
    json: bool,
) -> anyhow::Result<()> {
    let stem = csv.file_stem().and_then(|s| s.to_str()).unwrap_or("ttft");
    write_csv(&csv.with_file_name(format!("{stem}-dtypes.csv")), rows)?;
    if json {
        return print_json(rows);
    }
    print_table(
        rows,
        &[
            "context",
            "backend",
            "dtype",
            "bytes_per_token",
            "load_only_s",
            "bidirectional_s",
            "bidir_chunks_computed",
            "same_first_token",
            "max_logit_diff",
        ],
    )
}
