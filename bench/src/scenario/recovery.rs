//! Recovery after an outage: the scheduler is stopped, jobs are submitted
//! to job-service meanwhile (each acknowledged and kept in its outbox), the
//! scheduler stays down for `--outage-secs`, then starts again on its
//! address and database. The figure is the time from the scheduler
//! answering again until it holds every job submitted during the outage.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use trainmesh_common::client::channel;
use trainmesh_common::proto::job::v1::CreateJobRequest;
use trainmesh_common::proto::scheduler::v1::scheduler_service_client::SchedulerServiceClient;

use crate::cli::Args;
use crate::env::{job_spec, queued_now, Backend, Mesh, SchedulerOptions};
use crate::report::{Row, Target};
use crate::stats::ms;

const NAME: &str = "recovery";
/// Every job must be queued this soon after the scheduler answers.
const TARGET_MS: f64 = 1000.0;

pub async fn run(args: &Args, backend: Backend) -> anyhow::Result<Vec<Row>> {
    super::with_databases(
        backend,
        args.postgres_url.as_deref(),
        |mut dbs| async move {
            let result = async {
                let mut mesh = Mesh::start(
                    &mut dbs,
                    &SchedulerOptions {
                        max_running_per_user: scheduler_service::DEFAULT_MAX_RUNNING_PER_USER,
                    },
                )
                .await?;
                let rows = measure(args, backend, &mut mesh).await;
                mesh.stop().await?;
                rows
            }
            .await;
            (dbs, result)
        },
    )
    .await
}

async fn measure(args: &Args, backend: Backend, mesh: &mut Mesh) -> anyhow::Result<Vec<Row>> {
    let b = backend.label();
    let jobs = args.outage_jobs;
    let outage = Duration::from_secs(args.outage_secs);
    mesh.stop_scheduler().await?;
    let down = Instant::now();
    let mut client = mesh.job_client(mesh.tokens.alice)?;
    for i in 0..jobs {
        client
            .create_job(CreateJobRequest {
                spec: Some(job_spec(&format!("bench-outage-{i}"))),
                idempotency_key: String::new(),
            })
            .await
            .context("CreateJob while the scheduler is down")?;
    }
    // The outage is what is being measured against: a plain wait.
    if let Some(rest) = outage.checked_sub(down.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    let restart = Instant::now();
    mesh.start_scheduler().await?;
    let answering = restart.elapsed();
    let mut stats = SchedulerServiceClient::new(channel(
        &mesh.scheduler.addr.to_string(),
        Some(mesh.tokens.admin),
    )?);
    let deadline = Instant::now() + args.timeout();
    let caught_up = loop {
        if queued_now(&mut stats).await >= jobs {
            break Some(restart.elapsed());
        }
        if Instant::now() >= deadline {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    let note = format!(
        "{jobs} jobs submitted during a {:.0} s outage; the scheduler answered {:.0} ms after its restart",
        down.elapsed().as_secs_f64() - restart.elapsed().as_secs_f64(),
        ms(answering)
    );
    let row = |v: f64| {
        Row::new(
            NAME,
            b,
            "backlog queued after the scheduler answered again",
            v,
            "ms",
            Some(Target::AtMost(TARGET_MS)),
        )
    };
    Ok(vec![match caught_up {
        Some(t) => row(ms(t.saturating_sub(answering))).with_note(note),
        None => row(ms(args.timeout())).missed(format!("not every job was queued: {note}")),
    }])
}
