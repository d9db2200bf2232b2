//! The compose mesh under faults, each while a bounded stream of
//! submissions with idempotency keys flows: the leading scheduler killed,
//! job-service killed and restarted, a runner cut off the network,
//! PostgreSQL restarted. Afterwards the whole history is checked: every
//! acknowledged job exists exactly once and ends in exactly one terminal
//! state (SUCCEEDED: the jobs cannot fail), no job had two attempts
//! running at once, and the per-user limit was never exceeded (both from
//! the engine's own container start/die events).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;
use trainmesh_common::testing::wait_for;
use trainmesh_proto::job::v1::job_service_client::JobServiceClient;
use trainmesh_proto::job::v1::{
    watch_jobs_response, CreateJobRequest, JobSpec, JobState, ListJobsRequest, Resources,
    WatchJobsRequest,
};
use trainmesh_proto::scheduler::v1::scheduler_service_client::SchedulerServiceClient;
use trainmesh_proto::scheduler::v1::{LimitScope, Limits, SetLimitsRequest};
use trainmesh_tests::compose::{docker_out, published, Compose};
use trainmesh_tests::docker::{engine, ensure_test_image, TEST_IMAGE};

/// Jobs the admin may run at once.
const LIMIT: usize = 3;
/// Submissions are bounded in number and paced.
const MAX_JOBS: usize = 60;
const PACE: Duration = Duration::from_millis(250);
const DEADLINE: Duration = Duration::from_secs(180);
/// The scheduler's runner lease and leader lease in these tests.
const LEASE_TTL_SECS: u64 = 6;
const LEADER_TTL_SECS: u64 = 4;

fn overrides() -> String {
    let scheduler = format!(
        r#"    environment:
      TRAINMESH_SCHEDULER_LEASE_TTL_SECS: "{LEASE_TTL_SECS}"
      TRAINMESH_SCHEDULER_HEARTBEAT_INTERVAL_SECS: "1"
      TRAINMESH_SCHEDULER_LEADER_LEASE_TTL_SECS: "{LEADER_TTL_SECS}"
"#
    );
    format!(
        "  scheduler-1:\n{scheduler}  scheduler-2:\n{scheduler}  job-service:\n    environment:\n      TRAINMESH_JOB_WATCH_HEARTBEAT_SECS: \"1\"\n"
    )
}

async fn mesh() -> Option<Compose> {
    let mesh = Compose::up(&overrides()).await?;
    let docker = engine().await.expect("engine");
    ensure_test_image(&docker).await;
    let mut scheduler = SchedulerServiceClient::new(mesh.channel("scheduler-1", 50052));
    scheduler
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
    Some(mesh)
}

