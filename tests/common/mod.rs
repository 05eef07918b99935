//! Shared helpers: the test kit (`testkit/`: `oats serve` on ports of its own choosing, the
//! OTLP receiver), shared with the benchmark, and the fake LLM upstream.
#![allow(dead_code, unused_imports)] // each test binary uses a part

pub mod fake_llm;
pub mod fixtures;
pub mod outage;
pub mod stores;

pub use oats_testkit::{Server, assert_problem, otlp};
