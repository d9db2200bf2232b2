//! The process backend for real, through the runner binary as its shim:
//! `sh` is used here to build test workloads; the product itself never
//! builds shell strings.

mod support;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use runner::backend::process::leftovers;
use runner::backend::{Backend, LaunchRequest, ProcessBackend, Workload};
use runner::domain::{AttemptKey, JobId, ResourceLimits, Termination};
use runner::error::Error;
use runner::inventory::fake_gpus;
use runner::logs::{LogLimits, LogWriter};
use runner::procfs;
use support::read_pid_at;
use trainmesh_common::testing::wait_for;

const WAIT: Duration = Duration::from_secs(10);

struct Run {
    dir: tempfile::TempDir,
    writer: LogWriter,
    workload: Box<dyn Workload>,
}

impl Run {
    /// Waits for the end and returns how it ended and the whole log.
    async fn finish(mut self) -> (Termination, String) {
        let t = self.workload.wait().await.unwrap();
        self.writer.finished().await;
        let log = std::fs::read_to_string(self.dir.path().join("output.log")).unwrap();
        (t, log)
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

fn shim() -> PathBuf {
    env!("CARGO_BIN_EXE_runner").into()
}

fn backend(gpus: u32) -> ProcessBackend {
    ProcessBackend::new(
        None,
        &runner::config::DEFAULT_INHERITED_ENV
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>(),
        fake_gpus(gpus),
        shim(),
    )
    .unwrap()
}

fn key() -> AttemptKey {
    AttemptKey {
        job_id: JobId::new(),
        attempt: 1,
    }
}

async fn launch_with(
    backend: &ProcessBackend,
    argv: &[&str],
    gpu_indexes: Vec<i32>,
    env: BTreeMap<String, String>,
    working_dir: Option<PathBuf>,
) -> Result<Run, Error> {
    launch_limited(
        backend,
        argv,
        gpu_indexes,
        env,
        working_dir,
        Default::default(),
    )
    .await
}

async fn launch_limited(
    backend: &ProcessBackend,
    argv: &[&str],
    gpu_indexes: Vec<i32>,
    env: BTreeMap<String, String>,
    working_dir: Option<PathBuf>,
    resources: ResourceLimits,
) -> Result<Run, Error> {
    let dir = tempfile::tempdir().unwrap();
    let (sink, writer) = LogWriter::start(&dir.path().join("output.log"), LogLimits::default())
        .await
        .unwrap();
    let req = LaunchRequest {
        key: key(),
        owner: "alice".into(),
        correlation_id: "cid-test".into(),
        command: argv.iter().map(|s| s.to_string()).collect(),
        image: String::new(),
        env,
        working_dir,
        gpu_indexes,
        resources,
        attempt_dir: dir.path().to_owned(),
        metrics_file: dir.path().join("metrics.jsonl"),
        output: sink,
        details: Default::default(),
    };
    let workload = backend.launch(req).await?;
    Ok(Run {
        dir,
        writer,
        workload,
    })
}

async fn launch(argv: &[&str]) -> Run {
    launch_with(&backend(0), argv, vec![], BTreeMap::new(), None)
        .await
        .unwrap()
}

/// Alive and not a zombie (an init that does not reap would keep zombies).
fn alive(pid: i32) -> bool {
    kill(Pid::from_raw(pid), None).is_ok() && procfs::stat(pid).is_some_and(|s| s.is_live())
}

async fn read_pid(run: &Run, name: &str) -> i32 {
    read_pid_at(run.dir.path(), name).await
}

#[tokio::test]
async fn exit_code_and_output_are_captured() {
    let run = launch(&["/bin/sh", "-c", "echo hi; echo oops >&2; exit 3"]).await;
    let (t, log) = run.finish().await;
    assert_eq!(t, Termination::Exited(3));
    assert_eq!(t.exit_code(), 3);
    let lines: Vec<&str> = log.lines().collect();
    assert!(lines.contains(&"hi"), "{log}");
    assert!(lines.contains(&"oops"), "{log}");
}

#[tokio::test]
async fn killed_by_a_signal_reports_128_plus_the_signal() {
    let run = launch(&["/bin/sh", "-c", "kill -SEGV $$"]).await;
    let (t, _) = run.finish().await;
    assert_eq!(t, Termination::Signaled(11));
    assert_eq!(t.exit_code(), 139);
}

#[tokio::test]
async fn environment_carries_platform_variables_and_assigned_gpus() {
    let env = BTreeMap::from([
        ("TRAINMESH_JOB_ID".to_owned(), "job-123".to_owned()),
        ("FOO".to_owned(), "bar baz".to_owned()),
        // A spec cannot widen its GPUs.
        ("CUDA_VISIBLE_DEVICES".to_owned(), "0,1,2,3".to_owned()),
    ]);
    let script = r#"echo "job=$TRAINMESH_JOB_ID"; echo "cvd=[$CUDA_VISIBLE_DEVICES]"; echo "foo=$FOO"; echo "metrics=$TRAINMESH_METRICS_FILE"; echo "out=$TRAINMESH_OUTPUT_DIR"; echo "leak=[$CARGO_MANIFEST_DIR]"; echo "path=${PATH:+set}""#;
    let run = launch_with(
        &backend(4),
        &["/bin/sh", "-c", script],
        vec![1, 3],
        env,
        None,
    )
    .await
    .unwrap();
    let dir = run.dir.path().to_owned();
    let (t, log) = run.finish().await;
    assert!(t.success());
    assert!(log.contains("job=job-123\n"), "{log}");
    assert!(log.contains("cvd=[1,3]\n"), "{log}");
    assert!(log.contains("foo=bar baz\n"), "{log}");
    assert!(
        log.contains(&format!(
            "metrics={}\n",
            dir.join("metrics.jsonl").display()
        )),
        "{log}"
    );
    assert!(log.contains(&format!("out={}\n", dir.display())), "{log}");
    // The runner's own environment is not handed to jobs…
    assert!(log.contains("leak=[]\n"), "{log}");
    // …except what programs need, such as PATH.
    assert!(log.contains("path=set\n"), "{log}");
}

#[tokio::test]
async fn a_job_without_gpus_on_a_gpu_node_sees_none() {
    let run = launch_with(
        &backend(2),
        &[
            "/bin/sh",
            "-c",
            r#"echo "set=${CUDA_VISIBLE_DEVICES+yes} value=[$CUDA_VISIBLE_DEVICES]""#,
        ],
        vec![],
        BTreeMap::new(),
        None,
    )
    .await
    .unwrap();
    let (_, log) = run.finish().await;
    assert_eq!(log.trim(), "set=yes value=[]");
}

#[tokio::test]
async fn a_gpu_the_node_does_not_have_is_refused() {
    let err = launch_with(&backend(1), &["/bin/true"], vec![5], BTreeMap::new(), None)
        .await
        .err()
        .unwrap();
    assert!(matches!(err, Error::UnknownGpu { index: 5 }), "{err}");
}

#[tokio::test]
async fn missing_executable_is_a_setup_error() {
    let err = launch_with(
        &backend(0),
        &["/nonexistent/trainmesh-no-such-binary", "--x"],
        vec![],
        BTreeMap::new(),
        None,
    )
    .await
    .err()
    .unwrap();
    match &err {
        Error::Exec { program, source } => {
            assert_eq!(program, "/nonexistent/trainmesh-no-such-binary");
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("expected an exec error, got {other}"),
    }
    let je = err.to_job_error();
    assert_eq!(je.category, "setup");
    assert_eq!(je.r#type, "ExecError");
    assert!(je.message.contains("trainmesh-no-such-binary"));
}

#[tokio::test]
async fn working_dir_is_the_specs_or_the_runners() {
    let wd = tempfile::tempdir().unwrap();
    let wd = std::fs::canonicalize(wd.path()).unwrap();
    let run = launch_with(
        &backend(0),
        &["/bin/pwd"],
        vec![],
        BTreeMap::new(),
        Some(wd.clone()),
    )
    .await
    .unwrap();
    let (_, log) = run.finish().await;
    assert_eq!(log.trim(), wd.display().to_string());

    let (_, log) = launch(&["/bin/pwd"]).await.finish().await;
    let here = std::env::current_dir().unwrap();
    assert_eq!(log.trim(), here.display().to_string());

    let err = launch_with(
        &backend(0),
        &["/bin/pwd"],
        vec![],
        BTreeMap::new(),
        Some(wd.join("missing")),
    )
    .await
    .err()
    .unwrap();
    assert!(matches!(err, Error::WorkingDir { .. }), "{err}");
}

#[tokio::test]
async fn stop_kills_the_whole_process_group() {
    let mut run = launch(&[
        "/bin/sh",
        "-c",
        r#"sleep 1000 & echo $! > "$TRAINMESH_OUTPUT_DIR/grandchild.pid"; echo $$ > "$TRAINMESH_OUTPUT_DIR/child.pid"; wait"#,
    ])
    .await;
    let child = read_pid(&run, "child.pid").await;
    let grandchild = read_pid(&run, "grandchild.pid").await;
    assert!(alive(child) && alive(grandchild));

    let t = run.workload.stop(Duration::from_secs(5)).await.unwrap();
    assert_eq!(t, Termination::Signaled(15));
    wait_for("child and grandchild to be gone", WAIT, || async {
        (!alive(child) && !alive(grandchild)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn stop_escalates_to_sigkill_after_the_grace_period() {
    // Ignored signals stay ignored across exec: neither sh nor sleep can
    // be stopped with SIGTERM.
    let mut run = launch(&[
        "/bin/sh",
        "-c",
        r#"trap '' TERM; sleep 1000 & echo $! > "$TRAINMESH_OUTPUT_DIR/grandchild.pid"; wait"#,
    ])
    .await;
    let grandchild = read_pid(&run, "grandchild.pid").await;
    let started = std::time::Instant::now();
    let t = run.workload.stop(Duration::from_millis(300)).await.unwrap();
    assert_eq!(t, Termination::Signaled(9));
    assert!(started.elapsed() >= Duration::from_millis(300));
    wait_for("grandchild to be gone", WAIT, || async {
        (!alive(grandchild)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn background_children_do_not_outlive_the_job() {
    let run = launch(&[
        "/bin/sh",
        "-c",
        r#"sleep 1000 & echo $! > "$TRAINMESH_OUTPUT_DIR/bg.pid"; echo done"#,
    ])
    .await;
    let bg = read_pid(&run, "bg.pid").await;
    let (t, log) = run.finish().await;
    assert!(t.success());
    assert_eq!(log.trim(), "done");
    wait_for("background child to be gone", WAIT, || async {
        (!alive(bg)).then_some(())
    })
    .await;
}

/// The kernel sends a parent-death signal when the *thread* that started
/// a process exits; runtime threads come and go while the runner lives,
/// and that must not kill a job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_outlives_the_thread_that_started_it_while_the_runner_lives() {
    let handle = tokio::runtime::Handle::current();
    // The shim is forked on a thread of its own, which then ends.
    let started = tokio::task::spawn_blocking(move || {
        std::thread::spawn(move || {
            let _runtime = handle.enter();
            futures::executor::block_on(async {
                // Says when it is asked to stop, and ends well.
                let run = launch(&[
                    "/bin/sh",
                    "-c",
                    r#"trap 'echo asked to stop; exit 0' TERM; echo up; while :; do sleep 0.05; done"#,
                ])
                .await;
                // SAFETY: gettid has no preconditions.
                (run, unsafe { libc::gettid() })
            })
        })
        .join()
        .unwrap()
    });
    let (mut run, tid) = started.await.unwrap();
    // Gone from the task list only after the kernel sent the signal.
    let task = PathBuf::from(format!("/proc/self/task/{tid}"));
    wait_for("the starting thread to be gone", WAIT, || async {
        (!task.exists()).then_some(())
    })
    .await;
    // Only once the job's trap is set does its answer to SIGTERM say
    // anything.
    let log = run.file("output.log");
    wait_for("the job to start", WAIT, || async {
        std::fs::read_to_string(&log)
            .ok()
            .filter(|l| l.contains("up"))
            .map(|_| ())
    })
    .await;
    // The shim takes pending signals lowest number first: it has seen the
    // parent-death signal (SIGUSR1) before this SIGTERM (15).
    kill(Pid::from_raw(read_shim_pid(&run)), Signal::SIGTERM).unwrap();
    let t = run.workload.wait().await.unwrap();
    run.writer.finished().await;
    let log = std::fs::read_to_string(run.file("output.log")).unwrap();
    assert_eq!(t, Termination::Exited(0), "{log}");
    assert!(log.contains("asked to stop"), "{log}");
}

/// The shim's pid, from the record the backend keeps for a restart.
fn read_shim_pid(run: &Run) -> i32 {
    let text = std::fs::read(run.file(leftovers::RECORD)).expect("the process record");
    serde_json::from_slice::<leftovers::Record>(&text)
        .expect("a valid record")
        .shim_pid
}

/// Stands in for `kill -9` of the runner: the shim's parent dies without a
/// word, and the whole tree goes with it — a background grandchild that
/// started its own session included.
#[tokio::test]
async fn the_whole_tree_dies_with_the_shims_parent() {
    let dir = tempfile::tempdir().unwrap();
    let marks = dir.path().display().to_string();
    // `sh` is the stand-in runner: the shim's parent, killed below. The
    // trailing command keeps it from exec'ing the shim.
    let job = r#"setsid sleep 1000 & echo $! > "$MARKS/escaped.pid"; sleep 1000 & echo $! > "$MARKS/bg.pid"; echo $$ > "$MARKS/job.pid"; wait"#;
    let mut parent = tokio::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(r#""$0" __trainmesh-attempt-shim $$ /bin/sh -c "$1"; echo never"#)
        .arg(shim())
        .arg(job)
        .env("MARKS", &marks)
        .spawn()
        .unwrap();
    let pids = [
        read_pid_at(dir.path(), "job.pid").await,
        read_pid_at(dir.path(), "bg.pid").await,
        read_pid_at(dir.path(), "escaped.pid").await,
    ];
    assert!(pids.iter().all(|p| alive(*p)), "{pids:?}");
    parent.start_kill().unwrap();
    parent.wait().await.unwrap();
    wait_for(
        "the job, its child and its escaped child to die",
        WAIT,
        || async { pids.iter().all(|p| !alive(*p)).then_some(()) },
    )
    .await;
}

/// Touches `MiB` mebibytes and blocks until killed (no timer: it waits for
/// a signal).
const HOG: &str = "import os, signal, sys\nhog = b'x' * (int(sys.argv[1]) << 20)\nprint('holding', len(hog) >> 20, 'MiB', flush=True)\nsignal.pause()\n";

#[tokio::test]
async fn memory_over_the_limit_is_killed_as_out_of_memory() {
    let limit = ResourceLimits {
        memory_mib: 100,
        ..Default::default()
    };
    let run = launch_limited(
        &backend(0),
        &["python3", "-c", HOG, "300"],
        vec![],
        BTreeMap::new(),
        None,
        limit,
    )
    .await
    .unwrap();
    let mut run = run;
    let t = tokio::time::timeout(WAIT, run.workload.wait())
        .await
        .expect("killed within 10 s")
        .unwrap();
    assert_eq!(t, Termination::Signaled(9));
    assert_eq!(t.exit_code(), 137);
    let err = run.workload.failure().expect("an out-of-memory error");
    assert_eq!(err.category, "oom-killed");
    assert_eq!((err.exit_code, err.signal), (137, 9));
    assert!(err.message.contains("limit of 100 MiB"), "{}", err.message);
    run.writer.finished().await;
    let log = std::fs::read_to_string(run.dir.path().join("output.log")).unwrap();
    let notice = log
        .lines()
        .find(|l| l.starts_with("[trainmesh] out of memory"))
        .unwrap_or_else(|| panic!("no notice in the log:\n{log}"));
    assert!(notice.contains("limit of 100 MiB"), "{notice}");
}

#[tokio::test]
async fn memory_under_the_limit_is_left_alone() {
    let limit = ResourceLimits {
        memory_mib: 400,
        ..Default::default()
    };
    let code = "import sys\nhog = b'x' * (50 << 20)\nprint('done', flush=True)\n";
    let run = launch_limited(
        &backend(0),
        &["python3", "-c", code],
        vec![],
        BTreeMap::new(),
        None,
        limit,
    )
    .await
    .unwrap();
    let (t, log) = run.finish().await;
    assert_eq!(t, Termination::Exited(0), "{log}");
    assert!(!log.contains("[trainmesh]"), "{log}");
}
