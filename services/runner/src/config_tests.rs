use super::*;
use crate::backend::kubernetes::GpuProduct;
use clap::Parser;

#[test]
fn gpu_setting_parses() {
    assert_eq!("auto".parse::<GpuSetting>(), Ok(GpuSetting::Detect));
    assert_eq!("none".parse::<GpuSetting>(), Ok(GpuSetting::Count(0)));
    assert_eq!("2".parse::<GpuSetting>(), Ok(GpuSetting::Count(2)));
    assert!("-1".parse::<GpuSetting>().is_err());
}

#[test]
fn every_backend_parses_and_others_are_named() {
    assert_eq!("process".parse::<BackendKind>(), Ok(BackendKind::Process));
    assert_eq!("docker".parse::<BackendKind>(), Ok(BackendKind::Docker));
    assert_eq!(
        "kubernetes".parse::<BackendKind>(),
        Ok(BackendKind::Kubernetes)
    );
    let e = "slurm".parse::<BackendKind>().unwrap_err();
    assert!(
        e.contains("`slurm`") && e.contains("docker or kubernetes"),
        "{e}"
    );
}

#[test]
fn docker_flags_become_settings() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("service.token");
    std::fs::write(&token, "tok\n").unwrap();
    let base = [
        "runner",
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--service-token-file",
        token.to_str().unwrap(),
        "--backend",
        "docker",
    ];
    let c = Args::try_parse_from(base).unwrap().into_config().unwrap();
    assert_eq!(c.backend, BackendKind::Docker);
    assert_eq!(c.docker, DockerSettings::default());
    assert_eq!(c.docker.shm_size_mib, 1024);
    assert_eq!(c.docker.keep_failed, Duration::from_secs(3600));
    assert_eq!(c.docker.keep_succeeded, Duration::ZERO);

    let mut argv = base.to_vec();
    argv.extend([
        "--docker-host",
        "unix:///run/other.sock",
        "--docker-shm-size-mib",
        "2048",
        "--docker-pull-policy",
        "never",
        "--docker-keep-failed-secs",
        "60",
        "--docker-network",
        "host",
        "--docker-init",
    ]);
    let c = Args::try_parse_from(argv).unwrap().into_config().unwrap();
    assert_eq!(c.docker.host.as_deref(), Some("unix:///run/other.sock"));
    assert_eq!(c.docker.shm_size_mib, 2048);
    assert_eq!(c.docker.pull_policy, PullPolicy::Never);
    assert_eq!(c.docker.keep_failed, Duration::from_secs(60));
    assert_eq!(c.docker.network.as_deref(), Some("host"));
    assert!(c.docker.init);
    assert!("sometimes".parse::<PullPolicy>().is_err());
}

#[test]
fn flags_become_config() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("service.token");
    std::fs::write(&token, "tok\n").unwrap();
    let args = Args::try_parse_from([
        "runner",
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--service-token-file",
        token.to_str().unwrap(),
        "--scheduler-endpoint",
        "file:/tmp/sched.addr",
        "--gpus",
        "none",
        "--max-concurrent",
        "2",
        "--label",
        "zone=a,pool=b",
        "--log-ship-interval-ms",
        "50",
        "--allow-root-jobs",
    ])
    .unwrap();
    let c = args.into_config().unwrap();
    assert_eq!(c.token, "tok");
    assert_eq!(c.scheduler_endpoint, "file:/tmp/sched.addr");
    assert_eq!(c.job_endpoint, "127.0.0.1:50051");
    assert_eq!(c.metrics_endpoint, "127.0.0.1:50053");
    assert_eq!(c.work_dir, dir.path().join("runner"));
    assert_eq!(c.gpus, GpuSetting::Count(0));
    assert_eq!(c.max_concurrent, 2);
    assert_eq!(c.labels.get("pool").map(String::as_str), Some("b"));
    assert_eq!(c.log_ship_interval, Duration::from_millis(50));
    assert_eq!(c.metrics_flush_interval, Duration::from_millis(500));
    assert!(!c.name.is_empty());
    // No health server unless asked for.
    assert_eq!(c.health_listen, None);
}

