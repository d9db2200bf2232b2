-- LLM analyses that succeeded, so that diagnosing the same attempt again
-- does not ask the endpoint again. `target` is `<kind>/<replica pod>`;
-- `prompt_sha256` is of the rendered prompt, so a log that grew or a rule
-- that changed asks again. `body` is an encoded
-- trainmesh.diagnosis.v1.LlmAnalysis.
CREATE TABLE llm_analyses (
    job_id TEXT NOT NULL,
    attempt BIGINT NOT NULL,
    target TEXT NOT NULL,
    prompt_version TEXT NOT NULL,
    model TEXT NOT NULL,
    prompt_sha256 TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    body BYTEA NOT NULL,
    PRIMARY KEY (job_id, attempt, target, prompt_version, model, prompt_sha256)
);
