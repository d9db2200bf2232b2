//! Flags and settings of the `kubernetes` backend. They live here, not in
//! the runner's `config.rs`, so the backend is configured in one place and
//! the runner's flags only gain one flattened group.

use std::time::Duration;

use super::gpus::{self, GpuProduct, DEFAULT_PRODUCT_LABEL};
use super::names;

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

    /// The cluster's GPUs by product, `PRODUCT=COUNT` (repeat or
    /// comma-separate), the product as the nodes' `--k8s-gpu-product-label`
    /// has it, e.g. NVIDIA-H100-80GB-HBM3=16. Jobs asking for a GPU type
    /// are placed on the matching ones, and their pods only on nodes of
    /// that product. Instead of `--gpus`.
    #[arg(
        // The runner's own `--gpus` holds the id `gpus`.
        id = "k8s_gpus",
        long = "k8s-gpus",
        env = "TRAINMESH_K8S_GPUS",
        value_delimiter = ',',
        value_name = "PRODUCT=COUNT"
    )]
    pub gpus: Vec<String>,

    /// The node label holding a node's GPU product (set by NVIDIA GPU
    /// feature discovery).
    #[arg(
        long = "k8s-gpu-product-label",
        env = "TRAINMESH_K8S_GPU_PRODUCT_LABEL",
        default_value = DEFAULT_PRODUCT_LABEL
    )]
    pub gpu_product_label: String,
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
    /// The cluster's GPUs by product, registered in this order; empty when
    /// they are an untyped count (`--gpus N`) and pods are not pinned to
    /// any GPU type.
    pub gpus: Vec<GpuProduct>,
    /// The node label whose value is a node's GPU product.
    pub gpu_product_label: String,
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
            gpus: Vec::new(),
            gpu_product_label: DEFAULT_PRODUCT_LABEL.to_owned(),
        }
    }
}

impl KubernetesArgs {
    pub fn into_config(self) -> anyhow::Result<KubernetesConfig> {
        let non_empty =
            |s: Option<String>| s.map(|s| s.trim().to_owned()).filter(|s| !s.is_empty());
        // Blank entries (a trailing comma in the variable) are skipped, as
        // for the other list flags.
        let gpus = self
            .gpus
            .iter()
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.parse::<GpuProduct>()
                    .map_err(|e| anyhow::anyhow!("invalid `--k8s-gpus` entry `{s}`: {e}"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(KubernetesConfig {
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
            gpus,
            gpu_product_label: self.gpu_product_label.trim().to_owned(),
        })
    }
}

impl KubernetesConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            !self.poll_interval.is_zero(),
            "k8s poll interval must be positive"
        );
        gpus::check_products(&self.gpus).map_err(anyhow::Error::msg)?;
        anyhow::ensure!(
            names::is_label_key(&self.gpu_product_label),
            "`--k8s-gpu-product-label` `{}` is not a label key (e.g. nvidia.com/gpu.product)",
            self.gpu_product_label
        );
        Ok(())
    }
}
