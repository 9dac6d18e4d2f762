//! Real-mount tests of the kernel-cache invalidation that long entry and
//! attribute timeouts rely on: a name published after a negative lookup is
//! visible at once, a replaced entry is never served stale (name, size or
//! pages), and a result that lost a create-only race is read as the winner.

mod common;

use common::*;
use std::fs;
use std::io::Write;

#[test]
fn name_published_at_close_after_a_negative_lookup_is_visible_at_once() {
    require_tools();
    let td = TestDir::new("inval-neg");
    let mp = td.mountpoint("mnt");
    let m = Mount::start(&td.store(), &mp, &[]);
    let d = mp.join("a/b");
    fs::create_dir_all(&d).unwrap();
    let name = d.join("0123456789abcdefghijklmnopqrR");
    for round in 0..20u64 {
        let name = d.join(format!("{round:02}3456789abcdefghijklmnopqrR"));
        assert_eq!(
            errno_of(fs::metadata(&name), "stat before publication"),
            libc::ENOENT
        );
        let body = pattern(round, 3000 + round as usize);
        let mut f = fs::File::create(&name).unwrap();
        f.write_all(&body).unwrap();
        // Not yet closed: invisible to a new lookup.
        assert_eq!(
            errno_of(fs::metadata(&name), "stat before close"),
            libc::ENOENT
        );
        drop(f);
        let meta = fs::metadata(&name).expect("visible right after close");
        assert_eq!(meta.len(), body.len() as u64);
        assert_eq!(fs::read(&name).unwrap(), body);
    }
    let _ = name;
    drop(m);
}

#[test]
fn replaced_manifest_is_never_served_stale() {
    require_tools();
    let td = TestDir::new("inval-repl");
    let mp = td.mountpoint("mnt");
    let m = Mount::start(&td.store(), &mp, &[]);
    let d = mp.join("4/d");
    fs::create_dir_all(&d).unwrap();
    let name = "7akuu12pqg5l3n8scba4tpo4qcidrbgM";
    for round in 0..30u64 {
        // Sizes go up and down, so a stale size or stale pages would show.
        let body = pattern(
            round,
            if round % 2 == 0 {
                9000
            } else {
                4000 + round as usize
            },
        );
        publish(&d, "m.tmp", name, &body);
        assert_eq!(
            fs::read(d.join(name)).unwrap(),
            body,
            "round {round}: replaced manifest read stale"
        );
        assert_eq!(fs::metadata(d.join(name)).unwrap().len(), body.len() as u64);
    }
    drop(m);
}

#[test]
fn loser_of_a_create_only_race_reads_as_the_winner() {
    require_tools();
    let td = TestDir::new("inval-loser");
    let mp = td.mountpoint("mnt");
    let m = Mount::start(&td.store(), &mp, &[]);
    let d = mp.join("x/y");
    fs::create_dir_all(&d).unwrap();
    let name = "abcdefghijklmnopqrstuvwxyzabcdR";
    let first = pattern(1, 2000);
    publish(&d, "1.tmp", name, &first);
    for round in 2..30u64 {
        // The loser is larger than the winner and its pages were cached
        // while it was written: neither may leak through the name.
        publish(&d, "n.tmp", name, &pattern(round, 8000));
        assert_eq!(fs::read(d.join(name)).unwrap(), first, "round {round}");
        assert_eq!(
            fs::metadata(d.join(name)).unwrap().len(),
            first.len() as u64
        );
    }
    assert!(m.counter("conflicts") >= 28);
    drop(m);
}

#[test]
fn writes_after_closing_a_duplicate_descriptor_are_kept() {
    use std::os::fd::AsRawFd;
    require_tools();
    let td = TestDir::new("dupwrite");
    let mp = td.mountpoint("mnt");
    let _m = Mount::start(&td.store(), &mp, &[]);
    // A shell redirection: open, dup2 onto stdout, close the original.
    let out = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!(
            "echo hello > {}/plain; echo more >> {}/plain",
            mp.display(),
            mp.display()
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "bash redirection: {}",
        output_text(&out)
    );
    assert_eq!(fs::read(mp.join("plain")).unwrap(), b"hello\nmore\n");
    // The same with a manifest name, through explicit dup/close/write.
    let d = mp.join("m");
    fs::create_dir_all(&d).unwrap();
    let path = d.join("7akuu12pqg5l3n8scba4tpo4qcidrbgM");
    let f = fs::File::create(&path).unwrap();
    let dup = unsafe { libc::dup(f.as_raw_fd()) };
    assert!(dup >= 0);
    assert_eq!(unsafe { libc::close(dup) }, 0);
    let mut f = f;
    f.write_all(b"after the first close").unwrap();
    drop(f);
    assert_eq!(fs::read(&path).unwrap(), b"after the first close");
}
