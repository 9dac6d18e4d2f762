//! Free space on the store's filesystem, and the reserve casfs keeps there.
//!
//! The reserve is room the metadata database needs for its log and its
//! flushes: new data is refused (ENOSPC) while the filesystem is down to it
//! (`Core::check_space`), and a database stopped by a failed write is
//! reopened only once the filesystem has it again (`Store::recover`).
//! Both ask the same question here, so they agree on what "full" means.

use std::path::Path;

use crate::error::{Error, Result};

/// The reserve, as a fraction (1/N) of the filesystem's size, clamped to
/// the bounds below.
const RESERVE_DIVISOR: u64 = 100;
const RESERVE_BYTES_MIN: u64 = 8 << 20;
const RESERVE_BYTES_MAX: u64 = 128 << 20;

/// What `statvfs` says about the store's filesystem.
#[derive(Clone, Copy, Debug)]
pub struct Room {
    pub total_bytes: u64,
    /// Bytes an unprivileged writer may still use (`f_bavail`).
    pub free_bytes: u64,
    pub reserve_bytes: u64,
    /// The raw answer, for `statfs` replies.
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
}

impl Room {
    /// True while the filesystem has more free space than the reserve.
    pub fn above_reserve(&self) -> bool {
        self.free_bytes >= self.reserve_bytes
    }

    /// Bytes free beyond the reserve (0 when down to it).
    pub fn spare_bytes(&self) -> u64 {
        self.free_bytes.saturating_sub(self.reserve_bytes)
    }
}

/// Asks the filesystem holding `path`.
pub fn room(path: &Path) -> Result<Room> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| Error::with_context(libc::EINVAL, "store path holds a NUL byte"))?;
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out-pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return Err(Error::io(
            std::io::Error::last_os_error(),
            format_args!("statfs of the store {}", path.display()),
        ));
    }
    let bsize = s.f_frsize;
    let total_bytes = s.f_blocks.saturating_mul(bsize);
    Ok(Room {
        total_bytes,
        free_bytes: s.f_bavail.saturating_mul(bsize),
        reserve_bytes: (total_bytes / RESERVE_DIVISOR).clamp(RESERVE_BYTES_MIN, RESERVE_BYTES_MAX),
        blocks: s.f_blocks,
        bfree: s.f_bfree,
        bavail: s.f_bavail,
        files: s.f_files,
        ffree: s.f_ffree,
        bsize: bsize as u32,
    })
}
