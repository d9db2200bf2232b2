//! The LLM prompt templates in effect, one per kind of analysis: `job` (a
//! non-distributed job), `master` and `worker` (replicas of a distributed
//! job). Each has a built-in default; a directory (`--prompt-dir`, a
//! ConfigMap in Kubernetes) with `job.tmpl`, `master.tmpl` or
//! `worker.tmpl` overrides the kinds it has files for. Templates use the
//! Aegis variables ([`crate::template`]), so prompts written for Aegis
//! carry over.
//!
//! A template's version is `<source>@<first 12 hex digits of the sha256 of
//! its text>` (`builtin@…`, `worker.tmpl@…`): an edited prompt is a new
//! version, and cached answers of the old one are not reused.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use sha2::{Digest, Sha256};
use trainmesh_common::proto::diagnosis::v1 as dpb;

use crate::template::Template;

/// Recorded on diagnoses made by the rules alone.
pub const RULES_VERSION: &str = "rules-v1";

/// Largest template file read, in bytes.
const MAX_TEMPLATE_BYTES: u64 = 256 * 1024;

/// Which template an analysis uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A whole non-distributed job.
    Job,
    Master,
    Worker,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Job, Kind::Master, Kind::Worker];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Job => "job",
            Kind::Master => "master",
            Kind::Worker => "worker",
        }
    }

    pub fn file_name(self) -> String {
        format!("{}.tmpl", self.as_str())
    }

    fn intro(self) -> &'static str {
        match self {
            Kind::Job => {
                "You are an expert in diagnosing machine-learning training jobs (PyTorch,\n\
                 DeepSpeed, Hugging Face, CUDA) on GPU machines. Below is one job that ran\n\
                 as a single replica: its state, error, events and the telling lines of its log."
            }
            Kind::Master => {
                "You are an expert in diagnosing distributed machine-learning training jobs\n\
                 (PyTorch, DeepSpeed, NCCL, CUDA) on GPU clusters. Below is the MASTER replica\n\
                 (rank 0) of a distributed job: the job's state, every replica's state, events,\n\
                 and the telling lines of the master's own log."
            }
            Kind::Worker => {
                "You are an expert in diagnosing distributed machine-learning training jobs\n\
                 (PyTorch, DeepSpeed, NCCL, CUDA) on GPU clusters. Below is one WORKER replica\n\
                 of a distributed job that failed or misbehaved (named first in the error\n\
                 information): the job's state, every replica's state, events, and the telling\n\
                 lines of that worker's own log."
            }
        }
    }
}

/// What every built-in template asks after its introduction.
const BUILTIN_BODY: &str = r#"

Answer in exactly this format, each field starting a line:

Healthy: Yes|No
Error: <the root cause in one line>
Analysis: <why it happened, citing log line numbers and events>
Solution: <what the user should change, concretely>

Job metadata:
- Name: {{.Metadata.JobName}}
- Status: {{.Metadata.JobStatus}}
- Launcher (last attempt): {{.Metadata.LauncherStatus}}
- Masters expected / created: {{.Metadata.MasterExpected}} / {{.Metadata.MasterCreatedCount}}
- Workers expected / created: {{.Metadata.WorkerExpected}} / {{.Metadata.WorkerCreatedCount}}
- Master state: {{.Metadata.MasterDiagnosis}}
- Worker states:
{{.Metadata.WorkerDiagnosis}}

Error information (the replica analysed, the job's structured error, what trainmesh's rules found):
{{.ErrorInfo}}

Events (state, attempts, pod and container events, numbered by log line):
{{.EventInfo}}

Log window (selected lines with their line numbers; lines that mention errors first, then the most recent):
{{.LogInfo}}

Guidance:
- Prefer the earliest root cause: an out-of-memory kill or a crash on one rank makes
  the other ranks fail later with NCCL timeouts or connection resets.
- Exit code 137 without a traceback means the process was killed (usually by the
  out-of-memory killer: OOMKilled); 139 is a segmentation fault; 143 is SIGTERM.
- Expected replicas that were never created point at scheduling or image problems,
  not at the training code.
- If nothing points to a problem, answer Healthy: Yes and Error: None.
"#;

/// One template in effect.
#[derive(Clone, Debug)]
pub struct Prompt {
    pub kind: Kind,
    /// "builtin" or the file it was read from.
    pub source: String,
    pub version: String,
    pub text: String,
    pub template: Template,
}

fn version(label: &str, text: &str) -> String {
    let digest = hex::encode(Sha256::digest(text.as_bytes()));
    format!("{label}@{}", &digest[..12])
}

impl Prompt {
    fn builtin(kind: Kind) -> Self {
        let text = format!("{}{BUILTIN_BODY}", kind.intro());
        let template = Template::parse(&format!("builtin:{}", kind.as_str()), &text)
            .unwrap_or_else(|e| unreachable!("built-in template is valid: {e}"));
        Self {
            kind,
            source: "builtin".into(),
            version: version("builtin", &text),
            text,
            template,
        }
    }

