//! OATS: run LLM agents as jobs, on Kubernetes or on the local machine, behind a versioned REST API.
//!
//! The layers call inwards only: [`api`] (HTTP) calls [`jobs`] (the domain), which calls a
//! [`jobs::JobBackend`] (`kubernetes` or `local`).
#![forbid(unsafe_code)]

pub mod agent;
pub mod api;
#[cfg(test)]
mod architecture;
pub mod auth;
pub mod backend;
pub mod cli;
pub mod config;
pub mod demo_agent;
pub mod http_server;
pub mod jobs;
pub mod llm;
pub mod reload;
pub mod store;
pub mod telemetry;
