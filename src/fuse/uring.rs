//! FUSE over io_uring (kernel 6.14+, FUSE protocol 7.42): the transport
//! that carries requests and replies through per-CPU ring queues instead of
//! `read()`/`writev()` on `/dev/fuse`. Generic over any fuser `Filesystem`
//! (the floor benchmark, tests/bench/floor, serves through this same file),
//! so casfs's handlers and reply types are the same on either transport.
//!
//! Protocol (the kernel's Documentation/filesystems/fuse-io-uring.rst and
//! fs/fuse/dev_uring.c): the INIT handshake happens on `/dev/fuse` as
//! always, with `FUSE_OVER_IO_URING` in the reply's flags (the kernel offers
//! it only while the `fuse` module's `enable_uring` parameter is set). Then
//! the daemon registers ring entries on every queue, one queue per possible
//! CPU, with `IORING_OP_URING_CMD` on the `/dev/fuse` descriptor in 128-byte
//! SQEs (`FUSE_IO_URING_CMD_REGISTER`; the command area names the queue).
//! An entry is two buffers: a header (`fuse_uring_req_header`: the in/out
//! header, the operation's fixed argument, the payload size) and a payload.
//! The kernel completes an entry's command when it put a request there; the
//! daemon answers into the same buffers and submits
//! `FUSE_IO_URING_CMD_COMMIT_AND_FETCH`, which hands the reply over and
//! re-arms the entry, in one system call together with the wait for the
//! next request. A request goes to the queue of the CPU its caller runs on,
//! and the queue's threads run on that CPU: the reply's wake-up and the
//! next request's hand-off stay on one CPU (no cross-CPU wake-up, no shared
//! request list). Until every queue has an entry, and afterwards for FORGET
//! and INTERRUPT, the kernel still uses `/dev/fuse`, so one thread keeps
//! serving it (`Dispatcher::run_dev`); notifications and passthrough
//! backing ids stay on `/dev/fuse` too.
//!
//! Layout of one entry's memory (one anonymous mapping, `ENTRY_BYTES`):
//! the header buffer at 0, the payload buffer at `PAYLOAD_OFFSET`. fuser
//! decodes a request from the bytes `/dev/fuse` would give (in-header, then
//! the fixed argument, then the payload, contiguous), so the in-header and
//! the fixed argument are copied to just before the payload: the payload
//! (a write's data) is decoded where the kernel put it, never copied.
//!
//! Invariants:
//! - An entry is in one of two hands: the kernel's (its command submitted,
//!   not completed) or its thread's (between the completion and the next
//!   commit). The daemon touches an entry's buffers only in its own hands,
//!   and unmaps them only after the ring is closed (which cancels the
//!   kernel's hold) or the connection ended.
//! - Each request given to the filesystem is committed exactly once: by its
//!   thread if the reply came before the handler returned (casfs's handlers
//!   all reply before returning), else by the replying thread (`Slot`
//!   states `DISPATCHING` → `REPLIED` or `LATE`).
//! - A request's bytes are read only until its reply: the reply is written
//!   into the same payload buffer the request came in (a write's data is
//!   overwritten by its 8-byte answer). fuser's handlers take their
//!   arguments before replying, and casfs's do. A reply's payload is copied
//!   once into the buffer (on `/dev/fuse`, `writev` copies it instead).
//! - A ring thread that fails unexpectedly ends the whole mount (a queue
//!   without entries would leave its CPU's callers waiting forever): the
//!   mount is detached, which aborts the connection and ends every thread.

use std::ffi::CString;
use std::io;
use std::io::IoSlice;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use fuser::{Dispatched, Dispatcher, Filesystem, ReplySink};

/// The module parameter that makes the kernel offer the ring.
pub const ENABLE_PARAMETER: &str = "/sys/module/fuse/parameters/enable_uring";

