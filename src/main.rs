//! `casfs`: the command line. Flags are parsed raw by clap, validated into
//! ready-to-use values here, and errors become exit codes here and nowhere
//! else (0 ok, 1 failed, 2 usage).

use casfs::fuse::uring::Transport;
use casfs::store::{fsck, meta};
use casfs::{classes, daemon as mount, fs as core, shared, size};

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "casfs",
    version,
    about = "A content-addressed FUSE filesystem for shared compiler caches"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start; the size of the `mount` variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Mount a cache and serve it in the foreground until it is unmounted.
    Mount(MountCmd),
    /// Unmount a casfs mount (also one whose daemon died).
    Unmount {
        /// Detach now even if busy; the mount goes when the last user leaves
        #[arg(long)]
        lazy: bool,
        mountpoint: PathBuf,
    },
    /// Print a mount's statistics (the text of MOUNTPOINT/.casfs/stats).
    Stats { mountpoint: PathBuf },
    /// Wait until every publication made so far through the mount is in the shared tier.
    Sync {
        /// Give up (exit 1) after this many seconds.
        #[arg(long, default_value_t = SYNC_TIMEOUT_S_DEFAULT)]
        timeout_s: u64,
        mountpoint: PathBuf,
    },
    /// Benchmark tool: fill a store with N small results (not durable; for the scale run).
    #[command(hide = true)]
    BenchPopulate {
        #[arg(long)]
        store: PathBuf,
        #[arg(long)]
        entries: u64,
    },
    /// The shared tier itself (not a mount).
    #[command(subcommand)]
    Shared(SharedCmd),
    /// Check an unmounted store; exit 0 if clean, 1 if problems were found (or a damaged metadata database), 2 if it could not be checked.
    Fsck {
        #[arg(long)]
        store: PathBuf,
        /// Drop what is corrupt or dangling, so the store is clean afterwards; repair a damaged metadata database (the plan fsck prints says how, and what it loses)
        #[arg(long)]
        repair: bool,
    },
}

#[derive(Subcommand)]
enum SharedCmd {
    /// One collection pass over a namespace of the shared tier: least recently used entries until it is under SIZE, then blobs no record names, then empty listings. Safe to run from cron on every host: one collector per namespace holds a lease, the others say so and exit 0.
    Gc {
        /// The engine: file:///ABSOLUTE/PATH or redis://HOST:PORT[/DB]
        #[arg(long, value_name = "URL")]
        shared: String,
        #[arg(long, value_name = "NAME", default_value = "default")]
        namespace: String,
        /// The namespace's budget (sizes as for mount --max-size: 20G, 500Mi)
        #[arg(long, value_name = "SIZE")]
        max_size: String,
        /// A root-only file holding the engine's password (Redis)
        #[arg(long)]
        shared_password_file: Option<PathBuf>,
        /// Bound on every engine call, in milliseconds
        #[arg(long, default_value_t = 5000)]
        shared_timeout_ms: u64,
        /// Blobs put less than this many seconds ago are never collected
        #[arg(long, default_value_t = shared::gc::BLOB_GRACE_S_DEFAULT)]
        blob_grace_s: u64,
        /// The lease's length: a collector killed mid-pass is replaced within it
        #[arg(long, default_value_t = shared::gc::LEASE_TTL_S_DEFAULT)]
        lease_s: u64,
    },
}

/// `--shared-gc-interval-s` when not given.
const GC_INTERVAL_S_DEFAULT: u64 = 60;

