//! A run's waiting tests and how each shard is formed from them.

use std::collections::BinaryHeap;

use super::{FAIL_FIRST_KEY, MIN_OVERHEAD_MS, Plan};

/// How many tests of other units a shard formed with affinity (see [`RunQueue::next_shard_by`])
/// may pass over, looking for its own unit's.
pub const AFFINITY_LOOKAHEAD: usize = 512;

/// What the queue needs to know about the fleet when it forms a shard.
#[derive(Debug, Clone, Copy)]
pub struct ShardContext {
    /// Slots that may take this run.
    pub slots: usize,
    /// Estimated work of this run's tests that are out on workers now.
    pub running_ms: f64,
    /// Measured cost of one hand-out (runner start-up, round trips), in milliseconds.
    pub overhead_ms: f64,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    key: f64,
    estimate_ms: f64,
    idx: u32,
    cold: bool,
}

// The heap's order: the largest key first; among equal keys, the lowest index (submission
// order) first.
impl Ord for Entry {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.key.total_cmp(&other.key).then(other.idx.cmp(&self.idx))
    }
}

impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}

impl Eq for Entry {}

/// A run's waiting tests in a max-heap on the order key: taking the next test and putting a
/// lost one back are both O(log n), however large the run.
#[derive(Debug, Default)]
pub struct RunQueue {
    items: BinaryHeap<Entry>,
    queued_ms: f64,
    /// Waiting tests with no history.
    cold: usize,
    /// No test of the run has history: its guesses come from its own first results, which are
    /// its quickest tests, so they are batched by count too (see [`RunQueue::next_shard`]).
    count_guesses: bool,
}

impl RunQueue {
    /// A queue of tests `0..plans.len()`.
    pub fn new(plans: &[Plan]) -> Self {
        let mut items: Vec<Entry> = plans
            .iter()
            .enumerate()
            .map(|(i, p)| Entry {
                key: p.key,
                estimate_ms: p.estimate_ms,
                idx: i as u32,
                cold: p.cold,
            })
            .collect();
        let queued_ms = items.iter().map(|e| e.estimate_ms).sum();
        let cold = items.iter().filter(|e| e.cold).count();
        items.shrink_to_fit();
        Self {
            items: BinaryHeap::from(items),
            queued_ms,
            cold,
            count_guesses: plans.iter().all(|p| p.cold),
        }
    }

