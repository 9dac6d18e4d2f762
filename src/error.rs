//! The core's one error type, and the one place that turns errors into errno.
//!
//! Every operation of the core returns `Result<T, Error>`. An `Error` carries
//! the errno the kernel should see and, for operating errors (disk, database,
//! corrupt data), a message for the log. Programmer errors are asserted, not
//! returned.
//!
//! Operating errors are logged through `ErrorLog`, which bounds how many
//! reach the log: a full disk or a failing database fails every request,
//! and one warning per request would flood the log (and the disk it is on)
//! with the same line. The first `ERRORS_LOGGED_PER_WINDOW` of a window are
//! logged; the rest are counted and summarised, with the last of them,
//! when the window ends.

use std::fmt;
use std::io;
use std::sync::Mutex;
use std::time::{Duration, Instant};

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

/// Operating errors logged in one window; the rest are counted.
pub const ERRORS_LOGGED_PER_WINDOW: u64 = 10;
/// The window of `ERRORS_LOGGED_PER_WINDOW`.
pub const ERROR_LOG_WINDOW: Duration = Duration::from_secs(60);

/// Rate limit for logging operating errors (see the module doc). The lock
/// guards only counters and one message; the lines are logged by the
/// caller, outside it.
#[derive(Default)]
pub struct ErrorLog {
    window: Mutex<ErrorWindow>,
}

#[derive(Default)]
struct ErrorWindow {
    started: Option<Instant>,
    logged: u64,
    suppressed: u64,
    last_suppressed: String,
}

impl ErrorWindow {
    /// The summary of what this window suppressed, if anything, and a
    /// fresh window from `now`.
    fn close(&mut self, now: Instant) -> Option<String> {
        let summary = (self.suppressed > 0).then(|| {
            let secs = self
                .started
                .map_or(0, |s| now.saturating_duration_since(s).as_secs());
            format!(
                "{} more operating errors in the last {secs} s were not logged (the last: {})",
                self.suppressed, self.last_suppressed
            )
        });
        *self = ErrorWindow {
            started: Some(now),
            ..ErrorWindow::default()
        };
        summary
    }
}

impl ErrorLog {
    /// What to log for one operating error at `now`: nothing (suppressed),
    /// the error, or a summary of the last window first.
    pub fn record(&self, now: Instant, error: &dyn fmt::Display) -> Vec<String> {
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        let mut lines = Vec::new();
        let expired = w
            .started
            .is_none_or(|s| now.saturating_duration_since(s) >= ERROR_LOG_WINDOW);
        if expired {
            lines.extend(w.close(now));
        }
        if w.logged < ERRORS_LOGGED_PER_WINDOW {
            w.logged += 1;
            let mut line = error.to_string();
            if w.logged == ERRORS_LOGGED_PER_WINDOW {
                line.push_str(&format!(
                    " ({ERRORS_LOGGED_PER_WINDOW} operating errors logged in {} s; further ones are counted, and summarised when the window ends)",
                    ERROR_LOG_WINDOW.as_secs()
                ));
            }
            lines.push(line);
        } else {
            w.suppressed += 1;
            w.last_suppressed = error.to_string();
        }
        lines
    }

    /// The summary of suppressed errors, once their window has ended (or
    /// at once with `force`, at shutdown). Called periodically, so that a
    /// burst that stops is still reported.
    pub fn flush(&self, now: Instant, force: bool) -> Option<String> {
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        let ended = w
            .started
            .is_some_and(|s| now.saturating_duration_since(s) >= ERROR_LOG_WINDOW);
        if w.suppressed > 0 && (ended || force) {
            w.close(now)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_operating_errors_are_rate_limited_and_what_was_suppressed_is_counted() {
        let log = ErrorLog::default();
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut logged = Vec::new();
        // A flood: 1000 errors in 10 s.
        for i in 0..1000u64 {
            logged.extend(log.record(
                at(i * 10),
                &format!("write ino={i}: No space left on device"),
            ));
        }
        assert_eq!(logged.len() as u64, ERRORS_LOGGED_PER_WINDOW, "{logged:#?}");
        assert!(logged[0].starts_with("write ino=0:"));
        assert!(
            logged.last().unwrap().contains("further ones are counted"),
            "the last logged line says what happens next: {logged:?}"
        );
        // Nothing to report until the window ends, then the count and the
        // last suppressed error.
        assert_eq!(log.flush(at(30_000), false), None);
        let summary = log
            .flush(at(60_000), false)
            .expect("a summary once the window ended");
        assert_eq!(
            summary,
            "990 more operating errors in the last 60 s were not logged (the last: write ino=999: No space left on device)"
        );
        assert_eq!(log.flush(at(200_000), false), None, "reported once");
        // A new window logs again, after the summary of the previous one.
        for i in 0..15u64 {
            log.record(at(200_000 + i), &"eio");
        }
        let lines = log.record(at(300_000), &"later");
        assert_eq!(
            lines,
            vec![
                "5 more operating errors in the last 100 s were not logged (the last: eio)"
                    .to_string(),
                "later".to_string()
            ]
        );
        // Shutdown reports what is left at once.
        for _ in 0..20 {
            log.record(at(300_001), &"x");
        }
        assert!(log
            .flush(at(300_002), true)
            .unwrap()
            .starts_with("11 more operating errors"));
    }
}
