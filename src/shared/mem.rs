//! An in-memory engine for tests of the library: hosts in one process
//! share one `MemEngine` (it is a handle; clones share the same store).
//! It keeps the same invariants as the real engines (see `mod.rs`) and
//! adds what tests need: faults injected from a seed (so a failing run
//! replays), hooks that damage what it holds the way an operator, an
//! eviction policy or a disk would (`damage_*`, `drop_*`), and the
//! network's shape: a latency per call, a bandwidth for blobs, a stall
//! (every call waits until it is lifted) and refusals (writes answered
//! with the engine's "no", like Redis at `maxmemory`). The knobs are
//! shared by every handle on one store, as the network is.
//!
//! Not offered by the command line: a process-local engine shares nothing
//! between hosts.
//!
//! Locks: `state` (every record, listing, blob, time and lease) is held
//! for one call's change, never across a sleep (latency and bandwidth are
//! slept with no lock held); `shape.refusal` may be taken while `state` is
//! held (order: `state`, then `refusal`); `shape.stalled` is taken alone,
//! before `state`.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use super::{
    listing_chain, split_path, Engine, Lease, Listed, Page, Put, Record, RecordKind, Scanned, Seen,
    StoredBlob, TierError, TierResult, RECORD_BYTES_MAX,
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
    /// Last use of each record (Unix seconds), and when each blob was put.
    used_s: HashMap<Vec<u8>, u64>,
    blob_stored_s: HashMap<BlobId, u64>,
    /// Lease name -> (holder, until Unix seconds).
    leases: HashMap<String, (String, u64)>,
    /// xorshift64 state; 0 = no faults.
    rng: u64,
    fail_percent: u64,
}

/// The network between the hosts and the store.
#[derive(Default)]
struct Shape {
    latency_us: AtomicU64,
    /// Blob bytes per second each way (0: unbounded).
    bandwidth_bytes_per_s: AtomicU64,
    /// While true, every call waits (`stall`).
    stalled: Mutex<bool>,
    unstalled: Condvar,
    /// Calls waiting in a stall.
    stalled_calls: AtomicU64,
    /// Every write is refused with this message.
    refusal: Mutex<Option<String>>,
    /// Calls in their latency now, and the most there ever were at once.
    in_flight: AtomicU64,
    in_flight_max: AtomicU64,
}

/// A handle on one in-memory store; a clone is another host's handle on
/// the same store (its own heal counter, like a real engine's).
#[derive(Default)]
pub struct MemEngine {
    state: Arc<Mutex<State>>,
    healed: AtomicU64,
    calls: Arc<AtomicU64>,
    shape: Arc<Shape>,
}

