//! Submit → runner assignment latency with free capacity: CreateJob one at
//! a time; the clock runs from just before CreateJob to the moment the fake
//! runner's waiting long-poll returns the assignment. Each job is finished
//! (RUNNING, SUCCEEDED acknowledged) before the next is submitted, so the
//! per-user limit never delays a job.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use trainmesh_common::proto::job::v1::CreateJobRequest;

use crate::cli::Args;
use crate::env::{job_spec, Backend, Mesh, SchedulerOptions};
use crate::report::{Row, Target};
use crate::runner::{Fleet, RunnerSpec};
use crate::stats::{mean, ms, percentile};

pub const WARM_UP: usize = 50;
const PER_JOB_TIMEOUT: Duration = Duration::from_secs(10);
const NAME: &str = "latency";

pub async fn run(args: &Args, backend: Backend) -> anyhow::Result<Vec<Row>> {
    super::with_databases(
        backend,
        args.postgres_url.as_deref(),
        |mut dbs| async move {
            let result = async {
                let mesh = Mesh::start(
                    &mut dbs,
                    &SchedulerOptions {
                        max_running_per_user: scheduler_service::DEFAULT_MAX_RUNNING_PER_USER,
                    },
                )
                .await?;
                let fleet = Fleet::start(
                    mesh.scheduler.addr,
                    mesh.tokens.runner,
                    1,
                    RunnerSpec {
                        gpus: 8,
                        cpu: 64.0,
                        memory_mib: 512 * 1024,
                    },
                )
                .await;
                let fleet = match fleet {
                    Ok(f) => f,
                    Err(e) => {
                        let _ = mesh.stop().await;
                        return Err(e);
                    }
                };
                let rows = measure(args, backend, &mesh, &fleet).await;
                fleet.stop().await;
                mesh.stop().await?;
                rows
            }
            .await;
            (dbs, result)
        },
    )
    .await
}

async fn measure(
    args: &Args,
    backend: Backend,
    mesh: &Mesh,
    fleet: &Fleet,
) -> anyhow::Result<Vec<Row>> {
    let b = backend.label();
    let n = args.latency_jobs();
    let mut client = mesh.job_client(mesh.tokens.alice)?;
    let mut total = Vec::with_capacity(n);
    let mut create_rpc = Vec::with_capacity(n);
    let mut failure = None;
    for i in 0..WARM_UP + n {
        let t0 = Instant::now();
        let job = client
            .create_job(CreateJobRequest {
                spec: Some(job_spec(&format!("bench-latency-{i}"))),
                idempotency_key: String::new(),
            })
            .await
            .context("CreateJob")?
            .into_inner()
            .job
            .context("CreateJob answered without a job")?;
        let t1 = Instant::now();
        let id = job.id;
        if !fleet
            .wait_until(PER_JOB_TIMEOUT, |o| o.received.contains_key(&id))
            .await
        {
            failure = Some(format!(
                "job {i} (`{id}`) not assigned within {PER_JOB_TIMEOUT:?}"
            ));
            break;
        }
        let Some(at) = fleet.observed().received.get(&id).copied() else {
            anyhow::bail!("assignment of `{id}` vanished");
        };
        if !fleet
            .wait_until(PER_JOB_TIMEOUT, |o| o.finished.contains(&id))
            .await
        {
            failure = Some(format!(
                "job {i} (`{id}`) not finished within {PER_JOB_TIMEOUT:?}"
            ));
            break;
        }
        if i >= WARM_UP {
            total.push(at.saturating_duration_since(t0));
            create_rpc.push(t1 - t0);
        }
    }

    let mut rows = Vec::new();
    let p = |v: &[Duration], q: f64| percentile(v, q).map(ms).unwrap_or(f64::NAN);
    let mut p50 = Row::new(
        NAME,
        b,
        "submit→assignment p50",
        p(&total, 50.0),
        "ms",
        backend.sqlite_target(Target::AtMost(5.0)),
    );
    let mut p99 = Row::new(
        NAME,
        b,
        "submit→assignment p99",
        p(&total, 99.0),
        "ms",
        backend.sqlite_target(Target::AtMost(25.0)),
    );
    if let Some(why) = &failure {
        p50 = p50.missed(format!("{why}; {} samples", total.len()));
        p99 = p99.missed(why.clone());
    } else {
        p50 = p50.with_note(format!(
            "{} jobs after {WARM_UP} warm-up, one at a time, 1 runner long-polling",
            total.len()
        ));
    }
    rows.push(p50);
    rows.push(p99);
    rows.push(Row::info(
        NAME,
        b,
        "submit→assignment mean",
        mean(&total).map(ms).unwrap_or(f64::NAN),
        "ms",
    ));
    rows.push(Row::info(
        NAME,
        b,
        "submit→assignment max",
        p(&total, 100.0),
        "ms",
    ));
    rows.push(Row::info(
        NAME,
        b,
        "CreateJob RPC p50",
        p(&create_rpc, 50.0),
        "ms",
    ));
    rows.push(Row::info(
        NAME,
        b,
        "CreateJob RPC p99",
        p(&create_rpc, 99.0),
        "ms",
    ));
    let errors = fleet.report_errors() + fleet.acquire_errors();
    if errors > 0 {
        rows.push(Row::info(NAME, b, "runner RPC errors", errors as f64, ""));
    }
    Ok(rows)
}
