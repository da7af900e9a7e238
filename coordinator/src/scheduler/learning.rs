//! A run's plan of its tests from the suite's history, and what the run learns from its own
//! results about the tests with no history (see [`Learning`]).

use std::collections::HashMap;

use super::queue::RunQueue;
use super::{
    COLD_QUANTILE, DEFAULT_ESTIMATE_MS, FAIL_FIRST_KEY, History, Plan, PlanOptions, RECENT_FAILURE_MS,
};

/// The prefix a test shares with its siblings: everything before the last `::`, `/` or space
/// outside a parametrised test's parameters. So a pytest test's class or module
/// (`tests/test_x.py::TestY`, whatever its `[...]` holds), a nextest or `go test` test's binary
/// or package and module (`itertools::quick` of `itertools::quick size_hint`, not the crate
/// name its binary id begins with), an executable's directory.
fn prefix(id: &str) -> &str {
    let head = id.find('[').map_or(id, |b| &id[..b]);
    let cut = [head.rfind("::"), head.rfind('/'), head.rfind(' ')]
        .into_iter()
        .flatten()
        .max()
        .unwrap_or(0);
    &id[..cut]
}

/// Added to the order key of a probe (see [`Learning`]): ahead of every other test but the
/// recent failures under fail-first.
const PROBE_KEY: f64 = 1e10;
/// Added to a probe's key per rank it is ahead of the last possible one, so that the groups'
/// first probes go out before any group's second.
const PROBE_RANK_KEY: f64 = 1e9;
/// A result at least this many times its group's mean so far (and at least [`SURPRISE_MS`])
/// re-plans the run's queue at once (see [`Learning::observe`]).
const SURPRISE_FACTOR: f64 = 4.0;
const SURPRISE_MS: f64 = 100.0;
/// Waiting tests a surprise may re-sort per result taken in since the last re-plan.
const REPLAN_BUDGET: usize = 64;
/// The most probes a group has.
const MAX_PROBES: u8 = 8;
/// [`Learning::probe_rank`] of a test that is not a probe.
const NOT_PROBE: u8 = u8::MAX;

/// How many of a group's `cold` tests with no history are probes: the square root, so a
/// bigger group is sampled more, but never most of it.
fn probes(cold: u32) -> u8 {
    (f64::from(cold).sqrt().ceil() as u8).min(MAX_PROBES)
}

/// Plans every test of a run from the suite's history, and sets up what the run will learn
/// about its tests with no history (empty when every test has some).
pub fn plan(
    ids: &[String],
    history: &HashMap<String, History>,
    opts: PlanOptions,
    now_ms: u64,
) -> (Vec<Plan>, Learning) {
    let known: Vec<Option<&History>> = ids
        .iter()
        .map(|id| history.get(id).filter(|h| h.known()))
        .collect();
    // Every test's prefix group; a group's stat starts from the history of its known tests.
    let mut group_index: HashMap<&str, u32> = HashMap::new();
    let mut group_of = Vec::with_capacity(ids.len());
    let mut groups: Vec<GroupStat> = Vec::new();
    let mut cold_in: Vec<u32> = Vec::new();
    let mut all: Vec<f64> = Vec::new();
    for (id, h) in ids.iter().zip(&known) {
        let g = *group_index.entry(prefix(id)).or_insert_with(|| {
            groups.push(GroupStat::default());
            cold_in.push(0);
            (groups.len() - 1) as u32
        });
        group_of.push(g);
        if let Some(h) = h {
            groups[g as usize].add(h.estimate_ms);
            all.push(h.estimate_ms);
        } else {
            cold_in[g as usize] += 1;
        }
    }
    let high = if all.is_empty() {
        DEFAULT_ESTIMATE_MS
    } else {
        all.sort_by(f64::total_cmp);
        all[((all.len() - 1) as f64 * COLD_QUANTILE).round() as usize]
    };
    let mut learning = Learning {
        known_high: (!all.is_empty()).then_some(high),
        all: GroupStat {
            sum: all.iter().sum(),
            n: all.len() as u32,
            seen: 0,
        },
        probes_of: cold_in.iter().map(|&n| probes(n)).collect(),
        probe_rank: Vec::new(),
        groups,
        group_of,
        next_replan: 1,
        replanned_at: (0, ids.len()),
        active: false,
    };
    // Probes so far per group, while planning.
    let mut given = vec![0u8; learning.groups.len()];
    let plans = ids
        .iter()
        .zip(&known)
        .enumerate()
        .map(|(i, (id, h))| {
            let mut p = match h {
                Some(h) => Plan {
                    estimate_ms: h.estimate_ms,
                    key: h.estimate_ms,
                    cold: false,
                },
                None => {
                    learning.active = true;
                    let g = learning.group_of[i] as usize;
                    // The first tests of a group that nothing is known of go out first: what
                    // they take tells the run what their siblings may take.
                    if learning.groups[g].n == 0 && given[g] < learning.probes_of[g] {
                        if learning.probe_rank.is_empty() {
                            learning.probe_rank = vec![NOT_PROBE; ids.len()];
                        }
                        learning.probe_rank[i] = given[g];
                        given[g] += 1;
                    }
                    learning.cold_plan(i as u32, high)
                }
            };
            if opts.fail_first
                && let Some(h) = history.get(id)
                && h.last_failed_ms > 0
                && now_ms.saturating_sub(h.last_failed_ms) < RECENT_FAILURE_MS
            {
                p.key += FAIL_FIRST_KEY;
            }
            p
        })
        .collect();
    if !learning.active {
        learning = Learning::default();
    }
    (plans, learning)
}

