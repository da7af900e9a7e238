//! The revision under test is the revision that ran: a real git repository with a failing and
//! a fixed revision, runs of them in turn and side by side on long-lived workers, through a
//! `git` source (a worktree per commit) and through a shared workdir that a setup switches.
//! Every failing revision is red and never deployed, every counted result carries the commit
//! it was produced from, and a checkout moved behind the worker's back is refused.

mod harness;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use harness::{Cluster, Ran, wait_for};

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@example.com")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@example.com")
        .output()
        .expect("git runs");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A repository whose suite is `a`, `b` and `c` (each a file saying `pass` or `fail`, run by
/// `run.sh`, which writes JUnit XML, 0.2 s a test) and optionally a test `mover` that runs
/// `git checkout` in its own checkout the first time it runs anywhere.
struct Repo {
    dir: tempfile::TempDir,
    /// R1: `c` fails.
    r1: String,
    /// R2: `c` fixed.
    r2: String,
}

const RUN_SH: &str = r#"out="$1"; shift
echo '<testsuite>' > "$out"
for t in "$@"; do
  if [ "$t" = mover ] && [ -n "$MOVE_ONCE" ] && mkdir "$MOVE_ONCE" 2>/dev/null; then
    git checkout --quiet --detach "$MOVE_TO"
  fi
  sleep 0.2
  if [ "$(cat "cases/$t")" = pass ]; then
    echo "<testcase name=\"$t\" time=\"0.2\"/>" >> "$out"
  else
    echo "<testcase name=\"$t\" time=\"0.2\"><failure message=\"broken at $(cat REVISION)\"/></testcase>" >> "$out"
  fi
done
echo '</testsuite>' >> "$out"
"#;

impl Repo {
    fn new(mover: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        git(p, &["init", "--quiet", "--initial-branch=main"]);
        std::fs::write(p.join("run.sh"), RUN_SH).unwrap();
        let tests = if mover { "a\nb\nc\nmover\n" } else { "a\nb\nc\n" };
        // With ADVANCE set, the first listing anywhere moves the source's `main` on.
        let advance = r#"if [ -n "$ADVANCE" ] && mkdir "$ADVANCE.once" 2>/dev/null; then git -C "$ADVANCE" commit --quiet --allow-empty -m moved; fi"#;
        std::fs::write(
            p.join("list.sh"),
            format!("{advance}\nprintf '{}'\n", tests.replace('\n', "\\n")),
        )
        .unwrap();
        std::fs::create_dir(p.join("cases")).unwrap();
        let commit = |c: &str, msg: &str| {
            for t in ["a", "b"] {
                std::fs::write(p.join("cases").join(t), "pass").unwrap();
            }
            // The mover reads its own case after it moved the checkout: R1's fails.
            std::fs::write(p.join("cases/c"), c).unwrap();
            std::fs::write(p.join("cases/mover"), c).unwrap();
            std::fs::write(p.join("REVISION"), msg).unwrap();
            git(p, &["add", "-A"]);
            git(p, &["commit", "--quiet", "-m", msg]);
            git(p, &["rev-parse", "HEAD"])
        };
        let r1 = commit("fail", "r1");
        let r2 = commit("pass", "r2");
        Self { dir, r1, r2 }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// A cluster with a rollout hook and `workers` workers of `slots` slots, all given `profile`.
fn cluster(profile: &str, workers: usize, slots: u32) -> Cluster {
    Cluster::builder()
        .workers(workers)
        .slots(slots)
        .runners(profile)
        .coordinator_args(&["--rollout-command", r#"["true"]"#])
        .start()
}

fn git_profile(repo: &Repo, checkouts: &Path, extra: &str) -> String {
    format!(
        r#"[runners.src]
kind = "junit"
git = "{repo}"
checkouts = "{checkouts}"
list = ["sh", "list.sh"]
run = ["sh", "run.sh", "{{junit}}", "{{tests}}"]
id = "name"
{extra}
"#,
        repo = repo.path().display(),
        checkouts = checkouts.display(),
    )
}

/// The README's kind of profile: one fixed checkout that the setup moves to each revision.
fn setup_profile(repo: &Repo, checkout: &Path) -> String {
    git(
        checkout.parent().unwrap(),
        &[
            "clone",
            "--quiet",
            &repo.path().display().to_string(),
            &checkout.display().to_string(),
        ],
    );
    format!(
        r#"[runners.src]
kind = "junit"
workdir = "{d}"
setup = ["git", "-C", "{d}", "checkout", "--force", "--quiet", "{{revision}}"]
revision_check = ["git", "rev-parse", "HEAD"]
list = ["sh", "list.sh"]
run = ["sh", "run.sh", "{{junit}}", "{{tests}}"]
id = "name"
"#,
        d = checkout.display()
    )
}

/// `shardgate run --json` of suite `app` at `revision` with the runner `src`, then `extra`.
fn submit(cluster: &Cluster, revision: &str, extra: &[&str]) -> Ran {
    let revision = format!("--revision={revision}");
    let mut args = vec![
        "run",
        "--runner",
        "src",
        "--suite",
        "app",
        &revision,
        "--requested-by",
        "ci",
        "--json",
    ];
    args.extend_from_slice(extra);
    cluster.client(&args)
}

/// A discovered run of `revision` with no retries that asks for a rollout.
fn run(cluster: &Cluster, revision: &str) -> Ran {
    submit(cluster, revision, &["--discover", "--retries", "0", "--rollout"])
}

/// Checks that a run of `revision` ended as `want`, with its results proven to come from
/// `commit`.
fn check(r: &Ran, revision: &str, commit: &str, want: &str) {
    let j = r.json();
    assert_eq!(
        j["status"], want,
        "revision {revision}: {}\n{}",
        r.stdout, r.stderr
    );
    assert_eq!(r.code, if want == "passed" { 0 } else { 1 }, "{}", r.stderr);
    assert_eq!(j["tested_commit"], commit, "{}", r.stdout);
    assert_eq!(j["revision"], revision);
}

/// The revisions deployed so far, oldest first.
fn deployed(cluster: &Cluster) -> Vec<String> {
    let d = cluster.client(&["deploys", "--json"]).json();
    let mut revs: Vec<String> = d["deploys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["revision"].as_str().unwrap().to_owned())
        .collect();
    revs.reverse();
    revs
}

/// R1 → R2 → R1 in turn, then R1 and R2 at once on the worker's two slots.
fn serial_then_concurrent(cluster: &Cluster, repo: &Repo) {
    let (r1, r2) = (repo.r1.as_str(), repo.r2.as_str());
    check(&run(cluster, r1), r1, r1, "failed");
    check(&run(cluster, r2), r2, r2, "passed");
    check(&run(cluster, r1), r1, r1, "failed");
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| run(cluster, r1));
        let b = s.spawn(|| run(cluster, r2));
        (a.join().unwrap(), b.join().unwrap())
    });
    check(&a, r1, r1, "failed");
    check(&b, r2, r2, "passed");
    // The failing test says which revision it saw: R1's files, never R2's.
    let failures: Vec<String> = a.json()["tests"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["outcome"] == "failed")
        .map(|t| t["detail"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(failures, vec!["broken at r1"], "{}", a.stdout);
    wait_for("two deploys", Duration::from_secs(30), || {
        (deployed(cluster).len() == 2).then_some(())
    });
    assert_eq!(
        deployed(cluster),
        vec![r2.to_owned(), r2.to_owned()],
        "R1 never deploys"
    );
}

#[test]
fn a_git_source_tests_each_revision_in_a_worktree_of_its_own_in_turn_and_side_by_side() {
    let repo = Repo::new(false);
    let checkouts = tempfile::tempdir().unwrap();
    let cluster = cluster(&git_profile(&repo, checkouts.path(), ""), 1, 2);
    serial_then_concurrent(&cluster, &repo);
    // A ref name is resolved by the worker and proven like a hash; the JUnit file and the
    // run's page show the tested commit too.
    let junit = cluster.dir.path().join("main.xml");
    let main = submit(
        &cluster,
        "main",
        &["--discover", "--junit", junit.to_str().unwrap()],
    );
    check(&main, "main", &repo.r2, "passed");
    let xml = std::fs::read_to_string(&junit).unwrap();
    assert!(
        xml.contains(&format!(
            r#"<property name="shardgate.tested_commit" value="{}"/>"#,
            repo.r2
        )),
        "{xml}"
    );
    let id = main.json()["run_id"].as_str().unwrap().to_owned();
    let (code, page) = harness::http_get(&cluster.http_addr, &format!("/runs/{id}")).unwrap();
    assert_eq!(code, 200);
    assert!(
        page.contains(&format!(r#"tested commit <code title="{}">"#, repo.r2)),
        "{page}"
    );
}

#[test]
fn every_worker_tests_the_commit_a_ref_name_was_pinned_to_even_after_the_branch_moves() {
    let repo = Repo::new(false);
    let checkouts = tempfile::tempdir().unwrap();
    let env = format!(
        r#"env = {{ ADVANCE = "{}", GIT_AUTHOR_NAME = "t", GIT_AUTHOR_EMAIL = "t@example.com", GIT_COMMITTER_NAME = "t", GIT_COMMITTER_EMAIL = "t@example.com" }}"#,
        repo.path().display()
    );
    let cluster = cluster(&git_profile(&repo, &checkouts.path().join("c"), &env), 3, 1);
    let r = run(&cluster, "main");
    check(&r, "main", &repo.r2, "passed");
    assert_ne!(
        git(repo.path(), &["rev-parse", "main"]),
        repo.r2,
        "main moved during the run"
    );
    let id = r.json()["run_id"].as_str().unwrap().to_owned();
    let progress = cluster.http_json(&format!("/api/runs/{id}/progress")).unwrap();
    let shards = progress["shards"].as_array().unwrap();
    assert!(
        shards.len() >= 3,
        "the discovery and shards on more than one worker: {progress}"
    );
    assert!(
        shards.iter().all(|s| s["state"] == "finished"),
        "no attempt ran another commit: {progress}"
    );
}

#[test]
fn a_shared_workdir_is_set_up_again_for_each_revision_and_never_shared_by_two() {
    let repo = Repo::new(false);
    let tmp = tempfile::tempdir().unwrap();
    let checkout = tmp.path().join("checkout");
    let cluster = cluster(&setup_profile(&repo, &checkout), 1, 2);
    serial_then_concurrent(&cluster, &repo);
}

#[test]
fn a_checkout_moved_behind_the_workers_back_is_refused_and_its_tests_run_elsewhere() {
    let repo = Repo::new(true);
    let checkouts = tempfile::tempdir().unwrap();
    let marker = checkouts.path().join("moved-once");
    // `mover` checks its own worktree out at R1 the first time it runs: that attempt's
    // results (all of them, R2's included) must not count.
    let profile = git_profile(
        &repo,
        &checkouts.path().join("c"),
        &format!(
            "env = {{ MOVE_ONCE = \"{}\", MOVE_TO = \"{}\" }}",
            marker.display(),
            repo.r1
        ),
    );
    let cluster = cluster(&profile, 2, 1);
    let r = run(&cluster, &repo.r2);
    check(&r, &repo.r2, &repo.r2, "passed");
    assert!(marker.exists(), "the mover ran");
    let j = r.json();
    for t in j["tests"].as_array().unwrap() {
        assert_eq!(t["outcome"], "passed", "{t}");
    }
    // The refused attempt is in the run's timeline with the reason.
    let id = j["run_id"].as_str().unwrap();
    let progress = cluster
        .http_json(&format!("/api/runs/{id}/progress"))
        .expect("progress");
    let shards = progress["shards"].as_array().unwrap();
    assert!(
        shards.iter().any(|s| s["state"] == "runner error"),
        "a refused attempt: {progress}"
    );
    let log = std::fs::read_to_string(cluster.dir.path().join("coordinator.log")).unwrap_or_default();
    assert!(
        log.contains("refused an attempt that ran another commit"),
        "the coordinator says why"
    );
}

#[test]
fn a_revision_the_repository_does_not_have_ends_the_run_errored_with_its_name() {
    let repo = Repo::new(false);
    let checkouts = tempfile::tempdir().unwrap();
    let cluster = cluster(&git_profile(&repo, checkouts.path(), ""), 1, 1);
    for revision in ["deadbeefdeadbeef", "no-such-branch"] {
        // Discovered, and with explicit tests (a shard, not a listing, finds it missing).
        let discovered = run(&cluster, revision);
        let list = cluster.dir.path().join("tests.txt");
        std::fs::write(&list, "a\nb\n").unwrap();
        let given = submit(&cluster, revision, &["--tests-file", list.to_str().unwrap()]);
        for r in [&discovered, &given] {
            let j = r.json();
            assert_eq!(j["status"], "errored", "{}", r.stdout);
            assert_eq!(r.code, 2, "{}", r.stderr);
            let m = j["message"].as_str().unwrap();
            assert!(
                m.contains(&format!(
                    "revision '{revision}' is not in the repository '{}'",
                    repo.path().display()
                )),
                "{m}"
            );
        }
    }
    // A revision that would be an option of git's never reaches git.
    let r = run(&cluster, "--upload-pack=touch pwned");
    assert_eq!(r.json()["status"], "errored", "{}", r.stdout);
    assert!(
        r.json()["message"]
            .as_str()
            .unwrap()
            .contains("is not a revision git can check out")
    );
}

fn trees(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir.join("trees"))
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default()
}

#[test]
fn worktrees_stay_within_their_bound_and_one_in_use_is_never_removed() {
    let repo = Repo::new(false);
    let p = repo.path();
    let mut commits = vec![repo.r1.clone(), repo.r2.clone()];
    for i in 0..4 {
        std::fs::write(p.join("REVISION"), format!("extra{i}")).unwrap();
        git(p, &["commit", "--quiet", "-am", &format!("extra{i}")]);
        commits.push(git(p, &["rev-parse", "HEAD"]));
    }
    let checkouts = tempfile::tempdir().unwrap();
    // The setup leaves a file of its own; it must never be found by another commit's setup,
    // even in a worktree moved from one commit to the next.
    let profile = git_profile(
        &repo,
        checkouts.path(),
        "max_checkouts = 1\nsetup = [\"sh\", \"-c\", \"test ! -e leftover && touch leftover\"]",
    );
    let cluster = cluster(&profile, 1, 2);
    for c in &commits {
        let want = if c == &repo.r1 { "failed" } else { "passed" };
        check(&run(&cluster, c), c, c, want);
        let on_disk = trees(checkouts.path());
        assert!(on_disk.len() <= 1, "bound of 1: {on_disk:?}");
    }
    // Two revisions at once with room for one: neither worktree is taken from its shard.
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| run(&cluster, &commits[0]));
        let b = s.spawn(|| run(&cluster, &commits[1]));
        (a.join().unwrap(), b.join().unwrap())
    });
    check(&a, &commits[0], &commits[0], "failed");
    check(&b, &commits[1], &commits[1], "passed");
    assert!(trees(checkouts.path()).len() <= 2);
}

#[test]
fn a_worker_killed_with_a_half_made_checkout_cleans_up_at_start() {
    let repo = Repo::new(false);
    let checkouts = tempfile::tempdir().unwrap();
    let mut cluster = cluster(&git_profile(&repo, checkouts.path(), ""), 1, 1);
    check(&run(&cluster, &repo.r2), &repo.r2, &repo.r2, "passed");
    cluster.kill_worker(0);
    // What a kill in the middle of `git worktree add` and of the first clone leaves: a
    // worktree with files missing, and a half-cloned mirror.
    let made = trees(checkouts.path());
    assert_eq!(made.len(), 1, "{made:?}");
    let tree = &made[0];
    assert!(tree.join("cases/c").exists());
    std::fs::remove_file(tree.join("cases/c")).unwrap();
    std::fs::write(tree.join("cases/a"), "fail").unwrap();
    std::fs::create_dir_all(checkouts.path().join("mirror.tmp/objects")).unwrap();
    cluster.start_worker(0);
    cluster.wait_for_live_workers(1);
    check(&run(&cluster, &repo.r2), &repo.r2, &repo.r2, "passed");
    assert!(!tree.exists(), "the worktree of the earlier life is gone");
    let made = trees(checkouts.path());
    assert_eq!(made.len(), 1, "{made:?}");
    assert_eq!(std::fs::read_to_string(made[0].join("cases/c")).unwrap(), "pass");
    assert!(!checkouts.path().join("mirror.tmp").exists());
}
