//! The core's one error type, and the one place that turns errors into errno.
//!
//! Every operation of the core returns `Result<T, Error>`. An `Error` carries
//! the errno the kernel should see and, for operating errors (disk, database,
//! corrupt data), a message for the log. Programmer errors are asserted, not
//! returned.

use std::fmt;
use std::io;

/// An errno plus what happened, for the log.
#[derive(Debug)]
pub struct Error {
    errno: i32,
    context: String,
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A plain POSIX answer (ENOENT, EEXIST, ...): expected, not logged.
    pub fn errno(errno: i32) -> Error {
        Error {
            errno,
            context: String::new(),
        }
    }

    /// An operating error with a message saying what failed on what.
    pub fn with_context(errno: i32, context: impl Into<String>) -> Error {
        Error {
            errno,
            context: context.into(),
        }
    }

    /// An I/O error from the store, with what we were doing.
    pub fn io(err: io::Error, what: impl fmt::Display) -> Error {
        let errno = err.raw_os_error().unwrap_or(libc::EIO);
        Error {
            errno,
            context: format!("{what}: {err}"),
        }
    }

    /// A RocksDB error. Out-of-space becomes ENOSPC, everything else EIO;
    /// damage to the database's files says what to run.
    pub fn db(err: rocksdb::Error, what: impl fmt::Display) -> Error {
        let damaged = err.kind() == rocksdb::ErrorKind::Corruption;
        let mut text = err.into_string();
        if damaged {
            text.push_str(
                " (the metadata database is damaged: unmount, then run `casfs fsck --store STORE` \
                 on this mount's store to see what `--repair` will do)",
            );
        }
        let errno = if text.contains("No space left") || text.contains("NoSpace") {
            libc::ENOSPC
        } else {
            libc::EIO
        };
        Error {
            errno,
            context: format!("metadata {what}: {text}"),
        }
    }

    /// The errno the kernel sees. This is the only errno mapping in casfs.
    pub fn code(&self) -> i32 {
        self.errno
    }

    /// True for failures of the store itself (worth counting and logging),
    /// false for ordinary POSIX answers such as ENOENT.
    pub fn is_operating_error(&self) -> bool {
        !self.context.is_empty()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = io::Error::from_raw_os_error(self.errno);
        if self.context.is_empty() {
            write!(f, "{name}")
        } else {
            write!(f, "{}: {name}", self.context)
        }
    }
}

impl std::error::Error for Error {}

/// Shorthand for the common POSIX answers.
pub fn enoent<T>() -> Result<T> {
    Err(Error::errno(libc::ENOENT))
}
