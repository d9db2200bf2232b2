//! Two scheduler processes on one PostgreSQL database: hundreds of jobs
//! from several users, fake runners split between the replicas, each
//! recording when it holds which job. Every job is dispatched exactly once
//! and no user ever has more jobs running than the limit.
//!
//! Needs TRAINMESH_TEST_POSTGRES_URL; without it the test says so and
//! passes, except under CI, where it fails.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::task::JoinSet;
use trainmesh_common::testing::{wait_for, POSTGRES_ENV};
use trainmesh_proto::job::v1::{
    AttemptState, CreateJobRequest, JobSpec, JobState, ListJobsRequest, Resources,
};
use trainmesh_proto::scheduler::v1::{GetLimitsRequest, LimitScope, Limits, SetLimitsRequest};
use trainmesh_tests::fake_runner::{cpu_capacity, lock, FakeRunner};
use trainmesh_tests::{user_token, Mesh, MeshOptions, ADMIN_TOKEN, SCHEDULER_2, USERS};

const JOBS_PER_USER: usize = 50;
/// Concurrent CreateJob callers per user.
const SUBMITTERS_PER_USER: usize = 4;
const LIMIT: usize = 2;
const RUNNERS_PER_REPLICA: usize = 3;
const RUNNER_CPU: f64 = 2.0;
const DEADLINE: Duration = Duration::from_secs(50);

/// What one fake runner saw of one attempt.
#[derive(Clone, Debug)]
struct Held {
    owner: String,
    job_id: String,
    attempt: i32,
    runner: String,
    /// CPUs the job asked for.
    cpu: f64,
    /// When the assignment arrived.
    start: Instant,
    /// Just before SUCCEEDED was reported.
    end: Instant,
}

#[derive(Default)]
struct Record {
    held: Vec<Held>,
    errors: Vec<String>,
}

fn in_ci() -> bool {
    std::env::var("CI")
        .map(|v| !v.is_empty() && v != "false" && v != "0")
        .unwrap_or(false)
}

/// Takes assignments until the test ends, like a real runner: the
/// attempt is listed in heartbeats from its arrival until its final report
/// is acknowledged (the background heartbeats must never tell the runner
/// to stop it); RUNNING, then SUCCEEDED. `end` is taken before SUCCEEDED
/// is sent, so the recorded interval lies inside the scheduler's.
async fn work(runner: Arc<FakeRunner>, record: Arc<Mutex<Record>>) {
    let mut running = JoinSet::new();
    loop {
        let got = match runner.acquire(2, Duration::from_secs(2)).await {
            Ok(got) => got,
            Err(e) => {
                lock(&record)
                    .errors
                    .push(format!("{}: acquire: {e}", runner.name));
                return;
            }
        };
        for a in got {
            let start = Instant::now();
            let runner = runner.clone();
            let record = record.clone();
            running.spawn(async move {
                let fail = |what: &str, e: String| {
                    lock(&record).errors.push(format!(
                        "{}: {what} of `{}` attempt {}: {e}",
                        runner.name, a.job_id, a.attempt
                    ))
                };
                runner.hold(&a.job_id, a.attempt);
                if let Err(e) = runner
                    .report(&a.job_id, a.attempt, AttemptState::Running, None)
                    .await
                {
                    fail("RUNNING", e.to_string());
                }
                let end = Instant::now();
                runner.finishing(&a.job_id, a.attempt);
                lock(&record).held.push(Held {
                    owner: a.owner.clone(),
                    job_id: a.job_id.clone(),
                    attempt: a.attempt,
                    runner: runner.name.clone(),
                    cpu: a
                        .spec
                        .as_ref()
                        .and_then(|s| s.resources.as_ref())
                        .map_or(0.0, |r| r.cpu),
                    start,
                    end,
                });
                match runner
                    .report(&a.job_id, a.attempt, AttemptState::Succeeded, Some(0))
                    .await
                {
                    Ok(true) => {}
                    Ok(false) => fail("SUCCEEDED", "reported as a duplicate".into()),
                    Err(e) => fail("SUCCEEDED", e.to_string()),
                }
                runner.release(&a.job_id, a.attempt);
            });
        }
        while running.try_join_next().is_some() {}
    }
}

