//! Small text files the embedded transport trusts (committed offsets, topic settings), each
//! sealed with a checksum so that damage — a cut, a flipped byte, an edited number — is
//! detected and reported instead of read as data.
//!
//! A sealed file starts with a header line `faust-<kind> <version>` and ends with one line
//! `crc32c <8 hex digits>`, the CRC32C of every byte before that line. A file with the header
//! but no checksum line was cut short. Files written before checksums existed (no header, no
//! checksum line) are read as they are, strictly: a line that does not parse makes the file
//! damaged; an empty file is damaged (no writer leaves one).

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

const SEAL: &str = "crc32c ";

/// Why a file's contents cannot be trusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Damage(pub(crate) String);

/// `text` with its seal line appended.
pub(crate) fn seal(text: &str) -> String {
    format!("{text}{SEAL}{:08x}\n", crc32c::crc32c(text.as_bytes()))
}

/// The text of a file, checked, and whether it was sealed: a file without a seal (written
/// before checksums existed) comes back as it is, for the caller to parse strictly.
pub(crate) fn unseal(bytes: &[u8]) -> std::result::Result<(String, bool), Damage> {
    let text = std::str::from_utf8(bytes).map_err(|e| Damage(format!("not text: {e}")))?;
    if text.is_empty() {
        return Err(Damage("the file is empty".into()));
    }
    if !text.ends_with('\n') {
        return Err(Damage("the file is cut short (no final newline)".into()));
    }
    let body_end = text.trim_end_matches('\n').rfind('\n').map_or(0, |i| i + 1);
    let last = &text[body_end..];
    let Some(hex) = last.strip_prefix(SEAL) else {
        if text.contains(SEAL) {
            return Err(Damage("the checksum line is not the last line".into()));
        }
        if text.starts_with("faust-") {
            return Err(Damage("the file is cut short (its checksum line is missing)".into()));
        }
        return Ok((text.to_string(), false));
    };
    let stored = u32::from_str_radix(hex.trim_end(), 16)
        .map_err(|_| Damage(format!("bad checksum line `{}`", last.trim_end())))?;
    let body = &text[..body_end];
    let computed = crc32c::crc32c(body.as_bytes());
    if stored != computed {
        return Err(Damage(format!("checksum mismatch (stored {stored:08x}, computed {computed:08x})")));
    }
    Ok((body.to_string(), true))
}

/// How [`write`] treats the file it replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Keep {
    /// Nothing is kept.
    Nothing,
    /// The replaced file becomes [`previous_path`]`(path)` (the previous state, to fall back
    /// on: committed offsets).
    Previous,
    /// [`previous_path`]`(path)` gets the same contents (a spare copy: a topic's settings).
    Copy,
}

/// Writes `contents` to `path` atomically and durably: a crash leaves the old file or the new
/// one, never a mix, and `keep` says what becomes of the file it replaces. The directory is
/// synced once, however many files move (a sync can take long while the disk is busy, and a
/// core may be waiting on it).
pub(crate) fn write(path: &Path, contents: &[u8], keep: Keep) -> Result<()> {
    let io = |op, p: &Path, source| Error::Io { op, path: p.to_path_buf(), source };
    let tmp = write_temporary(path, contents)?;
    let previous = previous_path(path);
    match keep {
        Keep::Nothing => {}
        Keep::Previous => match std::fs::rename(path, &previous) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("keep the previous copy of", path, e)),
        },
        Keep::Copy => {
            let copy = write_temporary(&previous, contents)?;
            std::fs::rename(&copy, &previous).map_err(|e| io("rename into place", &previous, e))?;
        }
    }
    // With `Keep::Previous`, a crash here leaves no file at `path`; readers fall back to the
    // previous copy, which is the newest complete state.
    std::fs::rename(&tmp, path).map_err(|e| io("rename into place", path, e))?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io("fsync directory", dir, e))?;
    }
    Ok(())
}

/// Writes `contents` durably to a temporary file beside `path`, and returns its path.
fn write_temporary(path: &Path, contents: &[u8]) -> Result<PathBuf> {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".tmp");
    let tmp = path.with_file_name(name);
    let io = |op, source| Error::Io { op, path: tmp.clone(), source };
    let mut f = std::fs::File::create(&tmp).map_err(|e| io("create", e))?;
    let written = f.write_all(contents).and_then(|()| f.sync_data());
    if let Err(e) = written {
        drop(f);
        // Leave no partial file taking space (a full disk is the usual reason).
        let _ = std::fs::remove_file(&tmp);
        return Err(io("write", e));
    }
    Ok(tmp)
}

