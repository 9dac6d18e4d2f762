//! Uploads: the write-back queue, its workers, delivery, `sync`.

#[allow(unused_imports)]
use super::*;

impl Tier {
    /// Takes a committed publication (its durable record is written); never
    /// blocks. When the in-memory queue is full the upload stays in the
    /// store only, and is read back when the queue has drained.
    pub fn enqueue(&self, up: Upload) {
        let mut q = self.queue.lock().unwrap();
        if !q.push(up) {
            let first = !q.spilled_logged;
            q.spilled_logged = true;
            if first {
                info!(
                    "shared tier: more than {UPLOAD_QUEUE_LEN_MAX} uploads waiting; the rest wait in the store and are read back in order"
                );
            }
        }
        drop(q);
        self.queue_changed.notify_one();
    }

    /// Counts uploads about to be committed (before they are visible in
    /// the store, so they are counted before they can be settled).
    pub fn count_pending(&self, n: u64) {
        self.pending.fetch_add(n, Ordering::Relaxed);
    }

    /// The commit that would have written them failed.
    pub fn uncount_pending(&self, n: u64) {
        let _ = self
            .pending
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |p| {
                Some(p.saturating_sub(n))
            });
    }

    /// Uploads not yet acknowledged by the engine (or given up): every one
    /// is in the store.
    pub fn pending(&self) -> u64 {
        self.pending.load(Ordering::Relaxed)
    }

    pub(super) fn outbox(&self) -> Option<Arc<dyn Outbox>> {
        self.outbox.upgrade()
    }

    /// One upload worker: takes the next upload whose name no other worker
    /// is uploading, delivers it, and goes on until the core is gone.
    pub(super) fn work(&self, lost_race: &LostRace) {
        while let Some(up) = self.next_upload() {
            let Some(outbox) = self.outbox() else { return };
            self.deliver(&*outbox, &up, lost_race);
            drop(outbox);
            let mut q = self.queue.lock().unwrap();
            q.in_flight.remove(&up.path);
            q.queued.remove(&up.seq);
            if q.newest.get(&up.path) == Some(&up.seq) {
                q.newest.remove(&up.path);
            }
            drop(q);
            self.queue_changed.notify_all();
        }
    }

    /// The oldest queued upload whose path is not being uploaded; refills
    /// the queue from the store when it is empty and uploads wait there.
    /// None when the core is gone.
    pub(super) fn next_upload(&self) -> Option<Upload> {
        let mut q = self.queue.lock().unwrap();
        loop {
            let free = q
                .items
                .iter()
                .take(IN_FLIGHT_SKIP_MAX)
                .position(|u| !q.in_flight.contains(&u.path));
            if let Some(i) = free {
                let up = q.items.remove(i).expect("position is in range");
                q.in_flight.insert(up.path.clone());
                return Some(up);
            }
            if q.items.is_empty() && q.spilled && !q.refilling {
                q.refilling = true;
                q.spilled = false;
                drop(q);
                let loaded = match self.outbox() {
                    None => return None,
                    Some(o) => o.pending(UPLOAD_QUEUE_LEN_MAX),
                };
                q = self.queue.lock().unwrap();
                q.refilling = false;
                if loaded.len() >= UPLOAD_QUEUE_LEN_MAX {
                    q.spilled = true;
                }
                for up in loaded {
                    q.push(up);
                }
                self.queue_changed.notify_all();
                continue;
            }
            if self.outbox.strong_count() == 0 {
                return None;
            }
            q = self
                .queue_changed
                .wait_timeout(q, Duration::from_millis(QUEUE_POLL_MS))
                .unwrap()
                .0;
        }
    }

    /// Delivers one upload, or gives it up for a reason retrying cannot
    /// fix. Waiting for an engine that is down or failing costs no attempt:
    /// the upload is durable, so it waits as long as it takes.
    pub(super) fn deliver(&self, outbox: &dyn Outbox, up: &Upload, lost_race: &LostRace) {
        let newer_queued = self
            .queue
            .lock()
            .unwrap()
            .newest
            .get(&up.path)
            .is_some_and(|s| *s > up.seq);
        let local = outbox.local(up);
        if local == Local::Settled {
            return;
        }
        if newer_queued || local == Local::Replaced {
            // A later publication of the name supersedes this one (last
            // writer wins): never upload a stale version after a newer one.
            log::debug!(
                "upload path={:?} seq={} outcome=superseded",
                String::from_utf8_lossy(&up.path),
                up.seq
            );
            self.stats
                .uploads_superseded
                .fetch_add(1, Ordering::Relaxed);
            return self.settle(outbox, up);
        }
        let mut attempts = 0;
        let mut waits = 0;
        loop {
            while self.breaker_is_open() {
                std::thread::sleep(Duration::from_millis(BREAKER_POLL_MS));
            }
            let started = Instant::now();
            let error = match self.try_upload(up) {
                Ok(put) => {
                    self.stats.uploads.fetch_add(1, Ordering::Relaxed);
                    *self.refusing.lock().unwrap() = None;
                    self.stats.upload_ms.observe(started.elapsed());
                    self.forget_missing(&up.path);
                    // Converge (or heal a damaged record) before the upload
                    // counts as settled, so `sync` returns after both.
                    if let Put::Exists(winner) = put {
                        // Ours already, unless it names our blob with another
                        // size (a damaged record: the core heals it).
                        let same = match (&winner.kind, &up.record.kind) {
                            (
                                crate::shared::RecordKind::File { blob, size, .. },
                                crate::shared::RecordKind::File { size: ours, .. },
                            ) => *blob == up.blob && size == ours,
                            _ => false,
                        };
                        if !same {
                            self.stats.conflicts_lost.fetch_add(1, Ordering::Relaxed);
                            lost_race(&up.path, winner);
                        }
                    }
                    self.settle(outbox, up);
                    return;
                }
                Err(Failure::Local(reason, detail)) => {
                    return self.give_up(outbox, up, reason, detail)
                }
                Err(Failure::Engine(e)) => e,
            };
            if error.is_outage() || matches!(error, TierError::Busy) {
                // The engine is down or not answering, or every caller is
                // busy: wait, at no cost.
                *self.last_wait_error.lock().unwrap() = error.to_string();
                waits += 1;
                std::thread::sleep(self.backoff(waits));
                continue;
            }
            if let TierError::Refused(m) = &error {
                *self.refusing.lock().unwrap() = Some(m.clone());
            }
            attempts += 1;
            if attempts >= UPLOAD_ATTEMPTS_MAX {
                return self.give_up(
                    outbox,
                    up,
                    GIVEN_UP_REFUSED,
                    format!("after {attempts} attempts: {error}"),
                );
            }
            // The pause is drawn under the breaker's lock, and slept after.
            let pause = self.breaker.lock().unwrap().backoff(
                attempts,
                REFUSED_BACKOFF_MS_BASE,
                REFUSED_BACKOFF_MS_MAX,
            );
            std::thread::sleep(pause);
        }
    }

    pub(super) fn try_upload(&self, up: &Upload) -> Result<Put, Failure> {
        // The directories above the name, so other hosts can walk to it.
        let mut end = 0;
        while let Some(i) = up.path[end..].iter().position(|c| *c == b'/') {
            end += i;
            let dir = up.path[..end].to_vec();
            end += 1;
            if self.known_dirs.lock().unwrap().contains(&dir) {
                continue;
            }
            let (d, rec) = (
                dir.clone(),
                Record {
                    kind: crate::shared::RecordKind::Dir,
                    mtime_ns: up.record.mtime_ns,
                },
            );
            self.call(Lane::Background, move |e| e.put_record(&d, &rec, true))?;
            let mut known = self.known_dirs.lock().unwrap();
            if known.len() >= KNOWN_DIRS_MAX {
                known.clear();
            }
            known.insert(dir);
        }
        let id = up.blob;
        if self.damaged.lock().unwrap().contains(&id) {
            let (mut file, len) = self.open_local_blob(up)?;
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut file, &mut bytes).map_err(|e| {
                Failure::Local(
                    GIVEN_UP_UNREADABLE,
                    format!("cannot read local blob {id}: {e}"),
                )
            })?;
            if bytes.len() as u64 != len {
                return Err(Failure::Local(
                    GIVEN_UP_UNREADABLE,
                    format!("local blob {id} changed while it was read"),
                ));
            }
            self.call(Lane::Background, move |e| e.repair_blob(&id, &bytes))?;
            self.damaged.lock().unwrap().remove(&id);
        } else if !self.call(Lane::Background, move |e| e.has_blob(&id))? {
            let (mut file, len) = self.open_local_blob(up)?;
            self.call_transfer(Lane::Background, move |e, progress| {
                e.put_blob_from(&id, &mut file, len, progress)
            })?;
        }
        let (path, record, create_only) = (up.path.clone(), up.record.clone(), up.create_only);
        Ok(self.call(Lane::Background, move |e| {
            e.put_record(&path, &record, create_only)
        })?)
    }

    /// The upload's blob file from the local store, checked against its
    /// id (hashed a chunk at a time), at its start, and its length.
    pub(super) fn open_local_blob(&self, up: &Upload) -> Result<(std::fs::File, u64), Failure> {
        use std::io::{Read, Seek};
        let unreadable = |e: std::io::Error| {
            Failure::Local(
                GIVEN_UP_UNREADABLE,
                format!("cannot read local blob {}: {e}", up.blob),
            )
        };
        let mut file = match std::fs::File::open(&up.blob_file) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Failure::Local(
                    GIVEN_UP_GONE,
                    format!(
                        "blob {} was evicted or deleted here before it could be uploaded, and the shared tier does not have it",
                        up.blob
                    ),
                ))
            }
            Err(e) => return Err(unreadable(e)),
        };
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; crate::shared::TRANSFER_CHUNK_BYTES];
        let mut len = 0u64;
        loop {
            let n = file.read(&mut buf).map_err(unreadable)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            len += n as u64;
        }
        if *hasher.finalize().as_bytes() != up.blob.0 {
            return Err(Failure::Local(
                GIVEN_UP_UNREADABLE,
                format!(
                    "local blob {} does not match its hash (the scrub will quarantine it)",
                    up.blob
                ),
            ));
        }
        file.rewind().map_err(unreadable)?;
        Ok((file, len))
    }

    /// The upload is done with (delivered, superseded or given up).
    pub(super) fn settle(&self, outbox: &dyn Outbox, up: &Upload) {
        outbox.remove(up);
        let _ = self
            .pending
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(1))
            });
        let _g = self.given_up.lock().unwrap();
        self.progressed.notify_all();
    }

    /// Gives an upload up: counted, logged, and reported by every `sync`
    /// of this mount from now on.
    pub(super) fn give_up(
        &self,
        outbox: &dyn Outbox,
        up: &Upload,
        reason: &'static str,
        detail: String,
    ) {
        self.stats.uploads_failed.fetch_add(1, Ordering::Relaxed);
        warn!(
            "shared tier: gave up the upload of {:?} ({reason}): {detail}",
            String::from_utf8_lossy(&up.path)
        );
        {
            let mut g = self.given_up.lock().unwrap();
            let entry = g.entry(reason).or_default();
            entry.0 += 1;
            entry.1 = detail;
        }
        self.settle(outbox, up);
    }

    /// The mark a `sync` starting now waits for: every publication
    /// acknowledged before now has a smaller tick.
    pub fn sync_mark(&self) -> Result<u64, String> {
        match self.outbox() {
            Some(outbox) => Ok(outbox.tick()),
            None => Err("the filesystem is shutting down".into()),
        }
    }

    /// Where the uploads of publications acknowledged before `mark` stand,
    /// answered at once (never waits): delivered (and none of this mount's
    /// uploads was ever given up), still on their way, or failed, with
    /// what is missing and why: uploads given up, an engine that is down,
    /// or an engine that refuses them (in its own words; they are still
    /// retried with backoff, and given up after `UPLOAD_ATTEMPTS_MAX`
    /// refusals each).
    pub fn sync_state(&self, mark: u64) -> SyncState {
        let Some(outbox) = self.outbox() else {
            return SyncState::Failed("the filesystem is shutting down".into());
        };
        let pending = match outbox.oldest_seq() {
            Err(e) => return SyncState::Failed(format!("cannot read the pending uploads: {e}")),
            Ok(oldest) => oldest.is_some_and(|seq| seq <= mark),
        };
        if pending {
            let waiting = self.pending();
            if self.breaker_is_open() {
                return SyncState::Failed(format!(
                    "{waiting} uploads cannot be delivered now: shared tier {} is down ({}); they are kept in the store and retried in the background",
                    self.engine.describe(),
                    self.last_wait_error.lock().unwrap()
                ));
            }
            if let Some(m) = &*self.refusing.lock().unwrap() {
                return SyncState::Failed(format!(
                    "{waiting} uploads pending: shared tier {} refuses them ({m}); they are kept in the store and retried with backoff, each given up after {UPLOAD_ATTEMPTS_MAX} refusals",
                    self.engine.describe()
                ));
            }
            return SyncState::Waiting(waiting);
        }
        let g = self.given_up.lock().unwrap();
        let total: u64 = g.values().map(|(n, _)| n).sum();
        if total > 0 {
            let reasons: Vec<String> = g
                .iter()
                .map(|(reason, (n, last))| format!("{n} {reason} (last: {last})"))
                .collect();
            return SyncState::Failed(format!(
                "{total} uploads given up since this mount started, so those publications are not in the shared tier {}: {}",
                self.engine.describe(),
                reasons.join("; ")
            ));
        }
        SyncState::Done(self.stats.uploads.load(Ordering::Relaxed))
    }

    /// Waits (on this thread) until every publication acknowledged before
    /// the call has been delivered, up to `deadline`: `sync_state` polled
    /// as uploads settle. Ok(n) (n: uploads delivered by this mount) only
    /// if, in addition, no upload of this mount was ever given up;
    /// Err(message) names what is missing and why.
    pub fn sync(&self, deadline: Duration) -> Result<u64, String> {
        let mark = self.sync_mark()?;
        let until = Instant::now() + deadline;
        loop {
            let waiting = match self.sync_state(mark) {
                SyncState::Done(n) => return Ok(n),
                SyncState::Failed(m) => return Err(m),
                SyncState::Waiting(n) => n,
            };
            let now = Instant::now();
            if now >= until {
                return Err(format!(
                    "{waiting} uploads still pending after {} s (shared tier {}; last error: {})",
                    deadline.as_secs(),
                    self.engine.describe(),
                    self.last_wait_error.lock().unwrap()
                ));
            }
            let slice = (until - now).min(Duration::from_millis(BREAKER_POLL_MS));
            let g = self.given_up.lock().unwrap();
            drop(self.progressed.wait_timeout(g, slice).unwrap());
        }
    }
}

