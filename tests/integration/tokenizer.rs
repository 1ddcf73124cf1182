//! The GGUF tokenizer against the reference tokenization and the chat template.

use ragcake::engine::{ChatMessage, Role};

use crate::common::engine;

#[derive(serde::Deserialize)]
struct Fixture {
    cases: Vec<Case>,
}

#[derive(serde::Deserialize)]
struct Case {
    text: String,
    parse_special: bool,
    ids: Vec<u32>,
}

#[test]
fn tokenizer_matches_reference_ids_on_every_fixture_text() {
    let fixture: Fixture =
        serde_json::from_str(include_str!("../fixtures/smollm2_tokens.json")).unwrap();
    assert!(fixture.cases.len() >= 20);
    let tokenizer = engine().tokenizer();
    assert_encodes_every_case(tokenizer, &fixture);
}

#[test]
fn decoding_reference_ids_gives_back_the_text() {
    let fixture: Fixture =
        serde_json::from_str(include_str!("../fixtures/smollm2_tokens.json")).unwrap();
    let tokenizer = engine().tokenizer();
    for case in fixture.cases.iter().filter(|c| !c.parse_special) {
        assert_eq!(tokenizer.decode(&case.ids, false), case.text);
    }
}

#[test]
fn the_models_own_chat_template_renders_chatml_with_its_default_system_prompt() {
    let engine = engine();
    let template = engine.template();
    assert!(
        template
            .source()
            .is_some_and(|s| s.contains("<|im_start|>"))
    );
    let text = template
        .render(&[ChatMessage::new(Role::User, "Hi")], true)
        .unwrap();
    assert_eq!(
        text,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging \
         Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    // An explicit system message replaces the default one.
    let text = template
        .render(
            &[
                ChatMessage::new(Role::System, "Be brief."),
                ChatMessage::new(Role::User, "Hi"),
            ],
            false,
        )
        .unwrap();
    assert_eq!(
        text,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    );
    let ids = engine
        .chat_tokens(&[ChatMessage::new(Role::User, "Hi")])
        .unwrap();
    let tokenizer = engine.tokenizer();
    let im_start = tokenizer.token_id("<|im_start|>").unwrap();
    let im_end = tokenizer.token_id("<|im_end|>").unwrap();
    assert_eq!(
        ids[0], im_start,
        "no BOS for this model, ChatML opens the prompt"
    );
    assert_eq!(ids.iter().filter(|&&t| t == im_start).count(), 3);
    assert_eq!(ids.iter().filter(|&&t| t == im_end).count(), 2);
    assert!(tokenizer.is_end_of_generation(im_end));
}

#[test]
fn stream_decoder_never_splits_a_character() {
    let tokenizer = engine().tokenizer();
    let text = "naïve 日本語 😀👍🏽 done";
    let ids = tokenizer.encode(text, false).unwrap();
    let mut decoder = ragcake::engine::StreamDecoder::new();
    let mut out = String::new();
    for id in ids {
        let piece = decoder.push(tokenizer, id);
        assert!(!piece.contains('\u{FFFD}'), "half a character in {piece:?}");
        out += &piece;
    }
    out += &decoder.finish();
    assert_eq!(out, text);
}

/// The Gemma 3 270M GGUF (`RAGCAKE_GEMMA3_GGUF`, else the model cache), with the reference
/// ids llama.cpp gives for it; `None` when either is missing (the test is skipped).
fn gemma3() -> Option<(ragcake::engine::Tokenizer, Fixture)> {
    let path = std::env::var_os("RAGCAKE_GEMMA3_GGUF")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            ragcake::model_cache::ragcake_home().join("models/gemma3-270m/gemma-3-270m-q4_k_m.gguf")
        });
    let fixture = crate::common::repo_dir().join("tests/fixtures/gemma3_tokens.json");
    for (needed, what) in [
        (&path, "the Gemma 3 GGUF"),
        (&fixture, "the Gemma 3 fixture"),
    ] {
        if !needed.is_file() {
            ragcake_test_support::skip(&format!(
                "{what} {} is missing (RAGCAKE_GEMMA3_GGUF names the model)",
                needed.display()
            ));
            return None;
        }
    }
    let gguf = ragcake::engine::GgufFile::open(&path).unwrap();
    let tokenizer = ragcake::engine::Tokenizer::from_gguf(&gguf).unwrap();
    let fixture = serde_json::from_str(&std::fs::read_to_string(fixture).unwrap()).unwrap();
    Some((tokenizer, fixture))
}

#[test]
fn sentencepiece_tokenizer_matches_reference_ids_on_every_gemma3_fixture_text() {
    let Some((tokenizer, fixture)) = gemma3() else {
        return;
    };
    assert!(fixture.cases.len() >= 20);
    assert_encodes_every_case(&tokenizer, &fixture);
}

#[test]
fn decoding_gemma3_reference_ids_gives_back_the_text() {
    let Some((tokenizer, fixture)) = gemma3() else {
        return;
    };
    for case in fixture.cases.iter().filter(|c| !c.parse_special) {
        assert_eq!(tokenizer.decode(&case.ids, false), case.text);
    }
}

#[test]
fn gemma3_turns_are_special_tokens_that_end_generation() {
    let Some((tokenizer, _)) = gemma3() else {
        return;
    };
    assert_eq!((tokenizer.bos(), tokenizer.eos()), (Some(2), Some(1)));
    assert!(tokenizer.add_bos());
    let start = tokenizer.token_id("<start_of_turn>").unwrap();
    let end = tokenizer.token_id("<end_of_turn>").unwrap();
    let ids = tokenizer
        .encode("<start_of_turn>user\nHi<end_of_turn>\n", true)
        .unwrap();
    assert_eq!((ids[0], ids[ids.len() - 2]), (start, end));
    // Not parsed, the same text is only text.
    let ids = tokenizer
        .encode("<start_of_turn>user\nHi<end_of_turn>\n", false)
        .unwrap();
    assert!(!ids.contains(&start) && !ids.contains(&end));
    assert!(tokenizer.is_end_of_generation(end) && tokenizer.is_end_of_generation(1));
    assert!(!tokenizer.is_end_of_generation(start));

    let text = "naïve 日本語 😀👍🏽 done";
    let mut decoder = ragcake::engine::StreamDecoder::new();
    let mut out = String::new();
    for id in tokenizer.encode(text, false).unwrap() {
        let piece = decoder.push(&tokenizer, id);
        assert!(!piece.contains('\u{FFFD}'), "half a character in {piece:?}");
        out += &piece;
    }
    out += &decoder.finish();
    assert_eq!(out, text);
}

/// `tokenizer` gives every case of `fixture` its reference ids; the failures are listed
/// together.
fn assert_encodes_every_case(tokenizer: &ragcake::engine::Tokenizer, fixture: &Fixture) {
    let mut failures = Vec::new();
    for case in &fixture.cases {
        let ids = tokenizer.encode(&case.text, case.parse_special).unwrap();
        if ids != case.ids {
            failures.push(format!(
                "{:?} (special={}):\n  expected {:?}\n  got      {:?}",
                case.text, case.parse_special, case.ids, ids
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
