//! The daemon's life: check the mountpoint, open the store (a damaged
//! metadata database stops here, with the `casfs fsck` command that
//! repairs it), mount, sweep orphan blob files in the background, serve
//! until unmounted (by `umount`, `casfs unmount`, SIGINT or SIGTERM), then
//! flush, log how many uploads to the shared tier are still pending (they
//! are kept in the store and delivered after the next mount), and exit 0.
//! Also `casfs unmount`.
//!
//! Whoever started the daemon is told when the mount serves, what it is
//! doing and when it stops (`notify`: `$NOTIFY_SOCKET`, `--ready-fd`).

mod notify;
pub use notify::Readiness;

use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};

use fuser::{Config as FuseConfig, MountOption, Session, SessionACL};
use log::{error, info, warn};

use crate::fs::{Config, Core};
use crate::fuse::uring::{self, RingConfig, Transport};
use crate::fuse::{CasFs, Kernel};
use crate::shared::tier::{LostRace, Outbox, Tier, TierConfig};
use crate::shared::EngineConfig;
use crate::store::meta::open_store;

/// Everything `casfs mount` needs, validated.
pub struct MountArgs {
    pub store: PathBuf,
    pub mountpoint: PathBuf,
    pub config: Config,
    pub max_size_bytes: Option<u64>,
    /// `--shared URL` and the engine's settings.
    pub shared: Option<(String, EngineConfig)>,
    /// `--shared-gc-max-size`: collect the namespace (when this host holds
    /// its lease), every interval.
    pub shared_gc: Option<(crate::shared::gc::GcConfig, std::time::Duration)>,
    /// `--shared-use-report-s`.
    pub shared_use_report: std::time::Duration,
    /// How far past this host's wall time an mtime from the shared tier
    /// may move the clock (`--shared-clock-skew-ms`).
    pub clock_skew_max_ms: u64,
    /// Milliseconds between two blobs checked by the background scrub (0: off).
    pub scrub_interval_ms: u64,
    pub allow_other: bool,
    pub force: bool,
    pub threads: usize,
    /// `--transport`: FUSE over io_uring, /dev/fuse, or the first of them
    /// the kernel offers.
    pub transport: Transport,
    /// Told when the mount serves, what it does, and when it stops.
    pub readiness: Arc<Readiness>,
}

/// Refuses mountpoints that would surprise an operator, saying what to do.
pub fn check_mountpoint(path: &Path, force: bool) -> Result<PathBuf, String> {
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(format!("mountpoint {} does not exist; create it with `mkdir -p {}`", path.display(), path.display()))
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            return Err(format!(
                "mountpoint {} is a dead FUSE mount (its daemon is gone); clear it with `casfs unmount {}`",
                path.display(),
                path.display()
            ))
        }
        Err(e) => return Err(format!("cannot use mountpoint {}: {e}", path.display())),
    };
    if !meta.is_dir() {
        return Err(format!("mountpoint {} is not a directory", path.display()));
    }
    let path =
        fs::canonicalize(path).map_err(|e| format!("cannot resolve {}: {e}", path.display()))?;
    if let Some(fstype) = mounted_fs_type(&path) {
        return Err(format!(
            "{} is already a mountpoint ({fstype}); unmount it first, or choose another directory",
            path.display()
        ));
    }
    let non_empty = fs::read_dir(&path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?
        .next()
        .is_some();
    if non_empty && !force {
        return Err(format!(
            "mountpoint {} is not empty; its files would be hidden by the mount. Use an empty directory, or --force",
            path.display()
        ));
    }
    Ok(path)
}

/// The filesystem type mounted exactly at `path`, if any.
fn mounted_fs_type(path: &Path) -> Option<String> {
    let text = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = path.as_os_str().as_bytes();
    text.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        let mnt = unescape_mount_path(fields.get(4)?);
        if mnt.as_slice() != want {
            return None;
        }
        let sep = fields.iter().position(|f| *f == "-")?;
        fields.get(sep + 1).map(|s| s.to_string())
    })
}

