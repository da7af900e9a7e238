//! The gate's writes: quarantine changes and the rollout task's deploy transitions.

use shardgate_common::{Error, pb, validate};
use tracing::info;

use super::Core;
use crate::model::Now;
use crate::store::{DeployRow, DeployState, QuarantineRow};

impl Core {
    pub fn add_quarantine(
        &mut self,
        req: pb::AddQuarantineRequest,
        now: Now,
    ) -> Result<pb::QuarantineEntry, Error> {
        validate::name("suite", &req.suite, true)?;
        validate::test_id_text("test_id", &req.test_id)?;
        validate::text("reason", &req.reason, validate::MAX_REASON_LEN, true)?;
        validate::name("added_by", &req.added_by, true)?;
        let row = QuarantineRow {
            suite: req.suite,
            test_id: req.test_id,
            reason: req.reason,
            added_by: req.added_by,
            added_ms: now.ms,
            automatic: false,
        };
        self.atomically(|c| Ok(c.store.add_quarantine(&row)?))?;
        info!(suite = %row.suite, test = %row.test_id, by = %row.added_by, "quarantined");
        Ok(row.to_wire())
    }

    pub fn remove_quarantine(&mut self, suite: &str, test: &str) -> Result<bool, Error> {
        let removed = self.atomically(|c| Ok(c.store.remove_quarantine(suite, test)?))?;
        if removed {
            info!(suite, test, "quarantine lifted");
        }
        Ok(removed)
    }

    /// Takes the oldest pending deploy and marks it running (committed before the caller hears
    /// of it, so the hook runs at most once even if the coordinator dies during it).
    pub fn start_next_deploy(&mut self, now: Now) -> Result<Option<DeployRow>, Error> {
        self.atomically(|c| {
            let Some(mut d) = c.store.next_pending_deploy()? else {
                return Ok(None);
            };
            if !c
                .store
                .update_deploy(&d.id, DeployState::Pending, DeployState::Running, now.ms, "")?
            {
                return Ok(None);
            }
            d.state = DeployState::Running;
            d.started_ms = now.ms;
            info!(deploy = %d.id, run = %d.run_id, revision = %d.revision, "rollout starting");
            Ok(Some(d))
        })
    }

    /// Records how a running deploy ended.
    pub fn finish_deploy(
        &mut self,
        id: &str,
        state: DeployState,
        detail: &str,
        now: Now,
    ) -> Result<(), Error> {
        self.atomically(|c| {
            if !c
                .store
                .update_deploy(id, DeployState::Running, state, now.ms, detail)?
            {
                return Err(Error::FailedPrecondition(format!("deploy '{id}' is not running")));
            }
            info!(deploy = %id, state = %state, "rollout ended");
            Ok(())
        })
    }
}
