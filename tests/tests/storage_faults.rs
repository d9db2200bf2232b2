//! A database that stops taking writes (a full disk under SQLite; a
//! read-only database with its connections cut under PostgreSQL), for
//! job-service, the scheduler and metrics-service as real processes:
//! nothing is acknowledged that was not stored, health is NOT_SERVING
//! while writes fail and SERVING once they work again, and after the
//! fault and a restart every acknowledged write is there, exactly once.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use trainmesh_common::testing::{postgres_db, wait_for, TestDb};
use trainmesh_proto::job::v1::job_service_client::JobServiceClient;
use trainmesh_proto::job::v1::{CreateJobRequest, GetJobRequest, JobSpec};
use trainmesh_proto::metrics::v1::metrics_service_client::MetricsServiceClient;
use trainmesh_proto::metrics::v1::{MetricPoint, QueryMetricsRequest, WriteMetricsRequest};
use trainmesh_proto::scheduler::v1::scheduler_service_client::SchedulerServiceClient;
use trainmesh_proto::scheduler::v1::{
    GetLimitsRequest, GetQueueRequest, LimitScope, Limits, SetLimitsRequest,
};
use trainmesh_tests::faults::{PgReadOnly, SmallFs, StorageFault};
use trainmesh_tests::{Mesh, MeshOptions, ADMIN_TOKEN, ALICE_TOKEN};

/// Room for a service's database and its WAL before the filler takes the
/// rest.
const FS_BYTES: u64 = 24 << 20;
/// Writes tried under the fault before concluding it never bites.
const MAX_TRIES: usize = 5000;
const HEALTH_DEADLINE: Duration = Duration::from_secs(20);

/// A mesh (no runner) whose `binary` keeps its SQLite database on a small
/// filesystem, and the fault that fills it; `None` when this process may
/// not mount one.
async fn disk_full_mesh(binary: &str) -> Option<(Mesh, StorageFault)> {
    let fs = SmallFs::mount(FS_BYTES)?;
    let url = trainmesh_common::db::sqlite_url(fs.path(), &format!("{binary}.db"));
    let opts = MeshOptions {
        no_runner: true,
        ..Default::default()
    }
    .arg(binary, &["--database-url", &url]);
    Some((Mesh::start_with(opts).await, StorageFault::DiskFull(fs)))
}

/// A mesh (no runner) with job-service and the scheduler on PostgreSQL,
/// and the fault that makes database `which` of [`Mesh::postgres_urls`]
/// read-only; `None` without a PostgreSQL server.
async fn read_only_mesh(which: usize) -> Option<(Mesh, StorageFault)> {
    postgres_db().await?;
    let mesh = Mesh::start_with(MeshOptions {
        no_runner: true,
        postgres: true,
        ..Default::default()
    })
    .await;
    let fault = StorageFault::ReadOnly(PgReadOnly::new(&mesh.postgres_urls()[which]));
    Some((mesh, fault))
}

async fn health(mesh: &Mesh, instance: &str) -> Option<ServingStatus> {
    let ch = mesh.endpoint_channel(instance, None);
    let resp = tonic_health::pb::health_client::HealthClient::new(ch)
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .ok()?;
    ServingStatus::try_from(resp.into_inner().status).ok()
}

async fn wait_health(mesh: &Mesh, instance: &str, want: ServingStatus, label: &str) {
    wait_for(
        &format!("{label}: {instance} health {want:?}"),
        HEALTH_DEADLINE,
        || async move { (health(mesh, instance).await == Some(want)).then_some(()) },
    )
    .await;
}

/// A refusal under the fault must tell the caller to retry.
fn assert_retryable(status: &tonic::Status, label: &str) {
    assert_eq!(
        status.code(),
        Code::Unavailable,
        "{label}: a write the database refused must be UNAVAILABLE: {status:?}"
    );
}

