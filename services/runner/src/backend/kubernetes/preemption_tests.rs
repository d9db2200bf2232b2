//! Preempted and evicted pods: the attempt is `preempted` (retried at once,
//! without using the budget), whatever exit code the container showed.
//! Pod documents as the scheduler and the kubelet write them (testdata/),
//! and recorded API exchanges.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::List;
use serde_json::{json, Value};

use super::disruption::{self, Disruption, DisruptionKind};
use super::fake_api::{self, empty_list, fixture, ok, status, Reply};
use super::status::{job_status, pod_views, PodView, Role};
use super::test_support::*;
use super::verdict::{decide, Cause, Timeouts, Verdict};
use super::{failure, observe};
use crate::backend::Workload;
use crate::domain::Termination;

const PODS_PREEMPTED: &str = include_str!("testdata/pods-preempted-worker.json");
const PODS_EVICTED: &str = include_str!("testdata/pods-evicted.json");
const JOB_EVICTED: &str = include_str!("testdata/job-failed-evicted.json");

const TIMEOUTS: Timeouts = Timeouts {
    unschedulable: Duration::from_secs(600),
    start: Duration::from_secs(120),
};

fn doc(text: &str) -> Value {
    serde_json::from_str(text).unwrap()
}

fn views(list: &Value) -> Vec<PodView> {
    let list: List<Pod> = serde_json::from_value(list.clone()).unwrap();
    pod_views(&list.items)
}

fn verdict_of(job: &Value, pods: &[PodView]) -> Verdict {
    decide(&job_status(job), pods, &[], &HashMap::new(), TIMEOUTS).unwrap()
}

fn pod(v: Value) -> Pod {
    serde_json::from_value(v).unwrap()
}

