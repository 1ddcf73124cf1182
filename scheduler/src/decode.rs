//! Decoding in the shared compute loop: every answer being generated advances by one token
//! per step, all of them in one batched forward pass ([`ComputeBackend::decode`]), between
//! the prefill steps of other requests (continuous batching).

use std::time::Instant;

use tokio::sync::mpsc;

use super::{ComputeBackend, PrefillReport};
use crate::error::{Result, SchedulerError};
use crate::sampling::{FinishReason, GenerateParams, Sampler};

/// What a request submitted to a [`super::Scheduler`] reports, in order: its prefill report
/// ([`super::Scheduler::submit`] only), its tokens, then how it ended.
#[derive(Debug)]
pub enum RequestEvent {
    /// The prompt's cache is filled (time to first token): where its chunks came from.
    Prefilled(Box<PrefillReport>),
    /// The next generated token.
    Token(u32),
    /// Generation ended (the stop token, if any, is not sent).
    Finished {
        /// Why.
        reason: FinishReason,
        /// Tokens generated.
        tokens: usize,
        /// Seconds from the first token to the end.
        decode_secs: f64,
    },
    /// The prefill or a decode step failed; nothing follows.
    Failed(SchedulerError),
}

/// The events of one request in a [`super::Scheduler`]. Dropping it cancels the request:
/// a prefill in flight is abandoned (its loads aborted, its compute given to others), and a
/// generation leaves at the next decode step.
pub struct RequestStream {
    pub(crate) events: mpsc::UnboundedReceiver<RequestEvent>,
    /// Withdraws the request from the prefill queue (a no-op once its prefill is done).
    pub(crate) cancel: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl std::fmt::Debug for RequestStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestStream").finish_non_exhaustive()
    }
}

impl RequestStream {
    /// The next event; `None` after [`RequestEvent::Finished`] or [`RequestEvent::Failed`].
    pub async fn next(&mut self) -> Option<RequestEvent> {
        self.events.recv().await
    }

    /// [`RequestStream::next`] for a caller outside async code.
    pub fn blocking_next(&mut self) -> Option<RequestEvent> {
        self.events.blocking_recv()
    }
}

impl Drop for RequestStream {
    fn drop(&mut self) {
        // Closing the receiver first: a sequence already decoding sees it at its next step.
        self.events.close();
        if let Some(cancel) = self.cancel.take() {
            cancel();
        }
    }
}

/// A sequence being decoded: its cache, the token to feed next, and where its events go.
pub(crate) struct Decoding<C: ComputeBackend> {
    pub(crate) cache: C::Cache,
    /// The token sampled last, already sent: the next step appends it.
    next: u32,
    sampler: Sampler,
    params: GenerateParams,
    produced: usize,
    started: Instant,
    events: mpsc::UnboundedSender<RequestEvent>,
}

/// A sequence's state after a token was sampled.
pub(crate) enum Advance<C: ComputeBackend> {
    /// It decodes on.
    Continue(Box<Decoding<C>>),
    /// It ended (its events are sent).
    Done,
    /// Its reader went away.
    Cancelled,
}

impl<C: ComputeBackend> Decoding<C> {
    /// Starts decoding after a prefill: samples the first token from `logits` and sends it
    /// (or the end) to `events` at once.
    pub(crate) fn start(
        compute: &C,
        cache: C::Cache,
        logits: &C::Logits,
        params: GenerateParams,
        events: mpsc::UnboundedSender<RequestEvent>,
    ) -> Result<Advance<C>> {
        let mut sampler = Sampler::new(params.sampling.clone())?;
        let first = compute.sample(&mut sampler, logits)?;
        let sequence = Self {
            cache,
            next: first,
            sampler,
            params,
            produced: 0,
            started: Instant::now(),
            events,
        };
        Ok(sequence.advance(compute, first))
    }

    /// Whether the reader went away (the sequence is dropped without another step).
    pub(crate) fn is_cancelled(&self) -> bool {
        self.events.is_closed()
    }

    /// The token the next step appends.
    pub(crate) fn next_token(&self) -> u32 {
        self.next
    }

    /// Takes the sampled `token`: ends the sequence on a stop token, the token budget or a
    /// full context, else sends it and keeps the sequence for the next step.
    fn advance(mut self, compute: &C, token: u32) -> Advance<C> {
        let reason = if self.produced >= self.params.max_tokens {
            Some(FinishReason::Length)
        } else if self.params.stops_at(token, compute.ends_generation(token)) {
            Some(FinishReason::Stop)
        } else {
            self.produced += 1;
            if self.events.send(RequestEvent::Token(token)).is_err() {
                return Advance::Cancelled;
            } else if self.produced >= self.params.max_tokens {
                // Ends now rather than after a step whose token nobody reads.
                Some(FinishReason::Length)
            } else if compute.next_position(&self.cache) >= compute.max_tokens() {
                Some(FinishReason::ContextFull)
            } else {
                None
            }
        };
        match reason {
            None => {
                self.next = token;
                Advance::Continue(Box::new(self))
            }
            Some(reason) => {
                let _ = self.events.send(RequestEvent::Finished {
                    reason,
                    tokens: self.produced,
                    decode_secs: self.started.elapsed().as_secs_f64(),
                });
                Advance::Done
            }
        }
    }

    /// Samples the next token from this sequence's `logits` of the last step and advances.
    pub(crate) fn step_done(mut self, compute: &C, logits: &C::Logits) -> Advance<C> {
        match compute.sample(&mut self.sampler, logits) {
            Ok(token) => self.advance(compute, token),
            Err(error) => {
                self.fail(error);
                Advance::Done
            }
        }
    }

    /// Ends the sequence with `error`.
    pub(crate) fn fail(self, error: SchedulerError) {
        let _ = self.events.send(RequestEvent::Failed(error));
    }
}

/// How the sequences of a decode step came out.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StepOutcome {
    /// Sequences that ended (or failed).
    pub(crate) ended: usize,
    /// Sequences whose reader went away.
    pub(crate) cancelled: usize,
}

/// One decode step of `batch`: appends each sequence's next token in one batched pass,
/// samples the following one, and returns the sequences that go on and how the others
/// came out.
pub(crate) fn decode_step<C: ComputeBackend>(
    compute: &C,
    batch: Vec<Decoding<C>>,
) -> (Vec<Decoding<C>>, StepOutcome) {
    let tokens: Vec<u32> = batch.iter().map(Decoding::next_token).collect();
    let mut batch = batch;
    let logits = {
        let mut caches: Vec<&mut C::Cache> = batch.iter_mut().map(|s| &mut s.cache).collect();
        compute.decode(&mut caches, &tokens)
    };
    let n = batch.len();
    match logits {
        Ok(logits) => {
            let mut outcome = StepOutcome::default();
            let mut going_on = Vec::with_capacity(n);
            for (s, l) in batch.into_iter().zip(&logits) {
                match s.step_done(compute, l) {
                    Advance::Continue(s) => going_on.push(*s),
                    Advance::Done => outcome.ended += 1,
                    Advance::Cancelled => outcome.cancelled += 1,
                }
            }
            (going_on, outcome)
        }
        Err(error) => {
            tracing::warn!(%error, sequences = n, "decode step failed");
            for s in batch {
                s.fail(error.clone());
            }
            let outcome = StepOutcome {
                ended: n,
                cancelled: 0,
            };
            (Vec::new(), outcome)
        }
    }
}
