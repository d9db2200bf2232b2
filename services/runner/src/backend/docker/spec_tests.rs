use std::collections::BTreeMap;
use std::path::PathBuf;

use super::*;
use crate::domain::{JobId, ResourceLimits};
use crate::inventory::fake_gpus;
use crate::logs::OutputSink;

fn request() -> LaunchRequest {
    LaunchRequest {
        key: AttemptKey {
            job_id: JobId::new(),
            attempt: 2,
        },
        owner: "alice".into(),
        correlation_id: "cid-7".into(),
        command: vec!["python".into(), "train.py".into(), "--lr=$HOME; rm".into()],
        image: "pytorch/pytorch".into(),
        env: BTreeMap::from([("A".to_owned(), "1".to_owned())]),
        working_dir: None,
        gpu_indexes: vec![],
        resources: ResourceLimits::default(),
        attempt_dir: PathBuf::from("/work/runner/j/2"),
        metrics_file: PathBuf::from("/work/runner/j/2/metrics.jsonl"),
        output: OutputSink::closed(),
        details: Default::default(),
    }
}

fn env_of(spec: &ContainerSpec) -> BTreeMap<String, String> {
    spec.body
        .env
        .clone()
        .unwrap()
        .iter()
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap();
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

#[test]
fn argv_env_labels_and_name_come_from_the_request() {
    let req = request();
    let spec = build(&req, &DockerSettings::default(), &[]).unwrap();
    assert_eq!(spec.name, format!("trainmesh-{}-2", req.key.job_id));
    assert_eq!(spec.image, "pytorch/pytorch:latest");
    // argv as given, never a shell string; the image's entrypoint is
    // overridden so argv[0] is what runs.
    assert_eq!(spec.body.cmd.as_deref(), Some(&req.command[..]));
    assert_eq!(spec.body.entrypoint, Some(vec![]));
    let env = env_of(&spec);
    assert_eq!(env["A"], "1");
    assert_eq!(
        env["TRAINMESH_METRICS_FILE"],
        "/work/runner/j/2/metrics.jsonl"
    );
    assert_eq!(env["TRAINMESH_OUTPUT_DIR"], "/work/runner/j/2");
    assert_eq!(env["NVIDIA_VISIBLE_DEVICES"], "void");
    let labels = spec.body.labels.clone().unwrap();
    assert_eq!(labels[LABEL_JOB], req.key.job_id.to_string());
    assert_eq!(labels[LABEL_ATTEMPT], "2");
    assert_eq!(labels[LABEL_OWNER], "alice");
    assert_eq!(labels[LABEL_CORRELATION_ID], "cid-7");
}

#[test]
fn attempt_dir_is_mounted_at_its_own_path() {
    let spec = build(&request(), &DockerSettings::default(), &[]).unwrap();
    let mounts = spec.body.host_config.unwrap().mounts.unwrap();
    assert_eq!(mounts.len(), 1);
    assert_eq!(mounts[0].source.as_deref(), Some("/work/runner/j/2"));
    assert_eq!(mounts[0].target.as_deref(), Some("/work/runner/j/2"));
    assert_eq!(mounts[0].typ, Some(MountType::BIND));
}

#[test]
fn limits_and_shm_come_from_resources_or_the_default() {
    let settings = DockerSettings::default();
    let host = build(&request(), &settings, &[])
        .unwrap()
        .body
        .host_config
        .unwrap();
    assert_eq!(host.shm_size, Some(1024 * MIB));
    assert_eq!(host.memory, None);
    assert_eq!(host.nano_cpus, None);

    let mut req = request();
    req.resources = ResourceLimits {
        cpu: 1.5,
        memory_mib: 512,
        shm_mib: 64,
    };
    let host = build(&req, &settings, &[])
        .unwrap()
        .body
        .host_config
        .unwrap();
    assert_eq!(host.memory, Some(512 * MIB));
    assert_eq!(host.memory_swap, Some(512 * MIB));
    assert_eq!(host.nano_cpus, Some(1_500_000_000));
    assert_eq!(host.shm_size, Some(64 * MIB));
}

#[test]
fn gpus_become_an_nvidia_device_request() {
    let mut gpus = fake_gpus(4);
    gpus[3].uuid = String::new();
    let mut req = request();
    req.gpu_indexes = vec![1, 3];
    let spec = build(&req, &DockerSettings::default(), &gpus).unwrap();
    let requests = spec
        .body
        .host_config
        .clone()
        .unwrap()
        .device_requests
        .unwrap();
    assert_eq!(requests.len(), 1);
    let r = &requests[0];
    assert_eq!(r.driver.as_deref(), Some("nvidia"));
    // The UUID where the inventory has one, else the index.
    let ids = vec![gpus[1].uuid.clone(), "3".to_owned()];
    assert_eq!(r.device_ids.as_ref(), Some(&ids));
    assert_eq!(r.capabilities, Some(vec![vec!["gpu".to_owned()]]));
    assert_eq!(env_of(&spec)["NVIDIA_VISIBLE_DEVICES"], ids.join(","));

    req.gpu_indexes = vec![7];
    assert!(matches!(
        build(&req, &DockerSettings::default(), &gpus),
        Err(Error::UnknownGpu { index: 7 })
    ));
}

#[test]
fn bad_requests_are_refused_naming_the_problem() {
    let mut req = request();
    req.image = " ".into();
    let Err(Error::InvalidAssignment(f)) = build(&req, &DockerSettings::default(), &[]) else {
        panic!("an empty image must be refused");
    };
    assert_eq!(f.field, "assignment.spec.image");

    let mut req = request();
    req.working_dir = Some("relative/dir".into());
    assert!(matches!(
        build(&req, &DockerSettings::default(), &[]),
        Err(Error::WorkingDir { .. })
    ));
    req.working_dir = Some("/workspace".into());
    let spec = build(&req, &DockerSettings::default(), &[]).unwrap();
    assert_eq!(spec.body.working_dir.as_deref(), Some("/workspace"));
}

#[test]
fn settings_shape_the_host_config() {
    let settings = DockerSettings {
        network: Some("host".into()),
        init: true,
        shm_size_mib: 0,
        ..DockerSettings::default()
    };
    let host = build(&request(), &settings, &[])
        .unwrap()
        .body
        .host_config
        .unwrap();
    assert_eq!(host.network_mode.as_deref(), Some("host"));
    assert_eq!(host.init, Some(true));
    assert_eq!(host.shm_size, None);
}

#[test]
fn image_references_get_an_explicit_tag() {
    assert_eq!(image_reference("busybox"), "busybox:latest");
    assert_eq!(image_reference("busybox:1.36"), "busybox:1.36");
    assert_eq!(
        image_reference("localhost:5000/team/img"),
        "localhost:5000/team/img:latest"
    );
    assert_eq!(
        image_reference("localhost:5000/team/img:v2"),
        "localhost:5000/team/img:v2"
    );
    let digest = "repo/img@sha256:0123456789abcdef";
    assert_eq!(image_reference(digest), digest);
}
