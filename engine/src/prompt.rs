//! The RAG prompt, as token segments that line up with stored caches: a preamble (system
//! prompt, history, the start of the user's message), the chunks' own tokens, and a tail
//! (the question and the opening of the reply). Here, below the pipeline and the precompute
//! job, because both must derive the same preamble: chunk caches are keyed by it.

use ragcake_scheduler::PromptChunk;
use serde::{Deserialize, Serialize};

use crate::chat::{ChatMessage, ChatPiece, Role};
use crate::engine::Engine;
use crate::error::{EngineError, Result};
use crate::tokenizer::Follows;

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
        let tokenizer = engine.tokenizer();
        let (preamble, after) = self.user_turn(engine, system, history)?;
        let preamble = self.with_context_intro(engine, preamble)?;
        // The tail follows the chunks, which end in ordinary text.
        let mut tail = tokenizer.encode_after(Follows::Text, &self.question_intro, false)?;
        let here = tokenizer.after(&tail, Follows::Text);
        tail.extend(tokenizer.encode_after(here, question, false)?);
        let here = tokenizer.after(&tail, Follows::Text);
        tail.extend(engine.encode_pieces(&after, here)?);
        Ok(PromptSegments { preamble, tail })
    }

    /// BOS, the system prompt (`system`, else the template's), the `history`, the start of
    /// the user's message and the context intro: everything before the chunks.
    pub fn preamble(
        &self,
        engine: &Engine,
        system: Option<&str>,
        history: &[ChatMessage],
    ) -> Result<Vec<u32>> {
        let (preamble, _) = self.user_turn(engine, system, history)?;
        self.with_context_intro(engine, preamble)
    }

    /// `preamble` followed by the context intro's tokens.
    fn with_context_intro(&self, engine: &Engine, mut preamble: Vec<u32>) -> Result<Vec<u32>> {
        let tokenizer = engine.tokenizer();
        let here = tokenizer.after(&preamble, Follows::Start);
        let intro = tokenizer.encode_after(here, &self.context_intro, false)?;
        preamble.extend(intro);
        Ok(preamble)
    }

    /// The model's chat template rendered around the user's message: the tokens before
    /// its content (BOS, system prompt, history, the turn's opening) and the pieces after it
    /// (the turn's end and the opening of the reply). Whatever the template, the user's content
    /// — context and question — is what lies between.
    fn user_turn(
        &self,
        engine: &Engine,
        system: Option<&str>,
        history: &[ChatMessage],
    ) -> Result<(Vec<u32>, Vec<ChatPiece>)> {
        let mut messages = vec![ChatMessage::new(
            Role::System,
            system.unwrap_or(&self.system),
        )];
        messages.extend(history.iter().filter(|m| m.role != Role::System).cloned());
        messages.push(ChatMessage::new(Role::User, ""));
        let last = messages.len() - 1;
        let mut pieces = engine.template().pieces(&messages, true)?;
        let at = pieces
            .iter()
            .position(|p| matches!(p, ChatPiece::Content { message, .. } if *message == last))
            .ok_or_else(|| {
                EngineError::ChatTemplate("the template does not write the user's message".into())
            })?;
        let after = pieces.split_off(at + 1);
        // The user's content piece is empty, or holds the system prompt where the template
        // has no system role: either way it belongs before the context.
        let before = engine.encode_pieces(&pieces, Follows::Start)?;
        Ok((before, after))
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
    /// The prompt for `question` over `chunks` (each chunk's own tokens, and whether its
    /// chunk cache is stored), in prompt order.
    pub fn prompt(
        &self,
        engine: &Engine,
        system: Option<&str>,
        history: &[ChatMessage],
        question: &str,
        chunks: impl IntoIterator<Item = PromptChunk>,
    ) -> Result<Prompt> {
        let segments = self.segments(engine, system, history, question)?;
        let mut all = vec![PromptChunk::with_chunk_cache(segments.preamble, false)];
        all.extend(chunks);
        Ok(Prompt {
            chunks: all,
            tail: segments.tail,
        })
    }
}
