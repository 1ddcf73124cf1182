//! Command-line interface: argument parsing and dispatch.

mod bench;
mod bench_kvstore;
mod bench_ttft;
mod generate;
mod models;
mod plot;

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
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        command: bench::BenchCommand,
    },
}

/// Options shared by every command that loads the LLM.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// Path to a llama-family GGUF file [default: the fetched SmolLM2-135M-Instruct].
    #[arg(long, env = "RAGCAKE_MODEL")]
    model: Option<PathBuf>,
    /// Run on CUDA GPU N (needs a build with the `cuda` feature).
    #[arg(long, value_name = "N")]
    cuda: Option<usize>,
    /// Decode with the dense f32 weights instead of Q8_0 copies (slower, bit-for-bit the
    /// prefill arithmetic).
    #[arg(long)]
    dense_decode: bool,
}

impl ModelArgs {
    /// The GGUF path: the given one, or the default model, fetched on first use.
    fn model_path(&self) -> anyhow::Result<PathBuf> {
        if let Some(path) = &self.model {
            return Ok(path.clone());
        }
        let cache = ModelCache::default();
        if let Err(ragcake::models::ModelsError::NotFetched(_)) =
            cache.require(&ragcake::models::SMOLLM2)
        {
            eprintln!("fetching the default model into {}", cache.root().display());
            cache.fetch(&ragcake::models::SMOLLM2)?;
        }
        Ok(cache.require(&ragcake::models::SMOLLM2)?)
    }

    fn load(&self) -> anyhow::Result<Engine> {
        let path = self.model_path()?;
        let config = EngineConfig {
            device: self.cuda.map(DeviceChoice::Cuda).unwrap_or_default(),
            quantized_decode: !self.dense_decode,
            ..EngineConfig::default()
        };
        Ok(Engine::load(&path, &config)?)
    }
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
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Models { command } => models::run(command),
        Command::Generate(args) => generate::run(args),
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
