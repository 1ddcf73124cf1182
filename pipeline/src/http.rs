//! The question-answering HTTP service (axum): `POST /v1/ask`, OpenAI-compatible
//! `POST /v1/chat/completions` (with and without streaming), `GET /v1/models`,
//! `GET /healthz` and `GET /metrics`. Every error is a JSON body
//! `{"error": {"message", "type", "code"}}` with a 4xx or 5xx status; bad input never
//! stops the service.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::{Stream, StreamExt};
use ragcake_engine::{ChatMessage, FinishReason, Role};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::error::PipelineError;
use crate::pipeline::{Pipeline, PipelineConfig};
use crate::types::{Answer, AskOptions, AskRequest, StreamEvent};

/// Settings of the HTTP server (the `[http]` table of the service's TOML file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Largest request body accepted, bytes.
    pub max_body_bytes: usize,
    /// The model name clients use in `/v1/chat/completions` (the GGUF's file stem is
    /// accepted too).
    pub model_name: String,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_body_bytes: 64 * 1024,
            model_name: "ragcake".into(),
        }
    }
}

/// The service's whole configuration, as read from its TOML file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServiceConfig {
    /// The HTTP server.
    pub http: HttpConfig,
    /// The pipeline.
    pub pipeline: PipelineConfig,
}

impl ServiceConfig {
    /// Parses a configuration from TOML text.
    pub fn from_toml(text: &str) -> Result<Self, PipelineError> {
        toml::from_str(text).map_err(|e| PipelineError::Config(e.to_string()))
    }

    /// Reads a configuration file.
    pub fn load(path: &Path) -> Result<Self, PipelineError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| PipelineError::Config(format!("{}: {e}", path.display())))?;
        Self::from_toml(&text)
            .map_err(|e| PipelineError::Config(format!("{}: {e}", path.display())))
    }
}

/// An error response.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    code: Option<&'static str>,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            code: None,
            message: message.into(),
        }
    }

    fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body())).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

impl From<PipelineError> for ApiError {
    fn from(error: PipelineError) -> Self {
        let message = error.to_string();
        let (status, kind, code) = match &error {
            PipelineError::InvalidRequest(_) => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_request",
            ),
            PipelineError::RetrievalUnavailable(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                "index_unavailable",
            ),
            PipelineError::Overloaded => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "overloaded",
            ),
            PipelineError::Timeout(_) => (StatusCode::GATEWAY_TIMEOUT, "timeout_error", "timeout"),
            _ => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "internal_error",
            ),
        };
        if status.is_server_error() {
            tracing::warn!(%message, "request failed");
        }
        Self {
            status,
            kind,
            code: Some(code),
            message,
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        let status = rejection.status();
        let kind = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "request_too_large"
        } else {
            "invalid_request_error"
        };
        Self::new(status, kind, rejection.body_text())
    }
}

/// A JSON body whose rejections are JSON errors.
struct ApiJson<T>(T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let Json(value) = Json::<T>::from_request(request, state).await?;
        Ok(Self(value))
    }
}

/// The router of the service over `pipeline`.
pub fn router(pipeline: Pipeline, config: &HttpConfig) -> Router {
    let model_names = {
        let mut names = vec![config.model_name.clone()];
        if let Some(stem) = pipeline.engine().path().file_stem() {
            names.push(stem.to_string_lossy().into_owned());
        }
        names
    };
    let state = AppState {
        pipeline,
        model_names: model_names.into(),
    };
    Router::new()
        .route("/v1/ask", post(ask))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request_error",
                "method not allowed on this route",
            )
        })
        .layer(DefaultBodyLimit::max(config.max_body_bytes))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            count_responses,
        ))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            |_: Box<dyn std::any::Any + Send>| {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "server_error",
                    "internal error",
                )
                .into_response()
            },
        ))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state)
}

/// Serves `router` on `listener` until `shutdown` resolves, then lets requests in flight
/// finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

#[derive(Clone)]
struct AppState {
    pipeline: Pipeline,
    model_names: std::sync::Arc<[String]>,
}

