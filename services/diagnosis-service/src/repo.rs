//! Storage of diagnoses (SQLite or PostgreSQL through sqlx's `Any` driver).
//! A diagnosis is stored whole, as its encoded protobuf, next to the
//! columns that find and guard it (id, job, owner). Successful LLM
//! analyses are kept apart, by what they were asked, to be reused.

use sqlx::any::AnyRow;
use sqlx::Row;
use trainmesh_common::db::Db;

use crate::domain::{DiagnosisId, JobId};
use crate::error::{Error, Result};

#[derive(Clone, Debug)]
pub struct StoredDiagnosis {
    /// Insertion order; the page token of listings.
    pub seq: i64,
    pub id: DiagnosisId,
    pub job_id: JobId,
    pub owner: String,
    pub created_micros: i64,
    /// Encoded `trainmesh.diagnosis.v1.Diagnosis`.
    pub body: Vec<u8>,
}

const COLUMNS: &str = "seq, id, job_id, owner, created_at, body";

fn from_row(r: &AnyRow) -> Result<StoredDiagnosis> {
    let id: String = r.try_get(1)?;
    let job_id: String = r.try_get(2)?;
    Ok(StoredDiagnosis {
        seq: r.try_get(0)?,
        id: id
            .parse()
            .map_err(|_| Error::Corrupt(format!("diagnosis id `{id}`")))?,
        job_id: job_id
            .parse()
            .map_err(|_| Error::Corrupt(format!("job id `{job_id}`")))?,
        owner: r.try_get(3)?,
        created_micros: r.try_get(4)?,
        body: r.try_get(5)?,
    })
}

/// What identifies a reusable LLM analysis: the same question (rendered
/// prompt) about the same attempt, with the same template and model.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct AnalysisKey {
    pub job_id: JobId,
    pub attempt: i64,
    /// `<kind>/<replica pod>`.
    pub target: String,
    pub prompt_version: String,
    pub model: String,
    pub prompt_sha256: String,
}

#[derive(Clone, Debug)]
pub struct Repo {
    db: Db,
}

impl Repo {
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    pub async fn insert(
        &self,
        id: DiagnosisId,
        job_id: JobId,
        owner: &str,
        created_micros: i64,
        body: &[u8],
    ) -> Result<i64> {
        let seq: i64 = sqlx::query_scalar(
            "INSERT INTO diagnoses (id, job_id, owner, created_at, body) \
             VALUES ($1, $2, $3, $4, $5) RETURNING seq",
        )
        .bind(id.to_string())
        .bind(job_id.to_string())
        .bind(owner)
        .bind(created_micros)
        .bind(body)
        .fetch_one(&self.db.write)
        .await?;
        Ok(seq)
    }

    /// Replaces a stored diagnosis's body (a late LLM answer arrived).
    pub async fn update_body(&self, id: DiagnosisId, body: &[u8]) -> Result<()> {
        sqlx::query("UPDATE diagnoses SET body = $1 WHERE id = $2")
            .bind(body)
            .bind(id.to_string())
            .execute(&self.db.write)
            .await?;
        Ok(())
    }

    /// The encoded `LlmAnalysis` stored under `key`.
    pub async fn cached_analysis(&self, key: &AnalysisKey) -> Result<Option<Vec<u8>>> {
        let body = sqlx::query_scalar(
            "SELECT body FROM llm_analyses WHERE job_id = $1 AND attempt = $2 AND target = $3 \
             AND prompt_version = $4 AND model = $5 AND prompt_sha256 = $6",
        )
        .bind(key.job_id.to_string())
        .bind(key.attempt)
        .bind(&key.target)
        .bind(&key.prompt_version)
        .bind(&key.model)
        .bind(&key.prompt_sha256)
        .fetch_optional(&self.db.read)
        .await?;
        Ok(body)
    }

    /// Keeps the first analysis stored under `key`.
    pub async fn cache_analysis(
        &self,
        key: &AnalysisKey,
        created_micros: i64,
        body: &[u8],
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO llm_analyses \
             (job_id, attempt, target, prompt_version, model, prompt_sha256, created_at, body) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
             ON CONFLICT (job_id, attempt, target, prompt_version, model, prompt_sha256) DO NOTHING",
        )
        .bind(key.job_id.to_string())
        .bind(key.attempt)
        .bind(&key.target)
        .bind(&key.prompt_version)
        .bind(&key.model)
        .bind(&key.prompt_sha256)
        .bind(created_micros)
        .bind(body)
        .execute(&self.db.write)
        .await?;
        Ok(())
    }

    pub async fn get(&self, id: DiagnosisId) -> Result<Option<StoredDiagnosis>> {
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM diagnoses WHERE id = $1"))
            .bind(id.to_string())
            .fetch_optional(&self.db.read)
            .await?;
        row.as_ref().map(from_row).transpose()
    }

    pub async fn latest_for_job(&self, job_id: JobId) -> Result<Option<StoredDiagnosis>> {
        let row = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM diagnoses WHERE job_id = $1 ORDER BY seq DESC LIMIT 1"
        ))
        .bind(job_id.to_string())
        .fetch_optional(&self.db.read)
        .await?;
        row.as_ref().map(from_row).transpose()
    }

    /// Newest first, older than `before_seq` when given, at most `limit`.
    pub async fn list(
        &self,
        job_id: Option<JobId>,
        owner: Option<&str>,
        before_seq: Option<i64>,
        limit: usize,
    ) -> Result<Vec<StoredDiagnosis>> {
        let mut conds = Vec::new();
        let mut n = 0;
        let mut next = || {
            n += 1;
            n
        };
        if job_id.is_some() {
            conds.push(format!("job_id = ${}", next()));
        }
        if owner.is_some() {
            conds.push(format!("owner = ${}", next()));
        }
        if before_seq.is_some() {
            conds.push(format!("seq < ${}", next()));
        }
        let limit_ph = next();
        let filter = if conds.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", conds.join(" AND "))
        };
        let sql =
            format!("SELECT {COLUMNS} FROM diagnoses {filter} ORDER BY seq DESC LIMIT ${limit_ph}");
        let mut q = sqlx::query(&sql);
        if let Some(j) = job_id {
            q = q.bind(j.to_string());
        }
        if let Some(o) = owner {
            q = q.bind(o.to_owned());
        }
        if let Some(b) = before_seq {
            q = q.bind(b);
        }
        let rows = q
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&self.db.read)
            .await?;
        rows.iter().map(from_row).collect()
    }
}
