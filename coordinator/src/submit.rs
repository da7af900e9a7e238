//! Submitting a run without stalling hand-outs. A small run is one message to the actor. A
//! large one is checked on the actor (its fields only), validated and planned on a blocking
//! low-priority thread from the read side's connections, written in parts of [`SUBMIT_PART`] tests (each a
//! message of its own, staged: invisible to reads and restarts), and made visible and queued in
//! a last message. Between parts the actor serves everyone else.
//!
//! A submission that fails part-way leaves a staged run behind, which nobody sees and the next
//! start of the coordinator deletes.

use std::sync::Arc;

use shardgate_common::{Error, pb, validate};

use crate::actor::Handle;
use crate::core::PlannedTests;
use crate::model::Now;
use crate::read::Background;
use crate::store::Reads;

/// Tests written per message of a staged submission: small enough that a part takes a few
/// milliseconds of the actor's time.
pub const SUBMIT_PART: usize = 10_000;

/// Submits `req`: in one message when small, in staged parts when large.
pub async fn submit(
    handle: &Handle,
    reads: Arc<dyn Reads + Send + Sync>,
    background: &Background,
    mut req: pb::SubmitRunRequest,
) -> Result<pb::RunSummary, Error> {
    if req.tests.len() <= SUBMIT_PART {
        return handle.call(move |core, now| core.submit(req, now)).await;
    }
    let started = std::time::Instant::now();
    let tests = Arc::new(std::mem::take(&mut req.tests));
    let n = tests.len();
    let prepared = handle
        .call(move |core, now| core.prepare_run(&req, n, now))
        .await?;
    let planned = {
        let tests = tests.clone();
        let (kind, suite, policy) = (prepared.kind, prepared.row.suite.clone(), prepared.row.policy);
        background
            .run(move || -> Result<PlannedTests, Error> {
                validate::test_list(kind, &tests)?;
                PlannedTests::plan(reads.as_ref(), &suite, tests.to_vec(), policy, Now::real())
            })
            .await??
    };
    let run = prepared.row.id;
    {
        let (prepared, tests) = (prepared.clone(), tests.clone());
        handle
            .call(move |core, _| core.stage_run(&prepared, &tests[..SUBMIT_PART]))
            .await?;
    }
    for start in (SUBMIT_PART..tests.len()).step_by(SUBMIT_PART) {
        let tests = tests.clone();
        let end = (start + SUBMIT_PART).min(tests.len());
        handle
            .call(move |core, _| core.stage_tests(run, start as u32, &tests[start..end]))
            .await?;
    }
    let staged = started.elapsed();
    let summary = handle
        .call(move |core, _| core.activate_run(prepared, planned))
        .await?;
    // A million ids take a while to free: not on a thread that answers the fleet.
    let n = tests.len();
    let _ = background.run(move || drop(tests)).await;
    tracing::info!(
        run = %run,
        tests = n,
        parts = n.div_ceil(SUBMIT_PART),
        staged_ms = staged.as_millis() as u64,
        total_ms = started.elapsed().as_millis() as u64,
        "large run submitted in parts"
    );
    Ok(summary)
}
