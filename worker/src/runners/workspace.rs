//! Workspaces: the directory a batch runner's commands run in for one revision, and the proof
//! of the commit they ran.
//!
//! Three set-ups, from a profile (see `profile.rs`):
//!
//! - **`git` source** ([`Checkouts`]): the worker keeps one bare mirror of the repository and a
//!   worktree per commit, checked out detached at exactly that commit, shared by every slot
//!   running it and touched by no other revision. The profile's `setup` runs once per worktree,
//!   inside it. Worktrees are reused while they are wanted and evicted least recently used past
//!   the profile's bounds (`max_checkouts`, `max_checkouts_size`), never while a slot holds one;
//!   a worker that starts finds the worktrees of an earlier life and removes them (one killed
//!   mid-checkout leaves nothing half made behind). The proof of a shard is its worktree's
//!   `HEAD`, read when the shard starts and again as its results leave.
//! - **A fixed `workdir` with a `setup`** ([`SharedDir`]): the directory holds one revision at a
//!   time. A shard of revision R waits until no shard of another revision uses it, runs the
//!   setup again whenever the directory was last set up for another revision, and shares it
//!   only with shards of R. The proof is what the profile's optional `revision_check` prints.
//! - **A fixed `workdir` without a setup**: the directory is the operator's; nothing is
//!   switched, and only `revision_check` proves anything.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::RunnerError;
use super::batch::CommandRunner;

/// What a profile says of a `git` source.
#[derive(Debug, Clone)]
pub struct GitConfig {
    /// The repository: a URL git can fetch, or a local path.
    pub repo: String,
    /// Where the mirror and the worktrees live (one worker at a time).
    pub dir: PathBuf,
    /// Most worktrees kept (at least 1).
    pub max_checkouts: usize,
    /// Most bytes the worktrees may take together, if bounded.
    pub max_bytes: Option<u64>,
    /// The longest a clone, fetch or checkout may take.
    pub timeout: Duration,
}

/// A runner's workspace for one shard: the runner to use there (its `workdir` the directory of
/// the shard's revision), and what keeps that directory as it is until the shard ends.
pub struct Workspace {
    pub runner: CommandRunner,
    /// How the commit the shard runs is proven, if it can be.
    pub prover: Option<Prover>,
    _lease: Lease,
}

impl std::fmt::Debug for Workspace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workspace")
            .field("workdir", &self.runner.config().workdir)
            .finish()
    }
}

impl Workspace {
    pub(super) fn plain(runner: CommandRunner, prover: Option<Prover>) -> Self {
        Self {
            runner,
            prover,
            _lease: Lease::default(),
        }
    }
}

/// What a workspace holds until it is dropped (both release on `Drop`).
#[derive(Default)]
struct Lease {
    _tree: Option<TreeLease>,
    _shared: Option<SharedLease>,
}

/// How a shard proves the commit it ran.
#[derive(Debug, Clone)]
pub enum Prover {
    /// A worktree's `HEAD`.
    Head {
        tree: PathBuf,
        checkouts: Arc<Checkouts>,
        commit: String,
    },
    /// The profile's `revision_check` command, run in the workdir.
    Command {
        argv: Vec<String>,
        workdir: PathBuf,
        env: std::collections::BTreeMap<String, String>,
    },
}

