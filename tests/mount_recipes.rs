//! The recipes of doc/operations.md for the farm's own build tools, run for
//! real: a Poudriere-style bind of one mount at `/root/.ccache` in two
//! builders (chroots), root compiling there with `HOME=/root` and no
//! `CCACHE_DIR`; and sbuild's schroot recipe: a directory schroot whose
//! fstab binds the mount at `/var/cache/ccache-sbuild`, builds run through
//! the `sbuild-setup` wrapper kept in the cache, as an unprivileged user of
//! the cache's group with `CCACHE_UMASK=002`.
//!
//! The chroots are minimal: the host's `/usr` bound read-only (compiler and
//! ccache included), `/bin`, `/lib`, ... as the symlinks a merged-/usr
//! Debian has, `/dev` bound. Needs root, chroot, schroot, ccache, gcc and
//! util-linux; a missing tool is a failure, never a skip. Every bind, the
//! schroot configuration and every daemon are removed when the guards drop.

mod common;

use common::*;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const HELLO_C: &str = "int casfs_recipe(int x) { return x * 7 + 3; }\n";

fn run(cmd: &mut Command, what: &str) -> Output {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed:\n{}",
        output_text(&out)
    );
    out
}

/// A minimal chroot at `root` built from the host's own `/usr`; its
/// mounts are removed on drop (innermost first).
struct MiniChroot {
    root: PathBuf,
    mounts: Vec<PathBuf>,
}

