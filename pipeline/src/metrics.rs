//! Prometheus metrics of the pipeline and the service, and the layer that records them.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tower::{Layer, Service};

use ragcake_scheduler::SchedulerStats;

use crate::error::{BoxError, PipelineError};
use crate::types::{Answer, Ask};

type Labels = Vec<(String, String)>;

fn label(name: &str, value: &str) -> Labels {
    vec![(name.to_string(), value.to_string())]
}

/// The metrics registry and every metric in it.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<Labels, Counter>,
    ttft: Histogram,
    latency: Histogram,
    chunks: Family<Labels, Counter>,
    tokens: Family<Labels, Counter>,
    bytes_loaded: Counter,
    misses: Family<Labels, Counter>,
    hit_ratio: Gauge<f64, AtomicU64>,
    in_flight: Gauge,
    http_responses: Family<Labels, Counter>,
    write_backs: SchedulerCounters,
}

/// The scheduler's write-back counters, mirrored at each scrape.
#[derive(Debug, Default)]
struct SchedulerCounters {
    written: Counter,
    skipped: Counter,
    failed: Counter,
    dropped: Counter,
    pending_bytes: Gauge,
    /// Mirroring is a read then an add: one scrape at a time.
    sync: std::sync::Mutex<()>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every metric at zero.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("ragcake");
        let requests = Family::<Labels, Counter>::default();
        registry.register(
            "requests",
            "Questions answered or failed, by outcome (ok, degraded, invalid, unavailable, overloaded, timeout, error)",
            requests.clone(),
        );
        let ttft = Histogram::new(exponential_buckets(0.05, 1.6, 16));
        registry.register(
            "ttft_seconds",
            "Time to first token: retrieval, planning and prefill",
            ttft.clone(),
        );
        let latency = Histogram::new(exponential_buckets(0.05, 1.6, 18));
        registry.register(
            "request_seconds",
            "Time to the whole answer",
            latency.clone(),
        );
        let chunks = Family::<Labels, Counter>::default();
        registry.register(
            "prefill_chunks",
            "Prompt chunks filled, by how (loaded or computed)",
            chunks.clone(),
        );
        let tokens = Family::<Labels, Counter>::default();
        registry.register(
            "tokens",
            "Tokens, by how (loaded, computed, generated)",
            tokens.clone(),
        );
        let bytes_loaded = Counter::default();
        registry.register(
            "kv_loaded_bytes",
            "Bytes of KV cache loaded from the store",
            bytes_loaded.clone(),
        );
        let misses = Family::<Labels, Counter>::default();
        registry.register(
            "cache_misses",
            "Stored caches not used, by reason (absent, rejected, store_failed, stalled; lookup_failed, lookup_timed_out: planning could not tell, so the chunk was computed)",
            misses.clone(),
        );
        let hit_ratio = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "cache_hit_ratio",
            "Share of prompt chunks loaded rather than computed, since start",
            hit_ratio.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "requests_in_flight",
            "Questions being answered now",
            in_flight.clone(),
        );
        let http_responses = Family::<Labels, Counter>::default();
        registry.register(
            "http_responses",
            "HTTP responses, by status code",
            http_responses.clone(),
        );
        let write_backs = SchedulerCounters::default();
        for (name, help, counter) in [
            (
                "writeback_written",
                "Computed chunks written back to the store",
                &write_backs.written,
            ),
            (
                "writeback_skipped",
                "Write-backs left out because the store already held the chunk",
                &write_backs.skipped,
            ),
            (
                "writeback_failed",
                "Write-backs that failed or timed out",
                &write_backs.failed,
            ),
            (
                "writeback_dropped",
                "Write-backs dropped because the write-back queue was full",
                &write_backs.dropped,
            ),
        ] {
            registry.register(name, help, counter.clone());
        }
        registry.register(
            "writeback_pending_bytes",
            "Bytes of KV waiting to be written back",
            write_backs.pending_bytes.clone(),
        );
        Self {
            write_backs,
            registry,
            requests,
            ttft,
            latency,
            chunks,
            tokens,
            bytes_loaded,
            misses,
            hit_ratio,
            in_flight,
            http_responses,
        }
    }

    /// The metrics in the Prometheus (OpenMetrics) text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Mirrors the scheduler's counters (they live in the scheduler; call before
    /// [`Metrics::encode`]).
    pub fn observe_scheduler(&self, stats: &SchedulerStats) {
        let w = &self.write_backs;
        let _one_at_a_time = w.sync.lock().unwrap_or_else(|p| p.into_inner());
        for (counter, total) in [
            (&w.written, stats.write_backs),
            (&w.skipped, stats.write_backs_skipped),
            (&w.failed, stats.write_back_failures),
            (&w.dropped, stats.write_backs_dropped),
        ] {
            counter.inc_by(total.saturating_sub(counter.get()));
        }
        w.pending_bytes
            .set(stats.write_back_pending_bytes.min(i64::MAX as u64) as i64);
    }

    /// Records a finished question.
    pub fn record(&self, result: &Result<Answer, PipelineError>) {
        let answer = match result {
            Ok(answer) => answer,
            Err(error) => {
                self.requests
                    .get_or_create(&label("outcome", outcome_of(error)))
                    .inc();
                return;
            }
        };
        let b = &answer.breakdown;
        let outcome = if b.degraded { "degraded" } else { "ok" };
        self.requests
            .get_or_create(&label("outcome", outcome))
            .inc();
        self.ttft.observe(b.ttft_secs);
        self.latency.observe(b.total_secs);
        let p = &b.prefill;
        let loaded = self
            .chunks
            .get_or_create(&label("how", "loaded"))
            .inc_by(p.chunks_loaded as u64)
            + p.chunks_loaded as u64;
        let computed = self
            .chunks
            .get_or_create(&label("how", "computed"))
            .inc_by(p.chunks_computed as u64)
            + p.chunks_computed as u64;
        if loaded + computed > 0 {
            self.hit_ratio
                .set(loaded as f64 / (loaded + computed) as f64);
        }
        for (how, n) in [
            ("loaded", p.tokens_loaded),
            ("computed", p.tokens_computed),
            ("generated", b.generated_tokens),
        ] {
            self.tokens
                .get_or_create(&label("how", how))
                .inc_by(n as u64);
        }
        self.bytes_loaded.inc_by(p.bytes_loaded);
        for miss in &p.misses {
            let reason = match miss.reason {
                ragcake_scheduler::MissReason::Absent => "absent",
                ragcake_scheduler::MissReason::Rejected(_) => "rejected",
                ragcake_scheduler::MissReason::StoreFailed(_) => "store_failed",
                ragcake_scheduler::MissReason::Stalled => "stalled",
            };
            self.misses.get_or_create(&label("reason", reason)).inc();
        }
        for (reason, n) in [
            ("lookup_failed", b.lookups.errors),
            ("lookup_timed_out", b.lookups.timed_out),
        ] {
            if n > 0 {
                self.misses
                    .get_or_create(&label("reason", reason))
                    .inc_by(n as u64);
            }
        }
    }

    /// Counts an HTTP response.
    pub fn record_http(&self, status: u16) {
        self.http_responses
            .get_or_create(&label("status", &status.to_string()))
            .inc();
    }
}

