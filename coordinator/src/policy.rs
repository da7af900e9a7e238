//! The gate's policies as pure functions: what a failed result means (retry or count), what a
//! test that keeps losing its worker becomes, when fail-fast ends a run, the verdict, which run
//! gets a free slot, and how the per-shard overhead is learned. The core calls them; their
//! tests below read as the rules they are.

use shardgate_common::{Outcome, RunStatus};

use crate::model::Policy;
use crate::store::{FirstFailure, FlakinessRow, RetryState};

/// What to do with one reported result of a test.
#[derive(Debug, Clone, PartialEq)]
pub enum Classified {
    /// Not counted yet: the test runs again, and only then is it known to be broken or flaky.
    Retry,
    /// Counted with this outcome and detail; `output` is what to keep.
    Count {
        outcome: Outcome,
        detail: String,
        output: String,
    },
}

/// Retry-or-count and flaky classification. A failure (or time-out) of a test that has retries
/// left is retried; a pass after failures is `flaky`, keeping the first failure's output; a
/// failure after failures says how many attempts failed.
pub fn classify(
    outcome: Outcome,
    detail: &str,
    output: &str,
    retry: &RetryState,
    retries: u32,
) -> Classified {
    let failed = matches!(outcome, Outcome::Failed | Outcome::TimedOut);
    if failed && retry.failures < retries {
        return Classified::Retry;
    }
    let failures = retry.failures;
    let (outcome, detail, output) = match (&retry.first_failure, outcome) {
        (Some(first), Outcome::Passed) => (
            Outcome::Flaky,
            format!(
                "passed on attempt {} after {failures} failure(s); first failure on {}: {}",
                failures + 1,
                first.worker,
                first.detail
            ),
            first.output.clone(),
        ),
        (Some(_), _) if failed => (
            outcome,
            format!("failed {} of {} attempts: {detail}", failures + 1, failures + 1),
            output.to_owned(),
        ),
        _ => (outcome, detail.to_owned(), output.to_owned()),
    };
    Classified::Count {
        outcome,
        detail,
        output,
    }
}

/// The retry state after one more retried failure on `worker`.
pub fn after_failure(
    retry: &RetryState,
    first: FirstFailure,
    worker: shardgate_common::WorkerId,
) -> RetryState {
    let mut st = retry.clone();
    st.failures += 1;
    if st.first_failure.is_none() {
        st.first_failure = Some(first);
    }
    if !st.avoid.contains(&worker) {
        st.avoid.push(worker);
    }
    st
}

/// The infra give-up rule: a test lost on `max` different workers, or lost twice that often
/// on fewer, is reported as an infrastructure error rather than allowed to take down the fleet.
pub fn gives_up(retry: &RetryState, max_infra_attempts: u32) -> bool {
    retry.lost_on.len() as u32 >= max_infra_attempts || retry.lost >= 2 * max_infra_attempts
}

/// Whether a discovery that got no answer `handouts` times should error the run.
pub fn discovery_gives_up(handouts: u32, max_infra_attempts: u32) -> bool {
    handouts >= max_infra_attempts
}

/// Whether a runner that failed `streak` shards of a run in a row with the same error should
/// stop the run: as often as a test may lose its workers.
pub fn runner_gives_up(streak: u32, max_infra_attempts: u32) -> bool {
    streak >= max_infra_attempts.max(1)
}

/// Fail-fast: a confirmed failure of a test that is not quarantined ends the run at once,
/// unless that result was the run's last.
pub fn fail_fast_stops(policy: &Policy, outcome: Outcome, quarantined: bool, run_complete: bool) -> bool {
    policy.fail_fast
        && matches!(outcome, Outcome::Failed | Outcome::TimedOut)
        && !quarantined
        && !run_complete
}

/// The verdict of a run whose every test has a counted result. `reds(o)` is how many results
/// of outcome `o` count toward the gate (quarantined tests aside).
pub fn verdict(strict_flaky: bool, reds: impl Fn(Outcome) -> u32) -> RunStatus {
    let green = Outcome::ALL
        .iter()
        .filter(|o| !o.is_green() || (strict_flaky && **o == Outcome::Flaky))
        .all(|o| reds(*o) == 0);
    if green {
        RunStatus::Passed
    } else {
        RunStatus::Failed
    }
}

/// Which run deserves a free slot: highest priority first; among equals the run with the
/// fewest live attempts (a fair share of the fleet), then the oldest (ids are time-ordered).
pub fn slot_order<Id: Ord + Copy>(priority: i32, live_attempts: u32, id: Id) -> impl Ord {
    (std::cmp::Reverse(priority), live_attempts, id)
}

/// The per-shard overhead estimate after one more whole shard: an exponentially weighted mean
/// of wall time minus the tests' own time.
pub fn next_overhead(current_ms: f64, shard_wall_ms: u64, tests_ms: u64) -> f64 {
    let sample = shard_wall_ms.saturating_sub(tests_ms) as f64;
    current_ms + 0.2 * (sample - current_ms)
}

