//! Chat prompt formats, recognised from the GGUF's `tokenizer.chat_template`.

use serde::{Deserialize, Serialize};

/// Who wrote a chat message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Instructions for the assistant.
    System,
    /// The person asking.
    User,
    /// The model.
    Assistant,
}

impl Role {
    /// The role's name as chat templates write it.
    pub fn as_str(&self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
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

/// A chat format. The engine renders prompts itself rather than running the Jinja template
/// so that a prompt can be split into segments (preamble, retrieved chunks, question) whose
/// tokens line up with stored chunk caches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatTemplate {
    /// `<|im_start|>role\n…<|im_end|>\n` (SmolLM, Qwen, …), with the system prompt the
    /// template inserts when the conversation has none.
    ChatMl {
        /// System prompt used when the conversation does not start with one.
        default_system: Option<String>,
    },
    /// Llama 3 headers: `<|start_header_id|>role<|end_header_id|>\n\n…<|eot_id|>`.
    Llama3,
    /// No template in the file: `role: content` lines.
    Plain,
}

impl ChatTemplate {
    /// Recognises the format of a Jinja chat template string.
    pub fn detect(template: Option<&str>) -> Self {
        let Some(t) = template else {
            return Self::Plain;
        };
        if t.contains("<|im_start|>") {
            // The template's default system prompt, written with a real or an escaped newline.
            let default_system = ["<|im_start|>system\n", "<|im_start|>system\\n"]
                .iter()
                .find_map(|mark| t.find(mark).map(|at| &t[at + mark.len()..]))
                .and_then(|rest| rest.find("<|im_end|>").map(|end| rest[..end].to_string()))
                .filter(|s| !s.contains("{{") && !s.contains("{%") && !s.contains("message"));
            Self::ChatMl { default_system }
        } else if t.contains("<|start_header_id|>") {
            Self::Llama3
        } else {
            Self::Plain
        }
    }

    /// The text that opens a message from `role`.
    pub fn message_start(&self, role: Role) -> String {
        match self {
            Self::ChatMl { .. } => format!("<|im_start|>{}\n", role.as_str()),
            Self::Llama3 => format!("<|start_header_id|>{}<|end_header_id|>\n\n", role.as_str()),
            Self::Plain => format!("{}: ", role.as_str()),
        }
    }

    /// The text that closes a message.
    pub fn message_end(&self) -> &'static str {
        match self {
            Self::ChatMl { .. } => "<|im_end|>\n",
            Self::Llama3 => "<|eot_id|>",
            Self::Plain => "\n",
        }
    }

    /// Renders a conversation; with `add_generation_prompt` it ends with the opening of the
    /// assistant's reply. Special tokens appear as text: tokenize with `parse_special`.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> String {
        let mut out = String::new();
        if let Self::ChatMl {
            default_system: Some(system),
        } = self
            && messages.first().map(|m| m.role) != Some(Role::System)
        {
            out += &self.message_start(Role::System);
            out += system;
            out += self.message_end();
        }
        for m in messages {
            out += &self.message_start(m.role);
            out += &m.content;
            out += self.message_end();
        }
        if add_generation_prompt {
            out += &self.message_start(Role::Assistant);
        }
        out
    }
}
