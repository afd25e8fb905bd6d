//! Replays every saved input of every fuzz target of this crate
//! (`fuzz/corpus/<target>/*`) through the target's check, so inputs that
//! once found a bug stay fixed.

use std::sync::Arc;

use opamp_bus::memory::MemoryBus;
use opamp_core::testkit::fuzz::{self, Check, TARGETS, replay_corpus, seeds_are_committed};
use opamp_store::memory::MemoryStore;

#[test]
fn every_corpus_input_passes_its_check() {
    replay_corpus(TARGETS);
}

/// The check as the fuzz target runs it: on the memory backends.
fn supervisor_session(data: &[u8]) {
    fuzz::supervisor_session(data, Arc::new(MemoryStore::new()), Arc::new(MemoryBus::new()));
}

#[test]
fn every_supervisor_session_input_passes_its_check() {
    replay_corpus(&[("supervisor_session", supervisor_session as Check)]);
}

/// Scripts are not messages: the seeds are byte patterns, which the
/// script's reader turns into a few steps each.
#[test]
fn the_supervisor_session_seeds_are_committed() {
    let pattern = |length: u32| {
        (0..length)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect()
    };
    seeds_are_committed(vec![
        ("supervisor_session", "script-short", pattern(48)),
        ("supervisor_session", "script-long", pattern(512)),
    ]);
}
