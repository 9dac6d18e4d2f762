//! The Debian package as an operator uses it: `mount-helpers/package`
//! builds it (its last line is the .deb's path), `dpkg -i` installs it, an
//! `/etc/fstab`-style line mounts through `mount -t casfs` with the
//! packaged helper and binary, the systemd unit's own command line runs as
//! systemd would run it (readiness through `$NOTIFY_SOCKET`: this test
//! machine's PID 1 is not systemd, so the unit is checked with
//! `systemd-analyze verify` and its `ExecStart=` is run here), ccache builds
//! through the mounts, and `dpkg -r` refuses while a mount is busy, then
//! leaves no daemon and no mount behind.
//!
//! Needs root, dpkg, dpkg-deb, dpkg-shlibdeps, systemd-analyze, ccache,
//! gcc and util-linux's mount; a missing tool is a failure, never a skip.
//! The package is purged when the test ends, also when it fails; the test
//! refuses to run over a casfs package that was installed before it.

mod common;

use common::*;
use std::fs;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Purges the casfs package when dropped (after clearing what it mounted),
/// so a failing test leaves the machine as it found it.
struct Installed {
    mounts: Vec<PathBuf>,
}

impl Drop for Installed {
    fn drop(&mut self) {
        for mp in &self.mounts {
            for _ in 0..3 {
                if !is_mounted(mp) {
                    break;
                }
                let _ = Command::new("umount")
                    .arg("-l")
                    .arg(mp)
                    .stderr(Stdio::null())
                    .status();
            }
        }
        if package_installed() {
            let out = Command::new("dpkg")
                .args(["-P", "casfs"])
                .output()
                .expect("dpkg -P casfs");
            if !out.status.success() {
                eprintln!("cleanup: dpkg -P casfs failed:\n{}", output_text(&out));
            }
        }
    }
}

fn package_installed() -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", "casfs"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("installed"))
}

fn run(cmd: &mut Command, what: &str) -> Output {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e}"));
    out
}

fn run_ok(cmd: &mut Command, what: &str) -> Output {
    let out = run(cmd, what);
    assert!(
        out.status.success(),
        "{what} failed:\n{}",
        output_text(&out)
    );
    out
}

/// Pids of running `casfs` processes whose binary is the packaged one.
fn packaged_daemons() -> Vec<u32> {
    let mut pids = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let exe = fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
        let exe = exe.to_string_lossy();
        if (exe == "/usr/bin/casfs" || exe == "/usr/bin/casfs (deleted)") && process_alive(pid) {
            pids.push(pid);
        }
    }
    pids
}

/// The `ExecStart=` of the installed unit for instance `mp`, as systemd
/// would run it with the unit's defaults (`/etc/default/casfs` sets
/// nothing until the operator edits it): `${VAR}` and `$VAR` expanded,
/// `%f` the mountpoint.
fn unit_command(unit: &str, mp: &Path, store: &Path) -> Vec<String> {
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("the unit has an ExecStart=");
    let mut argv = Vec::new();
    for word in line.split_whitespace() {
        match word {
            "${CASFS_STORE}" => argv.push(store.display().to_string()),
            // Empty: `-o ''` means no options; `$CASFS_ARGS` (unbraced)
            // splits into no words at all.
            "${CASFS_OPTIONS}" => argv.push(String::new()),
            "$CASFS_ARGS" => {}
            "%f" => argv.push(mp.display().to_string()),
            w => {
                assert!(
                    !w.contains('$') && !w.contains('%'),
                    "unexpanded {w:?} in {line:?}"
                );
                argv.push(w.to_string())
            }
        }
    }
    argv
}

