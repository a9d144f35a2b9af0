//! Free space and writability of the output location, checked before layer 1 (and again before
//! the head is written), so a run does not die of a full disk hours in.
//!
//! Why twice the output size: the finished layers are staged as part files, and the shards are
//! assembled from them before the parts are removed, so both exist at the end of a run.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Test hook: with `AWQ_INJECT_FREE_BYTES=N`, the filesystem of the output reports N bytes free
/// — how the tests simulate a nearly full disk.
pub const INJECT_FREE_ENV: &str = "AWQ_INJECT_FREE_BYTES";

/// The nearest existing ancestor of `path` (itself when it exists).
fn existing_ancestor(path: &Path) -> PathBuf {
    let abs = super::output::resolve(path);
    abs.ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"))
        .to_path_buf()
}

/// Bytes available to this user on the filesystem that holds `path` (or would hold it: the
/// nearest existing ancestor is asked); `None` when the system cannot say.
pub fn available(path: &Path) -> Option<u64> {
    if let Some(n) = std::env::var(INJECT_FREE_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return Some(n);
    }
    statvfs_available(&existing_ancestor(path))
}

#[cfg(unix)]
fn statvfs_available(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: `c` is a valid NUL-terminated path and `st` a properly sized out-parameter that
    // statvfs fills on success (return 0); nothing is read from it otherwise.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

#[cfg(not(unix))]
fn statvfs_available(_dir: &Path) -> Option<u64> {
    None
}

/// Bytes of the regular files under `dir`, recursively (what an interrupted run staged).
pub fn bytes_under(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(|e| e.ok())
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => bytes_under(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map_or(0, |m| m.len()),
            _ => 0,
        })
        .sum()
}

/// Bytes as the messages show them: `1.23 GB`, `456.7 MB`.
pub fn human(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else {
        format!("{:.1} MB", b / 1e6)
    }
}

/// Refuses (exit 1) when the filesystem of `output` has fewer than `needed` bytes free; `what`
/// says when and why that much is needed. Passes when the system cannot tell.
pub fn check(output: &Path, needed: u64, what: &str) -> Result<()> {
    match available(output) {
        Some(free) if free < needed => Err(Error::Runtime(format!(
            "not enough free space for {}: {what} needs about {}, but only {} is free on the \
             filesystem of {}; free some space or choose another -o",
            output.display(),
            human(needed),
            human(free),
            existing_ancestor(output).display()
        ))),
        _ => Ok(()),
    }
}

/// Refuses (exit 1) an output location where this process cannot create files: a probe file is
/// created in the nearest existing ancestor of `output` and removed at once.
pub fn check_writable(output: &Path) -> Result<()> {
    let dir = existing_ancestor(output.parent().unwrap_or(output));
    let probe = dir.join(format!(".awq-write-probe-{}", std::process::id()));
    std::fs::File::create(&probe).map_err(|e| {
        Error::Runtime(format!(
            "the output location {} is not writable: creating a file in {} failed: {e}",
            output.display(),
            dir.display()
        ))
    })?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filesystem_of_a_missing_path_is_its_ancestors() {
        let tmp = tempfile::tempdir().unwrap();
        let deep = tmp.path().join("a/b/c");
        assert_eq!(existing_ancestor(&deep), tmp.path().canonicalize().unwrap());
        assert!(available(&deep).is_some_and(|n| n > 0));
        check_writable(&deep).unwrap();
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
    }
}