    /// A queue of `plans` for the given test indexes only (a resumed run).
    pub fn with(plans: &[Plan], idxs: impl IntoIterator<Item = u32>) -> Self {
        let mut q = Self {
            count_guesses: plans.iter().all(|p| p.cold),
            ..Self::default()
        };
        for i in idxs {
            q.push(i, plans[i as usize]);
        }
        q
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// The indexes of the waiting tests, in no particular order.
    pub fn indexes(&self) -> impl Iterator<Item = u32> + '_ {
        self.items.iter().map(|e| e.idx)
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Estimated work waiting, in milliseconds.
    pub fn queued_ms(&self) -> f64 {
        self.queued_ms.max(0.0)
    }

    /// Puts a test back (its attempt was lost) at its place in the order.
    pub fn push(&mut self, idx: u32, plan: Plan) {
        let e = Entry {
            key: plan.key,
            estimate_ms: plan.estimate_ms,
            idx,
            cold: plan.cold,
        };
        self.items.push(e);
        self.queued_ms += plan.estimate_ms;
        self.cold += usize::from(plan.cold);
    }

    /// Re-plans the waiting tests: `f` gives a test's new plan, or `None` to keep it.
    /// O(waiting tests).
    pub fn replan(&mut self, mut f: impl FnMut(u32, Plan) -> Option<Plan>) {
        let mut items = std::mem::take(&mut self.items).into_vec();
        let (mut queued_ms, mut cold) = (0.0, 0);
        for e in &mut items {
            let old = Plan {
                estimate_ms: e.estimate_ms,
                key: e.key,
                cold: e.cold,
            };
            if let Some(p) = f(e.idx, old) {
                (e.key, e.estimate_ms, e.cold) = (p.key, p.estimate_ms, p.cold);
            }
            queued_ms += e.estimate_ms;
            cold += usize::from(e.cold);
        }
        self.items = BinaryHeap::from(items);
        self.queued_ms = queued_ms;
        self.cold = cold;
    }

    /// Takes the next shard: test indexes in the order they should run.
    pub fn next_shard(&mut self, ctx: ShardContext) -> Vec<u32> {
        self.next_shard_by(ctx, None::<fn(u32)>)
    }

    /// [`RunQueue::next_shard`] for a runner that pays a start-up cost per unit a shard
    /// touches (nextest lists each test binary a shard has tests in, ~5 ms each): `unit` names
    /// a test's unit. Among the next [`AFFINITY_LOOKAHEAD`] tests in order, those of the
    /// shard's first test's unit fill it first, the others (in order) only after them; so a
    /// shard touches as few units as the order allows, and its size is as without.
    pub fn next_shard_by<U: PartialEq>(
        &mut self,
        ctx: ShardContext,
        unit: Option<impl Fn(u32) -> U>,
    ) -> Vec<u32> {
        let Some(head) = self.items.peek().copied() else {
            return Vec::new();
        };
        let slots = ctx.slots.max(1) as f64;
        let per_slot = (self.queued_ms() + ctx.running_ms.max(0.0)) / slots;
        let mut out = vec![self.pop()];
        // A test large against what is left per slot goes alone, unless it is too small to be
        // worth a hand-out of its own (at the end of a run, when nothing is left, every test is
        // "large": quick ones go out together).
        if head.estimate_ms >= per_slot / 2.0 && head.estimate_ms >= min_shard_ms(ctx.overhead_ms) {
            self.settle();
            return out;
        }
        // Fail-first tests are batched apart from the rest (and sized by [`Batch::FailingFirst`]).
        let failing_first = head.key >= FAIL_FIRST_KEY;
        let batch = if head.cold {
            Batch::Cold
        } else if failing_first {
            Batch::FailingFirst
        } else {
            Batch::Known
        };
        let target = target_ms(per_slot, ctx.overhead_ms, batch);
        // In a run with no history at all, guesses are also batched by count, at most a third
        // of each slot's share of them: the estimates learnt from the run's first results are
        // too short (its first results are its quickest tests), and a long test hidden among
        // them must not take a slot's whole share with it.
        let most = if head.cold && self.count_guesses {
            (self.cold + out.len()).div_ceil(3 * slots as usize).max(1)
        } else {
            usize::MAX
        };
        let mut sum = head.estimate_ms;
        // Guesses and known durations are batched apart: a shard sized for known tests must
        // not carry a cold test that may be a giant.
        let fits = |sum: f64, next: &Entry, taken: usize| {
            sum + next.estimate_ms <= target
                && next.cold == head.cold
                && (next.key >= FAIL_FIRST_KEY) == failing_first
                && taken < most
        };
        // Tests of other units passed over, in order: they go in after the head's unit's, or
        // back to the queue.
        let mut aside: Vec<Entry> = Vec::new();
        if let Some(unit) = &unit {
            let first = unit(head.idx);
            while let Some(next) = self.items.peek().copied() {
                if !fits(sum, &next, out.len()) {
                    break;
                }
                if unit(next.idx) == first {
                    sum += next.estimate_ms;
                    out.push(self.pop());
                } else if aside.len() < AFFINITY_LOOKAHEAD {
                    aside.push(self.items.pop().expect("peeked"));
                } else {
                    break;
                }
            }
        }
        let mut aside = aside.into_iter().peekable();
        loop {
            // The order resumes with what was passed over, then the queue.
            let from_aside = aside.peek().is_some();
            let Some(next) = aside.peek().copied().or_else(|| self.items.peek().copied()) else {
                break;
            };
            if !fits(sum, &next, out.len()) {
                break;
            }
            sum += next.estimate_ms;
            if from_aside {
                aside.next();
                self.taken(&next);
                out.push(next.idx);
            } else {
                out.push(self.pop());
            }
        }
        // What was passed over and not taken goes back where it was.
        self.items.extend(aside);
        self.settle();
        out
    }

    /// Accounts for `e`, taken out of the queue.
    fn taken(&mut self, e: &Entry) {
        self.queued_ms -= e.estimate_ms;
        self.cold -= usize::from(e.cold);
    }

    /// Keeps the float sum from drifting once the queue is empty (every test passed over is
    /// back in it).
    fn settle(&mut self) {
        if self.items.is_empty() {
            self.queued_ms = 0.0;
        }
    }

    fn pop(&mut self) -> u32 {
        let e = self.items.pop().expect("checked non-empty");
        self.taken(&e);
        e.idx
    }
}

/// What a shard is made of, which sets how large it may be (see [`target_ms`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Batch {
    /// Tests with history.
    Known,
    /// Tests with history that failed lately, under fail-first: there for an early red
    /// signal, so spread over more, smaller shards (a third of the share per slot).
    FailingFirst,
    /// Tests with no history (guesses).
    Cold,
}

