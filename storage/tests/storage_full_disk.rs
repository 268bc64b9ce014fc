//! A full disk must be a typed `ENOSPC` error from the write that hit it, never a SIGBUS from a
//! later read of the memory-mapped segments, and the data written before it must stay
//! readable; once space is freed, writes continue.
//!
//! Runs on a tiny tmpfs it mounts itself, which needs root (CAP_SYS_ADMIN); elsewhere it is
//! skipped with a notice.

use std::path::{Path, PathBuf};
use std::process::Command;

use faust_storage::{BatchBuilder, Error, Log, LogConfig, Store, StoreConfig, WriteBatch};

/// A tmpfs of `size` mounted on a fresh directory, unmounted on drop.
struct SmallDisk {
    _parent: tempfile::TempDir,
    path: PathBuf,
}

impl SmallDisk {
    fn mount(size: &str) -> Option<SmallDisk> {
        let parent = tempfile::tempdir().ok()?;
        let path = parent.path().join("disk");
        std::fs::create_dir(&path).ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("skipping: cannot mount a tmpfs here (needs root)");
            return None;
        }
        Some(SmallDisk { _parent: parent, path })
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.path).status();
    }
}

/// Held by each test for its whole run. The tests fork (`mount`, `umount`), and a forked child
/// holds the parent's descriptors and mappings until it execs: space a concurrent test just
/// freed by deleting its segments could still be held for that moment, and the test's next
/// write fail with `ENOSPC` (seen once in CI).
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// `ENOSPC` on Linux.
const ENOSPC: i32 = 28;

fn is_enospc(e: &Error) -> bool {
    matches!(e, Error::Io { source, .. } if source.raw_os_error() == Some(ENOSPC))
}

#[test]
fn store_reports_enospc_and_keeps_what_it_wrote() {
    let _alone = one_at_a_time();
    let Some(disk) = SmallDisk::mount("512k") else { return };
    let dir = disk.path().join("store");
    let config = StoreConfig { segment_bytes: 64 << 10, ..StoreConfig::default() };
    let mut store = Store::open(&dir, config.clone()).unwrap();
    let value = vec![0xabu8; 1000];
    let mut written = 0u32;
    let err = loop {
        let mut batch = WriteBatch::new();
        for i in 0..10 {
            batch.put(format!("key-{}", written + i).as_bytes(), &value);
        }
        match store.write(&mut batch) {
            Ok(()) => written += 10,
            Err(e) => break e,
        }
        assert!(written < 10_000, "the disk never filled up");
    };
    assert!(is_enospc(&err), "expected ENOSPC, got {err}");
    assert!(written > 100, "only {written} keys fit");
    // Everything written before the error reads back through the mapping: no SIGBUS.
    for i in 0..written {
        assert_eq!(store.get(format!("key-{i}").as_bytes()).as_deref(), Some(&value[..]));
    }
    assert_eq!(store.len(), written as usize);
    // Free space (a file the test fills the disk with would do the same) and go on.
    drop(store);
    let mut store = Store::open(&dir, config).unwrap();
    assert!(store.is_empty(), "nothing was checkpointed");
    store.put(b"after", b"space").unwrap();
    store.checkpoint(b"ok").unwrap();
}

#[test]
fn log_reports_enospc_and_reads_back_everything_before_it() {
    let _alone = one_at_a_time();
    let Some(disk) = SmallDisk::mount("512k") else { return };
    let dir = disk.path().join("log");
    let config = LogConfig { segment_bytes: 64 << 10, ..LogConfig::default() };
    let mut log = Log::open(&dir, config.clone()).unwrap();
    let mut batch = BatchBuilder::new();
    let mut appended = 0u64;
    let err = loop {
        for _ in 0..10 {
            batch.push(0, Some(b"k"), Some(&[7u8; 1000]), &[]);
        }
        match log.append(&mut batch) {
            Ok(a) => appended = a.last_offset + 1,
            Err(e) => break e,
        }
    };
    assert!(is_enospc(&err), "expected ENOSPC, got {err}");
    let mut next = 0;
    while next < log.high_watermark() {
        for b in log.read(next, 1 << 20).unwrap() {
            for r in b.records_from(next) {
                assert_eq!(r.value.as_deref(), Some(&[7u8; 1000][..]));
                next = r.offset + 1;
            }
        }
    }
    assert_eq!(next, appended);
    log.sync().unwrap();
    drop(log);
    let log = Log::open(&dir, config).unwrap();
    assert_eq!(log.high_watermark(), appended);
}
