-- job-service schema (SQLite). Keep in step with ../postgres/0001_jobs.sql:
-- only the autoincrement and blob types differ.

CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    org TEXT NOT NULL,
    name TEXT NOT NULL,
    state TEXT NOT NULL,
    -- The validated JobSpec, protobuf-encoded.
    spec BLOB NOT NULL,
    priority BIGINT NOT NULL,
    failure_cause TEXT NOT NULL DEFAULT '',
    -- JobError, protobuf-encoded; NULL unless the job failed.
    error BLOB,
    error_message TEXT NOT NULL DEFAULT '',
    state_reason TEXT NOT NULL DEFAULT '',
    create_time BIGINT NOT NULL,
    update_time BIGINT NOT NULL,
    start_time BIGINT NOT NULL DEFAULT 0,
    end_time BIGINT NOT NULL DEFAULT 0,
    correlation_id TEXT NOT NULL,
    cancel_requested BIGINT NOT NULL DEFAULT 0,
    -- Last scheduler_sequence applied by UpdateJobStatus.
    scheduler_sequence BIGINT NOT NULL DEFAULT 0,
    -- Last per-job event sequence.
    event_sequence BIGINT NOT NULL DEFAULT 0,
    current_attempt BIGINT NOT NULL DEFAULT 0,
    -- DiagnosisSummary, protobuf-encoded.
    diagnosis BLOB,
    pipeline_id TEXT NOT NULL DEFAULT '',
    pipeline_stage TEXT NOT NULL DEFAULT ''
);
CREATE INDEX jobs_list ON jobs (create_time, id);
CREATE INDEX jobs_owner_list ON jobs (owner, create_time, id);
CREATE INDEX jobs_state ON jobs (state);

CREATE TABLE job_labels (
    job_id TEXT NOT NULL,
    label_key TEXT NOT NULL,
    label_value TEXT NOT NULL,
    PRIMARY KEY (job_id, label_key)
);
CREATE INDEX job_labels_kv ON job_labels (label_key, label_value);

CREATE TABLE attempts (
    job_id TEXT NOT NULL,
    number BIGINT NOT NULL,
    runner_id TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL,
    create_time BIGINT NOT NULL,
    start_time BIGINT NOT NULL DEFAULT 0,
    end_time BIGINT NOT NULL DEFAULT 0,
    exit_code BIGINT,
    error BLOB,
    PRIMARY KEY (job_id, number)
);

-- The global id is the WatchJobs cursor. Events outlive a deleted job.
CREATE TABLE job_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    owner TEXT NOT NULL,
    sequence BIGINT NOT NULL,
    event_type TEXT NOT NULL,
    state TEXT NOT NULL,
    previous_state TEXT NOT NULL,
    message TEXT NOT NULL,
    attempt BIGINT NOT NULL,
    event_time BIGINT NOT NULL,
    UNIQUE (job_id, sequence)
);
CREATE INDEX job_events_owner ON job_events (owner, id);

CREATE TABLE job_logs (
    job_id TEXT NOT NULL,
    attempt BIGINT NOT NULL,
    number BIGINT NOT NULL,
    text TEXT NOT NULL,
    PRIMARY KEY (job_id, attempt, number)
);

-- Per attempt: how many lines are stored, so the cap needs no COUNT(*).
CREATE TABLE job_log_stats (
    job_id TEXT NOT NULL,
    attempt BIGINT NOT NULL,
    stored BIGINT NOT NULL,
    last_number BIGINT NOT NULL,
    truncated BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (job_id, attempt)
);

CREATE TABLE idempotency (
    owner TEXT NOT NULL,
    idem_key TEXT NOT NULL,
    job_id TEXT NOT NULL,
    create_time BIGINT NOT NULL,
    PRIMARY KEY (owner, idem_key)
);
CREATE INDEX idempotency_job ON idempotency (job_id);

CREATE TABLE outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    msg_key TEXT NOT NULL,
    payload BLOB NOT NULL,
    correlation_id TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    attempts BIGINT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL DEFAULT 0,
    last_error TEXT,
    traceparent TEXT
);
