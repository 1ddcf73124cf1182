//! What the test suites of ragcake's crates share: one convention for a test whose server,
//! client or file is not there ([`required_env`], [`skip`]), the runtime the tests run on,
//! stores that are down or hang, and tensor comparisons.
//!
//! A test that cannot run is reported as skipped, by name, on the test run's own output,
//! and fails when `CI` is set: CI never passes a test that did not run.

use std::io::Write;
use std::sync::Arc;

use ragcake_engine::{DType, Tensor};
use ragcake_kvstore::object_store::ObjectStore;
use ragcake_kvstore::object_store::ObjectStoreExt;
use ragcake_kvstore::object_store::path::Path;
use ragcake_kvstore::{CacheKey, KvStore, open_url};

/// The value of `variable`, which names the server or client the running test needs (the
/// test script sets it when it starts one); `None` after [`skip`] when it is unset.
pub fn required_env(variable: &str, set_by: &str) -> Option<String> {
    match std::env::var(variable) {
        Ok(value) if !value.is_empty() => Some(value),
        _ => {
            skip(&format!("{variable} is not set ({set_by})"));
            None
        }
    }
}

/// Reports the running test as skipped because `why`: on the test run's output (past the
/// harness's capture, so it shows for a passing test), as `SKIPPED <test name>: <why>`.
///
/// # Panics
/// When `CI` is set: there every test must run.
pub fn skip(why: &str) {
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("a test");
    assert!(
        std::env::var_os("CI").is_none(),
        "{test} cannot run under CI: {why}"
    );
    // Straight to the process's stderr: the harness captures only print! and eprint!.
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
}

/// A two-thread tokio runtime, as on the target machines.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// object_store options for an S3 client of `endpoint` over plain HTTP.
pub fn s3_options(endpoint: &str) -> Vec<(String, String)> {
    [
        ("aws_endpoint", endpoint),
        ("aws_allow_http", "true"),
        ("aws_region", "us-east-1"),
        ("aws_access_key_id", "x"),
        ("aws_secret_access_key", "x"),
    ]
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .to_vec()
}

/// A real S3 client for the bucket `nowhere` at `endpoint`.
pub fn s3_store_at(endpoint: &str) -> (Arc<dyn ObjectStore>, Path) {
    open_url("s3://nowhere/kv", s3_options(endpoint)).expect("an S3 client")
}

/// A real S3 client pointed at a loopback port where nothing listens: a store that is down.
pub fn s3_store_that_is_down() -> (Arc<dyn ObjectStore>, Path) {
    s3_store_at("http://127.0.0.1:9")
}

/// A loopback server that accepts connections and never answers (a store that hangs), as
/// an HTTP endpoint. It holds up to 256 connections, then stops accepting.
pub fn silent_server() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a loopback port");
    let endpoint = format!("http://{}", listener.local_addr().expect("its address"));
    std::thread::spawn(move || {
        let held: Vec<_> = listener.incoming().take(256).flatten().collect();
        // Keep them open (unanswered) for as long as the tests run.
        std::thread::park();
        drop(held);
    });
    endpoint
}

/// The bytes stored under `key` in `store`'s backend, read past the KV store.
pub async fn stored_bytes(store: &KvStore, key: &CacheKey) -> Vec<u8> {
    let got = store
        .object_store()
        .get(&store.path_of(key))
        .await
        .expect("the object");
    got.bytes().await.expect("its bytes").to_vec()
}

/// Largest absolute element-wise difference of two tensors of equal shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let f32 = |t: &Tensor| t.to_dtype(DType::F32).expect("f32");
    max_abs(&(f32(a) - f32(b)).expect("a difference"))
}

/// Largest absolute value of a tensor (for relative tolerances).
pub fn max_abs(a: &Tensor) -> f32 {
    a.to_dtype(DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.abs())
        .and_then(|t| t.max(0))
        .and_then(|t| t.to_scalar::<f32>())
        .expect("a maximum")
}
