//! The runner's installation key: a random id kept in its work directory.
//!
//! The scheduler lets one live runner hold a name at a time. A runner that
//! starts again on the same work directory sends the same key, so it may
//! register at once even while its previous registration's lease runs; a
//! second machine (or a second work directory) given the same name sends
//! another key and is refused until the first runner's lease ends.

use std::io::Write as _;
use std::path::Path;

/// The key's file in the work directory.
pub const FILE: &str = "runner-instance";

/// Reads the key, or creates it on the first start.
pub fn key(work_dir: &Path) -> anyhow::Result<String> {
    let path = work_dir.join(FILE);
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => return Ok(s.trim().to_owned()),
        // Empty: a write cut short before it was renamed into place cannot
        // leave this, but a hand-made file can; a new key replaces it.
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => anyhow::bail!("cannot read the runner's key {}: {e}", path.display()),
    }
    let key = uuid::Uuid::new_v4().to_string();
    let tmp = work_dir.join(format!("{FILE}.tmp"));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(key.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    };
    write()
        .map_err(|e| anyhow::anyhow!("cannot write the runner's key {}: {e}", path.display()))?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let first = key(dir.path()).unwrap();
        assert_eq!(key(dir.path()).unwrap(), first);
        let other = tempfile::tempdir().unwrap();
        assert_ne!(key(other.path()).unwrap(), first);
        std::fs::write(dir.path().join(FILE), "  \n").unwrap();
        let replaced = key(dir.path()).unwrap();
        assert!(!replaced.is_empty() && replaced != first);
    }
}
