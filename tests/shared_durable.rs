//! Real-mount tests of what the shared tier guarantees about uploads and
//! clocks, with real outages: the directory engine's shared directory is
//! moved away (its path disappears, as an unmounted share does) and put
//! back; a real `redis-server` on a loopback port is stopped and started.
//! They prove: uploads pending when the daemon is killed (-9) or cleanly
//! unmounted are delivered after the next mount, and another host then sees
//! every entry; an outage longer than the breaker's cycles gives nothing
//! up; `casfs sync` fails, naming the count and the reason, once an upload
//! was given up (and keeps failing); an mtime from a host whose clock runs
//! fast moves this host's clock at most the configured bound.

mod common;

use common::*;
use std::fs;
use std::path::{Path, PathBuf};

use std::thread;
use std::time::{Duration, Instant};

/// A shared directory whose path can be made to disappear (renamed away,
/// as when the share is unmounted) and come back. Put back on drop.
struct SharedDir {
    _root: TestDir,
    path: PathBuf,
    away: PathBuf,
}

impl SharedDir {
    fn new(tag: &str) -> SharedDir {
        let root = TestDir::new(tag);
        let path = root.dir("share");
        let away = root.path("share.away");
        SharedDir {
            _root: root,
            path,
            away,
        }
    }

    fn url(&self) -> String {
        format!("file://{}", self.path.display())
    }

    fn go_away(&self) {
        fs::rename(&self.path, &self.away).expect("move the shared directory away");
    }

    fn come_back(&self) {
        fs::rename(&self.away, &self.path).expect("put the shared directory back");
    }
}

impl Drop for SharedDir {
    fn drop(&mut self) {
        if self.away.exists() && !self.path.exists() {
            let _ = fs::rename(&self.away, &self.path);
        }
    }
}

fn sync(mp: &Path) -> (bool, String) {
    let out = casfs(&["sync".as_ref(), mp.as_os_str()]);
    (out.status.success(), output_text(&out))
}

/// Runs `casfs sync` until it no longer says the engine is down (the
/// breaker retries a returned engine after a few seconds); returns its
/// last answer. Watchdog: 60 s.
fn sync_after_outage(mp: &Path) -> (bool, String) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (ok, text) = sync(mp);
        if ok || !text.contains("cannot be delivered now") {
            return (ok, text);
        }
        assert!(
            Instant::now() < deadline,
            "sync still says the engine is down 60 s after it came back: {text}"
        );
        thread::sleep(Duration::from_millis(200));
    }
}

fn result_name(i: usize) -> String {
    format!("{i:02}abcdefghijklmnopqrstuvwxyzR")
}

/// Publishes `n` results (ccache's write-then-rename) under `dir`.
fn publish_results(dir: &Path, n: usize, seed: u64) {
    fs::create_dir_all(dir).unwrap();
    for i in 0..n {
        publish(
            dir,
            "r.tmp",
            &result_name(i),
            &pattern(seed + i as u64, 3000 + i),
        );
    }
}

/// Asserts a (fresh) host sees all `n` results with their bytes.
fn assert_results_seen(dir: &Path, n: usize, seed: u64, what: &str) {
    let mut missing = Vec::new();
    for i in 0..n {
        match fs::read(dir.join(result_name(i))) {
            Ok(b) if b == pattern(seed + i as u64, 3000 + i) => {}
            Ok(_) => panic!("{what}: {} has other bytes", result_name(i)),
            Err(e) => missing.push(format!("{}: {e}", result_name(i))),
        }
    }
    assert!(
        missing.is_empty(),
        "{what}: {} of {n} results missing: {missing:?}",
        missing.len()
    );
}

fn clear_dead_mount(mp: &Path) {
    let out = casfs(&["unmount".as_ref(), mp.as_os_str()]);
    assert!(
        out.status.success(),
        "casfs unmount of a dead mount: {}",
        output_text(&out)
    );
}

