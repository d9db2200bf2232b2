//! Storage of diagnoses (SQLite or PostgreSQL through sqlx's `Any` driver).
//! A diagnosis is stored whole, as its encoded protobuf, next to the
//! columns that find and guard it (id, job, owner).

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