/// Size of `fuse_uring_req_header` (in/out header 128, operation argument
/// 128, `fuse_uring_ent_in_out` 32).
const HEADER_BYTES: usize = 288;
const HEADER_IN_OUT_BYTES: usize = 128;
const HEADER_OP_IN_OFFSET: usize = 128;
const HEADER_OP_IN_BYTES: usize = 128;
/// `fuse_uring_ent_in_out.payload_sz` within the header.
const HEADER_PAYLOAD_SZ_OFFSET: usize = 256 + 16;
/// `sizeof(struct fuse_in_header)`, `sizeof(struct fuse_out_header)`.
const IN_HEADER_BYTES: usize = 40;
const OUT_HEADER_BYTES: usize = 16;
/// Where the payload buffer starts within an entry's mapping: a page, so
/// the in-header and the fixed argument fit before it (at most 168 bytes)
/// and the payload is page aligned.
const PAYLOAD_OFFSET: usize = 4096;
/// The payload buffer: the kernel wants at least the connection's
/// `max_write` (fuser offers 16 MiB, its `MAX_WRITE_SIZE`) and `max_pages`
/// pages. Mapped with `MAP_NORESERVE` and touched only as far as a request
/// or reply reaches (writes are at most `max_pages`, 1 MiB by default).
pub const PAYLOAD_BYTES_MAX: usize = 16 * 1024 * 1024;
const ENTRY_BYTES: usize = PAYLOAD_OFFSET + PAYLOAD_BYTES_MAX;
// The layout above: the out-header ends before the payload size field; the
// header buffer and the SQE's iovec pair (at HEADER_BYTES) end below where
// the largest in-header + fixed argument is copied before the payload.
const _: () = assert!(HEADER_IN_OUT_BYTES <= HEADER_PAYLOAD_SZ_OFFSET);
const _: () = assert!(
    HEADER_BYTES.next_multiple_of(16) + 32 <= PAYLOAD_OFFSET - IN_HEADER_BYTES - HEADER_OP_IN_BYTES
);
/// Ring entries registered per thread (each thread serves one at a time;
/// more threads per queue, not more entries, let a queue serve requests in
/// parallel while a handler waits).
const ENTRIES_PER_THREAD: usize = 1;
/// Threads per queue, at most.
pub const THREADS_PER_QUEUE_MAX: usize = 64;
/// Queues (possible CPUs), at most.
pub const QUEUES_MAX: usize = 1024;

// io_uring ABI (include/uapi/linux/io_uring.h).
const SYS_IO_URING_SETUP: libc::c_long = libc::SYS_io_uring_setup;
const SYS_IO_URING_ENTER: libc::c_long = libc::SYS_io_uring_enter;
const IORING_SETUP_SQE128: u32 = 1 << 10;
const IORING_FEAT_SINGLE_MMAP: u32 = 1 << 0;
const IORING_ENTER_GETEVENTS: u32 = 1 << 0;
const IORING_OFF_SQ_RING: libc::off_t = 0;
const IORING_OFF_CQ_RING: libc::off_t = 0x800_0000;
const IORING_OFF_SQES: libc::off_t = 0x1000_0000;
const IORING_OP_URING_CMD: u8 = 46;
const SQE_BYTES: usize = 128;
const CQE_BYTES: usize = 16;
// fuse_uring_cmd (include/uapi/linux/fuse.h).
const FUSE_IO_URING_CMD_REGISTER: u32 = 1;
const FUSE_IO_URING_CMD_COMMIT_AND_FETCH: u32 = 2;

#[repr(C)]
#[derive(Default)]
struct SqOffsets {
    head: u32,
    tail: u32,
    ring_mask: u32,
    ring_entries: u32,
    flags: u32,
    dropped: u32,
    array: u32,
    resv1: u32,
    user_addr: u64,
}

#[repr(C)]
#[derive(Default)]
struct CqOffsets {
    head: u32,
    tail: u32,
    ring_mask: u32,
    ring_entries: u32,
    overflow: u32,
    cqes: u32,
    flags: u32,
    resv1: u32,
    user_addr: u64,
}

#[repr(C)]
#[derive(Default)]
struct Params {
    sq_entries: u32,
    cq_entries: u32,
    flags: u32,
    sq_thread_cpu: u32,
    sq_thread_idle: u32,
    features: u32,
    wq_fd: u32,
    resv: [u32; 3],
    sq_off: SqOffsets,
    cq_off: CqOffsets,
}

/// Which transport a mount asks for (`casfs mount --transport`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// The ring where the kernel offers it, else `/dev/fuse`.
    Auto,
    /// The ring, or no mount.
    Uring,
    /// `/dev/fuse` only.
    Dev,
}