/// The config from the runner's flags: a service token in a fresh data
/// dir, no GPUs, and `extra`.
fn config_with(extra: &[&str]) -> Config {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("service.token");
    std::fs::write(&token, "tok\n").unwrap();
    let data_dir = dir.path().display().to_string();
    let token = token.display().to_string();
    let mut argv = vec![
        "runner",
        "--data-dir",
        &data_dir,
        "--service-token-file",
        &token,
        "--gpus",
        "none",
        "--allow-root-jobs",
    ];
    argv.extend_from_slice(extra);
    Args::try_parse_from(argv).unwrap().into_config().unwrap()
}

#[test]
fn health_listen_flag_sets_the_address() {
    let c = config_with(&["--health-listen", "0.0.0.0:50055"]);
    assert_eq!(c.health_listen.as_deref(), Some("0.0.0.0:50055"));
}

#[test]
fn zero_concurrency_is_refused() {
    let mut c = Config::new("n", "a", "b", "c", "t", "/tmp");
    c.max_concurrent = 0;
    assert!(c.validate().is_err());
}

#[test]
fn kubernetes_flags_become_config() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("service.token");
    std::fs::write(&token, "tok").unwrap();
    let args = Args::try_parse_from([
        "runner",
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--service-token-file",
        token.to_str().unwrap(),
        "--backend",
        "kubernetes",
        "--k8s-namespace",
        "training",
        "--k8s-service-account",
        "trainer",
        "--k8s-image-pull-secret",
        "regcred",
        "--k8s-image-pull-secret",
        "mirror,other",
        "--k8s-unschedulable-timeout-secs",
        "60",
    ])
    .unwrap();
    let c = args.into_config().unwrap();
    assert_eq!(c.backend, BackendKind::Kubernetes);
    let k = &c.kubernetes;
    assert_eq!(k.namespace.as_deref(), Some("training"));
    assert_eq!(k.service_account.as_deref(), Some("trainer"));
    assert_eq!(k.image_pull_secrets, ["regcred", "mirror", "other"]);
    assert_eq!(k.unschedulable_timeout, Duration::from_secs(60));
    assert_eq!(k.poll_interval, Duration::from_secs(5));
}

#[test]
fn attempt_log_flags_set_the_cap_and_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("service.token");
    std::fs::write(&token, "tok").unwrap();
    let parse = |extra: &[&str]| {
        let mut argv = vec![
            "runner",
            "--data-dir",
            dir.path().to_str().unwrap(),
            "--service-token-file",
            token.to_str().unwrap(),
            "--allow-root-jobs",
        ];
        argv.extend(extra);
        Args::try_parse_from(argv).unwrap().into_config()
    };
    let c = parse(&[]).unwrap();
    assert_eq!(c.attempt_log, LogLimits::default());
    assert_eq!(c.attempt_log.segment_bytes(), 64 * 1024 * 1024);

    let c = parse(&["--attempt-log-max-mib", "10", "--attempt-log-files", "5"]).unwrap();
    assert_eq!(c.attempt_log.max_bytes, 10 * 1024 * 1024);
    assert_eq!(c.attempt_log.segment_bytes(), 2 * 1024 * 1024);

    let refused: [&[&str]; 3] = [
        &["--attempt-log-max-mib", "0"],
        &["--attempt-log-files", "0"],
        // 64 KiB files cannot hold a longest line and its newline.
        &["--attempt-log-max-mib", "1", "--attempt-log-files", "16"],
    ];
    for extra in refused {
        assert!(parse(extra).is_err(), "{extra:?} accepted");
    }
}

/// `runner --backend kubernetes` plus `extra`, made into a config.
fn kubernetes_config(extra: &[&str]) -> anyhow::Result<Config> {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("service.token");
    std::fs::write(&token, "tok").unwrap();
    let mut argv = vec![
        "runner",
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--service-token-file",
        token.to_str().unwrap(),
        "--backend",
        "kubernetes",
    ];
    argv.extend(extra);
    Args::try_parse_from(argv)?.into_config()
}

fn product(product: &str, count: u32) -> GpuProduct {
    GpuProduct {
        product: product.into(),
        count,
    }
}

