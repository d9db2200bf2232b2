-- Every change to a queue entry is stamped, so the dispatching replica
-- reads only what changed since its last round instead of the whole queue
-- (src/queue_cache.rs). Triggers stamp, so no write path can forget to.
-- Existing rows keep stamp 0: a replica always starts with a full load.
ALTER TABLE queue_entries ADD COLUMN change_stamp BIGINT NOT NULL DEFAULT 0;
CREATE INDEX queue_entries_change_stamp ON queue_entries (change_stamp);

-- SQLite has one writer, so a counter bumped by each change increases in
-- commit order: a reader that saw stamp N has seen every change up to N.
CREATE TABLE queue_change_counter (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    stamp BIGINT NOT NULL
);
INSERT INTO queue_change_counter (id, stamp) VALUES (1, 0);

-- The inner UPDATE does not fire the trigger again (recursive_triggers is
-- off, SQLite's default).
CREATE TRIGGER queue_entries_stamp_insert AFTER INSERT ON queue_entries
BEGIN
    UPDATE queue_change_counter SET stamp = stamp + 1 WHERE id = 1;
    UPDATE queue_entries SET change_stamp = (SELECT stamp FROM queue_change_counter WHERE id = 1)
        WHERE job_id = NEW.job_id;
END;

CREATE TRIGGER queue_entries_stamp_update AFTER UPDATE ON queue_entries
BEGIN
    UPDATE queue_change_counter SET stamp = stamp + 1 WHERE id = 1;
    UPDATE queue_entries SET change_stamp = (SELECT stamp FROM queue_change_counter WHERE id = 1)
        WHERE job_id = NEW.job_id;
END;