/// The greatest total `weight` of attempts held at the same instant, and
/// which attempts those were.
fn peak(held: &[&Held], weight: impl Fn(&Held) -> f64) -> (f64, Vec<String>) {
    let mut edges: Vec<(Instant, i32, &Held)> = Vec::new();
    for h in held {
        edges.push((h.start, 1, h));
        edges.push((h.end, -1, h));
    }
    // At equal instants an end comes before a start.
    edges.sort_by_key(|(t, d, _)| (*t, *d));
    let (mut now, mut max, mut at): (Vec<&Held>, f64, Vec<String>) = (Vec::new(), 0.0, Vec::new());
    for (_, d, h) in edges {
        if d > 0 {
            now.push(h);
            let total: f64 = now.iter().map(|h| weight(h)).sum();
            if total > max {
                max = total;
                at = now.iter().map(|h| h.job_id.clone()).collect();
            }
        } else {
            now.retain(|j| j.job_id != h.job_id);
        }
    }
    (max, at)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_schedulers_dispatch_each_job_once_within_user_limits() {
    if std::env::var(POSTGRES_ENV).map_or(true, |v| v.is_empty()) {
        assert!(
            !in_ci(),
            "CI must set {POSTGRES_ENV}: the two-replica test needs PostgreSQL"
        );
        eprintln!("skipped: {POSTGRES_ENV} is not set (two scheduler replicas need PostgreSQL)");
        return;
    }
    let mesh = Mesh::start_with(
        MeshOptions {
            no_runner: true,
            postgres: true,
            scheduler_replicas: 2,
            ..Default::default()
        }
        .arg("scheduler-service", &["--heartbeat-interval-secs", "1"]),
    )
    .await;
    let replicas = ["scheduler-service", SCHEDULER_2];

    // Set on one replica, read back from the other: limits live in the
    // shared database.
    mesh.scheduler_at(SCHEDULER_2, ADMIN_TOKEN)
        .set_limits(SetLimitsRequest {
            limits: Some(Limits {
                scope: LimitScope::UserDefault as i32,
                subject: String::new(),
                max_running_jobs: Some(LIMIT as i32),
                ..Default::default()
            }),
        })
        .await
        .expect("set the per-user running limit");
    let limits = mesh
        .scheduler_at(replicas[0], ADMIN_TOKEN)
        .get_limits(GetLimitsRequest {
            user: "alice".into(),
            org: "ml".into(),
        })
        .await
        .expect("get limits")
        .into_inner();
    assert!(
        limits
            .effective
            .iter()
            .any(|e| e.name == "max_running_jobs" && e.value == LIMIT as i64),
        "{limits:#?}"
    );

    // Each runner fits two one-CPU jobs or one two-CPU job: at most 12
    // slots for at most 10 running jobs, so work must go to runners of both
    // replicas, and placements compete for room (a job that does not fit is
    // skipped for the user's next one, which makes two replicas' plans
    // diverge when they race).
    let record = Arc::new(Mutex::new(Record::default()));
    let mut runners = Vec::new();
    let mut workers = JoinSet::new();
    for (n, replica) in replicas.iter().enumerate() {
        for i in 0..RUNNERS_PER_REPLICA {
            let name = format!("fake-r{}-{i}", n + 1);
            let mut r =
                FakeRunner::register(&mesh, replica, &name, cpu_capacity(RUNNER_CPU, 1 << 20))
                    .await;
            r.keep_alive();
            let r = Arc::new(r);
            runners.push((*replica, r.clone()));
            workers.spawn(work(r, record.clone()));
        }
    }

    // Submitted concurrently, several callers per user, priorities and
    // sizes mixed.
    let started = Instant::now();
    let mut submits = JoinSet::new();
    for (user, lane) in USERS
        .iter()
        .flat_map(|u| (0..SUBMITTERS_PER_USER).map(move |l| (*u, l)))
    {
        let mut jobs = mesh.jobs(&user_token(user));
        submits.spawn(async move {
            let mut ids = Vec::new();
            for i in (lane..JOBS_PER_USER).step_by(SUBMITTERS_PER_USER) {
                let job = jobs
                    .create_job(CreateJobRequest {
                        spec: Some(JobSpec {
                            name: format!("{user}-{i}"),
                            image: "python:3.11-slim".into(),
                            command: vec!["true".into()],
                            priority: (i % 3) as i32,
                            resources: Some(Resources {
                                cpu: if i % 4 == 0 { 2.0 } else { 1.0 },
                                ..Default::default()
                            }),
                            ..Default::default()
                        }),
                        idempotency_key: String::new(),
                    })
                    .await
                    .unwrap_or_else(|e| panic!("submit {user}-{i}: {e}"))
                    .into_inner()
                    .job
                    .expect("job");
                ids.push((user.to_string(), job.id));
            }
            ids
        });
    }
    let mut submitted: BTreeMap<String, String> = BTreeMap::new();
    while let Some(ids) = submits.join_next().await {
        submitted.extend(ids.expect("submit task").into_iter().map(|(u, id)| (id, u)));
    }
    let total = USERS.len() * JOBS_PER_USER;
    assert_eq!(submitted.len(), total);
    eprintln!("submitted {total} jobs in {:?}", started.elapsed());

    // Polled until every job has succeeded; on timeout, say how far it got.
    let seen = Mutex::new(0usize);
    let finished = tokio::time::timeout(
        DEADLINE,
        wait_for(
            "every job to succeed in job-service",
            DEADLINE + Duration::from_secs(1),
            || {
                let mesh = &mesh;
                let seen = &seen;
                let errors = lock(&record).errors.clone();
                async move {
                    assert!(errors.is_empty(), "runner errors: {errors:#?}");
                    let mut done = Vec::new();
                    for user in USERS {
                        done.extend(
                            mesh.jobs(&user_token(user))
                                .list_jobs(ListJobsRequest {
                                    states: vec![JobState::Succeeded as i32],
                                    page_size: 500,
                                    ..Default::default()
                                })
                                .await
                                .ok()?
                                .into_inner()
                                .jobs,
                        );
                    }
                    *lock(seen) = done.len();
                    (done.len() == total).then_some(done)
                }
            },
        ),
    )
    .await
    .unwrap_or_else(|_| {
        panic!(
            "timed out after {DEADLINE:?}: {} of {total} jobs succeeded in job-service, \
             {} attempts held and released by the fake runners",
            lock(&seen),
            lock(&record).held.len()
        )
    });
    eprintln!("all {total} jobs succeeded after {:?}", started.elapsed());
    workers.abort_all();
    let record = std::mem::take(&mut *lock(&record));
    assert!(
        record.errors.is_empty(),
        "runner errors: {:#?}",
        record.errors
    );

    // Exactly once: one assignment per job, attempt 1, for its owner.
    let mut by_job: HashMap<&str, Vec<&Held>> = HashMap::new();
    for h in &record.held {
        by_job.entry(h.job_id.as_str()).or_default().push(h);
    }
    let twice: Vec<_> = by_job.values().filter(|v| v.len() > 1).collect();
    assert!(twice.is_empty(), "dispatched more than once: {twice:#?}");
    assert_eq!(by_job.len(), total, "every job was dispatched");
    for h in &record.held {
        assert_eq!(h.attempt, 1, "{h:?}");
        assert_eq!(
            submitted.get(&h.job_id),
            Some(&h.owner),
            "an assignment for a submitted job, with its owner: {h:?}"
        );
    }

    // job-service agrees: one attempt each, on the runner that held it.
    let ids: HashMap<&str, &str> = runners
        .iter()
        .map(|(_, r)| (r.name.as_str(), r.runner_id.as_str()))
        .collect();
    for job in &finished {
        assert_eq!(job.attempts.len(), 1, "{job:#?}");
        let held = by_job[job.id.as_str()][0];
        assert_eq!(
            job.attempts[0].runner_id,
            ids[held.runner.as_str()],
            "{job:#?} {held:?}"
        );
    }

    // Never more than LIMIT running per user, at any instant.
    for user in USERS {
        let held: Vec<&Held> = record.held.iter().filter(|h| h.owner == user).collect();
        assert_eq!(held.len(), JOBS_PER_USER);
        let (max, at) = peak(&held, |_| 1.0);
        assert!(
            max <= LIMIT as f64,
            "{user} had {max} jobs running at once (limit {LIMIT}): {at:?}"
        );
    }
    // Nor more CPUs placed on a runner than it offered.
    for (_, r) in &runners {
        let held: Vec<&Held> = record.held.iter().filter(|h| h.runner == r.name).collect();
        let (max, at) = peak(&held, |h| h.cpu);
        assert!(
            max <= RUNNER_CPU,
            "{} held jobs needing {max} CPUs at once (capacity {RUNNER_CPU}): {at:?}",
            r.name
        );
    }

    for (replica, r) in &runners {
        assert!(
            lock(&r.heartbeat_errors).is_empty(),
            "{} heartbeats failed: {:?}",
            r.name,
            lock(&r.heartbeat_errors)
        );
        assert!(
            lock(&r.told_to_stop).is_empty(),
            "{} (on {replica}) was told to stop attempts: {:?}",
            r.name,
            lock(&r.told_to_stop)
        );
    }
    for (n, replica) in replicas.iter().enumerate() {
        let prefix = format!("fake-r{}-", n + 1);
        let got = record
            .held
            .iter()
            .filter(|h| h.runner.starts_with(&prefix))
            .count();
        assert!(
            got > 0,
            "runners polling {replica} received assignments (jobs per runner: {:?})",
            record.held.iter().fold(BTreeMap::new(), |mut m, h| {
                *m.entry(h.runner.clone()).or_insert(0) += 1;
                m
            })
        );
    }
    drop(runners);
    mesh.stop().await;
}
