//! The shared tier's circuit breaker and retry pauses, pure (time is passed
//! in, randomness comes from a caller-seeded generator) so both are tested
//! without an engine.
//!
//! Invariants:
//! - Only what the engine did moves the breaker: an answer (a value, a
//!   damaged record, a refusal) closes it, a failure of the engine (no
//!   answer in time, unreachable, unreadable) counts towards opening it.
//!   A call that never reached the engine (no caller thread free in time:
//!   local back-pressure) moves nothing.
//! - Closed: every call is let through; `FAILURES_MAX` consecutive engine
//!   failures open it. Open: no call is let through until the open period
//!   ends. Half-open: exactly one call (the probe) is let through; its
//!   answer closes the breaker, its failure opens it again, and a probe that
//!   never reached the engine gives the probe's place back.
//! - Every pause before a retry is drawn with full jitter (uniform between
//!   zero and the capped exponential bound), so hosts that failed together
//!   do not retry together; the open period is jittered too (between half
//!   and all of it), so a farm's hosts probe a restarted engine at
//!   different moments.

use std::time::{Duration, Instant};

/// Consecutive engine failures that open the breaker.
pub const BREAKER_FAILURES_MAX: u32 = 3;
/// Longest the breaker stays open before it lets a probe through.
pub const BREAKER_OPEN_MS_MAX: u64 = 5_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probing: bool },
}

/// Whether a call may reach the engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    /// Closed: go ahead.
    Call,
    /// Half-open: this call is the one probe.
    Probe,
    /// Open, or half-open with the probe already out.
    Refuse,
}

/// What became of an admitted call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The engine answered (whatever it said).
    Answered,
    /// The engine failed: no answer in time, unreachable, unreadable.
    Failed,
    /// The call never reached the engine (local back-pressure).
    NotTried,
}

/// A change of state worth a log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    None,
    Opened,
    Closed,
}

#[derive(Debug)]
pub struct Breaker {
    state: State,
    rng: Rng,
}

impl Breaker {
    pub fn new(seed: u64) -> Breaker {
        Breaker {
            state: State::Closed { failures: 0 },
            rng: Rng::new(seed),
        }
    }

    pub fn admit(&mut self, now: Instant) -> Admit {
        match self.state {
            State::Closed { .. } => Admit::Call,
            State::Open { until } if now < until => Admit::Refuse,
            State::Open { .. } | State::HalfOpen { probing: false } => {
                self.state = State::HalfOpen { probing: true };
                Admit::Probe
            }
            State::HalfOpen { probing: true } => Admit::Refuse,
        }
    }

    /// Records what became of a call `admit` let through as `admitted`.
    pub fn record(&mut self, admitted: Admit, outcome: Outcome, now: Instant) -> Transition {
        debug_assert!(admitted != Admit::Refuse, "a refused call has no outcome");
        let was_down = !matches!(self.state, State::Closed { .. });
        match outcome {
            Outcome::Answered => {
                self.state = State::Closed { failures: 0 };
                if was_down {
                    Transition::Closed
                } else {
                    Transition::None
                }
            }
            Outcome::NotTried => {
                if admitted == Admit::Probe && self.state == (State::HalfOpen { probing: true }) {
                    self.state = State::HalfOpen { probing: false };
                }
                Transition::None
            }
            Outcome::Failed => match self.state {
                State::Closed { failures } if failures + 1 >= BREAKER_FAILURES_MAX => {
                    self.open(now);
                    Transition::Opened
                }
                State::Closed { failures } => {
                    self.state = State::Closed {
                        failures: failures + 1,
                    };
                    Transition::None
                }
                State::HalfOpen { .. } if admitted == Admit::Probe => {
                    self.open(now);
                    Transition::Opened
                }
                // A call let through before the breaker opened, failing
                // late: the breaker is already down.
                _ => Transition::None,
            },
        }
    }

    fn open(&mut self, now: Instant) {
        let half = BREAKER_OPEN_MS_MAX / 2;
        let ms = half + self.rng.below(half + 1);
        self.state = State::Open {
            until: now + Duration::from_millis(ms),
        };
    }

    /// True while no call is let through but a probe's (open, or half-open
    /// with the probe out): the tier is considered down.
    pub fn is_down(&self) -> bool {
        !matches!(self.state, State::Closed { .. })
    }

    /// True while calls are refused outright (open, before its period
    /// ends); half-open is not: a probe may go.
    pub fn is_open(&self, now: Instant) -> bool {
        matches!(self.state, State::Open { until } if now < until)
    }

    /// A pause before retry `attempt` (1, 2, ...), with full jitter.
    pub fn backoff(&mut self, attempt: u32, base_ms: u64, cap_ms: u64) -> Duration {
        full_jitter(&mut self.rng, attempt, base_ms, cap_ms)
    }
}

