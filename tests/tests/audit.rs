//! The audit log across the mesh: who approved, rejected, changed a limit,
//! held and released the queue, cancelled someone else's job as an admin,
//! created and revoked a token, and when; read from each service and with
//! `trainctl audit`, which merges both by time. SQLite and PostgreSQL.

use std::collections::HashSet;
use std::time::Duration;

use trainmesh_common::time::{from_timestamp, now_micros};
use trainmesh_proto::audit::v1::{AuditEvent, ListAuditEventsRequest};
use trainmesh_proto::auth::v1::{CreateTokenRequest, RevokeTokenRequest};
use trainmesh_proto::job::v1::{CancelJobRequest, JobSpec, JobState, ListJobsRequest};
use trainmesh_proto::scheduler::v1::{
    ApproveJobRequest, HoldQueueRequest, LimitScope, Limits, RejectJobRequest, ReleaseQueueRequest,
    SetLimitsRequest,
};
use trainmesh_tests::jobs::{python_job, submit, wait_state};
use trainmesh_tests::{
    postgres_or_skip, Mesh, MeshOptions, ADMIN_TOKEN, ALICE_TOKEN, APPROVER_TOKEN,
};

const RULES: &str = r#"
rules:
  - name: prod-tier
    when: { label: { key: "tier", matches: "^prod$" } }
"#;

const WAIT: Duration = Duration::from_secs(20);

fn prod_job(name: &str) -> JobSpec {
    let mut spec = python_job(name, "print('hi')", &[]);
    spec.labels.insert("tier".into(), "prod".into());
    spec
}

/// Every page of one service's audit log for `req`, newest first.
async fn all_events(mesh: &Mesh, instance: &str, req: ListAuditEventsRequest) -> Vec<AuditEvent> {
    let mut client = mesh.audit(instance, ADMIN_TOKEN);
    let mut out = Vec::new();
    let mut req = ListAuditEventsRequest {
        page_size: 2,
        ..req
    };
    loop {
        let resp = client
            .list_audit_events(req.clone())
            .await
            .expect("list audit events")
            .into_inner();
        out.extend(resp.events);
        if resp.next_page_token.is_empty() {
            return out;
        }
        req.page_token = resp.next_page_token;
    }
}

fn find<'a>(events: &'a [AuditEvent], action: &str, target: &str) -> &'a AuditEvent {
    events
        .iter()
        .find(|e| e.action == action && e.target == target)
        .unwrap_or_else(|| panic!("no {action} of {target} in {events:#?}"))
}