/// Durations seen in one prefix group (or the whole run): from history at first, then from
/// the run's own results.
#[derive(Debug, Clone, Copy, Default)]
struct GroupStat {
    sum: f64,
    n: u32,
    /// Of `n`, the results of this run (for the whole run: every result taken in).
    seen: u32,
}

impl GroupStat {
    fn add(&mut self, ms: f64) {
        self.sum += ms;
        self.n += 1;
    }

    fn mean(&self) -> Option<f64> {
        (self.n > 0).then(|| self.sum / f64::from(self.n))
    }
}

/// What a run learns from its own results about its tests with no history (issue 15).
///
/// A test with no history is estimated from its prefix group (the tests of its file or
/// directory), else from the whole run, else [`DEFAULT_ESTIMATE_MS`]; the groups start from the
/// history of their known tests and take in every result of a test that had none. The first
/// tests of each group nothing is known of are *probes* (the square root of its size, at most
/// [`MAX_PROBES`]): they go out before everything else but the recent failures under
/// fail-first, every group's first probe before any group's second, so every group is measured
/// early and a slow test listed behind a quick sibling is looked for early too (a group
/// measured slower than the run's mean stops probing: its tests go out early anyway). A group
/// not measured in this run yet is sorted as if long (as [`plan`] sorts every cold test); once
/// it is, its tests sort by what it measured, so a slow file's tests go out early and a fast
/// file's late.
///
/// Re-planning the queue is O(waiting tests), so it is done when the results taken in have
/// grown by a quarter since the last time: O(log n) times over a run; and at once when a result
/// is [`SURPRISE_FACTOR`] times its group's mean, if the results since the last re-plan pay
/// for it ([`REPLAN_BUDGET`] waiting tests each).
#[derive(Debug, Default)]
pub struct Learning {
    group_of: Vec<u32>,
    groups: Vec<GroupStat>,
    /// How many probes each group has ([`probes`] of its tests with no history; none when it
    /// has a test with history).
    probes_of: Vec<u8>,
    /// Each test's rank among its group's probes, [`NOT_PROBE`] for none; empty when no test
    /// is a probe.
    probe_rank: Vec<u8>,
    all: GroupStat,
    /// The sort floor of history-known tests ([`COLD_QUANTILE`]), if any test was known.
    known_high: Option<f64>,
    /// How many results taken in make the queue due for its next re-plan.
    next_replan: u32,
    /// Results taken in, and tests waiting, at the last re-plan.
    replanned_at: (u32, usize),
    /// Some test had no history and the queue may still hold it.
    active: bool,
}

