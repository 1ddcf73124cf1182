//! Hand-built vocabularies in real GGUF files, checked against what llama.cpp does.

use candle_core::quantized::gguf_file::{self, Value};

use super::{Follows, StreamDecoder, TokenKind, Tokenizer};
use crate::error::{EngineError, Result};
use crate::gguf::GgufFile;

const UNKNOWN: i32 = 2;
const CONTROL: i32 = 3;
const USER: i32 = 4;
const BYTE: i32 = 6;

/// A small SentencePiece vocabulary: `<unk>`, `<s>`, `</s>`, the 256 byte tokens, then
/// characters and merges whose scores make the merge order matter.
fn spm_vocab() -> Vec<(String, f32, i32)> {
    let mut v: Vec<(String, f32, i32)> = vec![
        ("<unk>".into(), 0.0, UNKNOWN),
        ("<s>".into(), 0.0, CONTROL),
        ("</s>".into(), 0.0, CONTROL),
    ];
    v.extend((0..=255u8).map(|b| (format!("<0x{b:02X}>"), 0.0, BYTE)));
    for c in [
        "▁", "a", "b", "c", "d", "e", "h", "l", "o", "w", "r", "x", "y", "z",
    ] {
        v.push((c.into(), -10.0, 1));
    }
    for (piece, score) in [
        ("ab", -5.0),
        ("bc", -1.0),
        ("ll", -3.0),
        ("he", -4.0),
        ("hell", -2.0),
        ("hello", -1.0),
        ("▁hello", -0.5),
        ("▁w", -6.0),
        ("or", -5.5),
        ("ld", -6.5),
        ("▁wor", -3.0),
        ("▁world", -2.0),
    ] {
        v.push((piece.into(), score, 1));
    }
    for (piece, kind) in [
        ("<end_of_turn>", CONTROL),
        ("<hr>", USER),
        ("xy", USER),
        ("yzw", USER),
    ] {
        v.push((piece.into(), 0.0, kind));
    }
    v
}

/// Writes a GGUF holding `vocab` and `metadata` (besides tokens, scores and types) and builds
/// its tokenizer.
fn tokenizer(
    model: &str,
    vocab: &[(String, f32, i32)],
    metadata: Vec<(&str, Value)>,
    with_types: bool,
) -> Result<Tokenizer> {
    let mut all = vec![
        ("tokenizer.ggml.model", Value::String(model.into())),
        (
            "tokenizer.ggml.tokens",
            Value::Array(vocab.iter().map(|t| Value::String(t.0.clone())).collect()),
        ),
        (
            "tokenizer.ggml.scores",
            Value::Array(vocab.iter().map(|t| Value::F32(t.1)).collect()),
        ),
    ];
    if with_types {
        all.push((
            "tokenizer.ggml.token_type",
            Value::Array(vocab.iter().map(|t| Value::I32(t.2)).collect()),
        ));
    }
    all.extend(metadata);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vocab.gguf");
    let refs: Vec<(&str, &Value)> = all.iter().map(|(k, v)| (*k, v)).collect();
    let mut file = std::fs::File::create(&path).unwrap();
    gguf_file::write(&mut file, &refs, &[]).unwrap();
    drop(file);
    Tokenizer::from_gguf(&GgufFile::open(&path)?)
}

/// The small SentencePiece vocabulary with `add_space_prefix` as given.
fn spm(add_space_prefix: bool) -> Tokenizer {
    tokenizer(
        "llama",
        &spm_vocab(),
        vec![
            (
                "tokenizer.ggml.add_space_prefix",
                Value::Bool(add_space_prefix),
            ),
            ("tokenizer.ggml.bos_token_id", Value::U32(1)),
            ("tokenizer.ggml.eos_token_id", Value::U32(2)),
        ],
        true,
    )
    .unwrap()
}

/// Ids of vocabulary entries by text.
fn ids(tok: &Tokenizer, texts: &[&str]) -> Vec<u32> {
    texts
        .iter()
        .map(|t| tok.token_id(t).unwrap_or_else(|| panic!("{t:?} in vocab")))
        .collect()
}

fn byte(b: u8) -> u32 {
    3 + b as u32
}

#[test]
fn the_highest_scoring_pair_merges_first_not_the_longest_or_leftmost() {
    let tok = spm(false);
    // "ab" comes first from the left, "bc" scores higher.
    assert_eq!(tok.encode("abc", false).unwrap(), ids(&tok, &["a", "bc"]));
    // "▁world" is reached only through "or", then "▁w"+"or", then "ld", out of text order.
    assert_eq!(tok.encode(" world", false).unwrap(), ids(&tok, &["▁world"]));
    assert_eq!(tok.encode("hello", false).unwrap(), ids(&tok, &["hello"]));
}

