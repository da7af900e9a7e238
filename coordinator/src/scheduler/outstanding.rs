//! The work still ahead of a run's shards out on workers, from when each is due to end.

use std::collections::BTreeSet;

/// A run's live attempts by when each is due to end (its hand-out, plus the per-shard
/// overhead, plus its tests' estimates), so that a slot asking for a shard shares out what is
/// really left: a shard that has run for most of its estimate has little left, whatever its
/// tests add up to while their results wait for its end (nextest, a JUnit file). Without it,
/// the last shards of a run were sized as if every running shard had just started, so they
/// came out too large and the run ended on one slot while the others idled.
///
/// Adding, removing and reading are O(log n) amortised in the live attempts: an attempt past
/// its due time leaves the set when it is read (it counts nothing more) and its removal later
/// is a no-op.
#[derive(Debug)]
pub struct Outstanding<K> {
    /// (due ms, attempt) of the attempts not yet past due.
    due: BTreeSet<(u64, K)>,
    /// The sum of their due times.
    sum_due: u128,
}

impl<K> Default for Outstanding<K> {
    fn default() -> Self {
        Self {
            due: BTreeSet::new(),
            sum_due: 0,
        }
    }
}

impl<K: Ord + Copy> Outstanding<K> {
    /// Attempt `id` is due to end at `due_ms`.
    pub fn add(&mut self, due_ms: u64, id: K) {
        if self.due.insert((due_ms, id)) {
            self.sum_due += u128::from(due_ms);
        }
    }

    /// Attempt `id`, due at `due_ms`, ended (or is gone).
    pub fn remove(&mut self, due_ms: u64, id: K) {
        if self.due.remove(&(due_ms, id)) {
            self.sum_due -= u128::from(due_ms);
        }
    }

    /// The work left at `now_ms`: the sum of `due − now` over the attempts not yet due.
    pub fn left_ms(&mut self, now_ms: u64) -> f64 {
        while let Some(&(due, id)) = self.due.first()
            && due <= now_ms
        {
            self.remove(due, id);
        }
        let n = self.due.len() as u128;
        (self.sum_due - n * u128::from(now_ms)) as f64
    }

    /// The attempts held, with when each is due.
    pub fn iter(&self) -> impl Iterator<Item = &(u64, K)> {
        self.due.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_left_is_each_shards_time_to_its_due_end() {
        let mut o = Outstanding::default();
        o.add(1_000, 'a');
        o.add(1_500, 'b');
        assert_eq!(o.left_ms(0), 2_500.0);
        // A shard that has run most of its estimate has little left.
        assert_eq!(o.left_ms(900), 100.0 + 600.0);
        // One past due counts nothing, and leaves.
        assert_eq!(o.left_ms(1_200), 300.0);
        assert!(!o.iter().any(|&(_, id)| id == 'a'));
        // Its removal later changes nothing.
        o.remove(1_000, 'a');
        assert_eq!(o.left_ms(1_200), 300.0);
        // An attempt that ends early leaves at once.
        o.remove(1_500, 'b');
        assert_eq!(o.left_ms(1_200), 0.0);
        // Two attempts due at the same time are two.
        o.add(2_000, 'c');
        o.add(2_000, 'd');
        assert_eq!(o.left_ms(1_000), 2_000.0);
        o.remove(2_000, 'c');
        assert_eq!(o.left_ms(1_000), 1_000.0);
        assert_eq!(o.iter().count(), 1);
    }
}