async fn audit_log_says_who_did_what_and_when(postgres: bool) {
    let mesh = Mesh::start_with(MeshOptions {
        no_runner: true,
        postgres,
        approval_rules: Some(RULES.into()),
        ..Default::default()
    })
    .await;
    let start = now_micros();
    let approved = submit(&mesh, ALICE_TOKEN, prod_job("approved")).await;
    let rejected = submit(&mesh, ALICE_TOKEN, prod_job("rejected")).await;
    let cancelled = submit(&mesh, ALICE_TOKEN, python_job("cancelled", "print(1)", &[])).await;
    for job in [&approved, &rejected] {
        wait_state(&mesh, &job.id, JobState::AwaitingApproval, WAIT).await;
    }
    let mut carol = mesh.scheduler(APPROVER_TOKEN);
    carol
        .approve_job(ApproveJobRequest {
            job_id: approved.id.clone(),
            note: "looks fine".into(),
        })
        .await
        .expect("approve");
    carol
        .reject_job(RejectJobRequest {
            job_id: rejected.id.clone(),
            note: "too big".into(),
        })
        .await
        .expect("reject");
    // A decision that is refused changes nothing, and records nothing.
    carol
        .approve_job(ApproveJobRequest {
            job_id: rejected.id.clone(),
            note: "changed my mind".into(),
        })
        .await
        .expect_err("a rejected job cannot be approved");
    let mut admin = mesh.scheduler(ADMIN_TOKEN);
    admin
        .set_limits(SetLimitsRequest {
            limits: Some(Limits {
                scope: LimitScope::User as i32,
                subject: "alice".into(),
                max_running_jobs: Some(4),
                ..Default::default()
            }),
        })
        .await
        .expect("set limits");
    admin
        .hold_queue(HoldQueueRequest {
            reason: "upgrade".into(),
        })
        .await
        .expect("hold");
    admin
        .release_queue(ReleaseQueueRequest {})
        .await
        .expect("release");
    mesh.jobs(ALICE_TOKEN)
        .cancel_job(CancelJobRequest {
            job_id: approved.id.clone(),
            reason: "her own".into(),
        })
        .await
        .expect("alice cancels her own job");
    mesh.jobs(ADMIN_TOKEN)
        .cancel_job(CancelJobRequest {
            job_id: cancelled.id.clone(),
            reason: "wrong dataset".into(),
        })
        .await
        .expect("admin cancels alice's job");
    // Cancelling it again changes nothing: no second record.
    mesh.jobs(ADMIN_TOKEN)
        .cancel_job(CancelJobRequest {
            job_id: cancelled.id.clone(),
            reason: "again".into(),
        })
        .await
        .ok();
    let mut tokens = mesh.tokens(ADMIN_TOKEN);
    let token = tokens
        .create_token(CreateTokenRequest {
            user: "gina".into(),
            org: "ml".into(),
            roles: vec!["user".into()],
            ..Default::default()
        })
        .await
        .expect("create token")
        .into_inner()
        .token
        .unwrap();
    tokens
        .revoke_token(RevokeTokenRequest {
            id: token.id.clone(),
        })
        .await
        .expect("revoke token");
    let end = now_micros();

    let sched = all_events(&mesh, "scheduler-service", Default::default()).await;
    let jobs = all_events(&mesh, "job-service", Default::default()).await;
    for (events, service) in [(&sched, "scheduler-service"), (&jobs, "job-service")] {
        for e in events.iter() {
            let at = from_timestamp(e.time.as_ref().expect("a time"));
            assert!((start..=end).contains(&at), "{e:?} outside the test");
            assert_eq!(e.service, service);
        }
        let times: Vec<_> = events.iter().map(|e| e.time.unwrap().seconds).collect();
        assert!(times.windows(2).all(|w| w[0] >= w[1]), "newest first");
    }
    let ids: HashSet<_> = sched.iter().chain(&jobs).map(|e| &e.id).collect();
    assert_eq!(ids.len(), sched.len() + jobs.len(), "ids are unique");
    assert_eq!(sched.len(), 5, "{sched:#?}");
    assert_eq!(
        jobs.len(),
        3,
        "only the admin's cancel, and two token changes: {jobs:#?}"
    );

    let e = find(&sched, "approve_job", &approved.id);
    assert_eq!(
        (e.actor.as_str(), e.details["note"].as_str()),
        ("carol", "looks fine")
    );
    assert_eq!(e.details["rule"], "prod-tier");
    let e = find(&sched, "reject_job", &rejected.id);
    assert_eq!(
        (e.actor.as_str(), e.details["note"].as_str()),
        ("carol", "too big")
    );
    let e = find(&sched, "set_limits", "USER alice");
    assert_eq!(
        (e.actor.as_str(), e.details["max_running_jobs"].as_str()),
        ("admin", "4")
    );
    assert_eq!(
        find(&sched, "hold_queue", "queue").details["reason"],
        "upgrade"
    );
    assert_eq!(find(&sched, "release_queue", "queue").actor, "admin");
    let e = find(&jobs, "cancel_job", &cancelled.id);
    assert_eq!(
        (e.actor.as_str(), e.details["owner"].as_str()),
        ("admin", "alice")
    );
    assert_eq!(
        find(&jobs, "create_token", &token.id).details["user"],
        "gina"
    );
    assert_eq!(find(&jobs, "revoke_token", &token.id).actor, "admin");

    // Filters.
    let carols = all_events(
        &mesh,
        "scheduler-service",
        ListAuditEventsRequest {
            actor: "carol".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(carols.len(), 2);
    let holds = all_events(
        &mesh,
        "scheduler-service",
        ListAuditEventsRequest {
            action: "hold_queue".into(),
            since: Some(trainmesh_common::time::to_timestamp(start)),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(holds.len(), 1);
    let later = all_events(
        &mesh,
        "job-service",
        ListAuditEventsRequest {
            since: Some(trainmesh_common::time::to_timestamp(end + 1)),
            ..Default::default()
        },
    )
    .await;
    assert!(later.is_empty());

    // `trainctl audit` merges both services by time, oldest first.
    let out = mesh
        .trainctl(ADMIN_TOKEN, &["-o", "json", "audit", "--since", "1h"])
        .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let merged = v["events"].as_array().expect("events");
    let actions: Vec<&str> = merged
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    // The order the test acted in, across both services.
    assert_eq!(
        actions,
        [
            "approve_job",
            "reject_job",
            "set_limits",
            "hold_queue",
            "release_queue",
            "cancel_job",
            "create_token",
            "revoke_token"
        ],
        "{v:#}"
    );
}

#[tokio::test]
async fn audit_log_says_who_did_what_and_when_sqlite() {
    audit_log_says_who_did_what_and_when(false).await;
}

#[tokio::test]
async fn audit_log_says_who_did_what_and_when_postgres() {
    if postgres_or_skip("audit_log_says_who_did_what_and_when_postgres") {
        audit_log_says_who_did_what_and_when(true).await;
    }
}

/// `trainctl tokens create|list|revoke` against a running mesh: the secret
/// is printed once and works; the list never shows it; revoke stops it.
#[tokio::test]
async fn trainctl_creates_lists_and_revokes_tokens() {
    let mesh = Mesh::start_with(MeshOptions {
        no_runner: true,
        ..Default::default()
    })
    .await;
    let mesh = &mesh;
    let run = |args: Vec<String>| async move {
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = mesh.trainctl(ADMIN_TOKEN, &argv).await;
        assert!(
            out.status.success(),
            "trainctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let (secret, note) = run(args(&[
        "tokens",
        "create",
        "--user",
        "gina",
        "--org",
        "ml",
        "--role",
        "user",
        "--role",
        "approver",
        "--ttl",
        "30d",
        "--description",
        "laptop",
    ]))
    .await;
    let secret = secret.trim().to_owned();
    assert!(secret.starts_with("tm_"), "{secret}");
    assert!(note.contains("shown only now"), "{note}");
    let id = note
        .split_whitespace()
        .find(|w| w.starts_with("tok_"))
        .expect("the id on stderr")
        .to_owned();
    mesh.jobs(&secret)
        .list_jobs(ListJobsRequest::default())
        .await
        .expect("the printed token works");

    let (table, _) = run(args(&["tokens", "list"])).await;
    assert!(
        table.contains(&id) && table.contains("user,approver"),
        "{table}"
    );
    assert!(
        table.contains("active") && table.contains("laptop"),
        "{table}"
    );
    assert!(!table.contains(&secret));
    let (json, _) = run(args(&["-o", "json", "tokens", "list"])).await;
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["tokens"][0]["id"], id.as_str());
    assert!(!json.contains(&secret));

    run(args(&["tokens", "revoke", &id])).await;
    let refused = mesh
        .jobs(&secret)
        .list_jobs(ListJobsRequest::default())
        .await
        .expect_err("a revoked token is refused");
    assert!(refused.message().contains("revoked"), "{refused:?}");
    let (table, _) = run(args(&["tokens", "list"])).await;
    assert!(table.contains("revoked"), "{table}");
}
