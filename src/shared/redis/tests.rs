//! Tests of the Redis engine against a real redis-server.

use super::*;
use crate::shared::RecordKind;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};

static SEQ: AtomicUsize = AtomicUsize::new(0);
const SERVER_START_WAIT: Duration = Duration::from_secs(5);

/// A real redis-server on a loopback port, killed when dropped (also
/// when the test panics).
struct RedisServer {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl RedisServer {
    fn start(extra: &[&str]) -> RedisServer {
        RedisServer::start_on(free_port(), extra)
    }

    fn start_on(port: u16, extra: &[&str]) -> RedisServer {
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("casfs-redis-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let spawned = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
                "--bind",
                "127.0.0.1",
            ])
            .args(["--dir", dir.to_str().unwrap()])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        if spawned.is_err() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        let child = match spawned {
            Ok(child) => child,
            Err(e) if e.kind() == io::ErrorKind::NotFound => panic!(
                "redis-server is not installed, and the Redis engine tests need a real one \
                 (apt-get install redis-server)"
            ),
            Err(e) => panic!("cannot start redis-server: {e}"),
        };
        let mut server = RedisServer { child, port, dir };
        server.wait_until_it_answers();
        server
    }

    fn wait_until_it_answers(&mut self) {
        let start = Instant::now();
        while start.elapsed() < SERVER_START_WAIT {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "redis-server on port {} exited at start: {status}",
                    self.port
                );
            }
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) {
                s.set_read_timeout(Some(Duration::from_millis(500)))
                    .unwrap();
                let mut answer = [0u8; 1];
                // +PONG, or -NOAUTH from a server with a password: up either way.
                if s.write_all(b"*1\r\n$4\r\nPING\r\n").is_ok()
                    && s.read_exact(&mut answer).is_ok()
                    && (answer[0] == b'+' || answer[0] == b'-')
                {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "redis-server on port {} did not answer PING within {SERVER_START_WAIT:?}",
            self.port
        );
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn config(namespace: &str, timeout: Duration) -> EngineConfig {
    EngineConfig {
        namespace: namespace.into(),
        timeout,
        umask: 0o002,
        password: None,
    }
}

fn open(url: &str) -> RedisEngine {
    RedisEngine::open(url, &config("default", Duration::from_secs(2))).unwrap()
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

fn url_parts(url: &str) -> (String, u16, u32, Option<Vec<u8>>, Option<Vec<u8>>) {
    let t = parse_url(url).unwrap();
    (t.host, t.port, t.db, t.user, t.password)
}

#[test]
fn urls_give_host_port_db_and_credentials() {
    assert_eq!(
        url_parts("redis://cache"),
        ("cache".into(), 6379, 0, None, None)
    );
    assert_eq!(
        url_parts("redis://10.0.0.5:7000"),
        ("10.0.0.5".into(), 7000, 0, None, None)
    );
    assert_eq!(
        url_parts("redis://10.0.0.5:7000/"),
        ("10.0.0.5".into(), 7000, 0, None, None)
    );
    assert_eq!(url_parts("redis://h:1/15"), ("h".into(), 1, 15, None, None));
    assert_eq!(
        url_parts("redis://:pw@h:6380/2"),
        ("h".into(), 6380, 2, None, Some(b"pw".to_vec()))
    );
    assert_eq!(
        url_parts("redis://casfs:pw@h"),
        (
            "h".into(),
            6379,
            0,
            Some(b"casfs".to_vec()),
            Some(b"pw".to_vec())
        )
    );
    // '@', ':' and '/' in a password, escaped or not.
    assert_eq!(
        url_parts("redis://:p%40ss%3Aw%2Frd@h:1/3").4,
        Some(b"p@ss:w/rd".to_vec())
    );
    assert_eq!(
        url_parts("redis://:p@ss:w/rd@h:1/3"),
        ("h".into(), 1, 3, None, Some(b"p@ss:w/rd".to_vec()))
    );
    assert_eq!(
        url_parts("redis://[::1]:6390/1"),
        ("::1".into(), 6390, 1, None, None)
    );
    assert_eq!(
        url_parts("redis://[::1]"),
        ("::1".into(), 6379, 0, None, None)
    );
    assert_eq!(
        parse_url("redis://:pw@h:6380/2").unwrap().describe(),
        "redis://h:6380/2"
    );
    assert_eq!(
        parse_url("redis://[::1]").unwrap().describe(),
        "redis://[::1]:6379/0"
    );
    for bad in [
        "http://h",
        "redis://",
        "redis://:7000",
        "redis://h:0",
        "redis://h:70000",
        "redis://h:port",
        "redis://h/db",
        "redis://::1:6379",
        "redis://[::1",
        "redis://:%zz@h",
        "redis://:%+f@h",
        "redis://:%4@h",
    ] {
        let err = parse_url(bad)
            .err()
            .unwrap_or_else(|| panic!("{bad} was accepted"));
        assert!(!err.contains("secret"), "errors never quote the URL: {err}");
    }
    assert!(!format!("{:?}", parse_url("redis://:topsecret@h").unwrap()).contains("topsecret"));
    // A user alone wants its password from a password file.
    for url in ["redis://secret@127.0.0.1:1", "redis://secret:@127.0.0.1:1"] {
        let err = RedisEngine::open(url, &config("t", Duration::from_millis(50)))
            .err()
            .unwrap_or_else(|| panic!("{url} was accepted with no password"));
        assert!(
            err.contains("no password") && !err.contains("secret"),
            "{err}"
        );
    }
    let mut with_file = config("t", Duration::from_millis(50));
    with_file.password = Some(b"pw".to_vec());
    assert!(RedisEngine::open("redis://:pw@127.0.0.1:1", &with_file).is_err());
}

#[test]
fn resp_replies_parse_within_bounds() {
    let parse = |bytes: &[u8], limit: u64| read_reply(&mut io::Cursor::new(bytes.to_vec()), limit);
    assert_eq!(parse(b"+OK\r\n", 100).unwrap(), Reply::Status("OK".into()));
    assert_eq!(
        parse(b"-ERR no\r\n", 100).unwrap(),
        Reply::Error("ERR no".into())
    );
    assert_eq!(parse(b":-42\r\n", 100).unwrap(), Reply::Int(-42));
    assert_eq!(parse(b"$-1\r\n", 100).unwrap(), Reply::Bulk(None));
    assert_eq!(
        parse(b"$0\r\n\r\n", 100).unwrap(),
        Reply::Bulk(Some(vec![]))
    );
    assert_eq!(
        parse(b"$4\r\na\r\nb\r\n", 100).unwrap(),
        Reply::Bulk(Some(b"a\r\nb".to_vec()))
    );
    assert_eq!(
        parse(b"*3\r\n:1\r\n$-1\r\n*1\r\n+x\r\n", 100).unwrap(),
        Reply::Array(Some(vec![
            Reply::Int(1),
            Reply::Bulk(None),
            Reply::Array(Some(vec![Reply::Status("x".into())]))
        ]))
    );
    assert_eq!(parse(b"*-1\r\n", 100).unwrap(), Reply::Array(None));
    let kind = |bytes: &[u8], limit: u64| parse(bytes, limit).unwrap_err().kind();
    // Over the bound: refused before the value is read (a damaged
    // value, not a broken stream).
    assert_eq!(kind(b"$1000000000\r\n", 1000), io::ErrorKind::FileTooLarge);
    assert_eq!(kind(b"*2\r\n$400\r\n", 500), io::ErrorKind::UnexpectedEof);
    assert_eq!(kind(b"*9999999\r\n", u64::MAX), io::ErrorKind::InvalidData);
    assert_eq!(
        kind(b"*1\r\n*1\r\n*1\r\n:1\r\n", 100),
        io::ErrorKind::InvalidData
    );
    assert_eq!(kind(b"$-2\r\n", 100), io::ErrorKind::InvalidData);
    assert_eq!(kind(b"?huh\r\n", 100), io::ErrorKind::InvalidData);
    assert_eq!(kind(b":12x\r\n", 100), io::ErrorKind::InvalidData);
    assert_eq!(kind(b"+OK\n", 100), io::ErrorKind::InvalidData);
    assert_eq!(kind(b"$3\r\nabcXY", 100), io::ErrorKind::InvalidData);
    assert_eq!(kind(b"$3\r\nab", 100), io::ErrorKind::UnexpectedEof);
    assert_eq!(kind(b"+O", 100), io::ErrorKind::UnexpectedEof);
    assert_eq!(kind(b"", 100), io::ErrorKind::UnexpectedEof);
    let long = [
        b"+".as_slice(),
        &vec![b'x'; REDIS_LINE_BYTES_MAX + 10],
        b"\r\n",
    ]
    .concat();
    assert_eq!(kind(&long, u64::MAX), io::ErrorKind::InvalidData);
}

#[test]
fn create_only_race_between_eight_writers_keeps_exactly_one() {
    let server = RedisServer::start(&[]);
    let path: &[u8] = b"cc/a/e/c8aiq5frsd7ctaaepqbvl8shkb4kcjcR";
    let barrier = Arc::new(Barrier::new(8));
    let threads: Vec<_> = (0..8u64)
        .map(|i| {
            let engine = open(&server.url()); // one per thread, like one per host
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                (i, engine.put_record(path, &record(i), true).unwrap())
            })
        })
        .collect();
    let outcomes: Vec<(u64, Put)> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let winners: Vec<u64> = outcomes
        .iter()
        .filter(|(_, p)| *p == Put::Stored)
        .map(|(i, _)| *i)
        .collect();
    assert_eq!(winners.len(), 1, "exactly one writer stores: {outcomes:?}");
    let winner = record(winners[0]);
    for (i, put) in &outcomes {
        if *i != winners[0] {
            assert_eq!(
                *put,
                Put::Exists(winner.clone()),
                "writer {i} sees the winner"
            );
        }
    }
    let engine = open(&server.url());
    assert_eq!(engine.get_record(path).unwrap(), Some(winner.clone()));
    assert_eq!(
        engine.put_record(path, &record(99), true).unwrap(),
        Put::Exists(winner)
    );
}

