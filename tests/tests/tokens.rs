//! Tokens created, revoked and expiring while the mesh runs: every service
//! (job-service, scheduler, metrics, diagnosis) follows the token database
//! without a restart, on SQLite and on PostgreSQL.

use std::time::{Duration, Instant};

use tonic::Code;
use trainmesh_common::client::Channel;
use trainmesh_common::testing::wait_for;
use trainmesh_proto::audit::v1::ListAuditEventsRequest;
use trainmesh_proto::auth::v1::{CreateTokenRequest, ListTokensRequest, RevokeTokenRequest};
use trainmesh_proto::diagnosis::v1::diagnosis_service_client::DiagnosisServiceClient;
use trainmesh_proto::diagnosis::v1::ListPromptTemplatesRequest;
use trainmesh_proto::job::v1::job_service_client::JobServiceClient;
use trainmesh_proto::job::v1::ListJobsRequest;
use trainmesh_proto::metrics::v1::metrics_service_client::MetricsServiceClient;
use trainmesh_proto::metrics::v1::ListMetricKeysRequest;
use trainmesh_proto::scheduler::v1::scheduler_service_client::SchedulerServiceClient;
use trainmesh_proto::scheduler::v1::GetQueueStatsRequest;
use trainmesh_tests::{
    postgres_or_skip, Mesh, MeshOptions, ADMIN_TOKEN, ALICE_TOKEN, APPROVER_TOKEN,
};

/// How long the services that did not make a change may take to see it.
/// Their poll (every 250 ms) is what bounds it (about 0.2-0.4 s measured);
/// the deadline is generous so a loaded machine does not fail the test.
const ELSEWHERE: Duration = Duration::from_secs(10);

const SERVICES: [&str; 4] = [
    "job-service",
    "scheduler-service",
    "metrics-service",
    "diagnosis-service",
];

async fn mesh(postgres: bool) -> Mesh {
    Mesh::start_with(MeshOptions {
        no_runner: true,
        postgres,
        ..Default::default()
    })
    .await
}

/// Clients of every service with one token, kept across polls so that a
/// wait measures the change reaching the service, not new connections.
struct Probes {
    jobs: JobServiceClient<Channel>,
    scheduler: SchedulerServiceClient<Channel>,
    metrics: MetricsServiceClient<Channel>,
    diagnosis: DiagnosisServiceClient<Channel>,
}

impl Probes {
    fn new(mesh: &Mesh, token: &str) -> Self {
        Probes {
            jobs: mesh.jobs(token),
            scheduler: mesh.scheduler(token),
            metrics: mesh.metrics(token),
            diagnosis: mesh.diagnosis(token),
        }
    }

    /// One authenticated call to `service`: `Ok` when the token was
    /// accepted (whatever the call's own answer), else the refusal.
    async fn probe(&mut self, service: &str) -> Result<(), tonic::Status> {
        let result = match service {
            "job-service" => self
                .jobs
                .list_jobs(ListJobsRequest {
                    page_size: 1,
                    ..Default::default()
                })
                .await
                .map(drop),
            "scheduler-service" => self
                .scheduler
                .get_queue_stats(GetQueueStatsRequest {})
                .await
                .map(drop),
            "metrics-service" => self
                .metrics
                .list_metric_keys(ListMetricKeysRequest {
                    job_id: uuid::Uuid::new_v4().to_string(),
                })
                .await
                .map(drop),
            "diagnosis-service" => self
                .diagnosis
                .list_prompt_templates(ListPromptTemplatesRequest {})
                .await
                .map(drop),
            other => panic!("no probe for {other}"),
        };
        match result {
            Err(s) if s.code() == Code::Unauthenticated => Err(s),
            _ => Ok(()),
        }
    }

    /// Waits until every service in `services` answers `accepted`;
    /// returns the refusals seen last.
    async fn wait_all(
        &mut self,
        services: &[&str],
        accepted: bool,
        within: Duration,
        what: &str,
    ) -> Vec<tonic::Status> {
        let probes = tokio::sync::Mutex::new(self);
        wait_for(what, within, || async {
            let mut probes = probes.lock().await;
            let mut refusals = Vec::new();
            for s in services {
                match probes.probe(s).await {
                    Ok(()) if accepted => {}
                    Err(e) if !accepted => refusals.push(e),
                    _ => return None,
                }
            }
            Some(refusals)
        })
        .await
    }
}

fn request(user: &str) -> CreateTokenRequest {
    CreateTokenRequest {
        user: user.into(),
        org: "ml".into(),
        roles: vec!["user".into()],
        description: "cross-service test".into(),
        ..Default::default()
    }
}

