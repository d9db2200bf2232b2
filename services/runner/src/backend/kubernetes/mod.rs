//! The `kubernetes` backend: one runner per cluster creates a batch/v1 Job
//! (one replica) or a Kubeflow PyTorchJob (master + workers) per attempt,
//! and Kubernetes places the pods.
//!
//! - [`body`]: the objects, as pure functions of the launch request;
//! - [`gpus`]: the cluster's GPUs declared by product, and the node
//!   affinity that keeps an attempt's pods on nodes of its GPUs' product;
//! - [`status`], [`disruption`], [`observe`], [`verdict`], [`failure`]: pure
//!   mappings from the API's documents to phases, log lines, the end and
//!   its error;
//! - [`workload`], [`podlogs`]: the API calls while the attempt runs.
//!
//! Tested against recorded API exchanges and fixture documents; a real
//! cluster was not available to test against when this was written.

use futures::future::BoxFuture;
use kube::api::{Api, DynamicObject, PostParams};
use kube::Client;
use trainmesh_common::error::FieldError;

use super::{Backend, LaunchRequest, Workload};
use crate::error::Error;

pub mod body;
pub mod config;
pub mod disruption;
pub mod failure;
pub mod gpus;
pub mod names;
pub mod observe;
pub mod podlogs;
pub mod replicas;
pub mod status;
pub mod verdict;
pub mod workload;

pub use config::{KubernetesArgs, KubernetesConfig};
pub use gpus::GpuProduct;
pub use workload::KubeWorkload;

pub struct KubernetesBackend {
    client: Client,
    namespace: String,
    cfg: KubernetesConfig,
}

fn api_error(what: impl Into<String>, e: kube::Error) -> Error {
    let (status, message) = match &e {
        kube::Error::Api(s) => (Some(s.code), s.message.clone()),
        other => (None, other.to_string()),
    };
    Error::Kubernetes {
        what: what.into(),
        status,
        message,
    }
}

impl KubernetesBackend {
    /// `client` talks to the cluster; jobs go to the configured namespace,
    /// else the client's default.
    pub fn new(client: Client, cfg: KubernetesConfig) -> Self {
        let namespace = cfg
            .namespace
            .clone()
            .unwrap_or_else(|| client.default_namespace().to_owned());
        Self {
            client,
            namespace,
            cfg,
        }
    }

    /// A backend with the client Kubernetes' own tools would use: the
    /// pod's service account in a cluster, else `$KUBECONFIG` or
    /// `~/.kube/config`.
    pub async fn connect(cfg: KubernetesConfig) -> Result<Self, Error> {
        // rustls refuses to pick a provider when more than one is compiled
        // in (another dependency may bring aws-lc-rs); name ours. An error
        // means one is installed already, which is as good.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = Client::try_default()
            .await
            .map_err(|e| api_error("cannot configure the kubernetes client", e))?;
        Ok(Self::new(client, cfg))
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Creates the attempt's object, or adopts it when a duplicate
    /// assignment of the same attempt created it before.
    pub async fn start(&self, req: LaunchRequest) -> Result<KubeWorkload, Error> {
        if req.image.trim().is_empty() {
            return Err(Error::InvalidAssignment(FieldError::new(
                "spec.image",
                "is required by the kubernetes backend",
            )));
        }
        let (kind, obj) = body::object(&req, &self.cfg, &self.namespace)?;
        let name = names::object_name(&req.key);
        let ar = kind.api_resource();
        let jobs: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), &self.namespace, &ar);
        let adopted = match jobs.create(&PostParams::default(), &obj).await {
            Ok(_) => false,
            Err(kube::Error::Api(s)) if s.code == 409 => {
                let existing = jobs.get(&name).await.map_err(|e| {
                    api_error(
                        format!("cannot read the existing {} `{name}`", kind.as_str()),
                        e,
                    )
                })?;
                if !names::is_ours(&req.key, existing.metadata.labels.as_ref()) {
                    return Err(Error::Kubernetes {
                        what: format!("cannot create {} `{name}`", kind.as_str()),
                        status: Some(409),
                        message: "an object of that name exists and is not this attempt's".into(),
                    });
                }
                true
            }
            Err(kube::Error::Api(s)) if s.code == 404 && kind == body::Kind::PyTorchJob => {
                return Err(Error::Kubernetes {
                    what: "cannot create a PyTorchJob".into(),
                    status: Some(404),
                    message: format!(
                        "the cluster does not serve kubeflow.org/v1 PyTorchJob (is the Kubeflow \
                         training operator installed?): {}",
                        s.message
                    ),
                });
            }
            Err(e) => {
                return Err(api_error(
                    format!("cannot create {} `{name}`", kind.as_str()),
                    e,
                ))
            }
        };
        tracing::info!(kind = kind.as_str(), name, namespace = %self.namespace, adopted,
            "kubernetes object ready");
        req.output
            .line(format!(
                "[trainmesh] k8s: {} {} {}/{}",
                if adopted {
                    "adopted existing"
                } else {
                    "created"
                },
                kind.as_str(),
                self.namespace,
                name
            ))
            .await;
        let target = workload::Target {
            jobs,
            pods: Api::namespaced(self.client.clone(), &self.namespace),
            events: Api::namespaced(self.client.clone(), &self.namespace),
            kind,
            name,
            namespace: self.namespace.clone(),
            pod_selector: names::pod_selector(&req.key),
        };
        Ok(KubeWorkload::new(
            target,
            self.cfg.clone(),
            req.details.deadline,
            req.output,
        ))
    }
}

impl Backend for KubernetesBackend {
    fn kind(&self) -> &'static str {
        "kubernetes"
    }

    fn secrets_by_reference(&self) -> bool {
        true
    }

    fn launch(&self, req: LaunchRequest) -> BoxFuture<'_, Result<Box<dyn Workload>, Error>> {
        Box::pin(async move {
            let w = self.start(req).await?;
            Ok(Box::new(w) as Box<dyn Workload>)
        })
    }

    /// `GET /version`: readable by every authenticated client (the
    /// `system:discovery` role), so it needs no permission beyond what the
    /// runner already has, and touches no object.
    fn ping(&self) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            self.client
                .apiserver_version()
                .await
                .map(|_| ())
                .map_err(|e| api_error("the Kubernetes API does not answer", e))
        })
    }
}

#[cfg(test)]
mod fake_api;

#[cfg(test)]
mod test_support;

#[cfg(test)]
#[path = "body_tests.rs"]
mod body_tests;

#[cfg(test)]
#[path = "affinity_tests.rs"]
mod affinity_tests;

#[cfg(test)]
#[path = "workload_tests.rs"]
mod workload_tests;

#[cfg(test)]
#[path = "status_tests.rs"]
mod status_tests;

#[cfg(test)]
#[path = "preemption_tests.rs"]
mod preemption_tests;

#[cfg(test)]
#[path = "ping_tests.rs"]
mod ping_tests;
