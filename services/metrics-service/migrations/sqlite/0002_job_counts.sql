-- What each job has stored, moved by the write transaction under the job's
-- row lock, so the per-job caps are checked without counting rows and
-- concurrent writers cannot pass a cap together. Jobs written before this
-- migration are counted once here.
ALTER TABLE metric_jobs ADD COLUMN point_count BIGINT NOT NULL DEFAULT 0;
ALTER TABLE metric_jobs ADD COLUMN key_count BIGINT NOT NULL DEFAULT 0;
UPDATE metric_jobs SET
    point_count = (SELECT COUNT(*) FROM metric_points p WHERE p.job_id = metric_jobs.job_id),
    key_count = (SELECT COUNT(*) FROM metric_latest l WHERE l.job_id = metric_jobs.job_id);
