-- Issue 3: limits, approvals, retries with backoff, queue hold, leader lease
-- and heartbeat-based status sync. Identical for SQLite and PostgreSQL (only
-- BIGINT and TEXT columns); keep ../postgres/0002 in step.

-- Earliest dispatch time of a job in retry backoff (0: none).
ALTER TABLE queue_entries ADD COLUMN not_before BIGINT NOT NULL DEFAULT 0;
-- Attempts that reached RUNNING: what the retry budget counts.
ALTER TABLE queue_entries ADD COLUMN started_attempts BIGINT NOT NULL DEFAULT 0;
-- When the entry last became QUEUED (for the time-to-dispatch statistics).
ALTER TABLE queue_entries ADD COLUMN queued_at BIGINT NOT NULL DEFAULT 0;
CREATE INDEX queue_entries_owner ON queue_entries (owner);

-- Microseconds the attempt waited in the queue before dispatch.
ALTER TABLE assignments ADD COLUMN waited BIGINT NOT NULL DEFAULT 0;
ALTER TABLE assignments ADD COLUMN delivered_at BIGINT NOT NULL DEFAULT 0;
-- Consecutive heartbeats of its runner that did not list the attempt.
ALTER TABLE assignments ADD COLUMN missed_heartbeats BIGINT NOT NULL DEFAULT 0;
CREATE INDEX assignments_created ON assignments (created_at);

-- One row per configured scope: GLOBAL and USER_DEFAULT with subject '',
-- ORG and USER with the org or user name. NULL means no limit there.
CREATE TABLE limits (
    scope TEXT NOT NULL,
    subject TEXT NOT NULL,
    max_running_jobs BIGINT,
    max_gpus BIGINT,
    max_queued_jobs BIGINT,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (scope, subject)
);

-- One approval per job that matched a rule. state: PENDING, APPROVED,
-- REJECTED, EXPIRED.
CREATE TABLE approvals (
    job_id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    rule TEXT NOT NULL,
    state TEXT NOT NULL,
    decided_by TEXT NOT NULL DEFAULT '',
    note TEXT NOT NULL DEFAULT '',
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    decided_at BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX approvals_state ON approvals (state, expires_at);

-- Named switches shared by all replicas; 'hold' present = the queue is held.
CREATE TABLE scheduler_flags (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    set_by TEXT NOT NULL,
    updated_at BIGINT NOT NULL
);

-- The dispatch leader among replicas (one row, name 'dispatch').
CREATE TABLE leader_lease (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    expires_at BIGINT NOT NULL
);
