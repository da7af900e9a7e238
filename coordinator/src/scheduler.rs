//! Pure scheduling decisions, free of I/O and of the core's bookkeeping, so they can be tested
//! and benchmarked on their own.

/// How many tests to put in the next shard of a run with `queued` tests waiting, when
/// `fleet_slots` slots may take the run.
///
/// Early in a run shards are large, so the per-shard hand-out and start-up cost stays small; as
/// the queue drains they shrink to single tests, so the last slots finish together instead of
/// one slot carrying a long tail. Aiming each shard at a third of a slot's fair share of what is
/// left gives every slot about three hand-outs from any point on.
pub fn batch_size(queued: usize, fleet_slots: usize) -> usize {
    const MAX: usize = 64;
    if queued == 0 {
        return 0;
    }
    let slots = fleet_slots.max(1);
    queued.div_ceil(slots * 3).clamp(1, MAX).min(queued)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_shrink_as_the_queue_drains() {
        assert_eq!(batch_size(0, 4), 0);
        assert_eq!(batch_size(1, 4), 1);
        assert_eq!(batch_size(200, 12), 6);
        assert_eq!(batch_size(20, 12), 1);
        assert_eq!(batch_size(100_000, 4), 64);
        assert_eq!(batch_size(5, 0), 2);
    }

    #[test]
    fn a_shard_never_exceeds_the_queue() {
        for q in 0..300 {
            for s in 0..50 {
                let n = batch_size(q, s);
                assert!(n <= q);
                assert!(q == 0 || n >= 1);
            }
        }
    }
}
