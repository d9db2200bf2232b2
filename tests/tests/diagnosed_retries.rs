//! Retries that follow what went wrong, end to end with two process
//! runners: a job over its memory limit is killed by the runner as an
//! out-of-memory kill and runs again with 1.5× the memory; a job that hits
//! a node fault (no GPU visible) runs again on the other runner, which is
//! counted against the first; a runner with enough node faults is
//! cordoned and gets no new jobs until an admin uncordons it.

use std::time::Duration;

use trainmesh_proto::job::v1::{Job, JobSpec, JobState, Resources};
use trainmesh_proto::scheduler::v1::{
    ExplainJobRequest, ListRunnersRequest, PendingReason, RunnerInfo, RunnerState,
};
use trainmesh_tests::jobs::{events_to_end, python_job, submit, wait_job, wait_state};
use trainmesh_tests::{Gate, Mesh, MeshOptions, ADMIN_TOKEN, ALICE_TOKEN};

const WAIT: Duration = Duration::from_secs(60);

/// Two process runners with one (counted) GPU each.
async fn mesh_with_two_runners(scheduler_args: &[&str]) -> Mesh {
    let mut mesh = Mesh::start_with(
        MeshOptions {
            no_runner: true,
            ..Default::default()
        }
        .arg("scheduler-service", scheduler_args),
    )
    .await;
    for name in ["runner-a", "runner-b"] {
        mesh.start_runner(name, &["--gpus", "1"]).await;
    }
    mesh
}

/// `trainctl ARGS` as the admin against the mesh; its stdout.
async fn trainctl(mesh: &Mesh, args: &[&str]) -> String {
    let out = mesh.trainctl(ADMIN_TOKEN, args).await;
    assert!(
        out.status.success(),
        "trainctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn runners(mesh: &Mesh) -> Vec<RunnerInfo> {
    mesh.scheduler(ADMIN_TOKEN)
        .list_runners(ListRunnersRequest {})
        .await
        .expect("list runners")
        .into_inner()
        .runners
}

fn named<'a>(rs: &'a [RunnerInfo], name: &str) -> &'a RunnerInfo {
    rs.iter()
        .find(|r| r.name == name)
        .unwrap_or_else(|| panic!("no runner `{name}` in {rs:#?}"))
}

/// The runner an attempt ran on, by name.
fn runner_of(job: &Job, attempt: usize) -> String {
    job.attempts[attempt].runner_name.clone()
}

fn with_gpu(mut spec: JobSpec) -> JobSpec {
    spec.resources = Some(Resources {
        gpus: 1,
        ..Default::default()
    });
    spec
}

/// Touches 300 MiB, then holds it at the gate until the test opens it.
const HOG: &str = r#"
import os
hog = b"x" * (300 << 20)
print("holding", len(hog) >> 20, "MiB", flush=True)
open(os.environ["GATE"]).read()
print("done")
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_over_its_memory_runs_again_with_more_and_succeeds() {
    let mesh = mesh_with_two_runners(&[]).await;
    let gate = Gate::new(mesh.dir.path().join("gate"));
    let gate_path = gate.path().display().to_string();
    let mut spec = python_job("hog", HOG, &[("GATE", &gate_path)]);
    spec.resources = Some(Resources {
        memory_mib: 220,
        ..Default::default()
    });
    let job = submit(&mesh, ALICE_TOKEN, spec).await;

    // Attempt 1 holds 300 MiB at the gate, over its 220: the runner kills
    // it. Attempt 2 gets 330 MiB and waits at the gate.
    let second = wait_job(&mesh, &job.id, "attempt 2 to run", WAIT, |j| {
        j.attempts.len() == 2 && j.state == JobState::Running as i32
    })
    .await;
    let a1 = &second.attempts[0];
    assert_eq!(a1.exit_code, Some(137), "{a1:#?}");
    let err = a1.error.clone().expect("attempt 1 keeps its error");
    assert_eq!(err.category, "oom-killed", "{err:#?}");
    assert!(err.message.contains("limit of 220 MiB"), "{err:#?}");
    gate.open().await;
    let done = wait_state(&mesh, &job.id, JobState::Succeeded, WAIT).await;
    assert_eq!(done.attempts.len(), 2, "{:#?}", done.attempts);

    let events = events_to_end(&mesh, &job.id).await;
    let reason = "retrying with memory 330 MiB (1.5 × 220 MiB) after the out-of-memory killer \
                  stopped attempt 1";
    assert!(
        events.iter().any(|e| e.message.contains(reason)),
        "no event says `{reason}`: {events:#?}"
    );
    let log = trainctl(&mesh, &["logs", &job.id, "--attempt", "1"]).await;
    assert!(
        log.lines()
            .any(|l| l.starts_with("[trainmesh] out of memory") && l.contains("limit of 220 MiB")),
        "{log}"
    );
    let explained = trainctl(&mesh, &["explain", &job.id]).await;
    assert!(
        explained.contains("MORE_MEMORY: retrying with memory 330 MiB"),
        "{explained}"
    );
    mesh.stop().await;
}

/// Fails with the driver's error on the first runner it lands on (the one
/// whose work directory holds the mark), and succeeds on any other.
const FAULTS_ON_FIRST_RUNNER: &str = r#"
import os, pathlib
runner = str(pathlib.Path(os.environ["TRAINMESH_OUTPUT_DIR"]).parent.parent)
mark = pathlib.Path(os.environ["MARK"])
if not mark.exists():
    mark.write_text(runner)