#[test]
fn equal_scores_merge_the_leftmost_pair_first() {
    let mut vocab = spm_vocab();
    for entry in vocab.iter_mut().filter(|e| e.0 == "ab" || e.0 == "bc") {
        entry.1 = -1.0;
    }
    let tok = tokenizer("llama", &vocab, vec![], true).unwrap();
    // With the default space prefix: "▁abc".
    assert_eq!(
        tok.encode("abc", false).unwrap(),
        ids(&tok, &["▁", "ab", "c"])
    );
}

#[test]
fn an_entry_that_spans_a_space_is_still_merged_across_words() {
    let mut vocab = spm_vocab();
    vocab.push(("d▁".into(), -1.0, 1));
    vocab.push(("d▁a".into(), 5.0, 1));
    let off = ("tokenizer.ggml.add_space_prefix", Value::Bool(false));
    let tok = tokenizer("llama", &vocab, vec![off], true).unwrap();
    assert_eq!(tok.encode("d a", false).unwrap(), ids(&tok, &["d▁a"]));
    assert_eq!(
        tok.encode("hello d ab", false).unwrap(),
        ids(&tok, &["hello", "▁", "d▁a", "b"])
    );
}

#[test]
fn the_space_prefix_is_added_only_when_the_vocabulary_asks() {
    let on = spm(true);
    assert_eq!(
        on.encode("hello world", false).unwrap(),
        ids(&on, &["▁hello", "▁world"])
    );
    let off = spm(false);
    assert_eq!(
        off.encode("hello world", false).unwrap(),
        ids(&off, &["hello", "▁world"])
    );
    // Only U+0020 becomes ▁; a leading space of the text adds to the prefix.
    assert_eq!(
        on.encode(" hello", false).unwrap(),
        ids(&on, &["▁", "▁hello"])
    );
    assert!(on.encode("", false).unwrap().is_empty());
}

#[test]
fn characters_outside_the_vocabulary_fall_back_to_byte_tokens() {
    let tok = spm(false);
    assert_eq!(
        tok.encode("hé", false).unwrap(),
        vec![tok.token_id("h").unwrap(), byte(0xC3), byte(0xA9)]
    );
    assert_eq!(tok.encode("\n", false).unwrap(), vec![byte(b'\n')]);
}

#[test]
fn a_vocabulary_without_byte_tokens_writes_the_unknown_token() {
    let vocab: Vec<_> = spm_vocab().into_iter().filter(|e| e.2 != BYTE).collect();
    let tok = tokenizer("llama", &vocab, vec![], true).unwrap();
    // "é" is two bytes, with no byte tokens to fall back to.
    assert_eq!(
        tok.encode("é", false).unwrap(),
        vec![tok.token_id("▁").unwrap(), 0, 0]
    );
}

#[test]
fn a_piece_continuing_a_prompt_gets_the_space_prefix_only_after_a_special_token() {
    let tok = spm(true);
    let hello = ids(&tok, &["▁hello"]);
    let end = ids(&tok, &["</s>"]);
    // After ordinary text: no prefix, as in the joined text "hello world".
    let after_hello = tok.after(&hello, Follows::Start);
    assert_eq!(after_hello, Follows::Text);
    assert_eq!(
        tok.encode_after(after_hello, " world", false).unwrap(),
        ids(&tok, &["▁world"])
    );
    // After a special token, and at the start: the prefix, as llama.cpp adds it.
    let after_end = tok.after(&end, Follows::Text);
    assert_eq!(after_end, Follows::Special);
    assert_eq!(
        tok.encode_after(after_end, "hello", false).unwrap(),
        ids(&tok, &["▁hello"])
    );
    assert_eq!(tok.after(&[], Follows::Start), Follows::Start);
    assert_eq!(
        tok.encode_after(Follows::Start, "hello", false).unwrap(),
        tok.encode("hello", false).unwrap()
    );
}

#[test]
fn special_tokens_are_parsed_only_when_asked_and_the_prefix_follows_them() {
    let tok = spm(true);
    assert_eq!(
        tok.encode("<s>hello</s>", true).unwrap(),
        ids(&tok, &["<s>", "▁hello", "</s>"])
    );
    assert_eq!(
        tok.encode("<end_of_turn>hello", true).unwrap(),
        ids(&tok, &["<end_of_turn>", "▁hello"])
    );
    // Not parsed: the text's characters, the missing ones as bytes.
    let mut expected = ids(&tok, &["▁"]);
    expected.extend([byte(b'<'), byte(b's'), byte(b'>')]);
    expected.extend(ids(&tok, &["h"]));
    expected.push(byte(b'i'));
    assert_eq!(tok.encode("<s>hi", false).unwrap(), expected);
    // The unknown token is special too.
    assert_eq!(tok.encode("<unk>", true).unwrap(), vec![0]);
    assert_ne!(tok.encode("<unk>", false).unwrap(), vec![0]);
}

