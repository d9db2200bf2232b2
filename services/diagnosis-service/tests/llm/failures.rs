//! An endpoint that is down, never answers, answers late, fails for a
//! while, refuses or answers in another format: the rules' answer comes
//! back in time all the same, and the analyses say why they are missing.

use super::*;

#[tokio::test]
async fn an_endpoint_that_is_down_leaves_the_rules_answer_and_says_why() {
    let tokens = testing::test_tokens();
    for db in testing::all_dbs().await {
        let fake = Arc::new(FakeJobs::default());
        let job_id = add_job(&fake, 0);
        let jobs = start_fake_jobs(fake).await;
        let (closed, closed_addr) = testing::listener().await;
        drop(closed);
        let server = Diag::start(&db, &jobs.to_string(), |c| {
            let mut s = LlmSettings::new(format!("http://{closed_addr}/v1"), "test-model");
            s.backoff = Duration::from_millis(10);
            c.llm = Some(s);
        })
        .await;
        let mut alice = server.client(tokens.alice);
        let rules_only = diagnose(&mut alice, &job_id, false).await;
        let mut req = Request::new(dpb::DiagnoseJobRequest {
            job_id: job_id.clone(),
            use_llm: true,
        });
        req.set_timeout(Duration::from_secs(10));
        let d = diagnose_req(&mut alice, req).await;
        assert_eq!(rules_answer(&d), rules_answer(&rules_only));
        assert_eq!(d.llm_analyses.len(), 1);
        let a = &d.llm_analyses[0];
        assert_eq!((a.kind.as_str(), a.replica.as_str()), ("job", ""));
        assert_eq!(status(a), dpb::LlmStatus::Failed);
        assert!(
            a.status_reason.contains("cannot reach the LLM endpoint"),
            "{}",
            a.status_reason
        );
        assert!(a.prompt_version.starts_with("builtin@"));
        assert!(
            d.llm_text.starts_with("[job] failed: cannot reach"),
            "{}",
            d.llm_text
        );
        assert_eq!(latest(&mut alice, &job_id).await, d);
        server.stop().await;
    }
}

#[tokio::test]
async fn an_endpoint_that_never_answers_cannot_hold_the_diagnosis_past_the_callers_deadline() {
    let tokens = testing::test_tokens();
    let db = testing::sqlite_db();
    let fake = Arc::new(FakeJobs::default());
    let job_id = add_job(&fake, 0);
    let jobs = start_fake_jobs(fake).await;
    let llm = FakeLlm::start(Vec::new(), Reply::Hang).await;
    let server = Diag::start(&db, &jobs.to_string(), |c| {
        use_llm(c, &llm);
        c.llm_wait = Duration::from_secs(120);
        if let Some(s) = c.llm.as_mut() {
            s.timeout = Duration::from_secs(3);
            s.retries = 0;
        }
    })
    .await;
    let mut alice = server.client(tokens.alice);
    let rules_only = diagnose(&mut alice, &job_id, false).await;

    let mut req = Request::new(dpb::DiagnoseJobRequest {
        job_id: job_id.clone(),
        use_llm: true,
    });
    req.set_timeout(Duration::from_millis(2500));
    let started = std::time::Instant::now();
    let d = diagnose_req(&mut alice, req).await;
    assert!(started.elapsed() < Duration::from_millis(2500));
    assert_eq!(rules_answer(&d), rules_answer(&rules_only));
    let a = &d.llm_analyses[0];
    assert_eq!(status(a), dpb::LlmStatus::Pending, "{a:?}");
    assert!(
        a.status_reason.starts_with("no answer within"),
        "{}",
        a.status_reason
    );
    assert_eq!(llm.received().len(), 1);

    // The request's own timeout ends it; the stored diagnosis says so.
    let stored = stored_with(
        &alice,
        &job_id,
        dpb::LlmStatus::Failed,
        "the stored analysis to fail",
    )
    .await;
    assert_eq!(stored.id, d.id);
    assert_eq!(rules_answer(&stored), rules_answer(&rules_only));
    let a = &stored.llm_analyses[0];
    assert!(
        a.status_reason.contains("no answer within 3s"),
        "{}",
        a.status_reason
    );
    server.stop().await;
}

