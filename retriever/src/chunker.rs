//! Splitting documents into chunks of at most a target number of LLM tokens, on paragraph,
//! then sentence, then word borders where possible, so that a chunk's KV cache lines up
//! with what the engine computes for it.

use std::ops::Range;

use crate::error::{Result, RetrieverError};

/// A tokenizer's own error, kept whole.
pub type TokenizeError = Box<dyn std::error::Error + Send + Sync>;

/// The LLM's tokenizer as the chunker sees it: text in, token ids out (no special tokens).
/// Any `Fn(&str) -> Result<Vec<u32>, TokenizeError>` is one, so the retriever needs no
/// engine.
pub trait Tokenize: Sync {
    /// The token ids of `text`.
    fn tokenize(&self, text: &str) -> std::result::Result<Vec<u32>, TokenizeError>;
}

impl<F> Tokenize for F
where
    F: Fn(&str) -> std::result::Result<Vec<u32>, TokenizeError> + Sync,
{
    fn tokenize(&self, text: &str) -> std::result::Result<Vec<u32>, TokenizeError> {
        self(text)
    }
}

/// The default chunk size in LLM tokens.
pub const DEFAULT_CHUNK_TOKENS: usize = 256;

/// One piece of a document: a byte range of its text and that text's token ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextChunk {
    /// Position of the chunk in its document, from 0.
    pub chunk_no: u32,
    /// The chunk's bytes in the document.
    pub range: Range<usize>,
    /// The chunk's text (`document[range]`).
    pub text: String,
    /// The text's LLM token ids (no special tokens), at most the target count.
    pub token_ids: Vec<u32>,
}

/// Checks a chunk size: at least one token.
pub fn check_target_tokens(target_tokens: usize) -> Result<()> {
    if target_tokens == 0 {
        return Err(RetrieverError::InvalidSetting(
            "the chunk size must be at least one token".into(),
        ));
    }
    Ok(())
}

/// Splits text on the LLM tokenizer's tokens.
///
/// The chunks partition the text exactly (their concatenation is the document), each has
/// at most `target_tokens` tokens, and the same text always gives the same chunks.
#[derive(Clone, Copy)]
pub struct Chunker<'a> {
    tokenizer: &'a dyn Tokenize,
    target_tokens: usize,
}

/// Where a span may be cut, from the most to the least natural border.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Border {
    Paragraph,
    Sentence,
    Word,
    Char,
}

impl std::fmt::Debug for Chunker<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chunker")
            .field("target_tokens", &self.target_tokens)
            .finish_non_exhaustive()
    }
}

impl<'a> Chunker<'a> {
    /// A chunker making chunks of at most `target_tokens` tokens of `tokenizer`.
    pub fn new(tokenizer: &'a dyn Tokenize, target_tokens: usize) -> Result<Self> {
        check_target_tokens(target_tokens)?;
        Ok(Self {
            tokenizer,
            target_tokens,
        })
    }

    /// The target chunk size in tokens.
    pub fn target_tokens(&self) -> usize {
        self.target_tokens
    }

    /// Splits `text` into chunks. Text that is empty or only whitespace has none.
    pub fn split(&self, text: &str) -> Result<Vec<TextChunk>> {
        if text.trim().is_empty() {
            return Ok(Vec::new());
        }
        let mut spans = Vec::new();
        self.pack(text, 0..text.len(), Border::Paragraph, &mut spans)?;
        merge_blank_spans(text, &mut spans);
        spans
            .into_iter()
            .enumerate()
            .map(|(i, range)| {
                let piece = &text[range.clone()];
                Ok(TextChunk {
                    chunk_no: u32::try_from(i).map_err(|_| {
                        RetrieverError::InvalidSetting("a document of over 4G chunks".into())
                    })?,
                    token_ids: self.tokens(piece)?,
                    text: piece.to_string(),
                    range,
                })
            })
            .collect()
    }

    fn tokens(&self, text: &str) -> Result<Vec<u32>> {
        self.tokenizer
            .tokenize(text)
            .map_err(RetrieverError::Tokenizer)
    }

    fn count(&self, text: &str) -> Result<usize> {
        Ok(self.tokens(text)?.len())
    }