/// `casfs mount`'s flags, raw (validated by `run_mount`).
#[derive(Args)]
struct MountCmd {
    /// Store directory [default: /var/cache/casfs as root, else $XDG_CACHE_HOME/casfs or ~/.cache/casfs]
    #[arg(long)]
    store: Option<PathBuf>,
    /// Class rule PATTERN=CLASS (result, mutable, local, ccache-entry), before the built-in rules; repeatable
    #[arg(long = "class", value_name = "PATTERN=CLASS")]
    classes: Vec<String>,
    /// Percentage of blobs verified against their hash at their first open in this mount (0-100); the scrub re-checks them later
    #[arg(long, default_value_t = 100)]
    verify_percent: u32,
    /// Keep the store under SIZE by evicting least recently used entries; sizes as ccache writes them: 20G = 20 GB, 20Gi = 20 GiB, 500M, 64Ki; a bare number means G; 0 means no limit
    #[arg(long, value_name = "SIZE")]
    max_size: Option<String>,
    /// Share entries with other hosts: file:///ABSOLUTE/PATH or redis://[:PASSWORD@]HOST:PORT[/DB]
    #[arg(long, value_name = "URL")]
    shared: Option<String>,
    /// Partition of the shared engine this cache uses (e.g. one per OS release)
    #[arg(long, value_name = "NAME")]
    namespace: Option<String>,
    /// A root-only file (mode 600 or stricter) holding the shared engine's password (Redis), so it never shows in argv or logs
    #[arg(long)]
    shared_password_file: Option<PathBuf>,
    /// Bound on every shared-tier call, in milliseconds
    #[arg(long, default_value_t = 500)]
    shared_timeout_ms: u64,
    /// How far ahead of this host's clock an mtime from the shared tier may move it, in milliseconds (build hosts are assumed to run NTP) [default: 1000]
    #[arg(long, value_name = "MS")]
    shared_clock_skew_ms: Option<u64>,
    /// umask for files the shared-directory engine creates (octal)
    #[arg(long, default_value = "002")]
    shared_umask: String,
    /// Collect the namespace of the shared tier down to SIZE (sizes as for --max-size): every host may say so; one at a time collects (a lease per namespace)
    #[arg(long, value_name = "SIZE")]
    shared_gc_max_size: Option<String>,
    /// Seconds between two collection attempts
    #[arg(long, default_value_t = GC_INTERVAL_S_DEFAULT, hide = true)]
    shared_gc_interval_s: u64,
    /// Blobs put less than this many seconds ago are never collected
    #[arg(long, default_value_t = shared::gc::BLOB_GRACE_S_DEFAULT, hide = true)]
    shared_gc_grace_s: u64,
    /// The collection lease's length in seconds (longer than the interval: the collector keeps it between passes)
    #[arg(long, default_value_t = 3 * GC_INTERVAL_S_DEFAULT, hide = true)]
    shared_gc_lease_s: u64,
    /// Seconds between two reports of one entry's use to the shared tier
    #[arg(long, default_value_t = shared::tier::USE_REPORT_S_DEFAULT, hide = true)]
    shared_use_report_s: u64,
    /// Milliseconds between two blobs checked by the background scrub (0 turns it off)
    #[arg(long, default_value_t = 1000)]
    scrub_interval_ms: u64,
    /// Serve hits only: every change gets EROFS
    #[arg(long)]
    read_only: bool,
    /// Mount options, comma separated: allow_other, ro, rw, max_size=SIZE,
    /// uid=N, gid=N, mode=OCTAL (of the cache root), default_permissions
    #[arg(short = 'o', value_name = "OPTS")]
    options: Option<String>,
    /// Mount over a non-empty directory
    #[arg(long)]
    force: bool,
    /// Threads serving kernel requests, each with its own /dev/fuse descriptor [default: the host's parallelism, at most 64]
    #[arg(long)]
    threads: Option<usize>,
    /// How requests reach the daemon: uring (FUSE over io_uring, per-CPU queues; fails if the kernel does not offer it), dev (/dev/fuse), auto (uring where the kernel offers it, else dev) [default: auto]
    #[arg(long, value_parser = Transport::parse)]
    transport: Option<Transport>,
    /// Write one line to descriptor N once the mount serves ("ready") or the daemon fails to start (its error message), then close it
    #[arg(long, value_name = "N")]
    ready_fd: Option<i32>,
    mountpoint: PathBuf,
}

/// Written into a store by `bench-populate` once it is fully populated
/// (holds the entry count).
const BENCH_POPULATED: &str = "bench-populated";

/// `--shared-clock-skew-ms` when not given.
const CLOCK_SKEW_MS_DEFAULT: u64 = 1000;

fn default_store() -> PathBuf {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/var/cache/casfs");
    }
    match std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        Some(x) => PathBuf::from(x).join("casfs"),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/casfs"),
    }
}

/// `-o` options, validated.
#[derive(Default, Debug)]
struct MountOptions {
    allow_other: bool,
    read_only: bool,
    max_size_bytes: Option<u64>,
    uid: Option<u32>,
    gid: Option<u32>,
    mode: Option<u32>,
    shared: Option<String>,
    namespace: Option<String>,
    shared_clock_skew_ms: Option<u64>,
    shared_password_file: Option<PathBuf>,
    transport: Option<Transport>,
    shared_gc_max_size: Option<String>,
}

