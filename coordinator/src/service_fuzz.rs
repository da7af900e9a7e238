//! Arbitrary requests through the real services (in process: the tonic service traits on a
//! real actor, store and read side): nothing panics, every refusal is a caller's error with a
//! message, and the store afterwards holds exactly what the accepted requests put there.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use proptest::prelude::*;
use shardgate_common::pb;
use shardgate_common::pb::gate_service_server::GateService;
use shardgate_common::pb::run_service_server::RunService;
use shardgate_common::pb::worker_service_server::WorkerService;
use tonic::{Code, Request};

use crate::actor;
use crate::core::Core;
use crate::model::{CoreConfig, Now};
use crate::read::{ReadConfig, ReadSide};
use crate::service::Services;
use crate::store::{Reads, SqliteReader, SqliteStore};

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[a-z0-9._/-]{1,12}",
        1 => Just(String::new()),
        1 => ".{0,40}",
        1 => Just("../../etc/passwd".to_owned()),
        1 => Just("/abs/path".to_owned()),
        1 => Just("x\u{0}y\n\u{1b}[2J".to_owned()),
        1 => Just("é\u{202e}🙂\u{feff}".to_owned()),
        1 => (5000usize..20_000).prop_map(|n| "z".repeat(n)),
    ]
}

#[derive(Debug, Clone)]
enum Call {
    Submit {
        suite: String,
        revision: String,
        runner: String,
        tests: Vec<String>,
        labels: Vec<(String, String)>,
        retries: Option<u32>,
        flaky_retries: Option<u32>,
        max_infra: u32,
        timeout_ms: u64,
        discover: bool,
    },
    Quarantine {
        suite: String,
        test: String,
        reason: String,
        by: String,
    },
    Cancel {
        run: String,
        reason: String,
    },
    Register {
        name: String,
        slots: u32,
        kind: i32,
    },
}

fn call() -> impl Strategy<Value = Call> {
    prop_oneof![
        4 => (
            text(),
            text(),
            prop_oneof![Just("exec".to_owned()), text()],
            prop::collection::vec(text(), 0..6),
            prop::collection::vec((text(), text()), 0..3),
            prop::option::of(prop_oneof![0u32..12, Just(u32::MAX)]),
            prop::option::of(prop_oneof![0u32..12, Just(u32::MAX)]),
            prop_oneof![0u32..25, Just(u32::MAX)],
            prop_oneof![Just(0u64), 1u64..1000, Just(u64::MAX)],
            any::<bool>(),
        )
            .prop_map(|(suite, revision, runner, tests, labels, retries, flaky_retries, max_infra, timeout_ms, discover)| Call::Submit {
                suite, revision, runner, tests, labels, retries, flaky_retries, max_infra, timeout_ms, discover,
            }),
        2 => (text(), text(), text(), text()).prop_map(|(suite, test, reason, by)| Call::Quarantine { suite, test, reason, by }),
        1 => (prop_oneof![text(), Just(uuid::Uuid::now_v7().to_string())], text())
            .prop_map(|(run, reason)| Call::Cancel { run, reason }),
        1 => (text(), prop_oneof![0u32..3, Just(5000u32), Just(u32::MAX)], -1i32..9)
            .prop_map(|(name, slots, kind)| Call::Register { name, slots, kind }),
    ]
}

/// Codes that say the caller asked for something wrong, not that the coordinator failed.
fn callers_error(code: Code) -> bool {
    matches!(
        code,
        Code::InvalidArgument | Code::NotFound | Code::FailedPrecondition | Code::ResourceExhausted
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    #[test]
    fn arbitrary_requests_are_accepted_or_refused_clearly_and_the_store_holds_what_was_accepted(
        calls in prop::collection::vec(call(), 1..40)
    ) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async move {
            let dir = tempfile::tempdir().unwrap();
            let db = dir.path().join("db.sqlite");
            let store = SqliteStore::open(&db).unwrap();
            let reader: Arc<dyn Reads + Send + Sync> = Arc::new(SqliteReader::open(&db, 1).unwrap());
            let cfg = CoreConfig::default();
            let core = Core::open(cfg.clone(), store, Now::real()).unwrap();
            let handle = actor::spawn(core, std::time::Duration::from_millis(50));
            let reads = ReadSide::new(reader.clone(), handle.live(), ReadConfig::from(&cfg), 1);
            let svc = Services::new(handle, reads, reader.clone());
            // One worker so that the exec runner is known.
            svc.register(Request::new(pb::RegisterRequest {
                name: "w".into(),
                slots: 1,
                labels: vec![],
                runners: vec![pb::RunnerInfo { name: "exec".into(), kind: pb::RunnerKind::Exec as i32 }],
            })).await.unwrap();

            let mut accepted_runs: BTreeMap<String, usize> = BTreeMap::new();
            let mut quarantined: BTreeSet<(String, String)> = BTreeSet::new();
            for c in calls {
                let refused = match c {
                    Call::Submit { suite, revision, runner, tests, labels, retries, flaky_retries, max_infra, timeout_ms, discover } => {
                        let n = tests.len();
                        let req = pb::SubmitRunRequest {
                            suite, revision, runner, tests, discover,
                            labels: labels.into_iter().map(|(key, value)| pb::Label { key, value }).collect(),
                            policy: Some(pb::RunPolicy {
                                retries, flaky_retries, max_infra_attempts: max_infra, test_timeout_ms: timeout_ms,
                                ..Default::default()
                            }),
                            ..Default::default()
                        };
                        match svc.submit_run(Request::new(req)).await {
                            Ok(r) => { accepted_runs.insert(r.into_inner().run_id, n); None }
                            Err(s) => Some(s),
                        }
                    }
                    Call::Quarantine { suite, test, reason, by } => {
                        let key = (suite.clone(), test.clone());
                        match svc.add_quarantine(Request::new(pb::AddQuarantineRequest { suite, test_id: test, reason, added_by: by })).await {
                            Ok(_) => { quarantined.insert(key); None }
                            Err(s) => Some(s),
                        }
                    }
                    Call::Cancel { run, reason } => {
                        svc.cancel_run(Request::new(pb::CancelRunRequest { run_id: run, reason })).await.err()
                    }
                    Call::Register { name, slots, kind } => {
                        let req = pb::RegisterRequest {
                            name, slots, labels: vec![],
                            runners: vec![pb::RunnerInfo { name: "exec".into(), kind }],
                        };
                        svc.register(Request::new(req)).await.err()
                    }
                };
                if let Some(s) = refused {
                    prop_assert!(callers_error(s.code()), "not a caller's error: {s:?}");
                    prop_assert!(!s.message().is_empty() && s.message().len() < 600, "{s:?}");
                }
            }
            // The store holds exactly the accepted runs, with their tests, and the quarantine.
            let stored = reader.runs_page(1000).unwrap();
            let stored: BTreeMap<String, usize> = stored
                .into_iter()
                .map(|(row, counts)| (row.id.to_string(), counts.total as usize))
                .collect();
            prop_assert_eq!(stored, accepted_runs);
            let q: BTreeSet<(String, String)> = reader
                .quarantine(None)
                .unwrap()
                .into_iter()
                .map(|q| (q.suite, q.test_id))
                .collect();
            prop_assert_eq!(q, quarantined);
            Ok(())
        })?;
    }
}
