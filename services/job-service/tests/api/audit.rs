//! Token management and the audit log of job-service.

use tonic::Code;
use trainmesh_common::auth::TokenStore;
use trainmesh_common::client::Channel;
use trainmesh_common::proto::audit::v1 as audit;
use trainmesh_common::proto::audit::v1::audit_service_client::AuditServiceClient;
use trainmesh_common::proto::auth::v1 as auth;
use trainmesh_common::proto::auth::v1::token_service_client::TokenServiceClient;
use trainmesh_common::proto::job::v1 as pb;
use trainmesh_common::testing::{all_dbs, test_tokens_in};

use crate::support::*;

fn audit_client(app: &App, token: &str) -> AuditServiceClient<Channel> {
    AuditServiceClient::new(app.channel(token))
}

fn tokens_client(app: &App, token: &str) -> TokenServiceClient<Channel> {
    TokenServiceClient::new(app.channel(token))
}

async fn events(app: &App) -> Vec<audit::AuditEvent> {
    audit_client(app, app.tokens.admin)
        .list_audit_events(audit::ListAuditEventsRequest::default())
        .await
        .expect("admin reads the audit log")
        .into_inner()
        .events
}

/// job-service whose tokens also come from a token database: the test's
/// own database, so the audit tables of both kinds share it.
async fn start_with_token_database(db: &trainmesh_common::testing::TestDb) -> App {
    let store = TokenStore::load(&db.url).await.expect("token database");
    let tokens = test_tokens_in(store).store;
    App::start_with(db, move |c| c.tokens = tokens).await
}

#[tokio::test]
async fn an_admin_cancelling_another_users_job_is_audited_and_own_cancels_are_not() {
    for db in all_dbs().await {
        let app = App::start(&db).await;
        let theirs = create(&mut app.alice(), spec("theirs")).await;
        let own = create(&mut app.alice(), spec("own")).await;
        let cancel = |id: &str| pb::CancelJobRequest {
            job_id: id.into(),
            reason: "wrong dataset".into(),
        };
        app.jobs(app.tokens.admin)
            .cancel_job(cancel(&theirs.id))
            .await
            .expect("admin cancels alice's job");
        app.alice().cancel_job(cancel(&own.id)).await.unwrap();

        let got = events(&app).await;
        assert_eq!(got.len(), 1, "{}: {got:#?}", app.label);
        let e = &got[0];
        assert_eq!(
            (e.actor.as_str(), e.action.as_str(), e.target.as_str()),
            ("admin", "cancel_job", theirs.id.as_str())
        );
        assert_eq!(e.details["owner"], "alice");
        assert_eq!(e.details["reason"], "wrong dataset");
        assert_eq!(e.service, "job-service");
        assert!(e.time.is_some() && !e.correlation_id.is_empty());

        let refused = audit_client(&app, app.tokens.alice)
            .list_audit_events(audit::ListAuditEventsRequest::default())
            .await;
        assert_code(refused, Code::PermissionDenied);
    }
}

#[tokio::test]
async fn without_a_token_database_tokens_cannot_be_managed() {
    for db in all_dbs().await {
        let app = App::start(&db).await;
        let req = auth::CreateTokenRequest {
            user: "gina".into(),
            org: "ml".into(),
            roles: vec!["user".into()],
            ..Default::default()
        };
        let s = assert_code(
            tokens_client(&app, app.tokens.admin)
                .create_token(req.clone())
                .await,
            Code::FailedPrecondition,
        );
        assert!(s.message().contains("--tokens"), "{s:?}");
        assert_code(
            tokens_client(&app, app.tokens.alice)
                .create_token(req)
                .await,
            Code::PermissionDenied,
        );
    }
}

