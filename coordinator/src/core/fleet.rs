//! The fleet: registration, heartbeats, liveness (live, lost, gone) and deregistration.

use std::collections::{HashMap, HashSet};

use shardgate_common::labels;
use shardgate_common::{AttemptId, Error, RunnerKind, WorkerId, pb, validate};
use tracing::{info, warn};

use super::Core;
use super::state::{RequeueReason, WorkerEntry};
use crate::auth::Identity;
use crate::model::Now;
use crate::store::{RunnerOffer, WorkerRow, WorkerState};

impl Core {
    pub fn register(&mut self, req: pb::RegisterRequest, now: Now) -> Result<pb::RegisterResponse, Error> {
        self.register_as(req, &Identity::anonymous(), now)
    }

    /// Registers a worker owned by `who`: only `who` may act for it afterwards. A name held by a
    /// live worker of another identity is refused.
    pub fn register_as(
        &mut self,
        req: pb::RegisterRequest,
        who: &Identity,
        now: Now,
    ) -> Result<pb::RegisterResponse, Error> {
        if who.known()
            && let Some(held) = self
                .workers
                .values()
                .find(|w| w.row.name == req.name && w.live() && w.row.owner != who.name)
        {
            return Err(Error::PermissionDenied(format!(
                "worker name '{}' is held by a live worker of another identity ('{}')",
                req.name, held.row.owner
            )));
        }
        let owner = who.name.clone();
        self.atomically(|c| c.register_inner(req, owner, now))
    }

    /// Refuses a call for `worker` from anyone but the identity that registered it (an admin
    /// too, when `admin_ok`). Without credentials everyone is the owner.
    pub fn authorize_worker(&self, worker: WorkerId, who: &Identity, admin_ok: bool) -> Result<(), Error> {
        if !who.known() || (admin_ok && who.role == shardgate_common::auth::Role::Admin) {
            return Ok(());
        }
        match self.workers.get(&worker) {
            Some(w) if w.row.owner != who.name => Err(Error::PermissionDenied(format!(
                "worker '{worker}' belongs to another identity; '{}' may act only for its own workers",
                who.name
            ))),
            _ => Ok(()),
        }
    }

    fn register_inner(
        &mut self,
        req: pb::RegisterRequest,
        owner: String,
        now: Now,
    ) -> Result<pb::RegisterResponse, Error> {
        validate::name("name", &req.name, true)?;
        if req.slots == 0 || req.slots > 1024 {
            return Err(Error::invalid(
                "slots",
                format!("{} is out of range 1..=1024", req.slots),
            ));
        }
        let labels = labels::from_wire("labels", &req.labels)?;
        let runners = self.check_runners(&req.runners)?;
        let id = WorkerId::new();
        let mut offers: Vec<RunnerOffer> = runners
            .iter()
            .map(|(name, kind)| RunnerOffer {
                name: name.clone(),
                kind: *kind,
            })
            .collect();
        offers.sort();
        let row = WorkerRow {
            id,
            name: req.name,
            slots: req.slots,
            labels,
            runners: offers,
            registered_ms: now.ms,
            last_seen_ms: now.ms,
            state: WorkerState::Live,
            owner,
        };
        self.store.upsert_worker(&row)?;
        for (n, k) in &runners {
            self.known_runners.insert(n.clone(), *k);
            self.known_labels
                .entry(n.clone())
                .or_default()
                .insert(row.labels.clone());
        }
        info!(worker = %id, name = %row.name, slots = row.slots, "worker registered");
        self.fleet_version += 1;
        self.effects.workers_changed.insert(id);
        self.workers.insert(
            id,
            WorkerEntry {
                row,
                runners,
                last_seen: now.at,
                attempts: HashSet::new(),
                unavailable: Default::default(),
                draining: false,
            },
        );
        self.effects.work_added = true;
        Ok(pb::RegisterResponse {
            worker_id: id.to_string(),
            heartbeat_interval_ms: self.cfg.heartbeat_interval.as_millis() as u64,
            lease_ms: self.cfg.lease.as_millis() as u64,
        })
    }

    /// The runners a registering worker offers, each a known kind, and of the same kind as
    /// other workers registered it with.
    fn check_runners(&self, offered: &[pb::RunnerInfo]) -> Result<HashMap<String, RunnerKind>, Error> {
        if offered.is_empty() {
            return Err(Error::invalid(
                "runners",
                "a worker must offer at least one runner",
            ));
        }
        let mut runners = HashMap::new();
        for r in offered {
            validate::name("runners", &r.name, true)?;
            let kind = RunnerKind::from_wire(r.kind).ok_or_else(|| {
                Error::invalid(
                    "runners",
                    format!("runner '{}' has an unknown kind {}", r.name, r.kind),
                )
            })?;
            if let Some(&known) = self.known_runners.get(&r.name)
                && known != kind
            {
                return Err(Error::invalid(
                    "runners",
                    format!(
                        "runner '{}' is registered as kind '{known}' by other workers, not '{kind}'",
                        r.name
                    ),
                ));
            }
            runners.insert(r.name.clone(), kind);
        }
        Ok(runners)
    }

