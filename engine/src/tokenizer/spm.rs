//! SentencePiece vocabularies (`tokenizer.ggml.model = "llama"`: Llama 2, Mistral, Gemma),
//! encoded the way llama.cpp's `llm_tokenizer_spm` does.
//!
//! Spaces become `▁` (U+2581). The text starts as one symbol per character; the adjacent pair
//! whose concatenation is the vocabulary entry with the highest score is merged, again and
//! again, until no adjacent pair is in the vocabulary. A symbol left that is not an entry
//! (a character outside the vocabulary) is written as its UTF-8 bytes through the `<0xNN>`
//! byte tokens. Candidate pairs wait in a priority queue, so a text of n characters costs
//! O(n log n) however long it is; words that no entry can join are merged one at a time.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use super::{TokenIds, TokenKind};
use crate::error::{EngineError, Result};

/// What SentencePiece writes for a space.
const SPACE_MARK: char = '\u{2581}';

/// A SentencePiece model: scores and byte tokens; the vocabulary lookup is the tokenizer's.
pub(super) struct Spm {
    scores: Vec<f32>,
    /// The token for each byte: `<0xNN>`, else the one-character token for an ASCII byte
    /// (llama.cpp's fallback).
    byte_tokens: Box<[Option<u32>; 256]>,
    unknown: Option<u32>,
    add_space_prefix: bool,
    /// The characters some entry holds right before a `▁` (usually none, or `▁` itself).
    joins_space: Vec<char>,
}

/// Buffers reused from word to word.
#[derive(Default)]
struct Scratch {
    symbols: Vec<Symbol>,
    queue: BinaryHeap<Bigram>,
}

/// A symbol of the text being merged: a byte range, linked to its neighbours.
#[derive(Clone, Copy)]
struct Symbol {
    start: usize,
    /// Byte length; 0 once merged into the symbol on its left.
    len: usize,
    prev: usize,
    next: usize,
}

/// No neighbour.
const NONE: usize = usize::MAX;

/// Two adjacent symbols whose concatenation is a vocabulary entry.
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    /// The concatenation's byte length when queued: a merge since then changes it.
    size: usize,
}

impl Ord for Bigram {
    /// The queue's order, as llama.cpp's: higher score first, then the leftmost pair.
    fn cmp(&self, other: &Self) -> Ordering {
        if self.score < other.score {
            Ordering::Less
        } else if self.score > other.score {
            Ordering::Greater
        } else {
            other.left.cmp(&self.left)
        }
    }
}

impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Bigram {}

impl Spm {
    /// A model over `scores` (one per token) with the vocabulary `token_to_id`.
    pub(super) fn new(
        scores: Vec<f32>,
        token_to_id: &TokenIds,
        unknown: Option<u32>,
        add_space_prefix: bool,
    ) -> Self {
        let mut byte_tokens = Box::new([None; 256]);
        for (b, slot) in byte_tokens.iter_mut().enumerate() {
            *slot = token_to_id
                .get(&format!("<0x{b:02X}>"))
                .copied()
                .or_else(|| {
                    // NUL has no one-character token (the empty text is never an entry).
                    (1..0x80)
                        .contains(&b)
                        .then(|| token_to_id.get(&char::from(b as u8).to_string()).copied())
                        .flatten()
                });
        }
        let mut joins_space: Vec<char> = Vec::new();
        for text in token_to_id.keys() {
            let mut prev = None;
            for c in text.chars() {
                if c == SPACE_MARK
                    && let Some(p) = prev
                    && !joins_space.contains(&p)
                {
                    joins_space.push(p);
                }
                prev = Some(c);
            }
        }
        Self {
            scores,
            byte_tokens,
            unknown,
            add_space_prefix,
            joins_space,
        }
    }

    /// Whether the text gets a leading space (and decoding removes one).
    pub(super) fn add_space_prefix(&self) -> bool {
        self.add_space_prefix
    }

    /// Appends the ids of one text fragment to `out`. `after_special` says that the fragment
    /// starts the text or follows a special token: llama.cpp adds the leading space there.
    pub(super) fn encode(
        &self,
        text: &str,
        after_special: bool,
        token_to_id: &TokenIds,
        out: &mut Vec<u32>,
    ) -> Result<()> {
        let mut escaped = String::with_capacity(text.len() + 3);
        if self.add_space_prefix && after_special {
            escaped.push(SPACE_MARK);
        }
        // Only U+0020: tabs, newlines and other spaces stay as they are.
        for c in text.chars() {
            escaped.push(if c == ' ' { SPACE_MARK } else { c });
        }
        // Merging the whole fragment at once gives the same ids as merging its words one by
        // one when no merge can cross from one word into the next; small queues are much
        // faster. A merge would cross before a `▁` only if some entry holds the character
        // before it followed by `▁`.
        let mut scratch = Scratch::default();
        let mut word_start = 0;
        let mut prev = None;
        for (at, c) in escaped.char_indices() {
            if c == SPACE_MARK
                && let Some(p) = prev
                && !self.joins_space.contains(&p)
            {
                self.merge(&escaped[word_start..at], token_to_id, &mut scratch, out)?;
                word_start = at;
            }
            prev = Some(c);
        }
        self.merge(&escaped[word_start..], token_to_id, &mut scratch, out)
    }

