//! Real-mount test of a full disk: with the store on a small tmpfs, a writer
//! that fills it gets ENOSPC, the daemon stays up and keeps serving what it
//! holds, and once space is freed it publishes again.

mod common;

use common::*;
use std::fs;
use std::io::Write;
use std::process::Command;

#[test]
fn full_store_gives_enospc_to_writer_keeps_serving_reads_and_recovers() {
    require_tools();
    let td = TestDir::new("fulldisk");
    let fsroot = td.dir("fs");
    let out = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=32m", "casfs-test-tmpfs"])
        .arg(&fsroot)
        .output()
        .expect("run mount -t tmpfs");
    assert!(
        out.status.success(),
        "mount tmpfs for the store: {}",
        output_text(&out)
    );
    let store = fsroot.join("store");
    let mp = td.mountpoint("mnt");
    let mut m = Mount::start(&store, &mp, &[]);

    let d = mp.join("a");
    fs::create_dir_all(mp.join("tmp")).unwrap();
    fs::create_dir_all(&d).unwrap();
    let kept = pattern(1, 4096);
    publish(&d, "x.tmp", "0000000000000000000000000000aR", &kept);

    // Fill the disk through a scratch file until the writer is refused.
    let big = mp.join("tmp/big");
    let mut f = fs::File::create(&big).unwrap();
    let chunk = pattern(2, 1 << 20);
    let mut refused = None;
    for _ in 0..64 {
        if let Err(e) = f.write_all(&chunk) {
            refused = Some(e);
            break;
        }
    }
    drop(f);
    let e = refused.expect("a 32 MiB store accepted 64 MiB");
    assert_eq!(
        e.raw_os_error(),
        Some(libc::ENOSPC),
        "the writer must see ENOSPC, got {e}"
    );

    // The daemon is still up and serves what it has.
    assert!(
        m.try_status().is_none(),
        "daemon died on a full disk:\n{}",
        m.log()
    );
    assert_eq!(
        fs::read(d.join("0000000000000000000000000000aR")).unwrap(),
        kept
    );
    assert!(
        m.counter("errors") >= 1,
        "a full disk is counted as an error"
    );

    // Space comes back: publishing works again. The kernel closes and
    // forgets the unlinked file asynchronously (RELEASE and FORGET carry no
    // reply), so wait until its blocks are free.
    fs::remove_file(&big).unwrap();
    let free_bytes = || {
        let c = std::ffi::CString::new(fsroot.as_os_str().as_encoded_bytes()).unwrap();
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: valid C string and out-pointer.
        assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut s) }, 0);
        s.f_bavail * s.f_frsize
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while free_bytes() < 16 << 20 {
        assert!(
            std::time::Instant::now() < deadline,
            "the unlinked 24 MiB file was not freed within 10 s:\n{}",
            m.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let fresh = pattern(3, 4096);
    publish(&d, "y.tmp", "0000000000000000000000000000bR", &fresh);
    assert_eq!(
        fs::read(d.join("0000000000000000000000000000bR")).unwrap(),
        fresh
    );
    m.unmount();
}
