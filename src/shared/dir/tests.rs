//! Tests of the directory engine on a real directory.

use super::*;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Barrier};

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// A fresh ROOT path (not created), removed at the end of the test.
struct TempRoot(PathBuf);

impl TempRoot {
    fn new() -> TempRoot {
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("casfs-shared-dir-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        TempRoot(p)
    }
    fn open(&self, namespace: &str) -> DirEngine {
        DirEngine::open(&self.0, &config(namespace, 0o022)).unwrap()
    }
    fn tmp_entries(&self) -> Vec<String> {
        fs::read_dir(self.0.join("tmp"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    }
}

impl Drop for TempRoot {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn config(namespace: &str, umask: u32) -> EngineConfig {
    EngineConfig {
        namespace: namespace.into(),
        timeout: Duration::from_secs(2),
        umask,
        password: None,
    }
}

fn record(n: u64) -> Record {
    Record {
        kind: RecordKind::File {
            blob: BlobId::of(&n.to_le_bytes()),
            size: n,
            mode: 0o644,
        },
        mtime_ns: 1_700_000_000_000_000_000 + n,
    }
}

fn mode_of(p: &Path) -> u32 {
    fs::symlink_metadata(p).unwrap().mode() & 0o7777
}

#[test]
fn create_only_race_between_eight_writers_keeps_exactly_one() {
    const ROUNDS: u64 = 30;
    let root = TempRoot::new();
    let _ = root.open("default");
    let path_of = |round: u64| format!("cc/a/e/c8aiq5frsd7ctaaepqbvl8shkb4kc{round}R").into_bytes();
    let barrier = Arc::new(Barrier::new(8));
    let threads: Vec<_> = (0..8u64)
        .map(|i| {
            // One engine per thread, like one per host; all start each round together.
            let engine = root.open("default");
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let mut outcomes = Vec::new();
                for round in 0..ROUNDS {
                    barrier.wait();
                    outcomes.push(
                        engine
                            .put_record(&path_of(round), &record(round * 100 + i), true)
                            .unwrap(),
                    );
                }
                outcomes
            })
        })
        .collect();
    let outcomes: Vec<Vec<Put>> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let engine = root.open("default");
    for round in 0..ROUNDS {
        let puts: Vec<&Put> = outcomes.iter().map(|o| &o[round as usize]).collect();
        let winners: Vec<u64> = (0..8)
            .filter(|&i| *puts[i as usize] == Put::Stored)
            .collect();
        assert_eq!(
            winners.len(),
            1,
            "round {round}: exactly one writer stores: {puts:?}"
        );
        let winner = record(round * 100 + winners[0]);
        for (i, put) in puts.iter().enumerate() {
            if i as u64 != winners[0] {
                assert_eq!(
                    **put,
                    Put::Exists(winner.clone()),
                    "round {round}: writer {i} sees the winner"
                );
            }
        }
        let path = path_of(round);
        assert_eq!(engine.get_record(&path).unwrap(), Some(winner.clone()));
        // The file itself holds the winner's encoding.
        assert_eq!(
            fs::read(engine.record_path(&path)).unwrap(),
            winner.encode()
        );
        // And a later create-only put still reports the winner.
        assert_eq!(
            engine.put_record(&path, &record(99), true).unwrap(),
            Put::Exists(winner)
        );
    }
    assert_eq!(
        root.tmp_entries(),
        Vec::<String>::new(),
        "no temp file is left behind"
    );
}

#[test]
fn link_onto_an_existing_name_reports_it_and_keeps_the_old_content() {
    let root = TempRoot::new();
    let engine = root.open("default");
    let dest = engine.record_path(b"cc/x");
    let first = engine.write_temp(b"first").unwrap();
    assert!(
        engine.link_into(&first, &dest).unwrap(),
        "a new name is ours"
    );
    let second = engine.write_temp(b"second").unwrap();
    assert!(
        !engine.link_into(&second, &dest).unwrap(),
        "an existing name is not"
    );
    assert_eq!(fs::read(&dest).unwrap(), b"first");
    drop((first, second));
    assert_eq!(root.tmp_entries(), Vec::<String>::new());
    assert_eq!(fs::read(&dest).unwrap(), b"first");
}

#[test]
fn replace_is_last_writer_wins_and_never_mixed() {
    let root = TempRoot::new();
    let engine = root.open("default");
    let path = b"stats";
    assert_eq!(
        engine.put_record(path, &record(1), true).unwrap(),
        Put::Stored
    );
    assert_eq!(
        engine.put_record(path, &record(2), false).unwrap(),
        Put::Stored
    );
    assert_eq!(engine.get_record(path).unwrap(), Some(record(2)));
    assert_eq!(
        engine.put_record(path, &record(3), false).unwrap(),
        Put::Stored
    );
    assert_eq!(engine.get_record(path).unwrap(), Some(record(3)));

    // Concurrent replacers and readers: readers only ever see whole records.
    let engine = Arc::new(engine);
    let writers: Vec<_> = (10..18u64)
        .map(|i| {
            let engine = engine.clone();
            std::thread::spawn(move || {
                for k in 0..20 {
                    engine
                        .put_record(path, &record(i * 100 + k), false)
                        .unwrap();
                }
            })
        })
        .collect();
    let reader = {
        let engine = engine.clone();
        std::thread::spawn(move || {
            for _ in 0..200 {
                let r = engine
                    .get_record(path)
                    .unwrap()
                    .expect("a replaced record is never missing");
                let RecordKind::File { size, .. } = r.kind else {
                    panic!("not a file record")
                };
                assert_eq!(r, record(size));
            }
        })
    };
    for w in writers {
        w.join().unwrap();
    }
    reader.join().unwrap();
    let last = engine.get_record(path).unwrap().unwrap();
    let RecordKind::File { size, .. } = last.kind else {
        panic!()
    };
    assert!(
        (1000..1820).contains(&size) && size % 100 == 19,
        "the last put of some writer: {size}"
    );
    assert_eq!(root.tmp_entries(), Vec::<String>::new());
}

#[test]
fn blobs_put_concurrently_are_harmless_and_read_back() {
    let root = TempRoot::new();
    let engine = Arc::new(root.open("default"));
    let bytes: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let id = BlobId::of(&bytes);
    assert!(!engine.has_blob(&id).unwrap());
    assert_eq!(engine.get_blob(&id, 1 << 20).unwrap(), None);
    let barrier = Arc::new(Barrier::new(8));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let (engine, barrier, bytes) = (engine.clone(), barrier.clone(), bytes.clone());
            std::thread::spawn(move || {
                barrier.wait();
                engine.put_blob(&id, &bytes).unwrap();
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert!(engine.has_blob(&id).unwrap());
    assert_eq!(engine.get_blob(&id, 1 << 20).unwrap(), Some(bytes.clone()));
    assert_eq!(
        fs::symlink_metadata(engine.blob_path(&id)).unwrap().nlink(),
        1
    );
    engine.put_blob(&id, &bytes).unwrap();
    assert_eq!(root.tmp_entries(), Vec::<String>::new());
    // Over max_bytes: refused, not truncated.
    match engine.get_blob(&id, 1000) {
        Err(TierError::Data(m)) => assert!(m.contains("200000 bytes"), "{m}"),
        other => panic!("expected a Data error, got {other:?}"),
    }
    // The empty blob is a blob.
    let empty = BlobId::of(b"");
    engine.put_blob(&empty, b"").unwrap();
    assert_eq!(engine.get_blob(&empty, 0).unwrap(), Some(vec![]));
}

#[test]
fn namespaces_do_not_see_each_others_records_but_share_blobs() {
    let root = TempRoot::new();
    let a = root.open("debian-13_gcc.14");
    let b = root.open("other");
    assert_eq!(
        a.put_record(b"cc/x", &record(1), true).unwrap(),
        Put::Stored
    );
    assert_eq!(b.get_record(b"cc/x").unwrap(), None);
    assert_eq!(
        b.put_record(b"cc/x", &record(2), true).unwrap(),
        Put::Stored
    );
    assert_eq!(a.get_record(b"cc/x").unwrap(), Some(record(1)));
    assert_eq!(b.get_record(b"cc/x").unwrap(), Some(record(2)));
    a.put_blob(&BlobId::of(b"shared"), b"shared").unwrap();
    assert!(b.has_blob(&BlobId::of(b"shared")).unwrap());
}

#[test]
fn odd_path_bytes_and_dir_records_round_trip() {
    let root = TempRoot::new();
    let engine = root.open("default");
    let long = vec![b'd'; 5000];
    let paths: [&[u8]; 4] = [b"", b"a/\0/b\n", &[0xff, 0xfe, b'/'], &long];
    for (i, p) in paths.iter().enumerate() {
        assert_eq!(
            engine.put_record(p, &record(i as u64), true).unwrap(),
            Put::Stored
        );
    }
    for (i, p) in paths.iter().enumerate() {
        assert_eq!(engine.get_record(p).unwrap(), Some(record(i as u64)));
    }
    let dir = Record {
        kind: RecordKind::Dir,
        mtime_ns: 7,
    };
    engine.put_record(b"cc/a", &dir, true).unwrap();
    assert_eq!(engine.get_record(b"cc/a").unwrap(), Some(dir));
}

#[test]
fn undecodable_record_is_a_data_error_and_a_create_only_put_replaces_it() {
    let root = TempRoot::new();
    let engine = root.open("default");
    let file = engine.record_path(b"cc/bad");
    fs::create_dir_all(file.parent().unwrap()).unwrap();
    fs::write(&file, b"casfs-record 9\nwhat\n").unwrap();
    match engine.get_record(b"cc/bad") {
        Err(TierError::Data(m)) => assert!(m.contains(&*file.to_string_lossy()), "{m}"),
        other => panic!("expected a Data error, got {other:?}"),
    }
    // A create-only put onto it replaces it, and it is counted.
    assert_eq!(
        engine.put_record(b"cc/bad", &record(1), true).unwrap(),
        Put::Stored
    );
    assert_eq!(engine.get_record(b"cc/bad").unwrap(), Some(record(1)));
    assert_eq!(engine.records_healed(), 1);
    // A replace of a version that is no longer there does nothing.
    assert!(!engine
        .replace_damaged(
            b"cc/bad",
            &Seen::Bytes(b"casfs-record 9\nwhat\n".to_vec()),
            &record(2)
        )
        .unwrap());
    assert_eq!(engine.get_record(b"cc/bad").unwrap(), Some(record(1)));
    assert_eq!(root.tmp_entries(), Vec::<String>::new());
}

#[test]
fn listings_name_every_level_and_imply_lost_directories() {
    let root = TempRoot::new();
    let engine = root.open("default");
    engine.put_record(b"cc/a/x%y R", &record(1), true).unwrap();
    let names = |p: &[u8]| {
        let mut v = engine.list(p, 100).unwrap();
        v.sort();
        v
    };
    assert_eq!(
        names(b""),
        vec![Listed {
            name: b"cc".to_vec(),
            dir: true
        }]
    );
    assert_eq!(
        names(b"cc/a"),
        vec![Listed {
            name: b"x%y R".to_vec(),
            dir: false
        }]
    );
    // No record for cc/a, but a listing: a directory.
    assert_eq!(
        engine.get_record(b"cc/a").unwrap(),
        Some(Record::implied_dir())
    );
    assert_eq!(engine.get_record(b"cc/b").unwrap(), None);
    assert_eq!(list_entry_name(&[b'a'; 300], false), None);
}

#[test]
fn root_without_marker_or_with_unknown_format_is_refused() {
    // Non-empty, no marker.
    let root = TempRoot::new();
    fs::create_dir_all(&root.0).unwrap();
    fs::write(root.0.join("somebody-elses-file"), b"x").unwrap();
    let err = DirEngine::open(&root.0, &config("default", 0o022))
        .err()
        .unwrap();
    assert!(
        err.contains("no casfs-shared marker") && err.contains("somebody-elses-file"),
        "{err}"
    );
    assert!(!root.0.join("ns").exists(), "nothing was written into it");

    // A newer format.
    let root = TempRoot::new();
    let _ = root.open("default");
    fs::write(root.0.join(MARKER_NAME), b"casfs shared format 2\n").unwrap();
    let err = DirEngine::open(&root.0, &config("default", 0o022))
        .err()
        .unwrap();
    assert!(
        err.contains("format \"2\"") && err.contains("knows only format 1"),
        "{err}"
    );

    // Not a marker at all.
    fs::write(root.0.join(MARKER_NAME), b"hello\n").unwrap();
    let err = DirEngine::open(&root.0, &config("default", 0o022))
        .err()
        .unwrap();
    assert!(err.contains("not a casfs marker"), "{err}");

    // Empty existing ROOT, and a ROOT holding only our layout, are adopted;
    // reopening an initialised one works.
    let root = TempRoot::new();
    fs::create_dir_all(root.0.join("tmp")).unwrap();
    let _ = root.open("default");
    assert_eq!(
        fs::read(root.0.join(MARKER_NAME)).unwrap(),
        b"casfs shared format 1\n"
    );
    let _ = root.open("default");
    assert!(DirEngine::open(Path::new("relative/dir"), &config("default", 0o022)).is_err());
}

#[test]
fn files_and_dirs_get_the_configured_umask_not_the_process_one() {
    for (umask, file_mode, dir_mode) in [(0o002, 0o664, 0o775), (0o022, 0o644, 0o755)] {
        let root = TempRoot::new();
        let engine = DirEngine::open(&root.0.join("sub"), &config("ns1", umask)).unwrap();
        engine.put_record(b"cc/r", &record(1), true).unwrap();
        engine.put_record(b"stats", &record(2), false).unwrap();
        engine.put_blob(&BlobId::of(b"blob"), b"blob").unwrap();
        let sub = root.0.join("sub");
        let dirs = [
            root.0.clone(),
            sub.clone(),
            sub.join("tmp"),
            sub.join("blobs"),
            sub.join("ns"),
            sub.join("ns/ns1"),
            sub.join("ns/ns1/records"),
            engine.record_path(b"cc/r").parent().unwrap().to_path_buf(),
            engine
                .blob_path(&BlobId::of(b"blob"))
                .parent()
                .unwrap()
                .to_path_buf(),
        ];
        for d in &dirs {
            assert_eq!(
                mode_of(d),
                dir_mode,
                "umask {umask:03o}: dir {}",
                d.display()
            );
        }
        let files = [
            sub.join(MARKER_NAME),
            engine.record_path(b"cc/r"),
            engine.record_path(b"stats"),
            engine.blob_path(&BlobId::of(b"blob")),
        ];
        for f in &files {
            assert_eq!(
                mode_of(f),
                file_mode,
                "umask {umask:03o}: file {}",
                f.display()
            );
        }
    }
}

#[test]
fn stale_temp_files_are_swept_at_open_and_fresh_ones_kept() {
    let root = TempRoot::new();
    let _ = root.open("default");
    let old = root.0.join("tmp/deadhost.1.0.tmp");
    let fresh = root.0.join("tmp/livehost.2.0.tmp");
    fs::write(&old, b"x").unwrap();
    fs::write(&fresh, b"y").unwrap();
    let two_days_ago = SystemTime::now() - Duration::from_secs(2 * 24 * 3600);
    File::options()
        .write(true)
        .open(&old)
        .unwrap()
        .set_modified(two_days_ago)
        .unwrap();
    let _ = root.open("default");
    assert!(!old.exists());
    assert!(fresh.exists());
}
