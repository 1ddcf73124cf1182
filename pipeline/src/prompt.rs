//! The RAG prompt, as token segments that line up with stored caches: a preamble (system
//! prompt, history, the start of the user's message), the retrieved chunks' own tokens, and
//! a tail (the question and the opening of the reply).

use ragcake_engine::scheduler::PromptChunk;
use ragcake_engine::{ChatMessage, Engine, Role};
use ragcake_retriever::RetrievedChunk;
use serde::{Deserialize, Serialize};

use crate::error::Result;

/// The fixed text around the retrieved chunks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PromptTemplate {
    /// The system prompt (a request may replace it).
    pub system: String,
    /// Opens the user's message, before the chunks.
    pub context_intro: String,
    /// Between the chunks and the question.
    pub question_intro: String,
}

impl Default for PromptTemplate {
    fn default() -> Self {
        Self {
            system: "You are a helpful assistant. Answer the question using only the facts in \
                     the context. Answer in one or two sentences."
                .into(),
            context_intro: "Context:\n".into(),
            question_intro: "\n\nQuestion: ".into(),
        }
    }
}

/// A prompt in segments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptSegments {
    /// BOS, system prompt, history, and the start of the user's message.
    pub preamble: Vec<u32>,
    /// The question and the opening of the assistant's reply.
    pub tail: Vec<u32>,
}

impl PromptTemplate {
    /// The preamble and tail around the chunks for `question`. Template markers are
    /// tokenized as control tokens; the user's text never is (a question cannot forge a
    /// turn).
    pub fn segments(
        &self,
        engine: &Engine,
        system: Option<&str>,
        history: &[ChatMessage],
        question: &str,
    ) -> Result<PromptSegments> {
        let template = engine.template();
        let tokenizer = engine.tokenizer();
        let preamble = self.preamble(engine, system, history)?;
        let mut tail = tokenizer.encode(&self.question_intro, false)?;
        tail.extend(tokenizer.encode(question, false)?);
        tail.extend(tokenizer.encode(template.message_end(), true)?);
        tail.extend(tokenizer.encode(&template.message_start(Role::Assistant), true)?);
        Ok(PromptSegments { preamble, tail })
    }

    /// BOS, the system prompt (`system`, else the template's), the `history`, and the start
    /// of the user's message up to the chunks.
    pub fn preamble(
        &self,
        engine: &Engine,
        system: Option<&str>,
        history: &[ChatMessage],
    ) -> Result<Vec<u32>> {
        let template = engine.template();
        let tokenizer = engine.tokenizer();
        let mut preamble = Vec::new();
        if tokenizer.add_bos()
            && let Some(bos) = tokenizer.bos()
        {
            preamble.push(bos);
        }
        let message = |ids: &mut Vec<u32>, role: Role, content: &str| -> Result<()> {
            ids.extend(tokenizer.encode(&template.message_start(role), true)?);
            ids.extend(tokenizer.encode(content, false)?);
            ids.extend(tokenizer.encode(template.message_end(), true)?);
            Ok(())
        };
        message(&mut preamble, Role::System, system.unwrap_or(&self.system))?;
        for turn in history.iter().filter(|m| m.role != Role::System) {
            message(&mut preamble, turn.role, &turn.content)?;
        }
        preamble.extend(tokenizer.encode(&template.message_start(Role::User), true)?);
        preamble.extend(tokenizer.encode(&self.context_intro, false)?);
        Ok(preamble)
    }

    /// The standard preamble (the template's system prompt, no history) that the precompute
    /// job computes chunk caches after: a chunk's first token then is no false attention
    /// sink, and its positions follow the preamble as in a real prompt (APE, Block-Attention).
    pub fn chunk_context(&self, engine: &Engine) -> Result<Vec<u32>> {
        self.preamble(engine, None, &[])
    }
}

/// A prompt ready for planning: the preamble (no chunk cache), each retrieved chunk's own
/// tokens with what retrieval knows of its chunk cache, then the tail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prompt {
    /// The preamble first, then the retrieved chunks in prompt order.
    pub chunks: Vec<PromptChunk>,
    /// The question and the opening of the reply.
    pub tail: Vec<u32>,
}

impl Prompt {
    /// Tokens in the whole prompt.
    pub fn tokens(&self) -> usize {
        self.chunks.iter().map(|c| c.tokens.len()).sum::<usize>() + self.tail.len()
    }
}

impl PromptTemplate {
    /// The prompt for `question` over `retrieved`. A chunk's token ids come from the index
    /// when `engine`'s LLM made them (so they match its stored cache); a chunk tokenized for
    /// another LLM is tokenized again and has no usable cache.
    pub fn prompt(
        &self,
        engine: &Engine,
        system: Option<&str>,
        history: &[ChatMessage],
        question: &str,
        retrieved: &[RetrievedChunk],
    ) -> Result<Prompt> {
        let segments = self.segments(engine, system, history, question)?;
        let fingerprint = engine.fingerprint().to_hex();
        let mut chunks = vec![PromptChunk::with_chunk_cache(segments.preamble, false)];
        for hit in retrieved {
            let tokens = if hit.chunk.llm == fingerprint {
                hit.chunk.token_ids.clone()
            } else {
                engine.tokenizer().encode(&hit.chunk.text, false)?
            };
            chunks.push(PromptChunk::with_chunk_cache(tokens, hit.cache.is_stored()));
        }
        Ok(Prompt {
            chunks,
            tail: segments.tail,
        })
    }
}
