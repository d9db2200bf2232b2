//! Diagnosis logic: read the job, apply the rules, compose and store the
//! answer, with the LLM's analyses beside it when asked for and
//! configured; read stored diagnoses with the owner check.

use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use tokio::time::Instant;
use trainmesh_common::auth::Caller;
use trainmesh_common::proto::diagnosis::v1 as dpb;
use trainmesh_common::time;

use crate::analyst::{self, Analyst};
use crate::domain::{DiagnosisId, Evidence, GetQuery, JobId, ListQuery, Source};
use crate::error::{Error, Result};
use crate::jobs::{JobSnapshot, JobSource};
use crate::logwindow::{self, WINDOW_LINES};
use crate::prompt::{Prompts, RULES_VERSION};
use crate::repo::{Repo, StoredDiagnosis};
use crate::report;
use crate::rules::RuleSet;

/// Log lines cited when no rule pointed at any.
const FALLBACK_LOG_EVIDENCE: usize = 10;
/// Time kept, before the caller's deadline, to store and send the answer.
const DEADLINE_MARGIN: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub struct Diagnoser {
    repo: Repo,
    jobs: JobSource,
    rules: RuleSet,
    prompts: Arc<Prompts>,
    /// None without an LLM: the rules alone answer.
    analyst: Option<Arc<Analyst>>,
}

fn may_see(caller: &Caller, owner: &str) -> bool {
    caller.sees_everything() || caller.user == owner
}

impl Diagnoser {
    pub fn new(
        repo: Repo,
        jobs: JobSource,
        rules: RuleSet,
        prompts: Arc<Prompts>,
        analyst: Option<Arc<Analyst>>,
    ) -> Self {
        Self {
            repo,
            jobs,
            rules,
            prompts,
            analyst,
        }
    }

    /// The prompt templates in effect.
    pub fn prompts(&self) -> &Prompts {
        &self.prompts
    }

    /// Diagnoses `job_id` for `caller` (its owner, an admin or a service)
    /// and stores the result. With `use_llm` and an LLM configured, the
    /// LLM's analyses are added beside the rules' answer, waited for until
    /// the LLM wait or `deadline` (the caller's, less a margin) ends.
    pub async fn diagnose(
        &self,
        caller: &Caller,
        job_id: JobId,
        use_llm: bool,
        deadline: Option<Instant>,
    ) -> Result<dpb::Diagnosis> {
        let JobSnapshot { job, log, log_note } = self.jobs.fetch(job_id).await?;
        // job-service checked our token, not the caller's.
        if !may_see(caller, &job.owner) {
            return Err(Error::JobNotFound(job_id));
        }
        tracing::info!(
            job_id = %job_id,
            job_correlation_id = %job.correlation_id,
            state = job.state_name(),
            log_lines = log.len(),
            "diagnosing job"
        );
        let findings = self.rules.evaluate(&job, &log);
        let mut rep = report::compose(&job, log.len(), log_note.as_deref(), findings);
        if !rep.healthy && !rep.evidence.iter().any(|e| e.source == Source::Log) {
            // Nothing specific was found: cite the most telling recent lines.
            let window = logwindow::window(&log, WINDOW_LINES);
            let telling: Vec<_> = window
                .iter()
                .filter(|l| logwindow::is_keyword_line(&l.text))
                .collect();
            let start = telling.len().saturating_sub(FALLBACK_LOG_EVIDENCE);
            rep.evidence
                .extend(telling[start..].iter().map(|l| Evidence::log(l)));
        }

        // Asked now, so that the answers come while the rest is done.
        let mut llm_run = match (&self.analyst, use_llm) {
            (Some(a), true) => Some((a.start(&job, &log, &rep.findings), a.wait)),
            _ => None,
        };

        let id = DiagnosisId::new();
        let created = time::now_micros();
        let mut diagnosis = dpb::Diagnosis {
            id: id.to_string(),
            job_id: job_id.to_string(),
            healthy: rep.healthy,
            error: rep.error,
            analysis: rep.analysis,
            solution: rep.solution,
            text: rep.text,
            evidence: rep.evidence.iter().map(Evidence::to_proto).collect(),
            findings: rep.findings.iter().map(|f| f.to_proto()).collect(),
            llm_text: String::new(),
            prompt_version: RULES_VERSION.into(),
            create_time: Some(time::to_timestamp(created)),
            category: rep.category,
            llm_analyses: Vec::new(),
        };
        if let Some((run, wait)) = &mut llm_run {
            let mut until = Instant::now() + *wait;
            if let Some(d) = deadline {
                until = until.min(d.checked_sub(DEADLINE_MARGIN).unwrap_or(d));
            }
            run.wait_until(until).await;
            analyst::apply(&mut diagnosis, &run.analyses);
        }
        self.repo
            .insert(id, job_id, &job.owner, created, &diagnosis.encode_to_vec())
            .await?;
        if let Some((run, _)) = llm_run.filter(|(r, _)| !r.finished()) {
            self.finish_later(id, diagnosis.clone(), run);
        }
        tracing::info!(
            job_id = %job_id,
            diagnosis_id = %id,
            healthy = diagnosis.healthy,
            category = %diagnosis.category,
            error = %diagnosis.error,
            "job diagnosed"
        );
        Ok(diagnosis)
    }

    /// Stores the analyses still under way as each ends.
    fn finish_later(&self, id: DiagnosisId, diagnosis: dpb::Diagnosis, run: analyst::Run) {
        let repo = self.repo.clone();
        let work = async move {
            run.finish(|analyses| {
                let mut d = diagnosis.clone();
                let repo = repo.clone();
                async move {
                    analyst::apply(&mut d, &analyses);
                    if let Err(e) = repo.update_body(id, &d.encode_to_vec()).await {
                        tracing::warn!(diagnosis_id = %id, error = %e, "cannot store a late LLM analysis");
                    } else {
                        tracing::info!(diagnosis_id = %id, "late LLM analysis stored");
                    }
                }
            })
            .await;
        };
        tokio::spawn(tracing::Instrument::in_current_span(work));
    }

    fn decode(stored: &StoredDiagnosis) -> Result<dpb::Diagnosis> {
        dpb::Diagnosis::decode(stored.body.as_slice())
            .map_err(|e| Error::Corrupt(format!("diagnosis `{}`: {e}", stored.id)))
    }

    pub async fn get(&self, caller: &Caller, q: GetQuery) -> Result<dpb::Diagnosis> {
        let (stored, missing) = match q {
            GetQuery::ById(id) => (
                self.repo.get(id).await?,
                format!("diagnosis `{id}` not found"),
            ),
            GetQuery::LatestOfJob(job) => (
                self.repo.latest_for_job(job).await?,
                format!("no diagnosis of job `{job}` found"),
            ),
        };
        match stored {
            Some(s) if may_see(caller, &s.owner) => Self::decode(&s),
            _ => Err(Error::NotFound(missing)),
        }
    }

    /// Newest first; a user sees only diagnoses of their own jobs.
    pub async fn list(
        &self,
        caller: &Caller,
        q: ListQuery,
    ) -> Result<(Vec<dpb::Diagnosis>, Option<String>)> {
        let owner = (!caller.sees_everything()).then_some(caller.user.as_str());
        let rows = self
            .repo
            .list(q.job_id, owner, q.before_seq, q.page_size)
            .await?;
        let next = (rows.len() == q.page_size)
            .then(|| rows.last().map(|r| r.seq.to_string()))
            .flatten();
        let items = rows.iter().map(Self::decode).collect::<Result<_>>()?;
        Ok((items, next))
    }
}
