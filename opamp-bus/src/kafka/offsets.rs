//! What of one partition may be committed: the contiguous acknowledged prefix.

use std::collections::BTreeSet;

/// The offsets one consumer took from one partition and has not finished.
///
/// Kafka keeps one committed offset per partition and group: the next offset
/// to read. With acknowledgements in any order, the offset that may be
/// committed is the oldest one still outstanding, or, with none outstanding,
/// the one after the last taken.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct PartitionOffsets {
    /// The offset after the last one taken, once one was.
    next: Option<i64>,
    /// Taken and still being worked on (delivered and unacknowledged, or on
    /// their way to the dead-letter topic).
    outstanding: BTreeSet<i64>,
    /// The offset last committed (or being committed) by this consumer.
    committed: Option<i64>,
    /// The offset after a gap that is being read again.
    rereading: Option<i64>,
}

impl PartitionOffsets {
    /// Offsets of a partition whose reading starts at `start`, itself
    /// committed already (or `None`: nothing known yet).
    pub(super) fn starting_at(start: Option<i64>) -> Self {
        PartitionOffsets {
            next: start,
            outstanding: BTreeSet::new(),
            committed: start,
            rereading: None,
        }
    }

    /// Whether `offset`, just read, comes after offsets never read that
    /// should be read again first: then the offset to read from. A gap is
    /// read again once; the same gap again is taken as it is (offsets a
    /// broker leaves out on purpose: transaction markers, compacted or
    /// deleted records).
    pub(super) fn unread_gap(&mut self, offset: i64) -> Option<i64> {
        let next = self.next.filter(|&next| offset > next)?;
        if self.rereading == Some(offset) {
            return None;
        }
        self.rereading = Some(offset);
        Some(next)
    }

    /// Records that `offset` was read; `hold` keeps it outstanding until
    /// [`finish`](Self::finish) (otherwise it is done at once: skipped).
    pub(super) fn take(&mut self, offset: i64, hold: bool) {
        self.next = Some(offset.saturating_add(1));
        if self.rereading.is_some_and(|after_gap| offset >= after_gap) {
            self.rereading = None;
        }
        if hold {
            self.outstanding.insert(offset);
        }
    }

    /// Records that `offset` is done (acknowledged, or dead-lettered). Returns
    /// whether it was outstanding.
    pub(super) fn finish(&mut self, offset: i64) -> bool {
        self.outstanding.remove(&offset)
    }

    /// Where the next read starts: after the last offset taken.
    pub(super) fn next(&self) -> Option<i64> {
        self.next
    }

    /// How many offsets are outstanding.
    pub(super) fn in_flight(&self) -> usize {
        self.outstanding.len()
    }

    /// The offset that may be committed now, if it differs from the last one
    /// committed; recorded as committed.
    pub(super) fn take_commit(&mut self) -> Option<i64> {
        let point = self.outstanding.first().copied().or(self.next)?;
        if self.committed == Some(point) {
            return None;
        }
        self.committed = Some(point);
        Some(point)
    }

    /// Forgets a commit that failed, so that the next round tries again.
    pub(super) fn commit_failed(&mut self, offset: i64) {
        if self.committed == Some(offset) {
            self.committed = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_only_the_acknowledged_prefix() {
        let mut offsets = PartitionOffsets::starting_at(None);
        assert_eq!(offsets.take_commit(), None, "nothing read, nothing to commit");
        for offset in 10..16 {
            offsets.take(offset, true);
        }
        assert_eq!(offsets.in_flight(), 6);
        assert_eq!(offsets.take_commit(), Some(10), "nothing acknowledged: the first one");
        // Acknowledge 16, 14, 11 and 12 (the 6th, 4th, 1st and 2nd).
        for offset in [15, 13, 10, 11] {
            assert!(offsets.finish(offset));
        }
        assert!(!offsets.finish(10), "a second acknowledgement changes nothing");
        assert_eq!(offsets.take_commit(), Some(12));
        assert_eq!(offsets.take_commit(), None, "committed already");
        offsets.finish(12);
        offsets.finish(14);
        assert_eq!(offsets.take_commit(), Some(16), "all done: after the last read");
        assert_eq!(offsets.next(), Some(16));
        assert_eq!(offsets.in_flight(), 0);
    }

    #[test]
    fn skipped_offsets_move_the_commit_point_past_them() {
        let mut offsets = PartitionOffsets::starting_at(Some(3));
        assert_eq!(offsets.take_commit(), None, "the start is committed already");
        offsets.take(3, false);
        offsets.take(4, true);
        offsets.take(5, false);
        assert_eq!(offsets.take_commit(), Some(4));
        offsets.finish(4);
        assert_eq!(offsets.take_commit(), Some(6));
    }

    #[test]
    fn a_gap_is_read_again_once() {
        let mut offsets = PartitionOffsets::starting_at(Some(3));
        assert_eq!(offsets.unread_gap(3), None, "the offset expected");
        offsets.take(3, true);
        assert_eq!(offsets.unread_gap(6), Some(4), "4 and 5 were never read");
        // Read again, the gap is filled: 4, 5, then 6 comes in turn.
        for offset in 4..=6 {
            assert_eq!(offsets.unread_gap(offset), None);
            offsets.take(offset, true);
        }
        assert_eq!(offsets.unread_gap(9), Some(7), "a new gap is read again too");
        assert_eq!(
            offsets.unread_gap(9),
            None,
            "the same gap a second time is taken as it is"
        );
        offsets.take(9, true);
        assert_eq!(offsets.take_commit(), None, "nothing acknowledged: still at the start");
        for offset in [3, 4, 5, 6, 9] {
            assert!(offsets.finish(offset));
        }
        assert_eq!(
            offsets.take_commit(),
            Some(10),
            "past the gap once it was taken as it is"
        );
        assert_eq!(
            offsets.unread_gap(8),
            None,
            "older offsets (read again after a pause) are no gap"
        );
        assert_eq!(offsets.unread_gap(12), Some(10));
    }

    #[test]
    fn a_failed_commit_is_tried_again() {
        let mut offsets = PartitionOffsets::starting_at(None);
        offsets.take(0, false);
        assert_eq!(offsets.take_commit(), Some(1));
        offsets.commit_failed(1);
        assert_eq!(offsets.take_commit(), Some(1));
        offsets.commit_failed(7);
        assert_eq!(
            offsets.take_commit(),
            None,
            "an older failure does not undo a newer commit"
        );
    }
}