#[test]
fn replace_is_last_writer_wins() {
    let server = RedisServer::start(&[]);
    let engine = open(&server.url());
    assert_eq!(engine.get_record(b"stats").unwrap(), None);
    assert_eq!(
        engine.put_record(b"stats", &record(1), true).unwrap(),
        Put::Stored
    );
    assert_eq!(
        engine.put_record(b"stats", &record(2), false).unwrap(),
        Put::Stored
    );
    assert_eq!(engine.get_record(b"stats").unwrap(), Some(record(2)));
    assert_eq!(
        engine.put_record(b"stats", &record(3), false).unwrap(),
        Put::Stored
    );
    assert_eq!(engine.get_record(b"stats").unwrap(), Some(record(3)));
    assert_eq!(
        engine.put_record(b"new", &record(4), false).unwrap(),
        Put::Stored
    );
    assert_eq!(engine.get_record(b"new").unwrap(), Some(record(4)));
}

#[test]
fn blobs_round_trip_concurrently_and_are_bounded_on_read() {
    let server = RedisServer::start(&[]);
    let engine = Arc::new(open(&server.url()));
    for size in [0usize, 10, REDIS_INLINE_ARG_BYTES_MAX + 1, 300_000] {
        let bytes: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
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
        assert_eq!(
            engine.get_blob(&id, 1 << 20).unwrap(),
            Some(bytes.clone()),
            "{size} bytes"
        );
        assert_eq!(
            engine.get_blob(&id, size as u64).unwrap().map(|b| b.len()),
            Some(size)
        );
        engine.put_blob(&id, &bytes).unwrap();
    }
    let big: Vec<u8> = vec![7; 300_000];
    let id = BlobId::of(&big);
    engine.put_blob(&id, &big).unwrap();
    match engine.get_blob(&id, 1000) {
        Err(TierError::Data(m)) => {
            assert!(
                m.contains("300000 bytes, over the 1000 allowed") && m.contains(&id.hex()),
                "{m}"
            )
        }
        other => panic!("a blob over max_bytes must be refused, got {other:?}"),
    }
    assert_eq!(
        engine.get_blob(&id, 1 << 20).unwrap().map(|b| b.len()),
        Some(300_000),
        "works after a refusal"
    );
    assert!(engine.pool().len() <= REDIS_POOL_CONNECTIONS_MAX);
}

