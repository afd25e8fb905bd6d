//! Timestamps and the clock that lease expiry is judged by.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::error::{Error, Result, excerpt};

/// A point in time in UTC with millisecond precision.
///
/// Serialised as RFC 3339 (`2026-01-27T10:30:00Z`, with `.123` when there are
/// milliseconds), the form of the design's Appendix B. Only years 0000–9999
/// are representable, so every `Timestamp` can be written out.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp {
    millis: i64,
}

/// 0000-01-01T00:00:00Z.
const MIN_MILLIS: i64 = -62_167_219_200_000;
/// 9999-12-31T23:59:59.999Z.
const MAX_MILLIS: i64 = 253_402_300_799_999;

impl Timestamp {
    /// The Unix epoch.
    pub const UNIX_EPOCH: Timestamp = Timestamp { millis: 0 };

    /// The current wall-clock time.
    #[inline]
    pub fn now() -> Self {
        Self::from(SystemTime::now())
    }

    /// The time `millis` milliseconds after the Unix epoch, if representable.
    pub fn from_unix_millis(millis: i64) -> Option<Self> {
        (MIN_MILLIS..=MAX_MILLIS)
            .contains(&millis)
            .then_some(Timestamp { millis })
    }

    /// The time `seconds` seconds after the Unix epoch, if representable.
    pub fn from_unix_seconds(seconds: i64) -> Option<Self> {
        seconds.checked_mul(1000).and_then(Self::from_unix_millis)
    }

    /// Milliseconds since the Unix epoch.
    #[inline]
    pub fn unix_millis(self) -> i64 {
        self.millis
    }

    /// Whole seconds since the Unix epoch (rounded down), the form of the design's `last_seen`.
    pub fn unix_seconds(self) -> i64 {
        self.millis.div_euclid(1000)
    }

    /// `self + by`, saturating at the latest representable time.
    #[inline]
    pub fn saturating_add(self, by: Duration) -> Self {
        let by = i64::try_from(by.as_millis()).unwrap_or(i64::MAX);
        Timestamp {
            millis: self.millis.saturating_add(by).min(MAX_MILLIS),
        }
    }

    /// `self - by`, saturating at the earliest representable time.
    #[inline]
    pub fn saturating_sub(self, by: Duration) -> Self {
        let by = i64::try_from(by.as_millis()).unwrap_or(i64::MAX);
        Timestamp {
            millis: self.millis.saturating_sub(by).max(MIN_MILLIS),
        }
    }

    /// How long after `earlier` this is; zero if it is not after it.
    pub fn duration_since(self, earlier: Timestamp) -> Duration {
        Duration::from_millis(self.millis.saturating_sub(earlier.millis).max(0) as u64)
    }

    /// Parses RFC 3339 (any offset; sub-millisecond digits are truncated).
    pub fn parse_rfc3339(text: &str) -> Result<Self> {
        let parsed = OffsetDateTime::parse(text, &Rfc3339)
            .map_err(|err| Error::invalid_input(format!("timestamp {} is not RFC 3339: {err}", excerpt(text))))?;
        let millis = parsed.unix_timestamp_nanos().div_euclid(1_000_000);
        i64::try_from(millis)
            .ok()
            .and_then(Self::from_unix_millis)
            .ok_or_else(|| Error::invalid_input(format!("timestamp {} is out of range", excerpt(text))))
    }

    /// Formats as RFC 3339 in UTC.
    pub fn to_rfc3339(self) -> String {
        let nanos = i128::from(self.millis) * 1_000_000;
        OffsetDateTime::from_unix_timestamp_nanos(nanos)
            .ok()
            .and_then(|t| t.format(&Rfc3339).ok())
            // Unreachable: the constructors keep `millis` within the years 0000–9999.
            .unwrap_or_else(|| format!("@{}ms", self.millis))
    }
}

impl From<SystemTime> for Timestamp {
    #[inline]
    fn from(time: SystemTime) -> Self {
        let millis = match time.duration_since(UNIX_EPOCH) {
            Ok(after) => i64::try_from(after.as_millis()).unwrap_or(i64::MAX),
            Err(before) => -i64::try_from(before.duration().as_millis()).unwrap_or(i64::MAX),
        };
        Timestamp {
            millis: millis.clamp(MIN_MILLIS, MAX_MILLIS),
        }
    }
}

impl From<Timestamp> for SystemTime {
    fn from(t: Timestamp) -> Self {
        if t.millis >= 0 {
            UNIX_EPOCH + Duration::from_millis(t.millis as u64)
        } else {
            UNIX_EPOCH - Duration::from_millis(t.millis.unsigned_abs())
        }
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_rfc3339())
    }
}

impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Timestamp({})", self.to_rfc3339())
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_rfc3339())
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        Timestamp::parse_rfc3339(&text).map_err(serde::de::Error::custom)
    }
}