#[test]
fn k8s_gpus_declare_products_in_order() {
    let c = kubernetes_config(&[
        "--k8s-gpus",
        "NVIDIA-H100-80GB-HBM3=16",
        "--k8s-gpus",
        " NVIDIA-A100-SXM4-40GB = 8 ,Tesla-T4=2,",
    ])
    .unwrap();
    assert_eq!(
        c.kubernetes.gpus,
        [
            product("NVIDIA-H100-80GB-HBM3", 16),
            product("NVIDIA-A100-SXM4-40GB", 8),
            product("Tesla-T4", 2),
        ]
    );
    assert_eq!(c.kubernetes.gpu_product_label, "nvidia.com/gpu.product");
    // Not consulted: the products are what is registered.
    assert_eq!(c.gpus, GpuSetting::Detect);

    let c = kubernetes_config(&[
        "--k8s-gpus",
        "NVIDIA-H100-80GB-HBM3=1",
        "--k8s-gpu-product-label",
        "gpu.example.com/product",
    ])
    .unwrap();
    assert_eq!(c.kubernetes.gpu_product_label, "gpu.example.com/product");
}

#[test]
fn gpus_n_still_declares_an_untyped_cluster() {
    let c = kubernetes_config(&["--gpus", "16"]).unwrap();
    assert_eq!(c.gpus, GpuSetting::Count(16));
    assert!(c.kubernetes.gpus.is_empty());
}

#[test]
fn bad_k8s_gpus_are_refused_with_the_reason() {
    let cases: [(&[&str], &str); 9] = [
        (
            &["--k8s-gpus", "NVIDIA-H100-80GB-HBM3"],
            "expected PRODUCT=COUNT",
        ),
        (&["--k8s-gpus", "=4"], "must not be empty"),
        (&["--k8s-gpus", "H100=0"], "at least 1"),
        (&["--k8s-gpus", "H100=two"], "whole number"),
        (&["--k8s-gpus", "H100=-1"], "whole number"),
        (&["--k8s-gpus", "NVIDIA H100=4"], "not a label value"),
        (
            &["--k8s-gpus", "H100=4,A100=2,H100=4"],
            "names `H100` twice",
        ),
        (&["--k8s-gpus", "H100=65536,A100=1"], "65537 GPUs"),
        (
            &[
                "--k8s-gpus",
                "H100=1",
                "--k8s-gpu-product-label",
                "gpu product",
            ],
            "not a label key",
        ),
    ];
    for (extra, reason) in cases {
        let e = kubernetes_config(extra).unwrap_err().to_string();
        assert!(e.contains(reason), "{extra:?}: {e}");
        assert!(
            e.contains("--k8s-gpu"),
            "{extra:?} does not name the flag: {e}"
        );
    }
}

#[test]
fn gpus_and_k8s_gpus_together_are_refused() {
    let e = kubernetes_config(&["--gpus", "8", "--k8s-gpus", "H100=8"])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("`--gpus` and `--k8s-gpus` cannot be used together"),
        "{e}"
    );
}

#[test]
fn k8s_gpus_need_the_kubernetes_backend() {
    let mut c = Config::new("n", "a", "b", "c", "t", "/tmp");
    c.allow_root_jobs = true;
    c.kubernetes.gpus = vec![product("H100", 8)];
    let e = c.validate().unwrap_err().to_string();
    assert!(e.contains("`--backend kubernetes`"), "{e}");
    c.backend = BackendKind::Kubernetes;
    c.validate().unwrap();
}

#[test]
fn the_job_user_is_parsed_and_root_jobs_must_be_allowed() {
    let c = config_with(&["--job-user", "65534:65534"]);
    assert_eq!(
        c.job_user,
        Some(JobUser {
            uid: 65534,
            gid: 65534
        })
    );
    let mut c = Config::new("n", "a", "b", "c", "t", "/tmp/trainmesh-runner-test");
    c.allow_root_jobs = false;
    c.job_user = Some(JobUser { uid: 0, gid: 0 });
    let e = c.validate().unwrap_err().to_string();
    assert!(e.contains("--allow-root-jobs"), "{e}");
    c.allow_root_jobs = true;
    c.validate().unwrap();
}