impl Transport {
    pub fn parse(s: &str) -> Result<Transport, String> {
        match s {
            "auto" => Ok(Transport::Auto),
            "uring" => Ok(Transport::Uring),
            "dev" => Ok(Transport::Dev),
            _ => Err(format!("unknown transport {s:?} (auto, uring or dev)")),
        }
    }

    /// Before mounting: whether to ask the kernel for the ring at INIT.
    /// `Err` only for `Uring` on a kernel that does not offer it; `Ok(None)`
    /// is /dev/fuse, with the reason when `Auto` fell back.
    pub fn ask_for_ring(self) -> Result<(bool, Option<String>), String> {
        match self {
            Transport::Dev => Ok((false, None)),
            Transport::Uring => kernel_offers()
                .map(|()| (true, None))
                .map_err(|e| format!("--transport uring: {e}")),
            Transport::Auto => Ok(match kernel_offers() {
                Ok(()) => (true, None),
                Err(e) => (false, Some(e)),
            }),
        }
    }
}

/// Threads per queue for a daemon that would run `threads` workers on
/// `/dev/fuse`: its workers spread over the queues, and at least two per
/// queue, so that one slow request (a shared-tier lookup up to its
/// timeout) does not hold up every other caller on that CPU.
pub fn threads_per_queue(threads: usize, queues: usize) -> usize {
    threads
        .div_ceil(queues.max(1))
        .clamp(2, THREADS_PER_QUEUE_MAX)
}

/// How the ring transport runs.
#[derive(Debug, Clone)]
pub struct RingConfig {
    /// Threads serving each queue (each with its own ring and entries).
    pub threads_per_queue: usize,
    /// Runs each queue's threads on that queue's CPU.
    pub pin: bool,
    /// Detached if a ring thread fails (see the module invariants).
    pub mountpoint: PathBuf,
}

/// Whether this kernel offers FUSE over io_uring to a daemon that asks:
/// `Ok` or why not, in words an operator can act on.
pub fn kernel_offers() -> Result<(), String> {
    match std::fs::read_to_string(ENABLE_PARAMETER) {
        Ok(v) if v.trim() == "Y" || v.trim() == "1" => {}
        Ok(_) => {
            return Err(format!(
                "the kernel's FUSE io_uring support is off ({ENABLE_PARAMETER} is N; \
                 enable it with `echo 1 > {ENABLE_PARAMETER}` or `options fuse enable_uring=1` \
                 in /etc/modprobe.d)"
            ))
        }
        Err(e) => {
            return Err(format!(
                "this kernel has no FUSE io_uring support ({ENABLE_PARAMETER}: {e}; \
                 it needs Linux 6.14+ built with CONFIG_FUSE_IO_URING)"
            ))
        }
    }
    // io_uring itself may be off (sysctl kernel.io_uring_disabled) or
    // forbidden (seccomp): try to make a ring of the kind the entries need.
    Ring::new(2)
        .map(drop)
        .map_err(|e| format!("io_uring with 128-byte SQEs is not available to this process: {e}"))
}

/// The number of ring queues the kernel expects: one per possible CPU
/// (`num_possible_cpus()`), from /sys/devices/system/cpu/possible.
pub fn queue_count() -> io::Result<usize> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/possible")?;
    let mut n = 0usize;
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        let bad = || io::Error::new(io::ErrorKind::InvalidData, format!("cpu list {text:?}"));
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a.parse::<usize>(), b.parse::<usize>()),
            None => (part.parse::<usize>(), part.parse::<usize>()),
        };
        let (a, b) = (a.map_err(|_| bad())?, b.map_err(|_| bad())?);
        if b < a {
            return Err(bad());
        }
        n = n.saturating_add(b - a + 1);
    }
    if n == 0 || n > QUEUES_MAX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{n} possible CPUs (at most {QUEUES_MAX} queues)"),
        ));
    }
    Ok(n)
}

