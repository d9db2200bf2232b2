use super::*;

fn base() -> pb::JobSpec {
    pb::JobSpec {
        image: "python:3.12".into(),
        command: vec!["python".into(), "train.py".into()],
        ..Default::default()
    }
}

fn field_of(spec: pb::JobSpec) -> String {
    validate(spec).unwrap_err().field
}

fn secs(seconds: i64, nanos: i32) -> Option<prost_types::Duration> {
    Some(prost_types::Duration { seconds, nanos })
}

#[test]
fn a_minimal_spec_is_valid_and_asks_for_one_replica() {
    let v = validate(base()).unwrap();
    assert_eq!(v.shape.replicas(), 1);
    assert_eq!(v.timing, Timing::default());
}

#[test]
fn each_mistake_names_its_field() {
    type Change = Box<dyn Fn(&mut pb::JobSpec)>;
    let cases: Vec<(&str, Change)> = vec![
        ("spec.image", Box::new(|s| s.image.clear())),
        ("spec.command", Box::new(|s| s.command.clear())),
        ("spec.command[0]", Box::new(|s| s.command[0].clear())),
        (
            "spec.command[1]",
            Box::new(|s| s.command[1] = "a\0b".into()),
        ),
        (
            "spec.resources.cpu",
            Box::new(|s| {
                s.resources = Some(pb::Resources {
                    cpu: f64::NAN,
                    ..Default::default()
                })
            }),
        ),
        ("spec.priority", Box::new(|s| s.priority = 1001)),
        (
            "spec.training.algorithm",
            Box::new(|s| {
                s.training = Some(pb::Training {
                    algorithm: 42,
                    ..Default::default()
                })
            }),
        ),
        (
            "spec.env[\"1BAD\"]",
            Box::new(|s| {
                s.env.insert("1BAD".into(), "x".into());
            }),
        ),
        (
            "spec.env[\"TRAINMESH_JOB_ID\"]",
            Box::new(|s| {
                s.env.insert("TRAINMESH_JOB_ID".into(), "x".into());
            }),
        ),
        (
            "spec.labels[\"\"]",
            Box::new(|s| {
                s.labels.insert("".into(), "x".into());
            }),
        ),
        ("spec.deadline", Box::new(|s| s.deadline = secs(-1, 0))),
        ("spec.name", Box::new(|s| s.name = "x".repeat(254))),
    ];
    for (field, change) in cases {
        let mut s = base();
        change(&mut s);
        assert_eq!(field_of(s), field);
    }
}

#[test]
fn gpus_and_replicas_are_bounded_over_the_whole_job() {
    let mut s = base();
    s.resources = Some(pb::Resources {
        gpus: 5000,
        ..Default::default()
    });
    assert_eq!(field_of(s), "spec.resources.gpus");
    let mut s = base();
    s.replicas = Some(pb::Replicas {
        masters: 1,
        workers: 5000,
    });
    assert_eq!(field_of(s), "spec.replicas.workers");
    let mut s = base();
    s.replicas = Some(pb::Replicas {
        masters: 2,
        workers: 0,
    });
    assert_eq!(field_of(s), "spec.replicas.masters");
    // 8 GPUs on each of 1000 replicas: each number fits, the sum does not.
    let mut s = base();
    s.resources = Some(pb::Resources {
        gpus: 8,
        ..Default::default()
    });
    s.replicas = Some(pb::Replicas {
        masters: 1,
        workers: 999,
    });
    let err = validate(s).unwrap_err();
    assert_eq!(err.field, "spec.resources.gpus");
    assert!(err.description.contains("8000 GPUs"), "{}", err.description);
    let mut s = base();
    s.resources = Some(pb::Resources {
        gpus: 2,
        cpu: 1.5,
        memory_mib: 100,
        ..Default::default()
    });
    s.replicas = Some(pb::Replicas {
        masters: 0,
        workers: 2,
    });
    let v = validate(s).unwrap();
    assert_eq!(
        (v.shape.gpus, v.shape.cpu_milli, v.shape.workers),
        (6, 1500, 2)
    );
}

#[test]
fn the_largest_numbers_protobuf_carries_are_refused_without_overflow() {
    for d in [
        secs(i64::MAX, 999_999_999),
        secs(0, i32::MAX),
        secs(0, 2_000_000_000),
    ] {
        for field in [
            "spec.deadline",
            "spec.termination_grace",
            "spec.retry_policy.initial_backoff",
            "spec.retry_policy.max_backoff",
        ] {
            let mut s = base();
            match field {
                "spec.deadline" => s.deadline = d,
                "spec.termination_grace" => s.termination_grace = d,
                _ => {
                    let mut rp = pb::RetryPolicy::default();
                    if field.ends_with("initial_backoff") {
                        rp.initial_backoff = d;
                    } else {
                        rp.max_backoff = d;
                    }
                    s.retry_policy = Some(rp);
                }
            }
            assert_eq!(field_of(s), field, "{d:?}");
        }
    }
    for (field, change) in [
        ("spec.resources.gpus", i64::from(i32::MAX)),
        ("spec.resources.memory_mib", i64::MAX),
        ("spec.resources.shm_mib", i64::MIN),
    ] {
        let mut r = pb::Resources::default();
        match field {
            "spec.resources.gpus" => r.gpus = change as i32,
            "spec.resources.memory_mib" => r.memory_mib = change,
            _ => r.shm_mib = change,
        }
        let mut s = base();
        s.resources = Some(r);
        assert_eq!(field_of(s), field);
    }
    let mut s = base();
    s.retry_policy = Some(pb::RetryPolicy {
        max_attempts: i32::MAX,
        ..Default::default()
    });
    assert_eq!(field_of(s), "spec.retry_policy.max_attempts");
}