#[test]
fn namespaces_are_apart_and_paths_are_binary_safe() {
    let server = RedisServer::start(&[]);
    let a = RedisEngine::open(&server.url(), &config("a", Duration::from_secs(2))).unwrap();
    let b = RedisEngine::open(&server.url(), &config("b", Duration::from_secs(2))).unwrap();
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
    a.put_blob(&BlobId::of(b"both"), b"both").unwrap();
    assert!(b.has_blob(&BlobId::of(b"both")).unwrap());

    let long = vec![b'd'; 5000];
    let paths: [&[u8]; 6] = [
        b"",
        b"a",
        b"a\0",
        b"\r\n*1\r\n$4\r\nPING\r\n",
        &[0xff, 0xfe, 0],
        &long,
    ];
    for (i, p) in paths.iter().enumerate() {
        assert_eq!(
            a.put_record(p, &record(10 + i as u64), true).unwrap(),
            Put::Stored,
            "path {i}"
        );
    }
    for (i, p) in paths.iter().enumerate() {
        assert_eq!(
            a.get_record(p).unwrap(),
            Some(record(10 + i as u64)),
            "path {i}"
        );
    }
}

#[test]
fn password_and_database_from_the_url_are_used() {
    let server = RedisServer::start(&["--requirepass", "p@ss:w/rd"]);
    let port = server.port;
    let escaped = format!("redis://:p%40ss%3Aw%2Frd@127.0.0.1:{port}/2");
    let engine = open(&escaped);
    assert_eq!(engine.describe(), format!("redis://127.0.0.1:{port}/2"));
    assert_eq!(
        engine.put_record(b"cc/x", &record(1), true).unwrap(),
        Put::Stored
    );
    // The same password unescaped, on database 0: a different keyspace.
    let db0 = open(&format!("redis://:p@ss:w/rd@127.0.0.1:{port}"));
    assert_eq!(db0.get_record(b"cc/x").unwrap(), None);
    let db2 = open(&format!("redis://:p@ss:w/rd@127.0.0.1:{port}/2"));
    assert_eq!(db2.get_record(b"cc/x").unwrap(), Some(record(1)));

    let timeout = Duration::from_secs(2);
    let wrong = RedisEngine::open(
        &format!("redis://:nope@127.0.0.1:{port}"),
        &config("default", timeout),
    );
    let err = wrong.err().expect("a wrong password fails at open");
    assert!(
        err.contains("AUTH refused") && !err.contains("nope"),
        "{err}"
    );
    let none = RedisEngine::open(
        &format!("redis://127.0.0.1:{port}"),
        &config("default", timeout),
    );
    assert!(none
        .err()
        .expect("no password fails at open")
        .contains("wants a password"));
    let bad_db = RedisEngine::open(
        &format!("redis://:p@ss:w/rd@127.0.0.1:{port}/99"),
        &config("default", timeout),
    );
    assert!(bad_db
        .err()
        .expect("a database out of range fails at open")
        .contains("SELECT 99 refused"));
}

