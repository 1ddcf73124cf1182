//! `ragcake generate …`

use std::io::Write;
use std::ops::ControlFlow;

use clap::Args;
use ragcake::engine::{ChatMessage, GenerateParams, Role, Sampling};

use ragcake_bench::ModelArgs;

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The user message.
    prompt: String,
    /// A system message (else the model's default).
    #[arg(long)]
    system: Option<String>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Nucleus sampling mass.
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let engine = args.model.load()?;
    let mut messages = Vec::new();
    if let Some(system) = &args.system {
        messages.push(ChatMessage::new(Role::System, system));
    }
    messages.push(ChatMessage::new(Role::User, &args.prompt));
    let prompt = engine.chat_tokens(&messages)?;
    let params = GenerateParams {
        max_tokens: args.max_tokens,
        sampling: Sampling {
            temperature: args.temperature,
            top_p: args.top_p,
            seed: args.seed,
        },
        ..GenerateParams::default()
    };
    let json = args.json;
    let done = engine.complete(&prompt, &params, |piece| {
        if !json {
            print!("{piece}");
            let _ = std::io::stdout().flush();
        }
        ControlFlow::Continue(())
    })?;
    let decode_tps = done.generation.tokens.len().saturating_sub(1) as f64
        / done.generation.decode_time.as_secs_f64().max(1e-9);
    if json {
        println!(
            "{}",
            serde_json::json!({
                "text": done.generation.text,
                "prompt_tokens": done.prompt_tokens,
                "generated_tokens": done.generation.tokens.len(),
                "finish_reason": done.generation.finish_reason,
                "ttft_ms": done.ttft.as_secs_f64() * 1e3,
                "decode_tokens_per_s": decode_tps,
            })
        );
    } else {
        println!();
        eprintln!(
            "[{} prompt tokens, TTFT {:.1} ms, {} tokens at {:.1} tok/s, {:?}]",
            done.prompt_tokens,
            done.ttft.as_secs_f64() * 1e3,
            done.generation.tokens.len(),
            decode_tps,
            done.generation.finish_reason
        );
    }
    Ok(())
}
