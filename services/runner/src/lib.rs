//! The trainmesh runner: an agent (like an Armada executor or a Nomad
//! client) that registers with the scheduler, renews its lease by
//! heartbeat, long-polls for assignments and runs each attempt on a
//! [`backend::Backend`], shipping its log and metrics and reporting how it
//! ended — with a structured error ([`job_error`]) when it failed.
//!
//! It serves nothing but, when asked, its own health ([`health`]); `run`
//! is the whole agent, and the binary is a thin wrapper around it.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

pub mod agent;
pub mod attempt;
pub mod backend;
pub mod config;
pub mod domain;
pub mod error;
pub mod health;
pub mod instance;
pub mod inventory;
pub mod job_error;
pub mod join;
pub mod logs;
pub mod metrics;
pub mod procfs;
pub mod retention;
pub mod rpc;
pub mod shim;
pub mod tailer;
pub mod watchdog;

pub use config::{BackendKind, Config, GpuSetting, OnStop};

/// How long the health server may take to close once the runner is done.
const HEALTH_CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Runs the runner until `shutdown` resolves; then drains: it takes no
/// more work, tells the scheduler, lets its attempts end or hands them back
/// (`config.on_stop`), deregisters, and returns. Serves its health on
/// `config.health_listen` if set.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    config.validate()?;
    let health = match &config.health_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen for health on {addr}: {e}"))?,
        ),
        None => None,
    };
    run_with_health_listener(config, health, shutdown).await
}

/// [`run`], serving health on `health` (already bound, so a caller can
/// pick port 0 and know the port) instead of `config.health_listen`.
pub async fn run_with_health_listener(
    config: Config,
    health: Option<tokio::net::TcpListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    config.validate()?;
    // Before any work: a runner whose health port is refused must not start
    // taking attempts without it.
    if let Some(l) = &health {
        config.health_tls.check_listen(l.local_addr()?)?;
    }
    std::fs::create_dir_all(&config.work_dir).map_err(|e| {
        anyhow::anyhow!("cannot create work dir {}: {e}", config.work_dir.display())
    })?;
    // Absolute, because jobs get paths under it in their environment and
    // run in other directories.
    let work_dir = std::fs::canonicalize(&config.work_dir)?;
    let instance = instance::key(&work_dir)?;

    let capacity = inventory::capacity(
        &config.gpus,
        &config.kubernetes.gpus,
        config.cpu,
        config.memory_mib,
    )
    .await;
    tracing::info!(name = %config.name, backend = config.backend.as_str(), gpus = capacity.gpus.len(),
        cpu = capacity.cpu, memory_mib = capacity.memory_mib, work_dir = %work_dir.display(),
        "runner starting");

    // Before taking any work: what a killed earlier run left must not run
    // next to the attempts the scheduler retries.
    let dir = work_dir.clone();
    let killed =
        tokio::task::spawn_blocking(move || backend::process::leftovers::kill_all(&dir)).await?;
    if killed > 0 {
        tracing::warn!(
            processes = killed,
            "killed processes an earlier run of this runner left running"
        );
    }

    // The runner's own binary, run again as an attempt's shim or as the
    // container watchdog.
    let shim = match &config.shim {
        Some(p) => p.clone(),
        None => std::env::current_exe()?,
    };
    let backend: Arc<dyn backend::Backend> = match config.backend {
        BackendKind::Process => Arc::new(
            backend::ProcessBackend::new(
                config.default_working_dir.clone(),
                &config.inherit_env,
                capacity.gpus.clone(),
                shim,
            )?
            .run_as(
                config.job_user.clone(),
                config.default_working_dir.is_some(),
            ),
        ),
        BackendKind::Docker => {
            let settings = config::DockerSettings {
                runner: config.name.clone(),
                ..config.docker.clone()
            };
            let host = settings.host.clone();
            let mut docker =
                backend::DockerBackend::connect(settings, capacity.gpus.clone()).await?;
            match watchdog::socket_of(host.as_deref()) {
                Some(socket) => match watchdog::Watchdog::start(&shim, &socket) {
                    Ok(w) => docker = docker.with_watchdog(w),
                    Err(e) => tracing::warn!(error = %e,
                        "cannot start the container watchdog: containers of a killed runner run on until it starts again"),
                },
                None => tracing::warn!(
                    "the Docker engine is reached over TCP, which the container watchdog cannot use: \
                     containers of a killed runner run on until it starts again"
                ),
            }
            if !capacity.gpus.is_empty() {
                if let Err(e) = docker.check_gpu_support().await {
                    // Offered GPUs will fail every GPU job with this error:
                    // say so once at start, where the operator looks.
                    tracing::warn!(error = %e, "this runner offers GPUs its Docker engine cannot hand out");
                }
            }
            Arc::new(docker)
        }
        BackendKind::Kubernetes => {
            let b = backend::KubernetesBackend::connect(config.kubernetes.clone()).await?;
            tracing::info!(namespace = b.namespace(), "kubernetes backend ready");
            Arc::new(b)
        }
    };
    let peers = rpc::Peers::connect(&config)?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let ctx = Arc::new(attempt::AttemptContext {
        peers,
        backend: backend.clone(),
        work_dir,
        log_ship_interval: config.log_ship_interval,
        metrics_flush_interval: config.metrics_flush_interval,
        default_termination_grace: config.default_termination_grace,
        flush_timeout: config.flush_timeout,
        max_backoff: config.max_backoff,
        attempt_log: config.attempt_log,
        secrets_dir: config.secrets_dir.clone(),
        secrets_key: config.secrets_key.clone(),
        shutting_down: stop_rx.clone(),
    });
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let status = health::Health::new();
    // Ends with the runner, not with the shutdown signal: a draining
    // runner still answers probes, with NOT_SERVING.
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let server = health.map(|listener| {
        tokio::spawn(health::serve(
            listener,
            config.health_tls.clone(),
            status.clone(),
            backend.clone(),
            health::Probe::default(),
            async move {
                let _ = done_rx.await;
            },
        ))
    });
    let result = agent::Agent::new(config, capacity, instance, ctx, backend.kind(), status)
        .run(stop_rx)
        .await;
    drop(done_tx);
    if let Some(mut server) = server {
        match tokio::time::timeout(HEALTH_CLOSE_TIMEOUT, &mut server).await {
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "the health server failed"),
            Ok(_) => {}
            // A prober holding a call open; it gets its connection reset.
            Err(_) => server.abort(),
        }
    }
    result
}
