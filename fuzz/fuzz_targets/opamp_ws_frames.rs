//! `opamp_transport::testkit::fuzz::opamp_ws_frames`: see docs/fuzzing.md.
#![no_main]

use opamp_fuzz as _;

libfuzzer_sys::fuzz_target!(|data: &[u8]| opamp_transport::testkit::fuzz::opamp_ws_frames(data));
