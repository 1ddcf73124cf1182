//! The question-answering HTTP service (axum): ragcake's own API ([`native`]: `POST
//! /v1/ask`, `GET /healthz`, `GET /metrics`) and the OpenAI-compatible one ([`openai`]:
//! `POST /v1/chat/completions` with and without streaming, `GET /v1/models`). Every error
//! is a JSON body ([`error`]) with a 4xx or 5xx status; bad input never stops the service.

pub mod error;
mod native;
mod openai;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

pub use error::ApiError;

use crate::config::HttpConfig;
use crate::pipeline::Pipeline;

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
        .route("/v1/ask", post(native::ask))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/models", get(openai::models))
        .route("/healthz", get(native::healthz))
        .route("/metrics", get(native::metrics))
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
