//! ragcake's integration tests: one binary, real models, no mocks.
//!
//! They need the default models in the model cache (`ragcake models fetch`, which the test
//! script runs first); a missing model fails the tests with that instruction.

mod common;
mod conformance;
mod engine;
mod examples;
mod gemma3;
mod kvstore;
mod pipeline;
mod retriever;
mod scheduler;
mod tokenizer;
