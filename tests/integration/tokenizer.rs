//! The GGUF tokenizer against the reference tokenization and the chat template.

use ragcake::engine::{ChatMessage, ChatTemplate, Role};

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
fn chat_template_renders_chatml_with_the_models_default_system_prompt() {
    let engine = engine();
    let template = engine.template();
    assert_eq!(
        *template,
        ChatTemplate::ChatMl {
            default_system: Some(
                "You are a helpful AI assistant named SmolLM, trained by Hugging Face".into()
            )
        }
    );
    let text = template.render(&[ChatMessage::new(Role::User, "Hi")], true);
    assert_eq!(
        text,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging \
         Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    // An explicit system message replaces the default one.
    let text = template.render(
        &[
            ChatMessage::new(Role::System, "Be brief."),
            ChatMessage::new(Role::User, "Hi"),
        ],
        false,
    );
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
