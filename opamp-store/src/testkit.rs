//! Test support shared with the fuzz targets (feature `testkit`).

pub mod fuzz {
    //! The checks behind this crate's fuzz targets, shared with the corpus
    //! replay test (`tests/fuzz_corpus.rs`). A check exists when the feature
    //! of the code it drives is on.

    #[cfg(feature = "redis")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
    pub use crate::redis::fuzz::redis_status;

    /// A fuzz target's check: panics when an invariant breaks.
    pub type Check = fn(&[u8]);

    /// A seed input: its target, its file name under `fuzz/corpus/<target>/`, and its bytes.
    pub type Seed = (&'static str, &'static str, Vec<u8>);

    /// The seed corpus of this crate's targets (the replay test checks the
    /// committed files are these).
    pub fn seeds() -> Vec<Seed> {
        let mut seeds = Vec::new();
        #[cfg(feature = "redis")]
        seeds.extend(crate::redis::fuzz::seeds());
        seeds
    }

    /// Every fuzz target of this crate whose feature is on, by target name.
    pub const TARGETS: &[(&str, Check)] = &[
        #[cfg(feature = "redis")]
        ("redis_status", redis_status),
    ];
}
