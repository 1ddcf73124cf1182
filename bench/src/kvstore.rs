//! `ragcake bench kvstore`: load throughput of a 4k-token context from each backend and in
//! each storage dtype, through the KV store (GET + verify + decode) and as raw object_store
//! GETs of the same bytes, in one run. Every contender is read once untimed first; the dtypes
//! take turns within each repeat, and raw GETs and verified loads take turns going first.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use clap::Args;
use futures::{StreamExt, TryStreamExt};
use ragcake::engine::{Device, KvRange, Tensor};
use ragcake::kvstore::object_store::{ObjectStore, ObjectStoreExt};
use ragcake::kvstore::{CacheKey, KvStore, StorageDtype, Throttle, format, open_url, throttled};
use ragcake::scheduler::LoadBackend;
use serde::Serialize;

use super::ModelArgs;
use super::report::{Stats, print_json, print_table, write_csv};

#[derive(Debug, Args)]
pub struct KvstoreArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Context length in tokens.
    #[arg(long, default_value_t = 4096)]
    context: usize,
    /// Tokens per stored chunk.
    #[arg(long, default_value_t = 256)]
    chunk: usize,
    /// Concurrent reads.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Timed repeats (median reported).
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// Storage dtypes of the chunk caches, each measured on every backend.
    #[arg(long, value_delimiter = ',', default_value = "f16,int8", value_parser = crate::named::<StorageDtype>())]
    dtypes: Vec<StorageDtype>,
    /// Also a local directory read at this many MB/s per request (a load-bound store).
    #[arg(long, default_value_t = 20.0)]
    throttle_mb_s: f64,
    /// Also measure an S3 store (credentials and endpoint from AWS_* variables).
    #[arg(long, env = "RAGCAKE_BENCH_S3_URL")]
    s3_url: Option<String>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// CSV output.
    #[arg(long, default_value = "bench-results/kvstore.csv")]
    csv: PathBuf,
}

/// One backend's load throughput.
#[derive(Debug, Serialize)]
struct Row {
    backend: String,
    dtype: String,
    context: usize,
    chunk: usize,
    concurrency: usize,
    bytes: u64,
    bytes_per_token: f64,
    /// Raw object_store GETs of the same objects (median, min, max).
    raw_mb_s: f64,
    raw_min: f64,
    raw_max: f64,
    /// Verified loads through the KV store.
    kvstore_mb_s: f64,
    kvstore_min: f64,
    kvstore_max: f64,
    kvstore_tokens_s: f64,
    /// kvstore / raw (medians).
    ratio: f64,
    /// Median of each repeat's kvstore / raw, in the repeats where the raw GETs went
    /// first, and in those where the verified loads did (empty with a single repeat).
    ratio_raw_first: Option<f64>,
    ratio_kvstore_first: Option<f64>,
    /// Verify + decode alone, on bytes already in memory.
    decode_mb_s: f64,
    /// Share of a load spent verifying and decoding.
    decode_share: f64,
}

