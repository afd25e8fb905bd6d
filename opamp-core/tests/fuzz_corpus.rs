//! Replays every saved input of every fuzz target of this crate
//! (`fuzz/corpus/<target>/*`) through the target's check, so inputs that
//! once found a bug stay fixed.

use opamp_core::testkit::fuzz::{TARGETS, replay_corpus};

#[test]
fn every_corpus_input_passes_its_check() {
    replay_corpus(TARGETS);
}
