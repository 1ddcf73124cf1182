//! The question-answering HTTP service embedded in your own program: a pipeline on the
//! defaults, served on loopback, with one extra route of your own beside ragcake's.
//!
//! ```sh
//! cargo run --release --example qa_service -- 127.0.0.1:8080
//! curl -s localhost:8080/v1/ask -H 'content-type: application/json' \
//!      -d '{"question": "What is the name of the ferry that sails to Varrow?"}'
//! ```

use axum::routing::get;
use ragcake::pipeline::{HttpConfig, http};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let listen = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8080".into())
        .parse()?;
    let pipeline = ragcake::default_pipeline_builder()?.build().await?;
    let config = HttpConfig {
        listen,
        ..HttpConfig::default()
    };
    let router =
        http::router(pipeline, &config).route("/hello", get(|| async { "ragcake QA service\n" }));
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    println!("listening on http://{}", listener.local_addr()?);
    http::serve(listener, router, &config, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    Ok(())
}
