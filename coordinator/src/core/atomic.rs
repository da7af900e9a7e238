//! Atomic messages. Every public operation of the core runs in [`Core::atomically`]: a store
//! savepoint around it, rolled back when it fails, together with the events it produced. The
//! operations themselves are shaped *decide → write → apply*: they compute what to do from
//! memory without changing it, write it to the store, and only when every write succeeded
//! apply it to memory (which cannot fail). So a failed write leaves memory as it was and the
//! rollback leaves the disk as it was: a message is all of it or none of it.
//!
//! The one exception is a shard hand-out, which takes tests from the run's queue before it
//! writes the attempt and puts them back if the write fails (the queue orders by plan, so the
//! queue is as it was).

use shardgate_common::Error;

use super::Core;
use super::state::Effects;
use crate::store::StoreError;

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        tracing::error!(error = %e, "store failure");
        Error::Internal(e.to_string())
    }
}

impl Core {
    /// Runs `f` as one message: its writes and events are kept only if it succeeds. Nests.
    pub fn atomically<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T, Error>) -> Result<T, Error> {
        let events = self.effects.events.len();
        let counts = self.effects.counts.len();
        let traced = self.effects.traced.len();
        self.store.savepoint()?;
        match f(self) {
            Ok(v) => {
                if let Err(e) = self.store.release() {
                    self.poison(format!("failed to release a savepoint: {e}"));
                    return Err(e.into());
                }
                Ok(v)
            }
            Err(e) => {
                if let Err(r) = self.store.rollback() {
                    self.poison(format!("failed to roll back a savepoint: {r}"));
                }
                self.effects.events.truncate(events);
                self.effects.counts.truncate(counts);
                self.effects.traced.truncate(traced);
                Err(e)
            }
        }
    }

    fn poison(&mut self, why: String) {
        tracing::error!(reason = %why, "the store and memory may disagree");
        self.poisoned.get_or_insert(why);
    }

    /// Set when a savepoint could not be closed: the actor must stop so a restart reloads the
    /// store.
    pub fn poisoned(&self) -> Option<&str> {
        self.poisoned.as_deref()
    }

    /// Starts a group commit (see [`crate::store::Transactions::begin_batch`]).
    pub fn begin_batch(&mut self) -> Result<(), StoreError> {
        self.store.begin_batch()
    }

    /// Makes every write since [`Core::begin_batch`] durable.
    pub fn commit_batch(&mut self) -> Result<(), StoreError> {
        self.store.commit_batch()
    }

    /// Events produced since the last [`Core::take_effects`], not yet published.
    pub fn pending_events(&self) -> usize {
        self.effects.events.len()
    }

    /// Takes what the last messages produced.
    pub fn take_effects(&mut self) -> Effects {
        std::mem::take(&mut self.effects)
    }
}
