//! Fuzzes `opamp_core::testkit::fuzz::config_update_json`: never panics, and round-trips.
#![no_main]

use opamp_fuzz as _;

libfuzzer_sys::fuzz_target!(|data: &[u8]| opamp_core::testkit::fuzz::config_update_json(data));