/// Synthetic KV of the model's shape: load throughput does not depend on the values, and
/// computing 4k tokens of real KV would dominate the benchmark's run time.
fn synthetic_chunk(
    shape: ragcake::engine::KvShape,
    base: usize,
    n: usize,
) -> anyhow::Result<KvRange> {
    let layers = (0..shape.n_layers)
        .map(|_| {
            let dims = (shape.n_kv_heads, n, shape.head_dim);
            Ok((
                Tensor::randn(0f32, 1.0, dims, &Device::Cpu)?,
                Tensor::randn(0f32, 1.0, dims, &Device::Cpu)?,
            ))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(KvRange::new(base, layers)?)
}

pub async fn run(args: KvstoreArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.repeats > 0 && args.chunk > 0 && args.concurrency > 0);
    let engine = args.model.load()?;
    let shape = engine.kv_shape();
    let model = engine.fingerprint();
    let chunks: Vec<(Vec<u32>, KvRange)> = (0..args.context.div_ceil(args.chunk))
        .map(|i| {
            let n = args.chunk.min(args.context - i * args.chunk);
            let tokens: Vec<u32> = (0..n as u32).map(|t| 1000 + t + 7 * i as u32).collect();
            Ok((tokens, synthetic_chunk(shape, 0, n)?))
        })
        .collect::<anyhow::Result<_>>()?;

    let dir = tempfile::tempdir()?;
    let local_url = |name: &str| format!("file://{}", dir.path().join(name).display());
    // (name, URL, memory tier, read through object_store even when local)
    let mut backends = vec![
        ("memory".to_string(), "memory://".to_string(), false, false),
        ("local dir".to_string(), local_url("direct"), false, false),
        (
            "local dir via object_store".to_string(),
            local_url("object-store"),
            false,
            true,
        ),
        (
            "local dir + memory tier".to_string(),
            local_url("tiered"),
            true,
            false,
        ),
    ];
    if let Some(url) = &args.s3_url {
        backends.push((
            "s3".to_string(),
            format!("{url}/bench-{}", std::process::id()),
            false,
            false,
        ));
    }
    // In memory behind a throttle (object_store's throttle cannot slow local files).
    let throttled_name = format!("memory at {} MB/s", args.throttle_mb_s);
    if args.throttle_mb_s > 0.0 {
        backends.push((
            throttled_name.clone(),
            "memory://".to_string(),
            false,
            false,
        ));
    }

    let mut rows = Vec::new();
    for (name, url, tier, via_object_store) in backends {
        let (mut object_store, prefix) = open_url(&url, Vec::new())?;
        if name == throttled_name {
            let throttle = Throttle {
                bytes_per_second: Some(args.throttle_mb_s * 1e6),
                latency: std::time::Duration::ZERO,
            };
            object_store = throttled(object_store, throttle);
        }
        // One store per dtype (its keys differ), filled once. A local directory opened by
        // URL reads its files straight into the caches' buffers; the raw GETs read the
        // same files through object_store.
        let mut contenders = Vec::new();
        for &dtype in &args.dtypes {
            let mut store = if url.starts_with("file://") && !via_object_store {
                KvStore::open(&url, Vec::new(), model, shape, Device::Cpu)?
            } else {
                KvStore::new(
                    object_store.clone(),
                    prefix.clone(),
                    model,
                    shape,
                    Device::Cpu,
                )
            }
            .with_storage_dtype(dtype);
            if tier {
                store = store.with_memory_tier(usize::MAX);
            }
            let mut keys = Vec::new();
            let mut total = 0u64;
            for (tokens, range) in &chunks {
                let key = store.chunk_key(&[], tokens);
                total += store.put(&key, tokens, range).await? as u64;
                keys.push((key, tokens.clone()));
            }
            contenders.push(Contender {
                dtype,
                store,
                keys,
                total,
                raw: Vec::new(),
                ours: Vec::new(),
                ratios_raw_first: Vec::new(),
                ratios_verified_first: Vec::new(),
                decode_secs: Vec::new(),
            });
        }
        // Every contender read once untimed (both ways), so none is timed cold.
        for c in &mut contenders {
            c.measure(&object_store, args.concurrency, Order::Warmup)
                .await?;
        }
        for repeat in 0..args.repeats {
            // The dtypes take turns going first, and so do raw GETs and verified loads.
            let n = contenders.len();
            let order = if repeat % 2 == 0 {
                Order::RawFirst
            } else {
                Order::VerifiedFirst
            };
            for k in 0..n {
                let c = &mut contenders[(k + repeat) % n];
                c.measure(&object_store, args.concurrency, order).await?;
            }
        }
        for c in contenders {
            rows.push(c.row(&name, tier, &args));
        }
    }
    write_outputs(&args, &rows)
}

/// Which read of a repeat goes first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Order {
    /// Both read, nothing recorded.
    Warmup,
    RawFirst,
    VerifiedFirst,
}

/// One storage dtype's store on one backend, and its timings.
struct Contender {
    dtype: StorageDtype,
    store: KvStore,
    keys: Vec<(CacheKey, Vec<u32>)>,
    total: u64,
    raw: Vec<f64>,
    ours: Vec<f64>,
    /// verified / raw of each repeat, by which went first.
    ratios_raw_first: Vec<f64>,
    ratios_verified_first: Vec<f64>,
    decode_secs: Vec<f64>,
}

impl Contender {
    /// Plain object_store GETs of every blob: seconds, and the bytes.
    async fn raw_reads(
        &self,
        object_store: &Arc<dyn ObjectStore>,
        concurrency: usize,
    ) -> anyhow::Result<(f64, Vec<Bytes>)> {
        let paths: Vec<_> = self
            .keys
            .iter()
            .map(|(k, _)| self.store.path_of(k))
            .collect();
        let t0 = Instant::now();
        let blobs = futures::stream::iter(paths)
            .map(|p| {
                let s = object_store.clone();
                async move { s.get(&p).await?.bytes().await }
            })
            .buffered(concurrency)
            .try_collect()
            .await?;
        Ok((t0.elapsed().as_secs_f64(), blobs))
    }