#[test]
fn dead_server_is_unavailable_quickly() {
    let port = free_port(); // nothing listens there
    let engine = RedisEngine::open(
        &format!("redis://127.0.0.1:{port}"),
        &config("default", Duration::from_secs(3)),
    )
    .expect("an unreachable server is not an error at open");
    let start = Instant::now();
    match engine.get_record(b"cc/x") {
        Err(TierError::Unavailable(m)) => assert!(m.contains("connect"), "{m}"),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert!(matches!(
        engine.put_blob(&BlobId::of(b"x"), b"x"),
        Err(TierError::Unavailable(_))
    ));
    assert!(
        start.elapsed() < Duration::from_millis(500),
        "refused at once, not after the timeout"
    );
}

#[test]
fn silent_server_times_out_within_the_timeout() {
    // Accepts connections (the kernel does, from the backlog) and never answers.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let timeout = Duration::from_millis(300);
    let engine = RedisEngine::open(
        &format!("redis://127.0.0.1:{port}"),
        &config("default", timeout),
    )
    .unwrap();
    let start = Instant::now();
    assert!(matches!(
        engine.get_record(b"cc/x"),
        Err(TierError::Timeout)
    ));
    let took = start.elapsed();
    assert!(took >= timeout && took < timeout * 3, "took {took:?}");
    drop(listener);
}

#[test]
fn stalled_server_times_out_then_is_used_again() {
    let server = RedisServer::start(&["--enable-debug-command", "yes"]);
    let timeout = Duration::from_millis(300);
    let engine = RedisEngine::open(&server.url(), &config("default", timeout)).unwrap();
    assert_eq!(
        engine.put_record(b"cc/x", &record(1), true).unwrap(),
        Put::Stored
    );
    // Another client puts the whole server to sleep for a second.
    let mut sleeper = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    sleeper
        .write_all(b"*3\r\n$5\r\nDEBUG\r\n$5\r\nSLEEP\r\n$1\r\n1\r\n")
        .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let start = Instant::now();
    assert!(matches!(
        engine.get_record(b"cc/x"),
        Err(TierError::Timeout)
    ));
    let took = start.elapsed();
    assert!(took >= timeout && took < timeout * 3, "took {took:?}");
    // Once it wakes up, the engine works again (on a fresh connection).
    sleeper
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut ok = [0u8; 5];
    sleeper.read_exact(&mut ok).unwrap();
    assert_eq!(&ok, b"+OK\r\n");
    assert_eq!(engine.get_record(b"cc/x").unwrap(), Some(record(1)));
}

#[test]
fn server_restart_on_the_same_port_is_used_again() {
    let server = RedisServer::start(&[]);
    let port = server.port;
    let engine = open(&server.url());
    assert_eq!(
        engine.put_record(b"cc/x", &record(1), true).unwrap(),
        Put::Stored
    );
    drop(server);
    assert!(
        matches!(engine.get_record(b"cc/x"), Err(TierError::Unavailable(_))),
        "down while it is down"
    );
    let server = RedisServer::start_on(port, &[]);
    // Nothing persisted (--save ''): the restarted server is empty.
    assert_eq!(engine.get_record(b"cc/x").unwrap(), None);
    assert_eq!(
        engine.put_record(b"cc/x", &record(2), true).unwrap(),
        Put::Stored
    );
    // Restarted again with pooled connections still open to the old one:
    // the very first call after the restart succeeds.
    drop(server);
    let _server = RedisServer::start_on(port, &[]);
    assert_eq!(
        engine.put_record(b"cc/x", &record(3), true).unwrap(),
        Put::Stored
    );
    assert_eq!(engine.get_record(b"cc/x").unwrap(), Some(record(3)));
}
