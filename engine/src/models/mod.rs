//! Model implementations, one family per file.

pub mod llama;
mod row_ops;
