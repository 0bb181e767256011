//! Pauses between retries: the one doubling backoff of the supervisor's retry loops, and its
//! one source of jitter.

use std::time::Duration;

/// A pause between attempts that doubles after each one, up to a cap.
///
/// A loop keeps one and takes [`Backoff::pause`] after each failure ([`Backoff::reset`] after
/// a success); code that counts its failures itself asks for [`Backoff::nth`].
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    first: Duration,
    next: Duration,
    max: Duration,
}

impl Backoff {
    pub const fn new(first: Duration, max: Duration) -> Self {
        Self {
            first,
            next: first,
            max,
        }
    }

    /// The pause before the next attempt, in milliseconds, for messages.
    pub fn next_ms(&self) -> u64 {
        nats_fs::millis(self.next)
    }

    /// The pause to take now; the next one is twice as long.
    pub fn pause(&mut self) -> Duration {
        let pause = self.next;
        self.next = (pause * 2).min(self.max);
        pause
    }

    /// After a success: the next failure starts over with the first pause.
    pub fn reset(&mut self) {
        self.next = self.first;
    }

    /// The pause after `n` doublings of the first (`first × 2ⁿ`), at most the cap: what
    /// [`Backoff::pause`] returns the `n+1`-th time.
    pub fn nth(&self, n: u32) -> Duration {
        self.first
            .saturating_mul(2u32.saturating_pow(n))
            .min(self.max)
    }
}

/// A random length from zero up to (not including) `max`, to the millisecond: the one source
/// of jitter, so that hosts started together do not act in step.
pub fn jitter(max: Duration) -> Duration {
    let max_ms = nats_fs::millis(max);
    Duration::from_millis(if max_ms == 0 {
        0
    } else {
        fastrand::u64(..max_ms)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_and_starts_over_after_a_success() {
        let ms = Duration::from_millis;
        let mut backoff = Backoff::new(ms(100), ms(500));
        assert_eq!(backoff.next_ms(), 100);
        let pauses: Vec<_> = (0..5).map(|_| backoff.pause()).collect();
        assert_eq!(pauses, [ms(100), ms(200), ms(400), ms(500), ms(500)]);
        backoff.reset();
        assert_eq!(backoff.pause(), ms(100));
        // The n-th pause, counted from zero, is what `pause` gives the (n+1)-th time.
        let nth: Vec<_> = (0..5).map(|n| backoff.nth(n)).collect();
        assert_eq!(nth, pauses);
        assert_eq!(backoff.nth(u32::MAX), ms(500));
    }

    #[test]
    fn jitter_stays_below_its_bound_and_varies() {
        let max = Duration::from_secs(10);
        let draws: Vec<_> = (0..200).map(|_| jitter(max)).collect();
        assert!(draws
            .iter()
            .all(|d| *d < max && d.subsec_nanos() % 1_000_000 == 0));
        assert!(draws.iter().any(|d| *d != draws[0]), "{draws:?}");
        assert_eq!(jitter(Duration::ZERO), Duration::ZERO);
    }
}
