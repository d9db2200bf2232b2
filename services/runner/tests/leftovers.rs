//! A runner that starts again kills what an earlier run of it left: here,
//! processes of an attempt whose shim and runner died together, orphaned
//! (one still in the job's process group, one in a session of its own).
//! A process that is not the attempt's is left alone.

mod support;

use runner::backend::process::leftovers::{Record, RECORD};
use runner::domain::JobId;
use runner::procfs;
use support::*;
use trainmesh_common::testing::wait_for;

fn alive(pid: i32) -> bool {
    procfs::stat(pid).is_some_and(|s| s.is_live())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_runner_kills_what_its_earlier_run_left() {
    let work = tempfile::tempdir().unwrap();
    let job_id = JobId::new();
    let dir = work.path().join(job_id.to_string()).join("1");
    std::fs::create_dir_all(&dir).unwrap();

    // The job, as the shim started it: its own process group and the
    // attempt's environment. It exits at once, orphaning its children.
    let mut job = tokio::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(r#"sleep 1000 & echo $! > "$D/grouped.pid"; setsid sleep 1000 & echo $! > "$D/escaped.pid""#)
        .env("D", &dir)
        .env("TRAINMESH_JOB_ID", job_id.to_string())
        .env("TRAINMESH_ATTEMPT", "1")
        .process_group(0)
        .spawn()
        .unwrap();
    let job_pid = job.id().unwrap() as i32;
    job.wait().await.unwrap();
    let grouped = read_pid_at(&dir, "grouped.pid").await;
    let escaped = read_pid_at(&dir, "escaped.pid").await;
    // Not the attempt's, though it was started the same way.
    let mut bystander = tokio::process::Command::new("sleep")
        .arg("1000")
        .env("TRAINMESH_JOB_ID", JobId::new().to_string())
        .env("TRAINMESH_ATTEMPT", "1")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let bystander_pid = bystander.id().unwrap() as i32;
    assert!(alive(grouped) && alive(escaped) && alive(bystander_pid));

    // What the killed run recorded: its shim is long gone.
    Record {
        job_id: job_id.to_string(),
        attempt: 1,
        shim_pid: job_pid,
        shim_start: 1,
        job_pid,
        job_start: 1,
    }
    .write(&dir)
    .unwrap();

    let m = mesh().await;
    let endpoint = m.addr.to_string();
    let runner = Runner::start_in(work, |w| config(&endpoint, w));
    // The record goes once its processes are gone.
    wait_for("the leftovers to be killed", WAIT, || async {
        (!alive(grouped) && !alive(escaped) && !dir.join(RECORD).exists()).then_some(())
    })
    .await;
    assert!(
        alive(bystander_pid),
        "only the attempt's processes are killed"
    );
    runner.shutdown().await.unwrap();
    bystander.kill().await.unwrap();
}
