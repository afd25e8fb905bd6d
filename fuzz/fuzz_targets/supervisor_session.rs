//! `opamp_core::testkit::fuzz::supervisor_session` on the memory backends: see docs/fuzzing.md.
#![no_main]

use std::sync::Arc;

use opamp_bus::memory::MemoryBus;
use opamp_fuzz as _;
use opamp_store::memory::MemoryStore;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    opamp_core::testkit::fuzz::supervisor_session(data, Arc::new(MemoryStore::new()), Arc::new(MemoryBus::new()))
});
