//! CreateJob throughput: `--clients` concurrent clients (each its own
//! connection, alternating alice and bob) call CreateJob back to back for
//! `--duration-secs`, with job-service and the scheduler running (the
//! enqueue outbox delivers to the scheduler meanwhile). No runners: the jobs
//! stay queued. Afterwards, how far the enqueue outbox lagged behind, and the
//! sustained rate: jobs of the run over the time until the scheduler held
//! them all (a CreateJob rate the outbox cannot follow is not sustained).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use trainmesh_common::proto::job::v1::CreateJobRequest;
use trainmesh_common::proto::scheduler::v1::scheduler_service_client::SchedulerServiceClient;

use crate::cli::Args;
use crate::env::{job_spec, queued_now, Backend, Mesh, SchedulerOptions};
use crate::report::{Row, Target};
use crate::stats::{ms, percentile, rate};

const NAME: &str = "create";
const WARM_UP_PER_CLIENT: usize = 3;

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
                let rows = measure(args, backend, &mesh).await;
                mesh.stop().await?;
                rows
            }
            .await;
            (dbs, result)
        },
    )
    .await
}

#[derive(Default)]
struct ClientResult {
    ok: usize,
    errors: BTreeMap<String, usize>,
    latencies: Vec<Duration>,
    last_done: Option<Instant>,
}

async fn measure(args: &Args, backend: Backend, mesh: &Mesh) -> anyhow::Result<Vec<Row>> {
    let b = backend.label();
    let clients = args.clients.max(1);
    let duration = Duration::from_secs(args.duration_secs.max(1));
    let tokens = [mesh.tokens.alice, mesh.tokens.bob];
    let mut conns = Vec::with_capacity(clients);
    for i in 0..clients {
        conns.push(mesh.job_client(tokens[i % tokens.len()])?);
    }

    // Warm-up: connections open, statements prepared, caches filled.
    let warm = futures::future::join_all(conns.iter().cloned().enumerate().map(
        |(c, mut client)| async move {
            let mut ok = 0usize;
            for i in 0..WARM_UP_PER_CLIENT {
                if client.create_job(request(c, i, "warm")).await.is_ok() {
                    ok += 1;
                }
            }
            ok
        },
    ))
    .await;
    let warm_ok: usize = warm.iter().sum();

    let start = Instant::now();
    let deadline = start + duration;
    let results = futures::future::join_all(conns.into_iter().enumerate().map(
        |(c, mut client)| async move {
            let mut r = ClientResult::default();
            let mut i = 0;
            while Instant::now() < deadline {
                let t = Instant::now();
                match client.create_job(request(c, i, "run")).await {
                    Ok(_) => {
                        r.ok += 1;
                        r.latencies.push(t.elapsed());
                    }
                    Err(e) => *r.errors.entry(format!("{:?}", e.code())).or_default() += 1,
                }
                r.last_done = Some(Instant::now());
                i += 1;
            }
            r
        },
    ))
    .await;
    let ok: usize = results.iter().map(|r| r.ok).sum();
    let end = results
        .iter()
        .filter_map(|r| r.last_done)
        .max()
        .unwrap_or(start);
    let elapsed = end - start;
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    for r in &results {
        for (k, v) in &r.errors {
            *errors.entry(k.clone()).or_default() += v;
        }
    }
    let latencies: Vec<Duration> = results.into_iter().flat_map(|r| r.latencies).collect();
    let target = match backend {
        Backend::Sqlite => 2000.0,
        Backend::Postgres => 1000.0,
    };
    let mut rows = vec![Row::new(
        NAME,
        b,
        format!("CreateJob/s, {clients} clients"),
        rate(ok, elapsed),
        "/s",
        Some(Target::AtLeast(target)),
    )
    .with_note(format!(
        "{ok} jobs in {:.2} s after {warm_ok} warm-up jobs",
        elapsed.as_secs_f64()
    ))];
    let p = |q: f64| percentile(&latencies, q).map(ms).unwrap_or(f64::NAN);
    rows.push(Row::info(NAME, b, "CreateJob call p50", p(50.0), "ms"));
    rows.push(Row::info(NAME, b, "CreateJob call p99", p(99.0), "ms"));
    let failed: usize = errors.values().sum();
    let errors_row = Row::info(NAME, b, "CreateJob errors", failed as f64, "");
    rows.push(if failed > 0 {
        errors_row.with_note(format!("{errors:?}"))
    } else {
        errors_row
    });

    // The scheduler holds a job only once the outbox delivered it: a
    // growing gap means submissions outpace the relay.
    let created = warm_ok + ok;
    let mut stats = SchedulerServiceClient::new(trainmesh_common::client::channel(
        &mesh.scheduler.addr.to_string(),
        Some(mesh.tokens.admin),
    )?);
    let at_end = queued_now(&mut stats).await;
    rows.push(
        Row::info(
            NAME,
            b,
            "jobs not yet at the scheduler when the run ended",
            created.saturating_sub(at_end) as f64,
            "",
        )
        .with_note(format!(
            "{created} created, {at_end} queued at the scheduler"
        )),
    );
    let catch_up = Instant::now();
    let limit = Duration::from_secs(60).min(args.timeout());
    let mut caught_up = at_end >= created;
    while !caught_up && catch_up.elapsed() < limit {
        tokio::time::sleep(Duration::from_millis(50)).await;
        caught_up = queued_now(&mut stats).await >= created;
    }
    let catch_row = Row::info(
        NAME,
        b,
        "enqueue outbox catch-up after the run",
        ms(catch_up.elapsed()),
        "ms",
    );
    rows.push(if caught_up {
        catch_row
    } else {
        catch_row.with_note(format!("not caught up within {limit:?}"))
    });
    // Sustained means the rest of the system keeps up: the jobs of the run
    // over the time until the last of them reached the scheduler.
    let end_to_end = elapsed + catch_up.elapsed();
    let sustained = Row::new(
        NAME,
        b,
        "sustained: created and queued at the scheduler/s",
        rate(ok, end_to_end),
        "/s",
        Some(Target::AtLeast(target)),
    );
    rows.push(if caught_up {
        sustained.with_note(format!(
            "{ok} jobs over {:.2} s (run + outbox catch-up)",
            end_to_end.as_secs_f64()
        ))
    } else {
        sustained.missed(format!(
            "the enqueue outbox had not caught up {limit:?} after the run; upper bound"
        ))
    });
    Ok(rows)
}

fn request(client: usize, i: usize, phase: &str) -> CreateJobRequest {
    CreateJobRequest {
        spec: Some(job_spec(&format!("bench-create-{phase}-{client}-{i}"))),
        idempotency_key: String::new(),
    }
}
