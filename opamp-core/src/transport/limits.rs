//! How much one device may make the store and the bus hold about it.
//!
//! Everything a device says about itself (its labels, its custom
//! capabilities, the errors it reports) is written to the store and, for
//! outcomes, published on the bus. Without bounds, one device could put
//! megabytes in every status and event (a transport's message limit is
//! 4 MiB over gRPC, 64 MiB over OpAMP). [`DeviceLimits`] bounds them:
//!
//! - what a device *is* (labels, custom capabilities) is checked when it
//!   registers: a hello over a limit is refused with an error that names the
//!   field, and the device can fix its configuration;
//! - what a device *reports* in free text (`last_error`, a failed command's
//!   reason, a configuration's apply error) is cut to
//!   [`max_error_bytes`](DeviceLimits::max_error_bytes) and marked as cut,
//!   not refused: refusing it would hide the device's failure from the
//!   operator.
//!
//! - how *often* a device reports: each session has a [`ReportBucket`] of
//!   [`max_report_burst`](DeviceLimits::max_report_burst) reports, refilled
//!   at [`max_reports_per_minute`](DeviceLimits::max_reports_per_minute);
//!   a report beyond it is not passed on, and the device is told when to
//!   come back (OpAMP `UNAVAILABLE` with `RetryInfo`; gRPC ends the stream
//!   `RESOURCE_EXHAUSTED`).
//!
//! The transports check hellos with their own limits so that the device is
//! told why (gRPC `INVALID_ARGUMENT`, an OpAMP `ServerErrorResponse`); the
//! supervisor checks every hello again and cuts every error, whatever
//! transport brought it.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::DeviceHello;
use crate::{Error, Result};

/// Bounds on what a device may report about itself; see the [module](self).
///
/// ```
/// use opamp_core::transport::{DeviceHello, DeviceLimits};
/// use opamp_core::DeviceId;
///
/// let limits = DeviceLimits::default();
/// let mut hello = DeviceHello::new(DeviceId::new("device-5")?);
/// hello.labels.insert("site".into(), "x".repeat(2000));
/// let err = limits.check_hello(&hello).unwrap_err().to_string();
/// assert!(err.contains("label \"site\": its value is 2000 bytes; the limit is 1024"), "{err}");
///
/// let mut error = "é".repeat(3000);
/// limits.cut_error(&mut error);
/// assert!(error.len() <= limits.max_error_bytes);
/// assert!(error.ends_with("… (cut from 6000 bytes)"));
/// # Ok::<(), opamp_core::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct DeviceLimits {
    /// Labels a device may have. Default 64.
    pub max_labels: usize,
    /// Bytes of one label's key. Default 128.
    pub max_label_key_bytes: usize,
    /// Bytes of one label's value. Default 1024.
    pub max_label_value_bytes: usize,
    /// Custom capabilities a device may declare. Default 32.
    pub max_custom_capabilities: usize,
    /// Bytes of one custom capability's name. Default 128.
    pub max_capability_bytes: usize,
    /// Bytes of an error a device reports; longer ones are cut. Default 4096.
    pub max_error_bytes: usize,
    /// Reports one session may send per minute, on average; 0 for no
    /// limit. A report is a message the device sends unasked (status,
    /// heartbeat); its answers to the server's commands and configurations
    /// are never held back. Default 600 (10 a second).
    pub max_reports_per_minute: u32,
    /// Reports one session may send at once, beyond the average. Default 100.
    pub max_report_burst: u32,
}

impl Default for DeviceLimits {
    fn default() -> Self {
        DeviceLimits {
            max_labels: 64,
            max_label_key_bytes: 128,
            max_label_value_bytes: 1024,
            max_custom_capabilities: 32,
            max_capability_bytes: 128,
            max_error_bytes: 4096,
            max_reports_per_minute: 600,
            max_report_burst: 100,
        }
    }
}

/// What is appended to an error that was cut; the marker names the length it had.
const CUT_MARKER_ROOM: usize = 32;