impl Prover {
    /// The commit the workspace holds now; a text that is no commit hash (which the
    /// coordinator refuses) when it cannot be read, never an empty one.
    pub async fn prove(&self) -> String {
        match self {
            Prover::Head {
                tree,
                checkouts,
                commit,
            } => {
                let head = head_of(tree)
                    .await
                    .unwrap_or_else(|e| format!("unreadable HEAD: {e}"));
                if &head != commit {
                    warn!(tree = %tree.display(), expected = %commit, found = %head, "a worktree was moved behind the worker's back; it will be removed");
                    checkouts.spoil(commit);
                }
                head
            }
            Prover::Command { argv, workdir, env } => {
                let mut cmd = tokio::process::Command::new(&argv[0]);
                cmd.args(&argv[1..])
                    .current_dir(workdir)
                    .envs(env)
                    .stdin(std::process::Stdio::null())
                    .kill_on_drop(true);
                let said = match tokio::time::timeout(Duration::from_secs(60), cmd.output()).await {
                    Ok(Ok(out)) if out.status.success() => String::from_utf8_lossy(&out.stdout)
                        .lines()
                        .next()
                        .unwrap_or_default()
                        .trim()
                        .to_ascii_lowercase(),
                    Ok(Ok(out)) => format!("revision_check failed ({})", out.status),
                    Ok(Err(e)) => format!("revision_check failed to start: {e}"),
                    Err(_) => "revision_check timed out".to_owned(),
                };
                if said.is_empty() {
                    "revision_check printed nothing".to_owned()
                } else {
                    said.chars().filter(|c| !c.is_control()).take(200).collect()
                }
            }
        }
    }
}

/// Whether `revision` may be given to git as a revision: not an option, no whitespace or
/// control characters, not absurdly long.
pub fn check_revision(revision: &str) -> Result<(), RunnerError> {
    let bad = revision.is_empty()
        || revision.len() > 256
        || revision.starts_with('-')
        || revision.chars().any(|c| c.is_whitespace() || c.is_control());
    if bad {
        return Err(RunnerError::UnknownRevision(format!(
            "revision '{}' is not a revision git can check out (empty, too long, starting with '-' or holding spaces)",
            revision.chars().take(80).collect::<String>()
        )));
    }
    Ok(())
}

fn is_hex_revision(revision: &str) -> bool {
    (4..=64).contains(&revision.len()) && revision.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The `HEAD` commit of the checkout at `tree`, read from git's files (cheap enough to read for
/// every report), or by `git rev-parse` when `HEAD` is a branch.
async fn head_of(tree: &Path) -> Result<String, String> {
    let dotgit = tree.join(".git");
    let gitdir = match std::fs::read_to_string(&dotgit) {
        Ok(s) => {
            let p = s
                .trim()
                .strip_prefix("gitdir:")
                .map(str::trim)
                .unwrap_or_default()
                .to_owned();
            PathBuf::from(p)
        }
        Err(_) if dotgit.is_dir() => dotgit,
        Err(e) => return Err(format!("{}: {e}", dotgit.display())),
    };
    let head = std::fs::read_to_string(gitdir.join("HEAD")).map_err(|e| e.to_string())?;
    let head = head.trim();
    if matches!(head.len(), 40 | 64) && head.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(head.to_ascii_lowercase());
    }
    let out = git(tree, &["rev-parse", "--verify", "HEAD"], Duration::from_secs(30)).await?;
    Ok(out.trim().to_ascii_lowercase())
}

