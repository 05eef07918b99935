//! One file per scenario (README "Benchmarks"); each is a method of [`crate::Bench`].

pub mod gateway;
pub mod get_job;
pub mod history;
pub mod kube;
pub mod list;
pub mod memory;
pub mod reads;
pub mod streams;
pub mod telemetry;
