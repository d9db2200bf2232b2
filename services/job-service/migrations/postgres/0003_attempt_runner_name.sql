-- The name of the runner each attempt was placed on (the registration id
-- changes with every runner start): runners ship logs and metrics only for
-- attempts placed on them, and the name is what their credential carries.
ALTER TABLE attempts ADD COLUMN runner_name TEXT NOT NULL DEFAULT '';
