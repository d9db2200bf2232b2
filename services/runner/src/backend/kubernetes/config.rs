//! Flags and settings of the `kubernetes` backend. They live here, not in
//! the runner's `config.rs`, so the backend is configured in one place and
//! the runner's flags only gain one flattened group.

use std::time::Duration;

/// The backend's flags (`--k8s-*`); each has a `TRAINMESH_K8S_*` variable.
#[derive(clap::Args, Debug, Clone)]
pub struct KubernetesArgs {
    /// Namespace jobs are created in. Default: the client's (the runner
    /// pod's own namespace in a cluster, the kubeconfig context's outside).
    #[arg(long = "k8s-namespace", env = "TRAINMESH_K8S_NAMESPACE")]
    pub namespace: Option<String>,

    /// Service account the job pods run as. Default: the namespace's.
    #[arg(long = "k8s-service-account", env = "TRAINMESH_K8S_SERVICE_ACCOUNT")]
    pub service_account: Option<String>,

    /// Secret for pulling job images (repeat or comma-separate).
    #[arg(
        long = "k8s-image-pull-secret",
        env = "TRAINMESH_K8S_IMAGE_PULL_SECRETS",
        value_delimiter = ','
    )]
    pub image_pull_secrets: Vec<String>,

    /// How often a running job and its pods are polled.
    #[arg(
        long = "k8s-poll-interval-ms",
        env = "TRAINMESH_K8S_POLL_INTERVAL_MS",
        default_value_t = 5000
    )]
    pub poll_interval_ms: u64,

    /// How long a pod may stay unschedulable before the attempt fails.
    #[arg(
        long = "k8s-unschedulable-timeout-secs",
        env = "TRAINMESH_K8S_UNSCHEDULABLE_TIMEOUT_SECS",
        default_value_t = 600
    )]
    pub unschedulable_timeout_secs: u64,

    /// How long a container may fail to start (image pull back-off, a
    /// missing secret or config map) before the attempt fails.
    #[arg(
        long = "k8s-start-timeout-secs",
        env = "TRAINMESH_K8S_START_TIMEOUT_SECS",
        default_value_t = 120
    )]
    pub start_timeout_secs: u64,

    /// How long finished Jobs/PyTorchJobs stay (for `kubectl` inspection)
    /// before Kubernetes deletes them.
    #[arg(
        long = "k8s-ttl-after-finished-secs",
        env = "TRAINMESH_K8S_TTL_AFTER_FINISHED_SECS",
        default_value_t = 3600
    )]
    pub ttl_after_finished_secs: u64,
}

/// The backend's settings.
#[derive(Clone, Debug, PartialEq)]
pub struct KubernetesConfig {
    /// `None`: the client's default namespace.
    pub namespace: Option<String>,
    pub service_account: Option<String>,
    pub image_pull_secrets: Vec<String>,
    pub poll_interval: Duration,
    pub unschedulable_timeout: Duration,
    pub start_timeout: Duration,
    pub ttl_after_finished: Duration,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        Self {
            namespace: None,
            service_account: None,
            image_pull_secrets: Vec::new(),
            poll_interval: Duration::from_secs(5),
            unschedulable_timeout: Duration::from_secs(600),
            start_timeout: Duration::from_secs(120),
            ttl_after_finished: Duration::from_secs(3600),
        }
    }
}

impl KubernetesArgs {
    pub fn into_config(self) -> KubernetesConfig {
        let non_empty =
            |s: Option<String>| s.map(|s| s.trim().to_owned()).filter(|s| !s.is_empty());
        KubernetesConfig {
            namespace: non_empty(self.namespace),
            service_account: non_empty(self.service_account),
            image_pull_secrets: self
                .image_pull_secrets
                .into_iter()
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect(),
            poll_interval: Duration::from_millis(self.poll_interval_ms),
            unschedulable_timeout: Duration::from_secs(self.unschedulable_timeout_secs),
            start_timeout: Duration::from_secs(self.start_timeout_secs),
            ttl_after_finished: Duration::from_secs(self.ttl_after_finished_secs),
        }
    }
}

impl KubernetesConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            !self.poll_interval.is_zero(),
            "k8s poll interval must be positive"
        );
        Ok(())
    }
}
