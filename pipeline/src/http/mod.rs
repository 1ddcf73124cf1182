//! The question-answering HTTP service (axum): ragcake's own API ([`native`]: `POST
//! /v1/ask`, `GET /healthz`, `GET /metrics`) and the OpenAI-compatible one ([`openai`]:
//! `POST /v1/chat/completions` with and without streaming, `GET /v1/models`). Every error
//! is a JSON body ([`error`]) with a 4xx or 5xx status; bad input never stops the service.

pub mod error;
mod native;
mod openai;

use std::sync::Arc;

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
    let tenants: Arc<[(String, String)]> = config
        .api_keys
        .iter()
        .map(|k| (k.key.clone(), k.salt()))
        .collect();
    // The question routes need a key when keys are configured; health and metrics do not
    // (they say nothing of any request's content).
    let questions = Router::new()
        .route("/v1/ask", post(native::ask))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/models", get(openai::models))
        .layer(middleware::from_fn_with_state(tenants, authenticate));
    Router::new()
        .merge(questions)
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
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
            std::time::Duration::from_secs_f64(config.body_read_timeout_secs.max(1e-3)),
        ))
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
/// finish. At most `config.max_connections` connections are served at once (more wait in
/// the listen backlog); one that sends no request headers within
/// `config.header_read_timeout_secs` of opening or of its last response is closed, so
/// clients that connect and stay silent cannot hold the service's connections.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    config: &HttpConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto;
    use hyper_util::service::TowerToHyperService;

    let permits = Arc::new(tokio::sync::Semaphore::new(config.max_connections.max(1)));
    let header_timeout =
        std::time::Duration::from_secs_f64(config.header_read_timeout_secs.max(1e-3));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(header_timeout))
        .keep_alive_timeout(header_timeout);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of file descriptors, say: wait a little rather than spin.
                    tracing::warn!(%error, "accepting a connection failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let (router, builder, watcher) = (router.clone(), builder.clone(), graceful.watcher());
        tokio::spawn(async move {
            // The protocol is detected from the first bytes, and waiting for them has no
            // timeout of its own: a client that connects and sends nothing is cut here.
            let first_bytes =
                tokio::time::timeout(header_timeout, stream.peek(&mut [0u8; 1])).await;
            if !matches!(first_bytes, Ok(Ok(n)) if n > 0) {
                drop(permit);
                return;
            }
            let service = TowerToHyperService::new(router);
            let connection = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .into_owned();
            if let Err(error) = watcher.watch(connection).await {
                tracing::debug!(%error, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// The tenant a request's API key stands for: its cache salt.
#[derive(Debug, Clone)]
pub(crate) struct Tenant {
    salt: String,
}

impl Tenant {
    /// The cache salt of a request of this tenant (or of no tenant) that asked for
    /// `requested`: the tenant's salt first, so a client cannot take another tenant's.
    pub(crate) fn salt(tenant: Option<&Tenant>, requested: Option<String>) -> Option<String> {
        match (tenant, requested) {
            (Some(t), Some(r)) => Some(format!("{}\u{0}{r}", t.salt)),
            (Some(t), None) => Some(t.salt.clone()),
            (None, requested) => requested,
        }
    }
}

/// Lets a request through with its [`Tenant`] when it presents one of `tenants`' keys
/// (`Authorization: Bearer KEY` or `X-Api-Key: KEY`); 401 otherwise. No keys: all pass.
async fn authenticate(
    State(tenants): State<Arc<[(String, String)]>>,
    mut request: Request,
    next: Next,
) -> Response {
    if tenants.is_empty() {
        return next.run(request).await;
    }
    let headers = request.headers();
    let presented = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()))
        .map(str::trim);
    // Every key compared in full, so the time taken does not tell how much of one matched.
    let found = presented.and_then(|p| {
        tenants.iter().fold(None, |found, (key, salt)| {
            let same = key.len() == p.len()
                && key
                    .bytes()
                    .zip(p.bytes())
                    .fold(0u8, |diff, (a, b)| diff | (a ^ b))
                    == 0;
            found.or(same.then(|| salt.clone()))
        })
    });
    match found {
        Some(salt) => {
            request.extensions_mut().insert(Tenant { salt });
            next.run(request).await
        }
        None => ApiError {
            status: StatusCode::UNAUTHORIZED,
            kind: "authentication_error",
            code: Some("invalid_api_key"),
            message: "a valid API key is required (Authorization: Bearer KEY)".into(),
        }
        .into_response(),
    }
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
