//! OATS: run LLM agents as jobs, on Kubernetes or on the local machine, behind a versioned REST API.
//!
//! The layers call inwards only: [`api`] (HTTP) calls [`jobs`] (the domain), which calls a
//! [`backend::JobBackend`] (`kubernetes` or `local`).
#![forbid(unsafe_code)]

pub mod agent;
pub mod api;
pub mod auth;
pub mod backend;
pub mod cli;
pub mod config;
pub mod demo_agent;
pub mod http_server;
pub mod jobs;
pub mod llm;
pub mod policy;
pub mod reload;
pub mod store;
pub mod telemetry;
