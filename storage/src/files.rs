//! Small file-system helpers: the directory lock, directory fsync, and atomically replaced
//! small files.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// How long a lock that looks taken is retried (see `DirLock::acquire`).
const LOCK_RETRY: std::time::Duration = std::time::Duration::from_millis(200);

/// An exclusive `flock` on `DIR/.lock`, held for the life of a log or store. `flock` locks
/// belong to the open file description, so a second handle in the same process conflicts too.
#[derive(Debug)]
pub(crate) struct DirLock {
    _file: File,
}

impl DirLock {
    pub(crate) fn acquire(dir: &Path) -> Result<DirLock> {
        let path = dir.join(".lock");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io("open lock file", &path, e))?;
        // A process that forks (to run a command, say) lends its children its open file
        // descriptions until they exec, and with them any flock: a lock just released by a
        // dropped handle can look held for a moment. Retry briefly before calling it taken.
        let deadline = std::time::Instant::now() + LOCK_RETRY;
        loop {
            // SAFETY: plain syscall on a valid descriptor.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if rc == 0 {
                return Ok(DirLock { _file: file });
            }
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(Error::io("lock", &path, err));
            }
            if std::time::Instant::now() >= deadline {
                return Err(Error::Locked { path: dir.to_path_buf() });
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
}

/// Makes the directory's entries (creations, renames, deletions) durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| Error::io("fsync directory", dir, e))
}

/// Replaces `path` with `contents` atomically: a crash leaves either the old or the new file,
/// never a mix. With `durable`, the new contents and the rename are on disk when it returns.
pub(crate) fn replace_file(path: &Path, contents: &[u8], durable: bool) -> Result<()> {
    let tmp: PathBuf = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(|e| Error::io("create", &tmp, e))?;
    f.write_all(contents).map_err(|e| Error::io("write", &tmp, e))?;
    if durable {
        f.sync_data().map_err(|e| Error::io("fdatasync", &tmp, e))?;
    }
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| Error::io("rename into place", path, e))?;
    if durable && let Some(dir) = path.parent() {
        sync_dir(dir)?;
    }
    Ok(())
}

/// Reads a whole small file; `Ok(None)` when it does not exist.
pub(crate) fn read_optional(path: &Path) -> Result<Option<Vec<u8>>> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io("read", path, e)),
    }
}

pub(crate) fn remove_file(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("remove", path, e)),
    }
}
