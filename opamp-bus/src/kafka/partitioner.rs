//! Which partition a key goes to: Kafka's murmur2 partitioner.
//!
//! The producer is configured with librdkafka's `murmur2_random` partitioner,
//! which for a keyed message is the Java client's default: the 32-bit murmur2
//! hash of the key bytes (seed `0x9747b28c`), its sign bit cleared, modulo the
//! partition count. Consumers compute the same here, so a supervisor reads
//! only the partition its id maps to, and producers in other languages place
//! keys where this library looks for them.

/// Kafka's murmur2 hash of `data` (`org.apache.kafka.common.utils.Utils.murmur2`).
pub fn murmur2(data: &[u8]) -> u32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;

    // The length is folded in modulo 2^32, as the reference does with its `int`.
    let mut h = SEED ^ (data.len() as u32);
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = chunks.remainder();
    if !tail.is_empty() {
        for (i, byte) in tail.iter().enumerate().rev() {
            h ^= u32::from(*byte) << (8 * i);
        }
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

/// The partition, of `partitions`, that a message keyed `key` goes to.
///
/// `partitions` below 1 is taken as 1 (a topic has at least one partition).
///
/// ```
/// use opamp_bus::kafka::key_partition;
///
/// let p = key_partition(b"supervisor-pod-3", 64);
/// assert!((0..64).contains(&p));
/// assert_eq!(key_partition(b"supervisor-pod-3", 1), 0);
/// ```
pub fn key_partition(key: &[u8], partitions: i32) -> i32 {
    let partitions = partitions.max(1).unsigned_abs();
    // Below `partitions`, itself at most i32::MAX.
    ((murmur2(key) & 0x7fff_ffff) % partitions) as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference values of Kafka's own `UtilsTest.testMurmur2` (as Java `int`s).
    #[test]
    fn matches_the_java_client() {
        let cases: [(&[u8], i32); 6] = [
            (b"21", -973_932_308),
            (b"foobar", -790_332_482),
            (b"a-little-bit-long-string", -985_981_536),
            (b"a-little-bit-longer-string", -1_486_304_829),
            (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58_897_971),
            (b"abc", 479_470_107),
        ];
        for (data, expected) in cases {
            assert_eq!(murmur2(data) as i32, expected, "{}", String::from_utf8_lossy(data));
        }
    }

    #[test]
    fn partitions_are_in_range_and_stable() {
        for n in [1, 2, 3, 64, 1000] {
            for key in ["", "a", "supervisor-pod-3", "device-000042"] {
                let p = key_partition(key.as_bytes(), n);
                assert!((0..n).contains(&p));
                assert_eq!(p, key_partition(key.as_bytes(), n));
            }
        }
        assert_eq!(key_partition(b"x", 0), 0, "no partitions is taken as one");
    }
}