/// A job of `secs` seconds that cannot fail.
fn spec(name: &str, secs: u64) -> JobSpec {
    JobSpec {
        name: name.into(),
        image: TEST_IMAGE.into(),
        command: vec!["/bin/busybox".into(), "sleep".into(), secs.to_string()],
        resources: Some(Resources {
            cpu: 0.1,
            memory_mib: 32,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The submissions: idempotency key → job id once acknowledged, and every
/// error code seen on the way.
#[derive(Default)]
struct Submitted {
    acked: BTreeMap<String, String>,
    errors: Vec<tonic::Code>,
}

struct Stream {
    state: Arc<Mutex<Submitted>>,
    max: usize,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// Submits a job of `secs` seconds every PACE until stopped (or `max`),
/// each retried with its idempotency key until acknowledged. The address
/// is looked up again after a failure: a restarted container gets a new
/// published port.
fn start_stream(mesh: &Compose, prefix: &str, secs: u64, max: usize) -> Stream {
    let state = Arc::new(Mutex::new(Submitted::default()));
    let (stop, mut stopped) = watch::channel(false);
    let token = mesh.admin_token.clone();
    let job_service = mesh.container("job-service");
    let addr_of = move || published(&job_service, 50051);
    let prefix = prefix.to_owned();
    let st = state.clone();
    let task = tokio::spawn(async move {
        let mut pace = tokio::time::interval(PACE);
        let mut client: Option<JobServiceClient<_>> = None;
        for i in 0..max {
            if *stopped.borrow() {
                break;
            }
            let key = format!("{prefix}-{i:03}");
            loop {
                tokio::select! {
                    _ = pace.tick() => {}
                    _ = stopped.wait_for(|s| *s) => {}
                }
                if client.is_none() {
                    client = addr_of()
                        .and_then(|a| trainmesh_common::client::channel(&a, Some(&token)).ok())
                        .map(JobServiceClient::new);
                }
                let Some(c) = client.as_mut() else { continue };
                let mut req = tonic::Request::new(CreateJobRequest {
                    spec: Some(spec(&key, secs)),
                    idempotency_key: key.clone(),
                });
                // Longer than job-service waits for a database connection
                // (5 s), so a caller hears its answer, not its own timeout.
                req.set_timeout(Duration::from_secs(15));
                match c.create_job(req).await {
                    Ok(r) => {
                        let id = r.into_inner().job.map(|j| j.id).unwrap_or_default();
                        st.lock().unwrap().acked.insert(key.clone(), id);
                        break;
                    }
                    Err(s) => {
                        st.lock().unwrap().errors.push(s.code());
                        client = None;
                        // A key not yet acknowledged is given up only
                        // when the stream is stopped.
                        if *stopped.borrow() {
                            break;
                        }
                    }
                }
            }
        }
    });
    Stream {
        state,
        max,
        stop,
        task,
    }
}

impl Stream {
    fn acked(&self) -> usize {
        self.state.lock().unwrap().acked.len()
    }

    /// Waits for more than `more_than` acknowledgements (or all `max`).
    async fn wait_acked(&self, more_than: usize, what: &str) {
        let more_than = more_than.min(self.max - 1);
        wait_for(what, DEADLINE, || async {
            (self.acked() > more_than).then_some(())
        })
        .await;
    }

    async fn finish(self) -> Submitted {
        let _ = self.stop.send(true);
        self.task.await.expect("submitter");
        Arc::try_unwrap(self.state)
            .ok()
            .expect("one owner")
            .into_inner()
            .unwrap()
    }
}

fn jobs_client(mesh: &Compose) -> JobServiceClient<trainmesh_common::client::Channel> {
    JobServiceClient::new(mesh.channel("job-service", 50051))
}

/// Every job of the admin, by name.
async fn all_jobs(mesh: &Compose) -> Vec<trainmesh_proto::job::v1::Job> {
    let mut client = jobs_client(mesh);
    let mut jobs = Vec::new();
    let mut page_token = String::new();
    loop {
        let resp = client
            .list_jobs(ListJobsRequest {
                page_size: 100,
                page_token: page_token.clone(),
                ..Default::default()
            })
            .await
            .expect("list jobs")
            .into_inner();
        jobs.extend(resp.jobs);
        if resp.next_page_token.is_empty() {
            return jobs;
        }
        page_token = resp.next_page_token;
    }
}

fn terminal(s: JobState) -> bool {
    matches!(
        s,
        JobState::Succeeded | JobState::Failed | JobState::Cancelled
    )
}

/// The history checks every fault test ends with.
async fn check_history(mesh: &Compose, submitted: &Submitted, since: SystemTime) {
    assert!(!submitted.acked.is_empty(), "nothing was acknowledged");
    // Every acknowledged job ends.
    wait_for("every job to end", DEADLINE, || async {
        let jobs = all_jobs(mesh).await;
        jobs.iter().all(|j| terminal(j.state())).then_some(())
    })
    .await;
    let jobs = all_jobs(mesh).await;
    // Exactly once per key; nothing unacknowledged beyond the one key in
    // flight when the stream stopped.
    let mut by_name: HashMap<String, Vec<&trainmesh_proto::job::v1::Job>> = HashMap::new();
    for j in &jobs {
        let name = j.spec.as_ref().map(|s| s.name.clone()).unwrap_or_default();
        by_name.entry(name).or_default().push(j);
    }
    for (key, id) in &submitted.acked {
        let found = by_name.get(key).map(Vec::as_slice).unwrap_or_default();
        assert_eq!(found.len(), 1, "job {key} exists {} times", found.len());
        assert_eq!(&found[0].id, id, "job {key} answered with another id");
        assert_eq!(
            found[0].state(),
            JobState::Succeeded,
            "job {key} ({id}) ended {:?}",
            found[0].state()
        );
    }
    assert!(
        jobs.len() <= submitted.acked.len() + 1,
        "{} jobs for {} acknowledged keys",
        jobs.len(),
        submitted.acked.len()
    );
    check_terminal_events(mesh, &jobs).await;
    check_containers(since);
}

/// In the event log, each job reaches a terminal state exactly once.
async fn check_terminal_events(mesh: &Compose, jobs: &[trainmesh_proto::job::v1::Job]) {
    let mut stream = jobs_client(mesh)
        .watch_jobs(WatchJobsRequest {
            job_id: String::new(),
            cursor: String::new(),
            from_start: true,
        })
        .await
        .expect("watch jobs")
        .into_inner();
    let mut terminals: HashMap<String, Vec<JobState>> = HashMap::new();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    // Until every job's end is seen and a heartbeat (sent once the stream
    // has caught up) follows it.
    let mut caught_up = false;
    while !caught_up {
        let msg = tokio::time::timeout_at(deadline, stream.message())
            .await
            .expect("the event log in time")
            .expect("watch")
            .expect("an open watch");
        match msg.kind {
            Some(watch_jobs_response::Kind::Event(e))
                if e.r#type == "state_changed" && terminal(e.state()) =>
            {
                terminals
                    .entry(e.job_id.clone())
                    .or_default()
                    .push(e.state());
            }
            Some(watch_jobs_response::Kind::Heartbeat(_)) => {
                caught_up = jobs.iter().all(|j| terminals.contains_key(&j.id));
            }
            _ => {}
        }
    }
    for j in jobs {
        assert_eq!(
            terminals[&j.id].len(),
            1,
            "job {} reached terminal states {:?}",
            j.id,
            terminals[&j.id]
        );
    }
}

/// From the engine's events: no job had two containers (attempts) alive at
/// once, and no more than LIMIT ran at once.
fn check_containers(since: SystemTime) {
    let since = since
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        .to_string();
    let until = (SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 1)
    .to_string();
    let text = docker_out(&[
        "events",
        "--since",
        &since,
        "--until",
        &until,
        "--filter",
        "type=container",
        "--filter",
        "event=start",
        "--filter",
        "event=die",
        "--filter",
        &format!("image={TEST_IMAGE}"),
        "--format",
        "{{.TimeNano}} {{.Action}} {{index .Actor.Attributes \"trainmesh.job\"}} {{index .Actor.Attributes \"trainmesh.attempt\"}}",
    ]);
    let mut running_per_job: HashMap<String, i32> = HashMap::new();
    let mut running = 0usize;
    let mut max_running = 0usize;
    let mut starts = 0;
    for line in text.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        let [_, action, job, attempt] = f.as_slice() else {
            continue;
        };
        let n = running_per_job.entry(job.to_string()).or_default();
        match *action {
            "start" => {
                starts += 1;
                *n += 1;
                running += 1;
                assert!(
                    *n <= 1,
                    "job {job} attempt {attempt} started while another attempt ran"
                );
            }
            "die" => {
                *n -= 1;
                running = running.saturating_sub(1);
            }
            _ => {}
        }
        max_running = max_running.max(running);
    }
    assert!(starts > 0, "no container events were seen");
    assert!(
        max_running <= LIMIT,
        "{max_running} jobs ran at once; the limit is {LIMIT}"
    );
}

/// When the last container of `runner` died since `since`, by the engine.
fn last_die(runner: &str, since: SystemTime) -> SystemTime {
    let secs = |t: SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            .to_string()
    };
    let text = docker_out(&[
        "events",
        "--since",
        &secs(since),
        "--until",
        &secs(SystemTime::now() + Duration::from_secs(1)),
        "--filter",
        "type=container",
        "--filter",
        "event=die",
        "--filter",
        &format!("label=trainmesh.runner={runner}"),
        "--format",
        "{{.TimeNano}}",
    ]);
    let nanos = text
        .lines()
        .filter_map(|l| l.trim().parse::<u64>().ok())
        .max()
        .expect("a container of the cut-off runner died");
    std::time::UNIX_EPOCH + Duration::from_nanos(nanos)
}

/// Whether a replica's log says it leads now.
fn leads(log: &str) -> bool {
    let gained = log.rfind("now dispatches (leader)");
    let lost = log.rfind("lost the dispatch leadership");
    matches!((gained, lost), (Some(g), l) if l.is_none_or(|l| l < g))
}

/// The scheduler replica that leads, from the replicas' own logs.
fn leader(mesh: &Compose) -> Option<&'static str> {
    ["scheduler-1", "scheduler-2"]
        .into_iter()
        .find(|s| leads(&mesh.logs(s)))
}

/// When the log's last "now dispatches" line was written.
fn led_at(log: &str) -> SystemTime {
    let line = log
        .lines()
        .rfind(|l| l.contains("now dispatches (leader)"))
        .expect("a leadership line");
    let json = &line[line.find('{').expect("a JSON log line")..];
    let v: serde_json::Value = serde_json::from_str(json).expect("JSON log line");
    let ts: prost_types::Timestamp = v["timestamp"]
        .as_str()
        .expect("a timestamp")
        .parse()
        .expect("an RFC 3339 timestamp");
    std::time::UNIX_EPOCH + Duration::new(ts.seconds as u64, ts.nanos as u32)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leading_scheduler_killed_the_other_leads_within_the_lease() {
    let Some(mesh) = mesh().await else { return };
    let since = SystemTime::now();
    let stream = start_stream(&mesh, "leader", 2, MAX_JOBS);
    stream.wait_acked(5, "the first submissions").await;
    let old = wait_for("a leader", DEADLINE, || async { leader(&mesh) }).await;
    let other = if old == "scheduler-1" {
        "scheduler-2"
    } else {
        "scheduler-1"
    };
    let killed = SystemTime::now();
    mesh.kill(old);
    // (The killed one's log still ends with its leadership.)
    wait_for("the other replica to lead", DEADLINE, || async {
        leads(&mesh.logs(other)).then_some(())
    })
    .await;
    // From the new leader's own log line: polling the logs takes seconds.
    let took = led_at(&mesh.logs(other))
        .duration_since(killed)
        .unwrap_or_default();
    eprintln!("figure: {other} led {took:?} after {old} was killed");
    // The lease runs out at most a TTL after the kill, and the other
    // replica tries to take it as it runs out; the second is for the
    // kill itself and the log line.
    let bound = Duration::from_secs(LEADER_TTL_SECS + 1);
    assert!(
        took <= bound,
        "took {took:?}; the leader lease is {LEADER_TTL_SECS} s"
    );
    let before = stream.acked();
    stream
        .wait_acked(before + 5, "submissions after the new leader")
        .await;
    let submitted = stream.finish().await;
    check_history(&mesh, &submitted, since).await;
    eprintln!(
        "figure: {} jobs acknowledged, all succeeded once",
        submitted.acked.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_service_killed_and_restarted_loses_nothing_acknowledged() {
    let Some(mesh) = mesh().await else { return };
    let since = SystemTime::now();
    let stream = start_stream(&mesh, "jobsvc", 2, MAX_JOBS);
    stream.wait_acked(8, "the first submissions").await;
    mesh.kill("job-service");
    let before = stream.acked();
    let down = Instant::now();
    mesh.start("job-service");
    stream
        .wait_acked(before, "a submission after the restart")
        .await;
    eprintln!(
        "figure: submissions acknowledged again {:?} after the kill",
        down.elapsed()
    );
    stream.wait_acked(before + 5, "more submissions").await;
    let submitted = stream.finish().await;
    assert!(
        !submitted.errors.is_empty(),
        "the kill was not seen by the submitter"
    );
    check_history(&mesh, &submitted, since).await;
    eprintln!(
        "figure: {} jobs acknowledged, all succeeded once",
        submitted.acked.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_cut_off_has_its_attempts_run_elsewhere_and_its_late_reports_refused() {
    let Some(mesh) = mesh().await else { return };
    let since = SystemTime::now();
    // Jobs longer than the lease: only the runner's fence stops them
    // before the scheduler runs them again elsewhere.
    let stream = start_stream(&mesh, "partition", 3 * LEASE_TTL_SECS / 2, 24);
    // Cut off a runner while it runs something.
    let jobs_on = |runner: &str| {
        docker_out(&[
            "ps",
            "--filter",
            &format!("label=trainmesh.runner={runner}"),
            "--filter",
            &format!("ancestor={TEST_IMAGE}"),
            "-q",
        ])
    };
    let runner = wait_for("a runner to run a job", DEADLINE, || async {
        ["runner-1", "runner-2"]
            .into_iter()
            .find(|r| !jobs_on(r).is_empty())
    })
    .await;
    let cut = Instant::now();
    let cut_at = SystemTime::now();
    mesh.disconnect(runner);
    // Its containers are stopped by its own fence before the lease ends:
    // judged by the engine's die events, since polling adds its own delay.
    wait_for(
        "the cut-off runner's containers to stop",
        DEADLINE,
        || async { jobs_on(runner).is_empty().then_some(()) },
    )
    .await;
    let fenced = last_die(runner, cut_at)
        .duration_since(cut_at)
        .unwrap_or_default();
    eprintln!("figure: {runner}'s jobs stopped {fenced:?} after the cut");
    // The fence kills by 5/6 of the lease after the last renewal, and the
    // engine rounds stop timeouts up to whole seconds: within about a lease
    // of the cut. The strict check, that no retry started before the old
    // attempt's container died, is the history check at the end.
    assert!(
        fenced < Duration::from_secs(LEASE_TTL_SECS + 1),
        "{runner} ran its jobs on past its lease ({fenced:?})"
    );
    let before = stream.acked();
    stream
        .wait_acked(before + 3, "submissions while a runner is cut off")
        .await;
    // Cut off until the scheduler has given up on what it ran: reconnected
    // earlier, the runner's own report of its fenced attempts would still be
    // on time and accepted.
    wait_for(
        "the scheduler to run an attempt of the cut-off runner again",
        DEADLINE,
        || async {
            all_jobs(&mesh)
                .await
                .iter()
                .any(|j| j.attempts.len() > 1)
                .then_some(())
        },
    )
    .await;
    mesh.connect(runner);
    mesh.wait_healthy(&[runner]).await;
    eprintln!(
        "figure: {runner} healthy again {:?} after the cut",
        cut.elapsed()
    );
    let submitted = stream.finish().await;
    check_history(&mesh, &submitted, since).await;
    // The attempts it lost were retried elsewhere, and what it reported
    // about them afterwards was refused.
    let jobs = all_jobs(&mesh).await;
    let retried = jobs.iter().filter(|j| j.attempts.len() > 1).count();
    assert!(
        retried > 0,
        "no attempt of runner-1 was run again elsewhere"
    );
    // Its late reports are retried with backoff once it is back.
    wait_for(
        &format!("{runner}'s late report to be refused"),
        DEADLINE,
        || async {
            mesh.logs(runner)
                .contains("scheduler refused the attempt status report")
                .then_some(())
        },
    )
    .await;
    eprintln!(
        "figure: {} jobs acknowledged, {retried} retried after the partition",
        submitted.acked.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_callers_see_unavailable_and_nothing_is_lost() {
    let Some(mesh) = mesh().await else { return };
    let since = SystemTime::now();
    let stream = start_stream(&mesh, "pg", 2, MAX_JOBS);
    stream.wait_acked(8, "the first submissions").await;
    // Down long enough for callers to be refused, then up again.
    mesh.stop("postgres");
    let down = Instant::now();
    // Down until job-service itself refuses a call: a restart before it
    // has would leave nothing to see.
    wait_for(
        "a submission refused with UNAVAILABLE while PostgreSQL is down",
        DEADLINE,
        || async {
            let errors = &stream.state.lock().unwrap().errors;
            errors.contains(&tonic::Code::Unavailable).then_some(())
        },
    )
    .await;
    mesh.start("postgres");
    let before = stream.acked();
    stream
        .wait_acked(before, "a submission after the restart")
        .await;
    eprintln!(
        "figure: submissions acknowledged again {:?} after PostgreSQL stopped",
        down.elapsed()
    );
    stream.wait_acked(before + 5, "more submissions").await;
    let submitted = stream.finish().await;
    assert!(
        !submitted.errors.contains(&tonic::Code::Internal),
        "a caller saw INTERNAL: {:?}",
        submitted.errors
    );
    assert!(
        submitted.errors.contains(&tonic::Code::Unavailable),
        "no caller saw the restart: {:?}",
        submitted.errors
    );
    check_history(&mesh, &submitted, since).await;
    eprintln!(
        "figure: {} jobs acknowledged, errors seen {:?}",
        submitted.acked.len(),
        submitted.errors
    );
}
