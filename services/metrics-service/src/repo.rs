//! Storage of points (SQLite or PostgreSQL through sqlx's `Any` driver).
//!
//! A batch is one transaction: allocate the job's write sequences (which
//! locks the job's counters row), count the batch's keys the job does not
//! have yet, insert the points with `ON CONFLICT DO NOTHING` (idempotent on
//! (job, key, step)), check the per-job caps against what was really new,
//! then move the latest row of each key forward with an upsert whose `WHERE`
//! keeps the greater point, and the counters with it. Latest values and
//! counts are therefore never computed by scanning history.

use std::collections::{HashMap, HashSet};

use futures::TryStreamExt;
use sqlx::any::AnyRow;
use sqlx::{Any, AnyConnection, Row};
use trainmesh_common::db::{Backend, Db};

use crate::caps::{Cap, Caps, Usage};
use crate::domain::{Downsampler, JobId, LatestPage, MetricKey, Point, ValueKind};
use crate::error::{Error, Result};

/// Rows per multi-row statement, far below the parameter limits of SQLite
/// (32766) and PostgreSQL (65535). SQLite (through sqlx) gets slower per row
/// with larger statements, PostgreSQL faster (measured: 100 rows ≈ 2× 500
/// rows on SQLite).
fn chunk_rows(backend: Backend) -> usize {
    match backend {
        Backend::Sqlite => 100,
        Backend::Postgres => 500,
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteOutcome {
    pub accepted: usize,
    pub duplicates: usize,
}

#[derive(Clone, Debug)]
pub struct Repo {
    db: Db,
}

fn point_from_row(row: &AnyRow, offset: usize) -> Result<Point> {
    let key: String = row.try_get(offset)?;
    let kind: String = row.try_get(offset + 4)?;
    let kind =
        ValueKind::parse(&kind).ok_or_else(|| Error::Corrupt(format!("value kind `{kind}`")))?;
    let stored: Option<f64> = row.try_get(offset + 3)?;
    Ok(Point {
        key: MetricKey::stored(key),
        step: row.try_get(offset + 1)?,
        ts_micros: row.try_get(offset + 2)?,
        value: kind.rebuild(stored),
    })
}

fn placeholders(rows: usize, cols: usize) -> String {
    let mut s = String::with_capacity(rows * cols * 5);
    for r in 0..rows {
        if r > 0 {
            s.push(',');
        }
        s.push('(');
        for c in 0..cols {
            if c > 0 {
                s.push(',');
            }
            s.push('$');
            s.push_str(&(r * cols + c + 1).to_string());
        }
        s.push(')');
    }
    s
}

impl Repo {
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    /// Stores a batch in one transaction. Points whose (key, step) is
    /// already stored, or repeats an earlier point of the batch, are counted
    /// as duplicates and change nothing. A batch whose new points or keys
    /// would take the job past `caps` is refused whole.
    pub async fn write(&self, job: JobId, points: &[Point], caps: Caps) -> Result<WriteOutcome> {
        let mut seen = HashSet::with_capacity(points.len());
        let unique: Vec<&Point> = points
            .iter()
            .filter(|p| seen.insert((p.key.as_str(), p.step)))
            .collect();
        let mut outcome = WriteOutcome {
            accepted: 0,
            duplicates: points.len() - unique.len(),
        };
        if unique.is_empty() {
            return Ok(outcome);
        }
        let job_s = job.to_string();
        let n = unique.len() as i64;
        let mut tx = self.db.begin_write().await?;

        // The row lock taken here serialises the batches of one job, so a
        // watcher reading by sequence never skips a batch that commits late,
        // and the counts read here stay true until this batch commits.
        let row = sqlx::query(
            "INSERT INTO metric_jobs (job_id, last_seq) VALUES ($1, $2) \
             ON CONFLICT (job_id) DO UPDATE SET last_seq = metric_jobs.last_seq + $2 \
             RETURNING last_seq, point_count, key_count",
        )
        .bind(&job_s)
        .bind(n)
        .fetch_one(&mut *tx)
        .await?;
        let last: i64 = row.try_get(0)?;
        let usage = Usage {
            points: row.try_get(1)?,
            keys: row.try_get(2)?,
        };
        let base = last - n;

        let rows = chunk_rows(self.db.backend);
        let new_keys = self.count_new_keys(&mut tx, &job_s, &unique, rows).await?;
        caps.check(job, Cap::Keys, usage.keys, new_keys)?;

        let mut inserted = Vec::with_capacity(unique.len());
        for (c, chunk) in unique.chunks(rows).enumerate() {
            let sql = format!(
                "INSERT INTO metric_points (job_id, metric_key, step, ts, value, kind, seq) \
                 VALUES {} ON CONFLICT (job_id, metric_key, step) DO NOTHING RETURNING seq",
                placeholders(chunk.len(), 7)
            );
            let mut q = sqlx::query_scalar::<Any, i64>(&sql);
            for (i, p) in chunk.iter().enumerate() {
                q = q
                    .bind(&job_s)
                    .bind(p.key.as_str())
                    .bind(p.step)
                    .bind(p.ts_micros)
                    .bind(p.stored_value())
                    .bind(p.kind().as_str())
                    .bind(base + (c * rows + i) as i64 + 1);
            }
            for seq in q.fetch_all(&mut *tx).await? {
                let idx = usize::try_from(seq - base - 1)
                    .ok()
                    .filter(|i| *i < unique.len())
                    .ok_or_else(|| Error::Corrupt(format!("returned sequence {seq}")))?;
                inserted.push(unique[idx]);
            }
        }
        outcome.accepted = inserted.len();
        outcome.duplicates += unique.len() - inserted.len();
        let accepted = i64::try_from(inserted.len()).unwrap_or(i64::MAX);
        caps.check(job, Cap::Points, usage.points, accepted)?;

        // One candidate per key: a statement may not update a row twice.
        let mut best: HashMap<&str, &Point> = HashMap::new();
        for p in inserted {
            best.entry(p.key.as_str())
                .and_modify(|b| {
                    if p.cmp_latest(b).is_gt() {
                        *b = p;
                    }
                })
                .or_insert(p);
        }
        let best: Vec<&Point> = best.into_values().collect();
        for chunk in best.chunks(rows) {
            let sql = format!(
                "INSERT INTO metric_latest (job_id, metric_key, step, ts, value, kind, vrank, vnum) \
                 VALUES {} ON CONFLICT (job_id, metric_key) DO UPDATE SET \
                 step = excluded.step, ts = excluded.ts, value = excluded.value, \
                 kind = excluded.kind, vrank = excluded.vrank, vnum = excluded.vnum \
                 WHERE (excluded.step, excluded.ts, excluded.vrank, excluded.vnum) > \
                 (metric_latest.step, metric_latest.ts, metric_latest.vrank, metric_latest.vnum)",
                placeholders(chunk.len(), 8)
            );
            let mut q = sqlx::query(&sql);
            for p in chunk {
                q = q
                    .bind(&job_s)
                    .bind(p.key.as_str())
                    .bind(p.step)
                    .bind(p.ts_micros)
                    .bind(p.stored_value())
                    .bind(p.kind().as_str())
                    .bind(p.kind().rank())
                    .bind(p.stored_value().unwrap_or(0.0));
            }
            q.execute(&mut *tx).await?;
        }
        if accepted > 0 {
            sqlx::query(
                "UPDATE metric_jobs SET point_count = point_count + $2, \
                 key_count = key_count + $3 WHERE job_id = $1",
            )
            .bind(&job_s)
            .bind(accepted)
            .bind(new_keys)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(outcome)
    }

    /// How many distinct keys of `points` the job has no point of yet. A
    /// key has a latest row exactly when it has a point, so the primary key
    /// of `metric_latest` answers without touching the points.
    async fn count_new_keys(
        &self,
        conn: &mut AnyConnection,
        job: &str,
        points: &[&Point],
        rows: usize,
    ) -> Result<i64> {
        let mut keys: Vec<&str> = points.iter().map(|p| p.key.as_str()).collect();
        keys.sort_unstable();
        keys.dedup();
        let mut known = 0usize;
        for chunk in keys.chunks(rows) {
            let list = (0..chunk.len())
                .map(|i| format!("${}", i + 2))
                .collect::<Vec<_>>()
                .join(",");
            let sql = format!(
                "SELECT CAST(COUNT(*) AS BIGINT) FROM metric_latest \
                 WHERE job_id = $1 AND metric_key IN ({list})"
            );
            let mut q = sqlx::query_scalar::<Any, i64>(&sql).bind(job);
            for k in chunk {
                q = q.bind(*k);
            }
            known += usize::try_from(q.fetch_one(&mut *conn).await?).unwrap_or(0);
        }
        Ok(i64::try_from(keys.len().saturating_sub(known)).unwrap_or(i64::MAX))
    }

    /// What `job` has stored, as the caps count it.
    pub async fn usage(&self, job: JobId) -> Result<Usage> {
        let row = sqlx::query("SELECT point_count, key_count FROM metric_jobs WHERE job_id = $1")
            .bind(job.to_string())
            .fetch_optional(&self.db.read)
            .await?;
        match row {
            Some(r) => Ok(Usage {
                points: r.try_get(0)?,
                keys: r.try_get(1)?,
            }),
            None => Ok(Usage::default()),
        }
    }

    /// Latest points of `job` in key order after `page.after`, filtered by
    /// `page.keys` and `page.prefix`, at most `limit`.
    pub async fn latest(&self, job: JobId, page: &LatestPage, limit: usize) -> Result<Vec<Point>> {
        let mut sql = String::from(
            "SELECT metric_key, step, ts, value, kind FROM metric_latest \
             WHERE job_id = $1 AND metric_key > $2",
        );
        let mut next = 3;
        if page.prefix.is_some() {
            // substr rather than LIKE: no escaping of `%`/`_`, and no
            // case folding (SQLite's LIKE ignores ASCII case).
            sql.push_str(" AND substr(metric_key, 1, CAST($3 AS INTEGER)) = $4");
            next = 5;
        }
        if !page.keys.is_empty() {
            let list = (0..page.keys.len())
                .map(|i| format!("${}", next + i))
                .collect::<Vec<_>>()
                .join(",");
            sql.push_str(&format!(" AND metric_key IN ({list})"));
            next += page.keys.len();
        }
        sql.push_str(&format!(" ORDER BY metric_key LIMIT ${next}"));
        let mut q = sqlx::query(&sql)
            .bind(job.to_string())
            .bind(page.after.as_ref().map_or("", |k| k.as_str()));
        if let Some(prefix) = &page.prefix {
            let chars = i64::try_from(prefix.as_str().chars().count()).unwrap_or(i64::MAX);
            q = q.bind(chars).bind(prefix.as_str());
        }
        for k in &page.keys {
            q = q.bind(k.as_str());
        }
        let rows = q
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&self.db.read)
            .await?;
        rows.iter().map(|r| point_from_row(r, 0)).collect()
    }

    pub async fn keys(&self, job: JobId) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT metric_key FROM metric_latest WHERE job_id = $1 ORDER BY metric_key",
        )
        .bind(job.to_string())
        .fetch_all(&self.db.read)
        .await?)
    }

    /// The points of one series with `start <= step <= end`, reduced to at
    /// most `max` while they are read.
    pub async fn series(
        &self,
        job: JobId,
        key: &MetricKey,
        start: i64,
        end: Option<i64>,
        max: usize,
    ) -> Result<(Vec<Point>, bool)> {
        let job_s = job.to_string();
        let end = end.unwrap_or(i64::MAX);
        let total: i64 = sqlx::query_scalar(
            "SELECT CAST(COUNT(*) AS BIGINT) FROM metric_points \
             WHERE job_id = $1 AND metric_key = $2 AND step >= $3 AND step <= $4",
        )
        .bind(&job_s)
        .bind(key.as_str())
        .bind(start)
        .bind(end)
        .fetch_one(&self.db.read)
        .await?;
        let mut sampler = Downsampler::new(usize::try_from(total).unwrap_or(0), max);
        let mut rows = sqlx::query(
            "SELECT metric_key, step, ts, value, kind FROM metric_points \
             WHERE job_id = $1 AND metric_key = $2 AND step >= $3 AND step <= $4 ORDER BY step",
        )
        .bind(&job_s)
        .bind(key.as_str())
        .bind(start)
        .bind(end)
        .fetch(&self.db.read);
        while let Some(row) = rows.try_next().await? {
            sampler.push(point_from_row(&row, 0)?);
        }
        Ok(sampler.finish())
    }

    /// Points written after sequence `after`, in write order, with their
    /// sequences.
    pub async fn after(&self, job: JobId, after: i64, limit: i64) -> Result<Vec<(i64, Point)>> {
        let rows = sqlx::query(
            "SELECT seq, metric_key, step, ts, value, kind FROM metric_points \
             WHERE job_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
        )
        .bind(job.to_string())
        .bind(after)
        .bind(limit)
        .fetch_all(&self.db.read)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get::<i64, _>(0)?, point_from_row(r, 1)?)))
            .collect()
    }

    /// The newest write sequence of `job` (0 when nothing was written).
    pub async fn last_seq(&self, job: JobId) -> Result<i64> {
        let v: Option<i64> =
            sqlx::query_scalar("SELECT last_seq FROM metric_jobs WHERE job_id = $1")
                .bind(job.to_string())
                .fetch_optional(&self.db.read)
                .await?;
        Ok(v.unwrap_or(0))
    }
}