    /// Merges the symbols of `text` (already escaped) by score and appends their ids.
    fn merge(
        &self,
        text: &str,
        token_to_id: &TokenIds,
        scratch: &mut Scratch,
        out: &mut Vec<u32>,
    ) -> Result<()> {
        if text.is_empty() {
            return Ok(());
        }
        let Scratch { symbols, queue } = scratch;
        symbols.clear();
        queue.clear();
        for (start, c) in text.char_indices() {
            let index = symbols.len();
            symbols.push(Symbol {
                start,
                len: c.len_utf8(),
                prev: if index == 0 { NONE } else { index - 1 },
                next: index + 1,
            });
        }
        symbols.last_mut().expect("not empty").next = NONE;

        let push = |queue: &mut BinaryHeap<Bigram>, symbols: &[Symbol], left, right| {
            if left == NONE || right == NONE {
                return;
            }
            let (l, r): (&Symbol, &Symbol) = (&symbols[left], &symbols[right]);
            let piece = &text[l.start..l.start + l.len + r.len];
            if let Some(&id) = token_to_id.get(piece) {
                queue.push(Bigram {
                    score: self.scores[id as usize],
                    left,
                    right,
                    size: piece.len(),
                });
            }
        };
        for i in 1..symbols.len() {
            push(queue, symbols, i - 1, i);
        }
        while let Some(bigram) = queue.pop() {
            let (left, right) = (symbols[bigram.left], symbols[bigram.right]);
            // A pair queued before one of its symbols changed is stale.
            if left.len == 0 || right.len == 0 || left.len + right.len != bigram.size {
                continue;
            }
            symbols[bigram.left].len += right.len;
            symbols[bigram.left].next = right.next;
            symbols[bigram.right].len = 0;
            if right.next != NONE {
                symbols[right.next].prev = bigram.left;
            }
            push(queue, symbols, left.prev, bigram.left);
            push(queue, symbols, bigram.left, right.next);
        }

        // Every merged symbol is an entry (it was merged because it is one), so only single
        // characters outside the vocabulary are left to write as bytes; llama.cpp's
        // re-segmentation never has anything to split.
        let mut i = 0;
        while i != NONE {
            let symbol = symbols[i];
            let piece = &text[symbol.start..symbol.start + symbol.len];
            match token_to_id.get(piece) {
                Some(&id) => out.push(id),
                None => {
                    for &b in piece.as_bytes() {
                        out.push(self.byte_token(b)?);
                    }
                }
            }
            i = symbol.next;
        }
        Ok(())
    }

    /// The token for a byte outside the vocabulary's characters. llama.cpp fails when the
    /// vocabulary has no such token; SentencePiece without byte fallback writes the unknown
    /// token, and so does this when the vocabulary has one.
    fn byte_token(&self, b: u8) -> Result<u32> {
        self.byte_tokens[b as usize]
            .or(self.unknown)
            .ok_or_else(|| {
                EngineError::Tokenizer(format!(
                    "byte 0x{b:02X} has no token and the vocabulary has no unknown token"
                ))
            })
    }
}

/// The bytes each token stands for, as llama.cpp's `token_to_piece` gives them: `▁` back to
/// a space in ordinary tokens, one byte for a byte token, the text itself for control,
/// user-defined and unknown tokens, nothing for unused ones.
pub(super) fn pieces(texts: &[String], kinds: &[TokenKind]) -> Vec<Vec<u8>> {
    texts
        .iter()
        .zip(kinds)
        .map(|(text, kind)| match kind {
            TokenKind::Normal => text.replace(SPACE_MARK, " ").into_bytes(),
            TokenKind::Byte => match byte_of(text) {
                Some(b) => vec![b],
                None => text.as_bytes().to_vec(),
            },
            TokenKind::Control | TokenKind::UserDefined | TokenKind::Unknown => {
                text.as_bytes().to_vec()
            }
            TokenKind::Unused => Vec::new(),
        })
        .collect()
}

/// The byte a `<0xNN>` token stands for.
pub(super) fn byte_of(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}
