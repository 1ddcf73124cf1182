//! ragcake's own API: `POST /v1/ask` (an answer with its sources and TTFT breakdown, or
//! server-sent events), `GET /healthz` and `GET /metrics` (Prometheus).

use std::convert::Infallible;

use axum::Json;
use axum::extract::{Extension, State};
use axum::http::{StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use ragcake_engine::ChatMessage;
use serde::Deserialize;
use serde_json::{Value, json};

use super::error::{ApiError, ApiJson};
use super::{AppState, Tenant};
use crate::pipeline::IndexHealth;
use crate::types::{AskOptions, AskRequest, StreamEvent};

/// Request options: the pipeline's defaults with the fields the client set.
pub(crate) fn merge_options(
    defaults: &AskOptions,
    given: Option<Value>,
) -> Result<AskOptions, ApiError> {
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
pub(super) struct AskBody {
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

pub(super) async fn ask(
    State(state): State<AppState>,
    tenant: Option<Extension<Tenant>>,
    ApiJson(body): ApiJson<AskBody>,
) -> Response {
    let mut options = match merge_options(&state.pipeline.config().defaults, body.options) {
        Ok(options) => options,
        Err(e) => return e.into_response(),
    };
    options.cache_salt = Tenant::salt(tenant.as_deref(), options.cache_salt.take());
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

pub(super) async fn healthz(State(state): State<AppState>) -> Response {
    let health = state.pipeline.health().await;
    let status = if health.ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "status": if health.ok { "ok" } else { "unavailable" },
        "index_chunks": match &health.index {
            IndexHealth::Up { chunks } => Some(chunks),
            IndexHealth::Down { .. } => None,
        },
        "index_error": match &health.index {
            IndexHealth::Down { error } => Some(error),
            IndexHealth::Up { .. } => None,
        },
        "in_flight": health.in_flight,
        "scheduler": health.scheduler,
        "chunk_caches": health.chunk_caches,
    });
    (status, Json(body)).into_response()
}

pub(super) async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.pipeline.metrics_text(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use ragcake_scheduler::{Fidelity, Recompute, RecomputeRule};

    use super::*;

    #[test]
    fn request_options_merge_over_the_defaults() {
        let defaults = AskOptions::default();
        let merged = merge_options(&defaults, Some(json!({"top_k": 5}))).unwrap();
        assert_eq!(merged.top_k, 5);
        assert_eq!(merged.max_tokens, defaults.max_tokens);
        assert!(merge_options(&defaults, Some(json!({"top_k": "five"}))).is_err());
        assert!(merge_options(&defaults, Some(json!([1]))).is_err());
        let blend = json!({"recompute": {"rule": "leading", "ratio": 0.25}});
        let merged = merge_options(&defaults, Some(blend)).unwrap();
        assert_eq!(merged.recompute.rule, RecomputeRule::Leading);
        assert_eq!(merged.recompute.ratio, 0.25);
        let ratio_only = json!({"recompute": {"ratio": 0.5}});
        let merged = merge_options(&defaults, Some(ratio_only)).unwrap();
        assert_eq!(merged.recompute.rule, Recompute::default().rule);
        // A share named is the share used, not a floor the loads may raise.
        assert!(Recompute::default().load_paid && !merged.recompute.load_paid);
        let fast = merge_options(&defaults, Some(json!({"fidelity": "fast"}))).unwrap();
        assert_eq!(fast.blending(), Fidelity::Fast.settings());
        assert_eq!(fast.blending().0.ratio, Fidelity::FAST_SHARE);
        let exact = merge_options(&defaults, Some(json!({"fidelity": "exact"}))).unwrap();
        assert!(exact.blending().1);
        assert_eq!(defaults.blending(), (Recompute::default(), false));
        assert!(merge_options(&defaults, Some(json!({"fidelity": "perfect"}))).is_err());
        let unknown_rule = json!({"recompute": {"rule": "psychic"}});
        assert!(merge_options(&defaults, Some(unknown_rule)).is_err());
    }
}
