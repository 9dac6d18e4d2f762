//! An in-memory engine for tests of the library: hosts in one process
//! share one `MemEngine` (it is a handle; clones share the same store).
//! It keeps the same invariants as the real engines (see `mod.rs`) and
//! adds what tests need: faults injected from a seed (so a failing run
//! replays), and hooks that damage what it holds the way an operator, an
//! eviction policy or a disk would (`damage_*`, `drop_*`).
//!
//! Not offered by the command line: a process-local engine shares nothing
//! between hosts.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::{
    listing_chain, Engine, Listed, Put, Record, RecordKind, Seen, TierError, TierResult,
    RECORD_BYTES_MAX,
};
use crate::store::ids::BlobId;

/// What a record key holds.
#[derive(Clone, Debug)]
enum Value {
    Bytes(Vec<u8>),
    /// Something that is not a record (a Redis set, a directory).
    Other,
}

#[derive(Default)]
struct State {
    records: HashMap<Vec<u8>, Value>,
    listings: HashMap<Vec<u8>, BTreeSet<Listed>>,
    blobs: HashMap<BlobId, Vec<u8>>,
    /// xorshift64 state; 0 = no faults.
    rng: u64,
    fail_percent: u64,
}

/// A handle on one in-memory store; a clone is another host's handle on
/// the same store (its own heal counter, like a real engine's).
#[derive(Default)]
pub struct MemEngine {
    state: Arc<Mutex<State>>,
    healed: AtomicU64,
    calls: Arc<AtomicU64>,
}

impl Clone for MemEngine {
    fn clone(&self) -> MemEngine {
        MemEngine {
            state: self.state.clone(),
            healed: AtomicU64::new(0),
            calls: self.calls.clone(),
        }
    }
}

impl MemEngine {
    pub fn new() -> MemEngine {
        MemEngine::default()
    }

    /// From now on, `fail_percent` % of calls fail (timeout or
    /// unavailable), chosen by a generator seeded with `seed`.
    pub fn inject_faults(&self, seed: u64, fail_percent: u64) {
        let mut s = self.lock();
        s.rng = seed | 1;
        s.fail_percent = fail_percent.min(100);
    }

    /// Engine calls made so far (to check what a path costs).
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    /// Puts `bytes` under `path` as they are (a damaged record).
    pub fn damage_record(&self, path: &[u8], bytes: &[u8]) {
        self.lock()
            .records
            .insert(path.to_vec(), Value::Bytes(bytes.to_vec()));
    }

    /// Makes `path` hold something that is not a record.
    pub fn damage_record_type(&self, path: &[u8]) {
        self.lock().records.insert(path.to_vec(), Value::Other);
    }

    pub fn drop_record(&self, path: &[u8]) {
        self.lock().records.remove(path);
    }

    /// Drops every directory record (an eviction policy that picked them).
    pub fn drop_dir_records(&self) {
        self.lock().records.retain(|_, v| match v {
            Value::Bytes(b) => !matches!(
                Record::decode(b),
                Ok(Record {
                    kind: RecordKind::Dir,
                    ..
                })
            ),
            Value::Other => true,
        });
    }

    pub fn drop_listings(&self) {
        self.lock().listings.clear();
    }

    pub fn drop_blob(&self, id: &BlobId) {
        self.lock().blobs.remove(id);
    }