/// Runs git with `args` in `dir` under `limit`; its standard output, or what went wrong.
async fn git(dir: &Path, args: &[&str], limit: Duration) -> Result<String, String> {
    let mut cmd = tokio::process::Command::new("git");
    cmd.arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_TERMINAL_PROMPT", "0")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .process_group(0);
    let shown = || format!("git {}", args.join(" "));
    match tokio::time::timeout(limit, cmd.output()).await {
        Ok(Ok(out)) if out.status.success() => Ok(String::from_utf8_lossy(&out.stdout).into_owned()),
        Ok(Ok(out)) => Err(format!(
            "{} failed ({}): {}",
            shown(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Ok(Err(e)) => Err(format!("{} failed to start: {e}", shown())),
        Err(_) => Err(format!("{} timed out after {} s", shown(), limit.as_secs())),
    }
}

/// The checkouts of one `git` runner on this worker.
pub struct Checkouts {
    cfg: GitConfig,
    /// Serialises what changes the mirror: the first clone, fetches, adding, moving and
    /// removing worktrees.
    mirror: tokio::sync::Mutex<Option<std::fs::File>>,
    state: Mutex<Trees>,
    /// The directory this worker locked: the profile's `checkouts`, or `<checkouts>.N` when
    /// other workers on the machine hold that one.
    dir: std::sync::OnceLock<PathBuf>,
}

impl std::fmt::Debug for Checkouts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkouts").field("cfg", &self.cfg).finish()
    }
}

#[derive(Default)]
struct Trees {
    /// Every worktree this worker made, by an id of its own.
    trees: HashMap<u64, Tree>,
    /// What a revision resolved to: for a hash, for good; for a ref name, for the run that
    /// asked (a branch moves, a run does not).
    resolved: HashMap<(String, String), String>,
    clock: u64,
    next_id: u64,
}

impl Trees {
    /// The worktree that holds `commit` and may be given out.
    fn good(&mut self, commit: &str) -> Option<(&u64, &mut Tree)> {
        self.trees
            .iter_mut()
            .find(|(_, t)| t.commit == commit && !t.spoiled)
    }

    /// The idle worktree used longest ago, spoiled ones first.
    fn least_recent_idle(&self) -> Option<u64> {
        self.trees
            .iter()
            .filter(|(_, t)| t.users == 0)
            .min_by_key(|(_, t)| (!t.spoiled, t.last_used))
            .map(|(id, _)| *id)
    }
}

struct Tree {
    commit: String,
    path: PathBuf,
    runner: CommandRunner,
    users: usize,
    last_used: u64,
    /// Moved behind the worker's back: removed once no slot uses it, never given out again.
    spoiled: bool,
}

struct TreeLease {
    checkouts: Arc<Checkouts>,
    id: u64,
}

impl Drop for TreeLease {
    fn drop(&mut self) {
        let mut s = self.checkouts.state.lock().expect("checkouts lock");
        s.clock += 1;
        let clock = s.clock;
        if let Some(t) = s.trees.get_mut(&self.id) {
            t.users -= 1;
            t.last_used = clock;
        }
    }
}

impl Checkouts {
    pub fn new(cfg: GitConfig) -> Arc<Self> {
        Arc::new(Self {
            cfg,
            mirror: tokio::sync::Mutex::new(None),
            state: Mutex::new(Trees::default()),
            dir: std::sync::OnceLock::new(),
        })
    }

    pub fn config(&self) -> &GitConfig {
        &self.cfg
    }

    /// The checkouts directory this worker holds (the profile's until one is locked).
    pub fn dir(&self) -> &Path {
        self.dir.get().unwrap_or(&self.cfg.dir)
    }

    fn mirror_dir(&self) -> PathBuf {
        self.dir().join("mirror.git")
    }

    fn trees_dir(&self) -> PathBuf {
        self.dir().join("trees")
    }

    fn spoil(&self, commit: &str) {
        let mut s = self.state.lock().expect("checkouts lock");
        for t in s.trees.values_mut().filter(|t| t.commit == commit) {
            t.spoiled = true;
        }
    }

    /// A lease on the worktree of `revision` for run `run`, made if needed, with the runner
    /// whose `workdir` is in it (`make` builds that runner for a checkout's root).
    pub async fn acquire(
        self: &Arc<Self>,
        revision: &str,
        run: &str,
        cancel: &CancellationToken,
        make: impl Fn(&Path) -> CommandRunner,
    ) -> Result<Workspace, RunnerError> {
        check_revision(revision)?;
        let key = self.resolution_key(revision, run);
        if let Some(ws) = self.take_existing(&key) {
            return Ok(ws);
        }
        let mut mirror = tokio::select! {
            m = self.mirror.lock() => m,
            _ = cancel.cancelled() => return Err(RunnerError::Setup("checkout cancelled".into())),
        };
        if mirror.is_none() {
            *mirror = Some(self.open().await?);
        }
        // Another slot may have made it while this one waited.
        if let Some(ws) = self.take_existing(&key) {
            return Ok(ws);
        }
        let commit = self.resolve(revision).await?;
        let existing = {
            let mut s = self.state.lock().expect("checkouts lock");
            if s.resolved.len() >= 4096 {
                s.resolved.clear();
            }
            s.resolved.insert(key.clone(), commit.clone());
            s.good(&commit).is_some()
        };
        if !existing {
            self.evict().await;
            let path = match self.recycle(&commit).await {
                Some(p) => p,
                None => {
                    let p = self.trees_dir().join(uuid_like());
                    self.add_tree(&p, &commit).await?;
                    p
                }
            };
            let runner = make(&path);
            let mut s = self.state.lock().expect("checkouts lock");
            s.clock += 1;
            s.next_id += 1;
            let (clock, id) = (s.clock, s.next_id);
            s.trees.insert(
                id,
                Tree {
                    commit: commit.clone(),
                    path,
                    runner,
                    users: 0,
                    last_used: clock,
                    spoiled: false,
                },
            );
        }
        drop(mirror);
        self.take_existing(&key).ok_or_else(|| {
            RunnerError::Local(format!("the checkout of '{revision}' went away as it was made"))
        })
    }

    fn resolution_key(&self, revision: &str, run: &str) -> (String, String) {
        if is_hex_revision(revision) {
            (String::new(), revision.to_ascii_lowercase())
        } else {
            (run.to_owned(), revision.to_owned())
        }
    }

    fn take_existing(self: &Arc<Self>, key: &(String, String)) -> Option<Workspace> {
        let mut s = self.state.lock().expect("checkouts lock");
        let commit = s.resolved.get(key)?.clone();
        let (&id, t) = s.good(&commit)?;
        t.users += 1;
        let runner = t.runner.clone();
        let tree = t.path.clone();
        Some(Workspace {
            runner,
            prover: Some(Prover::Head {
                tree,
                checkouts: self.clone(),
                commit,
            }),
            _lease: Lease {
                _tree: Some(TreeLease {
                    checkouts: self.clone(),
                    id,
                }),
                _shared: None,
            },
        })
    }

    /// Locks the directory for this worker, removes the worktrees of an earlier life and makes
    /// sure the mirror exists.
    async fn open(&self) -> Result<std::fs::File, RunnerError> {
        let lock = self.lock_dir()?;
        let local = |what: &str, e: &dyn std::fmt::Display| {
            RunnerError::Local(format!("failed to {what} in '{}': {e}", self.dir().display()))
        };
        let trees = self.trees_dir();
        if trees.exists() {
            info!(dir = %trees.display(), "removing the worktrees of an earlier run of this worker");
            let t = trees.clone();
            let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(t)).await;
        }
        std::fs::create_dir_all(&trees).map_err(|e| local("create the worktrees directory", &e))?;
        let trash = self.dir().join("trash");
        let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(trash)).await;
        let _ = std::fs::remove_dir_all(self.dir().join("mirror.tmp"));
        let mirror = self.mirror_dir();
        let usable = mirror.join("HEAD").exists()
            && git(&mirror, &["rev-parse", "--git-dir"], Duration::from_secs(30))
                .await
                .is_ok();
        if usable {
            let _ = git(&mirror, &["worktree", "prune"], self.cfg.timeout).await;
        } else {
            let _ = std::fs::remove_dir_all(&mirror);
            info!(repo = %self.cfg.repo, dir = %mirror.display(), "cloning the repository's mirror");
            let tmp = self.dir().join("mirror.tmp");
            git(
                self.dir(),
                &[
                    "clone",
                    "--bare",
                    "--quiet",
                    "--",
                    &self.cfg.repo,
                    &tmp.display().to_string(),
                ],
                self.cfg.timeout,
            )
            .await
            .map_err(|e| RunnerError::Setup(format!("failed to clone '{}': {e}", self.cfg.repo)))?;
            std::fs::rename(&tmp, &mirror).map_err(|e| local("move the new mirror into place", &e))?;
        }
        Ok(lock)
    }

    /// Locks the first checkouts directory no other worker holds: the profile's, then
    /// `<checkouts>.2`, `<checkouts>.3`, … (several workers on one machine share a profile).
    fn lock_dir(&self) -> Result<std::fs::File, RunnerError> {
        let base = &self.cfg.dir;
        for n in 1..=64 {
            let dir = if n == 1 {
                base.clone()
            } else {
                let mut name = base.file_name().unwrap_or_default().to_owned();
                name.push(format!(".{n}"));
                base.with_file_name(name)
            };
            std::fs::create_dir_all(&dir).map_err(|e| {
                RunnerError::Local(format!(
                    "failed to create the checkouts directory '{}': {e}",
                    dir.display()
                ))
            })?;
            let lock = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(dir.join("lock"))
                .map_err(|e| {
                    RunnerError::Local(format!("failed to open '{}': {e}", dir.join("lock").display()))
                })?;
            if lock.try_lock().is_ok() {
                let _ = self.dir.set(dir);
                return Ok(lock);
            }
        }
        Err(RunnerError::Local(format!(
            "64 workers hold checkouts directories next to '{}': give this worker its own `checkouts`",
            base.display()
        )))
    }

    /// The full commit hash `revision` names in the mirror, fetching once when it is not there
    /// (or is a ref name, which may have moved).
    async fn resolve(&self, revision: &str) -> Result<String, RunnerError> {
        let mirror = self.mirror_dir();
        let lookup = || async {
            git(
                &mirror,
                &[
                    "rev-parse",
                    "--verify",
                    "--quiet",
                    "--end-of-options",
                    &format!("{revision}^{{commit}}"),
                ],
                Duration::from_secs(30),
            )
            .await
            .ok()
            .map(|s| s.trim().to_ascii_lowercase())
            .filter(|s| !s.is_empty())
        };
        if is_hex_revision(revision)
            && let Some(c) = lookup().await
        {
            return Ok(c);
        }
        info!(repo = %self.cfg.repo, revision, "fetching the repository");
        git(
            &mirror,
            &[
                "fetch",
                "--quiet",
                "--prune",
                "--force",
                "--tags",
                "--",
                &self.cfg.repo,
                "+refs/heads/*:refs/heads/*",
            ],
            self.cfg.timeout,
        )
        .await
        .map_err(|e| RunnerError::Setup(format!("failed to fetch '{}': {e}", self.cfg.repo)))?;
        if let Some(c) = lookup().await {
            return Ok(c);
        }
        if matches!(revision.len(), 40 | 64) && is_hex_revision(revision) {
            // A commit no branch holds (a pull request's): servers give one by its hash.
            let _ = git(
                &mirror,
                &["fetch", "--quiet", "--", &self.cfg.repo, revision],
                self.cfg.timeout,
            )
            .await;
            if let Some(c) = lookup().await {
                return Ok(c);
            }
        }
        Err(RunnerError::UnknownRevision(format!(
            "revision '{revision}' is not in the repository '{}'",
            self.cfg.repo
        )))
    }

    async fn add_tree(&self, path: &Path, commit: &str) -> Result<(), RunnerError> {
        info!(commit, dir = %path.display(), "checking out a worktree");
        let added = git(
            &self.mirror_dir(),
            &[
                "worktree",
                "add",
                "--detach",
                "--force",
                "--quiet",
                &path.display().to_string(),
                commit,
            ],
            self.cfg.timeout,
        )
        .await;
        if let Err(e) = added {
            let _ = std::fs::remove_dir_all(path);
            let _ = git(&self.mirror_dir(), &["worktree", "prune"], self.cfg.timeout).await;
            return Err(RunnerError::Setup(format!("failed to check out {commit}: {e}")));
        }
        Ok(())
    }

    /// Removes worktree `id` (no slot uses it), in memory and on disk.
    async fn remove_tree(&self, id: u64) {
        let path = {
            let mut s = self.state.lock().expect("checkouts lock");
            match s.trees.get(&id) {
                Some(t) if t.users > 0 => return,
                Some(_) => s.trees.remove(&id).map(|t| t.path),
                None => None,
            }
        };
        if let Some(path) = path {
            self.discard(&path).await;
        }
    }

    /// Deletes a worktree's directory that nothing holds any more.
    async fn discard(&self, path: &Path) {
        if !path.exists() {
            return;
        }
        info!(dir = %path.display(), "removing a worktree");
        // Moved aside at once (it is no worktree from then on) and deleted in the background,
        // so that a shard waiting for a new checkout does not wait for it.
        let trash = self.dir().join("trash").join(uuid_like());
        let moved =
            std::fs::create_dir_all(self.dir().join("trash")).and_then(|()| std::fs::rename(path, &trash));
        let doomed = if moved.is_ok() { trash } else { path.to_owned() };
        let gone = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(doomed));
        if moved.is_err() {
            let _ = gone.await;
        }
        let _ = git(&self.mirror_dir(), &["worktree", "prune"], self.cfg.timeout).await;
    }

    /// Evicts spoiled worktrees no slot uses, then the least recently used idle ones while
    /// there are more than `max_checkouts` or they take more than `max_checkouts_size`. Called
    /// with the mirror locked.
    async fn evict(&self) {
        loop {
            let victim = {
                let s = self.state.lock().expect("checkouts lock");
                let spoiled = s
                    .trees
                    .iter()
                    .find(|(_, t)| t.users == 0 && t.spoiled)
                    .map(|(id, _)| *id);
                let over_count = s.trees.len() > self.cfg.max_checkouts.max(1);
                let over_bytes = self
                    .cfg
                    .max_bytes
                    .is_some_and(|max| s.trees.values().map(|t| dir_size(&t.path)).sum::<u64>() > max);
                spoiled.or_else(|| {
                    (over_count || over_bytes)
                        .then(|| s.least_recent_idle())
                        .flatten()
                })
            };
            match victim {
                Some(id) => self.remove_tree(id).await,
                None => return,
            }
        }
    }

    /// When the worktrees are at their bound, the least recently used idle one, checked out at
    /// `commit` instead and cleaned of every file the commit does not have (ignored ones
    /// included): only the files that differ are written, where a new worktree writes them
    /// all. `None` when there is none to take or moving it failed (it is removed then).
    async fn recycle(&self, commit: &str) -> Option<PathBuf> {
        let old = {
            let mut s = self.state.lock().expect("checkouts lock");
            if s.trees.len() < self.cfg.max_checkouts.max(1) {
                return None;
            }
            let id = s.least_recent_idle()?;
            s.trees.remove(&id)?
        };
        info!(from = %old.commit, to = commit, dir = %old.path.display(), "moving the least recently used worktree to a new commit");
        let moved = async {
            git(
                &old.path,
                &["checkout", "--force", "--detach", "--quiet", commit, "--"],
                self.cfg.timeout,
            )
            .await?;
            git(&old.path, &["clean", "-ffdxq"], self.cfg.timeout).await?;
            let head = head_of(&old.path).await?;
            if head == commit {
                Ok(())
            } else {
                Err(format!("its HEAD is {head}"))
            }
        }
        .await;
        match moved {
            Ok(()) => Some(old.path),
            Err(e) => {
                warn!(dir = %old.path.display(), error = %e, "failed to move a worktree; making a new one");
                self.discard(&old.path).await;
                None
            }
        }
    }
}