pub(crate) fn unescape_mount_path(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        // `\ooo`: three octal digits of one byte (a value over 255 is not
        // an escape the kernel writes, and is kept as it is).
        let escaped = b
            .get(i + 1..i + 4)
            .filter(|d| b[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)))
            .and_then(|d| {
                u8::try_from(d.iter().fold(0u32, |n, c| n * 8 + u32::from(c - b'0'))).ok()
            });
        match escaped {
            Some(byte) => {
                out.push(byte);
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    out
}

/// Blocks SIGINT, SIGTERM and SIGHUP in this thread and every thread it
/// starts afterwards, so that only the signal thread receives them.
fn block_signals() -> libc::sigset_t {
    // SAFETY: plain sigset manipulation on a local value.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Most FUSE worker threads (each holds a descriptor and a request buffer).
pub const THREADS_MAX: usize = 64;

/// FUSE workers by default: one per CPU the daemon may run on, bounded.
pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(4, |n| n.get())
        .clamp(2, THREADS_MAX)
}

/// Runs the daemon in the foreground until the filesystem is unmounted.
pub fn run(args: MountArgs) -> Result<(), String> {
    let signals = block_signals();
    let read_only = args.config.read_only;
    let readiness = args.readiness.clone();
    let mountpoint = check_mountpoint(&args.mountpoint, args.force)?;
    readiness.status(&format!("opening store {}", args.store.display()));
    let store = open_store(&args.store)?;
    let core = Arc::new(
        Core::start(store, args.config)
            .map_err(|e| format!("cannot start on store {}: {e}", args.store.display()))?,
    );
    core.stats.set_mount_label(&mountpoint.to_string_lossy());

    // No `default_permissions`: the daemon checks permissions itself
    // (`fs/perm.rs`), so directory changes do not cost a GETATTR per path walk.
    let mut options = vec![
        MountOption::FSName(format!("casfs:{}", args.store.display())),
        MountOption::Subtype("casfs".into()),
        MountOption::NoAtime,
    ];
    options.push(MountOption::NoDev);
    options.push(MountOption::NoSuid);
    if read_only {
        options.push(MountOption::RO);
    }
    let mut fuse_config = FuseConfig::default();
    fuse_config.mount_options = options;
    fuse_config.acl = if args.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    fuse_config.n_threads = Some(args.threads.clamp(1, THREADS_MAX));
    // One /dev/fuse descriptor per worker: workers do not contend on one
    // file's wait queue, and the kernel hands each request to one of them.
    fuse_config.clone_fd = true;

    // The transport is chosen before the mount (`--transport uring` on a
    // kernel without the ring refuses here) and settled by INIT.
    let (ask_ring, mut dev_because) = args.transport.ask_for_ring()?;
    let queues = if ask_ring {
        uring::queue_count().map_err(|e| format!("FUSE over io_uring: {e}"))?
    } else {
        0
    };
    let ring_threads = uring::threads_per_queue(args.threads, queues);
    // Every worker of either transport may wait on the shared tier at once.
    let workers = if ask_ring {
        args.threads.max(queues * ring_threads)
    } else {
        args.threads
    };

    let mut tier = None;
    if let Some((url, engine_config)) = &args.shared {
        let engine = crate::shared::open(url, engine_config)
            .map_err(|e| format!("--shared {}: {e}", crate::shared::redact_url(url)))?;
        let weak = Arc::downgrade(&core);
        let lost: Arc<LostRace> = Arc::new(move |path: &[u8], winner| {
            if let Some(core) = weak.upgrade() {
                core.adopt_winner(path, winner);
            }
        });
        let outbox: Weak<dyn Outbox> = Arc::downgrade(&core) as Weak<dyn Outbox>;
        let tier_config = TierConfig {
            timeout: engine_config.timeout,
            // Every FUSE worker may wait on the tier at once.
            request_callers: workers,
            use_report_interval: args.shared_use_report,
        };
        let t = Tier::start(engine, tier_config, lost, outbox);
        if let Some((gc, interval)) = &args.shared_gc {
            if read_only {
                warn!("--shared-gc-max-size is ignored on a read-only mount");
            } else {
                t.start_collector(gc.clone(), *interval);
            }
        }
        core.attach_tier(t.clone(), args.clock_skew_max_ms.saturating_mul(1_000_000));
        tier = Some(t);
    } else {
        let n = core.uploads_waiting();
        if n > 0 {
            warn!(
                "store {} holds {n} publications not yet delivered to a shared tier; they wait for a mount with --shared",
                args.store.display()
            );
        }
    }
    let agreed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let fs = CasFs::new(core.clone());
    let fs = if ask_ring {
        fs.ask_for_ring(agreed.clone())
    } else {
        fs
    };
    let session = Session::new(fs, &mountpoint, &fuse_config)
        .map_err(|e| format!("cannot mount {}: {e}", mountpoint.display()))?;
    let ring = ask_ring && agreed.load(std::sync::atomic::Ordering::Relaxed);
    if ask_ring && !ring {
        let why = "the kernel did not agree to FUSE over io_uring at INIT";
        if args.transport == Transport::Uring {
            drop(session);
            return Err(format!("--transport uring: {why}"));
        }
        dev_because = Some(why.into());
    }
    if ring {
        info!(
            "FUSE transport: io_uring, {queues} queues (one per CPU), {ring_threads} threads each"
        );
        core.stats.set_transport("uring");
    } else {
        match &dev_because {
            Some(why) => info!(
                "FUSE transport: /dev/fuse, {} threads ({why})",
                args.threads
            ),
            None => info!("FUSE transport: /dev/fuse, {} threads", args.threads),
        }
        core.stats.set_transport("dev");
    }
    core.set_kernel_cache(Box::new(
        Kernel::start(session.notifier()).map_err(|e| e.to_string())?,
    ));
    let mp = mountpoint.clone();
    let r = readiness.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut sig: libc::c_int = 0;
            // SAFETY: waits on the set blocked above.
            unsafe { libc::sigwait(&signals, &mut sig) };
            info!("signal {sig}: unmounting {}", mp.display());
            r.stopping(&format!("signal {sig}: unmounting {}", mp.display()));
            if let Err(e) = unmount(&mp, false) {
                warn!("{e}; detaching it lazily");
                let _ = unmount(&mp, true);
            }
        })
        .map_err(|e| e.to_string())?;

    if args.scrub_interval_ms > 0 && !read_only {
        start_scrubber(core.clone(), args.scrub_interval_ms)?;
    }
    if !read_only {
        start_touch_writer(core.clone())?;
        start_orphan_sweep(core.clone())?;
    }
    if let Some(max) = args.max_size_bytes {
        if read_only {
            warn!("--max-size is ignored on a read-only mount");
        } else {
            start_evictor(core.clone(), max)?;
        }
    }
    // Session::new returned: the kernel mounted the filesystem and its INIT
    // was answered, so requests are queued for the workers `run` starts.
    // Say so only once the mount table shows it too.
    if mounted_fs_type(&mountpoint).is_none() {
        return Err(format!(
            "mounted {} but /proc/self/mountinfo does not show it; is the daemon in another mount namespace than its mountpoint?",
            mountpoint.display()
        ));
    }
    info!(
        "mounted store={} at {}",
        args.store.display(),
        mountpoint.display()
    );
    let status = Status {
        mountpoint: mountpoint.clone(),
        store: args.store.clone(),
        tier: tier.clone(),
    };
    readiness.ready(&status.serving());
    let serving = Arc::new(std::sync::atomic::AtomicBool::new(true));
    start_housekeeping(
        core.clone(),
        readiness.clone(),
        status.clone(),
        serving.clone(),
    )?;
    let result = if ring {
        let config = RingConfig {
            threads_per_queue: ring_threads,
            pin: true,
            mountpoint: mountpoint.clone(),
        };
        uring::run(session.into_dispatcher(), &config)
    } else {
        session.run()
    };
    serving.store(false, std::sync::atomic::Ordering::SeqCst);
    readiness.stopping(&format!("unmounting {}", mountpoint.display()));
    core.shutdown();
    if let Some(t) = &tier {
        match t.pending() {
            0 => info!("unmount: every publication was delivered to the shared tier {}", t.describe()),
            n => warn!(
                "unmount: {n} uploads to the shared tier {} are not delivered yet; they are kept in store {} and delivered after the next mount with --shared",
                t.describe(),
                args.store.display()
            ),
        }
    }
    readiness.status(&status.unmounted());
    match result {
        Ok(()) => {
            info!("unmounted {}", mountpoint.display());
            Ok(())
        }
        Err(e) => {
            error!("session ended with an error: {e}");
            Err(format!("serving {} failed: {e}", mountpoint.display()))
        }
    }
}

