//! What the tests (`tests/common`) and the benchmark (`bench/`) of OATS share: a server process
//! on a port of its own choosing ([`Process`], and [`Server`], `oats serve` for the tests), and
//! OTLP trace sinks ([`otlp`]). Servers bind port 0 and report the ports they got in an addresses
//! file (`oats serve --addresses-file`), so no two servers race for a port.

pub mod otlp;
mod process;
mod server;

pub use process::{ADDRESSES_FILE_ENV, Process, StartError};
pub use server::{Server, assert_problem, oats_binary};