    pub fn heartbeat(
        &mut self,
        worker: WorkerId,
        attempts: &[String],
        now: Now,
    ) -> Result<pb::HeartbeatResponse, Error> {
        // Only a lost worker's heartbeat writes (it is live again); the others change memory
        // alone and need no savepoint: thousands of workers send one every 2 s.
        let writes = self
            .workers
            .get(&worker)
            .is_some_and(|w| w.row.state == WorkerState::Lost);
        if writes {
            self.atomically(|c| c.heartbeat_inner(worker, attempts, now))
        } else {
            self.heartbeat_inner(worker, attempts, now)
        }
    }

    fn heartbeat_inner(
        &mut self,
        worker: WorkerId,
        attempts: &[String],
        now: Now,
    ) -> Result<pb::HeartbeatResponse, Error> {
        let Some(w) = self.workers.get(&worker) else {
            return Ok(pb::HeartbeatResponse {
                cancel_attempt_ids: Vec::new(),
                reregister: true,
            });
        };
        if w.row.state == WorkerState::Gone {
            return Ok(pb::HeartbeatResponse {
                cancel_attempt_ids: attempts.to_vec(),
                reregister: true,
            });
        }
        let revived = self.write_touch(worker, now)?;
        self.apply_touch(worker, revived, now);
        let lease = self.cfg.lease;
        let mut cancel = Vec::new();
        for a in attempts {
            match a
                .parse::<AttemptId>()
                .ok()
                .and_then(|id| self.attempts.get_mut(&id))
            {
                Some(att) if att.worker == worker => att.lease_until = now.at + lease,
                _ => cancel.push(a.clone()),
            }
        }
        Ok(pb::HeartbeatResponse {
            cancel_attempt_ids: cancel,
            reregister: false,
        })
    }

    /// Records which of `worker`'s runners failed its own check (the full set): they get no
    /// shards until a heartbeat no longer lists them. Memory only: workers repeat it.
    pub fn set_unavailable(&mut self, worker: WorkerId, list: &[pb::UnavailableRunner]) -> Result<(), Error> {
        let Some(w) = self.workers.get_mut(&worker) else {
            return Ok(());
        };
        let mut next = std::collections::BTreeMap::new();
        for u in list {
            if !w.runners.contains_key(&u.name) {
                return Err(Error::invalid(
                    "unavailable_runners",
                    format!(
                        "'{}' is not a runner this worker offers",
                        validate::prefix(&u.name)
                    ),
                ));
            }
            let reason: String = u
                .reason
                .chars()
                .take(validate::MAX_REASON_LEN)
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect();
            next.insert(u.name.clone(), reason);
        }
        if next != w.unavailable {
            for (name, reason) in &next {
                if !w.unavailable.contains_key(name) {
                    warn!(worker = %w.row.name, runner = %name, %reason, "runner unavailable on this worker: it failed the worker's check");
                }
            }
            let freed = w.unavailable.keys().any(|k| !next.contains_key(k));
            w.unavailable = next;
            self.fleet_version += 1;
            self.effects.workers_changed.insert(worker);
            if freed {
                self.effects.work_added = true;
            }
        }
        Ok(())
    }

    /// What the worker's heartbeat says of its drain (shown, not stored: a drain ends in a
    /// deregistration, which is).
    pub fn set_draining(&mut self, worker: WorkerId, draining: bool) {
        if let Some(w) = self.workers.get_mut(&worker)
            && w.draining != draining
        {
            w.draining = draining;
            self.effects.workers_changed.insert(worker);
        }
    }

    /// Any call from a worker proves it is alive: a lost worker that calls is live again. The
    /// write half: stores the revival, if any; returns the row to apply.
    pub(crate) fn write_touch(&mut self, worker: WorkerId, now: Now) -> Result<Option<WorkerRow>, Error> {
        let Some(w) = self.workers.get(&worker) else {
            return Ok(None);
        };
        if w.row.state != WorkerState::Lost {
            return Ok(None);
        }
        let mut row = w.row.clone();
        row.state = WorkerState::Live;
        row.last_seen_ms = now.ms;
        self.store.upsert_worker(&row)?;
        Ok(Some(row))
    }

