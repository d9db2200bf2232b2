//! The mesh of deploy/compose in containers on the real engine: every
//! service healthy, a job submitted from this machine with `trainctl` runs
//! as a sibling container of the runners and succeeds, and a failing one
//! carries its error and a diagnosis.

use trainmesh_tests::compose::{docker_out, write, Compose};
use trainmesh_tests::docker::{engine, ensure_test_image, TEST_IMAGE};

fn json(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "trainctl printed no JSON ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// `trainctl -o json submit --wait` of a job named `name` in the test
/// image with the spec lines `rest`: its output and the job it printed.
fn submit_wait(
    mesh: &Compose,
    name: &str,
    rest: &str,
) -> (std::process::Output, serde_json::Value) {
    let path = mesh.path(&format!("{name}.yaml"));
    write(
        &path,
        &format!(
            "name: {name}\nimage: {TEST_IMAGE}\nresources: {{cpu: 0.5, memory_mib: 64}}\n{rest}\n"
        ),
    );
    let out = mesh
        .trainctl()
        .args(["-o", "json", "submit", "--wait"])
        .arg(&path)
        .output()
        .unwrap();
    let job = json(&out);
    (out, job)
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_from_the_host_run_as_sibling_containers_and_failures_are_diagnosed() {
    let since = unix_now();
    let Some(mesh) = Compose::up("").await else {
        return;
    };
    let docker = engine().await.expect("engine");
    ensure_test_image(&docker).await;

    let (out, job) = submit_wait(
        &mesh,
        "compose-ok",
        r#"command: ["/bin/sh", "-c", "echo hello from a sibling; echo '{\"step\": 1, \"loss\": 0.5}' >> \"$TRAINMESH_METRICS_FILE\""]"#,
    );
    assert!(out.status.success(), "{job}");
    assert_eq!(job["state"], "JOB_STATE_SUCCEEDED", "{job}");
    let id = job["id"].as_str().unwrap().to_owned();
    // It ran in a container of its own, started by a runner through the
    // engine (the runner removes it once it succeeded; its events stay).
    let started = docker_out(&[
        "events",
        "--since",
        &since.to_string(),
        "--until",
        &(unix_now() + 1).to_string(),
        "--filter",
        &format!("label=trainmesh.job={id}"),
        "--filter",
        "event=start",
        "--format",
        "{{index .Actor.Attributes \"trainmesh.runner\"}} {{index .Actor.Attributes \"image\"}}",
    ]);
    assert_eq!(started.lines().count(), 1, "{started}");
    assert!(started.starts_with("runner-"), "{started}");
    assert!(started.ends_with(TEST_IMAGE), "{started}");
    let logs = mesh.trainctl().args(["logs", &id]).output().unwrap();
    assert!(
        String::from_utf8_lossy(&logs.stdout).contains("hello from a sibling"),
        "{}",
        String::from_utf8_lossy(&logs.stdout)
    );

    let (out, job) = submit_wait(
        &mesh,
        "compose-fail",
        r#"command: ["/bin/sh", "-c", "echo 'Traceback (most recent call last):' >&2; echo 'torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB' >&2; exit 1"]
retry_policy: {max_attempts: 1}"#,
    );
    assert!(
        !out.status.success(),
        "a failed job is a failed submit --wait"
    );
    assert_eq!(job["state"], "JOB_STATE_FAILED", "{job}");
    let text = job.to_string();
    assert!(
        text.contains("CUDA out of memory"),
        "the job's error: {job}"
    );
    let id = job["id"].as_str().unwrap().to_owned();
    let out = mesh
        .trainctl()
        .args(["-o", "json", "diagnose", &id])
        .output()
        .unwrap();
    let diagnosis = json(&out);
    assert!(out.status.success(), "{diagnosis}");
    let d = diagnosis.to_string().to_lowercase();
    assert!(d.contains("out of memory"), "{diagnosis}");
}