/// How much estimated work to put in one shard of `batch` when `per_slot` is left per slot.
///
/// Two-thirds of what is left per slot: early shards are large (few hand-outs, little
/// overhead) and they shrink geometrically, so every slot runs out of work at about the same
/// time (shards are handed out on demand, so a slot whose shard ran long simply takes less
/// after it). Never below two hand-outs' worth of overhead. What is left per slot counts, of
/// each running shard, only its time to its due end ([`super::Outstanding`]); while it counted
/// the whole estimate of every test without a result, a half did best in `shardgate-bench
/// sim` (30 % estimate noise; a third: 1.019×, a half: 1.014× on the IMVU shape, two-thirds
/// 1.011× but worse at 64 slots, the whole share 1.08–1.14×). Counting what is left, two-thirds
/// gives 1.010–1.011× over three seeds with a quarter fewer hand-outs, and at 64 slots 1.069×
/// against 1.088×. Tests with no history are batched more finely: at most a third of the
/// share, and no more than balances overhead against the imbalance an unknown giant among
/// them would cause (`sqrt(2 · overhead · work per slot)`).
pub fn target_ms(per_slot: f64, overhead_ms: f64, batch: Batch) -> f64 {
    let o = overhead_ms.max(MIN_OVERHEAD_MS);
    let t = match batch {
        Batch::Known => per_slot * 2.0 / 3.0,
        Batch::FailingFirst => per_slot / 3.0,
        Batch::Cold => (per_slot / 3.0).min((2.0 * o * per_slot).sqrt()),
    };
    t.max(min_shard_ms(overhead_ms))
}