#[test]
fn durations_within_range_are_kept_and_zero_is_unset() {
    let mut s = base();
    s.termination_grace = secs(3600, 0);
    s.deadline = secs(0, 0);
    s.retry_policy = Some(pb::RetryPolicy {
        max_attempts: 3,
        initial_backoff: secs(1, 500_000_000),
        max_backoff: secs(60, 0),
        ..Default::default()
    });
    let t = validate(s).unwrap().timing;
    assert_eq!(t.termination_grace, Some(Duration::from_secs(3600)));
    assert_eq!(t.deadline, None);
    assert_eq!(t.max_attempts, Some(3));
    assert_eq!(t.initial_backoff, Some(Duration::from_millis(1500)));
    let mut s = base();
    s.retry_policy = Some(pb::RetryPolicy {
        initial_backoff: secs(61, 0),
        max_backoff: secs(60, 0),
        ..Default::default()
    });
    assert_eq!(field_of(s), "spec.retry_policy.initial_backoff");
}

#[test]
fn names_and_labels_with_invisible_characters_are_refused() {
    let mut s = base();
    s.name = "fine\u{202E}tune".into();
    assert_eq!(field_of(s), "spec.name");
    let mut s = base();
    s.labels.insert("team\u{200B}".into(), "a".into());
    assert_eq!(field_of(s), "spec.labels[\"team\\u{200b}\"]");
    let mut s = base();
    s.labels.insert("team".into(), "a\u{2066}b".into());
    assert_eq!(field_of(s), "spec.labels[\"team\"]");
}

#[test]
fn env_names() {
    assert!(is_env_name("_A1"));
    assert!(is_env_name("PATH"));
    assert!(!is_env_name(""));
    assert!(!is_env_name("A-B"));
    assert!(!is_env_name("9A"));
}

#[test]
fn secret_env_names_a_secret_not_a_value() {
    let mut s = base();
    s.secret_env
        .insert("WANDB_API_KEY".into(), "wandb.key".into());
    validate(s.clone()).unwrap();
    for (name, secret, field) in [
        (
            "WANDB_API_KEY",
            "../etc/passwd",
            "spec.secret_env[\"WANDB_API_KEY\"]",
        ),
        ("WANDB_API_KEY", "..", "spec.secret_env[\"WANDB_API_KEY\"]"),
        ("TRAINMESH_X", "k", "spec.secret_env[\"TRAINMESH_X\"]"),
        ("1X", "k", "spec.secret_env[\"1X\"]"),
    ] {
        let mut s = base();
        s.secret_env.insert(name.into(), secret.into());
        assert_eq!(field_of(s), field);
    }
    s.env.insert("WANDB_API_KEY".into(), "plain".into());
    assert_eq!(field_of(s), "spec.secret_env[\"WANDB_API_KEY\"]");
}

#[test]
fn retry_policy_memory_and_node_fault_settings_are_range_checked() {
    let with = |rp: pb::RetryPolicy, memory_mib: i64| {
        let mut s = base();
        s.resources = Some(pb::Resources {
            memory_mib,
            ..Default::default()
        });
        s.retry_policy = Some(rp);
        s
    };
    for ok in [0.0, 1.1, 1.5, 4.0] {
        let rp = pb::RetryPolicy {
            memory_factor: ok,
            ..Default::default()
        };
        assert!(validate(with(rp, 1024)).is_ok(), "{ok}");
    }
    for bad in [1.0, 1.09, 4.01, -1.5, f64::NAN, f64::INFINITY] {
        let rp = pb::RetryPolicy {
            memory_factor: bad,
            ..Default::default()
        };
        let e = validate(with(rp, 1024)).unwrap_err();
        assert_eq!(e.field, "spec.retry_policy.memory_factor", "{bad}");
        assert!(
            e.to_string().contains("must be between 1.1 and 4.0"),
            "{bad}: {e}"
        );
    }
    let rp = pb::RetryPolicy {
        max_memory_mib: 512,
        ..Default::default()
    };
    assert_eq!(field_of(with(rp, 1024)), "spec.retry_policy.max_memory_mib");
    for bad in [-1, i64::MAX, i64::MIN] {
        let rp = pb::RetryPolicy {
            max_memory_mib: bad,
            ..Default::default()
        };
        assert_eq!(field_of(with(rp, 0)), "spec.retry_policy.max_memory_mib");
    }
    let rp = pb::RetryPolicy {
        max_memory_mib: 4096,
        on_oom_killed: pb::OomKilledAction::Fail as i32,
        on_node_fault: pb::NodeFaultAction::OtherRunner as i32,
        ..Default::default()
    };
    assert!(validate(with(rp, 4096)).is_ok());
    let rp = pb::RetryPolicy {
        on_oom_killed: 7,
        ..Default::default()
    };
    assert_eq!(field_of(with(rp, 0)), "spec.retry_policy.on_oom_killed");
    let rp = pb::RetryPolicy {
        on_node_fault: -1,
        ..Default::default()
    };
    assert_eq!(field_of(with(rp, 0)), "spec.retry_policy.on_node_fault");
}