#[test]
fn uploads_pending_at_kill9_are_delivered_after_remount_and_seen_by_another_host() {
    let share = SharedDir::new("durable-k9-share");
    let url = share.url();
    let td = TestDir::new("durable-k9");
    let (store_a, mp_a) = (td.dir("store-a"), td.mountpoint("a"));
    let mut a = Mount::start(&store_a, &mp_a, &["--shared", &url]);
    share.go_away();
    publish_results(&mp_a.join("cc/k/9"), 20, 100);
    // Every rename has returned: all 20 are acknowledged, none delivered.
    a.kill9();
    clear_dead_mount(&mp_a);
    drop(a);
    share.come_back();

    let a = Mount::start(&store_a, &mp_a, &["--shared", &url]);
    let (ok, text) = sync_after_outage(&mp_a);
    assert!(ok, "sync after remount: {text}");
    let mp_b = td.mountpoint("b");
    let _b = Mount::start(&td.dir("store-b"), &mp_b, &["--shared", &url]);
    assert_results_seen(&mp_b.join("cc/k/9"), 20, 100, "host B after A's kill -9");
    assert_eq!(a.counter("shared_uploads_pending"), 0);
    assert!(
        a.log()
            .contains("20 uploads from before this mount are pending"),
        "the remount did not say it replays 20 uploads:\n{}",
        a.log()
    );
}

#[test]
fn clean_unmount_logs_pending_uploads_and_the_next_mount_delivers_the_newest_versions() {
    let mut redis = Redis::start();
    let url = redis.url();
    let td = TestDir::new("durable-unmount");
    let (store_a, mp_a) = (td.dir("store-a"), td.mountpoint("a"));
    let mut a = Mount::start(&store_a, &mp_a, &["--shared", &url]);
    redis.stop();
    publish_results(&mp_a.join("cc/u/m"), 20, 200);
    // A mutable file published three times while the engine is down: only
    // the last version may end up in the tier.
    let conf = mp_a.join("cc/u/notes.txt");
    for v in 0..3u64 {
        publish(
            &mp_a.join("cc/u"),
            "n.tmp",
            "notes.txt",
            &pattern(900 + v, 777),
        );
    }
    assert_eq!(fs::read(&conf).unwrap(), pattern(902, 777));
    a.unmount();
    let unmount_log = a.log();
    drop(a);
    // A mount without --shared keeps them, and says so.
    let mut local = Mount::start(&store_a, &mp_a, &[]);
    local.unmount();
    let local_log = local.log();
    drop(local);
    assert!(
        local_log.contains("holds 23 publications not yet delivered"),
        "a mount without --shared did not mention the 23 pending uploads:\n{local_log}"
    );

    redis.restart();
    let a = Mount::start(&store_a, &mp_a, &["--shared", &url]);
    let (ok, text) = sync_after_outage(&mp_a);
    assert!(ok, "sync after remount: {text}");
    let mp_b = td.mountpoint("b");
    let _b = Mount::start(&td.dir("store-b"), &mp_b, &["--shared", &url]);
    assert_results_seen(&mp_b.join("cc/u/m"), 20, 200, "host B after A's unmount");
    assert_eq!(
        fs::read(mp_b.join("cc/u/notes.txt")).unwrap(),
        pattern(902, 777),
        "host B got an older version of a mutable file"
    );
    assert!(
        a.counter("shared_uploads_superseded") >= 2,
        "older versions of notes.txt were uploaded after newer ones existed"
    );
    assert!(
        unmount_log.contains("unmount: 23 uploads to the shared tier"),
        "unmount did not log the 23 undelivered uploads:\n{unmount_log}"
    );
}

#[test]
fn an_outage_longer_than_the_breaker_cycles_gives_up_no_upload() {
    let mut redis = Redis::start();
    let url = redis.url();
    let td = TestDir::new("durable-outage");
    let mp_a = td.mountpoint("a");
    let a = Mount::start(
        &td.dir("store-a"),
        &mp_a,
        &["--shared", &url, "--shared-timeout-ms", "200"],
    );
    redis.stop();
    publish_results(&mp_a.join("cc/o/t"), 10, 300);
    // Several breaker periods (5 s each) with every probe failing.
    thread::sleep(Duration::from_secs(30));
    let (ok, text) = sync(&mp_a);
    assert!(!ok, "sync with the engine down must fail: {text}");
    redis.restart();
    let (ok, text) = sync_after_outage(&mp_a);
    assert!(ok, "sync after the outage: {text}");
    assert_eq!(
        a.counter("shared_uploads_failed"),
        0,
        "uploads were given up for an outage"
    );
    let mp_b = td.mountpoint("b");
    let _b = Mount::start(&td.dir("store-b"), &mp_b, &["--shared", &url]);
    assert_results_seen(&mp_b.join("cc/o/t"), 10, 300, "host B after the outage");
}