/// Bytes under `path`, not following links.
pub fn dir_size(path: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![path.to_owned()];
    while let Some(p) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&p) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                stack.push(e.path());
            } else {
                total += m.len();
            }
        }
    }
    total
}

fn uuid_like() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// A fixed directory that holds one revision at a time (a profile with a `workdir` and a
/// `setup`).
#[derive(Debug, Default)]
pub struct SharedDir {
    state: Mutex<DirState>,
    changed: Notify,
}

#[derive(Debug, Default)]
struct DirState {
    /// The revision the directory was last set up for; `None` while unknown (switching, or a
    /// setup failed).
    current: Option<String>,
    /// Shards using the directory now (all of `current`), or 1 while a setup runs.
    users: usize,
    /// Shards waiting for another revision than `current`: new shards of `current` wait
    /// behind them, so no revision starves.
    waiting_other: usize,
}

struct SharedLease {
    dir: Arc<SharedDir>,
}

impl Drop for SharedLease {
    fn drop(&mut self) {
        self.dir.state.lock().expect("shared dir lock").users -= 1;
        self.dir.changed.notify_waiters();
    }
}

impl SharedDir {
    /// Waits until the directory may hold `revision` for this shard, running `setup` when it
    /// was last set up for another revision.
    pub(super) async fn acquire<F, Fut>(
        self: &Arc<Self>,
        revision: &str,
        cancel: &CancellationToken,
        setup: F,
    ) -> Result<SharedLeaseHandle, RunnerError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<(), RunnerError>>,
    {
        let mut counted_waiting = false;
        let must_set_up = loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut s = self.state.lock().expect("shared dir lock");
                let same = s.current.as_deref() == Some(revision);
                let others = s.waiting_other - usize::from(counted_waiting);
                if s.users == 0 || (same && others == 0) {
                    if counted_waiting {
                        s.waiting_other -= 1;
                    }
                    s.users += 1;
                    if !same {
                        s.current = None;
                    }
                    break !same;
                }
                if !counted_waiting && !same {
                    s.waiting_other += 1;
                    counted_waiting = true;
                }
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = cancel.cancelled() => {
                    if counted_waiting {
                        self.state.lock().expect("shared dir lock").waiting_other -= 1;
                    }
                    self.changed.notify_waiters();
                    return Err(RunnerError::Setup("cancelled while waiting for the workdir".into()));
                }
            }
        };
        let lease = SharedLeaseHandle(SharedLease { dir: self.clone() });
        if must_set_up {
            setup().await?;
            self.state.lock().expect("shared dir lock").current = Some(revision.to_owned());
            self.changed.notify_waiters();
        }
        Ok(lease)
    }
}