/// The `outcome` label of a failed question.
pub fn outcome_of(error: &PipelineError) -> &'static str {
    match error {
        PipelineError::InvalidRequest(_) => "invalid",
        PipelineError::RetrievalUnavailable(_) => "unavailable",
        PipelineError::Overloaded => "overloaded",
        PipelineError::Timeout(_) => "timeout",
        _ => "error",
    }
}

struct InFlight(Arc<Metrics>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.dec();
    }
}

/// The outermost layer: counts questions in flight, turns the error of whatever layer
/// failed into a [`PipelineError`], and records each outcome.
#[derive(Debug, Clone)]
pub struct MetricsLayer {
    metrics: Arc<Metrics>,
    timeout_secs: f64,
}

impl MetricsLayer {
    /// Recording into `metrics`; `timeout_secs` names the timeout in timeout errors.
    pub fn new(metrics: Arc<Metrics>, timeout_secs: f64) -> Self {
        Self {
            metrics,
            timeout_secs,
        }
    }
}

impl<S> Layer<S> for MetricsLayer {
    type Service = Measured<S>;
    fn layer(&self, inner: S) -> Measured<S> {
        Measured {
            layer: self.clone(),
            inner,
        }
    }
}

/// The service of [`MetricsLayer`].
#[derive(Debug, Clone)]
pub struct Measured<S> {
    layer: MetricsLayer,
    inner: S,
}

impl<S> Service<Ask> for Measured<S>
where
    S: Service<Ask, Response = Answer, Error = BoxError>,
    S::Future: Send + 'static,
{
    type Response = Answer;
    type Error = PipelineError;
    type Future = BoxFuture<'static, Result<Answer, PipelineError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), PipelineError>> {
        let timeout = self.layer.timeout_secs;
        self.inner
            .poll_ready(cx)
            .map_err(|e| PipelineError::from_box(e, timeout))
    }

    fn call(&mut self, ask: Ask) -> Self::Future {
        let metrics = self.layer.metrics.clone();
        let timeout = self.layer.timeout_secs;
        metrics.in_flight.inc();
        // Decremented however the call ends, a dropped (cancelled) one included.
        let guard = InFlight(metrics.clone());
        let future = self.inner.call(ask);
        Box::pin(async move {
            let _guard = guard;
            let result = future
                .await
                .map_err(|e| PipelineError::from_box(e, timeout));
            metrics.record(&result);
            result
        })
    }
}
