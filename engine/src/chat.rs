//! Chat prompts: the model's own Jinja template (`tokenizer.chat_template`) rendered with
//! minijinja, or, for a file without one (a base model), a plain completion format.

use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};

ragcake_scheduler::named_enum! {
    /// Who wrote a chat message.
    pub enum Role in "lowercase" {
        /// Instructions for the assistant.
        System,
        /// The person asking.
        User,
        /// The model.
        Assistant,
    }
}

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// Its author.
    pub role: Role,
    /// Its text.
    pub content: String,
}

impl ChatMessage {
    /// A message from `role` with `content`.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
        }
    }
}

/// One piece of a rendered conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatPiece {
    /// Text the template wrote (role markers, special tokens as text): tokenized with
    /// special tokens recognised.
    Markup(String),
    /// A message's content, as the caller gave it: tokenized as plain text, so a message
    /// cannot forge a turn.
    Content {
        /// The index of the message in the conversation rendered.
        message: usize,
        /// Its text (for a model whose template has no system role, the system prompt
        /// opens the first user message's).
        text: String,
    },
}

/// A chat format.
///
/// The model's own template is rendered with each message's content replaced by a marker, and
/// the output split at the markers: the prompt then comes apart into template text and
/// message contents, so the pipeline can cut it into segments (preamble, retrieved chunks,
/// question) whose tokens line up with stored chunk caches, whatever the template. What a
/// template does to a content itself (`| trim`, `.upper()`) is not applied: the marker
/// stands in for the content and the caller's text is put back as given.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    format: Format,
}

#[derive(Debug, Clone)]
enum Format {
    /// The file's template.
    Jinja {
        source: String,
        env: Box<minijinja::Environment<'static>>,
        bos: String,
        eos: String,
    },
    /// No template: `system\n\n`, `user\n`, `Answer: assistant\n\n`, generation prompt
    /// `Answer:` — a completion a base model continues.
    Completion,
}

/// Name of the one template in the environment.
const TEMPLATE_NAME: &str = "chat";

/// Opens and closes a content marker (code points of a private-use plane, never produced
/// by a template and not expected in messages).
const MARK_OPEN: char = '\u{F0000}';
const MARK_CLOSE: char = '\u{F0001}';

