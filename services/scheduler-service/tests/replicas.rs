//! Two scheduler replicas (`run` twice, in-process) on one PostgreSQL
//! database, with fake runner clients split between them: every job is
//! dispatched exactly once and no user ever has more than their limit of
//! jobs running at once. Skipped (with a message) without
//! TRAINMESH_TEST_POSTGRES_URL; the cross-process version lives in tests/.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{capacity, new_job_id, spec, Harness};
use trainmesh_common::proto::job::v1::AttemptState;
use trainmesh_common::proto::runner::v1::{
    AcquireAssignmentsRequest, RegisterRunnerRequest, ReportAttemptStatusRequest,
};
use trainmesh_common::testing::postgres_db;

const USERS: [&str; 5] = ["u1", "u2", "u3", "u4", "u5"];
const JOBS_PER_USER: usize = 40;

/// (user, job, attempt, start, end) as a fake runner saw it.
type Log = Arc<Mutex<Vec<(String, String, i32, Instant, Instant)>>>;

async fn fake_runner(h: &Harness, log: Log, stop: Arc<std::sync::atomic::AtomicBool>) {
    let mut client = h.runners();
    let runner_id = client
        .register_runner(RegisterRunnerRequest {
            name: trainmesh_common::testing::TEST_RUNNER.into(),
            backend: "process".into(),
            capacity: Some(capacity(2, common::H100)),
            labels: Default::default(),
            instance: "fake".into(),
        })
        .await
        .expect("register")
        .into_inner()
        .runner_id;
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        let got = client
            .acquire_assignments(AcquireAssignmentsRequest {
                runner_id: runner_id.clone(),
                max_assignments: 0,
                wait: Some(prost_types::Duration {
                    seconds: 1,
                    nanos: 0,
                }),
            })
            .await
            .expect("acquire")
            .into_inner()
            .assignments;
        for a in got {
            let start = Instant::now();
            let report = |state: AttemptState| ReportAttemptStatusRequest {
                runner_id: runner_id.clone(),
                job_id: a.job_id.clone(),
                attempt: a.attempt,
                state: state as i32,
                exit_code: (state == AttemptState::Succeeded).then_some(0),
                ..Default::default()
            };
            client
                .report_attempt_status(report(AttemptState::Running))
                .await
                .expect("running");
            tokio::task::yield_now().await;
            let end = Instant::now();
            log.lock()
                .unwrap()
                .push((a.owner.clone(), a.job_id.clone(), a.attempt, start, end));
            client
                .report_attempt_status(report(AttemptState::Succeeded))
                .await
                .expect("succeeded");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_dispatch_each_job_once_within_limits() {
    let Some(db) = postgres_db().await else {
        eprintln!("skipped: TRAINMESH_TEST_POSTGRES_URL is not set");
        return;
    };
    let url = db.url.clone();
    let tweak = |c: &mut scheduler_service::Config| {
        c.lease_ttl = Duration::from_secs(120);
        c.leader_ttl = Duration::from_secs(1);
    };
    let a = Arc::new(Harness::start_url(url.clone(), "pg-a", Some(db), tweak).await);
    let b = Arc::new(Harness::start_url(url, "pg-b", None, tweak).await);

    let log: Log = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut runners = Vec::new();
    for h in [&a, &b, &a, &b] {
        let (h, log, stop) = (h.clone(), log.clone(), stop.clone());
        runners.push(tokio::spawn(
            async move { fake_runner(&h, log, stop).await },
        ));
    }

    let mut jobs = Vec::new();
    for i in 0..JOBS_PER_USER {
        for (u, user) in USERS.iter().enumerate() {
            let job = new_job_id();
            let via = if (i + u) % 2 == 0 { &a } else { &b };
            via.enqueue(&job, user, spec(1)).await;
            jobs.push(job);
        }
    }
    let total = jobs.len();
    trainmesh_common::testing::wait_for("every job to run", Duration::from_secs(120), || {
        let log = log.clone();
        async move { (log.lock().unwrap().len() >= total).then_some(()) }
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for r in runners {
        r.await.expect("runner task");
    }

    let log = log.lock().unwrap().clone();
    let mut runs: HashMap<&str, usize> = HashMap::new();
    for (_, job, attempt, _, _) in &log {
        assert_eq!(*attempt, 1, "job {job} was dispatched again");
        *runs.entry(job.as_str()).or_default() += 1;
    }
    for job in &jobs {
        assert_eq!(
            runs.get(job.as_str()),
            Some(&1),
            "job {job} ran {:?} times",
            runs.get(job.as_str())
        );
    }
    // At every start instant, a user's overlapping runs stay within 2.
    for user in USERS {
        let mine: Vec<_> = log.iter().filter(|r| r.0 == user).collect();
        for r in &mine {
            let at = r.3;
            let concurrent = mine.iter().filter(|o| o.3 <= at && at <= o.4).count();
            assert!(
                concurrent <= 2,
                "{user} had {concurrent} jobs running at once"
            );
        }
    }
    let (a, b) = (
        Arc::try_unwrap(a).ok().expect("sole owner"),
        Arc::try_unwrap(b).ok().expect("sole owner"),
    );
    b.stop().await.unwrap();
    a.stop().await.unwrap();
}
