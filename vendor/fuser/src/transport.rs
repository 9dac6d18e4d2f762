//! Bring-your-own transport: requests that reach the daemon by some other
//! way than `read()` on `/dev/fuse` (FUSE over io_uring, kernel 6.14+), and
//! whose replies must leave the same way, are dispatched here to the same
//! `Filesystem` methods, with the same reply types.
//!
//! A `Session` that completed its INIT handshake on `/dev/fuse` becomes a
//! `Dispatcher` (`Session::into_dispatcher`). The transport hands it one
//! request at a time as the bytes `/dev/fuse` would have given (the
//! `fuse_in_header`, the operation's arguments, its payload) together with
//! a `ReplySink`, which receives that request's reply (a `fuse_out_header`
//! then the reply's payload, as `writev` on `/dev/fuse` would have) once,
//! from whichever thread the filesystem replies on. Everything else stays
//! on `/dev/fuse`: notifications (`Notifier`), passthrough backing ids, and
//! the requests the kernel keeps sending there (`run_dev`: FORGET and
//! INTERRUPT with io_uring).
//!
//! Invariant: every request given to `dispatch` gets exactly one call of
//! its sink's `send`, unless the filesystem drops the reply unanswered
//! (then fuser sends EIO through the sink, as it would on `/dev/fuse`).

use std::fmt;
use std::io;
use std::io::IoSlice;
use std::os::fd::AsFd;
use std::os::fd::BorrowedFd;
use std::sync::Arc;

use crate::Filesystem;
use crate::Notifier;
use crate::ReplyEmpty;
use crate::ll::Operation;
use crate::request::RequestWithSender;
use crate::session::SessionEventLoop;
use crate::session::UmountOnDrop;

/// Receives the reply to one request that came through a transport of the
/// caller's own.
pub trait ReplySink: Send + Sync + fmt::Debug {
    /// `reply` is a `fuse_out_header` (its `unique` names the request)
    /// followed by the reply's payload, split anyhow.
    fn send(&self, reply: &[IoSlice<'_>]) -> io::Result<()>;
}

/// What `Dispatcher::dispatch` did with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dispatched {
    /// Handed to the filesystem (which replies now or later).
    Handled,
    /// FUSE_DESTROY: answered; the session is over.
    Destroy,
}

/// A mounted, initialized session whose requests the caller brings.
/// Dropping it calls `Filesystem::destroy` (once the last clone of the
/// filesystem is gone) and then unmounts, as the end of `Session::run` does.
pub struct Dispatcher<FS: Filesystem> {
    pub(crate) event_loop: SessionEventLoop<FS>,
    pub(crate) _mount: UmountOnDrop,
}

impl<FS: Filesystem> fmt::Debug for Dispatcher<FS> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dispatcher").finish_non_exhaustive()
    }
}

impl<FS: Filesystem> Dispatcher<FS> {
    /// Dispatches one request (the bytes `/dev/fuse` would have given);
    /// its reply goes to `sink`. An undecodable request is an error and gets
    /// no reply.
    pub fn dispatch(&self, request: &[u8], sink: Arc<dyn ReplySink>) -> io::Result<Dispatched> {
        let sender = self.event_loop.ch.sender().with_sink(sink);
        let Some(req) = RequestWithSender::new(sender, request) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "invalid FUSE request",
            ));
        };
        if let Ok(Operation::Destroy(_)) = req.request.operation() {
            req.reply::<ReplyEmpty>().ok();
            return Ok(Dispatched::Destroy);
        }
        req.dispatch(&self.event_loop);
        Ok(Dispatched::Handled)
    }

    /// Serves the requests that come on `/dev/fuse` itself until the
    /// connection ends (the session's own loop, on one thread).
    pub fn run_dev(&self) -> io::Result<()> {
        self.event_loop.event_loop()
    }

    /// The session's `/dev/fuse` descriptor (what io_uring commands name).
    pub fn device(&self) -> BorrowedFd<'_> {
        self.event_loop.ch.as_fd()
    }

    /// Sends notifications to the kernel (always through `/dev/fuse`).
    pub fn notifier(&self) -> Notifier {
        Notifier::new(self.event_loop.ch.sender())
    }
}
