-- Every diagnosis made. `body` is the encoded trainmesh.diagnosis.v1.Diagnosis;
-- `owner` is the job's owner at diagnosis time, for the read checks.
-- `seq` orders a job's diagnoses and is the page token of ListDiagnoses.
CREATE TABLE diagnoses (
    seq BIGSERIAL PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    job_id TEXT NOT NULL,
    owner TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    body BYTEA NOT NULL
);
CREATE INDEX diagnoses_by_job ON diagnoses (job_id, seq);
CREATE INDEX diagnoses_by_owner ON diagnoses (owner, seq);