#[test]
fn sync_fails_naming_count_and_reason_once_an_upload_was_given_up() {
    let share = SharedDir::new("durable-gaveup-share");
    let url = share.url();
    let td = TestDir::new("durable-gaveup");
    let mp_a = td.mountpoint("a");
    let a = Mount::start(&td.dir("store-a"), &mp_a, &["--shared", &url]);
    share.go_away();
    let dir = mp_a.join("cc/g/u");
    publish_results(&dir, 3, 400);
    // Two are deleted here before the engine could take them: their bytes
    // are gone from this host and the tier never had them.
    fs::remove_file(dir.join(result_name(0))).unwrap();
    fs::remove_file(dir.join(result_name(1))).unwrap();
    share.come_back();
    let (ok, text) = sync_after_outage(&mp_a);
    assert!(
        !ok,
        "sync succeeded although 2 uploads were given up: {text}"
    );
    assert!(
        text.contains("2 uploads given up") && text.contains("local copy gone before upload"),
        "sync must name the count and the reason: {text}"
    );
    assert_eq!(a.counter("shared_uploads_failed"), 2);
    assert_eq!(a.counter("shared_uploads_pending"), 0);
    assert!(
        a.log().contains("gave up the upload of"),
        "the give-up was not logged:\n{}",
        a.log()
    );
    // The third one was delivered, and later publications are too; sync
    // keeps failing for the two that were given up before it started.
    publish_results(&mp_a.join("cc/g/v"), 1, 500);
    let (ok, text) = sync(&mp_a);
    assert!(
        !ok && text.contains("2 uploads given up"),
        "second sync: {text}"
    );
    let mp_b = td.mountpoint("b");
    let _b = Mount::start(&td.dir("store-b"), &mp_b, &["--shared", &url]);
    assert_eq!(
        fs::read(dir.join(result_name(2))).unwrap(),
        fs::read(mp_b.join("cc/g/u").join(result_name(2))).unwrap()
    );
    assert_results_seen(&mp_b.join("cc/g/v"), 1, 500, "host B");
}

/// Rewrites the mtime in a Redis record (`casfs-record 1\nfile ... MTIME\n`).
fn shift_record_mtime(redis: &Redis, key: &str, ahead_ns: u64) -> u64 {
    let raw = redis.cli(&["--raw", "GET", key]);
    let text = String::from_utf8(raw).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    assert!(
        lines.len() >= 2 && lines[1].starts_with("file "),
        "unexpected record at {key}: {text:?}"
    );
    let mut fields: Vec<String> = lines[1].split(' ').map(str::to_owned).collect();
    let mtime: u64 = fields.last().unwrap().parse().unwrap();
    let future = mtime + ahead_ns;
    *fields.last_mut().unwrap() = future.to_string();
    lines[1] = fields.join(" ");
    let record = format!("{}\n{}\n", lines[0], lines[1]);
    redis.cli(&["SET", key, &record]);
    future
}