/// Where the previous copy of `path` is kept.
pub(crate) fn previous_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".prev");
    path.with_file_name(name)
}

/// Reads and parses the file at `path`, falling back to its previous copy when it is missing
/// or damaged. `Ok(None)` when neither exists. Returns the value and, when the previous copy
/// was used because the newest was damaged, why.
/// `remedy` goes into the error when both copies are damaged.
pub(crate) fn read_with_fallback<T>(
    path: &Path,
    remedy: &'static str,
    parse: impl Fn(&str, bool) -> std::result::Result<T, Damage>,
) -> Result<Option<(T, Option<Damage>)>> {
    let load = |p: &Path| -> Result<Option<std::result::Result<T, Damage>>> {
        match std::fs::read(p) {
            Ok(bytes) => Ok(Some(unseal(&bytes).and_then(|(text, sealed)| parse(&text, sealed)))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::Io { op: "read", path: p.to_path_buf(), source: e }),
        }
    };
    let previous = previous_path(path);
    match load(path)? {
        Some(Ok(value)) => Ok(Some((value, None))),
        Some(Err(damage)) => match load(&previous)? {
            Some(Ok(value)) => Ok(Some((value, Some(damage)))),
            Some(Err(older)) => Err(Error::DamagedFile {
                path: path.to_path_buf(),
                reason: format!("{}; its previous copy {} is damaged too: {}", damage.0, previous.display(), older.0),
                remedy,
            }),
            None => Err(Error::DamagedFile { path: path.to_path_buf(), reason: damage.0, remedy }),
        },
        // No newest copy: a crash between keeping the previous copy and renaming the new one
        // into place; the previous copy is the newest complete state.
        None => match load(&previous)? {
            Some(Ok(value)) => Ok(Some((value, None))),
            Some(Err(damage)) => Err(Error::DamagedFile { path: previous, reason: damage.0, remedy }),
            None => Ok(None),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_text_round_trips_and_any_change_is_damage() {
        let text = "faust-offsets 2\norders\t0\t1042\norders\t1\t77\n";
        let sealed = seal(text);
        assert_eq!(unseal(sealed.as_bytes()), Ok((text.to_string(), true)));
        // Every single-byte edit, and every cut, is caught.
        for i in 0..sealed.len() {
            let mut bytes = sealed.clone().into_bytes();
            bytes[i] = if bytes[i] == b'7' { b'8' } else { b'7' };
            if bytes == sealed.as_bytes() {
                continue;
            }
            assert!(unseal(&bytes).is_err() || !String::from_utf8_lossy(&bytes).contains(SEAL), "edit at {i}");
            assert!(unseal(&sealed.as_bytes()[..i]).is_err(), "cut at {i}");
        }
        // Unsealed (older) files are handed back as they are, for a strict parse.
        let old = "orders\t0\t1042\n";
        assert_eq!(unseal(old.as_bytes()), Ok((old.to_string(), false)));
        assert!(unseal(&[0xff, 0xfe, b'\n']).is_err());
    }

    #[test]
    fn damage_falls_back_to_the_previous_copy() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.offsets");
        let parse = |t: &str, _sealed: bool| Ok::<_, Damage>(t.to_string());
        assert!(read_with_fallback(&path, "", parse).unwrap().is_none());
        write(&path, seal("faust-test 1\none\n").as_bytes(), Keep::Previous).unwrap();
        write(&path, seal("faust-test 1\ntwo\n").as_bytes(), Keep::Previous).unwrap();
        assert_eq!(read_with_fallback(&path, "", parse).unwrap(), Some(("faust-test 1\ntwo\n".to_string(), None)));
        std::fs::write(&path, "faust-test 1\ntw0\ncrc32c 00000000\n").unwrap();
        let (value, why) = read_with_fallback(&path, "", parse).unwrap().unwrap();
        assert_eq!(value, "faust-test 1\none\n");
        assert!(why.unwrap().0.contains("checksum mismatch"));
        std::fs::write(previous_path(&path), "x").unwrap();
        let err = read_with_fallback(&path, "", parse).unwrap_err();
        assert!(matches!(err, Error::DamagedFile { .. }), "{err}");
        // Missing newest copy (a crash between the renames): the previous one is used.
        std::fs::remove_file(&path).unwrap();
        write(&previous_path(&path), seal("faust-test 1\none\n").as_bytes(), Keep::Nothing).unwrap();
        assert_eq!(read_with_fallback(&path, "", parse).unwrap(), Some(("faust-test 1\none\n".to_string(), None)));
    }
}