    fn from_file(kind: Kind, path: &Path) -> anyhow::Result<Self> {
        let shown = path.display().to_string();
        let meta = std::fs::metadata(path).with_context(|| format!("prompt template `{shown}`"))?;
        anyhow::ensure!(
            meta.is_file() && meta.len() <= MAX_TEMPLATE_BYTES,
            "prompt template `{shown}` is not a file of at most {MAX_TEMPLATE_BYTES} bytes"
        );
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("prompt template `{shown}` (UTF-8 text)"))?;
        let template = Template::parse(&shown, &text)?;
        Ok(Self {
            kind,
            source: shown,
            version: version(&kind.file_name(), &text),
            text,
            template,
        })
    }

    pub fn to_proto(&self) -> dpb::PromptTemplate {
        dpb::PromptTemplate {
            kind: self.kind.as_str().into(),
            version: self.version.clone(),
            source: self.source.clone(),
            text: self.text.clone(),
        }
    }
}

/// The template of each kind.
#[derive(Clone, Debug)]
pub struct Prompts {
    by_kind: [Prompt; 3],
}

impl Prompts {
    pub fn builtin() -> Self {
        Self {
            by_kind: Kind::ALL.map(Prompt::builtin),
        }
    }

    /// The built-in templates, overridden by the files in `dir`. A file that
    /// does not parse is an error naming it, line and column; so is a
    /// `dir` that is not a readable directory.
    pub fn load(dir: Option<&Path>) -> anyhow::Result<Self> {
        let Some(dir) = dir else {
            return Ok(Self::builtin());
        };
        let entries = std::fs::read_dir(dir)
            .with_context(|| format!("prompt directory `{}`", dir.display()))?;
        let expected: Vec<String> = Kind::ALL.iter().map(|k| k.file_name()).collect();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            // `..data` and the like are a ConfigMap volume's own entries.
            if name.ends_with(".tmpl") && !name.starts_with("..") && !expected.contains(&name) {
                tracing::warn!(
                    file = %e.path().display(),
                    "ignoring prompt template: only job.tmpl, master.tmpl and worker.tmpl are used"
                );
            }
        }
        let mut by_kind = Kind::ALL.map(Prompt::builtin);
        for p in &mut by_kind {
            let path: PathBuf = dir.join(p.kind.file_name());
            if path.exists() {
                *p = Prompt::from_file(p.kind, &path)?;
            }
        }
        Ok(Self { by_kind })
    }

    pub fn get(&self, kind: Kind) -> &Prompt {
        &self.by_kind[kind as usize]
    }

    pub fn to_proto(&self) -> Vec<dpb::PromptTemplate> {
        self.by_kind.iter().map(Prompt::to_proto).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_templates_parse_and_carry_content_versions() {
        let p = Prompts::builtin();
        for k in Kind::ALL {
            let t = p.get(k);
            assert_eq!(t.kind, k);
            assert_eq!(t.source, "builtin");
            assert!(t.version.starts_with("builtin@"), "{}", t.version);
            assert_eq!(t.version.len(), "builtin@".len() + 12);
            assert!(t.text.contains("{{.LogInfo}}"));
        }
        assert_ne!(p.get(Kind::Master).version, p.get(Kind::Worker).version);
        assert_eq!(
            Prompts::builtin().get(Kind::Job).version,
            p.get(Kind::Job).version
        );
    }

    #[test]
    fn a_directory_overrides_the_kinds_it_has_files_for() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("worker.tmpl"), "W {{.LogInfo}}").unwrap();
        std::fs::write(dir.path().join("pytorchjob.tmpl"), "{{ .Unknown }}").unwrap();
        let p = Prompts::load(Some(dir.path())).unwrap();
        let w = p.get(Kind::Worker);
        assert_eq!(w.text, "W {{.LogInfo}}");
        assert!(w.source.ends_with("worker.tmpl"));
        let digest = hex::encode(Sha256::digest(b"W {{.LogInfo}}"));
        assert_eq!(w.version, format!("worker.tmpl@{}", &digest[..12]));
        assert_eq!(p.get(Kind::Master).source, "builtin");
        assert_eq!(p.to_proto().len(), 3);
    }

    #[test]
    fn a_bad_file_or_a_missing_directory_refuses_to_load() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("master.tmpl"), "ok\n{{ .Metadata.Nope }}").unwrap();
        let e = Prompts::load(Some(dir.path())).unwrap_err().to_string();
        assert!(e.contains("master.tmpl` line 2 column 1"), "{e}");
        assert!(e.contains("unknown .Metadata key `Nope`"), "{e}");

        let e = Prompts::load(Some(&dir.path().join("absent")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("prompt directory"), "{e}");
    }
}
