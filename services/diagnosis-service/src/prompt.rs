//! The built-in LLM prompt template. It uses the Aegis variables (`.Metadata`
//! with JobName, JobStatus, LauncherStatus, MasterExpected,
//! MasterCreatedCount, WorkerExpected, WorkerCreatedCount, MasterDiagnosis,
//! WorkerDiagnosis; `.ErrorInfo`, `.EventInfo`, `.LogInfo`) so prompts
//! written for Aegis carry over. No LLM is called yet; the template is
//! listed so clients can see and prepare overrides.

use trainmesh_common::proto::diagnosis::v1 as dpb;

pub const BUILTIN_VERSION: &str = "builtin-v1";
/// Recorded on diagnoses made by the rules alone.
pub const RULES_VERSION: &str = "rules-v1";

pub const DEFAULT_TEMPLATE: &str = r#"You are an expert in diagnosing distributed machine-learning training jobs
(PyTorch, DeepSpeed, NCCL, CUDA) running on GPU clusters. Analyse the job below
and answer in exactly this format, one line per field:

Healthy: Yes|No
Error: <the root cause in one line>
Analysis: <why it happened, citing log line numbers and events>
Solution: <what the user should change, concretely>

Job metadata:
- Name: {{.Metadata.JobName}}
- Status: {{.Metadata.JobStatus}}
- Launcher status: {{.Metadata.LauncherStatus}}
- Masters expected / created: {{.Metadata.MasterExpected}} / {{.Metadata.MasterCreatedCount}}
- Workers expected / created: {{.Metadata.WorkerExpected}} / {{.Metadata.WorkerCreatedCount}}
- Master diagnosis: {{.Metadata.MasterDiagnosis}}
- Worker diagnosis: {{.Metadata.WorkerDiagnosis}}

Structured error (type, message, exit code, traceback):
{{.ErrorInfo}}

Events (state changes, attempts, container and pod events):
{{.EventInfo}}

Log window (selected lines with their line numbers; error lines first, then the most recent):
{{.LogInfo}}

Rules:
- Prefer the earliest root cause: a CUDA out-of-memory or a crash on one rank makes
  the other ranks fail with NCCL timeouts.
- Exit code 137 without a traceback means the process was killed (usually the
  out-of-memory killer); 139 is a segmentation fault; 143 is SIGTERM.
- If nothing points to a problem, answer Healthy: Yes and Error: None.
"#;

pub fn builtin() -> Vec<dpb::PromptTemplate> {
    vec![dpb::PromptTemplate {
        kind: "default".into(),
        version: BUILTIN_VERSION.into(),
        source: "builtin".into(),
        text: DEFAULT_TEMPLATE.into(),
    }]
}