/// What `Tier::sync_state` found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SyncState {
    /// Delivered; this mount's uploads delivered so far.
    Done(u64),
    /// This many uploads are still on their way.
    Waiting(u64),
    Failed(String),
}

/// Why one try of an upload failed.
pub(super) enum Failure {
    /// The engine failed: an outage (timeout, unavailable) is waited out;
    /// anything else costs an attempt.
    Engine(TierError),
    /// Something here that retrying cannot fix: give up now.
    Local(&'static str, String),
}

impl From<TierError> for Failure {
    fn from(e: TierError) -> Failure {
        Failure::Engine(e)
    }
}

/// The in-memory part of the upload queue (the store holds all of it).
#[derive(Default)]
pub(super) struct Queue {
    /// In publication order, at most `UPLOAD_QUEUE_LEN_MAX`.
    pub(super) items: VecDeque<Upload>,
    /// Ticks of the uploads in `items` or being delivered.
    pub(super) queued: HashSet<u64>,
    /// Paths being delivered (one upload per path at a time, so a newer
    /// version is never overtaken by an older one).
    pub(super) in_flight: HashSet<Vec<u8>>,
    /// The newest queued tick of each path (bounded; a hint, the local
    /// name is the authority).
    pub(super) newest: HashMap<Vec<u8>, u64>,
    /// Some pending uploads are only in the store.
    pub(super) spilled: bool,
    pub(super) spilled_logged: bool,
    pub(super) refilling: bool,
}

impl Queue {
    /// False if it did not fit (it waits in the store).
    pub(super) fn push(&mut self, up: Upload) -> bool {
        if self.queued.contains(&up.seq) {
            return true;
        }
        if self.items.len() >= UPLOAD_QUEUE_LEN_MAX {
            self.spilled = true;
            return false;
        }
        if self.newest.len() >= NEWEST_PATHS_MAX {
            self.newest.clear();
        }
        let newest = self.newest.entry(up.path.clone()).or_insert(up.seq);
        *newest = (*newest).max(up.seq);
        self.queued.insert(up.seq);
        self.items.push_back(up);
        true
    }
}