/// What the service status line says.
#[derive(Clone)]
struct Status {
    mountpoint: PathBuf,
    store: PathBuf,
    tier: Option<Arc<Tier>>,
}

impl Status {
    fn uploads(&self) -> String {
        match &self.tier {
            None => "no shared tier".into(),
            Some(t) => format!("{} uploads pending to {}", t.pending(), t.describe()),
        }
    }

    fn serving(&self) -> String {
        format!(
            "serving {} (store {}); {}",
            self.mountpoint.display(),
            self.store.display(),
            self.uploads()
        )
    }

    fn unmounted(&self) -> String {
        match &self.tier {
            Some(t) if t.pending() > 0 => format!(
                "unmounted {}; {} uploads kept in store {} for the next mount with --shared",
                self.mountpoint.display(),
                t.pending(),
                self.store.display()
            ),
            _ => format!("unmounted {}", self.mountpoint.display()),
        }
    }
}

/// How often the housekeeping thread runs.
const HOUSEKEEPING_PERIOD_MS: u64 = 2000;

/// Keeps the service manager's status line current (pending uploads, when
/// they changed) and reports operating errors the log left out.
fn start_housekeeping(
    core: Arc<Core>,
    readiness: Arc<Readiness>,
    status: Status,
    serving: Arc<std::sync::atomic::AtomicBool>,
) -> Result<(), String> {
    std::thread::Builder::new()
        .name("housekeeping".into())
        .spawn(move || {
            let mut last = status.serving();
            loop {
                std::thread::sleep(std::time::Duration::from_millis(HOUSEKEEPING_PERIOD_MS));
                if !serving.load(std::sync::atomic::Ordering::SeqCst) {
                    return;
                }
                core.flush_error_log();
                if readiness.has_socket() {
                    let now = status.serving();
                    if now != last {
                        readiness.status(&now);
                        last = now;
                    }
                }
            }
        })
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// How often the evictor compares the store with `--max-size` (besides
/// publications, which check before they are answered): for bytes that
/// arrive otherwise (copies fetched from the shared tier), and for a store
/// mounted over its limit.
const EVICT_PERIOD_MS: u64 = 500;

/// Keeps the store under `max_bytes` in the background.
fn start_evictor(core: Arc<Core>, max_bytes: u64) -> Result<(), String> {
    info!(
        "size limit: {} (evicting least recently used entries)",
        crate::size::describe_bytes(max_bytes)
    );
    core.set_size_limit(max_bytes);
    std::thread::Builder::new()
        .name("evictor".into())
        .spawn(move || loop {
            core.keep_under_limit();
            std::thread::sleep(std::time::Duration::from_millis(EVICT_PERIOD_MS));
        })
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Writes pending touches (`store/touches.rs`) every
/// `TOUCH_WRITE_PERIOD_MS`; a failure (a full disk) leaves them pending, is
/// logged once per episode, and is retried on the next period.
fn start_touch_writer(core: Arc<Core>) -> Result<(), String> {
    std::thread::Builder::new()
        .name("touches".into())
        .spawn(move || {
            let mut failing = false;
            loop {
                std::thread::sleep(std::time::Duration::from_millis(
                    crate::store::touches::TOUCH_WRITE_PERIOD_MS,
                ));
                match core.write_touches() {
                    Ok(_) if failing => {
                        failing = false;
                        info!("touches written again");
                    }
                    Ok(_) => {}
                    Err(e) if !failing => {
                        failing = true;
                        warn!("touches not written: {e}; kept in memory and retried every period");
                    }
                    Err(_) => {}
                }
            }
        })
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Checks one random blob every `interval_ms` in the background.
fn start_scrubber(core: Arc<Core>, interval_ms: u64) -> Result<(), String> {
    std::thread::Builder::new()
        .name("scrub".into())
        .spawn(move || loop {
            std::thread::sleep(std::time::Duration::from_millis(interval_ms));
            if let Err(e) = core.scrub_one() {
                warn!("scrub: {e}");
            }
        })
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// `casfs unmount`: unmounts `path`, then says so when other mount
/// namespaces (a container, `unshare -m`, `ip netns exec`) still hold a
/// copy of the mount: the kernel keeps the filesystem, and so its daemon,
/// alive until the last copy goes, which surprises an operator who just
/// unmounted it.
pub fn unmount_command(path: &Path, lazy: bool) -> Result<(), String> {
    let dev = fs::canonicalize(path)
        .ok()
        .and_then(|p| mount_device(&fs::read_to_string("/proc/self/mountinfo").ok()?, &p));
    unmount(path, lazy)?;
    if let Some(dev) = dev {
        let holders = holders_in_other_namespaces(&dev);
        if !holders.is_empty() {
            let list: Vec<String> = holders
                .iter()
                .map(|(pid, comm)| format!("{pid} ({comm})"))
                .collect();
            eprintln!(
                "casfs unmount: {} is unmounted here, but {} other mount namespace(s) still hold the mount (e.g. processes {}); its daemon keeps serving them until they unmount it or exit",
                path.display(),
                holders.len(),
                list.join(", ")
            );
        }
    }
    Ok(())
}

/// The device (`major:minor`, field 3 of mountinfo) of the FUSE mount
/// exactly at `path` in `mountinfo`.
fn mount_device(mountinfo: &str, path: &Path) -> Option<String> {
    let want = path.as_os_str().as_bytes();
    mountinfo.lines().find_map(|line| {
        let f: Vec<&str> = line.split(' ').collect();
        let sep = f.iter().position(|x| *x == "-")?;
        let fstype = f.get(sep + 1)?;
        (unescape_mount_path(f.get(4)?) == want && fstype.starts_with("fuse"))
            .then(|| f.get(2).map(|d| d.to_string()))?
    })
}

/// One process per other mount namespace whose mount table still has a
/// FUSE mount of device `dev`: (pid, command name).
fn holders_in_other_namespaces(dev: &str) -> Vec<(u32, String)> {
    let ours = fs::read_link("/proc/self/ns/mnt").ok();
    let mut seen = Vec::new();
    let mut holders = Vec::new();
    let Ok(procs) = fs::read_dir("/proc") else {
        return holders;
    };
    for e in procs.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(ns) = fs::read_link(format!("/proc/{pid}/ns/mnt")) else {
            continue;
        };
        if Some(&ns) == ours.as_ref() || seen.contains(&ns) {
            continue;
        }
        let Ok(text) = fs::read_to_string(format!("/proc/{pid}/mountinfo")) else {
            continue;
        };
        let holds = text.lines().any(|line| {
            let f: Vec<&str> = line.split(' ').collect();
            let fuse = f
                .iter()
                .position(|x| *x == "-")
                .and_then(|s| f.get(s + 1))
                .is_some_and(|t| t.starts_with("fuse"));
            fuse && f.get(2) == Some(&dev)
        });
        seen.push(ns);
        if holds {
            let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            holders.push((pid, comm.trim().to_string()));
        }
    }
    holders
}

/// Removes, once, the blob files a crash left with no record (see
/// `Core::sweep_orphan_blobs` for why a live publication never loses its
/// file to it), in the background while the mount serves.
fn start_orphan_sweep(core: Arc<Core>) -> Result<(), String> {
    std::thread::Builder::new()
        .name("orphan-sweep".into())
        .spawn(move || {
            let started = std::time::Instant::now();
            match core.sweep_orphan_blobs() {
                Ok((0, _)) => {}
                Ok((files, bytes)) => info!(
                    "orphan sweep: removed {files} blob files ({bytes} bytes) that no record named \
                     (left by a crash between a publication's link and its commit), in {:.1} s",
                    started.elapsed().as_secs_f64()
                ),
                Err(e) => warn!("orphan sweep: {e}; the next mount sweeps again"),
            }
        })
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Unmounts `path` (also a dead mount whose daemon was killed).
pub fn unmount(path: &Path, lazy: bool) -> Result<(), String> {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
    let flags = if lazy { libc::MNT_DETACH } else { 0 };
    // SAFETY: valid C string.
    if unsafe { libc::umount2(c.as_ptr(), flags) } == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EPERM) => {
            // Not root: the setuid helper unmounts FUSE mounts we own.
            let mut cmd = std::process::Command::new("fusermount3");
            cmd.arg("-u");
            if lazy {
                cmd.arg("-z");
            }
            let status = cmd.arg(path).status().map_err(|e| format!("cannot run fusermount3: {e}"))?;
            if status.success() {
                Ok(())
            } else {
                Err(format!("fusermount3 -u {} failed", path.display()))
            }
        }
        Some(libc::EINVAL) => Err(format!("{} is not mounted", path.display())),
        Some(libc::ENOENT) => Err(format!("{} does not exist", path.display())),
        Some(libc::EBUSY) => Err(format!(
            "{} is busy: processes still use it (see `fuser -vm {}`); stop them, or use `casfs unmount --lazy`",
            path.display(),
            path.display()
        )),
        _ => Err(format!("cannot unmount {}: {err}", path.display())),
    }
}