/// Serves the session through the ring until the connection ends; blocks.
/// The session's INIT must have agreed on `FUSE_OVER_IO_URING`. Returns
/// once every ring thread and the `/dev/fuse` thread ended; the dispatcher
/// (so the filesystem, whose `destroy` runs then) is dropped last.
pub fn run<FS: Filesystem>(dispatcher: Dispatcher<FS>, config: &RingConfig) -> io::Result<()> {
    let queues = queue_count()?;
    let per_queue = config.threads_per_queue.clamp(1, THREADS_PER_QUEUE_MAX);
    let d = Arc::new(dispatcher);
    let dev = {
        let d = d.clone();
        std::thread::Builder::new()
            .name("fuse-dev".into())
            .spawn(move || d.run_dev())?
    };
    let mut threads = Vec::with_capacity(queues * per_queue);
    let mut spawn_error = None;
    'spawn: for qid in 0..queues {
        for t in 0..per_queue {
            let d = d.clone();
            let config = config.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("fuse-ring-{qid}.{t}"))
                .spawn(move || {
                    let r = serve_queue(&d, qid, config.pin);
                    if let Err(e) = &r {
                        log::error!(
                            "fuse ring queue {qid} thread {t}: {e}; unmounting {}",
                            config.mountpoint.display()
                        );
                        detach(&config.mountpoint);
                    }
                    r
                });
            match spawned {
                Ok(h) => threads.push(h),
                Err(e) => {
                    spawn_error = Some(e);
                    break 'spawn;
                }
            }
        }
    }
    if let Some(e) = &spawn_error {
        log::error!("cannot start fuse ring threads: {e}; unmounting");
        detach(&config.mountpoint);
    }
    let mut result = spawn_error.map_or(Ok(()), Err);
    for h in threads {
        let r = h
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("fuse ring thread panicked")));
        if result.is_ok() {
            result = r;
        }
    }
    let r = dev
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("fuse-dev thread panicked")));
    if result.is_ok() {
        result = r;
    }
    drop(d);
    result
}

/// Ends the mount so that every thread of this transport ends (the kernel
/// aborts the connection once the detached mount is unused).
fn detach(mountpoint: &Path) {
    if let Ok(c) = CString::new(mountpoint.as_os_str().as_bytes()) {
        // SAFETY: a valid C string; umount2 touches nothing of ours.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

/// One thread's share of one queue: its ring and its entries, served until
/// the connection ends.
fn serve_queue<FS: Filesystem>(d: &Dispatcher<FS>, qid: usize, pin: bool) -> io::Result<()> {
    if pin {
        pin_to_cpu(qid);
    }
    let ring = Arc::new(Ring::new(2 * ENTRIES_PER_THREAD as u32)?);
    let device = d.device().as_raw_fd();
    let mut slots = Vec::with_capacity(ENTRIES_PER_THREAD);
    for i in 0..ENTRIES_PER_THREAD {
        let slot = Arc::new(Slot::new(ring.clone(), device, qid as u16, i)?);
        ring.push(&slot.sqe(FUSE_IO_URING_CMD_REGISTER, 0, i as u64))?;
        slots.push(slot);
    }
    let r = serve_slots(d, qid, &ring, &slots);
    if r.is_err() {
        // The connection may live on (until the detach takes effect) and
        // the kernel may still write into an entry: its buffers are left
        // mapped (the daemon is ending). After a normal end (the kernel
        // ended every entry) they are unmapped.
        std::mem::forget(slots);
    }
    r
}

fn serve_slots<FS: Filesystem>(
    d: &Dispatcher<FS>,
    qid: usize,
    ring: &Ring,
    slots: &[Arc<Slot>],
) -> io::Result<()> {
    let mut registered = false;
    loop {
        let cqe = ring.wait()?;
        let Some(slot) = slots.get(cqe.user_data as usize) else {
            return Err(io::Error::other(format!(
                "completion for unknown entry {}",
                cqe.user_data
            )));
        };
        if cqe.res < 0 {
            let e = io::Error::from_raw_os_error(-cqe.res);
            return match -cqe.res {
                // The connection ended (unmount, abort) or the ring is going.
                libc::ENOTCONN | libc::ECONNABORTED | libc::ECANCELED | libc::ENODEV => Ok(()),
                _ if !registered => Err(io::Error::new(
                    e.kind(),
                    format!("the kernel refused to register a ring entry on queue {qid}: {e}"),
                )),
                _ => Err(io::Error::new(
                    e.kind(),
                    format!("ring entry on queue {qid}: {e}"),
                )),
            };
        }
        registered = true;
        match slot.serve(d)? {
            Dispatched::Handled => {}
            Dispatched::Destroy => return Ok(()),
        }
    }
}

fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET stays in bounds
    // (checked), and sched_setaffinity reads the set we own.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if cpu >= 8 * std::mem::size_of::<libc::cpu_set_t>() {
            return;
        }
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            log::debug!(
                "fuse ring: cannot run on CPU {cpu} ({}); unpinned",
                io::Error::last_os_error()
            );
        }
    }
}

