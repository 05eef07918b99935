//! The Kubernetes backend against the test control plane of `testenv/`, one test binary:
//! end to end, the admission policy, and replicas. `scripts/test.sh` leaves it out (and names
//! it) when there is no control plane; the API-server restart is a binary of its own.

mod cluster;
#[path = "../common/mod.rs"]
mod common;

mod e2e;
mod policy;
mod replicas;