/// Uniform in [0, min(cap, base * 2^(attempt-1))] ms.
pub fn full_jitter(rng: &mut Rng, attempt: u32, base_ms: u64, cap_ms: u64) -> Duration {
    let bound = base_ms
        .saturating_mul(1u64 << attempt.saturating_sub(1).min(20))
        .min(cap_ms);
    Duration::from_millis(rng.below(bound + 1))
}

/// xorshift64*: small, seeded, good enough to spread retries.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    /// A seed that differs between processes and calls.
    pub fn seed() -> u64 {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        h.finish()
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in [0, n) (0 when n is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        self.next_u64() % n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_open_it_and_an_answer_closes_it() {
        let t0 = Instant::now();
        let mut b = Breaker::new(1);
        for _ in 0..BREAKER_FAILURES_MAX - 1 {
            assert_eq!(b.admit(t0), Admit::Call);
            assert_eq!(b.record(Admit::Call, Outcome::Failed, t0), Transition::None);
        }
        // An answer in between resets the count.
        assert_eq!(
            b.record(Admit::Call, Outcome::Answered, t0),
            Transition::None
        );
        for i in 0..BREAKER_FAILURES_MAX {
            let t = b.record(Admit::Call, Outcome::Failed, t0);
            let last = i + 1 == BREAKER_FAILURES_MAX;
            assert_eq!(
                t,
                if last {
                    Transition::Opened
                } else {
                    Transition::None
                }
            );
        }
        assert!(b.is_open(t0) && b.is_down());
        assert_eq!(b.admit(t0), Admit::Refuse);
        // Late failures of calls let through before do not extend it.
        assert_eq!(b.record(Admit::Call, Outcome::Failed, t0), Transition::None);
    }

    #[test]
    fn half_open_admits_exactly_one_probe() {
        let t0 = Instant::now();
        let mut b = Breaker::new(2);
        for _ in 0..BREAKER_FAILURES_MAX {
            b.admit(t0);
            b.record(Admit::Call, Outcome::Failed, t0);
        }
        let later = t0 + Duration::from_millis(BREAKER_OPEN_MS_MAX + 1);
        assert!(!b.is_open(later) && b.is_down());
        assert_eq!(b.admit(later), Admit::Probe);
        for _ in 0..100 {
            assert_eq!(b.admit(later), Admit::Refuse, "a second probe");
        }
        // The probe failed: open again.
        assert_eq!(
            b.record(Admit::Probe, Outcome::Failed, later),
            Transition::Opened
        );
        assert_eq!(b.admit(later), Admit::Refuse);
        let later2 = later + Duration::from_millis(BREAKER_OPEN_MS_MAX + 1);
        assert_eq!(b.admit(later2), Admit::Probe);
        // A probe that never reached the engine gives its place back.
        assert_eq!(
            b.record(Admit::Probe, Outcome::NotTried, later2),
            Transition::None
        );
        assert_eq!(b.admit(later2), Admit::Probe);
        assert_eq!(
            b.record(Admit::Probe, Outcome::Answered, later2),
            Transition::Closed
        );
        assert!(!b.is_down());
        assert_eq!(b.admit(later2), Admit::Call);
    }

    #[test]
    fn back_pressure_never_moves_the_breaker() {
        let t0 = Instant::now();
        let mut b = Breaker::new(3);
        for _ in 0..1000 {
            assert_eq!(b.admit(t0), Admit::Call);
            assert_eq!(
                b.record(Admit::Call, Outcome::NotTried, t0),
                Transition::None
            );
        }
        assert!(!b.is_down());
    }

    #[test]
    fn open_periods_and_backoffs_are_jittered_within_their_bounds() {
        let t0 = Instant::now();
        let mut opens = std::collections::HashSet::new();
        for seed in 0..50 {
            let mut b = Breaker::new(seed);
            for _ in 0..BREAKER_FAILURES_MAX {
                b.record(Admit::Call, Outcome::Failed, t0);
            }
            let State::Open { until } = b.state else {
                panic!("not open")
            };
            let ms = (until - t0).as_millis() as u64;
            assert!((BREAKER_OPEN_MS_MAX / 2..=BREAKER_OPEN_MS_MAX).contains(&ms));
            opens.insert(ms);
        }
        assert!(opens.len() > 10, "open periods are not spread: {opens:?}");
        let mut rng = Rng::new(9);
        let mut seen = std::collections::HashSet::new();
        for attempt in 1..=12 {
            for _ in 0..20 {
                let d = full_jitter(&mut rng, attempt, 100, 5_000);
                let bound = (100u64 << (attempt - 1)).min(5_000);
                assert!(d.as_millis() as u64 <= bound, "{d:?} over {bound}");
                seen.insert(d.as_millis());
            }
        }
        assert!(seen.len() > 50, "backoffs are not spread");
    }
}
