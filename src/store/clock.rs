//! The daemon's one clock: a hybrid logical clock in nanoseconds.
//!
//! Invariants:
//! - `now()` is never behind wall time and strictly increases, so two
//!   events never share a timestamp and a name's mtime never decreases.
//! - `observe(t)` takes in a timestamp seen elsewhere, so later ticks are
//!   above it (a hybrid logical clock across hosts).
//! - After a restart the clock starts above every timestamp it handed out
//!   before: it persists a *lease* (an upper bound it will not pass without
//!   persisting a new one), and restarts from the lease.

use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How far ahead of the persisted lease the clock may run before it must
/// persist a new one. Larger means fewer writes; the cost of a crash is that
/// the clock restarts up to this far ahead of wall time.
pub const LEASE_NS: u64 = 2_000_000_000;

pub struct Clock {
    state: Mutex<State>,
}

struct State {
    last_ns: u64,
    lease_ns: u64,
}

pub fn wall_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

pub fn to_system_time(ns: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(ns)
}

impl Clock {
    /// Starts the clock above `persisted_lease_ns` (zero for a new store).
    pub fn start(persisted_lease_ns: u64) -> Clock {
        Clock {
            state: Mutex::new(State {
                last_ns: persisted_lease_ns,
                lease_ns: persisted_lease_ns,
            }),
        }
    }

    /// The next timestamp. When it reaches the lease, `persist` is called
    /// with a new lease before the timestamp is handed out, under the
    /// clock's own lock (so leases are written in increasing order and
    /// before any batch that uses a time below them). `persist` returns
    /// false if it could not write; the lease is then retried on the next
    /// tick.
    pub fn tick(&self, persist: impl FnOnce(u64) -> bool) -> u64 {
        let mut s = self.state.lock().unwrap();
        let ns = wall_ns().max(s.last_ns + 1);
        s.last_ns = ns;
        if ns >= s.lease_ns && persist(ns + LEASE_NS) {
            s.lease_ns = ns + LEASE_NS;
        }
        ns
    }

    /// Takes in a timestamp seen elsewhere (another host's mtime), so later
    /// ticks are above it.
    pub fn observe(&self, ns: u64) {
        let mut s = self.state.lock().unwrap();
        s.last_ns = s.last_ns.max(ns);
    }

    pub fn last_ns(&self) -> u64 {
        self.state.lock().unwrap().last_ns
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_strictly_increase_and_never_trail_wall_time() {
        let clock = Clock::start(0);
        let mut prev = 0;
        for _ in 0..10_000 {
            let before = wall_ns();
            let t = clock.tick(|_| true);
            assert!(t > prev);
            assert!(t >= before);
            prev = t;
        }
    }

    #[test]
    fn restart_from_lease_is_above_everything_handed_out() {
        let future = wall_ns() + 3_600_000_000_000;
        let clock = Clock::start(future);
        let mut lease = None;
        let t = clock.tick(|l| {
            lease = Some(l);
            true
        });
        assert!(t > future);
        assert!(lease.unwrap() > t);
    }
}
