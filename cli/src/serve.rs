//! `ragcake serve`: the question-answering HTTP service.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;
use ragcake::pipeline::ServiceConfig;
use ragcake::pipeline::http;

use ragcake_bench::{ModelArgs, StoreArgs};

/// Settings come from the defaults, then the TOML file, then environment variables and
/// flags (the last one set wins).
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TOML configuration file (`[http]` and `[pipeline]` tables; see docs/ragcake.toml).
    #[arg(long, env = "RAGCAKE_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long, env = "RAGCAKE_LISTEN")]
    listen: Option<SocketAddr>,
    /// Questions answered at once; more wait in the queue.
    #[arg(long, env = "RAGCAKE_MAX_CONCURRENT")]
    max_concurrent: Option<usize>,
    /// Questions waiting; more are refused with 429.
    #[arg(long, env = "RAGCAKE_MAX_QUEUE")]
    max_queue: Option<usize>,
    /// Seconds before a question fails with 504 (queueing included).
    #[arg(long, env = "RAGCAKE_TIMEOUT_SECS")]
    timeout_secs: Option<f64>,
    /// Largest request body, bytes.
    #[arg(long, env = "RAGCAKE_MAX_BODY_BYTES")]
    max_body_bytes: Option<usize>,
    /// Model name clients pass to /v1/chat/completions.
    #[arg(long, env = "RAGCAKE_MODEL_NAME")]
    model_name: Option<String>,
    /// API keys required on the question routes, `KEY[=CACHE_SALT]` separated by commas
    /// (replaces `[http] api_keys`); each key is a tenant whose prefix caches are its own.
    #[arg(long, env = "RAGCAKE_API_KEYS", hide_env_values = true)]
    api_keys: Option<String>,
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    stores: StoreArgs,
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let mut config = match &args.config {
        Some(path) => ServiceConfig::load(path)?,
        None => ServiceConfig::default(),
    };
    let (http_config, pipeline_config) = (&mut config.http, &mut config.pipeline);
    if let Some(v) = args.listen {
        http_config.listen = v;
    }
    if let Some(v) = args.max_body_bytes {
        http_config.max_body_bytes = v;
    }
    if let Some(v) = args.model_name.clone() {
        http_config.model_name = v;
    }
    if let Some(v) = &args.api_keys {
        http_config.api_keys = ragcake::pipeline::ApiKey::parse_list(v)?;
    }
    if let Some(v) = args.max_concurrent {
        pipeline_config.max_concurrent = v;
    }
    if let Some(v) = args.max_queue {
        pipeline_config.max_queue = v;
    }
    if let Some(v) = args.timeout_secs {
        pipeline_config.timeout_secs = v;
    }
    ragcake_bench::tokio_runtime()?.block_on(async {
        let pipeline =
            ragcake_bench::build_pipeline(&args.model, &args.stores, config.pipeline.clone())
                .await?;
        let listener = tokio::net::TcpListener::bind(config.http.listen).await?;
        // The bound address on stdout, so a caller that asked for port 0 learns the port.
        println!("listening on http://{}", listener.local_addr()?);
        let router = http::router(pipeline, &config.http);
        http::serve(listener, router, &config.http, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
        Ok(())
    })
}
