//! The outbox relay against small in-test peers (real gRPC on loopback):
//! a scheduler that records EnqueueJob/CancelQueuedJob, and a diagnosis
//! service that answers DiagnoseJob.

use std::sync::{Arc, Mutex};

use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};
use trainmesh_common::proto::diagnosis::v1 as dpb;
use trainmesh_common::proto::job::v1 as pb;
use trainmesh_common::proto::scheduler::v1 as spb;
use trainmesh_common::testing::{self, all_dbs, wait_for};

use crate::support::*;

#[derive(Clone, Debug, PartialEq)]
enum Call {
    Enqueue {
        req: Box<spb::EnqueueJobRequest>,
        authorization: String,
        correlation_id: String,
    },
    Cancel(spb::CancelQueuedJobRequest),
}

#[derive(Clone, Default)]
struct FakeScheduler {
    calls: Arc<Mutex<Vec<Call>>>,
    /// While set, EnqueueJob answers UNAVAILABLE (a scheduler whose
    /// database fails, or that is shedding load) and records the job.
    down: Arc<std::sync::atomic::AtomicBool>,
    refused: Arc<Mutex<Vec<String>>>,
    /// While set, EnqueueJob refuses every job with this status.
    refuse_with: Arc<Mutex<Option<(tonic::Code, String)>>>,
}