/// A test's flaky results over its counted runs.
pub fn flake_rate(f: &FlakinessRow) -> f64 {
    f.flakes as f64 / f.runs.max(1) as f64
}

/// Whether a test is flaky enough to be proposed for (or put in) quarantine.
pub fn proposes_quarantine(f: &FlakinessRow, min_runs: u32, threshold: f64) -> bool {
    f.runs >= min_runs && flake_rate(f) >= threshold
}

/// What a worker's proof of the commit it ran means for a run (see [`check_tested_commit`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommitCheck {
    /// The worker's runner cannot tell which commit it ran (no `git` source, no
    /// `revision_check`): counted as before, proving nothing.
    Unproven,
    /// The commit the run is pinned to.
    Pinned,
    /// The run's first proof, which matches its revision: pin it.
    Pin,
    /// Not the run's revision: nothing of the attempt is counted.
    Refused(String),
}

/// Whether a full commit hash `tested`, which a worker says its attempt ran, may count for a run
/// of `revision` whose results so far were pinned to `pinned` (empty: none yet). A revision that
/// is written as a hexadecimal hash (4 to 64 digits, abbreviated or full) must be a prefix of
/// the tested commit; a ref name (`main`, `v1.2`) is whatever the first proof resolved it to,
/// and every later attempt must have run that same commit.
pub fn check_tested_commit(revision: &str, pinned: &str, tested: &str) -> CommitCheck {
    if tested.is_empty() {
        return CommitCheck::Unproven;
    }
    let is_hex = |s: &str| s.bytes().all(|b| b.is_ascii_hexdigit());
    if !matches!(tested.len(), 40 | 64) || !is_hex(tested) {
        return CommitCheck::Refused(format!(
            "the worker's tested commit '{}' is not a full commit hash",
            tested.chars().take(80).collect::<String>()
        ));
    }
    let tested = tested.to_ascii_lowercase();
    if (4..=64).contains(&revision.len())
        && is_hex(revision)
        && !tested.starts_with(&revision.to_ascii_lowercase())
    {
        return CommitCheck::Refused(format!(
            "the worker ran commit {tested}, which is not the run's revision '{revision}'"
        ));
    }
    if pinned.is_empty() {
        CommitCheck::Pin
    } else if pinned == tested {
        CommitCheck::Pinned
    } else {
        CommitCheck::Refused(format!(
            "the worker ran commit {tested}, but the run's revision '{revision}' was tested as {pinned}"
        ))
    }
}

#[cfg(test)]
mod tests {
    use shardgate_common::WorkerId;

    use super::*;