/// The least estimated work worth a hand-out: two hand-outs' worth of overhead (at least
/// [`MIN_OVERHEAD_MS`] each). No shard is sized below it, and no test below it goes alone.
fn min_shard_ms(overhead_ms: f64) -> f64 {
    2.0 * overhead_ms.max(MIN_OVERHEAD_MS)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::super::testing::{ctx, plans};
    use super::super::{History, PlanOptions, plan};
    use super::*;

    #[test]
    fn long_tests_go_first_and_alone_and_shards_shrink() {
        // One giant, then many small tests, on 4 slots.
        let mut est = vec![100_000.0];
        est.extend(std::iter::repeat_n(1000.0, 400));
        let mut q = RunQueue::new(&plans(&est));
        assert_eq!(q.next_shard(ctx(4)), vec![0], "the giant goes out first, alone");
        let first = q.next_shard(ctx(4)).len();
        let mut last = first;
        while !q.is_empty() {
            last = q.next_shard(ctx(4)).len();
        }
        assert_eq!(
            first, 66,
            "early shards hold two-thirds of the work per slot (100 s · 2/3)"
        );
        assert_eq!(last, 1, "the last shards are single tests");
    }

    #[test]
    fn fail_first_tests_go_out_in_smaller_shards_of_their_own() {
        // 10 tests that failed lately and 90 that did not, 1 s each, on 2 slots: 50 s a slot.
        let ids: Vec<String> = (0..100).map(|i| format!("t{i:03}")).collect();
        let hist: HashMap<String, History> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let h = History {
                    estimate_ms: 1000.0,
                    samples: 3,
                    last_failed_ms: if i < 10 { 50 } else { 0 },
                };
                (id.clone(), h)
            })
            .collect();
        let plans = plan(&ids, &hist, PlanOptions { fail_first: true }, 100).0;
        let mut q = RunQueue::new(&plans);
        let first = q.next_shard(ctx(2));
        assert_eq!(
            first.len(),
            10,
            "every recent failure, and nothing else: {first:?}"
        );
        assert!(first.iter().all(|&i| i < 10), "{first:?}");
        // The rest: two-thirds of the 45 s left per slot.
        assert_eq!(q.next_shard(ctx(2)).len(), 30);
        // Without fail-first the first shard is two-thirds of a slot's share.
        let plans = plan(&ids, &hist, PlanOptions { fail_first: false }, 100).0;
        assert_eq!(RunQueue::new(&plans).next_shard(ctx(2)).len(), 33);
    }

    #[test]
    fn with_affinity_a_shard_takes_its_first_tests_unit_first_and_keeps_its_size() {
        // 60 tests of 1 s in three units, interleaved (a, b, c, a, b, c...), one giant first.
        let mut est = vec![50_000.0];
        est.extend(std::iter::repeat_n(1000.0, 60));
        let unit = |i: u32| u64::from(i % 3);
        let mut with = RunQueue::new(&plans(&est));
        let mut without = RunQueue::new(&plans(&est));
        let mut taken = Vec::new();
        while !with.is_empty() {
            let a = with.next_shard_by(ctx(2), Some(unit));
            let b = without.next_shard(ctx(2));
            assert_eq!(a.len(), b.len(), "the same sizes: {a:?} against {b:?}");
            let units: std::collections::BTreeSet<u64> = a.iter().map(|&i| unit(i)).collect();
            // A shard of up to 20 tests finds them all in its first test's unit.
            if a.len() <= 20 {
                assert_eq!(units.len(), 1, "one unit: {a:?}");
            }
            let left: f64 = (0..est.len() as u32)
                .filter(|i| !taken.contains(i) && !a.contains(i))
                .map(|i| est[i as usize])
                .sum();
            assert!(
                (with.queued_ms() - left).abs() < 1e-6,
                "{} against {left}",
                with.queued_ms()
            );
            taken.extend(a);
        }
        taken.sort_unstable();
        assert_eq!(taken, (0..61).collect::<Vec<u32>>(), "every test once");
        assert!(without.is_empty());
    }

    #[test]
    fn quick_tests_at_the_end_of_a_run_go_out_together() {
        // Nothing else is left or running: each test is half the work per slot, but far below
        // a hand-out's cost, so they share a shard.
        let mut q = RunQueue::new(&plans(&[0.0; 40]));
        assert_eq!(q.next_shard(ctx(2)).len(), 40);
        let mut q = RunQueue::new(&plans(&[5.0; 40]));
        assert_eq!(
            q.next_shard(ctx(2)).len(),
            40,
            "200 ms of work: two hand-outs' worth"
        );
        // A test worth a hand-out of its own still goes alone.
        let mut q = RunQueue::new(&plans(&[300.0, 5.0, 5.0]));
        assert_eq!(q.next_shard(ctx(2)), vec![0]);
    }

    #[test]
    fn requeued_tests_keep_their_place() {
        let mut q = RunQueue::new(&plans(&[5.0, 50.0, 500.0]));
        assert_eq!(q.next_shard(ctx(100)), vec![2]);
        q.push(
            2,
            Plan {
                estimate_ms: 500.0,
                key: 500.0,
                cold: false,
            },
        );
        assert_eq!(q.len(), 3);
        assert_eq!(q.next_shard(ctx(100)), vec![2]);
        assert!((q.queued_ms() - 55.0).abs() < 1e-9);
    }

    #[test]
    fn the_target_shrinks_with_the_work_left_and_cold_tests_go_in_small_batches() {
        // 440 s per slot: two-thirds of it, or for guesses sqrt(2 · 0.5 s · 440 s) ≈ 21 s.
        assert_eq!(target_ms(440_000.0, 500.0, Batch::Known), 440_000.0 * 2.0 / 3.0);
        let cold = target_ms(440_000.0, 500.0, Batch::Cold);
        assert!((20_000.0..22_000.0).contains(&cold), "{cold}");
        // Never below two hand-outs' worth of overhead.
        assert_eq!(target_ms(600.0, 500.0, Batch::Known), 1000.0);
        assert_eq!(target_ms(600.0, 500.0, Batch::Cold), 1000.0);
    }
}