impl ChatTemplate {
    /// The format of a model: its Jinja `template` when it has one (with the text of its
    /// BOS and EOS tokens, which templates reference), else the completion format.
    pub fn new(template: Option<&str>, bos: &str, eos: &str) -> Result<Self> {
        let Some(source) = template.filter(|t| !t.trim().is_empty()) else {
            return Ok(Self::completion());
        };
        let mut env = minijinja::Environment::new();
        // As the reference implementations render chat templates (Jinja2 with
        // trim_blocks and lstrip_blocks, Python string methods available).
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| EngineError::ChatTemplate(e.to_string()))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        // Templates that print today's date make the preamble, and so every chunk cache
        // computed after it, change at midnight (UTC): such caches then miss, visibly, and
        // are computed again; they are never loaded under another day's preamble.
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(|e| EngineError::ChatTemplate(format!("the model's template: {e}")))?;
        Ok(Self {
            format: Format::Jinja {
                source: source.to_string(),
                env: Box::new(env),
                bos: bos.to_string(),
                eos: eos.to_string(),
            },
        })
    }

    /// The completion format, for models without a chat template.
    pub fn completion() -> Self {
        Self {
            format: Format::Completion,
        }
    }

    /// Whether prompts are plain completions (the model has no chat template).
    pub fn is_completion(&self) -> bool {
        matches!(self.format, Format::Completion)
    }

    /// The Jinja source, when the model has a template.
    pub fn source(&self) -> Option<&str> {
        match &self.format {
            Format::Jinja { source, .. } => Some(source),
            Format::Completion => None,
        }
    }

    /// Renders a conversation as text; with `add_generation_prompt` it ends with the
    /// opening of the assistant's reply. Special tokens appear as text.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        Ok(self
            .pieces(messages, add_generation_prompt)?
            .into_iter()
            .map(|p| match p {
                ChatPiece::Markup(t) | ChatPiece::Content { text: t, .. } => t,
            })
            .collect())
    }

    /// Renders a conversation as [`ChatPiece`]s, in order. A template that refuses a system
    /// message (some have no system role) gets the system prompt at the start of the first
    /// user message instead, as such models are prompted.
    pub fn pieces(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<Vec<ChatPiece>> {
        let Format::Jinja { env, bos, eos, .. } = &self.format else {
            return Ok(completion_pieces(messages, add_generation_prompt));
        };
        let template = env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| EngineError::ChatTemplate(e.to_string()))?;
        let render = |messages: &[ChatMessage]| -> Result<String> {
            let marked: Vec<minijinja::Value> = messages
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    minijinja::context! {
                        role => <&str>::from(m.role),
                        content => format!("{MARK_OPEN}{i}{MARK_CLOSE}"),
                    }
                })
                .collect();
            template
                .render(minijinja::context! {
                    messages => marked,
                    add_generation_prompt => add_generation_prompt,
                    bos_token => bos,
                    eos_token => eos,
                })
                .map_err(|e| EngineError::ChatTemplate(format!("rendering: {e:#}")))
        };
        let has_system = messages.first().is_some_and(|m| m.role == Role::System);
        let (rendered, merged) = match render(messages) {
            Ok(text) => (text, None),
            Err(e) if has_system && messages.len() > 1 => {
                // The system prompt opens the first user message instead.
                let rest = &messages[1..];
                match render(rest) {
                    Ok(text) => (text, Some(&messages[0].content)),
                    Err(_) => return Err(e),
                }
            }
            Err(e) => return Err(e),
        };
        let offset = usize::from(merged.is_some());
        let mut pieces = split_marked(&rendered, messages.len() - offset)?;
        let mut seen = vec![false; messages.len()];
        let mut merged = merged;
        for piece in &mut pieces {
            if let ChatPiece::Content { message, text } = piece {
                *message += offset;
                if seen[*message] {
                    return Err(EngineError::ChatTemplate(format!(
                        "the template writes message {} twice",
                        *message
                    )));
                }
                seen[*message] = true;
                *text = messages[*message].content.clone();
                if messages[*message].role == Role::User
                    && let Some(system) = merged.take()
                {
                    *text = format!("{system}\n\n{text}");
                }
            }
        }
        if let Some(system) = merged {
            return Err(EngineError::ChatTemplate(format!(
                "the template refuses a system message and no user message follows to carry \
                 it ({} characters of system prompt)",
                system.len()
            )));
        }
        Ok(pieces)
    }
}

/// Splits `rendered` at the content markers of `n` messages.
fn split_marked(rendered: &str, n: usize) -> Result<Vec<ChatPiece>> {
    let mut pieces = Vec::new();
    let mut rest = rendered;
    while let Some(open) = rest.find(MARK_OPEN) {
        if open > 0 {
            pieces.push(ChatPiece::Markup(rest[..open].to_string()));
        }
        let after = &rest[open + MARK_OPEN.len_utf8()..];
        let close = after.find(MARK_CLOSE).ok_or_else(|| {
            EngineError::ChatTemplate("the template cut a message's content".into())
        })?;
        let message: usize = after[..close]
            .parse()
            .ok()
            .filter(|&i| i < n)
            .ok_or_else(|| {
                EngineError::ChatTemplate("the template changed a message's content".into())
            })?;
        pieces.push(ChatPiece::Content {
            message,
            text: String::new(),
        });
        rest = &after[close + MARK_CLOSE.len_utf8()..];
    }
    if !rest.is_empty() {
        pieces.push(ChatPiece::Markup(rest.to_string()));
    }
    Ok(pieces)
}

/// The completion format's pieces.
fn completion_pieces(messages: &[ChatMessage], add_generation_prompt: bool) -> Vec<ChatPiece> {
    let mut pieces = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        if m.role == Role::Assistant {
            pieces.push(ChatPiece::Markup("Answer: ".into()));
        }
        pieces.push(ChatPiece::Content {
            message: i,
            text: m.content.clone(),
        });
        pieces.push(ChatPiece::Markup(
            match m.role {
                Role::System | Role::Assistant => "\n\n",
                Role::User => "\n",
            }
            .into(),
        ));
    }
    if add_generation_prompt {
        pieces.push(ChatPiece::Markup("Answer:".into()));
    }
    pieces
}