impl DeviceLimits {
    /// Whether `hello` keeps within the limits: [`Error::InvalidInput`]
    /// naming the device, the field and the limit if not.
    pub fn check_hello(&self, hello: &DeviceHello) -> Result<()> {
        let device = &hello.device;
        let over = |what: String| Err(Error::invalid_input(format!("device {device}: {what}")));
        if hello.labels.len() > self.max_labels {
            return over(format!(
                "{} labels; the limit is {}",
                hello.labels.len(),
                self.max_labels
            ));
        }
        for (key, value) in &hello.labels {
            if key.len() > self.max_label_key_bytes {
                return over(format!(
                    "a label key of {} bytes ({}); the limit is {}",
                    key.len(),
                    crate::error::excerpt(key),
                    self.max_label_key_bytes
                ));
            }
            if value.len() > self.max_label_value_bytes {
                return over(format!(
                    "label {key:?}: its value is {} bytes; the limit is {}",
                    value.len(),
                    self.max_label_value_bytes
                ));
            }
        }
        let custom = &hello.capabilities.custom;
        if custom.len() > self.max_custom_capabilities {
            return over(format!(
                "{} custom capabilities; the limit is {}",
                custom.len(),
                self.max_custom_capabilities
            ));
        }
        if let Some(name) = custom.iter().find(|name| name.len() > self.max_capability_bytes) {
            return over(format!(
                "a custom capability of {} bytes ({}); the limit is {}",
                name.len(),
                crate::error::excerpt(name),
                self.max_capability_bytes
            ));
        }
        Ok(())
    }

    /// Cuts `error` to at most [`max_error_bytes`](Self::max_error_bytes),
    /// on a character boundary, ending it with `… (cut from N bytes)`.
    pub fn cut_error(&self, error: &mut String) {
        if error.len() <= self.max_error_bytes {
            return;
        }
        let original = error.len();
        let mut end = self.max_error_bytes.saturating_sub(CUT_MARKER_ROOM);
        while !error.is_char_boundary(end) {
            end -= 1;
        }
        error.truncate(end);
        error.push_str(&format!("… (cut from {original} bytes)"));
    }

    /// [`cut_error`](Self::cut_error) on an error that may be absent.
    pub fn cut_optional_error(&self, error: &mut Option<String>) {
        if let Some(error) = error {
            self.cut_error(error);
        }
    }
}

impl DeviceLimits {
    /// Allowing `per_minute` reports a minute on average (0: no limit), in bursts of `burst`.
    pub fn report_rate(mut self, per_minute: u32, burst: u32) -> Self {
        self.max_reports_per_minute = per_minute;
        self.max_report_burst = burst.max(1);
        self
    }

    /// A session's allowance of reports, full.
    pub fn report_bucket(&self) -> ReportBucket {
        ReportBucket {
            millis: self.max_report_burst.max(1).saturating_mul(1000),
            last: Instant::now(),
        }
    }
}

/// One session's allowance of reports under [`DeviceLimits`]: a token
/// bucket, in thousandths of a report.
#[derive(Debug, Clone)]
pub struct ReportBucket {
    millis: u32,
    last: Instant,
}

