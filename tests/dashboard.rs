//! The web dashboard in a real browser: headless Chromium (Debian's `chromium` and
//! `chromium-driver`, which `scripts/test` installs) driven over WebDriver, against a real
//! coordinator and real worker processes. The run page must follow a run to its verdict by
//! itself (no reload), the fleet page must show every worker with a fresh heartbeat, and the
//! deploy board must show the deploy a rollout hook made. Screenshots go to
//! `target/screenshots/`: look at them, they are the product.

mod harness;

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder};
use harness::{Cluster, free_port, poll_until_async, script, wait_for};
use serde_json::json;

/// A chromedriver on a free port, killed on drop.
struct Driver {
    child: Child,
    port: u16,
}

impl Drop for Driver {
    fn drop(&mut self) {
        // The browser is chromedriver's child: the whole group goes, even when a failed
        // assertion left the session open.
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = self.child.wait();
    }
}

fn chromedriver() -> Driver {
    let port = free_port();
    let child = Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .process_group(0)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver is needed for the browser test: `apt-get install chromium chromium-driver` (scripts/test does it)");
    wait_for("chromedriver to listen", Duration::from_secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    });
    Driver { child, port }
}

async fn browser(driver: &Driver) -> Client {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": "/usr/bin/chromium",
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1400,1000", "--hide-scrollbars"],
        }),
    );
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{}", driver.port))
        .await
        .expect("failed to start a Chromium session")
}

fn screenshot_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    let dir = target.join("screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn shot(c: &Client, name: &str) {
    let png = c.screenshot().await.unwrap();
    std::fs::write(screenshot_dir().join(format!("{name}.png")), png).unwrap();
}

/// Evaluates `expr` in the page.
async fn eval(c: &Client, expr: &str) -> serde_json::Value {
    c.execute(&format!("return ({expr});"), vec![]).await.unwrap()
}