/// `raise_exception(message)`, which templates call to refuse a conversation.
fn raise_exception(message: String) -> std::result::Result<minijinja::Value, minijinja::Error> {
    Err(minijinja::Error::new(
        minijinja::ErrorKind::InvalidOperation,
        message,
    ))
}

/// `strftime_now(format)`: today's date (UTC), for templates that put it in the system
/// prompt. Supports the `%d`, `%m`, `%Y`, `%b`, `%B` fields such templates use.
fn strftime_now(format: String) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let days = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() / 86_400)
        .unwrap_or(0) as i64;
    let (year, month, day) = civil_from_days(days);
    let name = MONTHS[(month - 1) as usize];
    format
        .replace("%d", &format!("{day:02}"))
        .replace("%m", &format!("{month:02}"))
        .replace("%Y", &year.to_string())
        .replace("%B", name)
        .replace("%b", &name[..3])
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (H. Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nBe kind.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn user(text: &str) -> ChatMessage {
        ChatMessage::new(Role::User, text)
    }

    #[test]
    fn a_jinja_template_renders_with_its_default_system_prompt_and_generation_prompt() {
        let t = ChatTemplate::new(Some(CHATML), "<s>", "</s>").unwrap();
        assert_eq!(
            t.render(&[user("Hi")], true).unwrap(),
            "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let pieces = t
            .pieces(
                &[ChatMessage::new(Role::System, "S"), user("<|im_end|>")],
                false,
            )
            .unwrap();
        assert_eq!(
            pieces,
            vec![
                ChatPiece::Markup("<|im_start|>system\n".into()),
                ChatPiece::Content {
                    message: 0,
                    text: "S".into()
                },
                ChatPiece::Markup("<|im_end|>\n<|im_start|>user\n".into()),
                // The content stays apart from the markup: it is never parsed for specials.
                ChatPiece::Content {
                    message: 1,
                    text: "<|im_end|>".into()
                },
                ChatPiece::Markup("<|im_end|>\n".into()),
            ]
        );
    }

    #[test]
    fn a_template_without_a_system_role_gets_the_system_prompt_in_the_first_user_message() {
        let source = "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}[{{ m['role'] | upper }}] {{ m['content'] | trim }}\n{% endfor %}";
        let t = ChatTemplate::new(Some(source), "<s>", "</s>").unwrap();
        let text = t
            .render(
                &[ChatMessage::new(Role::System, "Be brief."), user("Hi")],
                false,
            )
            .unwrap();
        assert_eq!(text, "<s>[USER] Be brief.\n\nHi\n");
    }

    #[test]
    fn python_string_methods_and_loop_controls_work_in_templates() {
        let source = "{% for m in messages %}{{ ('  [' + m['role'] + ']  ').strip() }}{{ m['content'] }}{% if loop.index == 1 %}{% break %}{% endif %}{% endfor %}";
        let t = ChatTemplate::new(Some(source), "", "").unwrap();
        assert_eq!(
            t.render(&[user("abc"), user("def")], false).unwrap(),
            "[user]abc"
        );
    }

    #[test]
    fn a_broken_template_is_a_clear_error() {
        let err = ChatTemplate::new(Some("{% for m in messages %}"), "", "").unwrap_err();
        assert!(err.to_string().contains("template"), "{err}");
    }

    #[test]
    fn no_template_is_a_completion() {
        let t = ChatTemplate::new(None, "<bos>", "<eos>").unwrap();
        assert!(t.is_completion());
        let text = t
            .render(
                &[ChatMessage::new(Role::System, "Facts."), user("Q?")],
                true,
            )
            .unwrap();
        assert_eq!(text, "Facts.\n\nQ?\nAnswer:");
    }

    #[test]
    fn days_since_the_epoch_become_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_424), (2025, 12, 2));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }
}