#[test]
fn worker_preempted_by_the_scheduler_is_preempted_not_a_sigterm() {
    let pods = views(&doc(PODS_PREEMPTED));
    let worker = &pods[2];
    assert_eq!(worker.role, Role::Worker(1));
    let d = worker.disrupted.as_ref().unwrap();
    assert_eq!(
        (d.kind, d.reason.as_str(), d.since.as_deref()),
        (
            DisruptionKind::Preempted,
            "PreemptionByScheduler",
            Some("2024-05-14T09:40:51Z")
        )
    );
    assert!(pods[0].disrupted.is_none() && pods[1].disrupted.is_none());
    let v = verdict_of(&fixture("pytorchjob-failed-worker-oom.json"), &pods);
    // The worker's SIGTERM ended first; its code is kept as the end's.
    assert_eq!(v.termination, Termination::Exited(143));
    let cause = v.cause.unwrap();
    assert_eq!(
        cause,
        Cause::Preempted {
            pod: format!("{NAME}-worker-1"),
            role: Role::Worker(1),
            disruption: Disruption {
                kind: DisruptionKind::Preempted,
                reason: "PreemptionByScheduler".into(),
                message: "default-scheduler: preempting to accommodate a higher priority pod"
                    .into(),
                since: Some("2024-05-14T09:40:51Z".into()),
            },
        }
    );
    let e = failure::job_error(&cause, v.termination, "", None);
    assert_eq!(
        (e.r#type.as_str(), e.category.as_str()),
        ("Preempted", "preempted")
    );
    assert!(e.retryable);
    assert_eq!((e.exit_code, e.signal), (143, 0));
    assert!(
        e.message.contains("worker 1") && e.message.contains("-worker-1`"),
        "{}",
        e.message
    );
    assert!(e
        .message
        .contains("preempting to accommodate a higher priority pod"));
    assert!(e.hint.contains("retry budget") && e.hint.contains("priority class"));
}

#[test]
fn pod_evicted_for_node_memory_pressure_is_preempted_not_oom_killed() {
    let job = doc(JOB_EVICTED);
    assert_eq!(job_status(&job).reason, "BackoffLimitExceeded");
    let pods = views(&doc(PODS_EVICTED));
    assert_eq!(pods[0].role, Role::Master);
    let d = pods[0].disrupted.clone().unwrap();
    assert_eq!(
        (d.kind, d.reason.as_str()),
        (DisruptionKind::Evicted, "Evicted")
    );
    // The kubelet killed the container: 137, which alone reads as the OOM
    // killer and would use up the budget.
    let v = verdict_of(&job, &pods);
    assert_eq!(v.termination, Termination::Exited(137));
    let e = failure::job_error(v.cause.as_ref().unwrap(), v.termination, "Killed\n", None);
    assert_eq!(
        (e.r#type.as_str(), e.category.as_str(), e.exit_code),
        ("Evicted", "preempted", 137)
    );
    assert!(e.retryable);
    assert!(
        e.message.contains("master")
            && e.message.contains("evicted")
            && e.message.contains("The node was low on resource: memory."),
        "{}",
        e.message
    );
}

#[test]
fn pod_that_exited_1_without_disruption_is_still_user_code() {
    let pods: Vec<PodView> = views(&fixture("pods-failed-worker-oom.json"))
        .into_iter()
        .filter(|p| p.role == Role::Master)
        .collect();
    assert!(pods[0].disrupted.is_none());
    let v = verdict_of(&fixture("pytorchjob-failed-worker-oom.json"), &pods);
    let cause = v.cause.unwrap();
    assert!(
        matches!(&cause, Cause::UserCode { exit_code: 1, .. }),
        "{cause:?}"
    );
    let e = failure::job_error(&cause, v.termination, "", None);
    assert_eq!(e.category, "user-code");
}

#[test]
fn a_failure_before_the_disruption_stays_the_jobs_own() {
    let mut list = doc(PODS_PREEMPTED);
    // The master crashed ten minutes before the worker was preempted.
    list["items"][0]["status"]["containerStatuses"][0]["state"]["terminated"]["finishedAt"] =
        json!("2024-05-14T09:30:02Z");
    let v = verdict_of(&fixture("pytorchjob-failed-worker-oom.json"), &views(&list));
    assert!(
        matches!(
            v.cause,
            Some(Cause::UserCode {
                role: Role::Master,
                exit_code: 1,
                ..
            })
        ),
        "{v:?}"
    );
}

#[test]
fn deadline_outranks_and_success_ignores_a_disruption() {
    let pods = views(&doc(PODS_PREEMPTED));
    let v = verdict_of(&fixture("job-deadline-exceeded.json"), &pods);
    assert!(matches!(v.cause, Some(Cause::Deadline { .. })), "{v:?}");
    let v = verdict_of(&fixture("job-succeeded.json"), &pods);
    assert_eq!((v.termination, v.cause), (Termination::Exited(0), None));
}

#[test]
fn disruption_is_read_from_the_condition_or_the_pods_reason() {
    let failed = |reason: &str, message: &str| {
        pod(json!({"metadata": {"name": "p"},
            "status": {"phase": "Failed", "reason": reason, "message": message}}))
    };
    let shutdown = failed(
        "Terminated",
        "Pod was terminated in response to imminent node shutdown.",
    );
    assert_eq!(
        disruption::of_pod(&shutdown).map(|d| d.kind),
        Some(DisruptionKind::NodeShutdown)
    );
    // Admission rejections: the pod never ran, and would again not run.
    for (reason, message) in [
        (
            "OutOfnvidia.com/gpu",
            "Node didn't have enough resource: nvidia.com/gpu, requested: 8, used: 0, capacity: 0",
        ),
        ("NodeAffinity", "Predicate NodeAffinity failed"),
        ("", ""),
    ] {
        assert_eq!(
            disruption::of_pod(&failed(reason, message)),
            None,
            "{reason}"
        );
    }
    // A condition the platform took back does not count.
    let cleared = pod(
        json!({"metadata": {"name": "p"}, "status": {"phase": "Running",
        "conditions": [{"type": "DisruptionTarget", "status": "False",
            "reason": "PreemptionByScheduler", "lastTransitionTime": "2024-05-14T09:40:51Z"}]}}),
    );
    assert_eq!(disruption::of_pod(&cleared), None);
    // A kubelet of 1.26 and later adds the condition to its eviction: the
    // condition names who, the pod's reason what.
    let mut evicted = doc(PODS_EVICTED)["items"][0].clone();
    let msg = evicted["status"]["message"].clone();
    evicted["status"]["conditions"]
        .as_array_mut()
        .unwrap()
        .push(
            json!({"type": "DisruptionTarget", "status": "True", "lastProbeTime": null,
            "lastTransitionTime": "2024-05-14T09:58:31Z", "reason": "TerminationByKubelet",
            "message": msg}),
        );
    let d = disruption::of_pod(&pod(evicted)).unwrap();
    assert_eq!(
        (d.kind, d.reason.as_str(), d.since.as_deref()),
        (
            DisruptionKind::Evicted,
            "TerminationByKubelet",
            Some("2024-05-14T09:58:31Z")
        )
    );
    assert!(d
        .message
        .starts_with("The node was low on resource: memory."));
    assert_eq!(disruption::of_pod(&pod(json!({"metadata": {}}))), None);
}

#[test]
fn preemption_is_a_log_line_of_its_own() {
    let pods = views(&doc(PODS_PREEMPTED));
    let lines: Vec<String> = observe::of_pod(&pods[2]).iter().map(|o| o.line()).collect();
    let want = format!(
        "[trainmesh] k8s: pod Preempted pod={NAME}-worker-1 time=2024-05-14T09:40:51Z: worker 1 \
         preempted by the platform (PreemptionByScheduler): default-scheduler: preempting to \
         accommodate a higher priority pod"
    );
    assert!(lines.contains(&want), "{lines:#?}");
    let lines: Vec<String> = observe::of_pod(&views(&doc(PODS_EVICTED))[0])
        .iter()
        .map(|o| o.line())
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("k8s: pod Evicted pod=") && l.contains("evicted by the platform")),
        "{lines:#?}"
    );
}

