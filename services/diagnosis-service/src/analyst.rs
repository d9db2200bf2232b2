//! The LLM half of a diagnosis: one analysis per target ([`context`]) —
//! the master and the abnormal workers of a distributed job, or the job —
//! all asked at once, each answer kept beside the rule findings and never
//! in their place.
//!
//! A diagnosis waits for the answers only until its deadline; the
//! analyses still under way then are recorded as pending, go on in the
//! background, and update the stored diagnosis when they end. Successful
//! analyses are stored by what was asked ([`AnalysisKey`]): diagnosing the
//! same attempt again with the same prompt does not ask again, and two
//! diagnoses asking the same at once share one request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prost::Message;
use sha2::{Digest, Sha256};
use tokio::sync::OnceCell;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::Instrument as _;
use trainmesh_common::proto::diagnosis::v1 as dpb;
use trainmesh_common::time;

use crate::answer;
use crate::context::{self, Target};
use crate::domain::{Finding, JobFacts, LogLine};
use crate::llm::LlmClient;
use crate::prompt::{Prompts, RULES_VERSION};
use crate::repo::{AnalysisKey, Repo};

type Shared = Arc<OnceCell<dpb::LlmAnalysis>>;

#[derive(Debug)]
pub struct Analyst {
    client: LlmClient,
    prompts: Arc<Prompts>,
    repo: Repo,
    /// How long a diagnosis waits for the answers.
    pub wait: Duration,
    inflight: Mutex<HashMap<AnalysisKey, Shared>>,
}

/// The analyses of one diagnosis: finished or pending, in target order.
pub struct Run {
    pub analyses: Vec<dpb::LlmAnalysis>,
    tasks: JoinSet<(usize, dpb::LlmAnalysis)>,
    started: Instant,
}

impl Run {
    /// Takes the answers that arrive before `deadline`; those still
    /// pending then say how long they were waited for.
    pub async fn wait_until(&mut self, deadline: Instant) {
        while let Ok(Some(joined)) = tokio::time::timeout_at(deadline, self.tasks.join_next()).await
        {
            self.take(joined);
        }
        let waited = self.started.elapsed().as_secs_f64();
        for a in &mut self.analyses {
            if a.status == dpb::LlmStatus::Pending as i32 {
                a.status_reason = format!(
                    "no answer within {waited:.1}s; the stored diagnosis is updated when it comes"
                );
            }
        }
    }

    pub fn finished(&self) -> bool {
        self.tasks.is_empty()
    }

    fn take(&mut self, joined: Result<(usize, dpb::LlmAnalysis), tokio::task::JoinError>) {
        match joined {
            Ok((i, a)) => {
                if let Some(slot) = self.analyses.get_mut(i) {
                    *slot = a;
                }
            }
            Err(e) => tracing::error!(error = %e, "an LLM analysis task ended abnormally"),
        }
    }

    /// Waits for the remaining answers, calling `each` after every one.
    pub async fn finish<F, Fut>(mut self, mut each: F)
    where
        F: FnMut(Vec<dpb::LlmAnalysis>) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        while let Some(joined) = self.tasks.join_next().await {
            self.take(joined);
            each(self.analyses.clone()).await;
        }
    }
}

fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

fn failed(mut a: dpb::LlmAnalysis, reason: impl Into<String>) -> dpb::LlmAnalysis {
    a.status = dpb::LlmStatus::Failed as i32;
    a.status_reason = reason.into();
    a
}

impl Analyst {
    pub fn new(client: LlmClient, prompts: Arc<Prompts>, repo: Repo, wait: Duration) -> Self {
        Self {
            client,
            prompts,
            repo,
            wait,
            inflight: Mutex::new(HashMap::new()),
        }
    }

    /// Starts every analysis of `job`; each goes on even if the diagnosis
    /// that started it is dropped, so that its answer is stored for the
    /// next one.
    pub fn start(self: &Arc<Self>, job: &JobFacts, log: &[LogLine], findings: &[Finding]) -> Run {
        let attempt = i32::try_from(job.attempts).unwrap_or(i32::MAX);
        let mut analyses = Vec::new();
        let mut tasks = JoinSet::new();
        for (i, target) in context::targets(job).into_iter().enumerate() {
            let prompt = self.prompts.get(target.kind);
            let text = prompt
                .template
                .render(&context::vars(job, log, findings, &target));
            let pending = dpb::LlmAnalysis {
                kind: target.kind.as_str().into(),
                replica: target.replica_name().into(),
                status: dpb::LlmStatus::Pending as i32,
                status_reason: "asked".into(),
                prompt_version: prompt.version.clone(),
                prompt_sha256: sha256_hex(&text),
                model: self.client.model().into(),
                attempt,
                ..Default::default()
            };
            let key = key(job, &target, &pending);
            analyses.push(pending.clone());
            let me = Arc::clone(self);
            let fallback = pending.clone();
            let work = tokio::spawn(me.shared(key, pending, text).in_current_span());
            tasks.spawn(
                async move {
                    let a = work.await.unwrap_or_else(|e| {
                        failed(fallback, format!("the analysis task ended abnormally: {e}"))
                    });
                    (i, a)
                }
                .in_current_span(),
            );
        }
        tracing::info!(job_id = %job.id, analyses = analyses.len(), "asking the LLM");
        Run {
            analyses,
            tasks,
            started: Instant::now(),
        }
    }

