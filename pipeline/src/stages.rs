//! The pipeline's stages as tower services. Each stage is a [`Step`] and the [`Layer`] that
//! puts it in front of the next stage as a [`Stage`] service, so a pipeline is a
//! `ServiceBuilder` stack and standard layers (timeout, concurrency limit, buffer, load
//! shedding) fit between stages:
//!
//! ```text
//! Ask ─Retrieve─▶ Retrieved ─Plan─▶ Planned ─Prefill─▶ Prefilled ─Generate─▶ Answer
//! ```

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use futures::future::BoxFuture;
use ragcake_engine::{
    Engine, FinishReason, GenerateParams, PromptTemplate, Sampling, StreamDecoder,
};
use ragcake_kvstore::{CacheKey, KvStore};
use ragcake_retriever::{Retrieval, RetrieveOptions, Retriever};
use ragcake_scheduler::{PlanOptions, PrefillRequest, RequestEvent, RequestStream, Scheduler};
use tower::{Layer, Service};
use tracing::Instrument;

use crate::config::{RequestLimits, WriteBackAdmission};
use crate::error::{BoxError, PipelineError};
use crate::types::{Answer, Ask, AskOptions, Breakdown, CitedChunk, StreamEvent};

/// The prefill scheduler over the engine and the KV store.
pub type EngineScheduler = Scheduler<Engine, KvStore>;

/// Moves the ready service out of `slot`, leaving a clone (tower's rule: the service that
/// was polled ready is the one called).
fn take_ready<S: Clone>(slot: &mut S) -> S {
    let clone = slot.clone();
    std::mem::replace(slot, clone)
}

/// One step of the pipeline: turns its input into the next stage's input. A step is also
/// the [`Layer`] that puts it in front of the next stage, as a [`Stage`].
pub trait Step<In>: Clone + Send + Sync + 'static {
    /// What the next stage receives.
    type Out: Send + 'static;
    /// The step's name in traces.
    const NAME: &'static str;
    /// Runs the step.
    fn run(&self, input: In) -> BoxFuture<'static, Result<Self::Out, PipelineError>>;
}

/// The service of a [`Step`]: runs it, then calls the next stage with its output.
#[derive(Debug, Clone)]
pub struct Stage<St, S> {
    step: St,
    inner: S,
}

impl<In, St, S> Service<In> for Stage<St, S>
where
    In: Send + 'static,
    St: Step<In>,
    S: Service<St::Out> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<S::Response, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, input: In) -> Self::Future {
        let mut inner = take_ready(&mut self.inner);
        let step = self.step.clone();
        Box::pin(
            async move {
                let output = step.run(input).await?;
                inner.call(output).await.map_err(Into::into)
            }
            .instrument(tracing::debug_span!("stage", name = St::NAME)),
        )
    }
}

/// A question with its retrieved chunks.
#[derive(Debug)]
pub struct Retrieved {
    /// The question.
    pub ask: Ask,
    /// What retrieval found, in prompt order.
    pub retrieval: Retrieval,
}

/// Stage 1: checks the request, embeds the question, searches the index and looks up each
/// hit's cache.
#[derive(Debug, Clone)]
pub struct RetrieveLayer {
    retriever: Arc<Retriever>,
    limits: RequestLimits,
}

impl RetrieveLayer {
    /// Retrieval with `retriever`, requests checked against `limits`.
    pub fn new(retriever: Arc<Retriever>, limits: RequestLimits) -> Self {
        Self { retriever, limits }
    }
}

impl<S> Layer<S> for RetrieveLayer {
    type Service = Stage<Self, S>;
    fn layer(&self, inner: S) -> Stage<Self, S> {
        Stage {
            step: self.clone(),
            inner,
        }
    }
}

impl Step<Ask> for RetrieveLayer {
    type Out = Retrieved;
    const NAME: &'static str = "retrieve";

    fn run(&self, ask: Ask) -> BoxFuture<'static, Result<Retrieved, PipelineError>> {
        let layer = self.clone();
        Box::pin(async move {
            layer.limits.check(&ask.request)?;
            let o = &ask.request.options;
            let options = RetrieveOptions {
                prefer_cached_within: o.prefer_cached_within,
                order: o.order,
                ..RetrieveOptions::for_top_k(o.top_k)
            };
            let retrieval = layer
                .retriever
                .retrieve(&ask.request.question, &options)
                .await
                .map_err(PipelineError::from_retrieval)?;
            Ok(Retrieved { ask, retrieval })
        })
    }
}

/// A question with its prompt planned: which chunk caches to load.
#[derive(Debug)]
pub struct Planned {
    /// The question.
    pub ask: Ask,
    /// The chunks in the prompt.
    pub sources: Vec<CitedChunk>,
    /// The prefill to run.
    pub request: PrefillRequest<CacheKey>,
    /// The timing so far.
    pub breakdown: Breakdown,
}

