//! ragcake's inference engine: decoder-only models from GGUF (llama, Qwen 2/3, Gemma 3,
//! Phi-3) on candle, with a KV cache that
//! can be computed in chunks at explicit positions, exported, stored, imported (re-rotated
//! to a new position when needed) and continued from.
//!
//! ```no_run
//! use ragcake_engine::{ChatMessage, Engine, EngineConfig, GenerateParams, Role};
//! # fn main() -> Result<(), ragcake_engine::EngineError> {
//! let engine = Engine::load("SmolLM2-135M-Instruct.Q4_1.gguf", &EngineConfig::default())?;
//! let prompt = engine.chat_tokens(&[ChatMessage::new(Role::User, "What is the capital of France?")])?;
//! let done = engine.complete(&prompt, &GenerateParams::default(), |_| std::ops::ControlFlow::Continue(()))?;
//! println!("{} (TTFT {:?})", done.generation.text, done.ttft);
//! # Ok(()) }
//! ```

pub mod chat;
pub mod correction;
pub mod engine;
pub mod error;
pub mod generate;
pub mod gguf;
pub mod kv;
pub mod models;
pub mod prompt;
pub mod qmatrix;
pub mod rope;
pub mod tokenizer;

#[cfg(test)]
mod test_util;

pub use candle_core::{DType, Device, Tensor};
pub use chat::{ChatMessage, ChatPiece, ChatTemplate, Role};
pub use correction::{AttentionCalibration, AttentionCorrection};
pub use engine::{Completion, DTypeChoice, DeviceChoice, Engine, EngineConfig};
pub use error::{EngineError, Result};
pub use generate::{FinishReason, GenerateParams, Generation, Sampler, Sampling};
pub use gguf::{GgufFile, LlmFingerprint};
pub use kv::{KvCache, KvRange, KvShape};
pub use models::{
    Blend, DECODE_MAX_TOKENS, ModelConfig, ReturnLogits, Selection, Transformer, config_from_gguf,
};
pub use prompt::{Prompt, PromptSegments, PromptTemplate};
pub use rope::{LayerRopes, Rope, RopeStyle};
pub use tokenizer::{Follows, StreamDecoder, TokenKind, Tokenizer};
