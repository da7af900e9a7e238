//! JUnit XML of a run, in the dialect Surefire writes, so CI pages that read JUnit show
//! shardgate's runs: a flaky test is a passing `<testcase>` with a `<flakyFailure>`; a test that
//! failed every attempt has a `<failure>` and one `<rerunFailure>` per retry; an
//! infrastructure error is an `<error>`; a quarantined test carries a `quarantined` property.

use quick_xml::Writer;
use quick_xml::events::{BytesDecl, BytesEnd, BytesStart, BytesText, Event};

use crate::model::{Outcome, RunStatus};
use crate::report::{RunReport, TestReport};

/// Text XML 1.0 can carry: control characters (ANSI colours in captured output) become U+FFFD.
fn clean(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '\t' | '\n' | '\r' => c,
            c if (c as u32) < 0x20 || c == '\u{FFFE}' || c == '\u{FFFF}' => '\u{FFFD}',
            c => c,
        })
        .collect()
}

fn secs(ms: u64) -> String {
    format!("{:.3}", ms as f64 / 1000.0)
}

/// How many failures a flaky test had before it passed ("… after 2 failure(s); …").
fn flaky_failures(detail: &str) -> usize {
    detail
        .split_once(" after ")
        .and_then(|(_, rest)| rest.split_once(" failure"))
        .and_then(|(n, _)| n.parse().ok())
        .unwrap_or(1)
        .max(1)
}

/// How many runs of a test that failed every attempt there were ("failed 3 of 3 attempts").
fn failed_runs(detail: &str) -> usize {
    detail
        .strip_prefix("failed ")
        .and_then(|rest| rest.split_once(" of "))
        .and_then(|(n, _)| n.parse().ok())
        .unwrap_or(1)
}

type W = Writer<Vec<u8>>;

fn element(w: &mut W, name: &str, attrs: &[(&str, &str)], text: Option<&str>) -> std::io::Result<()> {
    let start = BytesStart::new(name).with_attributes(attrs.iter().map(|(k, v)| (*k, *v)));
    match text {
        Some(t) if !t.is_empty() => {
            w.write_event(Event::Start(start))?;
            w.write_event(Event::Text(BytesText::new(&clean(t))))?;
            w.write_event(Event::End(BytesEnd::new(name)))
        }
        _ => w.write_event(Event::Empty(start)),
    }
}

/// What a test the run never counted is: skipped when the run's verdict holds without it (a
/// fail-fast failure), an error when the run did not end by its tests (cancelled, errored), so
/// no JUnit reader calls such a run green.
#[derive(Clone, Copy)]
enum NotRun<'a> {
    Skipped,
    Error(&'a str),
}

fn testcase(w: &mut W, suite: &str, t: &TestReport, not_run: NotRun<'_>) -> std::io::Result<()> {
    let time = secs(t.duration_ms);
    let detail = clean(&t.detail);
    let start = BytesStart::new("testcase").with_attributes([
        ("name", clean(&t.id).as_str()),
        ("classname", clean(suite).as_str()),
        ("time", time.as_str()),
    ]);
    w.write_event(Event::Start(start))?;
    if t.quarantined {
        w.write_event(Event::Start(BytesStart::new("properties")))?;
        element(w, "property", &[("name", "quarantined"), ("value", "true")], None)?;
        w.write_event(Event::End(BytesEnd::new("properties")))?;
    }
    match t.outcome {
        Some(Outcome::Passed) => {}
        Some(Outcome::Flaky) => {
            // One per failed run, as Surefire writes them; the first failure's output is kept.
            for i in 0..flaky_failures(&t.detail) {
                w.write_event(Event::Start(
                    BytesStart::new("flakyFailure")
                        .with_attributes([("message", detail.as_str()), ("type", "failed")]),
                ))?;
                if i == 0 {
                    element(w, "system-out", &[], Some(&t.output))?;
                }
                w.write_event(Event::End(BytesEnd::new("flakyFailure")))?;
            }
        }
        Some(o @ (Outcome::Failed | Outcome::TimedOut)) => {
            let kind = if o == Outcome::TimedOut {
                "timeout"
            } else {
                "failed"
            };
            element(
                w,
                "failure",
                &[("message", &detail), ("type", kind)],
                Some(&t.output),
            )?;
            for _ in 1..failed_runs(&t.detail) {
                element(w, "rerunFailure", &[("message", &detail), ("type", kind)], None)?;
            }
        }
        Some(Outcome::InfraError) => {
            element(
                w,
                "error",
                &[("message", &detail), ("type", "infra_error")],
                Some(&t.output),
            )?;
        }
        Some(Outcome::Skipped) => element(w, "skipped", &[("message", &detail)], None)?,
        None => match not_run {
            NotRun::Skipped => element(w, "skipped", &[("message", "not run: the run ended first")], None)?,
            NotRun::Error(why) => element(
                w,
                "error",
                &[
                    ("message", &clean(&format!("not run: {why}"))),
                    ("type", "not_run"),
                ],
                None,
            )?,
        },
    }
    if t.outcome != Some(Outcome::Flaky) && !t.output.is_empty() && t.outcome == Some(Outcome::Passed) {
        element(w, "system-out", &[], Some(&t.output))?;
    }
    w.write_event(Event::End(BytesEnd::new("testcase")))
}