/// `pod` as a poll before its end saw it: running.
fn still_running(pod: &mut Value) {
    pod["status"]["phase"] = json!("Running");
    pod["status"]["containerStatuses"][0]["state"] =
        json!({"running": {"startedAt": "2024-05-14T09:12:31Z"}});
}

#[tokio::test(start_paused = true)]
async fn a_preempted_pod_gone_by_the_failing_poll_still_makes_the_attempt_preempted() {
    let master = format!("{NAME}-master-0");
    let (master_pod, master_log) = (format!("{PODS}/{master}"), format!("{PODS}/{master}/log"));
    let job_path = format!("{PYTORCHJOBS}/{NAME}");
    let failed_job = fixture("pytorchjob-failed-worker-oom.json");
    let mut running_job = failed_job.clone();
    running_job["status"]["conditions"] = json!([{"type": "Running", "status": "True",
        "reason": "PyTorchJobRunning", "lastTransitionTime": "2024-05-14T09:12:40Z",
        "message": format!("PyTorchJob {NAME} is running.")}]);
    // First poll: the scheduler has marked worker 1, the kubelet is
    // stopping it. Second: the job failed, and worker 1 was deleted.
    let ended = doc(PODS_PREEMPTED);
    let mut stopping = ended.clone();
    still_running(&mut stopping["items"][0]);
    still_running(&mut stopping["items"][2]);
    let mut after = ended.clone();
    after["items"].as_array_mut().unwrap().truncate(2);
    let master_doc = ended["items"][0].clone();
    let polls = Arc::new(AtomicUsize::new(0));
    let p = polls.clone();
    let (client, _log) = fake_api::client(move |r| match (r.method.as_str(), r.path.as_str()) {
        ("POST", PYTORCHJOBS) => created(r),
        ("GET", path) if path == job_path => match p.fetch_add(1, Ordering::SeqCst) {
            0 => ok(running_job.clone()),
            _ => ok(failed_job.clone()),
        },
        ("GET", PODS) if p.load(Ordering::SeqCst) <= 1 => ok(stopping.clone()),
        ("GET", PODS) => ok(after.clone()),
        ("GET", EVENTS) => ok(empty_list("EventList")),
        ("GET", path) if path == master_log => Reply::Text(
            "2024-05-14T09:41:19Z torch.distributed.DistBackendError: NCCL communicator was \
             aborted on rank 0\n"
                .into(),
        ),
        ("GET", path) if path == master_pod => ok(master_doc.clone()),
        _ => status(404, "NotFound", "unexpected"),
    });
    let (w, launched) = launch(client, 2).await;
    let mut w = w.unwrap();
    // The master's exit, the only end still listed, is kept as the code.
    assert_eq!(w.wait().await.unwrap(), Termination::Exited(1));
    let e = w.failure().unwrap();
    assert_eq!(
        (e.r#type.as_str(), e.category.as_str(), e.exit_code),
        ("Preempted", "preempted", 1)
    );
    assert!(e.message.contains("-worker-1`"), "{}", e.message);
    drop(w);
    let text = launched.log().await;
    let said = text.matches("k8s: pod Preempted pod=").count();
    assert_eq!(said, 1, "{text}");
    assert!(text.contains("(PreemptionByScheduler)"), "{text}");
}