    /// The apply half of a touch: the worker was seen now.
    pub(crate) fn apply_touch(&mut self, worker: WorkerId, revived: Option<WorkerRow>, now: Now) {
        let Some(w) = self.workers.get_mut(&worker) else {
            return;
        };
        w.last_seen = now.at;
        w.row.last_seen_ms = now.ms;
        self.effects.workers_changed.insert(worker);
        if let Some(row) = revived {
            w.row = row;
            self.fleet_version += 1;
            info!(worker = %worker, "worker is live again");
            self.effects.work_added = true;
        }
    }

    /// A worker leaves (drained): its attempts end and their tests go back, not held against
    /// them. The attempts end independently (a hand-back counts nothing), so every decision is
    /// taken first, then written, then applied.
    pub fn deregister(&mut self, worker: WorkerId, now: Now) -> Result<(), Error> {
        let name = self.worker_name(worker);
        self.atomically(|c| {
            if !c.workers.contains_key(&worker) {
                return Err(Error::not_found("worker", worker));
            }
            c.end_worker(worker, WorkerState::Gone, &RequeueReason::Deregistered(name), now)?;
            info!(worker = %worker, name = %c.worker_name(worker), "worker deregistered");
            Ok(())
        })
    }

    /// A worker's connection closed and it did not call again (see `liveness`): it is lost
    /// and its attempts end now, their tests going back as after a lease expiry (and held
    /// against them the same way). A worker that left or is unknown is left alone.
    pub fn connection_closed(&mut self, worker: WorkerId, now: Now) -> Result<(), Error> {
        let Some(w) = self.workers.get(&worker) else {
            return Ok(());
        };
        if w.row.state == WorkerState::Gone {
            return Ok(());
        }
        let name = self.worker_name(worker);
        warn!(worker = %worker, name = %name, attempts = w.attempts.len(), "worker disconnected; its attempts end now");
        self.atomically(|c| {
            c.end_worker(
                worker,
                WorkerState::Lost,
                &RequeueReason::ConnectionClosed(name),
                now,
            )
        })
    }

    /// Moves a known worker to `state` and ends every attempt it holds for `reason`. The
    /// attempts end independently, so every decision is taken first, then written, then
    /// applied. Runs inside the caller's message.
    fn end_worker(
        &mut self,
        worker: WorkerId,
        state: WorkerState,
        reason: &RequeueReason,
        now: Now,
    ) -> Result<(), Error> {
        let w = &self.workers[&worker];
        let mut row = w.row.clone();
        row.state = state;
        if state == WorkerState::Gone {
            row.last_seen_ms = now.ms;
        }
        let mut ids: Vec<AttemptId> = w.attempts.iter().copied().collect();
        ids.sort();
        let plans = ids
            .into_iter()
            .map(|a| self.decide_end_attempt(a, reason, now))
            .collect::<Result<Vec<_>, _>>()?;
        self.store.upsert_worker(&row)?;
        for p in &plans {
            self.write_end_attempt(p)?;
        }
        let w = self.workers.get_mut(&worker).expect("checked by the caller");
        w.row = row;
        self.fleet_version += 1;
        self.effects.workers_changed.insert(worker);
        for p in plans {
            self.apply_end_attempt(p);
        }
        Ok(())
    }

    /// Marks live workers that fell silent for a lease as lost, each in its own message.
    pub(crate) fn mark_silent_workers_lost(&mut self, now: Now) -> Result<(), Error> {
        let lease = self.cfg.lease;
        let silent: Vec<WorkerId> = self
            .workers
            .values()
            .filter(|w| w.live() && w.last_seen + lease <= now.at)
            .map(|w| w.row.id)
            .collect();
        for id in silent {
            self.atomically(|c| {
                let mut row = c.workers[&id].row.clone();
                row.state = WorkerState::Lost;
                c.store.upsert_worker(&row)?;
                warn!(worker = %id, name = %row.name, "worker lost");
                c.workers.get_mut(&id).expect("listed above").row = row;
                c.fleet_version += 1;
                c.effects.workers_changed.insert(id);
                Ok(())
            })?;
        }
        Ok(())
    }

    /// Known workers, by name; gone ones only when asked.
    pub fn list_workers(&self, include_gone: bool) -> Vec<pb::WorkerInfo> {
        let mut out: Vec<_> = self
            .workers
            .values()
            .filter(|w| include_gone || w.row.state != WorkerState::Gone)
            .map(WorkerEntry::to_wire)
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name).then(a.worker_id.cmp(&b.worker_id)));
        out
    }
}