/// Stage 2: builds the prompt (preamble, the chunks' own tokens, the question tail) and
/// has the scheduler plan it: which stored cache each chunk loads (one metadata request per
/// chunk: retrieval already said which chunk caches the precompute job stored).
#[derive(Debug, Clone)]
pub struct PlanLayer {
    engine: Arc<Engine>,
    kv: Arc<KvStore>,
    prompt: Arc<PromptTemplate>,
    /// What the precompute job computed chunk caches after ([`PromptTemplate::chunk_context`]).
    chunk_context: Arc<[u32]>,
    /// Which prompts write back what they compute.
    admission: WriteBackAdmission,
    /// Lookups unanswered this long after planning began are given up.
    lookup_timeout_secs: f64,
}

impl PlanLayer {
    /// Planning for `engine`'s model against `kv`, with `prompt` around the chunks; what is
    /// computed is written back where `admission` admits it.
    pub fn new(
        engine: Arc<Engine>,
        kv: Arc<KvStore>,
        prompt: PromptTemplate,
        admission: WriteBackAdmission,
    ) -> Result<Self, PipelineError> {
        let chunk_context = prompt.chunk_context(&engine)?.into();
        Ok(Self {
            engine,
            kv,
            prompt: Arc::new(prompt),
            chunk_context,
            admission,
            lookup_timeout_secs: ragcake_scheduler::plan::DEFAULT_LOOKUP_TIMEOUT_SECS,
        })
    }

    /// Lookups unanswered `secs` after planning began are given up (their chunks are
    /// computed); not finite: no deadline.
    pub fn with_lookup_timeout(mut self, secs: f64) -> Self {
        self.lookup_timeout_secs = secs;
        self
    }

    async fn plan(&self, retrieved: Retrieved) -> Result<Planned, PipelineError> {
        let Retrieved { ask, retrieval } = retrieved;
        let started = Instant::now();
        let request = &ask.request;
        let prompt = self.prompt.prompt(
            &self.engine,
            request.system.as_deref(),
            &request.history,
            &request.question,
            crate::prompt::retrieved_chunks(&self.engine, &retrieval.chunks)?,
        )?;
        let prompt_tokens = prompt.tokens();
        let context = self.engine.context_length();
        if prompt_tokens + request.options.max_tokens > context {
            return Err(PipelineError::InvalidRequest(format!(
                "the prompt ({prompt_tokens} tokens) and max_tokens ({}) exceed the model's context of {context} tokens",
                request.options.max_tokens
            )));
        }
        let prompt_secs = started.elapsed().as_secs_f64();
        let started = Instant::now();
        let (recompute, exact) = request.options.blending();
        let options = PlanOptions {
            mode: request.options.mode,
            exact,
            recompute,
            chunk_context: self.chunk_context.clone(),
            cache_salt: request.options.cache_salt.as_deref().map(Arc::from),
            write_back: self.admission.admits(&request.history),
            lookup_timeout_secs: self.lookup_timeout_secs,
        };
        let (plan, lookups) =
            ragcake_scheduler::plan(&*self.kv, prompt.chunks, prompt.tail, options).await;
        let sources = retrieval
            .chunks
            .into_iter()
            .map(|hit| CitedChunk {
                doc_id: hit.chunk.doc_id,
                chunk_no: hit.chunk.chunk_no,
                score: hit.score,
                text: hit.chunk.text,
                cache: hit.cache,
            })
            .collect();
        let breakdown = Breakdown {
            embed_secs: retrieval.embed_secs,
            search_secs: retrieval.search_secs,
            lookup_secs: started.elapsed().as_secs_f64(),
            prompt_secs,
            prompt_tokens,
            lookups,
            degraded: lookups.errors + lookups.timed_out > 0,
            ..Breakdown::default()
        };
        Ok(Planned {
            ask,
            sources,
            request: plan,
            breakdown,
        })
    }
}

impl<S> Layer<S> for PlanLayer {
    type Service = Stage<Self, S>;
    fn layer(&self, inner: S) -> Stage<Self, S> {
        Stage {
            step: self.clone(),
            inner,
        }
    }
}

impl Step<Retrieved> for PlanLayer {
    type Out = Planned;
    const NAME: &'static str = "plan";

    fn run(&self, retrieved: Retrieved) -> BoxFuture<'static, Result<Planned, PipelineError>> {
        let layer = self.clone();
        Box::pin(async move {
            let planned = layer.plan(retrieved).await?;
            if let Some(stream) = &planned.ask.stream {
                let _ = stream.send(StreamEvent::Sources(planned.sources.clone()));
            }
            Ok(planned)
        })
    }
}

/// A question whose prompt cache is filled, generating in the scheduler.
#[derive(Debug)]
pub struct Prefilled {
    /// The question.
    pub ask: Ask,
    /// The chunks in the prompt.
    pub sources: Vec<CitedChunk>,
    /// The request's events after its prefill report: its tokens, then the end.
    pub events: RequestStream,
    /// The timing so far (the prefill report included).
    pub breakdown: Breakdown,
}

