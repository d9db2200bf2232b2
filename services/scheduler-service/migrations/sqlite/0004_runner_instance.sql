-- A runner's installation key (kept in its work directory): a registration
-- under a name that a live runner of another installation holds is
-- refused, so two machines cannot run as one runner. Existing rows are
-- from before the key and match nothing.
ALTER TABLE runners ADD COLUMN instance TEXT NOT NULL DEFAULT '';
CREATE INDEX runners_name ON runners (name, state);
