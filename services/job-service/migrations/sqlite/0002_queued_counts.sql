-- Counting a user's / an org's queued jobs at submit (queued-jobs limit).
CREATE INDEX jobs_owner_state ON jobs (owner, state);
CREATE INDEX jobs_org_state ON jobs (org, state);