#[test]
fn an_mtime_from_a_fast_host_moves_this_hosts_clock_at_most_the_bound() {
    const AHEAD_NS: u64 = 30_000_000_000;
    const BOUND_NS: i128 = 1_000_000_000;
    let redis = Redis::start();
    let url = redis.url();
    let td = TestDir::new("durable-skew");
    let mp_a = td.mountpoint("a");
    let _a = Mount::start(&td.dir("store-a"), &mp_a, &["--shared", &url]);
    publish_results(&mp_a.join("cc/s/k"), 1, 600);
    let (ok, text) = sync(&mp_a);
    assert!(ok, "{text}");
    // As if A's clock ran 30 s fast when it published.
    let key = format!("casfs:default:r:cc/s/k/{}", result_name(0));
    let future = shift_record_mtime(&redis, &key, AHEAD_NS);

    let mp_b = td.mountpoint("b");
    let b = Mount::start(&td.dir("store-b"), &mp_b, &["--shared", &url]);
    let fetched = mp_b.join("cc/s/k").join(result_name(0));
    let shown = mtime_ns(&fetched);
    fs::create_dir_all(mp_b.join("cc/s/new")).unwrap();
    publish(
        &mp_b.join("cc/s/new"),
        "n.tmp",
        "later.txt",
        b"built on B after",
    );
    let built = mtime_ns(&mp_b.join("cc/s/new/later.txt"));
    let wall_after = now_ns();
    assert!(
        shown <= wall_after + BOUND_NS,
        "B shows the fetched entry {} ms ahead of its clock (bound 1000 ms)",
        (shown - wall_after) / 1_000_000
    );
    assert!(
        built <= wall_after + BOUND_NS,
        "B's own new file got an mtime {} ms ahead of its clock: a fast host dragged it",
        (built - wall_after) / 1_000_000
    );
    assert!(
        built > shown,
        "a file built after the fetch looks older than it"
    );
    assert_eq!(b.counter("shared_clock_ahead"), 1);
    assert!(
        b.log().contains("run NTP on every host"),
        "the fast clock was not logged:\n{}",
        b.log()
    );

    // With a wider bound the stored mtime is taken as it is.
    let mp_c = td.mountpoint("c");
    let c = Mount::start(
        &td.dir("store-c"),
        &mp_c,
        &["--shared", &url, "--shared-clock-skew-ms", "60000"],
    );
    assert_eq!(
        mtime_ns(&mp_c.join("cc/s/k").join(result_name(0))),
        future as i128
    );
    assert_eq!(c.counter("shared_clock_ahead"), 0);
}