/// Where a component reads the time from.
///
/// Stores judge lease expiry by the clock they are given, so tests can move
/// time forward with a [`ManualClock`] instead of sleeping.
///
/// ```
/// use std::time::Duration;
/// use opamp_core::{Clock, ManualClock, Timestamp};
///
/// let clock = ManualClock::new(Timestamp::UNIX_EPOCH);
/// clock.advance(Duration::from_secs(301));
/// assert_eq!(clock.now().unix_seconds(), 301);
/// ```
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// The current time.
    fn now(&self) -> Timestamp;
}

impl<C: Clock + ?Sized> Clock for Arc<C> {
    fn now(&self) -> Timestamp {
        (**self).now()
    }
}

/// The system's wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    #[inline]
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }
}

/// The wall clock, read from memory: a background thread refreshes it every
/// `resolution`.
///
/// Reading the system clock costs ~30 ns, and the ordered TSC read behind it
/// waits for the CPU's outstanding memory loads, so a store checking millions
/// of leases a second spends more time on the clock than on its maps. This
/// clock costs one atomic load instead; lease expiry is judged up to
/// `resolution` (plus any delay in scheduling the thread) late, which does not
/// matter for leases of minutes. Share one among all the stores of a process.
///
/// The thread stops at its next tick once every clone of the clock is dropped.
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use opamp_core::{Clock, CoarseClock, Timestamp};
///
/// let clock = Arc::new(CoarseClock::new(Duration::from_millis(1))?);
/// let drift = Timestamp::now().duration_since(clock.now());
/// assert!(drift < Duration::from_secs(1));
/// # Ok::<(), opamp_core::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct CoarseClock {
    millis: Arc<AtomicI64>,
}

impl CoarseClock {
    /// Starts the refreshing thread; [`Error::Unavailable`] if it cannot be spawned.
    pub fn new(resolution: Duration) -> Result<Self> {
        let millis = Arc::new(AtomicI64::new(Timestamp::now().millis));
        let shared = Arc::downgrade(&millis);
        let resolution = resolution.max(Duration::from_micros(100));
        std::thread::Builder::new()
            .name("opamp-coarse-clock".into())
            .spawn(move || {
                while let Some(millis) = shared.upgrade() {
                    millis.store(Timestamp::now().millis, Ordering::Relaxed);
                    drop(millis);
                    std::thread::sleep(resolution);
                }
            })
            .map_err(|err| Error::Unavailable {
                message: "starting the coarse clock's thread".into(),
                source: Some(Box::new(err)),
            })?;
        Ok(CoarseClock { millis })
    }
}

impl Clock for CoarseClock {
    #[inline]
    fn now(&self) -> Timestamp {
        Timestamp {
            millis: self.millis.load(Ordering::Relaxed),
        }
    }
}

/// A clock that only moves when told to: for tests of TTLs and deadlines.
#[derive(Debug)]
pub struct ManualClock {
    millis: AtomicI64,
}

impl ManualClock {
    /// A clock standing at `start`.
    pub fn new(start: Timestamp) -> Self {
        ManualClock {
            millis: AtomicI64::new(start.millis),
        }
    }

    /// A clock standing at the current wall-clock time.
    pub fn starting_now() -> Self {
        Self::new(Timestamp::now())
    }

    /// Moves the clock forward.
    pub fn advance(&self, by: Duration) {
        let by = i64::try_from(by.as_millis()).unwrap_or(i64::MAX);
        let _ = self.millis.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |now| {
            Some(now.saturating_add(by).min(MAX_MILLIS))
        });
    }

    /// Sets the clock to `to` (which may be earlier: clocks do jump).
    pub fn set(&self, to: Timestamp) {
        self.millis.store(to.millis, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp {
            millis: self.millis.load(Ordering::SeqCst),
        }
    }
}

/// Durations in configuration files, written as a whole number and a unit:
/// `250ms`, `30s`, `5m`, `1h`.
///
/// Use it on `Duration` fields: `#[serde(with = "opamp_core::time::duration_text")]`.
/// Writing picks the largest unit that is exact; reading accepts any of them
/// and names the text when it cannot.
///
/// ```
/// use std::time::Duration;
/// use opamp_core::time::duration_text;
///
/// assert_eq!(duration_text::parse("5m")?, Duration::from_secs(300));
/// assert_eq!(duration_text::format(Duration::from_millis(1500)), "1500ms");
/// assert!(duration_text::parse("5 minutes").is_err());
/// # Ok::<(), opamp_core::Error>(())
/// ```
pub mod duration_text {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    use crate::error::{Error, Result, excerpt};

    const UNITS: [(&str, u64); 4] = [("h", 3_600_000), ("m", 60_000), ("s", 1_000), ("ms", 1)];