    /// Verified loads of every blob through the KV store: seconds.
    async fn verified_reads(&self, concurrency: usize) -> anyhow::Result<f64> {
        let t0 = Instant::now();
        let loaded: Vec<_> = futures::stream::iter(self.keys.iter())
            .map(|(k, t)| self.store.get(k, Some(t)))
            .buffered(concurrency)
            .try_collect()
            .await?;
        let secs = t0.elapsed().as_secs_f64();
        anyhow::ensure!(
            loaded.into_iter().all(|l| l.hit().is_some()),
            "a stored chunk did not load"
        );
        Ok(secs)
    }

    /// One repeat: raw GETs and verified loads in `order`, then decoding alone.
    async fn measure(
        &mut self,
        object_store: &Arc<dyn ObjectStore>,
        concurrency: usize,
        order: Order,
    ) -> anyhow::Result<()> {
        let (raw_secs, blobs, ours_secs) = if order == Order::VerifiedFirst {
            let ours = self.verified_reads(concurrency).await?;
            let (raw, blobs) = self.raw_reads(object_store, concurrency).await?;
            (raw, blobs, ours)
        } else {
            let (raw, blobs) = self.raw_reads(object_store, concurrency).await?;
            (raw, blobs, self.verified_reads(concurrency).await?)
        };
        let raw_rate = self.total as f64 / 1e6 / raw_secs;
        let ours_rate = self.total as f64 / 1e6 / ours_secs;
        match order {
            Order::Warmup => return Ok(()),
            Order::RawFirst => self.ratios_raw_first.push(ours_rate / raw_rate),
            Order::VerifiedFirst => self.ratios_verified_first.push(ours_rate / raw_rate),
        }
        self.raw.push(raw_rate);
        self.ours.push(ours_rate);

        // Decode alone (verify + tensors), on bytes already in memory.
        let (model, shape) = (self.store.fingerprint(), self.store.shape());
        let t0 = Instant::now();
        for ((key, tokens), blob) in self.keys.iter().zip(&blobs) {
            let expected = format::Expectation {
                key,
                model: &model,
                shape,
                tokens: Some(tokens),
            };
            format::decode(blob, &expected, &Device::Cpu).map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        self.decode_secs.push(t0.elapsed().as_secs_f64());
        Ok(())
    }

    fn row(self, backend: &str, tier: bool, args: &KvstoreArgs) -> Row {
        let raw = Stats::of(self.raw);
        let ours = Stats::of(self.ours);
        let total = self.total as f64;
        let load_secs = total / 1e6 / ours.median;
        let decode = Stats::of(self.decode_secs).median;
        eprintln!(
            "{backend} ({}): raw {:.0} MB/s, kvstore {:.0} MB/s ({:.0} tokens/s), decode alone {:.0} MB/s",
            self.dtype,
            raw.median,
            ours.median,
            args.context as f64 / load_secs,
            total / 1e6 / decode
        );
        Row {
            backend: backend.to_string(),
            dtype: self.dtype.to_string(),
            context: args.context,
            chunk: args.chunk,
            concurrency: args.concurrency,
            bytes: self.total,
            bytes_per_token: total / args.context as f64,
            kvstore_tokens_s: args.context as f64 / load_secs,
            ratio: ours.median / raw.median,
            ratio_raw_first: median(self.ratios_raw_first),
            ratio_kvstore_first: median(self.ratios_verified_first),
            decode_mb_s: total / 1e6 / decode,
            decode_share: if tier { 0.0 } else { decode / load_secs },
            raw_mb_s: raw.median,
            raw_min: raw.min,
            raw_max: raw.max,
            kvstore_mb_s: ours.median,
            kvstore_min: ours.min,
            kvstore_max: ours.max,
        }
    }
}

/// The median of `xs`, when there are any.
fn median(xs: Vec<f64>) -> Option<f64> {
    (!xs.is_empty()).then(|| Stats::of(xs).median)
}

fn write_outputs(args: &KvstoreArgs, rows: &[Row]) -> anyhow::Result<()> {
    write_csv(&args.csv, rows)?;
    if args.json {
        return print_json(rows);
    }
    println!(
        "{}-token context in {}-token chunks, {} concurrent reads, median of {} (min, max)",
        args.context, args.chunk, args.concurrency, args.repeats
    );
    print_table(
        rows,
        &[
            "backend",
            "dtype",
            "bytes_per_token",
            "raw_mb_s",
            "raw_min",
            "raw_max",
            "kvstore_mb_s",
            "kvstore_min",
            "kvstore_max",
            "ratio",
            "ratio_raw_first",
            "ratio_kvstore_first",
            "kvstore_tokens_s",
            "decode_share",
        ],
    )
}