impl Learning {
    /// Takes in the result of test `idx`, which had no history when the run was planned.
    /// Returns whether the queue is due for [`RunQueue::replan`].
    pub fn observe(&mut self, idx: u32, duration_ms: u64) -> bool {
        if !self.active {
            return false;
        }
        let ms = duration_ms as f64;
        let g = &mut self.groups[self.group_of[idx as usize] as usize];
        let surprise = g.mean().is_some_and(|m| ms >= SURPRISE_FACTOR * m.max(1.0)) && ms >= SURPRISE_MS;
        g.add(ms);
        g.seen += 1;
        self.all.add(ms);
        self.all.seen += 1;
        // A test far slower than its group was thought to be re-plans at once (its siblings may
        // be as slow, and waiting for the next quarter could send them out last), as long as
        // re-plans stay amortised: a few dozen waiting tests re-sorted per result taken in.
        let (at, waiting) = self.replanned_at;
        let affordable = (self.all.seen - at) as usize * REPLAN_BUDGET >= waiting;
        self.all.seen >= self.next_replan || (surprise && affordable)
    }

    /// The plan of cold test `idx` from what is known now; `high` is the floor of the sort key
    /// of a test whose group was not measured in this run.
    fn cold_plan(&self, idx: u32, high: f64) -> Plan {
        let g = self.group_of[idx as usize] as usize;
        let stat = self.groups[g];
        let run_mean = self.all.mean().unwrap_or(DEFAULT_ESTIMATE_MS);
        let estimate_ms = stat.mean().unwrap_or(run_mean);
        // A group not measured in this run sorts ahead of the longest measured one.
        let mut key = if stat.seen == 0 {
            estimate_ms.max(high) + 1.0
        } else {
            estimate_ms
        };
        let rank = self.probe_rank.get(idx as usize).copied().unwrap_or(NOT_PROBE);
        // A group's later probes look for a slow test among siblings that look quick: once
        // the group is measured slower than the run's mean, its tests go out early by that
        // anyway, and probing on would only hold them behind every quick group's probes.
        if rank != NOT_PROBE
            && stat.seen < u32::from(self.probes_of[g])
            && (rank == 0 || stat.seen == 0 || estimate_ms <= run_mean)
        {
            key += PROBE_KEY + f64::from(MAX_PROBES - rank) * PROBE_RANK_KEY;
        }
        Plan {
            estimate_ms,
            key,
            cold: true,
        }
    }

    /// The sort floor of a group not measured in this run: the longest that is known, from
    /// history or from this run's groups.
    fn high(&self) -> f64 {
        let seen = self
            .groups
            .iter()
            .filter(|g| g.seen > 0)
            .filter_map(GroupStat::mean)
            .fold(0.0, f64::max);
        match self.known_high {
            Some(h) => h.max(seen),
            None if seen > 0.0 => seen,
            None => DEFAULT_ESTIMATE_MS,
        }
    }

