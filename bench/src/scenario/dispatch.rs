//! Dispatch decisions per second with limits over a deep queue: the
//! scheduler alone; N jobs (default 10,000) from U users (default 100) are
//! enqueued with the service token before any runner exists; then runners
//! with more slots than users × limit register and finish every assignment
//! at once. The figure is assignments received per second from the first
//! registration until the last job is assigned; every assignment needs a
//! finish to free its user's slot, so this is the sustained rate of the
//! whole cycle (plan, apply, deliver, report) with limits enforced.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::StreamExt as _;
use trainmesh_common::client::channel;
use trainmesh_common::proto::job::v1::JobState;
use trainmesh_common::proto::scheduler::v1::scheduler_internal_service_client::SchedulerInternalServiceClient;
use trainmesh_common::proto::scheduler::v1::EnqueueJobRequest;
use trainmesh_common::time::{now_micros, to_timestamp};

use crate::cli::Args;
use crate::env::{job_spec, Backend, SchedulerAlone, SchedulerOptions, StatusSink};
use crate::report::{Row, Target};
use crate::runner::{Fleet, RunnerSpec};
use crate::stats::{ms, rate};

const NAME: &str = "dispatch";
const ENQUEUE_CONCURRENCY: usize = 32;
const ENQUEUE_CHANNELS: usize = 4;
const GPUS_PER_RUNNER: i32 = 32;

pub async fn run(args: &Args, backend: Backend) -> anyhow::Result<Vec<Row>> {
    super::with_databases(
        backend,
        args.postgres_url.as_deref(),
        |mut dbs| async move {
            let result = async {
                let s = SchedulerAlone::start(
                    &mut dbs,
                    &SchedulerOptions {
                        max_running_per_user: args.user_limit,
                    },
                )
                .await?;
                let rows = measure(args, backend, &s).await;
                s.stop().await?;
                rows
            }
            .await;
            (dbs, result)
        },
    )
    .await
}

async fn measure(args: &Args, backend: Backend, s: &SchedulerAlone) -> anyhow::Result<Vec<Row>> {
    let b = backend.label();
    let n = args.dispatch_jobs();
    let users = args.users.max(1);
    let addr = s.scheduler.addr.to_string();
    let clients = (0..ENQUEUE_CHANNELS)
        .map(|_| {
            channel(&addr, Some(s.tokens.job_service)).map(SchedulerInternalServiceClient::new)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut rows = Vec::new();

    // Fill the queue. Submit times are distinct so the order is fixed.
    let base = now_micros();
    let started = Instant::now();
    let mut results = futures::stream::iter(0..n)
        .map(|i| {
            let mut c = clients[i % clients.len()].clone();
            async move {
                let job_id = uuid::Uuid::now_v7().to_string();
                c.enqueue_job(EnqueueJobRequest {
                    correlation_id: format!("bench-{job_id}"),
                    job_id,
                    owner: format!("user-{:03}", i % users),
                    org: "ml".into(),
                    spec: Some(job_spec(&format!("bench-dispatch-{i}"))),
                    submit_time: Some(to_timestamp(base + i as i64)),
                })
                .await
            }
        })
        .buffer_unordered(ENQUEUE_CONCURRENCY);
    while let Some(r) = results.next().await {
        r.context("EnqueueJob")?;
    }
    let enqueue_time = started.elapsed();
    rows.push(
        Row::info(
            NAME,
            b,
            "EnqueueJob rate (filling the queue)",
            rate(n, enqueue_time),
            "/s",
        )
        .with_note(format!(
            "{n} jobs, {users} users, {ENQUEUE_CONCURRENCY} concurrent calls"
        )),
    );

    // Let the QUEUED status updates drain so they do not compete with
    // dispatch; how long that takes is a figure of its own.
    let drained = wait_sink(&s.sink, JobState::Queued, n, args.timeout()).await;
    let relay_time = started.elapsed();
    let delivered = s.sink.count(JobState::Queued);
    let relay = Row::info(
        NAME,
        b,
        "status outbox → job-service (QUEUED updates)",
        rate(delivered, relay_time),
        "/s",
    );
    rows.push(if drained {
        relay
    } else {
        relay.with_note(format!(
            "only {delivered} of {n} delivered within {:?}; dispatch measured anyway",
            args.timeout()
        ))
    });

    // Slots to spare: more GPUs than users × limit can hold.
    let slots = (users as i64 * i64::from(args.user_limit.max(1)) * 5 / 4).max(1);
    let runners =
        usize::try_from((slots + i64::from(GPUS_PER_RUNNER) - 1) / i64::from(GPUS_PER_RUNNER))
            .unwrap_or(1)
            .max(1);
    let t0 = Instant::now();
    let fleet = Fleet::start(
        s.scheduler.addr,
        s.tokens.runner,
        runners,
        RunnerSpec {
            gpus: GPUS_PER_RUNNER,
            cpu: f64::from(GPUS_PER_RUNNER) * 4.0,
            memory_mib: i64::from(GPUS_PER_RUNNER) * 16 * 1024,
        },
    )
    .await?;
    let all = fleet
        .wait_until(args.timeout(), |o| o.received.len() >= n)
        .await;
    let (received, first, last, duplicates, max_held) = {
        let o = fleet.observed();
        (
            o.received.len(),
            o.first_at,
            o.last_at,
            o.duplicates,
            o.max_holding_per_owner,
        )
    };
    let span = last
        .map(|l| l.saturating_duration_since(t0))
        .unwrap_or_default();
    let mut decisions = Row::new(
        NAME,
        b,
        format!("dispatch decisions/s over {n} queued"),
        rate(received, span),
        "/s",
        backend.sqlite_target(Target::AtLeast(1000.0)),
    );
    decisions = if all {
        decisions.with_note(format!(
            "{received} assignments in {:.2} s; {users} users, limit {} each, {runners} runners x {GPUS_PER_RUNNER} GPUs, each job finished at once",
            span.as_secs_f64(),
            args.user_limit
        ))
    } else {
        decisions.missed(format!(
            "timed out after {:?}: {received} of {n} assigned",
            args.timeout()
        ))
    };
    rows.push(decisions);
    rows.push(Row::info(
        NAME,
        b,
        "registration → first assignment",
        first
            .map(|f| ms(f.saturating_duration_since(t0)))
            .unwrap_or(f64::NAN),
        "ms",
    ));
    rows.push(Row::new(
        NAME,
        b,
        "most jobs one user held at once",
        f64::from(max_held),
        "",
        Some(Target::AtMost(f64::from(args.user_limit))),
    ));
    rows.push(Row::new(
        NAME,
        b,
        "duplicate assignments",
        duplicates as f64,
        "",
        Some(Target::AtMost(0.0)),
    ));
    let errors = fleet.report_errors() + fleet.acquire_errors();
    if errors > 0 {
        rows.push(Row::info(NAME, b, "runner RPC errors", errors as f64, ""));
    }
    // Let the last reports land before the scheduler stops.
    fleet
        .wait_until(Duration::from_secs(30), |o| o.finished.len() >= received)
        .await;
    fleet.stop().await;
    Ok(rows)
}

async fn wait_sink(sink: &StatusSink, state: JobState, n: usize, timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let changed = sink.notify.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        if sink.count(state) >= n {
            return true;
        }
        if tokio::time::timeout_at(deadline, changed).await.is_err() {
            return sink.count(state) >= n;
        }
    }
}
