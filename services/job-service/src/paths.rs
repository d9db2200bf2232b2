//! Dataset and output path validation, without side effects.
//!
//! A path is accepted only if, after resolving every symbolic link, it lies
//! under one of the allowed roots, compared component by component
//! (`Path::starts_with` on canonical paths), so `/data/sets-evil` is not
//! under `/data/sets` and a link inside a root that points outside it is
//! refused. Nothing is ever created: a not-yet-existing output path is
//! resolved through its longest existing ancestor.

use std::io::ErrorKind;
use std::path::{Component, Path, PathBuf};

use trainmesh_common::error::FieldError;

/// Longest accepted path, in bytes.
pub const MAX_PATH_BYTES: usize = 4096;

/// The roots job paths must resolve under.
#[derive(Clone, Debug, Default)]
pub struct PathPolicy {
    /// Canonical roots; empty means no data roots are configured.
    roots: Vec<PathBuf>,
}

/// Whether the path must already exist.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathKind {
    /// Read by the job: must exist.
    Input,
    /// Written by the job: may not exist yet; its existing ancestor decides.
    Output,
}

impl PathPolicy {
    /// Canonicalises `roots`. A root that does not exist (or cannot be
    /// resolved) is skipped with a warning, never created.
    pub fn new(roots: &[PathBuf]) -> Self {
        let mut canonical = Vec::new();
        for r in roots {
            match std::fs::canonicalize(r) {
                Ok(c) if c.is_dir() => {
                    if !canonical.contains(&c) {
                        canonical.push(c);
                    }
                }
                Ok(c) => {
                    tracing::warn!(root = %c.display(), "data root is not a directory; ignored")
                }
                Err(e) => {
                    tracing::warn!(root = %r.display(), error = %e, "data root cannot be resolved; ignored")
                }
            }
        }
        Self { roots: canonical }
    }

    pub fn roots(&self) -> &[PathBuf] {
        &self.roots
    }

    /// Validates `raw` and returns its canonical form.
    pub fn check(&self, field: &str, raw: &str, kind: PathKind) -> Result<PathBuf, FieldError> {
        let err = |why: String| FieldError::new(field, why);
        if raw.len() > MAX_PATH_BYTES {
            return Err(err(format!("is longer than {MAX_PATH_BYTES} bytes")));
        }
        if raw.contains('\0') {
            return Err(err("must not contain NUL bytes".into()));
        }
        if has_encoded_traversal(raw) {
            return Err(err(format!(
                "`{raw}` contains a percent-encoded `.`, `/`, `\\` or `%`; send the plain path"
            )));
        }
        let path = Path::new(raw);
        if path.components().any(|c| c == Component::ParentDir) {
            return Err(err(format!("`{raw}` must not contain `..`")));
        }
        if !path.is_absolute() {
            return Err(err(format!("`{raw}` must be an absolute path")));
        }
        if self.roots.is_empty() {
            return Err(err(
                "no data roots are configured on job-service (start it with --data-root DIR)"
                    .into(),
            ));
        }
        let resolved = match kind {
            PathKind::Input => match std::fs::canonicalize(path) {
                Ok(p) => p,
                Err(e) if e.kind() == ErrorKind::NotFound => {
                    return Err(err(format!("`{raw}` does not exist")))
                }
                Err(e) => return Err(err(format!("`{raw}` cannot be resolved: {e}"))),
            },
            PathKind::Output => {
                resolve_through_ancestor(path).map_err(|why| err(format!("`{raw}` {why}")))?
            }
        };
        if self.roots.iter().any(|root| resolved.starts_with(root)) {
            Ok(resolved)
        } else {
            Err(err(format!(
                "`{raw}` resolves to `{}`, which is not under an allowed data root ({})",
                resolved.display(),
                self.roots
                    .iter()
                    .map(|r| format!("`{}`", r.display()))
                    .collect::<Vec<_>>()
                    .join(", ")
            )))
        }
    }
}

/// `%2e` (`.`), `%2f` (`/`), `%5c` (`\`) and `%25` (`%`, i.e. double
/// encoding), in either case: a path that a later decoding step could turn
/// into a traversal.
fn has_encoded_traversal(raw: &str) -> bool {
    let lower = raw.to_ascii_lowercase();
    ["%2e", "%2f", "%5c", "%25"]
        .iter()
        .any(|p| lower.contains(p))
}