/// A completion: which entry, and the command's result.
struct Cqe {
    user_data: u64,
    res: i32,
}

/// One io_uring instance with 128-byte SQEs, used by one thread to wait
/// and by repliers (rarely, `Slot::send` after its handler returned) to
/// submit. The submission side is behind `sq`; waiting needs no lock.
struct Ring {
    fd: OwnedFd,
    sq: Mutex<SqState>,
    /// SQEs pushed but not yet submitted (submitted with the next wait).
    unsubmitted: AtomicU32,
    cq_head: *const AtomicU32,
    cq_tail: *const AtomicU32,
    cq_mask: u32,
    cqes: *const u8,
    maps: Vec<(*mut libc::c_void, usize)>,
}

struct SqState {
    tail: *const AtomicU32,
    head: *const AtomicU32,
    mask: u32,
    entries: u32,
    array: *mut u32,
    sqes: *mut u8,
}

// SAFETY: the raw pointers point into mappings the Ring owns for its whole
// life; the submission queue is only touched under `sq`'s lock, the
// completion queue only by the one thread that waits (`serve_queue`).
unsafe impl Send for Ring {}
unsafe impl Sync for Ring {}

fn map(fd: RawFd, len: usize, offset: libc::off_t) -> io::Result<*mut libc::c_void> {
    // SAFETY: a fresh shared mapping of the ring's own regions.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_POPULATE,
            fd,
            offset,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(p)
}