/// The run as a JUnit XML document.
pub fn to_junit(r: &RunReport) -> String {
    let mut w = Writer::new_with_indent(Vec::new(), b' ', 2);
    write(&mut w, r).expect("writing to memory does not fail");
    String::from_utf8(w.into_inner()).expect("the writer writes UTF-8")
}

fn write(w: &mut W, r: &RunReport) -> std::io::Result<()> {
    let why = match r.status {
        RunStatus::Cancelled => format!("the run was cancelled ({})", r.message),
        RunStatus::Errored => format!("the run errored ({})", r.message),
        _ => String::new(),
    };
    let not_run = if why.is_empty() {
        NotRun::Skipped
    } else {
        NotRun::Error(&why)
    };
    let count = |f: &dyn Fn(&TestReport) -> bool| r.tests.iter().filter(|t| f(t)).count();
    let mut tests = r.tests.len();
    let failures = count(&|t| matches!(t.outcome, Some(Outcome::Failed | Outcome::TimedOut)));
    let mut errors = count(&|t| {
        t.outcome == Some(Outcome::InfraError) || (t.outcome.is_none() && matches!(not_run, NotRun::Error(_)))
    });
    let skipped = count(&|t| {
        t.outcome == Some(Outcome::Skipped) || (t.outcome.is_none() && matches!(not_run, NotRun::Skipped))
    });
    // A run that did not end by its tests, yet shows no failure or error among them (every
    // test counted before a cancel, or none listed), gets one error case of its own.
    let run_case = !why.is_empty() && failures == 0 && errors == 0;
    if run_case {
        tests += 1;
        errors += 1;
    }
    let (tests, failures, errors, skipped) = (
        tests.to_string(),
        failures.to_string(),
        errors.to_string(),
        skipped.to_string(),
    );
    let time = secs(r.makespan_ms);
    let timestamp = if r.started_at_ms > 0 {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(r.started_at_ms);
        humantime::format_rfc3339_seconds(t).to_string()
    } else {
        String::new()
    };
    w.write_event(Event::Decl(BytesDecl::new("1.0", Some("UTF-8"), None)))?;
    let counts = [
        ("tests", tests.as_str()),
        ("failures", failures.as_str()),
        ("errors", errors.as_str()),
        ("skipped", skipped.as_str()),
        ("time", time.as_str()),
    ];
    let suite = clean(&r.suite);
    let mut top = BytesStart::new("testsuites").with_attributes([("name", suite.as_str())]);
    top.extend_attributes(counts);
    w.write_event(Event::Start(top))?;
    let mut ts = BytesStart::new("testsuite").with_attributes([("name", suite.as_str())]);
    ts.extend_attributes(counts);
    if !timestamp.is_empty() {
        ts.push_attribute(("timestamp", timestamp.as_str()));
    }
    w.write_event(Event::Start(ts))?;
    w.write_event(Event::Start(BytesStart::new("properties")))?;
    for (name, value) in [
        ("shardgate.run_id", r.run_id.as_str()),
        ("shardgate.revision", r.revision.as_str()),
        ("shardgate.tested_commit", r.tested_commit.as_str()),
        ("shardgate.requested_by", r.requested_by.as_str()),
        ("shardgate.verdict", r.status.as_str()),
    ] {
        if value.is_empty() && name == "shardgate.tested_commit" {
            continue;
        }
        element(w, "property", &[("name", name), ("value", &clean(value))], None)?;
    }
    w.write_event(Event::End(BytesEnd::new("properties")))?;
    for t in &r.tests {
        testcase(w, &r.suite, t, not_run)?;
    }
    if run_case {
        let suite = clean(&r.suite);
        w.write_event(Event::Start(BytesStart::new("testcase").with_attributes([
            ("name", "shardgate run"),
            ("classname", suite.as_str()),
            ("time", "0"),
        ])))?;
        element(
            w,
            "error",
            &[("message", &clean(&why)), ("type", r.status.as_str())],
            None,
        )?;
        w.write_event(Event::End(BytesEnd::new("testcase")))?;
    }
    w.write_event(Event::End(BytesEnd::new("testsuite")))?;
    w.write_event(Event::End(BytesEnd::new("testsuites")))
}