/// Canonicalises the longest existing ancestor of `path` (which has no `..`)
/// and appends the rest. Refuses a dangling symlink on the way (it would
/// later be followed wherever it points) and an ancestor that is a file.
fn resolve_through_ancestor(path: &Path) -> Result<PathBuf, String> {
    let mut missing: Vec<&std::ffi::OsStr> = Vec::new();
    let mut current = path;
    loop {
        match std::fs::canonicalize(current) {
            Ok(base) => {
                if !missing.is_empty() && !base.is_dir() {
                    return Err(format!(
                        "is below `{}`, which is not a directory",
                        base.display()
                    ));
                }
                let mut out = base;
                for part in missing.iter().rev() {
                    out.push(part);
                }
                return Ok(out);
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {
                if std::fs::symlink_metadata(current).is_ok() {
                    return Err(format!(
                        "goes through `{}`, a symbolic link to a missing target",
                        current.display()
                    ));
                }
                match (current.file_name(), current.parent()) {
                    (Some(name), Some(parent)) => {
                        missing.push(name);
                        current = parent;
                    }
                    _ => return Err("has no existing ancestor".into()),
                }
            }
            Err(e) => return Err(format!("cannot be resolved: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixture {
        _dir: tempfile::TempDir,
        root: PathBuf,
        outside: PathBuf,
        policy: PathPolicy,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let base = std::fs::canonicalize(dir.path()).unwrap();
        let root = base.join("data");
        let outside = base.join("data-evil");
        std::fs::create_dir_all(root.join("sets/imdb")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        let policy = PathPolicy::new(std::slice::from_ref(&root));
        Fixture {
            _dir: dir,
            root,
            outside,
            policy,
        }
    }

    fn s(p: &Path) -> String {
        p.display().to_string()
    }

    #[test]
    fn paths_under_a_root_are_accepted_in_canonical_form() {
        let f = fixture();
        let p = f.root.join("sets/./imdb");
        assert_eq!(
            f.policy.check("d", &s(&p), PathKind::Input).unwrap(),
            f.root.join("sets/imdb")
        );
        let out = f.root.join("runs/new/deep");
        assert_eq!(
            f.policy.check("o", &s(&out), PathKind::Output).unwrap(),
            out
        );
        assert!(
            !f.root.join("runs").exists(),
            "validation must not create directories"
        );
    }

    #[test]
    fn sibling_with_common_string_prefix_is_refused() {
        let f = fixture();
        let e = f
            .policy
            .check("d", &s(&f.outside), PathKind::Input)
            .unwrap_err();
        assert!(
            e.description.contains("not under an allowed data root"),
            "{e}"
        );
    }

    #[test]
    fn traversal_forms_are_refused() {
        let f = fixture();
        let root = s(&f.root);
        for bad in [
            format!("{root}/../data-evil"),
            format!("{root}/sets/%2e%2e/%2E%2E/etc"),
            format!("{root}%2f..%2fetc"),
            format!("{root}/sets/%252e%252e"),
            format!("{root}/sets\0/x"),
            "relative/path".to_owned(),
        ] {
            assert!(
                f.policy.check("d", &bad, PathKind::Output).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn symlink_escapes_are_refused() {
        let f = fixture();
        std::os::unix::fs::symlink(&f.outside, f.root.join("link")).unwrap();
        let e = f
            .policy
            .check("d", &s(&f.root.join("link")), PathKind::Input)
            .unwrap_err();
        assert!(e.description.contains("data-evil"), "{e}");
        assert!(f
            .policy
            .check("o", &s(&f.root.join("link/new")), PathKind::Output)
            .is_err());
        std::os::unix::fs::symlink(f.outside.join("missing"), f.root.join("dangling")).unwrap();
        assert!(f
            .policy
            .check("o", &s(&f.root.join("dangling/x")), PathKind::Output)
            .is_err());
        assert!(!f.outside.join("missing").exists());
    }

    #[test]
    fn missing_input_and_no_roots_are_refused() {
        let f = fixture();
        let e = f
            .policy
            .check("d", &s(&f.root.join("nope")), PathKind::Input)
            .unwrap_err();
        assert!(e.description.contains("does not exist"));
        let none = PathPolicy::new(&[]);
        let e = none.check("d", &s(&f.root), PathKind::Input).unwrap_err();
        assert!(e.description.contains("no data roots are configured"));
    }
}