impl Ring {
    fn new(entries: u32) -> io::Result<Ring> {
        // Not SINGLE_ISSUER|DEFER_TASKRUN (as libfuse): a late reply is
        // committed from the replying thread, and on this VM those flags
        // saved at most 0.5 µs of an 8 µs round trip (doc/performance.md).
        let mut p = Params {
            flags: IORING_SETUP_SQE128,
            ..Params::default()
        };
        // SAFETY: io_uring_setup fills `p`, which outlives the call.
        let fd = unsafe { libc::syscall(SYS_IO_URING_SETUP, entries, &mut p as *mut Params) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel just gave us this descriptor.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        let raw = fd.as_raw_fd();
        let sq_len = p.sq_off.array as usize + p.sq_entries as usize * 4;
        let cq_len = p.cq_off.cqes as usize + p.cq_entries as usize * CQE_BYTES;
        let mut maps = Vec::new();
        let (sq_ptr, cq_ptr) = if p.features & IORING_FEAT_SINGLE_MMAP != 0 {
            let len = sq_len.max(cq_len);
            let m = map(raw, len, IORING_OFF_SQ_RING)?;
            maps.push((m, len));
            (m as *mut u8, m as *mut u8)
        } else {
            let s = map(raw, sq_len, IORING_OFF_SQ_RING)?;
            maps.push((s, sq_len));
            let c = map(raw, cq_len, IORING_OFF_CQ_RING)?;
            maps.push((c, cq_len));
            (s as *mut u8, c as *mut u8)
        };
        let sqes_len = p.sq_entries as usize * SQE_BYTES;
        let sqes = map(raw, sqes_len, IORING_OFF_SQES)?;
        maps.push((sqes, sqes_len));
        // SAFETY: the offsets come from the kernel and lie in the mappings.
        unsafe {
            Ok(Ring {
                sq: Mutex::new(SqState {
                    head: sq_ptr.add(p.sq_off.head as usize) as *const AtomicU32,
                    tail: sq_ptr.add(p.sq_off.tail as usize) as *const AtomicU32,
                    mask: *(sq_ptr.add(p.sq_off.ring_mask as usize) as *const u32),
                    entries: p.sq_entries,
                    array: sq_ptr.add(p.sq_off.array as usize) as *mut u32,
                    sqes: sqes as *mut u8,
                }),
                unsubmitted: AtomicU32::new(0),
                cq_head: cq_ptr.add(p.cq_off.head as usize) as *const AtomicU32,
                cq_tail: cq_ptr.add(p.cq_off.tail as usize) as *const AtomicU32,
                cq_mask: *(cq_ptr.add(p.cq_off.ring_mask as usize) as *const u32),
                cqes: cq_ptr.add(p.cq_off.cqes as usize),
                fd,
                maps,
            })
        }
    }

    /// Queues one SQE (submitted by the next `wait` or `submit`).
    fn push(&self, sqe: &[u8; SQE_BYTES]) -> io::Result<()> {
        let sq = self.sq.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: head/tail/array/sqes point into our mappings; we are the
        // only producer (the lock), the kernel only advances `head`.
        unsafe {
            let tail = (*sq.tail).load(Ordering::Relaxed);
            let head = (*sq.head).load(Ordering::Acquire);
            if tail.wrapping_sub(head) >= sq.entries {
                return Err(io::Error::other("io_uring submission queue full"));
            }
            let idx = tail & sq.mask;
            std::ptr::copy_nonoverlapping(
                sqe.as_ptr(),
                sq.sqes.add(idx as usize * SQE_BYTES),
                SQE_BYTES,
            );
            *sq.array.add(idx as usize) = idx;
            (*sq.tail).store(tail.wrapping_add(1), Ordering::Release);
        }
        self.unsubmitted.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn enter(&self, to_submit: u32, min_complete: u32, flags: u32) -> io::Result<u32> {
        loop {
            // SAFETY: io_uring_enter on our ring, no signal mask.
            let r = unsafe {
                libc::syscall(
                    SYS_IO_URING_ENTER,
                    self.fd.as_raw_fd(),
                    to_submit,
                    min_complete,
                    flags,
                    std::ptr::null::<libc::c_void>(),
                    0usize,
                )
            };
            if r >= 0 {
                return Ok(r as u32);
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINTR) {
                return Err(e);
            }
        }
    }

    /// Submits what is queued now (a reply that came after its handler
    /// returned, from a thread that is not the ring's).
    fn submit(&self) -> io::Result<()> {
        let n = self.unsubmitted.swap(0, Ordering::Relaxed);
        if n > 0 {
            let done = self.enter(n, 0, 0)?;
            if done < n {
                self.unsubmitted.fetch_add(n - done, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// Submits what is queued and waits for the next completion.
    fn wait(&self) -> io::Result<Cqe> {
        loop {
            // SAFETY: cq_head/cq_tail/cqes point into our mappings; only this
            // thread consumes completions.
            unsafe {
                let head = (*self.cq_head).load(Ordering::Relaxed);
                let tail = (*self.cq_tail).load(Ordering::Acquire);
                if head != tail {
                    let cqe = self.cqes.add((head & self.cq_mask) as usize * CQE_BYTES);
                    let user_data = std::ptr::read_unaligned(cqe as *const u64);
                    let res = std::ptr::read_unaligned(cqe.add(8) as *const i32);
                    (*self.cq_head).store(head.wrapping_add(1), Ordering::Release);
                    return Ok(Cqe { user_data, res });
                }
            }
            let n = self.unsubmitted.swap(0, Ordering::Relaxed);
            let done = self.enter(n, 1, IORING_ENTER_GETEVENTS)?;
            if done < n {
                self.unsubmitted.fetch_add(n - done, Ordering::Relaxed);
            }
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        for &(p, len) in &self.maps {
            // SAFETY: our own mappings, unused from here on.
            unsafe { libc::munmap(p, len) };
        }
    }
}

const DISPATCHING: u8 = 0;
const REPLIED: u8 = 1;
const LATE: u8 = 2;

/// One ring entry: its buffers, and the reply sink of the request it holds.
#[derive(Debug)]
struct Slot {
    base: *mut u8,
    ring: RingRef,
    device: RawFd,
    qid: u16,
    /// The `unique` of the request in hand (the commit id).
    unique: std::sync::atomic::AtomicU64,
    state: AtomicU8,
    index: usize,
}

/// The ring an entry belongs to (for a late reply's commit).
struct RingRef(Arc<Ring>);

impl std::fmt::Debug for RingRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ring")
    }
}

// SAFETY: `base` is this slot's own mapping; the buffers are written only by
// the one party holding the entry (module invariants).
unsafe impl Send for Slot {}
unsafe impl Sync for Slot {}

impl Slot {
    fn new(ring: Arc<Ring>, device: RawFd, qid: u16, index: usize) -> io::Result<Slot> {
        // SAFETY: a fresh private anonymous mapping.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                ENTRY_BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Slot {
            base: p as *mut u8,
            ring: RingRef(ring),
            device,
            qid,
            unique: 0.into(),
            state: AtomicU8::new(REPLIED),
            index,
        })
    }

    /// The SQE of a REGISTER or COMMIT_AND_FETCH for this entry. The
    /// iovec array it points at lives in the entry's own mapping (it must
    /// stay valid while the kernel may read it: until the command is done).
    fn sqe(&self, cmd: u32, commit_id: u64, user_data: u64) -> [u8; SQE_BYTES] {
        let iov_at = HEADER_BYTES.next_multiple_of(16);
        // SAFETY: within this slot's header page (HEADER_BYTES + 32 < 4096 - 168).
        unsafe {
            let iov = self.base.add(iov_at) as *mut libc::iovec;
            *iov = libc::iovec {
                iov_base: self.base as *mut libc::c_void,
                iov_len: HEADER_BYTES,
            };
            *iov.add(1) = libc::iovec {
                iov_base: self.base.add(PAYLOAD_OFFSET) as *mut libc::c_void,
                iov_len: PAYLOAD_BYTES_MAX,
            };
        }
        let mut s = [0u8; SQE_BYTES];
        s[0] = IORING_OP_URING_CMD;
        s[4..8].copy_from_slice(&self.device.to_ne_bytes());
        s[8..12].copy_from_slice(&cmd.to_ne_bytes());
        s[16..24].copy_from_slice(&(self.base as u64 + iov_at as u64).to_ne_bytes());
        s[24..28].copy_from_slice(&2u32.to_ne_bytes());
        s[32..40].copy_from_slice(&user_data.to_ne_bytes());
        // struct fuse_uring_cmd_req in the command area (offset 48):
        // flags u64, commit_id u64, qid u16.
        s[56..64].copy_from_slice(&commit_id.to_ne_bytes());
        s[64..66].copy_from_slice(&self.qid.to_ne_bytes());
        s
    }

    fn header(&self) -> &[u8] {
        // SAFETY: the header buffer, in our hands (module invariants).
        unsafe { std::slice::from_raw_parts(self.base, HEADER_BYTES) }
    }

    /// Hands the request the kernel just put in this entry to the
    /// filesystem, and queues the commit if the reply came already.
    fn serve<FS: Filesystem>(self: &Arc<Self>, d: &Dispatcher<FS>) -> io::Result<Dispatched> {
        let h = self.header();
        let u32_at = |o: usize| u32::from_ne_bytes(h[o..o + 4].try_into().unwrap());
        let len = u32_at(0) as usize;
        let unique = u64::from_ne_bytes(h[8..16].try_into().unwrap());
        let payload = u32_at(HEADER_PAYLOAD_SZ_OFFSET) as usize;
        // The fixed argument is what the in-header's length leaves for it.
        let op_in = len.checked_sub(IN_HEADER_BYTES + payload);
        let Some(op_in) =
            op_in.filter(|&n| n <= HEADER_OP_IN_BYTES && payload <= PAYLOAD_BYTES_MAX)
        else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("ring request of {len} bytes with a {payload}-byte payload"),
            ));
        };
        let start = PAYLOAD_OFFSET - IN_HEADER_BYTES - op_in;
        if !start.is_multiple_of(8) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("ring request with a {op_in}-byte argument (not a multiple of 8)"),
            ));
        }
        // SAFETY: all within this slot's mapping, in our hands; the copies
        // go below the payload, the header's areas are not overwritten.
        let request = unsafe {
            std::ptr::copy_nonoverlapping(self.base, self.base.add(start), IN_HEADER_BYTES);
            std::ptr::copy_nonoverlapping(
                self.base.add(HEADER_OP_IN_OFFSET),
                self.base.add(start + IN_HEADER_BYTES),
                op_in,
            );
            std::slice::from_raw_parts(self.base.add(start), len)
        };
        self.unique.store(unique, Ordering::Relaxed);
        self.state.store(DISPATCHING, Ordering::Relaxed);
        let sink: Arc<dyn ReplySink> = self.clone();
        let outcome = d.dispatch(request, sink)?;
        let replied = self
            .state
            .compare_exchange(DISPATCHING, LATE, Ordering::AcqRel, Ordering::Acquire)
            .is_err();
        // Replied before the handler returned: commit with the next wait.
        // Else the reply comes later, from another thread, which commits.
        if replied {
            self.ring.0.push(&self.commit())?;
        }
        Ok(outcome)
    }

    fn commit(&self) -> [u8; SQE_BYTES] {
        self.sqe(
            FUSE_IO_URING_CMD_COMMIT_AND_FETCH,
            self.unique.load(Ordering::Relaxed),
            self.index as u64,
        )
    }

    /// Writes a reply (out-header, payload) into the entry's buffers; a
    /// payload too large for them becomes EIO.
    fn write_reply(&self, reply: &[IoSlice<'_>]) {
        let total: usize = reply.iter().map(|s| s.len()).sum();
        // SAFETY: the buffers are in our hands until the commit; `copy`
        // (memmove) as a reply may come from anywhere, even this mapping.
        unsafe {
            if total < OUT_HEADER_BYTES || total - OUT_HEADER_BYTES > PAYLOAD_BYTES_MAX {
                let mut h = [0u8; OUT_HEADER_BYTES];
                h[0..4].copy_from_slice(&(OUT_HEADER_BYTES as u32).to_ne_bytes());
                h[4..8].copy_from_slice(&(-libc::EIO).to_ne_bytes());
                h[8..16].copy_from_slice(&self.unique.load(Ordering::Relaxed).to_ne_bytes());
                std::ptr::copy_nonoverlapping(h.as_ptr(), self.base, OUT_HEADER_BYTES);
                self.set_payload_sz(0);
                return;
            }
            let mut at = 0usize; // offset in the concatenated reply
            for s in reply {
                let mut src = s.as_ptr();
                let mut n = s.len();
                if at < OUT_HEADER_BYTES {
                    let h = n.min(OUT_HEADER_BYTES - at);
                    std::ptr::copy(src, self.base.add(at), h);
                    src = src.add(h);
                    n -= h;
                    at += h;
                }
                if n > 0 {
                    let off = PAYLOAD_OFFSET + (at - OUT_HEADER_BYTES);
                    std::ptr::copy(src, self.base.add(off), n);
                    at += n;
                }
            }
            self.set_payload_sz((total - OUT_HEADER_BYTES) as u32);
        }
    }

    fn set_payload_sz(&self, n: u32) {
        // SAFETY: the header buffer, in our hands; the in/out area (the
        // out-header) ends at 128, this field lies at 272.
        unsafe {
            std::ptr::copy_nonoverlapping(
                n.to_ne_bytes().as_ptr(),
                self.base.add(HEADER_PAYLOAD_SZ_OFFSET),
                4,
            );
        }
    }
}

impl ReplySink for Slot {
    fn send(&self, reply: &[IoSlice<'_>]) -> io::Result<()> {
        self.write_reply(reply);
        match self
            .state
            .compare_exchange(DISPATCHING, REPLIED, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => Ok(()),
            Err(LATE) => {
                self.state.store(REPLIED, Ordering::Relaxed);
                self.ring.0.push(&self.commit())?;
                self.ring.0.submit()
            }
            Err(s) => Err(io::Error::other(format!(
                "second reply to FUSE request {} (entry state {s})",
                self.unique.load(Ordering::Relaxed)
            ))),
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        // SAFETY: our own mapping; the ring (which could let the kernel
        // write here) is closed before the slots are dropped.
        unsafe { libc::munmap(self.base as *mut libc::c_void, ENTRY_BYTES) };
    }
}
