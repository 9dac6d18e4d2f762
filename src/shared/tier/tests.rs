//! Tests of the tier with an engine and an outbox in memory.

use super::*;
use crate::shared::RecordKind;
use std::collections::BTreeMap;

type Records = Arc<Mutex<HashMap<Vec<u8>, Record>>>;

/// An engine in memory that holds every blob already.
#[derive(Default)]
struct MemEngine {
    records: Records,
    puts: Arc<AtomicU64>,
}

impl Engine for MemEngine {
    fn get_record(&self, path: &[u8]) -> TierResult<Option<Record>> {
        Ok(self.records.lock().unwrap().get(path).cloned())
    }
    fn put_record(&self, path: &[u8], record: &Record, create_only: bool) -> TierResult<Put> {
        self.puts.fetch_add(1, Ordering::Relaxed);
        let mut r = self.records.lock().unwrap();
        if create_only {
            if let Some(old) = r.get(path) {
                return Ok(Put::Exists(old.clone()));
            }
        }
        r.insert(path.to_vec(), record.clone());
        Ok(Put::Stored)
    }
    fn has_blob(&self, _: &BlobId) -> TierResult<bool> {
        Ok(true)
    }
    fn get_blob(&self, _: &BlobId, _: u64) -> TierResult<Option<Vec<u8>>> {
        Ok(None)
    }
    fn put_blob(&self, _: &BlobId, _: &[u8]) -> TierResult<()> {
        Ok(())
    }
    fn repair_blob(&self, _: &BlobId, _: &[u8]) -> TierResult<()> {
        Ok(())
    }
    fn describe(&self) -> String {
        "memory".into()
    }
    fn replace_damaged(&self, _: &[u8], _: &crate::shared::Seen, _: &Record) -> TierResult<bool> {
        Ok(false)
    }
    fn list(&self, _: &[u8], _: usize) -> TierResult<Vec<crate::shared::Listed>> {
        Ok(vec![])
    }
    fn records_healed(&self) -> u64 {
        0
    }
    fn scan_records(
        &self,
        _: &str,
        _: &[u8],
        _: usize,
    ) -> TierResult<crate::shared::Page<crate::shared::Scanned>> {
        Ok(crate::shared::Page {
            items: vec![],
            next: None,
        })
    }
    fn delete_record(&self, _: &[u8], _: &crate::shared::Seen) -> TierResult<bool> {
        Ok(false)
    }
    fn scan_blobs(
        &self,
        _: &[u8],
        _: usize,
    ) -> TierResult<crate::shared::Page<crate::shared::StoredBlob>> {
        Ok(crate::shared::Page {
            items: vec![],
            next: None,
        })
    }
    fn delete_blob(&self, _: &BlobId, _: u64) -> TierResult<bool> {
        Ok(false)
    }
    fn note_used(&self, _: &[Vec<u8>], _: u64) -> TierResult<()> {
        Ok(())
    }
    fn lease(&self, _: &str, _: &str, _: u64, _: u64) -> TierResult<crate::shared::Lease> {
        Ok(crate::shared::Lease::Held { until_s: 0 })
    }
    fn release_lease(&self, _: &str, _: &str) -> TierResult<()> {
        Ok(())
    }
    fn namespaces(&self) -> TierResult<Vec<String>> {
        Ok(vec![])
    }
}

/// A durable queue in memory; `current` is the blob each local name holds.
#[derive(Default)]
struct MemOutbox {
    pending: Mutex<BTreeMap<u64, (Vec<u8>, BlobId)>>,
    current: Mutex<HashMap<Vec<u8>, BlobId>>,
    clock: AtomicU64,
}

impl MemOutbox {
    fn publish(&self, path: &[u8], blob: BlobId) {
        let seq = self.clock.fetch_add(1, Ordering::Relaxed) + 1;
        self.pending
            .lock()
            .unwrap()
            .insert(seq, (path.to_vec(), blob));
        self.current.lock().unwrap().insert(path.to_vec(), blob);
    }
}

impl Outbox for MemOutbox {
    fn pending(&self, limit: usize) -> Vec<Upload> {
        self.pending
            .lock()
            .unwrap()
            .iter()
            .take(limit)
            .map(|(seq, (path, blob))| Upload {
                seq: *seq,
                path: path.clone(),
                record: Record {
                    kind: RecordKind::File {
                        blob: *blob,
                        size: 1,
                        mode: 0o644,
                    },
                    mtime_ns: *seq,
                },
                create_only: false,
                blob_file: "/nonexistent".into(),
                blob: *blob,
            })
            .collect()
    }
    fn oldest_seq(&self) -> Result<Option<u64>, String> {
        Ok(self.pending.lock().unwrap().keys().next().copied())
    }
    fn count(&self) -> u64 {
        self.pending.lock().unwrap().len() as u64
    }
    fn local(&self, up: &Upload) -> Local {
        if !self.pending.lock().unwrap().contains_key(&up.seq) {
            return Local::Settled;
        }
        match self.current.lock().unwrap().get(&up.path) {
            Some(b) if *b == up.blob => Local::Current,
            Some(_) => Local::Replaced,
            None => Local::Gone,
        }
    }
    fn remove(&self, up: &Upload) {
        self.pending.lock().unwrap().remove(&up.seq);
    }
    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// Starts a tier on a `MemEngine`; returns its records and put count.
fn start(outbox: &Arc<MemOutbox>) -> (Arc<Tier>, Records, Arc<AtomicU64>) {
    let engine = MemEngine::default();
    let (records, puts) = (engine.records.clone(), engine.puts.clone());
    let weak: Weak<dyn Outbox> = Arc::downgrade(outbox) as Weak<dyn Outbox>;
    let tier = Tier::start(
        Box::new(engine),
        TierConfig::new(Duration::from_secs(5)),
        Arc::new(|_: &[u8], _| {}),
        weak,
    );
    (tier, records, puts)
}

#[test]
fn more_pending_uploads_than_the_queue_holds_are_all_delivered() {
    let outbox = Arc::new(MemOutbox::default());
    let n = UPLOAD_QUEUE_LEN_MAX + 500;
    for i in 0..n {
        outbox.publish(format!("d/x{i}").as_bytes(), BlobId::of(&i.to_le_bytes()));
    }
    let (tier, records, _) = start(&outbox);
    assert_eq!(tier.pending(), n as u64);
    assert!(tier.queue_len() <= UPLOAD_QUEUE_LEN_MAX as u64);
    assert_eq!(tier.sync(Duration::from_secs(120)), Ok(n as u64));
    assert_eq!(tier.pending(), 0);
    // n file records and one directory record.
    assert_eq!(records.lock().unwrap().len(), n + 1);
}

#[test]
fn a_superseded_upload_is_never_delivered_after_the_newer_one() {
    let outbox = Arc::new(MemOutbox::default());
    let blobs: Vec<BlobId> = (0..3u8).map(|i| BlobId::of(&[i])).collect();
    for b in &blobs {
        outbox.publish(b"d/manifest", *b);
    }
    let (tier, records, puts) = start(&outbox);
    assert!(tier.sync(Duration::from_secs(60)).is_ok());
    let r = records.lock().unwrap()[&b"d/manifest"[..]].clone();
    assert_eq!(
        r.kind,
        RecordKind::File {
            blob: blobs[2],
            size: 1,
            mode: 0o644
        }
    );
    assert_eq!(tier.stats.uploads_superseded.load(Ordering::Relaxed), 2);
    assert_eq!(
        puts.load(Ordering::Relaxed),
        2,
        "the directory, then the newest only"
    );
}
