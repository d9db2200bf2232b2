-- Retries that follow the diagnosis: a job moved off a runner after a node
-- fault avoids it, the last retry decision is kept for ExplainJob, and
-- runners collect node faults (by name, so a restarted runner keeps them)
-- until they are cordoned. Identical for SQLite and PostgreSQL; keep
-- ../postgres/0005 in step.

-- JSON array of runner names the job is not placed on; '' for none.
ALTER TABLE queue_entries ADD COLUMN avoid_runners TEXT NOT NULL DEFAULT '';
-- JSON of the decision after the job's latest failed attempt; '' before.
ALTER TABLE queue_entries ADD COLUMN last_retry TEXT NOT NULL DEFAULT '';

-- One row per runner name that has had a node fault. node_faults counts
-- them since the last uncordon; cordoned = 1 keeps new work off it.
CREATE TABLE runner_health (
    name TEXT PRIMARY KEY,
    node_faults BIGINT NOT NULL DEFAULT 0,
    last_fault TEXT NOT NULL DEFAULT '',
    last_fault_at BIGINT NOT NULL DEFAULT 0,
    cordoned BIGINT NOT NULL DEFAULT 0,
    cordon_reason TEXT NOT NULL DEFAULT '',
    cordoned_at BIGINT NOT NULL DEFAULT 0,
    updated_at BIGINT NOT NULL
);