async fn count_responses(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    state
        .pipeline
        .metrics()
        .record_http(response.status().as_u16());
    response
}

/// Request options: the pipeline's defaults with the fields the client set.
fn merge_options(defaults: &AskOptions, given: Option<Value>) -> Result<AskOptions, ApiError> {
    let Some(given) = given else {
        return Ok(defaults.clone());
    };
    let Value::Object(given) = given else {
        return Err(ApiError::invalid("options must be an object"));
    };
    let mut merged =
        serde_json::to_value(defaults).map_err(|e| ApiError::invalid(e.to_string()))?;
    if let Value::Object(fields) = &mut merged {
        fields.extend(given);
    }
    serde_json::from_value(merged).map_err(|e| ApiError::invalid(format!("options: {e}")))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AskBody {
    question: String,
    #[serde(default)]
    history: Vec<ChatMessage>,
    #[serde(default)]
    system: Option<String>,
    #[serde(default)]
    options: Option<Value>,
    #[serde(default)]
    stream: bool,
}

async fn ask(State(state): State<AppState>, ApiJson(body): ApiJson<AskBody>) -> Response {
    let options = match merge_options(&state.pipeline.config().defaults, body.options) {
        Ok(options) => options,
        Err(e) => return e.into_response(),
    };
    let request = AskRequest {
        question: body.question,
        history: body.history,
        system: body.system,
        options,
    };
    if !body.stream {
        return match state.pipeline.ask(request).await {
            Ok(answer) => Json(answer).into_response(),
            Err(e) => ApiError::from(e).into_response(),
        };
    }
    let events = state.pipeline.ask_stream(request).map(|event| {
        let event = match event {
            Ok(StreamEvent::Sources(sources)) => {
                Event::default().event("sources").json_data(sources)
            }
            Ok(StreamEvent::Text(text)) => Event::default()
                .event("text")
                .json_data(json!({ "text": text })),
            Ok(StreamEvent::Done(answer)) => Event::default().event("done").json_data(answer),
            Err(e) => Event::default()
                .event("error")
                .json_data(ApiError::from(e).body()),
        };
        Ok::<_, Infallible>(
            event.unwrap_or_else(|e| Event::default().event("error").data(e.to_string())),
        )
    });
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}

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
struct ChatBody {
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
    #[serde(default)]
    n: Option<usize>,
    /// ragcake's own options (top_k, mode, exact, …), as in `/v1/ask`.
    #[serde(default)]
    ragcake: Option<Value>,
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

async fn chat_completions(
    State(state): State<AppState>,
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
    let (request, include_usage) = match body.into_request(&state.pipeline.config().defaults) {
        Ok(parsed) => parsed,
        Err(e) => return e.into_response(),
    };
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

async fn models(State(state): State<AppState>) -> Json<Value> {
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

async fn healthz(State(state): State<AppState>) -> Response {
    let health = state.pipeline.health().await;
    let status = if health.ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "status": if health.ok { "ok" } else { "unavailable" },
        "index_chunks": health.index.as_ref().ok(),
        "index_error": health.index.as_ref().err(),
        "in_flight": health.in_flight,
    });
    (status, Json(body)).into_response()
}

async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.pipeline.metrics().encode(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_configuration_file_is_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/ragcake.toml");
        let config = ServiceConfig::load(&path).unwrap();
        assert_eq!(config, ServiceConfig::default());
    }

    #[test]
    fn an_unknown_setting_is_an_error_that_names_it() {
        let error = ServiceConfig::from_toml("[pipeline]\nmax_concurent = 3\n").unwrap_err();
        assert!(error.to_string().contains("max_concurent"), "{error}");
    }

    #[test]
    fn request_options_merge_over_the_defaults() {
        let defaults = AskOptions::default();
        let merged = merge_options(&defaults, Some(json!({"top_k": 5}))).unwrap();
        assert_eq!(merged.top_k, 5);
        assert_eq!(merged.max_tokens, defaults.max_tokens);
        assert!(merge_options(&defaults, Some(json!({"top_k": "five"}))).is_err());
        assert!(merge_options(&defaults, Some(json!([1]))).is_err());
    }
}