    /// Flips a byte of a stored blob.
    pub fn damage_blob(&self, id: &BlobId) {
        if let Some(b) = self.lock().blobs.get_mut(id) {
            match b.first_mut() {
                Some(c) => *c ^= 0x55,
                None => b.push(0),
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts the call and decides whether it fails.
    fn enter(&self) -> TierResult<std::sync::MutexGuard<'_, State>> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let mut s = self.lock();
        if s.rng != 0 {
            let mut x = s.rng;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            s.rng = x;
            if x % 100 < s.fail_percent {
                return Err(if x & 0x100 == 0 {
                    TierError::Timeout
                } else {
                    TierError::Unavailable("mem: injected fault".into())
                });
            }
        }
        Ok(s)
    }

    fn read(s: &State, path: &[u8]) -> TierResult<Option<Record>> {
        let what = format!("mem record {:?}", path.escape_ascii().to_string());
        match s.records.get(path) {
            Some(Value::Bytes(b)) => Record::decode_or_data(b, &what).map(Some),
            Some(Value::Other) => Err(TierError::Data(format!("{what}: not a record"))),
            None if s.listings.get(path).is_some_and(|l| !l.is_empty()) => {
                Ok(Some(Record::implied_dir()))
            }
            None => Ok(None),
        }
    }

    fn list_chain(s: &mut State, path: &[u8], is_dir: bool) {
        for (parent, name, dir) in listing_chain(path, is_dir) {
            s.listings
                .entry(parent.to_vec())
                .or_default()
                .insert(Listed {
                    name: name.to_vec(),
                    dir,
                });
        }
    }

    fn matches(v: Option<&Value>, seen: &Seen) -> bool {
        match (v, seen) {
            (Some(Value::Bytes(b)), Seen::Bytes(s)) => b == s,
            (Some(Value::Bytes(b)), Seen::Oversize) => b.len() as u64 > RECORD_BYTES_MAX,
            (Some(Value::Other), Seen::WrongType) => true,
            _ => false,
        }
    }
}

impl Engine for MemEngine {
    fn get_record(&self, path: &[u8]) -> TierResult<Option<Record>> {
        let s = self.enter()?;
        MemEngine::read(&s, path)
    }

    fn put_record(&self, path: &[u8], record: &Record, create_only: bool) -> TierResult<Put> {
        let mut s = self.enter()?;
        let is_dir = record.kind == RecordKind::Dir;
        MemEngine::list_chain(&mut s, path, is_dir);
        if create_only {
            match s.records.get(path) {
                Some(Value::Bytes(b)) => {
                    if let Ok(existing) = Record::decode(b) {
                        return Ok(Put::Exists(existing));
                    }
                    // Unreadable: replaced below, and counted.
                    self.healed.fetch_add(1, Ordering::Relaxed);
                }
                Some(Value::Other) => {
                    self.healed.fetch_add(1, Ordering::Relaxed);
                }
                None => {}
            }
        }
        s.records
            .insert(path.to_vec(), Value::Bytes(record.encode()));
        Ok(Put::Stored)
    }

    fn has_blob(&self, id: &BlobId) -> TierResult<bool> {
        Ok(self.enter()?.blobs.contains_key(id))
    }

    fn get_blob(&self, id: &BlobId, max_bytes: u64) -> TierResult<Option<Vec<u8>>> {
        let s = self.enter()?;
        match s.blobs.get(id) {
            Some(b) if b.len() as u64 > max_bytes => Err(TierError::Data(format!(
                "mem blob {id}: {} bytes, over the {max_bytes} allowed",
                b.len()
            ))),
            other => Ok(other.cloned()),
        }
    }

    fn put_blob(&self, id: &BlobId, bytes: &[u8]) -> TierResult<()> {
        let mut s = self.enter()?;
        s.blobs.entry(*id).or_insert_with(|| bytes.to_vec());
        Ok(())
    }

    fn repair_blob(&self, id: &BlobId, bytes: &[u8]) -> TierResult<()> {
        self.enter()?.blobs.insert(*id, bytes.to_vec());
        Ok(())
    }

    fn describe(&self) -> String {
        "mem://".into()
    }

    fn replace_damaged(&self, path: &[u8], seen: &Seen, record: &Record) -> TierResult<bool> {
        let mut s = self.enter()?;
        if !MemEngine::matches(s.records.get(path), seen) {
            return Ok(false);
        }
        s.records
            .insert(path.to_vec(), Value::Bytes(record.encode()));
        self.healed.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }

    fn list(&self, path: &[u8], max: usize) -> TierResult<Vec<Listed>> {
        let s = self.enter()?;
        Ok(s.listings
            .get(path)
            .map(|l| l.iter().take(max).cloned().collect())
            .unwrap_or_default())
    }

    fn records_healed(&self) -> u64 {
        self.healed.load(Ordering::Relaxed)
    }
}
