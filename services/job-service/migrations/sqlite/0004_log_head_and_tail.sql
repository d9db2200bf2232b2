-- A log longer than the cap keeps its first lines, its last lines and the
-- telling lines from between: each line records whether it is telling (1)
-- or the marker where lines were dropped (2), and each attempt where its
-- kept tail starts.
ALTER TABLE job_logs ADD COLUMN notable BIGINT NOT NULL DEFAULT 0;
ALTER TABLE job_log_stats ADD COLUMN tail_from BIGINT NOT NULL DEFAULT 0;
