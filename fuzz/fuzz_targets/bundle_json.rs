//! Fuzzes `opamp_core::testkit::fuzz::bundle_json`: never panics, and round-trips.
#![no_main]

use opamp_fuzz as _;

libfuzzer_sys::fuzz_target!(|data: &[u8]| opamp_core::testkit::fuzz::bundle_json(data));
