//! Diagnosis logic: read the job, apply the rules, compose and store the
//! answer; read stored diagnoses with the owner check.

use prost::Message;
use trainmesh_common::auth::Caller;
use trainmesh_common::proto::diagnosis::v1 as dpb;
use trainmesh_common::time;

use crate::domain::{DiagnosisId, Evidence, GetQuery, JobId, ListQuery, Source};
use crate::error::{Error, Result};
use crate::jobs::{JobSnapshot, JobSource};
use crate::logwindow::{self, WINDOW_LINES};
use crate::prompt::RULES_VERSION;
use crate::repo::{Repo, StoredDiagnosis};
use crate::report;
use crate::rules::RuleSet;

/// Log lines cited when no rule pointed at any.
const FALLBACK_LOG_EVIDENCE: usize = 10;

#[derive(Debug)]
pub struct Diagnoser {
    repo: Repo,
    jobs: JobSource,
    rules: RuleSet,
}

fn may_see(caller: &Caller, owner: &str) -> bool {
    caller.sees_everything() || caller.user == owner
}

impl Diagnoser {
    pub fn new(repo: Repo, jobs: JobSource, rules: RuleSet) -> Self {
        Self { repo, jobs, rules }
    }

    /// Diagnoses `job_id` for `caller` (its owner, an admin or a service)
    /// and stores the result.
    pub async fn diagnose(&self, caller: &Caller, job_id: JobId) -> Result<dpb::Diagnosis> {
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

        let id = DiagnosisId::new();
        let created = time::now_micros();
        let diagnosis = dpb::Diagnosis {
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
        };
        self.repo
            .insert(id, job_id, &job.owner, created, &diagnosis.encode_to_vec())
            .await?;
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
