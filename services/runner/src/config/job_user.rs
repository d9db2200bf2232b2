//! Who the process backend runs jobs as.
//!
//! A job started as the runner's user can read whatever the runner can:
//! the node's tokens and databases when the runner runs as root. So a
//! runner running as root starts jobs as an unprivileged user
//! (`--job-user`), and refuses to start jobs as root unless told
//! (`--allow-root-jobs`). A runner that is not root cannot switch users:
//! its jobs run as itself, and what must stay private from them belongs
//! to another user.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// A user to run jobs as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobUser {
    pub uid: u32,
    pub gid: u32,
}

impl JobUser {
    /// `NAME`, `UID` or `UID:GID`; a name or a lone UID takes the user's
    /// primary group from the user database (a UID it does not know: the
    /// same number as the group).
    pub fn parse(spec: &str) -> anyhow::Result<Self> {
        let spec = spec.trim();
        if let Some((u, g)) = spec.split_once(':') {
            let number = |s: &str, what: &str| {
                s.parse::<u32>().map_err(|_| {
                    anyhow::anyhow!("--job-user `{spec}`: {what} `{s}` is not a number")
                })
            };
            return Ok(Self {
                uid: number(u, "the UID")?,
                gid: number(g, "the GID")?,
            });
        }
        if let Ok(uid) = spec.parse::<u32>() {
            let gid = nix::unistd::User::from_uid(uid.into())
                .ok()
                .flatten()
                .map_or(uid, |u| u.gid.as_raw());
            return Ok(Self { uid, gid });
        }
        let user = nix::unistd::User::from_name(spec)
            .map_err(|e| anyhow::anyhow!("--job-user `{spec}`: {e}"))?
            .ok_or_else(|| anyhow::anyhow!("--job-user `{spec}`: no such user on this node"))?;
        Ok(Self {
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
        })
    }
}

/// `--job-user auto`.
pub const AUTO: &str = "auto";

/// What `--job-user auto` means for a runner running as the current user
/// with `work_dir`: `nobody` for a root runner whose work dir `nobody` can
/// reach; otherwise the runner's own user, which for root is allowed here
/// (`allow_root`) and warned about.
pub fn auto(work_dir: &Path, allow_root: &mut bool) -> anyhow::Result<Option<JobUser>> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    let nobody = JobUser::parse("nobody")?;
    match check(Some(&nobody), false, 0, work_dir) {
        Ok(()) => Ok(Some(nobody)),
        Err(e) => {
            tracing::warn!(error = %e, "--job-user auto: jobs run as root");
            *allow_root = true;
            Ok(None)
        }
    }
}

/// Checks the process backend's setting for a runner running as
/// `running_as`; `work_dir` is where attempt directories are made.
pub fn check(
    user: Option<&JobUser>,
    allow_root: bool,
    running_as: u32,
    work_dir: &Path,
) -> anyhow::Result<()> {
    let runs_as = user.map_or(running_as, |u| u.uid);
    if runs_as == 0 && !allow_root {
        anyhow::bail!(
            "jobs of the process backend would run as root and could read every token and \
             database on this node: give --job-user an unprivileged user (e.g. nobody), or \
             --allow-root-jobs to accept it"
        );
    }
    let Some(user) = user.filter(|u| u.uid != running_as) else {
        return Ok(());
    };
    if running_as != 0 {
        anyhow::bail!(
            "--job-user {}: only a runner running as root can start jobs as another user",
            user.uid
        );
    }
    // The runner opens the attempt directories below the work dir to the
    // job's user; what is above it must already let the user through.
    for dir in work_dir.ancestors().skip(1) {
        let Ok(meta) = std::fs::metadata(dir) else {
            continue;
        };
        if !may_enter(&meta, user) {
            anyhow::bail!(
                "jobs run as user {} could not reach their attempt directories under {}: \
                 {} (mode {:o}) does not let them through; choose another --work-dir or \
                 --data-dir, or allow others to enter {}",
                user.uid,
                work_dir.display(),
                dir.display(),
                meta.mode() & 0o7777,
                dir.display()
            );
        }
    }
    Ok(())
}

fn may_enter(meta: &std::fs::Metadata, user: &JobUser) -> bool {
    let mode = meta.mode();
    if meta.uid() == user.uid {
        mode & 0o100 != 0
    } else if meta.gid() == user.gid {
        mode & 0o010 != 0
    } else {
        mode & 0o001 != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn users_are_named_or_numbered() {
        assert_eq!(
            JobUser::parse("1000:2000").unwrap(),
            JobUser {
                uid: 1000,
                gid: 2000
            }
        );
        assert_eq!(JobUser::parse("root").unwrap(), JobUser { uid: 0, gid: 0 });
        assert!(JobUser::parse("no-such-user-here").is_err());
        assert!(JobUser::parse("10:x").is_err());
    }

    #[test]
    fn root_jobs_need_to_be_allowed_and_switching_needs_root() {
        let dir = tempfile::tempdir().unwrap();
        let nobody = JobUser {
            uid: 65534,
            gid: 65534,
        };
        let err = check(None, false, 0, dir.path()).unwrap_err();
        assert!(err.to_string().contains("--job-user"), "{err}");
        check(None, true, 0, dir.path()).unwrap();
        check(None, false, 1000, dir.path()).unwrap();
        let err = check(Some(&nobody), false, 1000, dir.path()).unwrap_err();
        assert!(
            err.to_string().contains("only a runner running as root"),
            "{err}"
        );
    }

    #[test]
    fn a_work_dir_the_user_cannot_reach_is_named() {
        let top = tempfile::tempdir().unwrap();
        let work = top.path().join("runner");
        std::fs::set_permissions(top.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let nobody = JobUser {
            uid: 65534,
            gid: 65534,
        };
        let err = check(Some(&nobody), false, 0, &work).unwrap_err();
        assert!(
            err.to_string().contains(&top.path().display().to_string()),
            "{err}"
        );
        std::fs::set_permissions(top.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        // /tmp and / let everyone through.
        check(Some(&nobody), false, 0, &work).unwrap();
    }
}