#[test]
fn the_debian_package_installs_mounts_from_fstab_and_the_unit_serves_ccache_and_removes_cleanly() {
    require_programs(&[
        ("dpkg", "dpkg"),
        ("dpkg-deb", "dpkg"),
        ("dpkg-shlibdeps", "dpkg-dev"),
        ("objcopy", "binutils"),
        ("systemd-analyze", "systemd"),
        ("mount", "mount"),
    ]);
    assert!(
        !package_installed() && !Path::new("/usr/bin/casfs").exists(),
        "a casfs package (or /usr/bin/casfs) is installed already; this test installs and \
         purges its own: remove it first (dpkg -P casfs)"
    );
    let td = TestDir::new("package");
    let target_dir = Path::new(CASFS_BIN).parent().unwrap().parent().unwrap();

    // Build: the last line is the .deb.
    let out = run_ok(
        Command::new(helpers_dir().join("package"))
            .arg("--no-build")
            .arg(td.dir("out"))
            .env("CARGO_TARGET_DIR", target_dir),
        "mount-helpers/package",
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let deb = PathBuf::from(stdout.lines().last().unwrap_or_default());
    assert!(
        deb.extension().is_some_and(|e| e == "deb") && deb.is_file(),
        "the last line of mount-helpers/package must be the .deb it built:\n{}",
        output_text(&out)
    );
    let field = |name: &str| {
        let o = run_ok(
            Command::new("dpkg-deb").arg("-f").arg(&deb).arg(name),
            "dpkg-deb -f",
        );
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    assert!(
        field("Depends").split(", ").any(|d| d == "fuse3"),
        "Depends: {}",
        field("Depends")
    );
    let listing = String::from_utf8_lossy(
        &run_ok(Command::new("dpkg-deb").arg("-c").arg(&deb), "dpkg-deb -c").stdout,
    )
    .into_owned();
    for f in [
        "./usr/bin/casfs",
        "./sbin/mount.casfs",
        "./sbin/mount.fuse.casfs -> mount.casfs",
        "./usr/sbin/casfs-chroots",
        "./usr/sbin/casfs-textfile",
        "./lib/systemd/system/casfs@.service",
        "./lib/systemd/system/casfs-textfile.timer",
        "./etc/default/casfs",
        "./etc/logrotate.d/casfs",
        "./usr/share/doc/casfs/copyright",
        "./usr/share/doc/casfs/changelog.gz",
        "./usr/share/doc/casfs/README.md.gz",
    ] {
        assert!(
            listing.lines().any(|l| l.ends_with(f)),
            "the package lacks {f}:\n{listing}"
        );
    }
    assert!(
        listing.lines().all(|l| l.contains(" root/root ")),
        "every file must belong to root:\n{listing}"
    );
    let conffiles = run_ok(
        Command::new("dpkg-deb")
            .arg("-I")
            .arg(&deb)
            .arg("conffiles"),
        "dpkg-deb -I DEB conffiles",
    );
    assert_eq!(
        String::from_utf8_lossy(&conffiles.stdout),
        "/etc/default/casfs\n/etc/logrotate.d/casfs\n",
        "the package's conffiles"
    );

    // Install.
    let mp_fstab = td.mountpoint("ccache-fstab");
    let mp_unit = td.mountpoint("ccache-unit");
    let _installed = Installed {
        mounts: vec![mp_fstab.clone(), mp_unit.clone()],
    };
    run_ok(Command::new("dpkg").arg("-i").arg(&deb), "dpkg -i");
    let size = fs::metadata("/usr/bin/casfs").unwrap().len();
    eprintln!(
        "package {} bytes; installed /usr/bin/casfs {size} bytes; built {} bytes",
        fs::metadata(&deb).unwrap().len(),
        fs::metadata(CASFS_BIN).unwrap().len()
    );
    assert!(
        size < fs::metadata(CASFS_BIN).unwrap().len() / 4,
        "/usr/bin/casfs is not stripped ({size} bytes)"
    );
    let unit = fs::read_to_string("/lib/systemd/system/casfs@.service").unwrap();
    assert!(unit.contains("Type=notify") && unit.contains("ExecStart=/usr/bin/casfs mount"));

    // The unit parses, as an instance for our mountpoint.
    let escaped = String::from_utf8_lossy(
        &run_ok(
            Command::new("systemd-escape").arg("--path").arg(&mp_unit),
            "systemd-escape",
        )
        .stdout,
    )
    .trim()
    .to_string();
    let units = td.dir("units");
    let instance = units.join(format!("casfs@{escaped}.service"));
    fs::write(&instance, &unit).unwrap();
    // systemd-analyze verify exits 0 on unknown keys and bad values, and
    // names the file in each complaint: no line may name ours.
    let verify = run(
        Command::new("systemd-analyze")
            .arg("verify")
            .arg("--man=no")
            .arg(&instance)
            .arg("/lib/systemd/system/casfs-textfile.service")
            .arg("/lib/systemd/system/casfs-textfile.timer"),
        "systemd-analyze verify",
    );
    let complaints = String::from_utf8_lossy(&verify.stderr).into_owned();
    assert!(
        verify.status.success() && !complaints.lines().any(|l| l.contains("casfs")),
        "systemd-analyze verify of the packaged units:\n{}",
        output_text(&verify)
    );

    // 1. An /etc/fstab line, through `mount -t casfs` (the packaged helper
    //    and binary: no CASFS_BIN, no PATH tricks).
    let store_fstab = td.dir("store-fstab");
    let fstab = td.path("fstab");
    fs::write(
        &fstab,
        format!(
            "casfs:{} {} casfs allow_other,max_size=1G,nofail 0 0\n",
            store_fstab.display(),
            mp_fstab.display()
        ),
    )
    .unwrap();
    let t0 = Instant::now();
    run_ok(
        Command::new("mount")
            .arg("-T")
            .arg(&fstab)
            .arg(&mp_fstab)
            .env_remove("CASFS_BIN")
            .env_remove("NOTIFY_SOCKET"),
        "mount -T FSTAB MP (packaged mount.casfs)",
    );
    eprintln!("mount through the fstab line took {:?}", t0.elapsed());
    let d_fstab = ForeignDaemon::find(&mp_fstab);
    assert!(
        fs::read_link(format!("/proc/{}/exe", d_fstab.pid))
            .is_ok_and(|e| e == Path::new("/usr/bin/casfs")),
        "the fstab mount is not served by the packaged binary"
    );
    assert!(
        d_fstab
            .log_path
            .as_ref()
            .is_some_and(|p| p.starts_with("/var/log/casfs")),
        "the fstab mount logs to {:?}, not /var/log/casfs",
        d_fstab.log_path
    );

    // 2. The unit's command line, as systemd runs a Type=notify service:
    //    it reports READY=1 to $NOTIFY_SOCKET once the mount serves.
    let store_unit = td.dir("store-unit");
    let argv = unit_command(&unit, &mp_unit, &store_unit);
    let sock_path = td.path("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(READY_TIMEOUT_S)))
        .unwrap();
    let unit_log = td.path("unit.log");
    let log = fs::File::create(&unit_log).unwrap();
    let mut child = Command::new(&argv[0])
        .args(&argv[1..])
        .env("NOTIFY_SOCKET", &sock_path)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("run the unit's ExecStart {argv:?}: {e}"));
    let mut buf = [0u8; 4096];
    loop {
        let n = sock.recv(&mut buf).unwrap_or_else(|e| {
            panic!(
                "no READY=1 from the unit's command {argv:?} ({e}):\n{}",
                fs::read_to_string(&unit_log).unwrap_or_default()
            )
        });
        if String::from_utf8_lossy(&buf[..n])
            .lines()
            .any(|l| l == "READY=1")
        {
            break;
        }
    }
    let d_unit = ForeignDaemon::find(&mp_unit);

    // ccache through both: misses, then hits, and gcc's own objects.
    let all = jobs(&[1]);
    let reference = td.dir("gcc");
    gcc_reference(&all, &reference);
    for (mp, tag) in [(&mp_fstab, "fstab"), (&mp_unit, "unit")] {
        let cc = Ccache::new(&mp.join("ccache"), &td.root);
        fs::create_dir_all(&cc.dir).unwrap();
        cc.zero_stats();
        let cold = td.dir(&format!("cold-{tag}"));
        assert_all_compiled(&compile_all(Some(&cc), &all, &cold, 4), "cold build");
        assert_objects_identical(&all, &cold, &reference, "cold build");
        cc.zero_stats();
        let warm = td.dir(&format!("warm-{tag}"));
        assert_all_compiled(&compile_all(Some(&cc), &all, &warm, 4), "warm build");
        assert_objects_identical(&all, &warm, &reference, "warm build");
        let st = cc.print_stats();
        assert_eq!(
            (st.direct_hits(), st.misses()),
            (all.len() as u64, 0),
            "warm build through the {tag} mount must be all hits: {}",
            st.summary()
        );
    }

    // dpkg -r while a build holds a file open in a mount: refused, saying
    // what to do; the package stays installed and the mounts serve.
    let held = fs::File::open(mp_fstab.join(".casfs/stats")).unwrap();
    let out = run(Command::new("dpkg").args(["-r", "casfs"]), "dpkg -r (busy)");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("is busy") && err.contains("fuser -vm"),
        "dpkg -r with a busy mount must fail naming it:\n{}",
        output_text(&out)
    );
    assert!(
        package_installed(),
        "the refused removal removed the package"
    );
    assert!(fs::read_to_string(mp_fstab.join(".casfs/stats")).is_ok());
    drop(held);

    // dpkg -r: no daemon, no mount, no binary; the operator's data stays.
    let out = run_ok(Command::new("dpkg").args(["-r", "casfs"]), "dpkg -r");
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    let deadline = Instant::now() + Duration::from_secs(EXIT_TIMEOUT_S);
    while !packaged_daemons().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.wait();
    assert_eq!(
        packaged_daemons(),
        Vec::<u32>::new(),
        "dpkg -r left casfs daemons"
    );
    assert!(
        !is_mounted(&mp_fstab) && !is_mounted(&mp_unit),
        "dpkg -r left a mount: {:?} {:?}",
        top_mount(&mp_fstab),
        top_mount(&mp_unit)
    );
    assert!(!Path::new("/usr/bin/casfs").exists() && !Path::new("/sbin/mount.casfs").exists());
    assert!(
        Path::new("/etc/default/casfs").exists(),
        "dpkg -r must keep the conffile /etc/default/casfs (purge removes it)"
    );
    assert!(store_fstab.join("blobs").exists() || fs::read_dir(&store_fstab).unwrap().count() > 0);
    run_ok(Command::new("dpkg").args(["-P", "casfs"]), "dpkg -P");
    assert!(!Path::new("/etc/default/casfs").exists());
    drop((d_fstab, d_unit));
}
