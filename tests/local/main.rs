//! The local backend and what runs beside it, one test binary: the HTTP API in process
//! (validation, problem responses, routing) and through `oats serve` (jobs, operations, security,
//! OIDC, telemetry, the LLM gateway), the store and the job history on SQLite and PostgreSQL, the local backend's records in the store
//! (and the import of an old state directory), and
//! the fake LLM upstream's self-test.

#[path = "../common/mod.rs"]
mod common;

mod api;
mod app;
mod fake_llm;
mod history;
mod llm;
mod local_store;
mod oidc;
mod operations;
mod security;
mod store;
mod telemetry;
