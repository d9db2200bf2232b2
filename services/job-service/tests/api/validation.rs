//! CreateJob refuses each class of bad input with INVALID_ARGUMENT naming
//! the field, and validating paths has no side effects.

use trainmesh_common::proto::job::v1 as pb;
use trainmesh_common::testing::all_dbs;

use crate::support::*;

type Mutate = Box<dyn Fn(&App, &mut pb::JobSpec)>;

fn case(
    field: &'static str,
    f: impl Fn(&App, &mut pb::JobSpec) + 'static,
) -> (&'static str, Mutate) {
    (field, Box::new(f))
}

/// Each mutation of a valid spec is refused naming its field, and nothing
/// is stored.
async fn refused(cases: Vec<(&'static str, Mutate)>) {
    for db in all_dbs().await {
        let app = App::start(&db).await;
        let mut alice = app.alice();
        for (field, mutate) in &cases {
            let mut s = spec("bad");
            mutate(&app, &mut s);
            let res = alice
                .create_job(pb::CreateJobRequest {
                    spec: Some(s),
                    idempotency_key: String::new(),
                })
                .await;
            let st = assert_invalid(res, field);
            assert!(!st.message().is_empty(), "{}", app.label);
        }
        let listed = alice
            .list_jobs(pb::ListJobsRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert!(listed.jobs.is_empty(), "{}: nothing stored", app.label);
    }
}

fn training(s: &mut pb::JobSpec) -> &mut pb::Training {
    s.training.get_or_insert_with(Default::default)
}

fn dur(seconds: i64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration { seconds, nanos: 0 })
}

#[tokio::test]
async fn missing_spec_is_refused() {
    for db in all_dbs().await {
        let app = App::start(&db).await;
        let res = app
            .alice()
            .create_job(pb::CreateJobRequest::default())
            .await;
        assert_invalid(res, "spec");
    }
}

#[tokio::test]
async fn empty_image_is_refused() {
    refused(vec![
        case("spec.image", |_, s| s.image.clear()),
        case("spec.image", |_, s| s.image = "   ".into()),
    ])
    .await;
}

#[tokio::test]
async fn empty_command_or_program_is_refused() {
    refused(vec![
        case("spec.command", |_, s| s.command.clear()),
        case("spec.command[0]", |_, s| s.command[0].clear()),
    ])
    .await;
}

#[tokio::test]
async fn negative_resources_are_refused() {
    fn res(s: &mut pb::JobSpec) -> &mut pb::Resources {
        s.resources.get_or_insert_with(Default::default)
    }
    refused(vec![
        case("spec.resources.gpus", |_, s| res(s).gpus = -1),
        case("spec.resources.cpu", |_, s| res(s).cpu = -0.5),
        case("spec.resources.memory_mib", |_, s| res(s).memory_mib = -1),
        case("spec.resources.shm_mib", |_, s| res(s).shm_mib = -64),
    ])
    .await;
}

#[tokio::test]
async fn priority_out_of_range_is_refused() {
    refused(vec![
        case("spec.priority", |_, s| s.priority = 1001),
        case("spec.priority", |_, s| s.priority = -1001),
    ])
    .await;
}

#[tokio::test]
async fn unknown_enum_values_are_refused() {
    refused(vec![case("spec.training.algorithm", |_, s| {
        training(s).algorithm = 99
    })])
    .await;
}

#[tokio::test]
async fn max_attempts_out_of_range_is_refused() {
    fn rp(s: &mut pb::JobSpec) -> &mut pb::RetryPolicy {
        s.retry_policy.get_or_insert_with(Default::default)
    }
    refused(vec![
        case("spec.retry_policy.max_attempts", |_, s| {
            rp(s).max_attempts = -1
        }),
        case("spec.retry_policy.max_attempts", |_, s| {
            rp(s).max_attempts = 101
        }),
    ])
    .await;
}

#[tokio::test]
async fn bad_labels_are_refused() {
    refused(vec![
        case("spec.labels[\"\"]", |_, s| {
            s.labels.insert(String::new(), "x".into());
        }),
        case("spec.labels[\"kkk*", |_, s| {
            s.labels.insert("k".repeat(254), "x".into());
        }),
        case("spec.labels[\"team\"]", |_, s| {
            s.labels.insert("team".into(), "v".repeat(257));
        }),
        case("spec.labels[\"a=b\"]", |_, s| {
            s.labels.insert("a=b".into(), "x".into());
        }),
    ])
    .await;
}

#[tokio::test]
async fn invalid_or_reserved_env_names_are_refused() {
    refused(vec![
        case("spec.env[\"1ABC\"]", |_, s| {
            s.env.insert("1ABC".into(), "x".into());
        }),
        case("spec.env[\"A-B\"]", |_, s| {
            s.env.insert("A-B".into(), "x".into());
        }),
        case("spec.env[\"\"]", |_, s| {
            s.env.insert(String::new(), "x".into());
        }),
        case("spec.env[\"TRAINMESH_JOB_ID\"]", |_, s| {
            s.env.insert("TRAINMESH_JOB_ID".into(), "x".into());
        }),
    ])
    .await;
}

#[tokio::test]
async fn negative_durations_are_refused() {
    refused(vec![
        case("spec.deadline", |_, s| s.deadline = dur(-1)),
        case("spec.termination_grace", |_, s| {
            s.termination_grace = dur(-5)
        }),
        case("spec.retry_policy.initial_backoff", |_, s| {
            s.retry_policy = Some(pb::RetryPolicy {
                initial_backoff: dur(-1),
                ..Default::default()
            })
        }),
    ])
    .await;
}

#[tokio::test]
async fn overlong_name_is_refused() {
    refused(vec![case("spec.name", |_, s| s.name = "n".repeat(254))]).await;
}

#[tokio::test]
async fn dot_dot_paths_are_refused() {
    refused(vec![
        case("spec.training.dataset_path", |app, s| {
            training(s).dataset_path = format!("{}/../outside", app.root.display())
        }),
        case("spec.training.output_path", |app, s| {
            training(s).output_path = format!("{}/runs/../../outside/x", app.root.display())
        }),
    ])
    .await;
}

#[tokio::test]
async fn percent_encoded_traversal_is_refused() {
    refused(vec![
        case("spec.training.dataset_path", |app, s| {
            training(s).dataset_path = format!("{}/%2e%2e/outside", app.root.display())
        }),
        case("spec.training.output_path", |app, s| {
            training(s).output_path = format!("{}/%2E%2E%2Foutside", app.root.display())
        }),
        case("spec.training.output_path", |app, s| {
            training(s).output_path = format!("{}/x%2fy", app.root.display())
        }),
    ])
    .await;
}

#[tokio::test]
async fn nul_bytes_in_paths_are_refused() {
    refused(vec![case("spec.training.output_path", |app, s| {
        training(s).output_path = format!("{}/a\0b", app.root.display())
    })])
    .await;
}

#[tokio::test]
async fn symlink_inside_root_pointing_outside_is_refused() {
    refused(vec![
        case("spec.training.dataset_path", |app, s| {
            let link = app.root.join("escape");
            if !link.exists() {
                std::os::unix::fs::symlink(&app.outside, &link).unwrap();
            }
            training(s).dataset_path = link.display().to_string();
        }),
        case("spec.training.output_path", |app, s| {
            let link = app.root.join("escape");
            if !link.exists() {
                std::os::unix::fs::symlink(&app.outside, &link).unwrap();
            }
            training(s).output_path = link.join("new-run").display().to_string();
        }),
    ])
    .await;
}

#[tokio::test]
async fn paths_outside_the_roots_are_refused() {
    refused(vec![
        // Shares the root's string prefix but is a sibling directory.
        case("spec.training.dataset_path", |app, s| {
            let sibling = app.root.with_file_name("data-evil");
            std::fs::create_dir_all(&sibling).unwrap();
            training(s).dataset_path = sibling.display().to_string();
        }),
        case("spec.training.output_path", |_, s| {
            training(s).output_path = "/etc/trainmesh-out".into()
        }),
        case("spec.training.dataset_path", |_, s| {
            training(s).dataset_path = "relative/data".into()
        }),
    ])
    .await;
}

#[tokio::test]
async fn validation_creates_no_directories_and_stores_canonical_paths() {
    for db in all_dbs().await {
        let app = App::start(&db).await;
        let mut alice = app.alice();
        std::fs::create_dir_all(app.root.join("sets/imdb")).unwrap();
        let out = app.root.join("runs/2024/run-1");
        let mut s = spec("ok");
        s.training = Some(pb::Training {
            algorithm: pb::TrainingAlgorithm::Sft as i32,
            dataset_path: format!("{}/sets/./imdb", app.root.display()),
            output_path: out.display().to_string(),
            ..Default::default()
        });
        let job = create(&mut alice, s).await;
        let t = job.spec.unwrap().training.unwrap();
        assert_eq!(
            t.dataset_path,
            app.root.join("sets/imdb").display().to_string()
        );
        assert_eq!(t.output_path, out.display().to_string());
        assert!(
            !app.root.join("runs").exists(),
            "{}: accepted path created",
            app.label
        );

        let mut bad = spec("bad");
        bad.training = Some(pb::Training {
            output_path: app.outside.join("new/deeper").display().to_string(),
            ..Default::default()
        });
        let res = alice
            .create_job(pb::CreateJobRequest {
                spec: Some(bad),
                idempotency_key: String::new(),
            })
            .await;
        assert_invalid(res, "spec.training.output_path");
        assert!(
            !app.outside.join("new").exists(),
            "{}: refused path created",
            app.label
        );

        let mut missing = spec("missing");
        missing.training = Some(pb::Training {
            dataset_path: app.root.join("no-such-set").display().to_string(),
            ..Default::default()
        });
        let res = alice
            .create_job(pb::CreateJobRequest {
                spec: Some(missing),
                idempotency_key: String::new(),
            })
            .await;
        let st = assert_invalid(res, "spec.training.dataset_path");
        assert!(st.message().contains("does not exist"));
    }
}

#[tokio::test]
async fn without_data_roots_paths_are_refused_with_a_clear_message() {
    for db in all_dbs().await {
        let app = App::start_with(&db, |c| c.data_roots.clear()).await;
        let mut s = spec("x");
        s.training = Some(pb::Training {
            output_path: app.root.join("out").display().to_string(),
            ..Default::default()
        });
        let res = app
            .alice()
            .create_job(pb::CreateJobRequest {
                spec: Some(s),
                idempotency_key: String::new(),
            })
            .await;
        let st = assert_invalid(res, "spec.training.output_path");
        assert!(
            st.message().contains("no data roots are configured"),
            "{}",
            st.message()
        );
    }
}

/// What no runner could run, or a timer could not hold, is refused at
/// submission: the scheduler and the runner check the same limits, so an
/// accepted job is never refused later.
#[tokio::test]
async fn numbers_beyond_the_limits_are_refused() {
    let huge = Some(prost_types::Duration {
        seconds: i64::MAX,
        nanos: 999_999_999,
    });
    refused(vec![
        case("spec.resources.gpus", |_, s| {
            s.resources.get_or_insert_with(Default::default).gpus = 5000
        }),
        case("spec.replicas.workers", |_, s| {
            s.replicas = Some(pb::Replicas {
                masters: 1,
                workers: 5000,
            })
        }),
        case("spec.replicas.masters", |_, s| {
            s.replicas = Some(pb::Replicas {
                masters: 2,
                workers: 0,
            })
        }),
        case("spec.termination_grace", move |_, s| {
            s.termination_grace = huge
        }),
        case("spec.deadline", move |_, s| s.deadline = huge),
        case("spec.retry_policy.initial_backoff", move |_, s| {
            s.retry_policy = Some(pb::RetryPolicy {
                initial_backoff: huge,
                ..Default::default()
            })
        }),
        case("spec.termination_grace", |_, s| {
            s.termination_grace = Some(prost_types::Duration {
                seconds: 1,
                nanos: 2_000_000_000,
            })
        }),
    ])
    .await;
}

#[tokio::test]
async fn invisible_and_direction_characters_are_refused_in_names_and_labels() {
    refused(vec![
        case("spec.name", |_, s| s.name = "train\u{202E}gnp".into()),
        case("spec.labels[\"team\\u{200b}\"]", |_, s| {
            s.labels.insert("team\u{200B}".into(), "a".into());
        }),
        case("spec.labels[\"team\"]", |_, s| {
            s.labels.insert("team".into(), "\u{2067}a".into());
        }),
    ])
    .await;
}