impl Clone for MemEngine {
    fn clone(&self) -> MemEngine {
        MemEngine {
            state: self.state.clone(),
            healed: AtomicU64::new(0),
            calls: self.calls.clone(),
            shape: self.shape.clone(),
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

    /// Every call takes `latency` more (a round trip), slept with no lock
    /// held, so calls from many threads overlap as on a network.
    pub fn set_latency(&self, latency: Duration) {
        self.shape
            .latency_us
            .store(latency.as_micros() as u64, Ordering::Relaxed);
    }

    /// Blobs move at `bytes_per_s` each way (0: unbounded).
    pub fn set_bandwidth(&self, bytes_per_s: u64) {
        self.shape
            .bandwidth_bytes_per_s
            .store(bytes_per_s, Ordering::Relaxed);
    }

    /// From now on (`true`) every call waits until the stall is lifted
    /// (`false`): a hung server.
    pub fn stall(&self, stalled: bool) {
        *self.shape.stalled.lock().unwrap() = stalled;
        self.shape.unstalled.notify_all();
    }

    /// The most calls that were ever in their latency at once (how much
    /// the hosts overlap their round trips).
    pub fn calls_in_flight_max(&self) -> u64 {
        self.shape.in_flight_max.load(Ordering::Relaxed)
    }

    /// Calls waiting in a stall now.
    pub fn stalled_calls(&self) -> u64 {
        self.shape.stalled_calls.load(Ordering::Relaxed)
    }

    /// From now on (`Some`) every write is refused with `message`, as a
    /// server out of memory refuses them; `None` accepts them again.
    pub fn refuse_writes(&self, message: Option<&str>) {
        *self.shape.refusal.lock().unwrap() = message.map(str::to_string);
    }

    fn refused(&self) -> TierResult<()> {
        match &*self.shape.refusal.lock().unwrap() {
            Some(m) => Err(TierError::Refused(format!("mem://: {m}"))),
            None => Ok(()),
        }
    }

    /// Waits as the network would for `bytes` of blob.
    fn transfer(&self, bytes: usize) {
        let bw = self.shape.bandwidth_bytes_per_s.load(Ordering::Relaxed);
        if bw > 0 {
            std::thread::sleep(Duration::from_secs_f64(bytes as f64 / bw as f64));
        }
    }

    /// Moves `bytes` to `sink` a chunk at a time, each after the time the
    /// bandwidth gives it, counting progress.
    fn stream(
        &self,
        bytes: &[u8],
        sink: &mut dyn std::io::Write,
        progress: &super::Progress,
    ) -> TierResult<()> {
        for chunk in bytes.chunks(super::TRANSFER_CHUNK_BYTES) {
            progress.check()?;
            self.transfer(chunk.len());
            sink.write_all(chunk)
                .map_err(|e| TierError::Unavailable(format!("mem://: write: {e}")))?;
            progress.add(chunk.len() as u64);
        }
        Ok(())
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

    /// Counts the call, waits as the network would (no lock held), and
    /// decides whether it fails.
    fn enter(&self) -> TierResult<std::sync::MutexGuard<'_, State>> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        {
            let mut stalled = self.shape.stalled.lock().unwrap();
            if *stalled {
                self.shape.stalled_calls.fetch_add(1, Ordering::Relaxed);
                while *stalled {
                    stalled = self.shape.unstalled.wait(stalled).unwrap();
                }
                self.shape.stalled_calls.fetch_sub(1, Ordering::Relaxed);
            }
        }
        let latency_us = self.shape.latency_us.load(Ordering::Relaxed);
        if latency_us > 0 {
            let now = self.shape.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
            self.shape.in_flight_max.fetch_max(now, Ordering::Relaxed);
            std::thread::sleep(Duration::from_micros(latency_us));
            self.shape.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
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

    fn mark_used(s: &mut State, path: &[u8], now_s: u64) {
        let t = s.used_s.entry(path.to_vec()).or_insert(0);
        *t = (*t).max(now_s);
    }

    fn mark_stored(s: &mut State, id: &BlobId) {
        let t = s.blob_stored_s.entry(*id).or_insert(0);
        *t = (*t).max(super::now_s());
    }

    /// Bytes the store holds in blobs (what a budget bounds).
    pub fn blob_bytes(&self) -> u64 {
        self.lock().blobs.values().map(|b| b.len() as u64).sum()
    }

    /// Records the store holds.
    pub fn record_count(&self) -> usize {
        self.lock().records.len()
    }

    /// Takes `name` out of its parent's listing, and each listing left
    /// empty out of its own parent's while that directory has no record.
    fn unlist(s: &mut State, path: &[u8], dir: bool) {
        let mut cur = path.to_vec();
        let mut is_dir = dir;
        while !cur.is_empty() {
            let (parent, name) = split_path(&cur);
            let (parent, name) = (parent.to_vec(), name.to_vec());
            let Some(l) = s.listings.get_mut(&parent) else {
                return;
            };
            l.remove(&Listed { name, dir: is_dir });
            if !l.is_empty() {
                return;
            }
            s.listings.remove(&parent);
            if parent.is_empty() || s.records.contains_key(&parent) {
                return;
            }
            cur = parent;
            is_dir = true;
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
        self.refused()?;
        let is_dir = record.kind == RecordKind::Dir;
        MemEngine::list_chain(&mut s, path, is_dir);
        if create_only {
            match s.records.get(path) {
                Some(Value::Bytes(b)) => {
                    if let Ok(existing) = Record::decode(b) {
                        MemEngine::mark_used(&mut s, path, super::now_s());
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
        MemEngine::mark_used(&mut s, path, super::now_s());
        Ok(Put::Stored)
    }

    fn has_blob(&self, id: &BlobId) -> TierResult<bool> {
        Ok(self.enter()?.blobs.contains_key(id))
    }

    fn get_blob(&self, id: &BlobId, max_bytes: u64) -> TierResult<Option<Vec<u8>>> {
        let s = self.enter()?;
        let found = match s.blobs.get(id) {
            Some(b) if b.len() as u64 > max_bytes => Err(TierError::Data(format!(
                "mem blob {id}: {} bytes, over the {max_bytes} allowed",
                b.len()
            ))),
            other => Ok(other.cloned()),
        };
        drop(s);
        if let Ok(Some(b)) = &found {
            self.transfer(b.len());
        }
        found
    }

    fn put_blob(&self, id: &BlobId, bytes: &[u8]) -> TierResult<()> {
        drop(self.enter()?);
        self.refused()?;
        self.transfer(bytes.len());
        let mut s = self.lock();
        s.blobs.entry(*id).or_insert_with(|| bytes.to_vec());
        MemEngine::mark_stored(&mut s, id);
        Ok(())
    }

    fn get_blob_into(
        &self,
        id: &BlobId,
        max_bytes: u64,
        sink: &mut dyn std::io::Write,
        progress: &super::Progress,
    ) -> TierResult<Option<u64>> {
        let s = self.enter()?;
        let bytes = match s.blobs.get(id) {
            None => return Ok(None),
            Some(b) if b.len() as u64 > max_bytes => {
                return Err(TierError::Data(format!(
                    "mem blob {id}: {} bytes, over the {max_bytes} allowed",
                    b.len()
                )))
            }
            Some(b) => b.clone(),
        };
        drop(s);
        self.stream(&bytes, sink, progress)?;
        Ok(Some(bytes.len() as u64))
    }

    fn put_blob_from(
        &self,
        id: &BlobId,
        source: &mut dyn std::io::Read,
        len: u64,
        progress: &super::Progress,
    ) -> TierResult<()> {
        drop(self.enter()?);
        self.refused()?;
        let mut staged = Vec::new();
        super::copy_counted(source, &mut staged, len, &super::Progress::default())
            .map_err(|e| TierError::Unavailable(format!("mem://: read local blob {id}: {e}")))?;
        let mut sent = Vec::with_capacity(staged.len());
        self.stream(&staged, &mut sent, progress)?;
        let mut s = self.lock();
        s.blobs.entry(*id).or_insert(sent);
        MemEngine::mark_stored(&mut s, id);
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

    fn lists_in_one_round_trip(&self) -> bool {
        true
    }

    fn list_many(&self, paths: &[Vec<u8>], max_each: usize) -> TierResult<Vec<super::Listing>> {
        let s = self.enter()?;
        Ok(paths
            .iter()
            .map(|p| match s.listings.get(p) {
                Some(l) => super::Listing {
                    names: l.iter().take(max_each).cloned().collect(),
                    whole: l.len() <= max_each,
                },
                None => super::Listing {
                    names: Vec::new(),
                    whole: true,
                },
            })
            .collect())
    }

    fn scan_records(
        &self,
        _namespace: &str,
        cursor: &[u8],
        max: usize,
    ) -> TierResult<Page<Scanned>> {
        // Ordered by path; the cursor is the last path of the page before.
        let s = self.enter()?;
        let mut keys: Vec<&Vec<u8>> = s
            .records
            .keys()
            .filter(|k| cursor.is_empty() || k.as_slice() > cursor)
            .collect();
        keys.sort();
        let page: Vec<Scanned> = keys
            .iter()
            .take(max.max(1))
            .map(|k| {
                let v = &s.records[*k];
                let (seen, record) = match v {
                    Value::Bytes(b) if b.len() as u64 > RECORD_BYTES_MAX => (Seen::Oversize, None),
                    Value::Bytes(b) => (Seen::Bytes(b.clone()), Record::decode(b).ok()),
                    Value::Other => (Seen::WrongType, None),
                };
                Scanned {
                    key: (*k).clone(),
                    seen,
                    record,
                    used_s: s.used_s.get(*k).copied().unwrap_or(0),
                }
            })
            .collect();
        let next = (keys.len() > page.len()).then(|| page.last().unwrap().key.clone());
        Ok(Page { items: page, next })
    }

    fn delete_record(&self, key: &[u8], seen: &Seen) -> TierResult<bool> {
        let mut s = self.enter()?;
        if !MemEngine::matches(s.records.get(key), seen) {
            return Ok(false);
        }
        let dir = matches!(
            s.records.get(key),
            Some(Value::Bytes(b)) if matches!(Record::decode(b), Ok(Record { kind: RecordKind::Dir, .. }))
        );
        s.records.remove(key);
        s.used_s.remove(key);
        MemEngine::unlist(&mut s, key, dir);
        Ok(true)
    }

    fn scan_blobs(&self, cursor: &[u8], max: usize) -> TierResult<Page<StoredBlob>> {
        let s = self.enter()?;
        let mut ids: Vec<&BlobId> = s
            .blobs
            .keys()
            .filter(|id| cursor.is_empty() || id.0.as_slice() > cursor)
            .collect();
        ids.sort_by_key(|id| id.0);
        let items: Vec<StoredBlob> = ids
            .iter()
            .take(max.max(1))
            .map(|id| StoredBlob {
                id: **id,
                bytes: s.blobs[*id].len() as u64,
                stored_s: s.blob_stored_s.get(*id).copied().unwrap_or(0),
            })
            .collect();
        let next = (ids.len() > items.len()).then(|| items.last().unwrap().id.0.to_vec());
        Ok(Page { items, next })
    }

    fn delete_blob(&self, id: &BlobId, stored_before_s: u64) -> TierResult<bool> {
        let mut s = self.enter()?;
        if s.blob_stored_s.get(id).copied().unwrap_or(0) >= stored_before_s
            || !s.blobs.contains_key(id)
        {
            return Ok(false);
        }
        s.blobs.remove(id);
        s.blob_stored_s.remove(id);
        Ok(true)
    }

    fn note_used(&self, paths: &[Vec<u8>], now_s: u64) -> TierResult<()> {
        let mut s = self.enter()?;
        for p in paths {
            if s.records.contains_key(p) {
                MemEngine::mark_used(&mut s, p, now_s);
            }
        }
        Ok(())
    }

    fn lease(&self, name: &str, holder: &str, ttl_s: u64, now_s: u64) -> TierResult<Lease> {
        let mut s = self.enter()?;
        self.refused()?;
        match s.leases.get(name) {
            Some((h, until)) if h != holder && *until > now_s => Ok(Lease::Other {
                holder: h.clone(),
                until_s: *until,
            }),
            _ => {
                s.leases
                    .insert(name.to_string(), (holder.to_string(), now_s + ttl_s));
                Ok(Lease::Held {
                    until_s: now_s + ttl_s,
                })
            }
        }
    }

    fn release_lease(&self, name: &str, holder: &str) -> TierResult<()> {
        let mut s = self.enter()?;
        if s.leases.get(name).is_some_and(|(h, _)| h == holder) {
            s.leases.remove(name);
        }
        Ok(())
    }

    fn namespaces(&self) -> TierResult<Vec<String>> {
        // One store, one namespace.
        Ok(vec!["default".into()])
    }
}
