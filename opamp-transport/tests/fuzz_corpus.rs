//! Replays every saved input of this crate's fuzz targets
//! (`fuzz/corpus/<target>/*`) through the target's check, so inputs that
//! once found a bug stay fixed.

use opamp_core::testkit::fuzz::{replay_corpus, seeds_are_committed};
use opamp_transport::testkit::fuzz::{TARGETS, seeds};

#[test]
fn the_seeds_are_real_messages() {
    seeds_are_committed(seeds());
}

#[test]
fn every_corpus_input_passes_its_check() {
    assert_eq!(TARGETS.len(), 6, "every target of this crate is replayed");
    replay_corpus(TARGETS);
}