impl MiniChroot {
    /// `bind_now`: bind /usr and /dev here (for `chroot`); schroot binds
    /// them itself through its fstab.
    fn new(root: PathBuf, bind_now: bool) -> MiniChroot {
        let mut c = MiniChroot {
            root,
            mounts: Vec::new(),
        };
        for d in [
            "usr",
            "dev",
            "proc",
            "etc",
            "root",
            "src",
            "out",
            "var/cache",
        ] {
            fs::create_dir_all(c.root.join(d)).unwrap();
        }
        fs::create_dir_all(c.root.join("tmp")).unwrap();
        fs::set_permissions(c.root.join("tmp"), fs::Permissions::from_mode(0o1777)).unwrap();
        fs::set_permissions(c.root.join("out"), fs::Permissions::from_mode(0o777)).unwrap();
        for link in ["bin", "sbin", "lib", "lib64", "lib32", "libx32"] {
            if let Ok(target) = fs::read_link(Path::new("/").join(link)) {
                std::os::unix::fs::symlink(target, c.root.join(link)).unwrap();
            }
        }
        for f in ["passwd", "group"] {
            fs::copy(Path::new("/etc").join(f), c.root.join("etc").join(f)).unwrap();
        }
        fs::write(c.root.join("src/hello.c"), HELLO_C).unwrap();
        fs::set_permissions(
            c.root.join("src/hello.c"),
            fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        if bind_now {
            c.bind("/usr", "usr", true);
            c.bind("/dev", "dev", false);
        }
        c
    }

    fn bind(&mut self, from: &str, to: &str, read_only: bool) {
        let target = self.root.join(to);
        run(
            Command::new("mount").arg("--bind").arg(from).arg(&target),
            &format!("bind {from} into the chroot"),
        );
        self.mounts.push(target.clone());
        if read_only {
            run(
                Command::new("mount")
                    .args(["-o", "remount,bind,ro"])
                    .arg(&target),
                "remount the chroot's /usr read-only",
            );
        }
    }

    /// `chroot ROOT env -i HOME=/root PATH=... ARGS...` as root.
    fn run_as_root(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new("chroot");
        cmd.arg(&self.root)
            .args(["/usr/bin/env", "-i", "HOME=/root", "PATH=/usr/bin:/bin"])
            .args(args)
            .current_dir("/");
        run(&mut cmd, &format!("in chroot {:?}: {args:?}", self.root))
    }
}

impl Drop for MiniChroot {
    fn drop(&mut self) {
        for m in self.mounts.iter().rev() {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(m)
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Lazily unmounts the casfs binds on `targets` when dropped (declared
/// after the `Mount`, so it drops first).
struct Binds(Vec<PathBuf>);

impl Drop for Binds {
    fn drop(&mut self) {
        for t in &self.0 {
            for _ in 0..4 {
                if !is_mounted(t) {
                    break;
                }
                let _ = Command::new("umount")
                    .arg("-l")
                    .arg(t)
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
}

fn stat_of(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some(key)).then(|| w.next()?.parse().ok())?
        })
        .unwrap_or_else(|| panic!("no {key} in ccache's stats:\n{text}"))
}

#[test]
fn poudriere_style_builders_share_one_mount_bound_at_root_ccache() {
    require_programs(&[("chroot", "coreutils"), ("mount", "mount")]);
    let td = TestDir::new("recipe-poudriere");
    let mp = td.mountpoint("mnt");
    let mut m = Mount::start(&td.store(), &mp, &["-o", "allow_other"]);
    let b1 = MiniChroot::new(td.dir("builder1"), true);
    let b2 = MiniChroot::new(td.dir("builder2"), true);
    let at = |b: &MiniChroot| b.root.join("root/.ccache");
    let out = run(
        Command::new(helpers_dir().join("casfs-chroots"))
            .arg(&mp)
            .arg(&b1.root)
            .arg(&b2.root)
            .args(["--at", "/root/.ccache"]),
        "casfs-chroots MP B1 B2 --at /root/.ccache",
    );
    let _binds = Binds(vec![at(&b1), at(&b2)]);
    eprintln!("{}", String::from_utf8_lossy(&out.stdout));

    // ccache finds ~/.ccache by itself (no CCACHE_DIR): a miss in builder 1,
    // a direct hit in builder 2, the same object.
    let compile = [
        "ccache",
        "gcc",
        "-O2",
        "-c",
        "/src/hello.c",
        "-o",
        "/out/hello.o",
    ];
    b1.run_as_root(&["ccache", "-z"]);
    b1.run_as_root(&compile);
    let st =
        String::from_utf8_lossy(&b1.run_as_root(&["ccache", "--print-stats"]).stdout).into_owned();
    assert_eq!(stat_of(&st, "cache_miss"), 1, "builder 1:\n{st}");
    assert!(
        fs::read_dir(&mp)
            .unwrap()
            .flatten()
            .any(|e| e.file_name().len() == 1),
        "builder 1's ccache did not write into the casfs mount (is /root/.ccache its cache?)"
    );
    b2.run_as_root(&["ccache", "-z"]);
    b2.run_as_root(&compile);
    let st =
        String::from_utf8_lossy(&b2.run_as_root(&["ccache", "--print-stats"]).stdout).into_owned();
    assert_eq!(
        (stat_of(&st, "direct_cache_hit"), stat_of(&st, "cache_miss")),
        (1, 0),
        "builder 2 must hit what builder 1 compiled:\n{st}"
    );
    assert_eq!(
        fs::read(b1.root.join("out/hello.o")).unwrap(),
        fs::read(b2.root.join("out/hello.o")).unwrap()
    );
    run(
        Command::new(helpers_dir().join("casfs-chroots"))
            .arg(&mp)
            .arg(&b1.root)
            .arg(&b2.root)
            .args(["--at", "/root/.ccache", "--undo"]),
        "casfs-chroots --undo",
    );
    drop((b1, b2));
    m.unmount();
}

/// A schroot configuration for one test, removed on drop.
struct SchrootConfig {
    files: Vec<PathBuf>,
    profile_dir: PathBuf,
}

impl Drop for SchrootConfig {
    fn drop(&mut self) {
        for f in &self.files {
            let _ = fs::remove_file(f);
        }
        let _ = fs::remove_dir_all(&self.profile_dir);
    }
}

#[test]
fn sbuild_schroot_sessions_bind_the_mount_through_fstab_and_hit_as_the_build_group() {
    require_programs(&[("schroot", "schroot"), ("mount", "mount")]);
    let td = TestDir::new("recipe-schroot");
    let (uid, gid) = (uid_of("nobody"), gid_of("nogroup"));
    let mp = td.mountpoint("ccache-sbuild");
    // The recipe's mount: the build group owns a setgid root.
    let mut m = Mount::start(
        &td.store(),
        &mp,
        &["-o", &format!("allow_other,uid=0,gid={gid},mode=2775")],
    );
    let chroot = MiniChroot::new(td.dir("chroot"), false);
    fs::create_dir_all(chroot.root.join("var/cache/ccache-sbuild")).unwrap();
    // The wrapper sbuild runs builds through, kept in the cache itself.
    let wrapper = mp.join("sbuild-setup");
    fs::write(
        &wrapper,
        "#!/bin/sh\nexport CCACHE_DIR=/var/cache/ccache-sbuild\nexport CCACHE_UMASK=002\n\
         export PATH=\"/usr/lib/ccache:$PATH\"\nexec \"$@\"\n",
    )
    .unwrap();
    fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755)).unwrap();

    let name = format!("casfs-test-{}", std::process::id());
    let profile_dir = PathBuf::from("/etc/schroot").join(&name);
    let conf = PathBuf::from("/etc/schroot/chroot.d").join(&name);
    let _config = SchrootConfig {
        files: vec![conf.clone()],
        profile_dir: profile_dir.clone(),
    };
    fs::create_dir_all(&profile_dir).unwrap();
    fs::write(
        profile_dir.join("fstab"),
        format!(
            "/usr /usr none ro,bind 0 0\n/dev /dev none rw,bind 0 0\n\
             {mp} /var/cache/ccache-sbuild none rw,bind 0 0\n",
            mp = mp.display()
        ),
    )
    .unwrap();
    fs::write(profile_dir.join("copyfiles"), "").unwrap();
    fs::write(profile_dir.join("nssdatabases"), "passwd\ngroup\n").unwrap();
    fs::write(
        &conf,
        format!(
            "[{name}]\ndescription=casfs recipe test\ntype=directory\ndirectory={}\n\
             users=root,nobody\nroot-users=root\nprofile={name}\n",
            chroot.root.display()
        ),
    )
    .unwrap();

    // Two sessions, one build each, as the build user (group nogroup
    // standing in for sbuild).
    let build = |session: &str| -> String {
        let out = run(
            Command::new("schroot")
                .args(["-c", &name, "-u", "nobody", "-d", "/src", "--"])
                .args([
                    "/var/cache/ccache-sbuild/sbuild-setup",
                    "sh",
                    "-c",
                    "gcc -O2 -c hello.c -o /out/hello.o && ccache --print-stats",
                ]),
            &format!("schroot session {session}"),
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let first = build("1");
    assert_eq!(stat_of(&first, "cache_miss"), 1, "first session:\n{first}");
    let second = build("2");
    assert_eq!(
        (
            stat_of(&second, "direct_cache_hit"),
            stat_of(&second, "cache_miss")
        ),
        (1, 1),
        "the second session must hit the first one's result:\n{second}"
    );
    // Nothing of a session is left mounted.
    assert!(
        mounts_under(Path::new("/run/schroot/mount"))
            .iter()
            .all(|p| !p.to_string_lossy().contains(&name)),
        "a schroot session of {name} is still mounted"
    );
    // What the build user wrote belongs to the group and is group-writable,
    // so the next build user can update it (CCACHE_UMASK=002, setgid root).
    let mut checked = 0;
    for dir in fs::read_dir(&mp).unwrap().flatten() {
        if dir.file_name().len() != 1 || !dir.path().is_dir() {
            continue;
        }
        let md = dir.metadata().unwrap();
        assert_eq!(md.gid(), gid, "{:?} is not in the build group", dir.path());
        assert_eq!(
            md.mode() & 0o2070,
            0o2070,
            "{:?}: {:o}",
            dir.path(),
            md.mode()
        );
        assert_eq!(md.uid(), uid);
        checked += 1;
    }
    assert!(checked > 0, "no cache directory was written in {mp:?}");
    m.unmount();
}

fn uid_of(user: &str) -> u32 {
    let out = run(Command::new("id").args(["-u", user]), "id -u");
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

fn gid_of(group: &str) -> u32 {
    let out = run(
        Command::new("getent").args(["group", group]),
        "getent group",
    );
    String::from_utf8_lossy(&out.stdout)
        .split(':')
        .nth(2)
        .unwrap()
        .parse()
        .unwrap()
}
