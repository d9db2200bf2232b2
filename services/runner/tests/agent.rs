//! The runner against an in-test scheduler, job-service and metrics-service
//! (one tonic server on loopback implementing RunnerService,
//! JobInternalService and MetricsService) that hands out assignments and
//! records every call. Workloads are built with `sh` here; the product
//! itself never builds shell strings.

mod support;

use support::*;
use trainmesh_common::proto::job::v1::AttemptState;
use trainmesh_common::proto::runner::v1::AttemptRef;
use trainmesh_common::testing::wait_for;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_running_then_succeeded_after_shipping_logs_and_metrics() {
    let m = mesh().await;
    let endpoint = m.addr.to_string();
    let runner = Runner::start(|w| config(&endpoint, w));
    let script = r#"echo hello
echo "cid=$TRAINMESH_CORRELATION_ID gpus=[$CUDA_VISIBLE_DEVICES] attempt=$TRAINMESH_ATTEMPT"
printf '{"step":1,"loss":0.5}\nnot json\n{"step":2,"loss":0.4}\n' >> "$TRAINMESH_METRICS_FILE"
printf '{"step":3,"loss":0.3}' >> "$TRAINMESH_METRICS_FILE"
echo bye >&2"#;
    let mut a = assignment(&["/bin/sh", "-c", script]);
    a.gpu_indexes = vec![1];
    let (job_id, cid) = (a.job_id.clone(), a.correlation_id.clone());
    m.fake.assign(a);

    let last = m.fake.final_report(&job_id).await;
    let reports = m.fake.reports(&job_id);
    assert_eq!(
        states(&reports),
        [AttemptState::Running, AttemptState::Succeeded]
    );
    assert_eq!(last.exit_code, Some(0));
    assert!(last.error.is_none());
    assert_eq!(last.runner_id, "runner-1");

    let lines = m.fake.log_lines(&job_id);
    let texts: Vec<&str> = lines.iter().map(|l| l.text.as_str()).collect();
    // stdout keeps its order; stderr ("bye") is another pipe and may
    // interleave anywhere.
    let stdout: Vec<&str> = texts.iter().copied().filter(|t| *t != "bye").collect();
    assert_eq!(
        stdout,
        ["hello", format!("cid={cid} gpus=[1] attempt=1").as_str()]
    );
    assert!(texts.contains(&"bye"), "{texts:?}");
    assert_eq!(
        lines.iter().map(|l| l.number).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    assert!(lines.iter().all(|l| l.attempt == 1));
    assert_eq!(last.log_tail, texts);

    // Every valid record once, the unterminated last one included (the job
    // had exited), the invalid line skipped.
    assert_eq!(
        m.fake.metrics(&job_id),
        [
            r#"{"step":1,"loss":0.5}"#,
            r#"{"step":2,"loss":0.4}"#,
            r#"{"step":3,"loss":0.3}"#
        ]
    );

    // Logs and metrics were flushed before the final report.
    let calls = m.fake.calls();
    let final_at = index_of(
        &calls,
        |c| matches!(c, Call::Report(r, _) if r.job_id == job_id && r.state == AttemptState::Succeeded as i32),
    );
    let running_at = index_of(
        &calls,
        |c| matches!(c, Call::Report(r, _) if r.job_id == job_id && r.state == AttemptState::Running as i32),
    );
    assert!(running_at < final_at);
    for (i, c) in calls.iter().enumerate() {
        if matches!(c, Call::Logs(..) | Call::Metrics(..)) {
            assert!(i < final_at, "{c:?} came after the final report");
        }
    }
    // Every call made for the attempt carried its correlation id.
    for c in &calls {
        if let Call::Report(_, got) | Call::Logs(_, got) | Call::Metrics(_, got) = c {
            assert_eq!(got.as_deref(), Some(cid.as_str()), "{c:?}");
        }
    }

    // The registration described this node.
    let Call::Register(reg) = &calls[0] else {
        panic!("first call should register: {:?}", calls[0]);
    };
    let cap = reg.capacity.clone().unwrap();
    assert_eq!(reg.name, trainmesh_common::testing::TEST_RUNNER);
    assert_eq!(reg.backend, "process");
    assert_eq!(cap.gpus.len(), 2);
    assert_eq!(cap.cpu, 4.0);
    assert_eq!(cap.memory_mib, 8192);

    let dir = runner.work.path().join(&job_id).join("1");
    assert!(dir.join("output.log").is_file());
    assert!(dir.join("metrics.jsonl").is_file());
    assert!(dir.join("metrics.cursor").is_file());
    runner.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipping_failures_are_retried_without_renumbering() {
    let m = mesh().await;
    m.fake.with(|s| s.fail_shipping = 4);
    let endpoint = m.addr.to_string();
    let runner = Runner::start(|w| config(&endpoint, w));
    let a = assignment(&[
        "/bin/sh",
        "-c",
        r#"for i in 1 2 3 4 5; do echo "line $i"; echo "{\"step\":$i}" >> "$TRAINMESH_METRICS_FILE"; done"#,
    ]);
    let job_id = a.job_id.clone();
    m.fake.assign(a);
    let last = m.fake.final_report(&job_id).await;
    assert_eq!(last.state, AttemptState::Succeeded as i32);
    let lines = m.fake.log_lines(&job_id);
    assert_eq!(
        lines.iter().map(|l| l.number).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
    assert_eq!(lines[4].text, "line 5");
    assert_eq!(m.fake.metrics(&job_id).len(), 5);
    runner.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lines_rotated_away_while_job_service_is_down_are_skipped_with_true_numbers() {
    let m = mesh().await;
    m.fake.with(|s| s.fail_shipping = u32::MAX);
    let endpoint = m.addr.to_string();
    let runner = Runner::start(|w| {
        let mut c = config(&endpoint, w);
        // Two files of 96 KiB; `seq` writes about 1.3 MB.
        c.attempt_log = runner::logs::LogLimits {
            max_bytes: 2 * 96 * 1024,
            files: 2,
        };
        c
    });
    let a = assignment(&["seq", "1", "200000"]);
    let job_id = a.job_id.clone();
    let dir = runner.work.path().join(&job_id).join("1");
    m.fake.assign(a);
    // The fourth rotation deleted the first three segments, and with them
    // the line after the one batch the shipper could read. Later rotations
    // delete `output.log.4` in turn, so look for any suffix from 4 on.
    wait_for("a fourth rotation", WAIT, || async {
        let rotated = std::fs::read_dir(&dir).ok()?.flatten().any(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_prefix("output.log.")
                .and_then(|n| n.parse::<u32>().ok())
                .is_some_and(|n| n >= 4)
        });
        rotated.then_some(())
    })
    .await;
    m.fake.with(|s| s.fail_shipping = 0);

    let last = m.fake.final_report(&job_id).await;
    assert_eq!(last.state, AttemptState::Succeeded as i32);
    let lines = m.fake.log_lines(&job_id);
    // `seq` prints each line's own number: a renumbered line would show.
    for l in &lines {
        assert_eq!(l.text, l.number.to_string());
    }
    let numbers: Vec<i64> = lines.iter().map(|l| l.number).collect();
    assert_eq!(numbers.first(), Some(&1));
    assert_eq!(numbers.last(), Some(&200_000));
    assert!(numbers.windows(2).all(|w| w[0] < w[1]));
    // More may follow if the writer outran the shipper after the release.
    assert!(numbers.windows(2).any(|w| w[1] > w[0] + 1), "no lines lost");
    runner.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_traceback_becomes_the_structured_error() {
    let m = mesh().await;
    let endpoint = m.addr.to_string();
    let runner = Runner::start(|w| config(&endpoint, w));
    let script = r#"echo "epoch 1"
cat >&2 <<'EOF'
Traceback (most recent call last):
  File "/app/train.py", line 42, in <module>
    main()
ValueError: learning rate must be positive
EOF
exit 1"#;
    let a = assignment(&["/bin/sh", "-c", script]);
    let job_id = a.job_id.clone();
    m.fake.assign(a);
    let last = m.fake.final_report(&job_id).await;
    assert_eq!(last.state, AttemptState::Failed as i32);
    assert_eq!(last.exit_code, Some(1));
    let err = last.error.unwrap();
    assert_eq!(err.r#type, "ValueError");
    assert_eq!(err.message, "learning rate must be positive");
    assert_eq!(err.category, "user-code");
    assert!(!err.retryable);
    assert!(err.traceback.contains("line 42, in <module>"));
    assert_eq!(
        last.log_tail.last().map(String::as_str),
        Some("ValueError: learning rate must be positive")
    );
    runner.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_executable_is_reported_as_a_setup_failure() {
    let m = mesh().await;
    let endpoint = m.addr.to_string();
    let runner = Runner::start(|w| config(&endpoint, w));
    let a = assignment(&["/nonexistent/trainmesh-train"]);
    let job_id = a.job_id.clone();
    m.fake.assign(a);
    let last = m.fake.final_report(&job_id).await;
    assert_eq!(states(&m.fake.reports(&job_id)), [AttemptState::Failed]);
    let err = last.error.unwrap();
    assert_eq!(err.category, "setup");
    assert_eq!(err.r#type, "ExecError");
    assert!(
        err.message.contains("/nonexistent/trainmesh-train"),
        "{}",
        err.message
    );
    assert_eq!(last.exit_code, Some(-1));
    // The reason is in the job's log too.
    assert!(m
        .fake
        .log_lines(&job_id)
        .iter()
        .any(|l| l.text.contains("cannot execute")));
    runner.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_cancel_stops_the_attempt_and_reports_cancelled() {
    let m = mesh().await;
    let endpoint = m.addr.to_string();
    let runner = Runner::start(|w| config(&endpoint, w));
    let mut a = assignment(&["/bin/sh", "-c", "echo started; sleep 1000"]);
    a.spec.as_mut().unwrap().termination_grace = Some(prost_types::Duration {
        seconds: 5,
        nanos: 0,
    });
    let job_id = a.job_id.clone();
    let attempt_ref = AttemptRef {
        job_id: job_id.clone(),
        attempt: 1,
    };
    m.fake.assign(a);
    wait_for("the job to start", WAIT, || async {
        m.fake
            .log_lines(&job_id)
            .iter()
            .any(|l| l.text == "started")
            .then_some(())
    })
    .await;
    // The runner says it is running the attempt.
    wait_for("a heartbeat listing the attempt", WAIT, || async {
        m.fake
            .calls()
            .iter()
            .any(|c| matches!(c, Call::Heartbeat(h) if h.active.contains(&attempt_ref)))
            .then_some(())
    })
    .await;
    m.fake.with(|s| s.cancel.push(attempt_ref.clone()));
    let last = m.fake.final_report(&job_id).await;
    assert_eq!(
        states(&m.fake.reports(&job_id)),
        [AttemptState::Running, AttemptState::Cancelled]
    );
    assert_eq!(last.exit_code, Some(143));
    assert!(last.error.is_none());
    runner.shutdown().await.unwrap();
}

/// Durations as large as protobuf carries are refused by name (no timer
/// overflows, nothing runs); the largest accepted ones still let a cancel
/// stop the job, and the runner goes on working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_largest_durations_neither_crash_the_runner_nor_outlive_a_cancel() {
    let m = mesh().await;
    let endpoint = m.addr.to_string();
    let runner = Runner::start(|w| config(&endpoint, w));
    let huge = Some(prost_types::Duration {
        seconds: i64::MAX,
        nanos: 999_999_999,
    });
    let mut a = assignment(&["/bin/sh", "-c", "echo started; sleep 1000"]);
    let spec = a.spec.as_mut().unwrap();
    spec.termination_grace = huge;
    spec.deadline = huge;
    let refused = a.job_id.clone();
    m.fake.assign(a);
    let last = m.fake.final_report(&refused).await;
    assert_eq!(last.state, AttemptState::Failed as i32);
    let err = last.error.unwrap();
    assert_eq!(err.category, "setup");
    assert!(
        err.message.contains("assignment.spec.deadline"),
        "{}",
        err.message
    );
    assert!(!m
        .fake
        .log_lines(&refused)
        .iter()
        .any(|l| l.text == "started"));

    let mut a = assignment(&["/bin/sh", "-c", "echo started; sleep 1000"]);
    let spec = a.spec.as_mut().unwrap();
    spec.termination_grace = Some(trainmesh_common::time::to_duration(
        trainmesh_common::spec::limits::MAX_TERMINATION_GRACE,
    ));
    spec.deadline = Some(trainmesh_common::time::to_duration(
        trainmesh_common::spec::limits::MAX_DEADLINE,
    ));
    let job_id = a.job_id.clone();
    let attempt_ref = AttemptRef {
        job_id: job_id.clone(),
        attempt: 1,
    };
    m.fake.assign(a);
    wait_for("a heartbeat listing the attempt", WAIT, || async {
        m.fake
            .calls()
            .iter()
            .any(|c| matches!(c, Call::Heartbeat(h) if h.active.contains(&attempt_ref)))
            .then_some(())
    })
    .await;
    m.fake.with(|s| s.cancel.push(attempt_ref.clone()));
    let last = m.fake.final_report(&job_id).await;
    assert_eq!(last.state, AttemptState::Cancelled as i32);
    assert_eq!(last.exit_code, Some(143));
    runner.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_stops_the_attempt_and_reports_failed() {
    let m = mesh().await;
    let endpoint = m.addr.to_string();
    let runner = Runner::start(|w| config(&endpoint, w));
    let mut a = assignment(&["/bin/sleep", "1000"]);
    a.spec.as_mut().unwrap().deadline = Some(prost_types::Duration {
        seconds: 0,
        nanos: 300_000_000,
    });
    let job_id = a.job_id.clone();
    m.fake.assign(a);
    let last = m.fake.final_report(&job_id).await;
    assert_eq!(last.state, AttemptState::Failed as i32);
    let err = last.error.unwrap();
    assert_eq!(err.category, "deadline");
    assert_eq!(err.r#type, "DeadlineExceeded");
    assert_eq!(last.exit_code, Some(143));
    runner.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ended_attempts_directory_is_removed_after_its_keep_time() {
    let m = mesh().await;
    let endpoint = m.addr.to_string();
    let runner = Runner::start(|w| {
        let mut c = config(&endpoint, w);
        c.attempt_dir_keep = std::time::Duration::ZERO;
        c
    });
    let a = assignment(&["/bin/sh", "-c", "echo kept until shipped"]);
    let job_id = a.job_id.clone();
    let job_dir = runner.work.path().join(&job_id);
    m.fake.assign(a);
    let last = m.fake.final_report(&job_id).await;
    assert_eq!(last.state, AttemptState::Succeeded as i32);
    // Shipped, and in the final report, before the directory goes.
    assert_eq!(last.log_tail, ["kept until shipped"]);
    assert_eq!(m.fake.log_lines(&job_id).len(), 1);
    wait_for("the attempt's directory to be removed", WAIT, || async {
        (!job_dir.exists()).then_some(())
    })
    .await;
    runner.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_again_when_the_scheduler_forgot_the_runner() {
    let m = mesh().await;
    let endpoint = m.addr.to_string();
    let runner = Runner::start(|w| config(&endpoint, w));
    wait_for("the first registration", WAIT, || async {
        (m.fake.with(|s| s.registrations) >= 1).then_some(())
    })
    .await;
    m.fake.with(|s| s.forget_runner = true);
    wait_for("a second registration", WAIT, || async {
        (m.fake.with(|s| s.registrations) >= 2).then_some(())
    })
    .await;
    // Heartbeats go on under the new id.
    wait_for("a heartbeat from runner-2", WAIT, || async {
        m.fake
            .calls()
            .iter()
            .any(|c| matches!(c, Call::Heartbeat(h) if h.runner_id == "runner-2"))
            .then_some(())
    })
    .await;
    runner.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waits_for_a_scheduler_that_is_not_up_yet() {
    let addr_dir = tempfile::tempdir().unwrap();
    let addr_file = addr_dir.path().join("scheduler.addr");
    let endpoint = format!("file:{}", addr_file.display());
    let runner = Runner::start(|w| config(&endpoint, w));
    // The runner retries while nothing is there; now the mesh comes up.
    let m = mesh().await;
    trainmesh_common::client::write_addr_file(&addr_file, m.addr).unwrap();
    wait_for("a registration", WAIT, || async {
        (m.fake.with(|s| s.registrations) >= 1).then_some(())
    })
    .await;
    let a = assignment(&["/bin/true"]);
    let job_id = a.job_id.clone();
    m.fake.assign(a);
    let last = m.fake.final_report(&job_id).await;
    assert_eq!(last.state, AttemptState::Succeeded as i32);
    runner.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_before_the_scheduler_is_reachable_returns() {
    let dir = tempfile::tempdir().unwrap();
    let endpoint = format!("file:{}", dir.path().join("never.addr").display());
    let runner = Runner::start(|w| config(&endpoint, w));
    runner.shutdown().await.unwrap();
}

/// A runner running as root starts process-backend jobs as the configured
/// unprivileged user: the job cannot read what is private to the runner's
/// user (tokens, databases), and still writes its metrics and its own
/// directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_run_as_the_job_user_and_cannot_read_the_runners_files() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("not root: a runner that is not root cannot switch users; nothing to check");
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let private = tempfile::tempdir().unwrap();
    let token = private.path().join("admin.token");
    std::fs::write(&token, "tm_secret").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let m = mesh().await;
    let endpoint = m.addr.to_string();
    let runner = Runner::start(|w| {
        let mut c = config(&endpoint, w);
        c.allow_root_jobs = false;
        c.job_user = Some(runner::config::JobUser {
            uid: 65534,
            gid: 65534,
        });
        c
    });
    let script = format!(
        "id -u; if cat {} 2>/dev/null; then echo LEAKED; else echo denied; fi; \
         echo '{{\"step\": 1, \"loss\": 0.5}}' >> \"$TRAINMESH_METRICS_FILE\"; \
         echo scratch > ./scratch && echo wrote-cwd",
        token.display()
    );
    let a = assignment(&["/bin/sh", "-c", &script]);
    let job_id = a.job_id.clone();
    m.fake.assign(a);
    let last = m.fake.final_report(&job_id).await;
    let lines: Vec<String> = m
        .fake
        .log_lines(&job_id)
        .into_iter()
        .map(|l| l.text)
        .collect();
    assert_eq!(last.state, AttemptState::Succeeded as i32, "{lines:?}");
    assert!(lines.iter().any(|l| l == "65534"), "{lines:?}");
    assert!(lines.iter().any(|l| l == "denied"), "{lines:?}");
    assert!(!lines
        .iter()
        .any(|l| l.contains("LEAKED") || l.contains("tm_secret")));
    assert!(lines.iter().any(|l| l == "wrote-cwd"), "{lines:?}");
    wait_for("the job's metrics", WAIT, || async {
        (!m.fake.metrics(&job_id).is_empty()).then_some(())
    })
    .await;
    runner.shutdown().await.unwrap();
}

/// A secret variable's value comes from the runner's secrets directory;
/// a secret the runner does not hold fails the attempt as a setup error
/// naming it, before anything runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_variables_are_read_on_the_runner_and_a_missing_one_is_named() {
    let secrets = tempfile::tempdir().unwrap();
    std::fs::write(secrets.path().join("wandb.key"), "s3cr3t-value\n").unwrap();
    let m = mesh().await;
    let endpoint = m.addr.to_string();
    let dir = secrets.path().to_path_buf();
    let runner = Runner::start(move |w| {
        let mut c = config(&endpoint, w);
        c.secrets_dir = Some(dir);
        c
    });
    let mut a = assignment(&[
        "/bin/sh",
        "-c",
        r#"if [ "$WANDB_API_KEY" = "s3cr3t-value" ]; then echo match; else echo mismatch; fi; echo "key=$WANDB_API_KEY""#,
    ]);
    a.spec
        .as_mut()
        .unwrap()
        .secret_env
        .insert("WANDB_API_KEY".into(), "wandb.key".into());
    let job_id = a.job_id.clone();
    m.fake.assign(a);
    let last = m.fake.final_report(&job_id).await;
    assert_eq!(last.state, AttemptState::Succeeded as i32);
    let lines: Vec<String> = m
        .fake
        .log_lines(&job_id)
        .into_iter()
        .map(|l| l.text)
        .collect();
    assert!(lines.iter().any(|l| l == "match"), "{lines:?}");
    // What the job prints of its secret is redacted in its log.
    assert!(
        lines.iter().any(|l| l == "key=[secret wandb.key]"),
        "{lines:?}"
    );
    assert!(
        !lines.iter().any(|l| l.contains("s3cr3t-value")),
        "{lines:?}"
    );

    let mut a = assignment(&["/bin/sh", "-c", "echo started"]);
    a.spec
        .as_mut()
        .unwrap()
        .secret_env
        .insert("HF_TOKEN".into(), "huggingface".into());
    let missing = a.job_id.clone();
    m.fake.assign(a);
    let last = m.fake.final_report(&missing).await;
    assert_eq!(last.state, AttemptState::Failed as i32);
    let err = last.error.unwrap();
    assert_eq!(err.category, "setup");
    assert!(
        err.message.contains("`huggingface`") && err.message.contains("HF_TOKEN"),
        "{}",
        err.message
    );
    assert!(!m
        .fake
        .log_lines(&missing)
        .iter()
        .any(|l| l.text == "started"));
    runner.shutdown().await.unwrap();
}
