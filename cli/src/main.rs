//! The `ragcake` command line: argument parsing and dispatch. The benchmarks and the
//! calibration are `ragcake-bench`'s, as are the options every command shares.

mod ask;
mod generate;
mod ingest;
mod kv;
mod models;
mod serve;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ragcake_bench::{BenchCommand, calibrate};

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
        command: BenchCommand,
    },
}

/// Parses the command line and runs the command; errors are printed, not panicked.
fn main() -> ExitCode {
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
        Command::Bench { command } => ragcake_bench::run(command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
