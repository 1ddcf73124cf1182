//! ragcake as a library: a pipeline on the embedded defaults, one question answered whole,
//! one streamed.
//!
//! ```sh
//! cargo run --release --example precompute -- demo/corpus   # index the demo corpus once
//! cargo run --release --example quickstart -- "Who founded the observatory on the island?"
//! ```

use std::io::Write;

use futures::StreamExt;
use ragcake::pipeline::{AskRequest, StreamEvent};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let question = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "In what year was Varrow Head Lighthouse first lit?".into());

    // The default models (fetched on first use), embedded Qdrant and the local KV
    // directory under $RAGCAKE_HOME/data (or RAGCAKE_INDEX and RAGCAKE_KV).
    let pipeline = ragcake::default_pipeline_builder()?.build().await?;
    anyhow::ensure!(
        pipeline.retriever().index().count().await? > 0,
        "the index is empty: run the precompute example (or `ragcake ingest`) first"
    );

    // A whole answer, with its sources and where the time went.
    let answer = pipeline.ask(AskRequest::new(&question)).await?;
    println!("Q: {question}\nA: {}", answer.text.trim());
    for source in &answer.sources {
        println!("   from {} #{}", source.doc_id, source.chunk_no);
    }
    let b = &answer.breakdown;
    println!(
        "   TTFT {:.2} s: {} chunks computed, {} loaded",
        b.ttft_secs, b.prefill.chunks_computed, b.prefill.chunks_loaded
    );

    // The same question streamed: sources first, then text as it is generated.
    let mut events = std::pin::pin!(pipeline.ask_stream(AskRequest::new(&question)));
    print!("streamed: ");
    while let Some(event) = events.next().await {
        match event? {
            StreamEvent::Sources(sources) => print!("({} sources) ", sources.len()),
            StreamEvent::Text(piece) => print!("{piece}"),
            StreamEvent::Done(answer) => println!(
                "\n   TTFT {:.2} s: {} chunks loaded",
                answer.breakdown.ttft_secs, answer.breakdown.prefill.chunks_loaded
            ),
        }
        std::io::stdout().flush()?;
    }
    Ok(())
}