fn parse_mount_options(text: &str) -> Result<MountOptions, String> {
    let mut o = MountOptions::default();
    for opt in text.split(',').filter(|o| !o.is_empty()) {
        let (key, value) = match opt.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (opt, None),
        };
        let number = |v: Option<&str>, radix: u32| -> Result<u32, String> {
            v.and_then(|v| u32::from_str_radix(v, radix).ok())
                .ok_or_else(|| format!("mount option {opt:?} needs a number"))
        };
        match key {
            "allow_other" => o.allow_other = true,
            "ro" => o.read_only = true,
            "rw" | "default_permissions" => {}
            "max_size" => {
                o.max_size_bytes = size::parse_size_limit(value.unwrap_or(""))
                    .map_err(|e| format!("mount option max_size={e}"))?
            }
            "uid" => o.uid = Some(number(value, 10)?),
            "gid" => o.gid = Some(number(value, 10)?),
            "mode" => o.mode = Some(number(value, 8)? & 0o7777),
            // mount(8) takes `shared` for mount propagation and drops its
            // value, so fstab lines spell it `shared_url=`.
            "shared" | "shared_url" => o.shared = value.map(str::to_owned),
            "namespace" => o.namespace = value.map(str::to_owned),
            "shared_password_file" => o.shared_password_file = value.map(PathBuf::from),
            "shared_gc_max_size" => o.shared_gc_max_size = value.map(str::to_owned),
            "shared_clock_skew_ms" => {
                o.shared_clock_skew_ms = Some(
                    value
                        .and_then(|v| v.parse().ok())
                        .ok_or_else(|| format!("mount option {opt:?} needs a number of milliseconds"))?,
                )
            }
            "transport" => {
                o.transport = Some(
                    Transport::parse(value.unwrap_or(""))
                        .map_err(|e| format!("mount option {opt:?}: {e}"))?,
                )
            }
            _ => {
                return Err(format!(
                    "unknown mount option {opt:?} (known: allow_other, ro, rw, max_size=SIZE, uid=N, gid=N, mode=OCTAL, shared=URL (or shared_url=URL), namespace=NAME, shared_password_file=FILE, shared_clock_skew_ms=MS, shared_gc_max_size=SIZE, transport=auto|uring|dev, default_permissions)"
                ))
            }
        }
    }
    Ok(o)
}

/// Runs `casfs fsck` and prints its findings; returns the exit code.
fn run_fsck(store: &Path, repair: bool) -> u8 {
    match fsck::run(store, repair) {
        Err(e) => {
            eprintln!("casfs fsck: {e}");
            2
        }
        Ok(report) => {
            print_fsck_report(store, repair, &report);
            if report.problem_count() == 0 && report.database.is_empty() {
                0
            } else {
                1
            }
        }
    }
}

fn print_fsck_report(store: &Path, repair: bool, report: &fsck::Report) {
    let dir = store.display();
    for (damage, repaired) in &report.database {
        for f in &damage.findings {
            println!("problem: metadata database: {f}");
        }
        if let Some(m) = &damage.rocksdb {
            println!("  (RocksDB says: {m})");
        }
        match repaired {
            None => {
                println!(
                    "plan: `casfs fsck --store {dir} --repair` will, in this order, stopping at the first step that gives a database that opens:"
                );
                for (i, step) in damage.plan().iter().enumerate() {
                    println!("  {}. {step}", i + 1);
                }
            }
            Some(r) => {
                for step in &r.steps {
                    println!("repaired: {step}");
                }
                println!("lost: {}", r.outcome.loses());
            }
        }
    }
    for p in &report.problems {
        println!("problem: {p}");
    }
    if report.problems_unlisted > 0 {
        println!(
            "problem: ... and {} more not listed",
            report.problems_unlisted
        );
    }
    for l in &report.leftovers {
        println!("crash leftover: {l}");
    }
    if report.leftovers_unlisted > 0 {
        println!(
            "crash leftover: ... and {} more not listed",
            report.leftovers_unlisted
        );
    }
    let saved = report
        .database
        .iter()
        .rev()
        .find_map(|(_, r)| r.as_ref().map(|r| r.saved.clone()));
    if let Some(saved) = &saved {
        let (files, bytes) = report.moved_aside;
        if files > 0 {
            println!(
                "kept: {files} files ({bytes} bytes) that no record names any more were moved into {} (blob files are named by their hash; nothing was deleted)",
                saved.display()
            );
        }
        println!(
            "kept: the damaged metadata as found is in {}; remove that directory once the store serves again",
            saved.display()
        );
    }
    if report.database_unrepaired() {
        println!(
            "store {dir}: the metadata database is damaged; nothing was changed (run with --repair to carry out the plan above)"
        );
        return;
    }
    let action = if repair {
        "repaired"
    } else {
        "found (run with --repair to drop them)"
    };
    match (report.problem_count(), report.leftover_count()) {
        (0, _) if !report.database.is_empty() => {
            println!("store {dir}: metadata database repaired; the store mounts again")
        }
        (0, 0) => println!("store {dir} is clean"),
        (0, n) => println!(
            "store {dir} is clean; {n} crash leftovers {}",
            if repair {
                "removed"
            } else {
                "will be cleaned at the next mount"
            }
        ),
        (n, _) if !report.database.is_empty() => println!(
            "store {dir}: metadata database repaired, and {n} problems it left behind {action}; the store mounts again"
        ),
        (n, _) => println!("store {dir}: {n} problems {action}"),
    }
}