/// Polls `expr` in the page until `ok` holds, under a deadline.
async fn until(
    c: &Client,
    what: &str,
    timeout: Duration,
    expr: &str,
    ok: impl Fn(&serde_json::Value) -> bool,
) {
    let last = std::cell::RefCell::new(serde_json::Value::Null);
    let met = poll_until_async(Instant::now() + timeout, || async {
        let v = eval(c, expr).await;
        let met = ok(&v).then_some(());
        *last.borrow_mut() = v;
        met
    })
    .await;
    assert!(
        met.is_some(),
        "timed out waiting for {what}: last {}",
        last.borrow()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_follows_a_real_run_to_its_verdict_the_fleet_and_the_deploy() {
    let hooks = tempfile::tempdir().unwrap();
    script(hooks.path(), "deploy.sh", "echo deployed $SHARDGATE_REVISION");
    let hook = json!([hooks.path().join("deploy.sh").to_str().unwrap()]).to_string();
    let cluster = Cluster::builder()
        .workers(3)
        .slots(2)
        .coordinator_args(&["--rollout-command", &hook])
        .start();
    // 36 tests of 1.0–1.6 s over 6 slots: about 8 s, long enough to watch the page refresh
    // (at most once a second) several times. One flakes (fails its first run, passes the
    // retry), so the page shows a flaky test with its output.
    let mut tests = Vec::new();
    for i in 0..36 {
        let id = format!("t/{i:03}.sh");
        let sleep = format!("1.{}", (i * 3) % 7);
        script(&cluster.root, &id, &format!("echo test {i}\nsleep {sleep}"));
        tests.push(id);
    }
    let marker = cluster.root.join("flaked");
    script(
        &cluster.root,
        "t/flaky.sh",
        &format!(
            "if [ -e {m} ]; then echo second time lucky; exit 0; fi\ntouch {m}\necho 'connection reset by peer' >&2\nexit 1",
            m = marker.display()
        ),
    );
    tests.push("t/flaky.sh".into());

    let driver = chromedriver();
    let c = browser(&driver).await;
    let base = format!("http://{}", cluster.http_addr);

    // Submitted without waiting; the browser opens the run page at once.
    let list = hooks.path().join("tests.txt");
    std::fs::write(&list, tests.join("\n")).unwrap();
    let submitted = cluster.client(&[
        "run",
        "--runner",
        "exec",
        "--tests-file",
        list.to_str().unwrap(),
        "--json",
        "--detach",
        "--suite",
        "web",
        "--revision",
        "9c1d2e3f4a5b",
        "--requested-by",
        "dana",
        "--rollout",
        "--author",
        "erin",
        "--author",
        "frank",
    ]);
    assert_eq!(submitted.code, 0, "{submitted:?}");
    let run_id = submitted.json()["run_id"].as_str().unwrap().to_owned();
    c.goto(&format!("{base}/runs/{run_id}")).await.unwrap();
    // Set once: a reload would lose it, so at the end it proves the page updated itself.
    eval(&c, "window.__loadedOnce = true").await;

    // Progress advances on the page, to the verdict, without a reload.
    let total = tests.len() as u64;
    let seen = std::cell::RefCell::new(std::collections::BTreeSet::new());
    let mid_shot = std::cell::Cell::new(false);
    let passed = poll_until_async(Instant::now() + Duration::from_secs(90), || async {
        let state = eval(
            &c,
            "[document.getElementById('done') && document.getElementById('done').textContent, document.querySelector('.runhead') && document.querySelector('.runhead').dataset.status]",
        )
        .await;
        let done = state[0].as_str().unwrap_or("").to_owned();
        let status = state[1].as_str().unwrap_or("").to_owned();
        if let Some((d, t)) = done.split_once('/') {
            let (d, t): (u64, u64) = (d.parse().unwrap(), t.parse().unwrap());
            assert!(t == 0 || t == total, "total shown as {t}");
            seen.borrow_mut().insert(d);
            if !mid_shot.get() && d > 0 && d < total {
                shot(&c, "run-in-progress").await;
                mid_shot.set(true);
            }
        }
        assert!(
            !["failed", "errored", "cancelled"].contains(&status.as_str()),
            "the run ended {status}"
        );
        (status == "passed").then_some(())
    })
    .await;
    let seen = seen.into_inner();
    assert!(
        passed.is_some(),
        "the page never showed the verdict; saw {seen:?}"
    );
    // The final counts are on the page once it says passed.
    until(
        &c,
        "the final count",
        Duration::from_secs(10),
        "document.getElementById('done').textContent",
        |v| v.as_str() == Some(&format!("{total}/{total}")),
    )
    .await;
    // The run's deploy shows on its page and follows the hook to its end, without a reload
    // (the run's own events ended with the verdict).
    until(
        &c,
        "the run's deploy to succeed on its page",
        Duration::from_secs(30),
        "(document.querySelector('p.deploy') || {dataset: {}}).dataset.state || ''",
        |v| v.as_str() == Some("succeeded"),
    )
    .await;
    let deploy = eval(&c, "document.querySelector('p.deploy').textContent").await;
    assert!(deploy.as_str().unwrap().contains("dana"), "{deploy}");
    assert_eq!(
        eval(&c, "document.querySelector('p.deploy a').getAttribute('href')").await,
        json!("/deploys")
    );
    let partial: Vec<_> = seen.iter().filter(|d| **d > 0 && **d < total).collect();
    assert!(
        partial.len() >= 2,
        "the page should show progress advancing between 0 and {total}; it showed {seen:?}"
    );
    assert_eq!(
        eval(&c, "window.__loadedOnce === true").await,
        json!(true),
        "the page reloaded instead of updating itself"
    );
    // The flaky test with its output, the timeline, and the JUnit link.
    let flaky = eval(&c, "document.querySelector('section.flaky').textContent").await;
    assert!(flaky.as_str().unwrap().contains("t/flaky.sh"), "{flaky}");
    assert!(
        flaky.as_str().unwrap().contains("connection reset by peer"),
        "{flaky}"
    );
    let bars = eval(
        &c,
        "document.querySelectorAll('.timeline .shard.st-finished').length",
    )
    .await;
    assert!(bars.as_u64().unwrap() >= 6, "timeline bars: {bars}");
    let lanes = eval(&c, "document.querySelectorAll('.timeline .lane').length").await;
    assert!(lanes.as_u64().unwrap() <= 6, "at most one lane per slot: {lanes}");
    let junit = eval(&c, "document.querySelector('a[href$=\"/junit\"]').href").await;
    assert!(
        junit
            .as_str()
            .unwrap()
            .ends_with(&format!("/api/runs/{run_id}/junit"))
    );
    c.execute(
        "document.querySelector('section.flaky details').open = true",
        vec![],
    )
    .await
    .unwrap();
    shot(&c, "run-passed").await;

    // The fleet: every worker live, heartbeats fresh, and fresh again a little later (the
    // page follows them by itself).
    c.goto(&format!("{base}/fleet")).await.unwrap();
    let ages = "[...document.querySelectorAll('tr[data-worker] td.seen time')].map(t => Date.now() - Number(t.dataset.ms))";
    until(&c, "three fresh heartbeats", Duration::from_secs(10), ages, |v| {
        v.as_array()
            .is_some_and(|a| a.len() == 3 && a.iter().all(|x| x.as_f64().unwrap() < 5000.0))
    })
    .await;
    let first: Vec<String> = cluster_names(
        &eval(
            &c,
            "[...document.querySelectorAll('tr[data-worker]')].map(r => r.dataset.worker)",
        )
        .await,
    );
    for i in 0..3 {
        assert!(first.contains(&cluster.worker_name(i).to_owned()), "{first:?}");
    }
    let stamp = "[...document.querySelectorAll('td.seen time')].map(t => t.dataset.ms).join(',')";
    let before = eval(&c, stamp).await;
    until(
        &c,
        "heartbeats to move on the page",
        Duration::from_secs(15),
        stamp,
        |v| *v != before,
    )
    .await;
    shot(&c, "fleet").await;

    // The deploy board shows the deploy the hook made, by whom and with which authors.
    c.goto(&format!("{base}/deploys")).await.unwrap();
    until(
        &c,
        "the deploy",
        Duration::from_secs(30),
        "document.querySelector('.board').textContent",
        |v| {
            let t = v.as_str().unwrap_or("");
            t.contains("succeeded")
                && t.contains("dana")
                && t.contains("erin, frank")
                && t.contains("9c1d2e3f4a5b")
        },
    )
    .await;
    let log_rows = eval(&c, "document.querySelectorAll('table.deploys tbody tr').length").await;
    assert_eq!(log_rows, json!(1));
    shot(&c, "deploys").await;

    // The runs list, filtered by suite.
    c.goto(&format!("{base}/?suite=web")).await.unwrap();
    let rows = eval(
        &c,
        "[...document.querySelectorAll('tr[data-run]')].map(r => r.dataset.run)",
    )
    .await;
    assert_eq!(rows, json!([run_id]));
    shot(&c, "runs").await;
    c.goto(&format!("{base}/flaky?suite=web")).await.unwrap();
    let flaky_page = eval(&c, "document.querySelector('main').textContent").await;
    assert!(
        flaky_page.as_str().unwrap().contains("t/flaky.sh"),
        "{flaky_page}"
    );
    shot(&c, "flaky").await;
    c.close().await.unwrap();
}

fn cluster_names(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_scripts_off_the_pages_are_plain_data_that_refresh_themselves() {
    let cluster = Cluster::builder().workers(1).slots(1).start();
    let tests = harness::suite(&cluster.root, 3, &[], "0");
    let ran = cluster.run_tests(&tests, &[]);
    assert_eq!(ran.code, 0, "{ran:?}");
    let run_id = ran.json()["run_id"].as_str().unwrap().to_owned();
    for path in [
        "/".to_owned(),
        format!("/runs/{run_id}"),
        "/fleet".into(),
        "/deploys".into(),
    ] {
        let (code, body) = harness::http_get(&cluster.http_addr, &path).unwrap();
        assert_eq!(code, 200, "{path}: {body}");
        let data = match path.as_str() {
            "/deploys" => "No deploy yet",
            "/fleet" => "data-worker=",
            _ => "3/3",
        };
        assert!(body.contains(data), "{path} shows its data in HTML: {body}");
        // Live pages refresh themselves when scripts are off; an ended run's page does not.
        let refreshes = body.contains(r#"<noscript><meta http-equiv="refresh""#);
        assert_eq!(refreshes, !path.starts_with("/runs/"), "{path}");
    }
    let (code, body) = harness::http_get(&cluster.http_addr, "/no/such/page").unwrap();
    assert_eq!(code, 404);
    let err: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(err["error"].as_str().unwrap().contains("/no/such/page"), "{body}");
}
