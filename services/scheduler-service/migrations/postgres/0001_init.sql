-- scheduler-service schema (PostgreSQL). Keep in step with ../sqlite/0001_init.sql:
-- same tables and columns, dialect differences only.

-- One row per job the scheduler knows. `state` is the queue-side job state
-- (QUEUED, SCHEDULED, RUNNING, SUCCEEDED, FAILED, CANCELLED); `attempt` is the
-- number of the latest attempt (0 before the first dispatch). Resource columns
-- hold the totals over all replicas, so planning never decodes `spec`.
CREATE TABLE queue_entries (
    job_id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    org TEXT NOT NULL,
    priority BIGINT NOT NULL,
    gpus BIGINT NOT NULL,
    gpu_type TEXT NOT NULL,
    cpu_milli BIGINT NOT NULL,
    memory_mib BIGINT NOT NULL,
    spec BYTEA NOT NULL,
    correlation_id TEXT NOT NULL,
    submit_time BIGINT NOT NULL,
    enqueued_at BIGINT NOT NULL,
    state TEXT NOT NULL,
    attempt BIGINT NOT NULL DEFAULT 0,
    max_attempts BIGINT NOT NULL,
    runner_id TEXT,
    cancel_requested BIGINT NOT NULL DEFAULT 0,
    reason TEXT NOT NULL DEFAULT '',
    -- Last scheduler_sequence sent to job-service for this job.
    status_seq BIGINT NOT NULL DEFAULT 0,
    updated_at BIGINT NOT NULL
);
CREATE INDEX queue_entries_state ON queue_entries (state, owner);

CREATE TABLE runners (
    runner_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    backend TEXT NOT NULL,
    -- prost-encoded trainmesh.runner.v1.Capacity
    capacity BYTEA NOT NULL,
    gpus_total BIGINT NOT NULL,
    labels TEXT NOT NULL,
    -- live | dead
    state TEXT NOT NULL,
    registered_at BIGINT NOT NULL,
    lease_expires_at BIGINT NOT NULL,
    last_heartbeat_at BIGINT NOT NULL
);
CREATE INDEX runners_state ON runners (state, lease_expires_at);

-- One row per attempt. `state` is an AttemptState name without prefix
-- (SCHEDULED, RUNNING, SUCCEEDED, FAILED, CANCELLED, LOST); SCHEDULED and
-- RUNNING hold their runner's resources.
CREATE TABLE assignments (
    job_id TEXT NOT NULL,
    attempt BIGINT NOT NULL,
    runner_id TEXT NOT NULL,
    -- JSON array of GPU indexes on the runner
    gpu_indexes TEXT NOT NULL,
    cpu_milli BIGINT NOT NULL,
    memory_mib BIGINT NOT NULL,
    state TEXT NOT NULL,
    delivered BIGINT NOT NULL DEFAULT 0,
    cancel_requested BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL,
    started_at BIGINT NOT NULL DEFAULT 0,
    finished_at BIGINT NOT NULL DEFAULT 0,
    exit_code BIGINT,
    -- prost-encoded trainmesh.job.v1.JobError
    error BYTEA,
    PRIMARY KEY (job_id, attempt)
);
CREATE INDEX assignments_runner ON assignments (runner_id, state);
CREATE INDEX assignments_state ON assignments (state);

CREATE TABLE outbox (
    id BIGSERIAL PRIMARY KEY,
    topic TEXT NOT NULL,
    msg_key TEXT NOT NULL,
    payload BYTEA NOT NULL,
    correlation_id TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    attempts BIGINT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL DEFAULT 0,
    last_error TEXT,
    traceparent TEXT
);