#[test]
fn user_defined_tokens_are_always_cut_out_longest_first() {
    let tok = spm(true);
    // A user-defined token is special for the prefix rule too.
    assert_eq!(
        tok.encode("a<hr>hello", false).unwrap(),
        ids(&tok, &["▁", "a", "<hr>", "▁hello"])
    );
    // llama.cpp cuts out the longer "yzw" before it looks for "xy", although "xy" starts
    // first.
    let off = spm(false);
    assert_eq!(off.encode("xyzw", false).unwrap(), ids(&off, &["x", "yzw"]));
    assert_eq!(
        off.encode("xyxyzw", true).unwrap(),
        ids(&off, &["xy", "x", "yzw"])
    );
}

#[test]
fn decoding_gives_the_text_back_without_the_added_space() {
    for prefix in [true, false] {
        let tok = spm(prefix);
        for text in ["hello world", "  hello", "hé\n"] {
            let ids = tok.encode(text, false).unwrap();
            assert_eq!(tok.decode(&ids, false), text, "prefix {prefix}: {ids:?}");
        }
    }
    let off = spm(false);
    let ids = off.encode("abc xyzw <hr>", false).unwrap();
    assert_eq!(off.decode(&ids, false), "abc xyzw <hr>");
    // The space added after a special token stays, as in llama.cpp.
    let tok = spm(true);
    let ids = tok.encode("a<hr>b", false).unwrap();
    assert_eq!(tok.decode(&ids, false), "a<hr> b");
    let hello = tok.token_id("▁hello").unwrap();
    // llama.cpp strips the space from the first token only: after BOS it stays.
    assert_eq!(tok.decode(&[1, hello], false), " hello");
    assert_eq!(tok.decode(&[1, hello, 2], true), "<s> hello</s>");
    assert_eq!(tok.decode(&[hello, 0], false), "hello");
    assert_eq!(tok.decode(&[hello, 0], true), "hello<unk>");
}

#[test]
fn token_bytes_and_the_stream_decoder_see_spaces_and_bytes() {
    let tok = spm(true);
    assert_eq!(
        tok.token_bytes(tok.token_id("▁hello").unwrap()),
        Some(&b" hello"[..])
    );
    assert_eq!(tok.token_bytes(byte(0xC3)), Some(&[0xC3u8][..]));
    assert_eq!(tok.token_bytes(2), Some(&b"</s>"[..]));
    let mut decoder = StreamDecoder::new();
    let mut out = String::new();
    for id in tok.encode("hé world", false).unwrap() {
        let piece = decoder.push(&tok, id);
        assert!(!piece.contains('\u{FFFD}'));
        out += &piece;
    }
    assert_eq!(decoder.push(&tok, 2), "");
    out += &decoder.finish();
    assert_eq!(out, " hé world");
}

#[test]
fn end_of_generation_is_eos_and_the_turn_enders_found_by_text() {
    let tok = spm(true);
    let eot = tok.token_id("<end_of_turn>").unwrap();
    assert_eq!(tok.end_of_generation(), &[2, eot]);
    assert!(tok.is_end_of_generation(eot));
    assert!(!tok.is_end_of_generation(1));
    assert_eq!((tok.bos(), tok.eos()), (Some(1), Some(2)));
    assert!(tok.add_bos());
    assert!(!tok.add_eos());
}

#[test]
fn turn_enders_become_control_tokens_whatever_the_file_says() {
    // Gemma 3 ships `</s>` as user-defined and `<|im_end|>` here is typed as text: llama.cpp
    // makes both control tokens that end generation.
    let mut vocab = spm_vocab();
    vocab[2].2 = USER;
    vocab.push(("<|im_end|>".into(), 0.0, 1));
    let tok = tokenizer("llama", &vocab, vec![], true).unwrap();
    let im_end = tok.token_id("<|im_end|>").unwrap();
    assert_eq!(tok.kind(2), Some(TokenKind::Control));
    assert_eq!(tok.kind(im_end), Some(TokenKind::Control));
    assert!(tok.is_end_of_generation(im_end) && tok.is_end_of_generation(2));
    // Control now, so not cut out without parse_special.
    assert!(!tok.encode("a</s>", false).unwrap().contains(&2));
    assert_eq!(tok.encode("</s>", true).unwrap(), vec![2]);
    assert_eq!(tok.decode(&[2], false), "");
}