/// Under a fault, makes writes (`write(i)` for i = 0, 1, …) until five
/// are refused — each refusal must be UNAVAILABLE, and the first must turn
/// `instance`'s health NOT_SERVING — and returns what was acknowledged.
async fn write_until_refused<T, F, Fut>(
    mesh: &Mesh,
    instance: &str,
    label: &str,
    mut write: F,
) -> Vec<T>
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let mut acked = Vec::new();
    let mut refused = 0;
    for i in 0..MAX_TRIES {
        match write(i).await {
            Ok(v) => acked.push(v),
            Err(s) => {
                assert_retryable(&s, label);
                refused += 1;
                if refused == 1 {
                    wait_health(mesh, instance, ServingStatus::NotServing, label).await;
                }
                if refused == 5 {
                    assert_eq!(
                        health(mesh, instance).await,
                        Some(ServingStatus::NotServing),
                        "{label}: {instance} health while writes fail"
                    );
                    return acked;
                }
            }
        }
    }
    panic!("{label}: {instance} refused {refused} of {MAX_TRIES} writes, not 5");
}

/// Ends the fault and waits for `instance` to say it is SERVING again.
async fn recover(mesh: &Mesh, instance: &str, fault: &StorageFault) {
    fault.clear().await;
    wait_health(mesh, instance, ServingStatus::Serving, fault.label()).await;
}

// ---------------------------------------------------------------------------
// job-service

fn jobs_client(mesh: &Mesh) -> JobServiceClient<trainmesh_common::client::Channel> {
    // Through the address file, so the client follows a restart.
    JobServiceClient::new(mesh.endpoint_channel("job-service", Some(ALICE_TOKEN)))
}

async fn create(mesh: &Mesh, key: &str) -> Result<(String, bool), tonic::Status> {
    let resp = jobs_client(mesh)
        .create_job(CreateJobRequest {
            spec: Some(JobSpec {
                name: "storage-fault".into(),
                image: "busybox".into(),
                command: vec!["true".into()],
                ..Default::default()
            }),
            idempotency_key: key.into(),
        })
        .await?
        .into_inner();
    Ok((resp.job.expect("job").id, resp.existing))
}

/// Replays every key; returns key → job id, and checks each job exists.
async fn replay(mesh: &Mesh, keys: &BTreeSet<String>, label: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for k in keys {
        let (id, _) = create(mesh, k)
            .await
            .unwrap_or_else(|s| panic!("{label}: replay of `{k}`: {s:?}"));
        jobs_client(mesh)
            .get_job(GetJobRequest { job_id: id.clone() })
            .await
            .unwrap_or_else(|s| panic!("{label}: job `{id}` of key `{k}`: {s:?}"));
        out.insert(k.clone(), id);
    }
    out
}

