//! The daemon's one clock: a hybrid logical clock in nanoseconds.
//!
//! Invariants:
//! - `now()` is never behind wall time and strictly increases, so two
//!   events never share a timestamp and a name's mtime never decreases.
//! - `observe(t)` takes in a timestamp seen elsewhere, so later ticks are
//!   above it (a hybrid logical clock across hosts), but never more than
//!   `ahead_max` past this host's wall time: a host whose clock runs fast
//!   cannot drag every other host's mtimes into the future. A timestamp
//!   further ahead is taken as wall time + `ahead_max`, counted, and
//!   logged at most once per `AHEAD_LOG_INTERVAL_S`. Build hosts are
//!   assumed to run NTP; the bound is what a host trusts beyond that.
//! - After a restart the clock starts above every timestamp it handed out
//!   before: it persists a *lease* (an upper bound it will not pass without
//!   persisting a new one), and restarts from the lease.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use log::warn;

/// How far ahead of the persisted lease the clock may run before it must
/// persist a new one. Larger means fewer writes; the cost of a crash is that
/// the clock restarts up to this far ahead of wall time.
pub const LEASE_NS: u64 = 2_000_000_000;

/// How far past this host's wall time a timestamp from another host may
/// move the clock, unless configured (`--shared-clock-skew-ms`).
pub const AHEAD_MAX_NS_DEFAULT: u64 = 1_000_000_000;
/// At most one log line per this many seconds about timestamps from the
/// future.
const AHEAD_LOG_INTERVAL_S: u64 = 60;

pub struct Clock {
    state: Mutex<State>,
    ahead_max_ns: AtomicU64,
    /// Timestamps observed further ahead than `ahead_max_ns` (ever, and
    /// since the last log line), and the largest excess since then.
    ahead_total: AtomicU64,
    ahead_log: Mutex<AheadLog>,
}

#[derive(Default)]
struct AheadLog {
    last_logged_ns: u64,
    unlogged: u64,
    excess_max_ns: u64,
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
            ahead_max_ns: AtomicU64::new(AHEAD_MAX_NS_DEFAULT),
            ahead_total: AtomicU64::new(0),
            ahead_log: Mutex::new(AheadLog::default()),
        }
    }

    /// Sets how far past wall time `observe` may move the clock.
    pub fn set_ahead_max_ns(&self, ns: u64) {
        self.ahead_max_ns.store(ns, Ordering::Relaxed);
    }

    pub fn ahead_max_ns(&self) -> u64 {
        self.ahead_max_ns.load(Ordering::Relaxed)
    }

    /// Timestamps from elsewhere that were further ahead than the bound.
    pub fn ahead_count(&self) -> u64 {
        self.ahead_total.load(Ordering::Relaxed)
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
    /// ticks are above it, bounded to `ahead_max` past wall time. Returns
    /// the timestamp as taken (`ns`, or the bound if `ns` is beyond it):
    /// what this host shows for it, so nothing it shows is newer than what
    /// it will hand out next.
    pub fn observe(&self, ns: u64) -> u64 {
        let wall = wall_ns();
        let bound = wall.saturating_add(self.ahead_max_ns());
        let taken = ns.min(bound);
        {
            let mut s = self.state.lock().unwrap();
            s.last_ns = s.last_ns.max(taken);
        }
        if ns > bound {
            self.note_ahead(wall, ns - bound);
        }
        taken
    }

    /// Counts a timestamp from the future; logs once per interval.
    fn note_ahead(&self, wall: u64, excess_ns: u64) {
        self.ahead_total.fetch_add(1, Ordering::Relaxed);
        let mut l = self.ahead_log.lock().unwrap();
        l.unlogged += 1;
        l.excess_max_ns = l.excess_max_ns.max(excess_ns);
        if wall.saturating_sub(l.last_logged_ns) < AHEAD_LOG_INTERVAL_S * 1_000_000_000 {
            return;
        }
        let bound_ms = self.ahead_max_ns() / 1_000_000;
        warn!(
            "clock: {} timestamps from other hosts were ahead of this host's clock by more than {bound_ms} ms (up to {} ms more); \
             taken as now + {bound_ms} ms. A build host's clock runs fast: run NTP on every host (bound: --shared-clock-skew-ms)",
            l.unlogged,
            l.excess_max_ns / 1_000_000
        );
        *l = AheadLog {
            last_logged_ns: wall,
            ..AheadLog::default()
        };
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

    #[test]
    fn observing_the_future_moves_the_clock_at_most_the_bound() {
        let clock = Clock::start(0);
        clock.set_ahead_max_ns(1_000_000_000);
        let far = wall_ns() + 30_000_000_000;
        let taken = clock.observe(far);
        let after = wall_ns();
        assert!(
            taken <= after + 1_000_000_000,
            "taken {taken} past the bound"
        );
        assert!(clock.tick(|_| true) <= wall_ns() + 1_000_000_001);
        assert_eq!(clock.ahead_count(), 1);
        // Within the bound: taken as is, not counted.
        let near = wall_ns() + 500_000_000;
        assert_eq!(clock.observe(near), near);
        assert_eq!(clock.ahead_count(), 1);
        assert!(clock.tick(|_| true) > near);
    }
}
