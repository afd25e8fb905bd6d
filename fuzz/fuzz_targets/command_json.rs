//! The Appendix B command JSON decoder: never panics, and round-trips.
#![no_main]

use opamp_fuzz as _;

libfuzzer_sys::fuzz_target!(|data: &[u8]| opamp_core::testkit::fuzz::command_json(data));
