-- Every change to a queue entry is stamped, so the dispatching replica
-- reads only what changed since its last round instead of the whole queue
-- (src/queue_cache.rs). A trigger stamps, so no write path can forget to.
-- Existing rows keep stamp 0: a replica always starts with a full load.
--
-- The stamp is the writing transaction's id. Transactions commit out of id
-- order, so a counter would let a reader skip a change committed late;
-- instead a reader remembers the oldest transaction still running when it
-- read (its snapshot's xmin) and next reads every stamp from there on.
ALTER TABLE queue_entries ADD COLUMN change_stamp BIGINT NOT NULL DEFAULT 0;
CREATE INDEX queue_entries_change_stamp ON queue_entries (change_stamp);

CREATE FUNCTION queue_entries_stamp() RETURNS trigger AS $$
BEGIN
    NEW.change_stamp := pg_current_xact_id()::text::bigint;
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER queue_entries_stamp BEFORE INSERT OR UPDATE ON queue_entries
    FOR EACH ROW EXECUTE FUNCTION queue_entries_stamp();
