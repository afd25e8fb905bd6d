//! Replays every saved input of every fuzz target (`fuzz/corpus/<target>/*`)
//! through the target's check, so inputs that once found a bug stay fixed.

use std::path::Path;

use opamp_core::testkit::fuzz::TARGETS;

#[test]
fn every_corpus_input_passes_its_check() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    for (target, check) in TARGETS {
        let dir = corpus.join(target);
        let entries = std::fs::read_dir(&dir).unwrap_or_else(|err| panic!("{}: {err}", dir.display()));
        let mut replayed = 0;
        for entry in entries {
            let path = entry.expect("a readable corpus folder").path();
            let data = std::fs::read(&path).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
            if std::panic::catch_unwind(|| check(&data)).is_err() {
                panic!("fuzz target {target}: input {} breaks its invariant", path.display());
            }
            replayed += 1;
        }
        assert!(
            replayed > 0,
            "fuzz target {target} has no seed corpus in {}",
            dir.display()
        );
    }
}