    /// Appends to `out` the chunks of `span`: whole if it fits, else its parts at `border`
    /// packed greedily, a part too big on its own split at the next finer border.
    fn pack(
        &self,
        text: &str,
        span: Range<usize>,
        border: Border,
        out: &mut Vec<Range<usize>>,
    ) -> Result<()> {
        if self.count(&text[span.clone()])? <= self.target_tokens {
            out.push(span);
            return Ok(());
        }
        if border == Border::Char {
            return self.split_chars(text, span, out);
        }
        let finer = match border {
            Border::Paragraph => Border::Sentence,
            Border::Sentence => Border::Word,
            _ => Border::Char,
        };
        let mut current: Option<Range<usize>> = None;
        for part in parts(text, span, border) {
            if let Some(open) = &current {
                let joined = open.start..part.end;
                if self.count(&text[joined.clone()])? <= self.target_tokens {
                    current = Some(joined);
                    continue;
                }
                out.push(open.clone());
                current = None;
            }
            if self.count(&text[part.clone()])? <= self.target_tokens {
                current = Some(part);
            } else {
                self.pack(text, part, finer, out)?;
            }
        }
        out.extend(current);
        Ok(())
    }

    /// Cuts a span with no usable border (one enormous word) into the longest prefixes
    /// that fit, on character boundaries.
    fn split_chars(
        &self,
        text: &str,
        span: Range<usize>,
        out: &mut Vec<Range<usize>>,
    ) -> Result<()> {
        let mut start = span.start;
        while start < span.end {
            let bounds: Vec<usize> = text[start..span.end]
                .char_indices()
                .map(|(i, c)| start + i + c.len_utf8())
                .collect();
            // The longest prefix that fits (one character always goes, even if it alone
            // exceeded the target, so the loop ends).
            let (mut lo, mut hi) = (0, bounds.len() - 1);
            while lo < hi {
                let mid = (lo + hi).div_ceil(2);
                if self.count(&text[start..bounds[mid]])? <= self.target_tokens {
                    lo = mid;
                } else {
                    hi = mid - 1;
                }
            }
            out.push(start..bounds[lo]);
            start = bounds[lo];
        }
        Ok(())
    }
}

/// The parts of `span` cut after each `border`; each part keeps the whitespace after it.
fn parts(text: &str, span: Range<usize>, border: Border) -> Vec<Range<usize>> {
    let bytes = text.as_bytes();
    let mut cuts = Vec::new();
    let mut i = span.start;
    while i < span.end {
        let c = bytes[i];
        let ends_here = match border {
            // A blank line: a newline, optional spaces, another newline.
            Border::Paragraph => {
                c == b'\n' && {
                    let mut j = i + 1;
                    while j < span.end && matches!(bytes[j], b' ' | b'\t' | b'\r') {
                        j += 1;
                    }
                    j < span.end && bytes[j] == b'\n'
                }
            }
            Border::Sentence => {
                c == b'\n'
                    || (matches!(c, b'.' | b'!' | b'?' | b';' | b':')
                        && i + 1 < span.end
                        && bytes[i + 1].is_ascii_whitespace())
            }
            Border::Word => c.is_ascii_whitespace(),
            Border::Char => false,
        };
        i += 1;
        if ends_here {
            // The whitespace after the border belongs to the part before it.
            while i < span.end && bytes[i].is_ascii_whitespace() {
                i += 1;
            }
            cuts.push(i);
        }
    }
    let mut out = Vec::new();
    let mut start = span.start;
    for cut in cuts {
        if cut > start && cut < span.end {
            out.push(start..cut);
            start = cut;
        }
    }
    out.push(start..span.end);
    out
}

/// Joins a span of only whitespace to the one before it (or after it, at the start), so
/// no chunk is blank.
fn merge_blank_spans(text: &str, spans: &mut Vec<Range<usize>>) {
    let mut merged: Vec<Range<usize>> = Vec::with_capacity(spans.len());
    let mut pending_start: Option<usize> = None;
    for span in spans.drain(..) {
        if text[span.clone()].trim().is_empty() {
            match merged.last_mut() {
                Some(last) => last.end = span.end,
                None => pending_start = Some(pending_start.unwrap_or(span.start)),
            }
            continue;
        }
        let start = pending_start.take().unwrap_or(span.start);
        merged.push(start..span.end);
    }
    *spans = merged;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_keep_trailing_whitespace_and_cover_the_span() {
        let text = "One. Two!  Three\nFour";
        let p = parts(text, 0..text.len(), Border::Sentence);
        let pieces: Vec<&str> = p.iter().map(|r| &text[r.clone()]).collect();
        assert_eq!(pieces, ["One. ", "Two!  ", "Three\n", "Four"]);
        let text = "a\n\nb\n \nc";
        let p = parts(text, 0..text.len(), Border::Paragraph);
        let pieces: Vec<&str> = p.iter().map(|r| &text[r.clone()]).collect();
        assert_eq!(pieces, ["a\n\n", "b\n \n", "c"]);
    }

    #[test]
    fn blank_spans_join_their_neighbour() {
        let text = "  \nabc  \n\n";
        let mut spans = vec![0..3, 3..8, 8..10];
        merge_blank_spans(text, &mut spans);
        assert_eq!(spans, vec![0..10]);
    }
}