async fn job_service_acknowledges_only_stored_jobs(mesh: &mut Mesh, fault: &StorageFault) {
    let label = fault.label();
    let mut acked = BTreeMap::new();
    let mut keys = BTreeSet::new();
    for i in 0..10 {
        let k = format!("before-{i}");
        let (id, _) = create(mesh, &k).await.expect("create before the fault");
        acked.insert(k.clone(), id);
        keys.insert(k);
    }

    fault.inject().await;
    let m: &Mesh = mesh;
    let during = write_until_refused(m, "job-service", label, |i| {
        let k = format!("during-{i}");
        keys.insert(k.clone());
        async move { create(m, &k).await.map(|(id, _)| (k, id)) }
    })
    .await;
    acked.extend(during);
    recover(mesh, "job-service", fault).await;
    for i in 0..10 {
        let k = format!("after-{i}");
        let (id, existing) = create(mesh, &k).await.expect("create after the fault");
        assert!(!existing, "{label}: `{k}` is new");
        acked.insert(k.clone(), id);
        keys.insert(k);
    }

    // Every acknowledged job is stored; a refused key makes its job now.
    let before = replay(mesh, &keys, label).await;
    for (k, id) in &acked {
        assert_eq!(&before[k], id, "{label}: replay of acknowledged `{k}`");
    }
    mesh.stop_instance("job-service").await;
    mesh.start_instance("job-service").await;
    let after = replay(mesh, &keys, label).await;
    assert_eq!(before, after, "{label}: replays before and after a restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_service_disk_full_acknowledges_only_stored_jobs() {
    let Some((mut mesh, fault)) = disk_full_mesh("job-service").await else {
        eprintln!("skipped: no tmpfs can be mounted here");
        return;
    };
    job_service_acknowledges_only_stored_jobs(&mut mesh, &fault).await;
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_service_read_only_postgres_acknowledges_only_stored_jobs() {
    let Some((mut mesh, fault)) = read_only_mesh(0).await else {
        eprintln!("skipped: TRAINMESH_TEST_POSTGRES_URL is not set");
        return;
    };
    job_service_acknowledges_only_stored_jobs(&mut mesh, &fault).await;
    mesh.stop().await;
}

// ---------------------------------------------------------------------------
// scheduler-service

fn scheduler_client(mesh: &Mesh) -> SchedulerServiceClient<trainmesh_common::client::Channel> {
    SchedulerServiceClient::new(mesh.endpoint_channel("scheduler-service", Some(ADMIN_TOKEN)))
}

async fn set_limit(mesh: &Mesh, user: &str, value: i32) -> Result<(), tonic::Status> {
    scheduler_client(mesh)
        .set_limits(SetLimitsRequest {
            limits: Some(Limits {
                scope: LimitScope::User as i32,
                subject: user.into(),
                max_running_jobs: Some(value),
                ..Default::default()
            }),
        })
        .await
        .map(|_| ())
}

/// The user limits the scheduler has stored: user → max running jobs.
async fn stored_limits(mesh: &Mesh) -> BTreeMap<String, i32> {
    let resp = scheduler_client(mesh)
        .get_limits(GetLimitsRequest::default())
        .await
        .expect("get limits")
        .into_inner();
    resp.limits
        .into_iter()
        .filter(|l| l.scope == LimitScope::User as i32)
        .filter_map(|l| l.max_running_jobs.map(|v| (l.subject, v)))
        .collect()
}

/// Job ids in the scheduler's queue.
async fn queued(mesh: &Mesh) -> Vec<String> {
    let mut ids = Vec::new();
    let mut token = String::new();
    loop {
        let resp = scheduler_client(mesh)
            .get_queue(GetQueueRequest {
                page_size: 500,
                page_token: token,
                ..Default::default()
            })
            .await
            .expect("get queue")
            .into_inner();
        ids.extend(resp.entries.into_iter().map(|e| e.job_id));
        if resp.next_page_token.is_empty() {
            return ids;
        }
        token = resp.next_page_token;
    }
}

async fn scheduler_acknowledges_only_stored_writes(mesh: &mut Mesh, fault: &StorageFault) {
    let label = fault.label();
    let mut submitted = BTreeSet::new();
    for i in 0..5 {
        submitted.insert(create(mesh, &format!("before-{i}")).await.unwrap().0);
    }
    let mut acked = BTreeMap::new();
    for i in 0..5 {
        let user = format!("before-{i}");
        set_limit(mesh, &user, 1 + i).await.expect("set limits");
        acked.insert(user, 1 + i);
    }

    fault.inject().await;
    // Jobs keep coming through job-service; the scheduler must take each
    // exactly once, whenever it can.
    for i in 0..20 {
        submitted.insert(create(mesh, &format!("during-{i}")).await.unwrap().0);
    }
    let m: &Mesh = mesh;
    let during = write_until_refused(m, "scheduler-service", label, |i| {
        let user = format!("during-{i}");
        let value = (i % 100) as i32 + 1;
        async move { set_limit(m, &user, value).await.map(|()| (user, value)) }
    })
    .await;
    acked.extend(during);
    recover(mesh, "scheduler-service", fault).await;
    for i in 0..5 {
        submitted.insert(create(mesh, &format!("after-{i}")).await.unwrap().0);
        let user = format!("after-{i}");
        set_limit(mesh, &user, 7)
            .await
            .expect("set limits after the fault");
        acked.insert(user, 7);
    }

    let expect_queue = |ids: Vec<String>| {
        let set: BTreeSet<String> = ids.iter().cloned().collect();
        assert_eq!(set.len(), ids.len(), "{label}: a job queued twice");
        set
    };
    wait_for(
        &format!("{label}: every job queued at the scheduler"),
        Duration::from_secs(30),
        || async { (expect_queue(queued(mesh).await) == submitted).then_some(()) },
    )
    .await;
    let check = |stored: BTreeMap<String, i32>| {
        for (user, v) in &acked {
            assert_eq!(
                stored.get(user),
                Some(v),
                "{label}: acknowledged limit of `{user}`"
            );
        }
    };
    check(stored_limits(mesh).await);
    mesh.stop_instance("scheduler-service").await;
    mesh.start_instance("scheduler-service").await;
    check(stored_limits(mesh).await);
    assert_eq!(
        expect_queue(queued(mesh).await),
        submitted,
        "{label}: after a restart"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduler_disk_full_acknowledges_only_stored_writes() {
    let Some((mut mesh, fault)) = disk_full_mesh("scheduler-service").await else {
        eprintln!("skipped: no tmpfs can be mounted here");
        return;
    };
    scheduler_acknowledges_only_stored_writes(&mut mesh, &fault).await;
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduler_read_only_postgres_acknowledges_only_stored_writes() {
    let Some((mut mesh, fault)) = read_only_mesh(1).await else {
        eprintln!("skipped: TRAINMESH_TEST_POSTGRES_URL is not set");
        return;
    };
    scheduler_acknowledges_only_stored_writes(&mut mesh, &fault).await;
    mesh.stop().await;
}

// ---------------------------------------------------------------------------
// metrics-service

fn metrics_client(mesh: &Mesh) -> MetricsServiceClient<trainmesh_common::client::Channel> {
    MetricsServiceClient::new(mesh.endpoint_channel("metrics-service", Some(ADMIN_TOKEN)))
}

const POINTS_PER_BATCH: i64 = 50;

/// One batch: `POINTS_PER_BATCH` steps of `loss` for a job of its own.
async fn write_batch(mesh: &Mesh, job_id: &str) -> Result<(), tonic::Status> {
    let points = (0..POINTS_PER_BATCH)
        .map(|step| MetricPoint {
            key: "loss".into(),
            step,
            value: step as f64,
            ..Default::default()
        })
        .collect();
    metrics_client(mesh)
        .write_metrics(WriteMetricsRequest {
            attempt: 0,
            job_id: job_id.into(),
            points,
            json_records: Vec::new(),
        })
        .await
        .map(|_| ())
}

async fn stored_steps(mesh: &Mesh, job_id: &str) -> usize {
    let resp = metrics_client(mesh)
        .query_metrics(QueryMetricsRequest {
            job_id: job_id.into(),
            keys: vec!["loss".into()],
            max_points: 1000,
            ..Default::default()
        })
        .await
        .expect("query metrics")
        .into_inner();
    resp.series.iter().map(|s| s.points.len()).sum()
}

async fn metrics_acknowledges_only_stored_points(mesh: &mut Mesh, fault: &StorageFault) {
    let label = fault.label();
    let new_job = || uuid::Uuid::now_v7().to_string();
    let mut acked = Vec::new();
    for _ in 0..5 {
        let job = new_job();
        write_batch(mesh, &job)
            .await
            .expect("write before the fault");
        acked.push(job);
    }
    fault.inject().await;
    let m: &Mesh = mesh;
    let during = write_until_refused(m, "metrics-service", label, |_| {
        let job = new_job();
        async move { write_batch(m, &job).await.map(|()| job) }
    })
    .await;
    acked.extend(during);
    recover(mesh, "metrics-service", fault).await;
    for _ in 0..5 {
        let job = new_job();
        write_batch(mesh, &job)
            .await
            .expect("write after the fault");
        acked.push(job);
    }
    mesh.stop_instance("metrics-service").await;
    mesh.start_instance("metrics-service").await;
    for job in &acked {
        assert_eq!(
            stored_steps(mesh, job).await,
            POINTS_PER_BATCH as usize,
            "{label}: acknowledged batch of job `{job}`"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_disk_full_acknowledges_only_stored_points() {
    let Some((mut mesh, fault)) = disk_full_mesh("metrics-service").await else {
        eprintln!("skipped: no tmpfs can be mounted here");
        return;
    };
    metrics_acknowledges_only_stored_points(&mut mesh, &fault).await;
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_read_only_postgres_acknowledges_only_stored_points() {
    let Some(db): Option<TestDb> = postgres_db().await else {
        eprintln!("skipped: TRAINMESH_TEST_POSTGRES_URL is not set");
        return;
    };
    let opts = MeshOptions {
        no_runner: true,
        ..Default::default()
    }
    .arg("metrics-service", &["--database-url", &db.url]);
    let mut mesh = Mesh::start_with(opts).await;
    let fault = StorageFault::ReadOnly(PgReadOnly::new(&db.url));
    metrics_acknowledges_only_stored_points(&mut mesh, &fault).await;
    mesh.stop().await;
}
