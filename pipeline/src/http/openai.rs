//! The OpenAI-compatible API: `POST /v1/chat/completions` (with and without streaming) and
//! `GET /v1/models`. The last user message is the question, earlier messages are history.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::{Extension, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
use ragcake_engine::{ChatMessage, FinishReason, Role};
use serde::Deserialize;
use serde_json::{Value, json};

use super::error::{ApiError, ApiJson};
use super::native::merge_options;
use super::{AppState, Tenant};
use crate::error::PipelineError;
use crate::types::{Answer, AskOptions, AskRequest, StreamEvent};

/// A message's content: a string, or an array of parts of which the text parts count.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

impl Content {
    fn into_text(self) -> Result<String, ApiError> {
        match self {
            Self::Text(text) => Ok(text),
            Self::Parts(parts) => parts
                .into_iter()
                .map(|p| match (p.kind.as_str(), p.text) {
                    ("text", Some(text)) => Ok(text),
                    (kind, _) => Err(ApiError::invalid(format!(
                        "content parts of type {kind:?} are not supported"
                    ))),
                })
                .collect(),
        }
    }
}

#[derive(Debug, Deserialize)]
struct ChatMessageBody {
    role: String,
    content: Option<Content>,
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// An OpenAI chat completion request; fields ragcake does not use are accepted and ignored.
#[derive(Debug, Deserialize)]
pub(super) struct ChatBody {
    model: String,
    messages: Vec<ChatMessageBody>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    max_tokens: Option<usize>,
    #[serde(default)]
    max_completion_tokens: Option<usize>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default)]
    seed: Option<u64>,
    /// Decode to `max_tokens` past end-of-generation tokens (vLLM's field).
    #[serde(default)]
    ignore_eos: Option<bool>,
    #[serde(default)]
    n: Option<usize>,
    /// ragcake's own options (top_k, mode, exact, …), as in `/v1/ask`.
    #[serde(default)]
    ragcake: Option<Value>,
    /// Isolates this request's prefix caches (vLLM's field); see `AskOptions::cache_salt`.
    #[serde(default)]
    cache_salt: Option<String>,
}

impl ChatBody {
    /// The question (the last user message), the history before it, the system prompt.
    fn into_request(self, defaults: &AskOptions) -> Result<(AskRequest, bool), ApiError> {
        if self.n.unwrap_or(1) != 1 {
            return Err(ApiError::invalid("only n = 1 is supported"));
        }
        let mut options = merge_options(defaults, self.ragcake)?;
        if let Some(max) = self.max_completion_tokens.or(self.max_tokens) {
            options.max_tokens = max;
        }
        if let Some(t) = self.temperature {
            options.temperature = t;
        }
        if let Some(p) = self.top_p {
            options.top_p = p;
        }
        if let Some(seed) = self.seed {
            options.seed = seed;
        }
        if let Some(ignore) = self.ignore_eos {
            options.ignore_eos = ignore;
        }
        if self.cache_salt.is_some() {
            options.cache_salt = self.cache_salt;
        }
        let mut system = Vec::new();
        let mut turns = Vec::new();
        for m in self.messages {
            let text = match m.content {
                Some(content) => content.into_text()?,
                None => String::new(),
            };
            let role = match m.role.as_str() {
                "system" | "developer" => {
                    system.push(text);
                    continue;
                }
                "user" => Role::User,
                "assistant" => Role::Assistant,
                other => {
                    return Err(ApiError::invalid(format!(
                        "messages with role {other:?} are not supported"
                    )));
                }
            };
            turns.push(ChatMessage::new(role, text));
        }
        let question = match turns.pop() {
            Some(last) if last.role == Role::User => last.content,
            _ => return Err(ApiError::invalid("the last message must be from the user")),
        };
        let include_usage = self.stream_options.is_some_and(|o| o.include_usage);
        let request = AskRequest {
            question,
            history: turns,
            system: (!system.is_empty()).then(|| system.join("\n")),
            options,
        };
        Ok((request, include_usage))
    }
}

fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Length | FinishReason::ContextFull => "length",
        FinishReason::Stop | FinishReason::Cancelled => "stop",
    }
}

fn usage(answer: &Answer) -> Value {
    let b = &answer.breakdown;
    json!({
        "prompt_tokens": b.prompt_tokens,
        "completion_tokens": b.generated_tokens,
        "total_tokens": b.prompt_tokens + b.generated_tokens,
    })
}

fn completion_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    format!(
        "chatcmpl-{nanos:x}{:04x}",
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub(super) async fn chat_completions(
    State(state): State<AppState>,
    tenant: Option<Extension<Tenant>>,
    ApiJson(body): ApiJson<ChatBody>,
) -> Response {
    if !state.model_names.contains(&body.model) {
        return ApiError {
            status: StatusCode::NOT_FOUND,
            kind: "invalid_request_error",
            code: Some("model_not_found"),
            message: format!(
                "the model {:?} does not exist; this service serves {:?}",
                body.model, state.model_names[0]
            ),
        }
        .into_response();
    }
    let model = body.model.clone();
    let stream = body.stream;
    let (mut request, include_usage) = match body.into_request(&state.pipeline.config().defaults) {
        Ok(parsed) => parsed,
        Err(e) => return e.into_response(),
    };
    let salt = request.options.cache_salt.take();
    request.options.cache_salt = Tenant::salt(tenant.as_deref(), salt);
    let id = completion_id();
    let created = unix_now();
    if !stream {
        return match state.pipeline.ask(request).await {
            Ok(answer) => Json(json!({
                "id": id,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": answer.text},
                    "finish_reason": finish_reason(answer.finish_reason),
                    "logprobs": null,
                }],
                "usage": usage(&answer),
                "ragcake": {"sources": answer.sources, "breakdown": answer.breakdown},
            }))
            .into_response(),
            Err(e) => ApiError::from(e).into_response(),
        };
    }
    let chunk = move |delta: Value, finish: Option<&str>| {
        json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null}],
        })
    };
    let events = chat_stream(state.pipeline.ask_stream(request), chunk, include_usage);
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// The OpenAI stream: a role chunk, a chunk per text piece, a final chunk with the finish
/// reason (and the usage and ragcake's breakdown), then `[DONE]`.
fn chat_stream(
    events: impl Stream<Item = Result<StreamEvent, PipelineError>> + Send + 'static,
    chunk: impl Fn(Value, Option<&str>) -> Value + Send + 'static,
    include_usage: bool,
) -> impl Stream<Item = Result<Event, Infallible>> + Send + 'static {
    let first =
        Event::default().data(chunk(json!({"role": "assistant", "content": ""}), None).to_string());
    let body = events.filter_map(move |event| {
        let data = match event {
            Ok(StreamEvent::Sources(_)) => None,
            Ok(StreamEvent::Text(text)) => Some(chunk(json!({ "content": text }), None)),
            Ok(StreamEvent::Done(answer)) => {
                let mut last = chunk(json!({}), Some(finish_reason(answer.finish_reason)));
                last["ragcake"] = json!({"sources": answer.sources, "breakdown": answer.breakdown});
                if include_usage {
                    last["usage"] = usage(&answer);
                }
                Some(last)
            }
            Err(e) => Some(ApiError::from(e).body()),
        };
        futures::future::ready(data.map(|d| Ok(Event::default().data(d.to_string()))))
    });
    futures::stream::once(futures::future::ready(Ok(first)))
        .chain(body)
        .chain(futures::stream::once(futures::future::ready(Ok(
            Event::default().data("[DONE]"),
        ))))
}

pub(super) async fn models(State(state): State<AppState>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": state.model_names[0],
            "object": "model",
            "created": 0,
            "owned_by": "ragcake",
        }],
    }))
}