fn header(req: &Request<impl Sized>, name: &str) -> String {
    req.metadata()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

#[tonic::async_trait]
impl spb::scheduler_internal_service_server::SchedulerInternalService for FakeScheduler {
    async fn enqueue_job(
        &self,
        req: Request<spb::EnqueueJobRequest>,
    ) -> Result<Response<spb::EnqueueJobResponse>, Status> {
        if let Some((code, message)) = self.refuse_with.lock().unwrap().clone() {
            self.refused.lock().unwrap().push(req.into_inner().job_id);
            return Err(Status::new(code, message));
        }
        if self.down.load(std::sync::atomic::Ordering::SeqCst) {
            self.refused.lock().unwrap().push(req.into_inner().job_id);
            return Err(Status::unavailable("the scheduler's database is failing"));
        }
        let call = Call::Enqueue {
            authorization: header(&req, "authorization"),
            correlation_id: header(&req, "x-correlation-id"),
            req: Box::new(req.into_inner()),
        };
        self.calls.lock().unwrap().push(call);
        Ok(Response::new(spb::EnqueueJobResponse {
            state: pb::JobState::Queued as i32,
            created: true,
        }))
    }

    async fn cancel_queued_job(
        &self,
        req: Request<spb::CancelQueuedJobRequest>,
    ) -> Result<Response<spb::CancelQueuedJobResponse>, Status> {
        self.calls
            .lock()
            .unwrap()
            .push(Call::Cancel(req.into_inner()));
        Ok(Response::new(spb::CancelQueuedJobResponse {
            state: pb::JobState::Cancelled as i32,
        }))
    }
}

impl FakeScheduler {
    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    /// Serves on a port-0 listener and writes its address to `addr_file`.
    async fn start(&self, addr_file: &std::path::Path) {
        let (listener, addr) = testing::listener().await;
        let svc = spb::scheduler_internal_service_server::SchedulerInternalServiceServer::new(
            self.clone(),
        );
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        trainmesh_common::client::write_addr_file(addr_file, addr).unwrap();
    }
}

#[derive(Clone, Default)]
struct FakeDiagnosis {
    asked: Arc<Mutex<Vec<String>>>,
}

#[tonic::async_trait]
impl dpb::diagnosis_service_server::DiagnosisService for FakeDiagnosis {
    async fn diagnose_job(
        &self,
        req: Request<dpb::DiagnoseJobRequest>,
    ) -> Result<Response<dpb::DiagnoseJobResponse>, Status> {
        let job_id = req.into_inner().job_id;
        self.asked.lock().unwrap().push(job_id.clone());
        Ok(Response::new(dpb::DiagnoseJobResponse {
            diagnosis: Some(dpb::Diagnosis {
                id: format!("diag-{job_id}"),
                job_id,
                healthy: false,
                error: "CUDA out of memory".into(),
                solution: "reduce the batch size".into(),
                ..Default::default()
            }),
        }))
    }

    async fn get_diagnosis(
        &self,
        _: Request<dpb::GetDiagnosisRequest>,
    ) -> Result<Response<dpb::GetDiagnosisResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn list_diagnoses(
        &self,
        _: Request<dpb::ListDiagnosesRequest>,
    ) -> Result<Response<dpb::ListDiagnosesResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn list_prompt_templates(
        &self,
        _: Request<dpb::ListPromptTemplatesRequest>,
    ) -> Result<Response<dpb::ListPromptTemplatesResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
}

fn enqueued_ids(calls: &[Call]) -> Vec<String> {
    calls
        .iter()
        .filter_map(|c| match c {
            Call::Enqueue { req, .. } => Some(req.job_id.clone()),
            Call::Cancel(_) => None,
        })
        .collect()
}

#[tokio::test]
async fn job_created_while_the_scheduler_is_down_is_delivered_when_it_comes_up() {
    for db in all_dbs().await {
        let dir = tempfile::tempdir().unwrap();
        let addr_file = dir.path().join("scheduler.addr");
        let ep = format!("file:{}", addr_file.display());
        let app = App::start_in(&db, dir, |c| c.scheduler_endpoint = ep).await;
        let mut s = spec("early");
        s.priority = 7;
        let job = trainmesh_common::correlation::scope("cid-outbox-1", async {
            create(&mut app.alice(), s.clone()).await
        })
        .await;

        let fake = FakeScheduler::default();
        fake.start(&addr_file).await;
        let calls = wait_for("the job to reach the scheduler", WAIT, || {
            let fake = fake.clone();
            async move {
                let c = fake.calls();
                (!c.is_empty()).then_some(c)
            }
        })
        .await;
        let Call::Enqueue {
            req,
            authorization,
            correlation_id,
        } = &calls[0]
        else {
            panic!("expected EnqueueJob, got {calls:?}");
        };
        assert_eq!(req.job_id, job.id, "{}", app.label);
        assert_eq!(req.owner, "alice");
        assert_eq!(req.org, "ml");
        assert_eq!(req.spec.as_ref(), Some(&s));
        assert_eq!(req.correlation_id, "cid-outbox-1");
        assert!(req.submit_time.is_some());
        assert_eq!(authorization, &format!("Bearer {}", app.tokens.job_service));
        assert_eq!(correlation_id, "cid-outbox-1");

        // Delivered once: a later job arrives, the first is not repeated.
        let second = create(&mut app.alice(), spec("second")).await;
        let ids = wait_for("the second job", WAIT, || {
            let fake = fake.clone();
            async move {
                let ids = enqueued_ids(&fake.calls());
                (ids.len() >= 2).then_some(ids)
            }
        })
        .await;
        assert_eq!(ids, vec![job.id.clone(), second.id.clone()]);
    }
}

#[tokio::test]
async fn undelivered_jobs_survive_a_restart() {
    for db in all_dbs().await {
        let dir = tempfile::tempdir().unwrap();
        let addr_file = dir.path().join("scheduler.addr");
        let ep = format!("file:{}", addr_file.display());
        let app = App::start_in(&db, dir, |c| c.scheduler_endpoint = ep.clone()).await;
        let job = create(&mut app.alice(), spec("kept")).await;
        let dir = app.stop().await;

        let fake = FakeScheduler::default();
        fake.start(&addr_file).await;
        let app = App::start_in(&db, dir, |c| c.scheduler_endpoint = ep).await;
        let ids = wait_for("delivery after restart", WAIT, || {
            let fake = fake.clone();
            async move {
                let ids = enqueued_ids(&fake.calls());
                (!ids.is_empty()).then_some(ids)
            }
        })
        .await;
        assert_eq!(ids, vec![job.id.clone()], "{}", app.label);
        assert_eq!(
            state(&get(&mut app.alice(), &job.id).await.unwrap()),
            pb::JobState::Pending
        );
    }
}

#[tokio::test]
async fn cancel_follows_the_enqueue_to_the_scheduler() {
    for db in all_dbs().await {
        let dir = tempfile::tempdir().unwrap();
        let addr_file = dir.path().join("scheduler.addr");
        let fake = FakeScheduler::default();
        fake.start(&addr_file).await;
        let ep = format!("file:{}", addr_file.display());
        let app = App::start_in(&db, dir, |c| c.scheduler_endpoint = ep).await;
        let job = create(&mut app.alice(), spec("to-cancel")).await;
        make_running(&app, &job.id).await;
        app.alice()
            .cancel_job(pb::CancelJobRequest {
                job_id: job.id.clone(),
                reason: "stop".into(),
            })
            .await
            .unwrap();
        let calls = wait_for("the cancel", WAIT, || {
            let fake = fake.clone();
            async move {
                let c = fake.calls();
                (c.len() >= 2).then_some(c)
            }
        })
        .await;
        assert!(
            matches!(&calls[0], Call::Enqueue { req, .. } if req.job_id == job.id),
            "{}",
            app.label
        );
        assert_eq!(
            calls[1],
            Call::Cancel(spb::CancelQueuedJobRequest {
                job_id: job.id.clone(),
                reason: "stop".into(),
            })
        );
    }
}

#[tokio::test]
async fn failed_job_is_diagnosed_and_the_summary_attached() {
    for db in all_dbs().await {
        let (listener, addr) = testing::listener().await;
        let fake = FakeDiagnosis::default();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(dpb::diagnosis_service_server::DiagnosisServiceServer::new(
                    fake.clone(),
                ))
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        let app = App::start_with(&db, |c| c.diagnosis_endpoint = Some(addr.to_string())).await;
        let job = create(&mut app.alice(), spec("will-fail")).await;
        make_running(&app, &job.id).await;
        let mut f = update(&job.id, pb::JobState::Failed, 4);
        f.exit_code = Some(1);
        apply(&app, f).await.unwrap();
        let d = wait_for("the diagnosis on the job", WAIT, || {
            let mut alice = app.alice();
            let id = job.id.clone();
            async move { get(&mut alice, &id).await.ok().and_then(|j| j.diagnosis) }
        })
        .await;
        assert_eq!(d.diagnosis_id, format!("diag-{}", job.id), "{}", app.label);
        assert_eq!(d.error, "CUDA out of memory");
        assert_eq!(d.solution, "reduce the batch size");
        assert!(!d.healthy);
        assert_eq!(fake.asked.lock().unwrap().clone(), vec![job.id.clone()]);
    }
}

#[tokio::test]
async fn an_unreachable_scheduler_is_probed_with_one_job_and_then_gets_the_backlog() {
    for db in all_dbs().await {
        let dir = tempfile::tempdir().unwrap();
        let addr_file = dir.path().join("scheduler.addr");
        let fake = FakeScheduler::default();
        fake.down.store(true, std::sync::atomic::Ordering::SeqCst);
        fake.start(&addr_file).await;
        let ep = format!("file:{}", addr_file.display());
        let app = App::start_in(&db, dir, |c| c.scheduler_endpoint = ep).await;
        let mut ids = Vec::new();
        for i in 0..20 {
            ids.push(
                create(&mut app.alice(), spec(&format!("backlog-{i}")))
                    .await
                    .id,
            );
        }
        // Each message backing off on its own would try every job; the
        // destination backing off as a whole probes it with one.
        let refused = wait_for("several probes of the scheduler", WAIT, || {
            let fake = fake.clone();
            async move {
                let r = fake.refused.lock().unwrap().clone();
                (r.len() >= 5).then_some(r)
            }
        })
        .await;
        let probed: std::collections::BTreeSet<&String> = refused.iter().collect();
        assert_eq!(probed.len(), 1, "{}: probes named {probed:?}", app.label);

        fake.down.store(false, std::sync::atomic::Ordering::SeqCst);
        let delivered = wait_for("the backlog", WAIT, || {
            let fake = fake.clone();
            let n = ids.len();
            async move {
                let d = enqueued_ids(&fake.calls());
                (d.len() >= n).then_some(d)
            }
        })
        .await;
        let mut got = delivered.clone();
        got.sort();
        let mut want = ids.clone();
        want.sort();
        assert_eq!(got, want, "{}: each job once: {delivered:?}", app.label);
    }
}

/// Every answer of the scheduler that retrying cannot change ends the job
/// FAILED with the scheduler's reason; none leaves it PENDING.
#[tokio::test]
async fn every_refusal_of_the_enqueue_ends_the_job_failed_with_the_reason() {
    use tonic::Code::*;
    let db = &all_dbs().await[0];
    let dir = tempfile::tempdir().unwrap();
    let addr_file = dir.path().join("scheduler.addr");
    let fake = FakeScheduler::default();
    fake.start(&addr_file).await;
    let ep = format!("file:{}", addr_file.display());
    let app = App::start_in(db, dir, |c| c.scheduler_endpoint = ep).await;
    for code in [
        InvalidArgument,
        FailedPrecondition,
        NotFound,
        AlreadyExists,
        OutOfRange,
        Unimplemented,
        DataLoss,
    ] {
        let why = format!("refused with {code:?}: spec.resources.gpus is too many");
        *fake.refuse_with.lock().unwrap() = Some((code, why.clone()));
        let job = create(&mut app.alice(), spec("refused")).await;
        let job = wait_for("the refused job to fail", WAIT, || {
            let mut client = app.alice();
            let id = job.id.clone();
            async move {
                let j = get(&mut client, &id).await.unwrap();
                (state(&j) != pb::JobState::Pending).then_some(j)
            }
        })
        .await;
        assert_eq!(state(&job), pb::JobState::Failed, "{code:?}");
        assert_eq!(
            job.failure_cause,
            pb::FailureCause::Refused as i32,
            "{code:?}"
        );
        assert!(
            job.state_reason.contains(&why),
            "{code:?}: {}",
            job.state_reason
        );
        assert!(
            job.error_message.contains(&why),
            "{code:?}: {}",
            job.error_message
        );
    }
    // A refused credential is the sender's configuration, not the job: the
    // job waits, and is delivered once the scheduler takes it.
    *fake.refuse_with.lock().unwrap() = Some((
        PermissionDenied,
        "this call needs the `service` role".into(),
    ));
    let before = fake.refused.lock().unwrap().len();
    let job = create(&mut app.alice(), spec("waits")).await;
    wait_for("the enqueue to be refused twice", WAIT, || {
        let fake = fake.clone();
        async move { (fake.refused.lock().unwrap().len() >= before + 2).then_some(()) }
    })
    .await;
    assert_eq!(
        state(&get(&mut app.alice(), &job.id).await.unwrap()),
        pb::JobState::Pending
    );
    *fake.refuse_with.lock().unwrap() = None;
    wait_for("the waiting job to be delivered", WAIT, || {
        let fake = fake.clone();
        let id = job.id.clone();
        async move { enqueued_ids(&fake.calls()).contains(&id).then_some(()) }
    })
    .await;
}