    /// Re-plans the waiting tests that had no history; `plans` is the run's plan per test and
    /// is updated with the queue. A test out on a worker keeps the plan it was handed out with
    /// (the run's accounting of running work subtracts exactly that).
    pub fn replan(&mut self, queue: &mut RunQueue, mut set: impl FnMut(u32, Plan)) {
        let taken = self.all.seen;
        self.next_replan = taken + (taken / 4).max(1);
        self.replanned_at = (taken, queue.len());
        let high = self.high();
        let mut any = false;
        queue.replan(|idx, old| {
            if !old.cold {
                return None;
            }
            any = true;
            let mut p = self.cold_plan(idx, high);
            if old.key >= FAIL_FIRST_KEY {
                p.key += FAIL_FIRST_KEY;
            }
            set(idx, p);
            Some(p)
        });
        // Nothing cold waits any more: a lost test goes back with the plan it had.
        self.active = any;
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::ctx;
    use super::*;

    #[test]
    fn a_tests_group_is_its_class_module_binary_or_directory() {
        for (id, group) in [
            ("tests/test_x.py::TestY::test_z", "tests/test_x.py::TestY"),
            ("tests/test_x.py::test_z", "tests/test_x.py"),
            // Parameters are not a place, whatever they hold.
            ("tests/test_x.py::test_z[a::b/c d]", "tests/test_x.py"),
            // nextest: the test binary, not the crate name its id begins with.
            ("itertools::quick size_hint", "itertools::quick"),
            ("itertools adaptors::tests::merge", "itertools adaptors::tests"),
            ("mycrate::bin/tool parse::empty", "mycrate::bin/tool parse"),
            ("example.com/pkg/util TestParse", "example.com/pkg/util"),
            ("suite/dir/test_a.sh", "suite/dir"),
            ("lonely", ""),
        ] {
            assert_eq!(prefix(id), group, "{id}");
        }
    }

    #[test]
    fn cold_tests_borrow_from_siblings_and_sort_as_possibly_long() {
        let ids: Vec<String> = ["a/x", "a/y", "b/z", "a/new", "c/new"].map(String::from).to_vec();
        let mut hist = HashMap::new();
        for (id, ms) in [("a/x", 100.0), ("a/y", 300.0), ("b/z", 5000.0)] {
            hist.insert(
                id.to_owned(),
                History {
                    estimate_ms: ms,
                    samples: 3,
                    last_failed_ms: 0,
                },
            );
        }
        let p = plan(&ids, &hist, PlanOptions::default(), 0).0;
        assert_eq!(p[3].estimate_ms, 200.0, "mean of its siblings a/x and a/y");
        assert_eq!(p[4].estimate_ms, 1800.0, "no siblings: the suite's mean");
        assert_eq!(p[3].key, 5001.0, "sorted ahead of the suite's p99.9");
        assert_eq!(p[0].key, 100.0);
        let none = plan(&ids, &HashMap::new(), PlanOptions::default(), 0).0;
        assert!(none.iter().all(|p| p.estimate_ms == DEFAULT_ESTIMATE_MS));
    }

    #[test]
    fn a_run_without_history_probes_each_group_and_learns_from_its_results() {
        // 20 fast tests listed first, then 5 slow ones in a directory of their own.
        let ids: Vec<String> = (0..20)
            .map(|i| format!("fast/t{i}"))
            .chain((0..5).map(|i| format!("slow/t{i}")))
            .collect();
        let (mut plans, mut learning) = plan(&ids, &HashMap::new(), PlanOptions::default(), 0);
        assert!(
            plans
                .iter()
                .all(|p| p.cold && p.estimate_ms == DEFAULT_ESTIMATE_MS)
        );
        let mut q = RunQueue::new(&plans);
        // Many slots: every shard is one test.
        assert_eq!(q.next_shard(ctx(100)), vec![0], "the fast group's probe");
        assert_eq!(
            q.next_shard(ctx(100)),
            vec![20],
            "the slow group's probe, though listed last"
        );
        let mut observe = |idx: u32, ms: u64, q: &mut RunQueue, plans: &mut Vec<Plan>| {
            if learning.observe(idx, ms) {
                learning.replan(q, |i, p| plans[i as usize] = p);
            }
        };
        observe(0, 100, &mut q, &mut plans);
        // The slow group is not measured yet: its tests sort as if long, so ahead of the fast
        // ones, and are estimated at the run's mean so far.
        assert_eq!(plans[21].estimate_ms, 100.0);
        assert!(plans[21].key > plans[1].key);
        observe(20, 10_000, &mut q, &mut plans);
        assert_eq!((plans[1].estimate_ms, plans[21].estimate_ms), (100.0, 10_000.0));
        assert!((q.queued_ms() - (4.0 * 10_000.0 + 19.0 * 100.0)).abs() < 1e-6);
        // A group of 20 has five probes (the square root), one of 5 three; the slow group,
        // measured slower than the run's mean, is sampled by its own tests instead.
        for expected in 1..5 {
            assert_eq!(
                q.next_shard(ctx(100)),
                vec![expected],
                "the quick group's other probes: cheap, and where a slow test would hide"
            );
        }
        for expected in 21..25 {
            assert_eq!(q.next_shard(ctx(100)), vec![expected], "the slow tests go next");
        }
        assert_eq!(q.next_shard(ctx(100)), vec![5]);
    }

    #[test]
    fn a_slow_test_among_quick_probes_replans_at_once_and_brings_its_siblings_forward() {
        // Ten quick groups of four tests; the last group hides a slow test behind a quick one.
        let ids: Vec<String> = (0..10)
            .flat_map(|g| (0..4).map(move |t| format!("g{g}/t{t}")))
            .collect();
        let (mut plans, mut learning) = plan(&ids, &HashMap::new(), PlanOptions::default(), 0);
        let mut q = RunQueue::new(&plans);
        let mut observe = |idx: u32, ms: u64, q: &mut RunQueue, plans: &mut Vec<Plan>| {
            if learning.observe(idx, ms) {
                learning.replan(q, |i, p| plans[i as usize] = p);
                return true;
            }
            false
        };
        // Every group's first probe, then every group's second.
        let firsts: Vec<u32> = (0..10).map(|_| q.next_shard(ctx(100))[0]).collect();
        assert_eq!(firsts, (0..10).map(|g| g * 4).collect::<Vec<u32>>());
        for &i in &firsts {
            observe(i, 10, &mut q, &mut plans);
        }
        let seconds: Vec<u32> = (0..10).map(|_| q.next_shard(ctx(100))[0]).collect();
        assert_eq!(seconds, (0..10).map(|g| g * 4 + 1).collect::<Vec<u32>>());
        for &i in &seconds[..9] {
            observe(i, 10, &mut q, &mut plans);
        }
        // 20 results in, the next quarter is due at 25: the slow one re-plans by itself.
        assert!(observe(37, 5_000, &mut q, &mut plans), "a surprise re-plans");
        assert!(plans[38].estimate_ms > 2_000.0);
        let next = q.next_shard(ctx(100));
        assert!(
            next == vec![38] || next == vec![39],
            "its siblings go first: {next:?}"
        );
    }

    #[test]
    fn known_tests_keep_their_plan_and_a_run_with_full_history_learns_nothing() {
        let ids: Vec<String> = ["a/x", "a/new"].map(String::from).to_vec();
        let known = |ms| History {
            estimate_ms: ms,
            samples: 3,
            last_failed_ms: 0,
        };
        let hist: HashMap<String, History> = [("a/x".to_owned(), known(300.0))].into();
        let (plans, mut learning) = plan(&ids, &hist, PlanOptions::default(), 0);
        assert_eq!((plans[0].cold, plans[1].cold), (false, true));
        assert_eq!(plans[1].estimate_ms, 300.0, "from its known sibling");
        let mut q = RunQueue::new(&plans);
        assert!(learning.observe(1, 900));
        let mut changed = Vec::new();
        learning.replan(&mut q, |i, p| changed.push((i, p.estimate_ms)));
        assert_eq!(
            changed,
            vec![(1, 600.0)],
            "the sibling's 300 and the run's own 900"
        );
        let full: HashMap<String, History> =
            [("a/x".to_owned(), known(300.0)), ("a/new".to_owned(), known(1.0))].into();
        let (_, mut none) = plan(&ids, &full, PlanOptions::default(), 0);
        assert!(!none.observe(0, 5), "nothing to learn");
    }

    #[test]
    fn fail_first_puts_recent_failures_ahead() {
        let ids: Vec<String> = ["slow", "broken"].map(String::from).to_vec();
        let mut hist = HashMap::new();
        hist.insert(
            "slow".into(),
            History {
                estimate_ms: 9000.0,
                samples: 2,
                last_failed_ms: 0,
            },
        );
        hist.insert(
            "broken".into(),
            History {
                estimate_ms: 10.0,
                samples: 2,
                last_failed_ms: 50,
            },
        );
        let p = plan(&ids, &hist, PlanOptions { fail_first: true }, 100).0;
        let mut q = RunQueue::new(&p);
        assert_eq!(q.next_shard(ctx(1)), vec![1]);
    }
}