async fn created_token_works_everywhere_and_a_revoked_one_stops(postgres: bool) {
    let mesh = mesh(postgres).await;
    let mut admin = mesh.tokens(ADMIN_TOKEN);
    let made = admin
        .create_token(request("gina"))
        .await
        .expect("create a token")
        .into_inner();
    let id = made.token.expect("token").id;
    let mut gina = Probes::new(&mesh, &made.secret);
    // job-service made it: it works there at once.
    gina.probe("job-service")
        .await
        .expect("accepted by job-service at once");
    let started = Instant::now();
    gina.wait_all(
        &SERVICES,
        true,
        ELSEWHERE,
        "every service to accept the new token",
    )
    .await;
    eprintln!("accepted everywhere after {:?}", started.elapsed());

    admin
        .revoke_token(RevokeTokenRequest { id: id.clone() })
        .await
        .expect("revoke");
    let refused = gina
        .probe("job-service")
        .await
        .expect_err("refused by job-service at once");
    assert!(refused.message().contains("revoked"), "{refused:?}");
    let started = Instant::now();
    let refusals = gina
        .wait_all(
            &SERVICES[1..],
            false,
            ELSEWHERE,
            "every other service to refuse the revoked token",
        )
        .await;
    eprintln!("refused everywhere after {:?}", started.elapsed());
    for r in refusals {
        assert!(
            r.message().contains(&id),
            "the refusal names the token: {r:?}"
        );
    }
    // The rest of the mesh's tokens are untouched.
    Probes::new(&mesh, ALICE_TOKEN)
        .wait_all(&SERVICES, true, ELSEWHERE, "alice still accepted")
        .await;
}

#[tokio::test]
async fn created_token_works_everywhere_and_a_revoked_one_stops_sqlite() {
    created_token_works_everywhere_and_a_revoked_one_stops(false).await;
}

#[tokio::test]
async fn created_token_works_everywhere_and_a_revoked_one_stops_postgres() {
    if postgres_or_skip("created_token_works_everywhere_and_a_revoked_one_stops_postgres") {
        created_token_works_everywhere_and_a_revoked_one_stops(true).await;
    }
}

async fn an_expired_token_is_refused_saying_so(postgres: bool) {
    let mesh = mesh(postgres).await;
    let mut req = request("hank");
    req.ttl = Some(prost_types::Duration {
        seconds: 1,
        nanos: 0,
    });
    let made = mesh
        .tokens(ADMIN_TOKEN)
        .create_token(req)
        .await
        .expect("create a token that lives one second")
        .into_inner();
    let refusals = Probes::new(&mesh, &made.secret)
        .wait_all(
            &SERVICES,
            false,
            Duration::from_secs(10),
            "every service to refuse the expired token",
        )
        .await;
    assert_eq!(refusals.len(), SERVICES.len());
    for r in refusals {
        assert!(r.message().contains("expired"), "{r:?}");
    }
    let listed = mesh
        .tokens(ADMIN_TOKEN)
        .list_tokens(ListTokensRequest::default())
        .await
        .unwrap()
        .into_inner()
        .tokens;
    assert!(listed
        .iter()
        .any(|t| t.user == "hank" && t.expire_time.is_some()));
}

#[tokio::test]
async fn an_expired_token_is_refused_saying_so_sqlite() {
    an_expired_token_is_refused_saying_so(false).await;
}

#[tokio::test]
async fn an_expired_token_is_refused_saying_so_postgres() {
    if postgres_or_skip("an_expired_token_is_refused_saying_so_postgres") {
        an_expired_token_is_refused_saying_so(true).await;
    }
}

/// Plain users and approvers manage no tokens and read no audit log, on
/// either service; a token an admin creates for a user gives no more.
#[tokio::test]
async fn non_admins_cannot_manage_tokens_or_read_the_audit_log() {
    let mesh = mesh(false).await;
    let made = mesh
        .tokens(ADMIN_TOKEN)
        .create_token(request("ivy"))
        .await
        .unwrap()
        .into_inner();
    // The scheduler learns of the new token by its poll.
    Probes::new(&mesh, &made.secret)
        .wait_all(
            &SERVICES,
            true,
            Duration::from_secs(5),
            "the new token everywhere",
        )
        .await;
    for token in [ALICE_TOKEN, APPROVER_TOKEN, made.secret.as_str()] {
        let mut tokens = mesh.tokens(token);
        let denied = [
            tokens.create_token(request("mallory")).await.map(drop),
            tokens
                .list_tokens(ListTokensRequest::default())
                .await
                .map(drop),
            tokens
                .revoke_token(RevokeTokenRequest {
                    id: made.token.clone().unwrap().id,
                })
                .await
                .map(drop),
            mesh.audit("job-service", token)
                .list_audit_events(ListAuditEventsRequest::default())
                .await
                .map(drop),
            mesh.audit("scheduler-service", token)
                .list_audit_events(ListAuditEventsRequest::default())
                .await
                .map(drop),
        ];
        for (i, r) in denied.into_iter().enumerate() {
            let s = r.expect_err("a non-admin is refused");
            assert_eq!(s.code(), Code::PermissionDenied, "call {i}: {s:?}");
        }
    }
    // Nothing was created or revoked by them.
    let listed = mesh
        .tokens(ADMIN_TOKEN)
        .list_tokens(ListTokensRequest::default())
        .await
        .unwrap()
        .into_inner()
        .tokens;
    assert_eq!(listed.len(), 1);
    assert!(!listed[0].revoked);
}
