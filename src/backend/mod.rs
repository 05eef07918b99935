//! Where jobs actually run: a Kubernetes cluster, or child processes on this machine. Each
//! implements the domain's `jobs::JobBackend`.

pub mod kubernetes;
pub mod local;
