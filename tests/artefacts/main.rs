//! The shipped artefacts, one test binary: the OpenAPI document, the manifests, the Helm chart,
//! the network policies and the monitoring rules and dashboards.

#[path = "../common/mod.rs"]
mod common;

mod helm;
mod manifests;
mod monitoring;
mod netpol;
mod openapi;