/// Issue 15, item 2: `casfs sync` waiting on an engine whose writes hang
/// (`CLIENT PAUSE ... WRITE`: reads are answered, writes wait; the
/// deadline is far away, so nothing times out and the breaker stays
/// closed) is never answered on a FUSE worker: more syncs than the mount
/// has workers leave it answering, and SIGINT ends each of them at once
/// (today's `sync` sat in state D until its 300 s were up). The uploads
/// are then delivered as usual.
#[test]
fn sync_waiting_on_a_hung_engine_ends_at_once_on_a_signal() {
    use std::process::{Command, Stdio};
    let redis = Redis::start();
    let url = redis.url();
    let td = TestDir::new("durable-sync-signal");
    let mp = td.mountpoint("a");
    let a = Mount::start(
        &td.dir("store-a"),
        &mp,
        &[
            "--shared",
            &url,
            "--shared-timeout-ms",
            "600000",
            "--threads",
            "2",
        ],
    );
    redis.cli(&["CLIENT", "PAUSE", "600000", "WRITE"]);
    let dir = mp.join("cc/i/s");
    publish_results(&dir, 2, 700);
    let mut syncs: Vec<std::process::Child> = (0..4)
        .map(|_| {
            let mut c = Command::new(CASFS_BIN);
            // As typed at a terminal: SIGINT at its default (a test run in
            // the background of a shell inherits it ignored).
            // SAFETY: only async-signal-safe signal(2) between fork and exec.
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut c, || {
                    libc::signal(libc::SIGINT, libc::SIG_DFL);
                    Ok(())
                });
            }
            c.args(["sync".as_ref(), mp.as_os_str()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start casfs sync")
        })
        .collect();
    // The mount answers while the syncs wait (they never hold a worker).
    let deadline = Instant::now() + Duration::from_secs(60);
    while a.counter("shared_uploads_pending") < 2 {
        assert!(
            Instant::now() < deadline,
            "the uploads never became pending"
        );
        thread::sleep(Duration::from_millis(50));
    }
    thread::sleep(Duration::from_millis(500));
    assert_eq!(
        fs::read(dir.join(result_name(1))).unwrap(),
        pattern(701, 3001)
    );
    for s in &mut syncs {
        assert!(
            s.try_wait().unwrap().is_none(),
            "a sync ended although the engine answers nothing"
        );
        // SAFETY: a plain kill(2) of our own child.
        unsafe { libc::kill(s.id() as libc::pid_t, libc::SIGINT) };
    }
    for s in &mut syncs {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = s.try_wait().unwrap() {
                assert!(!status.success(), "an interrupted sync reported success");
                break;
            }
            if Instant::now() >= deadline {
                let proc_file = |f: &str| {
                    fs::read_to_string(format!("/proc/{}/{f}", s.id())).unwrap_or_default()
                };
                let state = proc_file("status")
                    .lines()
                    .filter(|l| {
                        l.starts_with("State")
                            || l.starts_with("SigBlk")
                            || l.starts_with("SigIgn")
                            || l.starts_with("SigPnd")
                    })
                    .collect::<Vec<_>>()
                    .join("; ");
                let (wchan, stack) = (proc_file("wchan"), proc_file("stack"));
                let _ = s.kill();
                panic!(
                    "casfs sync still running 30 s after SIGINT ({state}; wchan {wchan}; stack:\n{stack})\n{}",
                    a.log()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
    redis.cli(&["CLIENT", "UNPAUSE"]);
    let (ok, text) = sync(&mp);
    assert!(ok, "sync once the engine answers again: {text}");
    let mp_b = td.mountpoint("b");
    let _b = Mount::start(&td.dir("store-b"), &mp_b, &["--shared", &url]);
    assert_results_seen(&mp_b.join("cc/i/s"), 2, 700, "host B");
}

/// Issue 15, item 2: a Redis at `maxmemory` with `noeviction` refuses
/// writes (`OOM command not allowed`). That is not an outage: `sync`
/// reports it at once in the engine's own words, `.casfs/stats` shows it,
/// and the uploads stay pending and are retried, so once the operator
/// makes room they are delivered.
#[test]
fn a_redis_that_refuses_writes_for_memory_is_reported_by_sync_in_its_own_words() {
    let redis = Redis::start();
    let url = redis.url();
    let td = TestDir::new("durable-oom");
    let mp = td.mountpoint("a");
    let a = Mount::start(&td.dir("store-a"), &mp, &["--shared", &url]);
    redis.cli(&["CONFIG", "SET", "maxmemory-policy", "noeviction"]);
    redis.cli(&["CONFIG", "SET", "maxmemory", "1"]);
    let dir = mp.join("cc/m/o");
    publish_results(&dir, 3, 800);
    let (ok, text) = sync(&mp);
    assert!(
        !ok,
        "sync succeeded although Redis refused every write: {text}"
    );
    assert!(
        text.contains("OOM command not allowed") && text.contains("refuses them"),
        "sync does not report the refusal in Redis's words: {text}"
    );
    assert!(a.counter("shared_refusals") > 0);
    let stats = a.stats_text();
    assert!(
        stats
            .lines()
            .any(|l| l.starts_with("shared_last_refusal") && l.contains("OOM")),
        "the refusal is not in .casfs/stats:\n{stats}"
    );
    assert_eq!(
        a.counter("shared_breaker_open"),
        0,
        "a refusal opened the breaker"
    );
    assert!(a.counter("shared_uploads_pending") > 0);
    // The operator makes room: the retries deliver everything.
    redis.cli(&["CONFIG", "SET", "maxmemory", "0"]);
    eprintln!("room made at {:?}", std::time::SystemTime::now());
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (ok, text) = sync(&mp);
        if ok {
            break;
        }
        assert!(
            text.contains("refuses them") && Instant::now() < deadline,
            "sync after Redis has room again: {text}\n{}",
            a.log()
        );
        thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(a.counter("shared_uploads_failed"), 0);
    let mp_b = td.mountpoint("b");
    let _b = Mount::start(&td.dir("store-b"), &mp_b, &["--shared", &url]);
    assert_results_seen(&mp_b.join("cc/m/o"), 3, 800, "host B");
}