#[tokio::test]
async fn a_late_answer_updates_the_stored_diagnosis() {
    let tokens = testing::test_tokens();
    for db in testing::all_dbs().await {
        let fake = Arc::new(FakeJobs::default());
        let job_id = add_job(&fake, 0);
        let jobs = start_fake_jobs(fake).await;
        let (open, gate) = tokio::sync::watch::channel(false);
        let llm = FakeLlm::start(Vec::new(), Reply::AfterGate(gate, ANSWER.into())).await;
        let server = Diag::start(&db, &jobs.to_string(), |c| {
            use_llm(c, &llm);
            c.llm_wait = Duration::from_millis(200);
        })
        .await;
        let mut alice = server.client(tokens.alice);
        let d = diagnose(&mut alice, &job_id, true).await;
        assert_eq!(status(&d.llm_analyses[0]), dpb::LlmStatus::Pending);
        assert!(
            d.llm_text.starts_with("[job] pending: no answer within 0."),
            "{}",
            d.llm_text
        );
        open.send(true).unwrap();
        let stored = stored_with(
            &alice,
            &job_id,
            dpb::LlmStatus::Ok,
            "the late answer to be stored",
        )
        .await;
        assert_eq!(stored.id, d.id, "{}", db.label);
        assert_eq!(rules_answer(&stored), rules_answer(&d));
        assert_eq!(
            stored.llm_analyses[0].error,
            "Worker ddp-worker-1 was OOMKilled"
        );
        assert!(stored
            .llm_text
            .starts_with("[job] (test-model, prompt builtin@"));
        server.stop().await;
    }
}

#[tokio::test]
async fn server_errors_and_rate_limits_are_retried() {
    let tokens = testing::test_tokens();
    let db = testing::sqlite_db();
    let fake = Arc::new(FakeJobs::default());
    let job_id = add_job(&fake, 0);
    let jobs = start_fake_jobs(fake).await;
    let script = vec![Reply::Status(500, None), Reply::Status(429, Some(0))];
    let llm = FakeLlm::start(script, Reply::Answer(ANSWER.into())).await;
    let server = Diag::start(&db, &jobs.to_string(), |c| use_llm(c, &llm)).await;
    let d = diagnose(&mut server.client(tokens.alice), &job_id, true).await;
    assert_eq!(
        status(&d.llm_analyses[0]),
        dpb::LlmStatus::Ok,
        "{:?}",
        d.llm_analyses
    );
    let got = llm.received();
    assert_eq!(got.len(), 3);
    assert!(got.iter().all(|r| r.prompt() == got[0].prompt()));
    // Without a key file, no Authorization header.
    assert_eq!(got[0].authorization, None);
    server.stop().await;
}

#[tokio::test]
async fn refusals_and_answers_in_another_format_fail_without_retrying() {
    let tokens = testing::test_tokens();
    let db = testing::sqlite_db();
    let fake = Arc::new(FakeJobs::default());
    let job_id = add_job(&fake, 0);
    let jobs = start_fake_jobs(fake).await;
    let script = vec![
        Reply::Status(401, None),
        Reply::Answer("I cannot help with that.".into()),
    ];
    let llm = FakeLlm::start(script, Reply::Hang).await;
    let server = Diag::start(&db, &jobs.to_string(), |c| use_llm(c, &llm)).await;
    let mut alice = server.client(tokens.alice);
    let d = diagnose(&mut alice, &job_id, true).await;
    let a = &d.llm_analyses[0];
    assert_eq!(status(a), dpb::LlmStatus::Failed);
    assert_eq!(
        a.status_reason,
        "the LLM endpoint answered HTTP 401: scripted 401"
    );
    assert_eq!(llm.received().len(), 1);

    let d = diagnose(&mut alice, &job_id, true).await;
    let a = &d.llm_analyses[0];
    assert_eq!(status(a), dpb::LlmStatus::Failed);
    assert!(
        a.status_reason
            .contains("no Healthy/Error/Analysis/Solution"),
        "{}",
        a.status_reason
    );
    assert_eq!(a.raw_text, "I cannot help with that.");
    assert!(!a.cached);
    server.stop().await;
}