    /// One request per question at a time: a second diagnosis asking the
    /// same while the first waits gets the same answer.
    async fn shared(
        self: Arc<Self>,
        key: AnalysisKey,
        pending: dpb::LlmAnalysis,
        prompt: String,
    ) -> dpb::LlmAnalysis {
        let cell: Shared = {
            let mut map = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(key.clone()).or_default().clone()
        };
        let a = cell
            .get_or_init(|| self.ask(&key, pending, &prompt))
            .await
            .clone();
        let mut map = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        if map.get(&key).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
            map.remove(&key);
        }
        a
    }

    async fn ask(
        &self,
        key: &AnalysisKey,
        pending: dpb::LlmAnalysis,
        prompt: &str,
    ) -> dpb::LlmAnalysis {
        match self.repo.cached_analysis(key).await {
            Ok(Some(body)) => match dpb::LlmAnalysis::decode(body.as_slice()) {
                Ok(mut a) => {
                    a.cached = true;
                    return a;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "undecodable cached LLM analysis; asking again")
                }
            },
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "cannot read cached LLM analyses; asking again"),
        }
        let started = std::time::Instant::now();
        let raw = match self.client.complete(prompt).await {
            Ok(raw) => raw,
            Err(e) => {
                tracing::warn!(target = %key.target, error = %e, "LLM analysis failed");
                return failed(pending, e.to_string());
            }
        };
        let mut a = pending;
        a.raw_text = raw;
        let Some(ans) = answer::parse(&a.raw_text) else {
            tracing::warn!(target = %key.target, "LLM answer without Healthy/Error fields");
            return failed(
                a,
                "the answer has no Healthy/Error/Analysis/Solution fields (raw text kept)",
            );
        };
        a.status = dpb::LlmStatus::Ok as i32;
        a.status_reason.clear();
        a.healthy = ans.healthy;
        a.error = ans.error;
        a.analysis = ans.analysis;
        a.solution = ans.solution;
        tracing::info!(
            target = %key.target,
            healthy = a.healthy,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "LLM analysis done"
        );
        if let Err(e) = self
            .repo
            .cache_analysis(key, time::now_micros(), &a.encode_to_vec())
            .await
        {
            tracing::warn!(error = %e, "cannot store the LLM analysis for reuse");
        }
        a
    }
}

fn key(job: &JobFacts, target: &Target, a: &dpb::LlmAnalysis) -> AnalysisKey {
    AnalysisKey {
        job_id: job.id,
        attempt: i64::from(a.attempt),
        target: format!("{}/{}", a.kind, target.replica_name()),
        prompt_version: a.prompt_version.clone(),
        model: a.model.clone(),
        prompt_sha256: a.prompt_sha256.clone(),
    }
}

/// Puts `analyses` on `d`: the list, the combined text for clients that
/// read only `llm_text`, and the template versions used. The rules'
/// fields are left as they are.
pub fn apply(d: &mut dpb::Diagnosis, analyses: &[dpb::LlmAnalysis]) {
    d.llm_analyses = analyses.to_vec();
    let mut text = Vec::new();
    let mut versions = vec![RULES_VERSION.to_owned()];
    for a in analyses {
        let who = if a.replica.is_empty() {
            a.kind.clone()
        } else {
            format!("{} {}", a.kind, a.replica)
        };
        let v = format!("{}={}", a.kind, a.prompt_version);
        if !versions.contains(&v) {
            versions.push(v);
        }
        let block = match dpb::LlmStatus::try_from(a.status) {
            Ok(dpb::LlmStatus::Ok) => format!(
                "[{who}] ({}, prompt {})\nHealthy: {}\nError: {}\nAnalysis: {}\nSolution: {}",
                a.model,
                a.prompt_version,
                if a.healthy { "Yes" } else { "No" },
                a.error,
                a.analysis,
                a.solution
            ),
            Ok(dpb::LlmStatus::Pending) => format!("[{who}] pending: {}", a.status_reason),
            _ => format!("[{who}] failed: {}", a.status_reason),
        };
        text.push(block);
    }
    d.llm_text = text.join("\n\n");
    d.prompt_version = versions.join("; ");
}