#[tokio::test]
async fn tokens_take_effect_at_once_are_listed_without_secrets_and_audited() {
    for db in all_dbs().await {
        let app = start_with_token_database(&db).await;
        let mut admin = tokens_client(&app, app.tokens.admin);
        let made = admin
            .create_token(auth::CreateTokenRequest {
                user: "gina".into(),
                org: "vision".into(),
                roles: vec!["user".into(), "approver".into()],
                ttl: Some(prost_types::Duration {
                    seconds: 3600,
                    nanos: 0,
                }),
                description: "notebook".into(),
                ..Default::default()
            })
            .await
            .expect("create")
            .into_inner();
        let token = made.token.expect("token");
        assert!(made.secret.starts_with("tm_"));
        assert!(token.expire_time.is_some() && !token.revoked);

        // Accepted at once, as gina.
        let mut gina = app.jobs(&made.secret);
        let job = create(&mut gina, spec("gina's")).await;
        assert_eq!(job.owner, "gina", "{}", app.label);

        let listed = admin
            .list_tokens(auth::ListTokensRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert_eq!(listed.tokens.len(), 1);
        assert_eq!(listed.tokens[0], token);
        assert!(!format!("{listed:?}").contains(&made.secret));

        let revoked = admin
            .revoke_token(auth::RevokeTokenRequest {
                id: token.id.clone(),
            })
            .await
            .expect("revoke")
            .into_inner()
            .token
            .unwrap();
        assert!(revoked.revoked && revoked.revoke_time.is_some());
        assert_eq!(revoked.revoked_by, "admin");
        // Refused at once, saying why.
        let s = assert_code(get(&mut gina, &job.id).await, Code::Unauthenticated);
        assert!(s.message().contains("revoked"), "{s:?}");
        // Again: nothing changes, nothing more is recorded.
        admin
            .revoke_token(auth::RevokeTokenRequest {
                id: token.id.clone(),
            })
            .await
            .unwrap();
        assert_code(
            admin
                .revoke_token(auth::RevokeTokenRequest {
                    id: "tok_0000".into(),
                })
                .await,
            Code::NotFound,
        );

        let got = events(&app).await;
        let actions: Vec<_> = got.iter().map(|e| e.action.as_str()).collect();
        assert_eq!(actions, ["revoke_token", "create_token"], "{}", app.label);
        assert!(got
            .iter()
            .all(|e| e.target == token.id && e.actor == "admin"));
        assert_eq!(got[1].details["roles"], "user,approver");
        assert_eq!(got[1].details["description"], "notebook");
    }
}

#[tokio::test]
async fn bad_token_requests_name_the_field_and_store_nothing() {
    for db in all_dbs().await {
        let app = start_with_token_database(&db).await;
        let mut admin = tokens_client(&app, app.tokens.admin);
        let good = auth::CreateTokenRequest {
            user: "gina".into(),
            org: "ml".into(),
            roles: vec!["user".into()],
            ..Default::default()
        };
        let past = prost_types::Timestamp {
            seconds: 1_000_000,
            nanos: 0,
        };
        let cases = [
            (
                "user",
                auth::CreateTokenRequest {
                    user: String::new(),
                    ..good.clone()
                },
            ),
            (
                "org",
                auth::CreateTokenRequest {
                    org: "m l".into(),
                    ..good.clone()
                },
            ),
            (
                "roles[1]",
                auth::CreateTokenRequest {
                    roles: vec!["user".into(), "root".into()],
                    ..good.clone()
                },
            ),
            (
                "expire_time",
                auth::CreateTokenRequest {
                    expire_time: Some(past),
                    ..good.clone()
                },
            ),
            (
                "description",
                auth::CreateTokenRequest {
                    description: "x".repeat(5000),
                    ..good.clone()
                },
            ),
        ];
        for (field, req) in cases {
            assert_invalid(admin.create_token(req).await, field);
        }
        assert_invalid(
            admin
                .list_tokens(auth::ListTokensRequest {
                    page_token: "garbage".into(),
                    ..Default::default()
                })
                .await,
            "page_token",
        );
        assert_invalid(
            admin
                .revoke_token(auth::RevokeTokenRequest::default())
                .await,
            "id",
        );
        let listed = admin
            .list_tokens(auth::ListTokensRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert!(listed.tokens.is_empty(), "{}: {listed:?}", app.label);
        assert!(events(&app).await.is_empty());
    }
}
