//! Env values a job marks secret: stored only sealed, compared by what
//! they hold, and refused with a reason when they cannot be sealed.

use std::sync::Arc;

use tonic::Code;
use trainmesh_common::proto::job::v1 as pb;
use trainmesh_common::sealed::{SecretsKey, PREFIX};
use trainmesh_common::testing::all_dbs;

use crate::support::*;

const VALUE: &str = "sk-test-5a8c1e0f";

fn with_secret(value: &str) -> pb::JobSpec {
    let mut s = spec("sealed");
    s.env.insert("API_KEY".into(), value.into());
    s.secret_env_keys = vec!["API_KEY".into()];
    s
}

async fn keyed(db: &trainmesh_common::testing::TestDb) -> App {
    let key = SecretsKey::from_hex(&SecretsKey::generate_hex()).unwrap();
    App::start_with(db, |c| c.secrets_key = Some(Arc::new(key))).await
}

fn submit(spec: pb::JobSpec, key: &str) -> pb::CreateJobRequest {
    pb::CreateJobRequest {
        spec: Some(spec),
        idempotency_key: key.into(),
    }
}

#[tokio::test]
async fn a_marked_value_is_stored_sealed_and_a_repeat_is_the_same_job() {
    for db in all_dbs().await {
        let app = keyed(&db).await;
        let mut alice = app.alice();
        let job = alice
            .create_job(submit(with_secret(VALUE), "k1"))
            .await
            .unwrap()
            .into_inner()
            .job
            .unwrap();
        let sealed = job.spec.as_ref().unwrap().env["API_KEY"].clone();
        assert!(
            sealed.starts_with(PREFIX) && !sealed.contains(VALUE),
            "{sealed}"
        );
        let stored = get(&mut alice, &job.id).await.unwrap();
        assert_eq!(stored.spec.unwrap().env["API_KEY"], sealed, "{}", app.label);

        // The same submission again, with the value or with what GetJob
        // showed, is the same job; another value under the key is not.
        for again in [with_secret(VALUE), with_secret(&sealed)] {
            let r = alice
                .create_job(submit(again, "k1"))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(r.job.unwrap().id, job.id, "{}", app.label);
        }
        let other = alice
            .create_job(submit(with_secret("sk-other-value"), "k1"))
            .await;
        assert_invalid(other, "idempotency_key");
    }
}

#[tokio::test]
async fn what_cannot_be_sealed_is_refused_naming_the_field() {
    for db in all_dbs().await {
        let app = keyed(&db).await;
        let mut alice = app.alice();
        let mut missing = spec("missing");
        missing.secret_env_keys = vec!["NOPE".into()];
        assert_invalid(
            alice.create_job(submit(missing, "")).await,
            "spec.secret_env_keys[0]",
        );

        let mut twice = with_secret(VALUE);
        twice.secret_env_keys.push("API_KEY".into());
        assert_invalid(
            alice.create_job(submit(twice, "")).await,
            "spec.secret_env_keys[1]",
        );

        // A sealed value where it is not marked would reach the job sealed.
        let mut unmarked = spec("unmarked");
        unmarked.env.insert("OTHER".into(), format!("{PREFIX}00"));
        assert_invalid(
            alice.create_job(submit(unmarked, "")).await,
            "spec.env[\"OTHER\"]",
        );

        let long = "x".repeat(40_000);
        let err = assert_invalid(
            alice.create_job(submit(with_secret(&long), "")).await,
            "spec.env[\"API_KEY\"]",
        );
        assert!(err.message().contains("at most 32734 bytes"), "{err:?}");
    }
}

#[tokio::test]
async fn without_a_secrets_key_a_marked_value_is_refused() {
    for db in all_dbs().await {
        let app = App::start(&db).await;
        let res = app.alice().create_job(submit(with_secret(VALUE), "")).await;
        let err = assert_code(res, Code::FailedPrecondition);
        assert!(err.message().contains("no secrets key"), "{err:?}");
    }
}