/// Stage 3: submits the question's planned prompt to the shared scheduler once (compute
/// from the front, load from the back, across every request in flight; then the batched
/// decode loop) and waits for its prefill report: the time to first token.
#[derive(Clone)]
pub struct PrefillLayer {
    scheduler: Arc<EngineScheduler>,
}

impl std::fmt::Debug for PrefillLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrefillLayer").finish_non_exhaustive()
    }
}

impl PrefillLayer {
    /// Submit to `scheduler`.
    pub fn new(scheduler: Arc<EngineScheduler>) -> Self {
        Self { scheduler }
    }
}

impl<S> Layer<S> for PrefillLayer {
    type Service = Stage<Self, S>;
    fn layer(&self, inner: S) -> Stage<Self, S> {
        Stage {
            step: self.clone(),
            inner,
        }
    }
}

/// The generation settings a request asks for.
fn generate_params(options: &AskOptions) -> GenerateParams {
    GenerateParams {
        max_tokens: options.max_tokens,
        ignore_eos: options.ignore_eos,
        sampling: Sampling {
            temperature: options.temperature,
            top_p: options.top_p,
            seed: options.seed,
        },
        ..GenerateParams::default()
    }
}

impl Step<Planned> for PrefillLayer {
    type Out = Prefilled;
    const NAME: &'static str = "prefill";

    fn run(&self, planned: Planned) -> BoxFuture<'static, Result<Prefilled, PipelineError>> {
        let scheduler = self.scheduler.clone();
        Box::pin(async move {
            let Planned {
                ask,
                sources,
                request,
                mut breakdown,
            } = planned;
            let mut events = scheduler.submit(request, generate_params(&ask.request.options))?;
            let report = match events.next().await {
                Some(RequestEvent::Prefilled(report)) => *report,
                Some(RequestEvent::Failed(error)) => return Err(error.into()),
                Some(_) | None => {
                    return Err(PipelineError::Task(
                        "the prefill ended without a report".into(),
                    ));
                }
            };
            breakdown.ttft_secs = ask.started.elapsed().as_secs_f64();
            breakdown.degraded |= report.degraded;
            breakdown.prefill = report;
            Ok(Prefilled {
                ask,
                sources,
                events,
                breakdown,
            })
        })
    }
}

/// Stage 4 (the innermost service): reads the answer's tokens as the shared scheduler
/// generates them (every answer being generated advances one token per batched decode
/// step, between prefill steps), streaming text pieces to a streaming ask. A request
/// dropped or timed out stops decoding at the next step.
#[derive(Clone)]
pub struct Generate {
    engine: Arc<Engine>,
}

impl std::fmt::Debug for Generate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generate").finish_non_exhaustive()
    }
}

impl Generate {
    /// Generation detokenized with `engine`'s tokenizer.
    pub fn new(engine: Arc<Engine>) -> Self {
        Self { engine }
    }
}

impl Service<Prefilled> for Generate {
    type Response = Answer;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Answer, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, prefilled: Prefilled) -> Self::Future {
        let engine = self.engine.clone();
        Box::pin(
            async move {
                let Prefilled {
                    ask,
                    sources,
                    mut events,
                    mut breakdown,
                } = prefilled;
                let tokenizer = engine.tokenizer();
                let mut decoder = StreamDecoder::new();
                let mut text = String::new();
                let mut generated = 0;
                let started = Instant::now();
                let finish_reason = loop {
                    match events.next().await {
                        Some(RequestEvent::Token(token)) => {
                            generated += 1;
                            let piece = decoder.push(tokenizer, token);
                            if piece.is_empty() {
                                continue;
                            }
                            text += &piece;
                            // A reader that went away cancels the generation.
                            if let Some(tx) = &ask.stream
                                && tx.send(StreamEvent::Text(piece)).is_err()
                            {
                                break FinishReason::Cancelled;
                            }
                        }
                        Some(RequestEvent::Finished { reason, .. }) => break reason,
                        Some(RequestEvent::Failed(error)) => {
                            return Err(PipelineError::from(error).into());
                        }
                        Some(RequestEvent::Prefilled(_)) | None => {
                            return Err(PipelineError::Task("decoding stopped".into()).into());
                        }
                    }
                };
                drop(events);
                let rest = decoder.finish();
                if !rest.is_empty() {
                    text += &rest;
                    if let (Some(tx), false) =
                        (&ask.stream, finish_reason == FinishReason::Cancelled)
                    {
                        let _ = tx.send(StreamEvent::Text(rest));
                    }
                }
                breakdown.generated_tokens = generated;
                breakdown.decode_secs = started.elapsed().as_secs_f64();
                breakdown.total_secs = ask.started.elapsed().as_secs_f64();
                let answer = Answer {
                    text,
                    finish_reason,
                    sources,
                    breakdown,
                };
                if let Some(stream) = &ask.stream {
                    let _ = stream.send(StreamEvent::Done(Box::new(answer.clone())));
                }
                Ok(answer)
            }
            .instrument(tracing::debug_span!("generate")),
        )
    }
}
