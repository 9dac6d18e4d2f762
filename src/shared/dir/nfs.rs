//! NFS-safe file primitives: temp files that clean up after themselves,
//! whole-file reads within a bound, what a failed call means, the marker.

#[allow(unused_imports)]
use super::*;

/// A temp file we created; unlinked on drop unless disarmed (renamed away).
pub(super) struct TempFile {
    pub(super) path: PathBuf,
    pub(super) armed: bool,
}

impl TempFile {
    pub(super) fn link_count(&self) -> u64 {
        fs::symlink_metadata(&self.path)
            .map(|m| m.nlink())
            .unwrap_or(0)
    }
    pub(super) fn exists(&self) -> bool {
        fs::symlink_metadata(&self.path).is_ok()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if self.armed {
            if let Err(e) = fs::remove_file(&self.path) {
                if e.kind() != io::ErrorKind::NotFound {
                    warn!(
                        "shared temp={} outcome=left-behind error={e}",
                        self.path.display()
                    );
                }
            }
        }
    }
}

pub(super) enum ReadFail {
    TooBig(u64),
    Io(io::Error),
}

pub(super) fn read_once(path: &Path, max_bytes: u64) -> Result<Vec<u8>, ReadFail> {
    let file = File::open(path).map_err(ReadFail::Io)?;
    let len = file.metadata().map_err(ReadFail::Io)?.len();
    if len > max_bytes {
        return Err(ReadFail::TooBig(len));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    // Bounded even if the file grows while we read it.
    file.take(max_bytes.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(ReadFail::Io)?;
    if bytes.len() as u64 > max_bytes {
        return Err(ReadFail::TooBig(bytes.len() as u64));
    }
    Ok(bytes)
}

pub(crate) fn check_marker(text: &[u8]) -> Result<(), String> {
    let text = String::from_utf8_lossy(text);
    let line = text.lines().next().unwrap_or("").trim_end();
    match line.strip_prefix(MARKER_PREFIX) {
        Some(v) if v == MARKER_FORMAT.to_string() => Ok(()),
        Some(v) => Err(format!(
            "it uses casfs shared format {v:?}, and this casfs knows only format {MARKER_FORMAT} \
             (upgrade casfs, or give another directory)"
        )),
        None => Err(format!(
            "{MARKER_NAME} is not a casfs marker (it starts {line:?})"
        )),
    }
}

/// The first name in `root` that is not part of our layout, if any.
pub(super) fn first_foreign_entry(root: &Path) -> Result<Option<String>, String> {
    let entries = fs::read_dir(root).map_err(|e| format!("cannot list it: {e}"))?;
    for entry in entries {
        let entry = entry.map_err(|e| format!("cannot list it: {e}"))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !LAYOUT_NAMES.contains(&name.as_str()) {
            return Ok(Some(name));
        }
    }
    Ok(None)
}

pub(super) fn is_stale(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ESTALE)
}

/// What a failed file-system call means: a timeout, a refusal (the shared
/// directory is full, over quota, read-only or not ours to write: it
/// answered, and waiting will not change it until an operator acts), or an
/// outage (anything else: gone, unreachable, I/O errors).
pub(super) fn io_error(op: &str, path: &Path, e: io::Error) -> TierError {
    let text = format!("{op} {}: {e}", path.display());
    match e.raw_os_error() {
        Some(libc::ETIMEDOUT) => TierError::Timeout,
        Some(
            libc::ENOSPC | libc::EDQUOT | libc::EROFS | libc::EACCES | libc::EPERM | libc::EFBIG,
        ) => TierError::Refused(text),
        _ => TierError::Unavailable(text),
    }
}

/// This host's name, reduced to characters safe in a file name.
pub(super) fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at most that.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let name: &[u8] = if rc == 0 {
        &buf[..buf.iter().position(|&b| b == 0).unwrap_or(buf.len())]
    } else {
        b""
    };
    let clean: String = name
        .iter()
        .take(HOSTNAME_BYTES_MAX)
        .map(|&b| {
            if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
                b as char
            } else {
                '_'
            }
        })
        .collect();
    if clean.is_empty() {
        "unknown-host".into()
    } else {
        clean
    }
}
