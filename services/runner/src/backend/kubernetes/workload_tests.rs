//! The workload against recorded API exchanges: polling, retries, log
//! copying, timeouts and deletion. Time is paused, so polling intervals
//! pass without sleeping.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use super::fake_api::{self, empty_list, fixture, ok, status, Reply};
use super::test_support::*;
use crate::backend::Workload;
use crate::domain::Termination;

#[tokio::test]
async fn cancel_deletes_in_the_foreground_with_the_grace_period() {
    let deleted = Arc::new(AtomicUsize::new(0));
    let d = deleted.clone();
    let (client, log) = fake_api::client(move |r| match (r.method.as_str(), r.path.as_str()) {
        ("POST", JOBS) => created(r),
        ("DELETE", _) => {
            d.fetch_add(1, Ordering::SeqCst);
            ok(fixture("job-active.json"))
        }
        ("GET", _) if d.load(Ordering::SeqCst) > 0 => status(404, "NotFound", "gone"),
        _ => status(404, "NotFound", "unexpected"),
    });
    let (w, launched) = launch(client, 0).await;
    let mut w = w.unwrap();
    let term = w.stop(Duration::from_secs(7)).await.unwrap();
    assert_eq!(term, Termination::Signaled(15));
    // A second stop or wait answers the same without calling again.
    assert_eq!(w.wait().await.unwrap(), term);
    drop(w);
    let reqs = requests(&log);
    let del = reqs.iter().find(|r| r.method == "DELETE").unwrap();
    assert_eq!(del.path, format!("{JOBS}/{NAME}"));
    assert_eq!(del.body["propagationPolicy"], "Foreground");
    assert_eq!(del.body["gracePeriodSeconds"], 7);
    assert_eq!(deleted.load(Ordering::SeqCst), 1);
    assert!(launched.log().await.contains("deleted Job"));
}

/// The pod of `pods-succeeded.json`, still running.
fn running_pod_list() -> Value {
    let mut list = fixture("pods-succeeded.json");
    let pod = &mut list["items"][0];
    pod["status"]["phase"] = json!("Running");
    pod["status"]["containerStatuses"][0]["state"] =
        json!({"running": {"startedAt": "2024-05-14T09:12:30Z"}});
    list
}

#[tokio::test(start_paused = true)]
async fn wait_follows_the_master_log_and_retries_api_errors() {
    let pod = format!("{NAME}-z9w8x");
    let polls = Arc::new(AtomicUsize::new(0));
    let p = polls.clone();
    let pod_path = format!("{PODS}/{pod}");
    let log_path = format!("{PODS}/{pod}/log");
    let (client, log) = fake_api::client(move |r| {
        let job_path = format!("{JOBS}/{NAME}");
        match (r.method.as_str(), r.path.as_str()) {
            ("POST", JOBS) => created(r),
            ("GET", path) if path == job_path => match p.fetch_add(1, Ordering::SeqCst) {
                0 => ok(fixture("job-active.json")),
                // A flaky API server must not fail a healthy job.
                1 => status(500, "InternalError", "etcdserver: request timed out"),
                2 => status(503, "ServiceUnavailable", "the server is currently unable"),
                _ => ok(fixture("job-succeeded.json")),
            },
            ("GET", PODS) if p.load(Ordering::SeqCst) <= 3 => ok(running_pod_list()),
            ("GET", PODS) => ok(fixture("pods-succeeded.json")),
            ("GET", EVENTS) => ok(empty_list("EventList")),
            ("GET", path) if path == log_path => Reply::Text(
                "2024-05-14T09:12:31.5Z loading model\n2024-05-14T09:12:31.5Z step 1 loss=2.31\n\
                 2024-05-14T10:02:10Z done\n"
                    .into(),
            ),
            ("GET", path) if path == pod_path => {
                ok(fixture("pods-succeeded.json")["items"][0].clone())
            }
            _ => status(404, "NotFound", "unexpected"),
        }
    });
    let (w, launched) = launch(client, 0).await;
    let mut w = w.unwrap();
    assert_eq!(w.wait().await.unwrap(), Termination::Exited(0));
    assert!(w.failure().is_none());
    let reqs = requests(&log);
    let follow = reqs
        .iter()
        .find(|r| r.path == format!("{PODS}/{pod}/log"))
        .unwrap();
    assert!(follow.query.contains("follow=true") && follow.query.contains("timestamps=true"));
    assert!(follow.query.contains("container=main"));
    let pods_list = reqs.iter().find(|r| r.is("GET", PODS)).unwrap();
    assert!(pods_list
        .query
        .contains("labelSelector=trainmesh.io%2Fjob%3D0190f1c2"));
    let events = reqs.iter().find(|r| r.is("GET", EVENTS)).unwrap();
    assert_eq!(events.query, "&fieldSelector=type%3DWarning");
    drop(w);
    let text = launched.log().await;
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines.contains(&"loading model") && lines.contains(&"done"),
        "{text}"
    );
    assert!(lines.contains(&"step 1 loss=2.31"));
    // The Running phase was seen on several polls but written once.
    let running = lines
        .iter()
        .filter(|l| l.contains("k8s: job Running"))
        .count();
    assert_eq!(running, 1, "{text}");
    assert!(text.contains("k8s: job Succeeded"));
    assert!(text.contains("k8s: container Completed pod=") && text.contains("exit_code=0"));
}

