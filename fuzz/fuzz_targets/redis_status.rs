//! `opamp_store::testkit::fuzz::redis_status`: see docs/fuzzing.md.
#![no_main]

use opamp_fuzz as _;

libfuzzer_sys::fuzz_target!(|data: &[u8]| opamp_store::testkit::fuzz::redis_status(data));
