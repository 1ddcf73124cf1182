//! Token sampling and the decode loop.

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use candle_core::Tensor;
use serde::Serialize;

use crate::error::Result;
use crate::kv::KvCache;
use crate::models::Transformer;
use crate::tokenizer::{StreamDecoder, Tokenizer};
pub use ragcake_scheduler::sampling::{FinishReason, GenerateParams, Sampler, Sampling};

/// Draws a token from a `[vocab]` logits tensor with `sampler`.
pub fn sample(sampler: &mut Sampler, logits: &Tensor) -> Result<u32> {
    let row: Vec<f32> = logits.flatten_all()?.to_vec1()?;
    Ok(sampler.sample(&row)?)
}

/// What a generation produced.
#[derive(Debug, Clone, Serialize)]
pub struct Generation {
    /// Generated token ids (the stop token excluded).
    pub tokens: Vec<u32>,
    /// Their text.
    pub text: String,
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// Time spent decoding (after the first token).
    pub decode_time: Duration,
}

/// Generates from `first_logits` (the logits after the prompt, already in `cache`): samples a
/// token, feeds it back, and so on. `on_text` receives each piece of text as it becomes
/// complete and can stop generation by returning `ControlFlow::Break`.
pub fn generate(
    model: &Transformer,
    tokenizer: &Tokenizer,
    cache: &mut KvCache,
    first_logits: &Tensor,
    params: &GenerateParams,
    mut on_text: impl FnMut(&str) -> ControlFlow<()>,
) -> Result<Generation> {
    let mut sampler = Sampler::new(params.sampling.clone())?;
    let mut decoder = StreamDecoder::new();
    let mut tokens = Vec::new();
    let mut text = String::new();
    let started = Instant::now();
    let mut logits = first_logits.clone();
    let context = model.config().context_length;
    let finish_reason = loop {
        if tokens.len() >= params.max_tokens {
            break FinishReason::Length;
        }
        let next = sample(&mut sampler, &logits)?;
        if params.stops_at(next, tokenizer.is_end_of_generation(next)) {
            break FinishReason::Stop;
        }
        tokens.push(next);
        let piece = decoder.push(tokenizer, next);
        if !piece.is_empty() {
            text += &piece;
            if on_text(&piece).is_break() {
                break FinishReason::Cancelled;
            }
        }
        if tokens.len() >= params.max_tokens {
            break FinishReason::Length;
        }
        if cache.next_position() >= context {
            break FinishReason::ContextFull;
        }
        logits = model.decode(&[next], cache)?;
    };
    let rest = decoder.finish();
    if !rest.is_empty() {
        text += &rest;
        // The caller has asked to stop already when cancelled; otherwise it gets the tail.
        if finish_reason != FinishReason::Cancelled {
            let _ = on_text(&rest);
        }
    }
    Ok(Generation {
        tokens,
        text,
        finish_reason,
        decode_time: started.elapsed(),
    })
}