    fn failed_once() -> RetryState {
        RetryState {
            failures: 1,
            first_failure: Some(FirstFailure {
                detail: "exit 1".into(),
                output: "boom".into(),
                worker: "w1".into(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_failure_with_retries_left_is_retried_and_without_is_counted() {
        let fresh = RetryState::default();
        assert_eq!(classify(Outcome::Failed, "x", "", &fresh, 2), Classified::Retry);
        assert_eq!(classify(Outcome::TimedOut, "x", "", &fresh, 1), Classified::Retry);
        assert!(matches!(
            classify(Outcome::Failed, "x", "", &fresh, 0),
            Classified::Count {
                outcome: Outcome::Failed,
                ..
            }
        ));
        assert!(matches!(
            classify(Outcome::Passed, "", "", &fresh, 2),
            Classified::Count {
                outcome: Outcome::Passed,
                ..
            }
        ));
    }

    #[test]
    fn a_pass_after_a_failure_is_flaky_with_the_first_failure_kept() {
        match classify(Outcome::Passed, "", "fine", &failed_once(), 2) {
            Classified::Count {
                outcome,
                detail,
                output,
            } => {
                assert_eq!(outcome, Outcome::Flaky);
                assert!(detail.contains("attempt 2 after 1 failure(s)") && detail.contains("on w1: exit 1"));
                assert_eq!(output, "boom");
            }
            other => panic!("{other:?}"),
        }
        match classify(Outcome::Failed, "exit 2", "again", &failed_once(), 1) {
            Classified::Count { outcome, detail, .. } => {
                assert_eq!(outcome, Outcome::Failed);
                assert_eq!(detail, "failed 2 of 2 attempts: exit 2");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_retried_failure_remembers_the_first_one_and_avoids_the_worker() {
        let w = WorkerId::new();
        let first = FirstFailure {
            detail: "d".into(),
            output: "o".into(),
            worker: "w".into(),
        };
        let st = after_failure(&RetryState::default(), first.clone(), w);
        let st = after_failure(&st, FirstFailure::default(), w);
        assert_eq!(st.failures, 2);
        assert_eq!(st.first_failure, Some(first));
        assert_eq!(st.avoid, vec![w]);
    }

    #[test]
    fn a_test_is_given_up_after_max_distinct_workers_or_twice_max_losses() {
        let lost = |workers: usize, lost: u32| RetryState {
            lost,
            lost_on: (0..workers)
                .map(|i| crate::store::LostOn {
                    worker: format!("w{i}"),
                    reason: "lease expired".into(),
                })
                .collect(),
            ..Default::default()
        };
        assert!(!gives_up(&lost(2, 2), 3));
        assert!(gives_up(&lost(3, 3), 3));
        assert!(!gives_up(&lost(1, 5), 3));
        assert!(gives_up(&lost(1, 6), 3));
        assert!(discovery_gives_up(3, 3) && !discovery_gives_up(2, 3));
    }

    #[test]
    fn fail_fast_stops_only_on_a_confirmed_unquarantined_failure_before_the_end() {
        let ff = Policy {
            fail_fast: true,
            ..Default::default()
        };
        assert!(fail_fast_stops(&ff, Outcome::Failed, false, false));
        assert!(fail_fast_stops(&ff, Outcome::TimedOut, false, false));
        assert!(!fail_fast_stops(&ff, Outcome::Failed, true, false), "quarantined");
        assert!(
            !fail_fast_stops(&ff, Outcome::Failed, false, true),
            "the last result"
        );
        assert!(!fail_fast_stops(&ff, Outcome::InfraError, false, false));
        assert!(!fail_fast_stops(
            &Policy::default(),
            Outcome::Failed,
            false,
            false
        ));
    }

    #[test]
    fn the_verdict_passes_only_green_results_and_flaky_unless_strict() {
        let only = |o: Outcome| move |x: Outcome| u32::from(x == o);
        assert_eq!(verdict(false, only(Outcome::Passed)), RunStatus::Passed);
        assert_eq!(verdict(false, only(Outcome::Flaky)), RunStatus::Passed);
        assert_eq!(verdict(true, only(Outcome::Flaky)), RunStatus::Failed);
        assert_eq!(verdict(false, only(Outcome::Skipped)), RunStatus::Passed);
        for red in [Outcome::Failed, Outcome::TimedOut, Outcome::InfraError] {
            assert_eq!(verdict(false, only(red)), RunStatus::Failed, "{red}");
        }
    }

    #[test]
    fn the_slot_goes_to_priority_then_fair_share_then_age() {
        let mut runs = [(0, 0, 3u32), (1, 5, 4), (1, 2, 5), (1, 2, 2)];
        runs.sort_by_key(|&(p, live, id)| slot_order(p, live, id));
        assert_eq!(runs.map(|r| r.2), [2, 5, 4, 3]);
    }

    #[test]
    fn the_overhead_moves_a_fifth_of_the_way_to_each_sample() {
        assert_eq!(next_overhead(500.0, 1600, 100), 700.0);
        assert_eq!(
            next_overhead(500.0, 100, 200),
            400.0,
            "a negative sample counts as 0"
        );
    }

    #[test]
    fn quarantine_is_proposed_past_the_threshold_over_enough_runs() {
        let f = |runs, flakes| FlakinessRow {
            test_id: "t".into(),
            runs,
            failures: 0,
            flakes,
            flips: 0,
            last_flake_ms: 0,
            last_run_ms: 0,
        };
        assert!(proposes_quarantine(&f(10, 1), 10, 0.05));
        assert!(!proposes_quarantine(&f(9, 5), 10, 0.05), "too few runs");
        assert!(!proposes_quarantine(&f(100, 4), 10, 0.05));
    }

    #[test]
    fn a_tested_commit_counts_only_when_it_is_the_runs_revision_and_the_pinned_one() {
        let a = "0123456789abcdef0123456789abcdef01234567";
        let b = "fedcba9876543210fedcba9876543210fedcba98";
        assert_eq!(check_tested_commit("main", "", ""), CommitCheck::Unproven);
        assert_eq!(check_tested_commit("main", "", a), CommitCheck::Pin);
        assert_eq!(check_tested_commit("main", a, a), CommitCheck::Pinned);
        assert_eq!(
            check_tested_commit("0123456", "", a),
            CommitCheck::Pin,
            "an abbreviated hash"
        );
        assert_eq!(check_tested_commit(&a.to_uppercase(), "", a), CommitCheck::Pin);
        let refused = |r: CommitCheck| match r {
            CommitCheck::Refused(why) => why,
            other => panic!("{other:?} should be refused"),
        };
        assert_eq!(
            refused(check_tested_commit("main", a, b)),
            format!("the worker ran commit {b}, but the run's revision 'main' was tested as {a}")
        );
        assert_eq!(
            refused(check_tested_commit("0123456", "", b)),
            format!("the worker ran commit {b}, which is not the run's revision '0123456'")
        );
        assert!(refused(check_tested_commit("main", "", "HEAD")).contains("not a full commit hash"));
        assert!(refused(check_tested_commit("main", "", &"g".repeat(40))).contains("not a full commit hash"));
    }
}