/// Reads one of a mount's `.casfs/` files.
fn read_casfs_file(mountpoint: &Path, name: &str) -> Result<String, String> {
    let path = mountpoint.join(".casfs").join(name);
    std::fs::read_to_string(&path).map_err(|e| {
        format!(
            "cannot read {}: {e} (is {} a casfs mount?)",
            path.display(),
            mountpoint.display()
        )
    })
}

/// `casfs mount`: validates the flags into ready-to-use values and runs
/// the daemon until the filesystem is unmounted.
/// Longest password file read.
const PASSWORD_FILE_BYTES_MAX: u64 = 4096;

/// The password in `path`: a regular file no one but its owner may read
/// or write (mode 600 or stricter), one line (a final newline is not part
/// of it).
fn read_password_file(path: &Path) -> Result<Vec<u8>, String> {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    let shown = path.display();
    let file =
        std::fs::File::open(path).map_err(|e| format!("--shared-password-file {shown}: {e}"))?;
    let meta = file
        .metadata()
        .map_err(|e| format!("--shared-password-file {shown}: {e}"))?;
    if !meta.is_file() {
        return Err(format!(
            "--shared-password-file {shown}: not a regular file"
        ));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(format!(
            "--shared-password-file {shown}: other users may read or write it (mode {:o}); `chmod 600 {shown}`",
            meta.mode() & 0o777
        ));
    }
    let mut bytes = Vec::new();
    file.take(PASSWORD_FILE_BYTES_MAX + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("--shared-password-file {shown}: {e}"))?;
    if bytes.len() as u64 > PASSWORD_FILE_BYTES_MAX {
        return Err(format!(
            "--shared-password-file {shown}: over {PASSWORD_FILE_BYTES_MAX} bytes: not a password file"
        ));
    }
    for end in [&b"\r\n"[..], b"\n"] {
        if bytes.ends_with(end) {
            bytes.truncate(bytes.len() - end.len());
            break;
        }
    }
    if bytes.is_empty() || bytes.contains(&b'\n') {
        return Err(format!(
            "--shared-password-file {shown}: put the password alone on one line"
        ));
    }
    Ok(bytes)
}

/// How long `casfs sync` waits by default.
const SYNC_TIMEOUT_S_DEFAULT: u64 = 300;
/// How often `casfs sync` asks the daemon again.
const SYNC_POLL_MS: u64 = 100;

