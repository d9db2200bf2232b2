//! The `kubernetes` backend: one runner per cluster creates a batch/v1 Job
//! (one replica) or a Kubeflow PyTorchJob (master + workers) per attempt,
//! and Kubernetes places the pods.
//!
//! - [`body`]: the objects, as pure functions of the launch request;
//! - [`status`], [`observe`], [`verdict`], [`failure`]: pure mappings from
//!   the API's documents to phases, log lines, the end and its error;
//!
//! Tested against recorded API exchanges and fixture documents; a real
//! cluster was not available to test against when this was written.

pub mod body;
pub mod config;
pub mod failure;
pub mod names;
pub mod observe;
pub mod status;
pub mod verdict;

pub use config::{KubernetesArgs, KubernetesConfig};

#[cfg(test)]
#[path = "status_tests.rs"]
mod status_tests;