impl ReportBucket {
    /// Takes one report's allowance at `now`; when none is left, how long
    /// until one is (nothing is taken then).
    pub fn take(&mut self, limits: &DeviceLimits, now: Instant) -> std::result::Result<(), Duration> {
        let per_minute = limits.max_reports_per_minute;
        if per_minute == 0 {
            return Ok(());
        }
        // per_minute reports a minute is per_minute / 60 thousandths a millisecond.
        let elapsed = now
            .saturating_duration_since(self.last)
            .as_millis()
            .min(u128::from(u32::MAX)) as u64;
        let full = u64::from(limits.max_report_burst.max(1)) * 1000;
        let refilled = (u64::from(self.millis) + elapsed * u64::from(per_minute) / 60).min(full);
        self.last = now;
        if refilled >= 1000 {
            self.millis = (refilled - 1000) as u32;
            Ok(())
        } else {
            self.millis = refilled as u32;
            let wait_ms = ((1000 - refilled) * 60).div_ceil(u64::from(per_minute));
            Err(Duration::from_millis(wait_ms.max(1)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DeviceId;

    fn hello() -> DeviceHello {
        DeviceHello::new(DeviceId::new("d1").unwrap())
    }

    #[test]
    fn a_hello_within_the_limits_passes() {
        let limits = DeviceLimits::default();
        let mut hello = hello();
        for n in 0..64 {
            hello.labels.insert(format!("k{n}"), "v".repeat(1024));
        }
        hello.capabilities.custom = (0..32).map(|n| format!("com.example.{n}")).collect();
        limits.check_hello(&hello).unwrap();
    }

    #[test]
    fn each_limit_names_its_field() {
        let limits = DeviceLimits::default();
        let refused = |hello: DeviceHello| limits.check_hello(&hello).unwrap_err().to_string();

        let mut many = hello();
        many.labels = (0..65).map(|n| (format!("k{n}"), String::new())).collect();
        assert!(refused(many).contains("device d1: 65 labels; the limit is 64"));

        let mut long_key = hello();
        long_key.labels.insert("k".repeat(129), String::new());
        assert!(refused(long_key).contains("a label key of 129 bytes"));

        let mut long_value = hello();
        long_value.labels.insert("site".into(), "v".repeat(1025));
        assert!(refused(long_value).contains("label \"site\": its value is 1025 bytes; the limit is 1024"));

        let mut caps = hello();
        caps.capabilities.custom = (0..33).map(|n| n.to_string()).collect();
        assert!(refused(caps).contains("33 custom capabilities; the limit is 32"));

        let mut long_cap = hello();
        long_cap.capabilities.custom = vec!["c".repeat(129)];
        let err = refused(long_cap);
        assert!(err.contains("a custom capability of 129 bytes"), "{err}");
        assert!(err.len() < 300, "the name is quoted in part: {err}");
    }

    #[test]
    fn errors_are_cut_on_a_character_boundary_and_say_so() {
        let limits = DeviceLimits::default();
        let mut short = "disk full".to_owned();
        limits.cut_error(&mut short);
        assert_eq!(short, "disk full");

        for long in ["x".repeat(10_000), "é".repeat(5_000), "😀".repeat(2_000)] {
            let mut cut = long.clone();
            limits.cut_error(&mut cut);
            assert!(cut.len() <= limits.max_error_bytes, "{}", cut.len());
            assert!(cut.ends_with(&format!("… (cut from {} bytes)", long.len())), "{cut}");
        }
        let mut absent = None;
        limits.cut_optional_error(&mut absent);
        assert_eq!(absent, None);
    }

    #[test]
    fn reports_past_the_burst_wait_for_the_refill() {
        let limits = DeviceLimits {
            max_reports_per_minute: 600,
            max_report_burst: 3,
            ..DeviceLimits::default()
        };
        let mut bucket = limits.report_bucket();
        let start = Instant::now();
        for _ in 0..3 {
            bucket.take(&limits, start).unwrap();
        }
        // 600 a minute is one per 100 ms.
        assert_eq!(bucket.take(&limits, start), Err(Duration::from_millis(100)));
        assert_eq!(
            bucket.take(&limits, start + Duration::from_millis(40)),
            Err(Duration::from_millis(60))
        );
        bucket.take(&limits, start + Duration::from_millis(100)).unwrap();
        // Refilled no further than the burst, however long the quiet.
        let later = start + Duration::from_secs(3600);
        for _ in 0..3 {
            bucket.take(&limits, later).unwrap();
        }
        assert!(bucket.take(&limits, later).is_err());
        let unlimited = DeviceLimits {
            max_reports_per_minute: 0,
            ..limits
        };
        for _ in 0..1000 {
            bucket.take(&unlimited, later).unwrap();
        }
    }
}