if mark.read_text() == runner:
    raise RuntimeError("No CUDA GPUs are available")
print("trained on", runner)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_fault_runs_the_job_on_the_other_runner_and_marks_the_first_suspect() {
    let mesh = mesh_with_two_runners(&[]).await;
    let mark = mesh.dir.path().join("first-runner");
    let mark = mark.display().to_string();
    let spec = with_gpu(python_job(
        "node-fault",
        FAULTS_ON_FIRST_RUNNER,
        &[("MARK", &mark)],
    ));
    let job = submit(&mesh, ALICE_TOKEN, spec).await;
    let done = wait_state(&mesh, &job.id, JobState::Succeeded, WAIT).await;
    assert_eq!(done.attempts.len(), 2, "{:#?}", done.attempts);
    let (first, second) = (runner_of(&done, 0), runner_of(&done, 1));
    assert_ne!(first, second, "{:#?}", done.attempts);
    let err = done.attempts[0].error.clone().expect("attempt 1's error");
    assert_eq!(err.category, "gpu-unavailable", "{err:#?}");
    assert!(err.node_fault, "{err:#?}");

    let rs = runners(&mesh).await;
    let faulty = named(&rs, &first);
    assert_eq!(
        (faulty.node_faults, faulty.suspect),
        (1, true),
        "{faulty:#?}"
    );
    assert_eq!(faulty.state, RunnerState::Ready as i32);
    assert!(!named(&rs, &second).suspect);

    let explained = trainctl(&mesh, &["explain", &done.id]).await;
    assert!(
        explained.contains(&format!(
            "OTHER_RUNNER: retrying on another runner after a node fault on runner `{first}` \
             stopped attempt 1"
        )),
        "{explained}"
    );
    let listed = trainctl(&mesh, &["runners"]).await;
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with(&first) && l.contains("suspect: job")),
        "{listed}"
    );
    mesh.stop().await;
}

/// Fails with the driver's error on `runner-a`, succeeds elsewhere.
const FAULTS_ON_RUNNER_A: &str = r#"
import os
if "/runner-a/" in os.environ["TRAINMESH_OUTPUT_DIR"]:
    raise RuntimeError("No CUDA GPUs are available")
print("trained")
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_with_node_faults_is_cordoned_until_an_admin_uncordons_it() {
    let mut mesh = Mesh::start_with(
        MeshOptions {
            no_runner: true,
            ..Default::default()
        }
        .arg("scheduler-service", &["--cordon-after-node-faults", "2"]),
    )
    .await;
    mesh.start_runner("runner-a", &["--gpus", "1"]).await;
    let faulty: Vec<Job> = {
        let mut v = Vec::new();
        for i in 0..2 {
            let spec = with_gpu(python_job(&format!("faulty-{i}"), FAULTS_ON_RUNNER_A, &[]));
            v.push(submit(&mesh, ALICE_TOKEN, spec).await);
        }
        v
    };
    // Both fail on runner-a, the only runner: they wait to run elsewhere,
    // and the second fault cordons it.
    for j in &faulty {
        wait_job(&mesh, &j.id, "a node fault on runner-a", WAIT, |j| {
            j.state == JobState::Queued as i32 && j.attempts.len() == 1
        })
        .await;
    }
    let rs = runners(&mesh).await;
    let a = named(&rs, "runner-a");
    assert_eq!(a.state, RunnerState::Cordoned as i32, "{a:#?}");
    assert_eq!(a.node_faults, 2);
    assert!(a.cordon_reason.contains("after 2 node faults"), "{a:#?}");

    // With runner-b they run there.
    mesh.start_runner("runner-b", &["--gpus", "1"]).await;
    for j in &faulty {
        let done = wait_state(&mesh, &j.id, JobState::Succeeded, WAIT).await;
        assert_eq!(runner_of(&done, 1), "runner-b");
    }

    // Without it, a new job does not go to the cordoned runner-a.
    mesh.stop_instance("runner-b").await;
    let plain = submit(
        &mesh,
        ALICE_TOKEN,
        with_gpu(python_job("plain", "print('trained')", &[])),
    )
    .await;
    let why = trainmesh_common::testing::wait_for(
        "the job to wait for the cordoned runner",
        WAIT,
        || async {
            let x = mesh
                .scheduler(ALICE_TOKEN)
                .explain_job(ExplainJobRequest {
                    job_id: plain.id.clone(),
                })
                .await
                .ok()?
                .into_inner();
            x.causes
                .into_iter()
                .find(|c| c.reason == PendingReason::AvoidingRunners as i32)
        },
    )
    .await;
    assert!(
        why.detail.contains("runner `runner-a` is cordoned"),
        "{why:#?}"
    );
    assert!(trainctl(&mesh, &["runners"])
        .await
        .lines()
        .any(|l| l.starts_with("runner-a") && l.contains("cordoned")),);

    let out = trainctl(
        &mesh,
        &[
            "runners",
            "uncordon",
            "runner-a",
            "--note",
            "driver reinstalled",
        ],
    )
    .await;
    assert!(out.contains("uncordoned"), "{out}");
    let done = wait_state(&mesh, &plain.id, JobState::Succeeded, WAIT).await;
    assert_eq!(runner_of(&done, 0), "runner-a");
    let a = named(&runners(&mesh).await, "runner-a").clone();
    assert_eq!(
        (a.state, a.node_faults, a.suspect),
        (RunnerState::Ready as i32, 0, false),
        "{a:#?}"
    );
    mesh.stop().await;
}
