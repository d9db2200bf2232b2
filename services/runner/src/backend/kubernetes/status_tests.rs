//! Status mapping on documents shaped as the API returns them
//! (tests/fixtures/k8s/).

use std::collections::HashMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Event, Pod};
use k8s_openapi::List;
use serde_json::Value;

use super::failure;
use super::observe;
use super::status::{job_status, pod_views, ContainerNow, Phase, PodView, Role};
use super::verdict::{decide, stuck, Cause, Timeouts, Verdict};
use crate::domain::Termination;

const NAME: &str = "tm-0190f1c2-7a3b-7c4d-8e5f-123456789abc-1";

fn fixture(name: &str) -> String {
    let path = format!("{}/tests/fixtures/k8s/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn job(name: &str) -> Value {
    serde_json::from_str(&fixture(name)).unwrap()
}

fn pods(name: &str) -> Vec<PodView> {
    let list: List<Pod> = serde_json::from_str(&fixture(name)).unwrap();
    pod_views(&list.items)
}

fn events(name: &str) -> Vec<Event> {
    let list: List<Event> = serde_json::from_str(&fixture(name)).unwrap();
    list.items
}

const TIMEOUTS: Timeouts = Timeouts {
    unschedulable: Duration::from_secs(600),
    start: Duration::from_secs(120),
};

fn no_ages() -> HashMap<String, Duration> {
    HashMap::new()
}

#[test]
fn failed_worker_oomkilled_is_the_cause_with_its_exit_code() {
    let status = job_status(&job("pytorchjob-failed-worker-oom.json"));
    assert_eq!(status.phase, Phase::Failed);
    assert_eq!(status.reason, "PyTorchJobFailed");
    let pods = pods("pods-failed-worker-oom.json");
    assert_eq!(
        pods.iter().map(|p| p.role).collect::<Vec<_>>(),
        [Role::Master, Role::Worker(0), Role::Worker(1)]
    );
    let v = decide(&status, &pods, &[], &no_ages(), TIMEOUTS).unwrap();
    // The worker was killed at 09:40:58, the master failed after it
    // (09:41:20, exit 1, its peer gone): the worker is the cause.
    assert_eq!(v.termination, Termination::Exited(137));
    assert!(!v.delete);
    let cause = v.cause.unwrap();
    assert_eq!(
        cause,
        Cause::OomKilled {
            pod: format!("{NAME}-worker-1"),
            role: Role::Worker(1),
            container: "pytorch".into(),
            exit_code: 137,
        }
    );
    let e = failure::job_error(&cause, v.termination, "", None);
    assert_eq!(e.r#type, "OOMKilled");
    assert_eq!(e.category, "oom-killed");
    assert_eq!(e.exit_code, 137);
    assert!(e.retryable);
    assert!(
        e.message.contains("worker 1") && e.message.contains("-worker-1`"),
        "{}",
        e.message
    );
}

#[test]
fn master_failure_is_user_code_with_the_traceback_of_its_log() {
    let status = job_status(&job("pytorchjob-failed-worker-oom.json"));
    // Only the master failed.
    let pods: Vec<PodView> = pods("pods-failed-worker-oom.json")
        .into_iter()
        .filter(|p| p.role == Role::Master)
        .collect();
    let v = decide(&status, &pods, &[], &no_ages(), TIMEOUTS).unwrap();
    assert_eq!(v.termination, Termination::Exited(1));
    let cause = v.cause.unwrap();
    assert!(matches!(
        &cause,
        Cause::UserCode {
            role: Role::Master,
            exit_code: 1,
            ..
        }
    ));
    let log = "step 10\nTraceback (most recent call last):\n  File \"train.py\", line 3, in <module>\n    import flash_attn\nModuleNotFoundError: No module named 'flash_attn'\n";
    let e = failure::job_error(&cause, v.termination, log, None);
    assert_eq!(e.category, "user-code");
    assert_eq!(e.r#type, "ModuleNotFoundError");
    assert!(e.message.contains("No module named") && e.message.contains("master"));
    assert_eq!(e.exit_code, 1);
    assert!(e.traceback.contains("import flash_attn"));
}

#[test]
fn unschedulable_for_gpus_fails_only_after_the_timeout() {
    let status = job_status(&job("job-active.json"));
    assert_eq!(status.phase, Phase::Running);
    let pods = pods("pods-unschedulable-gpu.json");
    assert_eq!(pods[0].role, Role::Master);
    let msg = pods[0].unschedulable.clone().unwrap();
    assert!(msg.starts_with("0/4 nodes are available: 4 Insufficient nvidia.com/gpu."));
    let evs = events("events-unschedulable.json");
    let warnings = observe::warnings(&evs, NAME);
    let s = stuck(&pods, &warnings);
    assert_eq!(s.len(), 1);
    let mut ages = HashMap::from([(s[0].key.clone(), Duration::from_secs(599))]);
    assert_eq!(decide(&status, &pods, &warnings, &ages, TIMEOUTS), None);
    ages.insert(s[0].key.clone(), Duration::from_secs(600));
    let v = decide(&status, &pods, &warnings, &ages, TIMEOUTS).unwrap();
    assert_eq!(v.termination, Termination::Exited(-1));
    assert!(v.delete, "Kubernetes would keep it pending forever");
    let e = failure::job_error(v.cause.as_ref().unwrap(), v.termination, "", None);
    assert_eq!(e.r#type, "Unschedulable");
    assert_eq!(e.category, "unschedulable");
    assert!(e.retryable);
    assert!(e.message.contains("for 600s") && e.message.contains("Insufficient nvidia.com/gpu"));
}

#[test]
fn image_pull_backoff_names_the_image_and_the_kubelets_message() {
    let status = job_status(&job("job-active.json"));
    let pods = pods("pods-image-pull-backoff.json");
    let evs = events("events-image-pull.json");
    let warnings = observe::warnings(&evs, NAME);
    // Normal events and the other job's are not ours.
    assert_eq!(warnings.len(), 3);
    let s = stuck(&pods, &warnings);
    let ages = HashMap::from([(s[0].key.clone(), Duration::from_secs(120))]);
    let v: Verdict = decide(&status, &pods, &warnings, &ages, TIMEOUTS).unwrap();
    assert!(v.delete);
    let e = failure::job_error(v.cause.as_ref().unwrap(), v.termination, "", None);
    assert_eq!(e.r#type, "ImagePullBackOff");
    assert_eq!(e.category, "image-pull");
    assert!(!e.retryable);
    assert!(
        e.message
            .contains("`registry.example.com/llm/trainer:2.4-typo`"),
        "{}",
        e.message
    );
    assert!(e.message.contains("code = NotFound"), "{}", e.message);
    assert_eq!(e.exit_code, -1);
    // Before the timeout, it waits: the pull may still succeed.
    let young = HashMap::from([(s[0].key.clone(), Duration::from_secs(5))]);
    assert_eq!(decide(&status, &pods, &warnings, &young, TIMEOUTS), None);
}

#[test]
fn restarting_pytorchjob_is_not_an_end_but_its_worker_is_abnormal() {
    let status = job_status(&job("pytorchjob-restarting.json"));
    assert_eq!(status.phase, Phase::Restarting);
    assert!(!status.phase.is_terminal());
    let pods = pods("pods-restarting.json");
    // Sorted master first whatever the API's order.
    assert_eq!(pods[0].role, Role::Master);
    let worker = &pods[1];
    assert!(worker.abnormal() && !pods[0].abnormal());
    let main = worker.main().unwrap();
    assert_eq!(main.restart_count, 1);
    assert_eq!(main.last.as_ref().map(|t| t.exit_code), Some(1));
    assert_eq!(decide(&status, &pods, &[], &no_ages(), TIMEOUTS), None);
    let lines: Vec<String> = observe::of_pod(worker).iter().map(|o| o.line()).collect();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("Restarted after Error") && l.contains("exit_code=1")),
        "{lines:?}"
    );
}

#[test]
fn several_true_conditions_resolve_by_precedence() {
    let failed = job_status(&job("pytorchjob-conditions-precedence.json"));
    assert_eq!(failed.phase, Phase::Failed);
    assert_eq!(failed.reason, "PyTorchJobFailed");
    let suspended = job_status(&job("pytorchjob-suspended-and-running.json"));
    assert_eq!(suspended.phase, Phase::Suspended);
    let restarting = job_status(&job("pytorchjob-restarting.json"));
    assert_eq!(restarting.phase, Phase::Restarting);
    // Running=False does not count.
    assert_eq!(restarting.reason, "PyTorchJobRestarting");
}

#[test]
fn succeeded_job_ends_with_exit_zero_and_no_error() {
    let status = job_status(&job("job-succeeded.json"));
    assert_eq!(status.phase, Phase::Succeeded);
    assert_eq!(status.reason, "CompletionsReached");
    let pods = pods("pods-succeeded.json");
    assert!(matches!(
        pods[0].main().map(|c| &c.now),
        Some(ContainerNow::Terminated(t)) if t.reason == "Completed" && t.exit_code == 0
    ));
    let v = decide(&status, &pods, &[], &no_ages(), TIMEOUTS).unwrap();
    assert_eq!(v.termination, Termination::Exited(0));
    assert_eq!(v.cause, None);
}

#[test]
fn deadline_exceeded_job_is_a_deadline_error() {
    let status = job_status(&job("job-deadline-exceeded.json"));
    assert_eq!(status.phase, Phase::Failed);
    let v = decide(&status, &[], &[], &no_ages(), TIMEOUTS).unwrap();
    let e = failure::job_error(
        v.cause.as_ref().unwrap(),
        v.termination,
        "",
        Some(Duration::from_secs(86400)),
    );
    assert_eq!(e.category, "deadline");
    assert!(e.message.contains("active longer than specified deadline"));
}

#[test]
fn observations_render_as_trainmesh_lines_and_dedupe_on_content() {
    let evs = events("events-image-pull.json");
    let warnings = observe::warnings(&evs, NAME);
    let first = observe::of_event(warnings[0]);
    assert_eq!(first.kind, "event");
    assert_eq!(first.reason, "Failed");
    assert_eq!(first.pod.as_deref(), Some(&*format!("{NAME}-q7v4d")));
    assert_eq!(first.time.as_deref(), Some("2024-05-14T09:13:41Z"));
    assert!(first
        .line()
        .starts_with("[trainmesh] k8s: event Failed pod="));
    let mut later = first.clone();
    later.time = Some("2024-05-14T09:20:00Z".into());
    assert_eq!(first.key(), later.key());
    let json = serde_json::to_value(&first).unwrap();
    assert_eq!(json["reason"], "Failed");
    let sched = events("events-unschedulable.json");
    let o = observe::of_event(&sched[0]);
    // Scheduler events carry eventTime and a series, not lastTimestamp.
    assert_eq!(o.time.as_deref(), Some("2024-05-14T09:17:03.512204Z"));
    let pods = pods("pods-image-pull-backoff.json");
    let lines: Vec<String> = observe::of_pod(&pods[0]).iter().map(|o| o.line()).collect();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("container ImagePullBackOff")),
        "{lines:?}"
    );
}

#[test]
fn malformed_documents_do_not_panic() {
    for v in [
        serde_json::json!({}),
        serde_json::json!({"status": {"conditions": "nope"}}),
        serde_json::json!({"status": {"conditions": [{"type": 3, "status": true}, null]}}),
    ] {
        assert_eq!(job_status(&v).phase, Phase::Created);
    }
    let bare: Pod = serde_json::from_str(r#"{"metadata":{}}"#).unwrap();
    let views = pod_views(&[bare]);
    assert_eq!(views[0].phase, "Unknown");
    assert!(!views[0].started() && !views[0].abnormal());
    assert!(observe::of_pod(&views[0]).len() == 1);
}