    /// Reads `250ms`, `30s`, `5m` or `1h`.
    pub fn parse(text: &str) -> Result<Duration> {
        let digits = text.bytes().take_while(u8::is_ascii_digit).count();
        let (number, unit) = text.split_at(digits);
        let scale = UNITS.iter().find(|(name, _)| *name == unit).map(|(_, ms)| *ms);
        match (number.parse::<u64>(), scale) {
            (Ok(number), Some(scale)) => number
                .checked_mul(scale)
                .map(Duration::from_millis)
                .ok_or_else(|| Error::invalid_input(format!("duration {} is too long", excerpt(text)))),
            _ => Err(Error::invalid_input(format!(
                "duration {} is not a whole number followed by ms, s, m or h",
                excerpt(text)
            ))),
        }
    }

    /// Writes `duration` (to the millisecond) in the largest exact unit.
    pub fn format(duration: Duration) -> String {
        let ms = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
        let (name, scale) = UNITS
            .iter()
            .find(|(_, scale)| ms != 0 && ms % scale == 0)
            .copied()
            .unwrap_or(("ms", 1));
        format!("{}{name}", ms / scale)
    }

    /// For `#[serde(with = "…")]`.
    pub fn serialize<S: Serializer>(duration: &Duration, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        serializer.serialize_str(&format(*duration))
    }

    /// For `#[serde(with = "…")]`.
    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Duration, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn rfc3339_as_in_appendix_b() {
        let t = Timestamp::parse_rfc3339("2026-01-27T10:30:00Z").unwrap();
        assert_eq!(t.unix_seconds(), 1_769_509_800);
        assert_eq!(t.to_string(), "2026-01-27T10:30:00Z");
        let t = Timestamp::parse_rfc3339("2026-01-27T11:30:00.250+01:00").unwrap();
        assert_eq!(t.to_string(), "2026-01-27T10:30:00.25Z");
    }

    #[test]
    fn bad_timestamps_name_the_input() {
        let err = Timestamp::parse_rfc3339("yesterday").unwrap_err().to_string();
        assert!(err.contains("\"yesterday\" is not RFC 3339"), "{err}");
        assert!(Timestamp::from_unix_millis(i64::MAX).is_none());
        assert!(Timestamp::from_unix_seconds(i64::MAX).is_none());
    }

    #[test]
    fn coarse_clock_follows_the_wall_clock() {
        let clock = CoarseClock::new(Duration::from_millis(1)).unwrap();
        let first = clock.now();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while clock.now() <= first {
            assert!(
                std::time::Instant::now() < deadline,
                "the thread never refreshed the clock"
            );
            std::thread::yield_now();
        }
        assert!(Timestamp::now().duration_since(clock.now()) < Duration::from_secs(1));
    }

    #[test]
    fn manual_clock_moves_only_when_told() {
        let clock = ManualClock::new(Timestamp::UNIX_EPOCH);
        assert_eq!(clock.now(), Timestamp::UNIX_EPOCH);
        clock.advance(Duration::from_millis(1500));
        assert_eq!(clock.now().unix_millis(), 1500);
        clock.advance(Duration::MAX);
        assert_eq!(clock.now().unix_millis(), MAX_MILLIS);
    }

    #[test]
    fn duration_text_round_trips_and_names_bad_text() {
        for (text, ms) in [
            ("250ms", 250),
            ("30s", 30_000),
            ("5m", 300_000),
            ("1h", 3_600_000),
            ("0ms", 0),
        ] {
            assert_eq!(duration_text::parse(text).unwrap(), Duration::from_millis(ms));
            assert_eq!(duration_text::format(Duration::from_millis(ms)), text);
        }
        assert_eq!(duration_text::format(Duration::from_millis(90_000)), "90s");
        for bad in ["", "5", "s", "-5s", "1.5s", "5 s", "5d", "99999999999999999999h"] {
            let err = duration_text::parse(bad).unwrap_err().to_string();
            assert!(err.contains("duration"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn arithmetic_saturates() {
        let t = Timestamp::from_unix_millis(MAX_MILLIS).unwrap();
        assert_eq!(t.saturating_add(Duration::from_secs(1)), t);
        assert_eq!(
            Timestamp::UNIX_EPOCH.duration_since(t),
            Duration::ZERO,
            "earlier minus later is zero"
        );
    }

    proptest! {
        #[test]
        fn rfc3339_round_trips(millis in MIN_MILLIS..=MAX_MILLIS) {
            let t = Timestamp::from_unix_millis(millis).unwrap();
            prop_assert_eq!(Timestamp::parse_rfc3339(&t.to_rfc3339()).unwrap(), t);
            let through_system: Timestamp = SystemTime::from(t).into();
            prop_assert_eq!(through_system, t);
        }
    }
}