#[test]
fn missing_special_ids_take_llamas_defaults() {
    let tok = tokenizer("llama", &spm_vocab(), vec![], true).unwrap();
    assert_eq!((tok.bos(), tok.eos()), (Some(1), Some(2)));
    assert!(tok.add_bos());
    // add_space_prefix defaults to true for SentencePiece.
    assert_eq!(tok.encode("hello", false).unwrap(), ids(&tok, &["▁hello"]));
}

#[test]
fn phi3_drops_whitespace_after_its_special_tokens() {
    let mut vocab = spm_vocab();
    vocab.push(("<|end|>".into(), 0.0, CONTROL));
    vocab.push(("<|user|>".into(), 0.0, CONTROL));
    let off = || ("tokenizer.ggml.add_space_prefix", Value::Bool(false));
    let phi3 = tokenizer(
        "llama",
        &vocab,
        vec![
            off(),
            (
                "general.name",
                Value::String("Phi-3 Mini 4k Instruct".into()),
            ),
        ],
        true,
    )
    .unwrap();
    let ends = ids(&phi3, &["<|end|>", "<|user|>"]);
    assert_eq!(phi3.encode("<|end|>\n <|user|>", true).unwrap(), ends);
    let other = tokenizer("llama", &vocab, vec![off()], true).unwrap();
    assert_eq!(
        other.encode("<|end|>\n<|user|>", true).unwrap(),
        vec![ends[0], byte(b'\n'), ends[1]]
    );
}

/// As llama.cpp: without token types every token is text, except the ones its load-time
/// rules recognise by text (`</s>` ends generation and becomes a control token); `<s>` is
/// then an ordinary piece, so a prompt's `<s>` is its literal characters.
#[test]
fn a_file_without_token_types_reads_tokens_as_text_except_the_end_of_generation_ones() {
    let untyped = tokenizer("llama", &spm_vocab(), vec![], false).unwrap();
    let typed = tokenizer("llama", &spm_vocab(), vec![], true).unwrap();
    assert_eq!(untyped.encode("</s>", true).unwrap(), vec![2]);
    assert!(untyped.is_end_of_generation(2));
    assert_eq!(typed.encode("<s>", true).unwrap(), vec![1]);
    let as_text = untyped.encode("<s>", true).unwrap();
    assert!(!as_text.contains(&1), "{as_text:?}");
    assert_eq!(untyped.encode("<s>", false).unwrap(), as_text);
}

#[test]
fn other_vocabulary_models_are_refused() {
    let err = tokenizer("bert", &spm_vocab(), vec![], true).unwrap_err();
    assert!(matches!(err, EngineError::UnsupportedFeature(_)), "{err}");
}

#[test]
fn byte_level_bpe_still_cuts_out_special_tokens_first() {
    let vocab: Vec<(String, f32, i32)> = [
        ("h", 1),
        ("i", 1),
        ("hi", 1),
        ("Ġ", 1),
        ("Ġhi", 1),
        ("<|im_start|>", CONTROL),
        ("<|im_end|>", CONTROL),
    ]
    .into_iter()
    .map(|(t, k)| (t.to_string(), 0.0, k))
    .collect();
    let merges = Value::Array(
        ["h i", "Ġ hi"]
            .into_iter()
            .map(|m| Value::String(m.into()))
            .collect(),
    );
    let tok = tokenizer(
        "gpt2",
        &vocab,
        vec![
            ("tokenizer.ggml.merges", merges),
            ("tokenizer.ggml.pre", Value::String("gpt-2".into())),
            ("tokenizer.ggml.eos_token_id", Value::U32(6)),
        ],
        true,
    )
    .unwrap();
    assert_eq!(
        tok.encode("<|im_start|>hi hi", true).unwrap(),
        vec![5, 2, 4]
    );
    assert_eq!(tok.decode(&[5, 2, 4, 6], false), "hi hi");
    assert_eq!(tok.decode(&[2, 4], false), "hi hi");
    assert_eq!(tok.end_of_generation(), &[6]);
}

#[test]
fn long_texts_encode_in_linear_time() {
    let tok = spm(true);
    let text = "hello world ".repeat(50_000);
    let started = std::time::Instant::now();
    let ids = tok.encode(&text, false).unwrap();
    // Two tokens a repeat, and the trailing space.
    assert_eq!(ids.len(), 100_001);
    // Generous: a quadratic pass over 600 kB would take minutes.
    assert!(started.elapsed().as_secs() < 20, "{:?}", started.elapsed());
}