/// A shard's hold on a [`SharedDir`].
pub struct SharedLeaseHandle(SharedLease);

impl Workspace {
    pub(super) fn shared(runner: CommandRunner, prover: Option<Prover>, lease: SharedLeaseHandle) -> Self {
        Self {
            runner,
            prover,
            _lease: Lease {
                _tree: None,
                _shared: Some(lease.0),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revisions_that_could_be_options_are_refused() {
        for bad in ["--upload-pack=touch pwned", "-x", "", "a b", "a\nb"] {
            let e = check_revision(bad).unwrap_err().to_string();
            assert!(e.contains("is not a revision git can check out"), "{bad:?}: {e}");
        }
        for good in ["main", "v1.2", "0123abc", "HEAD~1", "feature/x"] {
            check_revision(good).unwrap();
        }
    }

    #[tokio::test]
    async fn a_shared_dir_holds_one_revision_at_a_time_and_sets_up_on_each_switch() {
        let dir = Arc::new(SharedDir::default());
        let cancel = CancellationToken::new();
        let setups = Arc::new(Mutex::new(Vec::new()));
        let setup = |rev: &'static str| {
            let setups = setups.clone();
            move || async move {
                setups.lock().unwrap().push(rev);
                Ok(())
            }
        };
        let a1 = dir.acquire("r1", &cancel, setup("r1")).await.unwrap();
        let a2 = dir.acquire("r1", &cancel, setup("r1")).await.unwrap();
        // r2 waits while r1 holds the directory.
        let d = dir.clone();
        let c = cancel.clone();
        let s2 = setup("r2");
        let waiting = tokio::spawn(async move { d.acquire("r2", &c, s2).await.map(|_| ()) });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        // A new r1 shard waits behind r2: no starvation.
        let d = dir.clone();
        let c = cancel.clone();
        let s3 = setup("r1");
        let late = tokio::spawn(async move { d.acquire("r1", &c, s3).await.map(|_| ()) });
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!late.is_finished(), "an r1 shard joined while r2 waited");
        drop((a1, a2));
        waiting.await.unwrap().unwrap();
        late.await.unwrap().unwrap();
        assert_eq!(*setups.lock().unwrap(), vec!["r1", "r2", "r1"]);
    }
}