#[tokio::test(start_paused = true)]
async fn image_pull_backoff_past_the_timeout_fails_and_deletes_the_job() {
    let (client, log) = fake_api::client(move |r| match (r.method.as_str(), r.path.as_str()) {
        ("POST", JOBS) => created(r),
        ("GET", PODS) => ok(fixture("pods-image-pull-backoff.json")),
        ("GET", EVENTS) => ok(fixture("events-image-pull.json")),
        ("GET", _) => ok(fixture("job-active.json")),
        ("DELETE", _) => ok(fixture("job-active.json")),
        _ => status(404, "NotFound", "unexpected"),
    });
    let (w, launched) = launch(client, 0).await;
    let mut w = w.unwrap();
    let started = tokio::time::Instant::now();
    assert_eq!(w.wait().await.unwrap(), Termination::Exited(-1));
    // start_timeout is 10 s, polls every 5 s.
    assert!(started.elapsed() >= Duration::from_secs(10));
    let e = w.failure().unwrap();
    assert_eq!(e.category, "image-pull");
    assert!(e.message.contains("trainer:2.4-typo"));
    let reqs = requests(&log);
    let del = reqs.iter().find(|r| r.method == "DELETE").unwrap();
    assert_eq!(del.path, format!("{JOBS}/{NAME}"));
    drop(w);
    let text = launched.log().await;
    // Each event once, though every poll returned it.
    let pulls = text.matches("Error: ImagePullBackOff").count();
    assert_eq!(pulls, 1, "{text}");
    assert!(text.contains("k8s: container ImagePullBackOff"));
}

#[tokio::test(start_paused = true)]
async fn failed_worker_log_is_copied_and_the_oom_named() {
    let master = format!("{NAME}-master-0");
    let worker = format!("{NAME}-worker-1");
    let master_log = format!("{PODS}/{master}/log");
    let worker_log = format!("{PODS}/{worker}/log");
    let master_pod = format!("{PODS}/{master}");
    let (client, log) = fake_api::client(move |r| match (r.method.as_str(), r.path.as_str()) {
        ("POST", PYTORCHJOBS) => created(r),
        ("GET", PODS) => ok(fixture("pods-failed-worker-oom.json")),
        ("GET", EVENTS) => ok(empty_list("EventList")),
        ("GET", p) if p == master_log => {
            Reply::Text("2024-05-14T09:41:19Z RuntimeError: NCCL communicator was aborted\n".into())
        }
        ("GET", p) if p == worker_log => Reply::Text("step 812\nKilled\n".into()),
        ("GET", p) if p == master_pod => {
            ok(fixture("pods-failed-worker-oom.json")["items"][0].clone())
        }
        ("GET", _) => ok(fixture("pytorchjob-failed-worker-oom.json")),
        _ => status(404, "NotFound", "unexpected"),
    });
    let (w, launched) = launch(client, 2).await;
    let mut w = w.unwrap();
    assert_eq!(w.wait().await.unwrap(), Termination::Exited(137));
    let e = w.failure().unwrap();
    assert_eq!(
        (e.r#type.as_str(), e.category.as_str()),
        ("OOMKilled", "oom-killed")
    );
    // The pods travel as data too, for the diagnosis's control layer.
    let replicas: Vec<(&str, &str, &str, Option<i32>)> = e
        .replicas
        .iter()
        .map(|r| {
            (
                r.role.as_str(),
                r.phase.as_str(),
                r.reason.as_str(),
                r.exit_code,
            )
        })
        .collect();
    assert_eq!(
        replicas,
        [
            ("master", "Failed", "Error", Some(1)),
            ("worker", "Running", "", None),
            ("worker", "Failed", "OOMKilled", Some(137)),
        ]
    );
    assert_eq!(e.replicas[2].name, worker);
    let reqs = requests(&log);
    let fetched = reqs
        .iter()
        .find(|r| r.path.ends_with("-worker-1/log"))
        .unwrap();
    assert!(fetched.query.contains("tailLines=500") && !fetched.query.contains("follow"));
    // The healthy worker's log is not fetched.
    assert!(!reqs.iter().any(|r| r.path.ends_with("-worker-0/log")));
    drop(w);
    let text = launched.log().await;
    assert!(
        text.contains(&format!("[{NAME}-worker-1] Killed")),
        "{text}"
    );
    assert!(text.contains("NCCL communicator was aborted"));
    assert!(text.contains("OOMKilled") && text.contains("exit_code=137"));
}
