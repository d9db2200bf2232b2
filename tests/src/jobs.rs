//! Submitting jobs and waiting on what job-service says about them.

use std::time::Duration;

use trainmesh_common::client::Channel;
use trainmesh_common::testing::wait_for;
use trainmesh_proto::job::v1::job_service_client::JobServiceClient;
use trainmesh_proto::job::v1::{
    watch_jobs_response, CreateJobRequest, GetJobRequest, Job, JobEvent, JobSpec, JobState,
    WatchJobsRequest,
};

use crate::{Mesh, ADMIN_TOKEN};

/// The start of the Python jobs that leave marks for the test: `attempt`
/// (this attempt's number), `marks` (`$MARK_DIR`) and `alive(pid)`, which
/// does not count a zombie as alive.
pub const ATTEMPT_PRELUDE: &str = r#"import os, sys
attempt = os.environ["TRAINMESH_ATTEMPT"]
marks = os.environ["MARK_DIR"]
def alive(pid):
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")
"#;

/// `python3 -c CODE`, unbuffered, with extra environment.
pub fn python_job(name: &str, code: &str, env: &[(&str, &str)]) -> JobSpec {
    let mut spec = JobSpec {
        name: name.into(),
        image: "python:3.11-slim".into(),
        command: vec!["python3".into(), "-c".into(), code.into()],
        ..Default::default()
    };
    spec.env
        .insert("PYTHONUNBUFFERED".to_string(), "1".to_string());
    for (k, v) in env {
        spec.env.insert(k.to_string(), v.to_string());
    }
    spec
}

/// Submits `spec` as the owner of `token` and returns the stored job.
pub async fn submit(mesh: &Mesh, token: &str, spec: JobSpec) -> Job {
    mesh.jobs(token)
        .create_job(CreateJobRequest {
            spec: Some(spec),
            idempotency_key: String::new(),
        })
        .await
        .expect("create job")
        .into_inner()
        .job
        .expect("job")
}

/// The job as job-service has it now (read with the admin token).
pub async fn get_job(mesh: &Mesh, job_id: &str) -> Job {
    mesh.jobs(ADMIN_TOKEN)
        .get_job(GetJobRequest {
            job_id: job_id.into(),
        })
        .await
        .expect("get job")
        .into_inner()
        .job
        .expect("job")
}

pub fn state_of(job: &Job) -> JobState {
    JobState::try_from(job.state).unwrap_or(JobState::Unspecified)
}

pub fn is_terminal(state: JobState) -> bool {
    matches!(
        state,
        JobState::Succeeded | JobState::Failed | JobState::Cancelled
    )
}

/// Waits until job-service shows the job satisfying `done`; panics naming
/// `what` (and the job as last seen) after `timeout`.
pub async fn wait_job(
    mesh: &Mesh,
    job_id: &str,
    what: &str,
    timeout: Duration,
    done: impl Fn(&Job) -> bool,
) -> Job {
    wait_job_at(|| mesh.jobs(ADMIN_TOKEN), job_id, what, timeout, done).await
}

/// [`wait_job`] for any mesh: `client` makes a client allowed to read the
/// job, once per try.
pub async fn wait_job_at(
    client: impl Fn() -> JobServiceClient<Channel>,
    job_id: &str,
    what: &str,
    timeout: Duration,
    done: impl Fn(&Job) -> bool,
) -> Job {
    let last = std::sync::Mutex::new(None::<Job>);
    let found = tokio::time::timeout(
        timeout,
        wait_for(what, timeout + Duration::from_secs(1), || {
            let mut jobs = client();
            let id = job_id.to_string();
            let done = &done;
            let last = &last;
            async move {
                let job = jobs
                    .get_job(GetJobRequest { job_id: id })
                    .await
                    .ok()?
                    .into_inner()
                    .job?;
                let ok = done(&job);
                *last.lock().expect("lock") = Some(job.clone());
                ok.then_some(job)
            }
        }),
    )
    .await;
    match found {
        Ok(job) => job,
        Err(_) => panic!(
            "timed out after {timeout:?} waiting for {what}; job `{job_id}` last seen as {:#?}",
            last.lock().expect("lock").take()
        ),
    }
}

/// Waits until the job is in `state`.
pub async fn wait_state(mesh: &Mesh, job_id: &str, state: JobState, timeout: Duration) -> Job {
    wait_job(
        mesh,
        job_id,
        &format!("job `{job_id}` to be {}", state.as_str_name()),
        timeout,
        |j| j.state == state as i32,
    )
    .await
}

/// The job's events from the start, read with WatchJobs until `enough`
/// says so; panics after `timeout` with what was seen.
pub async fn events_until(
    mesh: &Mesh,
    job_id: &str,
    timeout: Duration,
    enough: impl Fn(&[JobEvent]) -> bool,
) -> Vec<JobEvent> {
    let mut stream = mesh
        .jobs(ADMIN_TOKEN)
        .watch_jobs(WatchJobsRequest {
            job_id: job_id.into(),
            cursor: String::new(),
            from_start: true,
        })
        .await
        .expect("watch jobs")
        .into_inner();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut events = Vec::new();
    loop {
        if enough(&events) {
            return events;
        }
        let next = tokio::time::timeout_at(deadline, stream.message()).await;
        match next {
            Ok(Ok(Some(msg))) => {
                if let Some(watch_jobs_response::Kind::Event(e)) = msg.kind {
                    events.push(e);
                }
            }
            Ok(Ok(None)) => panic!("the watch of job `{job_id}` ended; events: {events:#?}"),
            Ok(Err(e)) => panic!("the watch of job `{job_id}` failed: {e}; events: {events:#?}"),
            Err(_) => panic!(
                "timed out after {timeout:?} reading events of job `{job_id}`; seen: {events:#?}"
            ),
        }
    }
}

/// Every event of a finished job (until its terminal state event).
pub async fn events_to_end(mesh: &Mesh, job_id: &str) -> Vec<JobEvent> {
    events_until(mesh, job_id, Duration::from_secs(20), |evs| {
        evs.iter()
            .any(|e| is_terminal(JobState::try_from(e.state).unwrap_or(JobState::Unspecified)))
    })
    .await
}
