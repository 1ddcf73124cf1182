//! Model implementations, one family per file.

pub mod llama;
