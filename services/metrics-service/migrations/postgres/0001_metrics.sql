-- Every stored point; (job, key, step) is the idempotency key of a write.
-- `value` is NULL unless `kind` is 'finite' (SQLite turns NaN into NULL, so
-- the kind is what makes NaN and +-Inf round-trip on both backends).
-- `seq` is the job's write sequence, the cursor of WatchMetrics.
CREATE TABLE metric_points (
    job_id TEXT NOT NULL,
    metric_key TEXT NOT NULL,
    step BIGINT NOT NULL,
    ts BIGINT NOT NULL,
    value DOUBLE PRECISION,
    kind TEXT NOT NULL,
    seq BIGINT NOT NULL,
    PRIMARY KEY (job_id, metric_key, step)
);
CREATE INDEX metric_points_by_seq ON metric_points (job_id, seq);

-- One row per (job, key): the point with the greatest (step, ts, value),
-- maintained by the write transaction. `vrank`/`vnum` give values a total
-- order without NULLs: -inf (0) < finite (1, by vnum) < +inf (2) < NaN (3).
CREATE TABLE metric_latest (
    job_id TEXT NOT NULL,
    metric_key TEXT NOT NULL,
    step BIGINT NOT NULL,
    ts BIGINT NOT NULL,
    value DOUBLE PRECISION,
    kind TEXT NOT NULL,
    vrank BIGINT NOT NULL,
    vnum DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (job_id, metric_key)
);

-- The last write sequence allocated per job. Its row lock serialises the
-- batches of one job, so sequences become visible in order.
CREATE TABLE metric_jobs (
    job_id TEXT PRIMARY KEY,
    last_seq BIGINT NOT NULL
);