/// `casfs sync`: the short-poll protocol of `.casfs/sync` (see
/// `fs/virtual_files.rs`). Every read is answered at once; this process
/// sleeps in between, so Ctrl-C or `timeout` ends it at once.
fn sync(mountpoint: &Path, timeout: std::time::Duration) -> Result<(), String> {
    let started = std::time::Instant::now();
    let mut text = read_casfs_file(mountpoint, "sync")?;
    loop {
        if text.starts_with("ok") {
            print!("{text}");
            return Ok(());
        }
        let Some(pending) = text.strip_prefix("pending: ") else {
            return Err(format!(
                "sync of {}: {}",
                mountpoint.display(),
                text.trim_end().trim_start_matches("FAILED: ")
            ));
        };
        let polled = pending
            .trim_end()
            .split_once("; poll ")
            .filter(|(_, f)| f.starts_with("sync-") && f[5..].bytes().all(|c| c.is_ascii_digit()));
        let Some((waiting, file)) = polled else {
            return Err(format!(
                "sync of {}: the daemon answered {text:?}, which this casfs does not read (a daemon of another version?)",
                mountpoint.display()
            ));
        };
        if started.elapsed() >= timeout {
            return Err(format!(
                "sync of {}: {waiting} still pending after {} s (the uploads are kept and retried; run casfs sync again to wait longer)",
                mountpoint.display(),
                timeout.as_secs()
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(SYNC_POLL_MS));
        text = read_casfs_file(mountpoint, file)?;
    }
}

fn run_mount(m: MountCmd, readiness: Arc<mount::Readiness>) -> Result<(), String> {
    let MountCmd {
        store,
        classes,
        verify_percent,
        max_size,
        shared,
        namespace,
        shared_password_file,
        shared_timeout_ms,
        shared_clock_skew_ms,
        shared_umask,
        shared_gc_max_size,
        shared_gc_interval_s,
        shared_gc_grace_s,
        shared_gc_lease_s,
        shared_use_report_s,
        scrub_interval_ms,
        read_only,
        options,
        force,
        threads,
        transport,
        ready_fd: _,
        mountpoint,
    } = m;
    if verify_percent > 100 {
        return Err(format!(
            "--verify-percent {verify_percent} is not a percentage (0-100)"
        ));
    }
    let rules = classes::Rules::new(&classes)?;
    let mut o = parse_mount_options(options.as_deref().unwrap_or(""))?;
    o.read_only |= read_only;
    if let Some(text) = max_size {
        o.max_size_bytes = size::parse_size_limit(&text).map_err(|e| format!("--max-size {e}"))?;
    }
    o.shared = shared.or(o.shared);
    o.namespace = namespace.or(o.namespace);
    let umask = u32::from_str_radix(&shared_umask, 8)
        .ok()
        .filter(|u| *u <= 0o777)
        .ok_or_else(|| format!("--shared-umask {shared_umask:?} is not an octal umask"))?;
    if o.namespace.is_some() && o.shared.is_none() {
        return Err("--namespace needs --shared".into());
    }
    if shared_timeout_ms == 0 {
        return Err("--shared-timeout-ms must be at least 1".into());
    }
    let password_file = shared_password_file.or(o.shared_password_file.clone());
    if password_file.is_some() && o.shared.is_none() {
        return Err("--shared-password-file needs --shared".into());
    }
    let password = password_file
        .as_deref()
        .map(read_password_file)
        .transpose()?;
    if o.shared.as_deref().is_some_and(shared::url_has_password) {
        log::warn!(
            "the --shared URL carries a password, which any user can read in `ps` and /proc/PID/cmdline: put it in a root-only file and give --shared-password-file (or -o shared_password_file=FILE) instead"
        );
    }
    let shared = o.shared.clone().map(|url| {
        let config = shared::EngineConfig {
            namespace: o.namespace.clone().unwrap_or_else(|| "default".into()),
            timeout: std::time::Duration::from_millis(shared_timeout_ms),
            umask,
            password,
        };
        (url, config)
    });
    let gc_text = shared_gc_max_size.or(o.shared_gc_max_size.clone());
    let shared_gc = match (&gc_text, &shared) {
        (None, _) => None,
        (Some(_), None) => return Err("--shared-gc-max-size needs --shared".into()),
        (Some(text), Some((_, config))) => {
            let max = size::parse_size_limit(text)
                .map_err(|e| format!("--shared-gc-max-size {e}"))?
                .ok_or(
                    "--shared-gc-max-size 0: give a budget (collection with no limit does nothing)",
                )?;
            let mut gc = shared::gc::GcConfig::new(&config.namespace, max);
            gc.blob_grace_s = shared_gc_grace_s;
            gc.lease_ttl_s = shared_gc_lease_s.max(1);
            gc.keep_lease = true;
            Some((
                gc,
                std::time::Duration::from_secs(shared_gc_interval_s.max(1)),
            ))
        }
    };
    let store = store.unwrap_or_else(default_store);
    mount::run(mount::MountArgs {
        shared_gc,
        shared_use_report: std::time::Duration::from_secs(shared_use_report_s),
        store,
        mountpoint,
        config: core::Config {
            rules,
            verify_percent,
            read_only: o.read_only,
            durable: true,
            root_uid: o.uid,
            root_gid: o.gid,
            root_mode: o.mode,
        },
        max_size_bytes: o.max_size_bytes,
        shared,
        clock_skew_max_ms: shared_clock_skew_ms
            .or(o.shared_clock_skew_ms)
            .unwrap_or(CLOCK_SKEW_MS_DEFAULT),
        scrub_interval_ms,
        allow_other: o.allow_other,
        force,
        threads: threads.unwrap_or_else(mount::default_threads),
        transport: transport.or(o.transport).unwrap_or(Transport::Auto),
        readiness,
    })
}

fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Command::Mount(m) => {
            // First, so that every refusal below reaches the starter too.
            let notify_socket = std::env::var("NOTIFY_SOCKET").ok();
            let readiness = Arc::new(mount::Readiness::new(notify_socket.as_deref(), m.ready_fd)?);
            let result = run_mount(m, readiness.clone());
            if let Err(e) = &result {
                readiness.failed(&format!("casfs: {e}"));
            }
            result
        }
        Command::Unmount { lazy, mountpoint } => mount::unmount_command(&mountpoint, lazy),
        Command::BenchPopulate { store, entries } => {
            let config = core::Config {
                rules: classes::Rules::new(&[])?,
                verify_percent: 0,
                read_only: false,
                durable: false,
                root_uid: None,
                root_gid: None,
                root_mode: None,
            };
            let core =
                core::Core::start(meta::open_store(&store)?, config).map_err(|e| e.to_string())?;
            let started = std::time::Instant::now();
            // The marker says the population finished (a benchmark must not
            // measure an interrupted one as a full store).
            let marker = store.join(BENCH_POPULATED);
            let _ = std::fs::remove_file(&marker);
            core.populate(entries).map_err(|e| e.to_string())?;
            core.shutdown();
            std::fs::write(&marker, format!("{entries}\n"))
                .map_err(|e| format!("cannot write {}: {e}", marker.display()))?;
            println!(
                "populated {entries} entries in {:.1} s",
                started.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Command::Sync {
            timeout_s,
            mountpoint,
        } => sync(&mountpoint, std::time::Duration::from_secs(timeout_s)),
        Command::Fsck { store, repair } => std::process::exit(run_fsck(&store, repair).into()),
        Command::Shared(SharedCmd::Gc {
            shared: url,
            namespace,
            max_size,
            shared_password_file,
            shared_timeout_ms,
            blob_grace_s,
            lease_s,
        }) => run_gc(
            &url,
            &namespace,
            &max_size,
            shared_password_file.as_deref(),
            shared_timeout_ms,
            blob_grace_s,
            lease_s,
        ),
        Command::Stats { mountpoint } => {
            print!("{}", read_casfs_file(&mountpoint, "stats")?);
            Ok(())
        }
    }
}

/// `casfs shared gc`: one pass, its report on stdout.
fn run_gc(
    url: &str,
    namespace: &str,
    max_size: &str,
    password_file: Option<&Path>,
    timeout_ms: u64,
    blob_grace_s: u64,
    lease_s: u64,
) -> Result<(), String> {
    let max = size::parse_size_limit(max_size)
        .map_err(|e| format!("--max-size {e}"))?
        .ok_or("--max-size 0: give a budget")?;
    let config = shared::EngineConfig {
        namespace: namespace.to_string(),
        timeout: std::time::Duration::from_millis(timeout_ms.max(1)),
        umask: 0o002,
        password: password_file.map(read_password_file).transpose()?,
    };
    let engine = shared::open(url, &config)
        .map_err(|e| format!("--shared {}: {e}", shared::redact_url(url)))?;
    let mut gc = shared::gc::GcConfig::new(namespace, max);
    gc.blob_grace_s = blob_grace_s;
    gc.lease_ttl_s = lease_s.max(1);
    match shared::gc::collect(&*engine, &gc, shared::now_s()) {
        Ok(r) => {
            println!(
                "namespace {namespace}: {} records, {} before; {} after (budget {})",
                r.records_before,
                size::describe_bytes(r.bytes_before),
                size::describe_bytes(r.bytes_after),
                size::describe_bytes(max)
            );
            println!(
                "removed: {} least recently used records ({}), {} damaged records, {} unreferenced blobs ({}), {} listing names",
                r.records_removed,
                size::describe_bytes(r.record_bytes_removed),
                r.damaged_removed,
                r.blobs_removed,
                size::describe_bytes(r.blob_bytes_removed),
                r.listings_removed
            );
            match r.blob_bytes_after {
                Some(b) => println!(
                    "blobs in the engine (all namespaces): {}",
                    size::describe_bytes(b)
                ),
                None => println!(
                    "blobs: another collector holds the blob lease; not collected this pass"
                ),
            }
            Ok(())
        }
        Err(e @ shared::gc::GcError::Leased { .. }) => {
            println!("namespace {namespace}: {e}; nothing to do here");
            Ok(())
        }
        Err(e) => Err(format!("shared gc of namespace {namespace}: {e}")),
    }
}

/// Whether stderr is a stream to the systemd journal: `$JOURNAL_STREAM`
/// names its device and inode (checked, because the variable is inherited
/// by processes whose stderr was redirected elsewhere).
fn stderr_is_journal() -> bool {
    let Some((dev, ino)) = std::env::var("JOURNAL_STREAM").ok().and_then(|v| {
        let (d, i) = v.split_once(':')?;
        Some((d.parse::<u64>().ok()?, i.parse::<u64>().ok()?))
    }) else {
        return false;
    };
    // SAFETY: fstat into a zeroed struct on our own stderr.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    let ok = unsafe { libc::fstat(2, &mut st) } == 0;
    ok && st.st_dev == dev && st.st_ino == ino
}

/// The logger: env_logger's lines on a terminal or in a file; on the
/// journal, which stamps every line itself, no timestamp of our own and a
/// syslog priority prefix (`<4>` for a warning) so that `journalctl -p`
/// filters by level.
fn init_logging() {
    use std::io::Write;
    // fuser warns when it finds the mount already gone at exit (our normal
    // way out after `umount`), so its session module logs errors only.
    let mut builder = env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or("info,fuser::session=error"),
    );
    if stderr_is_journal() {
        builder.format(|buf, record| {
            let priority = match record.level() {
                log::Level::Error => 3,
                log::Level::Warn => 4,
                log::Level::Info => 6,
                log::Level::Debug | log::Level::Trace => 7,
            };
            writeln!(
                buf,
                "<{priority}>[{} {}] {}",
                record.level(),
                record.target(),
                record.args()
            )
        });
    }
    builder.init();
}

fn main() -> ExitCode {
    init_logging();
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Mount(_)) {
        // A report piped into `head` ends quietly, as any Unix tool's does
        // (Rust ignores SIGPIPE, and a print to a closed pipe would be a
        // panic, hence an abort). The daemon keeps it ignored: its sockets
        // report EPIPE as an error instead.
        // SAFETY: no other thread runs yet; SIG_DFL is always valid.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let priority = if stderr_is_journal() { "<3>" } else { "" };
            eprintln!("{priority}casfs: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_mount_options_parse_or_are_refused_clearly() {
        let o = parse_mount_options("allow_other,ro,max_size=1G,uid=65534,gid=65534,mode=2775")
            .unwrap();
        assert!(o.allow_other && o.read_only);
        assert_eq!(
            (o.max_size_bytes, o.uid, o.gid, o.mode),
            (Some(1_000_000_000), Some(65534), Some(65534), Some(0o2775))
        );
        // As in ccache.conf: a bare number is G, 0 is no limit.
        let o = parse_mount_options("max_size=20").unwrap();
        assert_eq!(o.max_size_bytes, Some(20_000_000_000));
        let o = parse_mount_options("max_size=0").unwrap();
        assert_eq!(o.max_size_bytes, None);
        let e = parse_mount_options("max_size=inf").unwrap_err();
        assert!(
            e.starts_with("mount option max_size=\"inf\" is refused"),
            "{e}"
        );
        assert!(parse_mount_options("bogus").is_err());
        let o = parse_mount_options("shared=redis://h:6379/2,namespace=deb13").unwrap();
        assert_eq!(o.shared.as_deref(), Some("redis://h:6379/2"));
        assert_eq!(o.namespace.as_deref(), Some("deb13"));
        let o =
            parse_mount_options("shared_url=redis://h,shared_password_file=/etc/casfs/pw").unwrap();
        assert_eq!(
            o.shared_password_file.as_deref(),
            Some(std::path::Path::new("/etc/casfs/pw"))
        );
        let o = parse_mount_options("shared_clock_skew_ms=250").unwrap();
        assert_eq!(o.shared_clock_skew_ms, Some(250));
        assert!(parse_mount_options("shared_clock_skew_ms=soon").is_err());
    }
}
