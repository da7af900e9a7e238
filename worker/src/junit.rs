//! A JUnit XML reader for the dialects test tools really write: Maven Surefire (with
//! `flakyFailure`/`rerunFailure`), pytest (`xunit1` with `file`, and `xunit2`), cargo-nextest,
//! go-junit-report and jest-junit. It looks for `testcase` elements at any depth (nested
//! `testsuites`/`testsuite` are common), and never panics on bad input: malformed XML is an
//! error that says where.

use quick_xml::Reader;
use quick_xml::events::{BytesStart, Event};
use shardgate_common::Outcome;

/// Largest JUnit file read; a larger one is an error rather than an out-of-memory.
pub const MAX_JUNIT_BYTES: usize = 256 * 1024 * 1024;
/// Output kept per test case.
const MAX_CASE_OUTPUT: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JunitError {
    #[error("malformed JUnit XML at byte {position}: {message}")]
    Xml { position: u64, message: String },
    #[error("JUnit XML ends inside a <testcase> element")]
    Truncated,
    #[error("JUnit file is {0} bytes, more than the {MAX_JUNIT_BYTES} read")]
    TooLarge(usize),
}

/// One `testcase` element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Case {
    pub name: String,
    pub classname: String,
    /// The `file` attribute (pytest `xunit1`, jest-junit), empty when absent.
    pub file: String,
    pub duration_ms: u64,
    pub outcome: Outcome,
    /// The failure, error or skip message, e.g. `AssertionError: 1 != 2`.
    pub message: String,
    /// Failure text, `system-out` and `system-err`, capped.
    pub output: String,
}

#[derive(Default)]
struct Open {
    case: Option<Case>,
    failed: bool,
    errored: bool,
    skipped: bool,
    flaky: bool,
    /// A failure of type `test timeout` (nextest's for a test it stopped at its slow timeout).
    timed_out: bool,
    /// Inside an element whose text is output (failure, error, system-out, …).
    capture: u32,
}

fn attr(e: &BytesStart<'_>, key: &str) -> String {
    e.attributes()
        .flatten()
        .find(|a| a.key.as_ref() == key)
        .and_then(|a| {
            a.normalized_value(quick_xml::XmlVersion::Implicit1_0)
                .ok()
                .map(|v| v.into_owned())
        })
        .unwrap_or_default()
}

fn seconds_to_ms(s: &str) -> u64 {
    // Some tools write "1,234.5" or leave it empty.
    s.replace(',', "")
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|x| x.is_finite() && *x >= 0.0)
        .map(|x| (x * 1000.0).round() as u64)
        .unwrap_or(0)
}

fn push_capped(out: &mut String, text: &str) {
    if out.len() >= MAX_CASE_OUTPUT {
        return;
    }
    let room = MAX_CASE_OUTPUT - out.len();
    if text.len() <= room {
        out.push_str(text);
    } else {
        let mut end = room;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        out.push_str(&text[..end]);
        out.push_str("\n[… output cut]");
    }
}

/// Reads every test case of a JUnit document.
pub fn parse(xml: &str) -> Result<Vec<Case>, JunitError> {
    if xml.len() > MAX_JUNIT_BYTES {
        return Err(JunitError::TooLarge(xml.len()));
    }
    let mut reader = Reader::from_str(xml);
    let mut cases = Vec::new();
    let mut open = Open::default();
    loop {
        let position = reader.buffer_position();
        let event = reader.read_event().map_err(|e| JunitError::Xml {
            position,
            message: e.to_string(),
        })?;
        match event {
            Event::Start(e) => start(&e, &mut open, &mut cases, false),
            Event::Empty(e) => start(&e, &mut open, &mut cases, true),
            Event::End(e) => {
                let name = e.local_name();
                match name.as_ref() {
                    "testcase" => finish(&mut open, &mut cases),
                    "failure" | "error" | "system-out" | "system-err" | "skipped" | "flakyFailure"
                    | "flakyError" | "rerunFailure" | "rerunError" => {
                        open.capture = open.capture.saturating_sub(1);
                    }
                    _ => {}
                }
            }
            Event::Text(t) if open.capture > 0 => {
                if let Some(c) = open.case.as_mut() {
                    push_capped(&mut c.output, &t.xml10_content());
                }
            }
            Event::CData(t) if open.capture > 0 => {
                if let Some(c) = open.case.as_mut() {
                    push_capped(&mut c.output, &t.xml10_content());
                }
            }
            Event::GeneralRef(r) if open.capture > 0 => {
                let text = match r.resolve_char_ref() {
                    Ok(Some(ch)) => ch.to_string(),
                    _ => match r.as_ref() {
                        "amp" => "&".into(),
                        "lt" => "<".into(),
                        "gt" => ">".into(),
                        "quot" => "\"".into(),
                        "apos" => "'".into(),
                        other => format!("&{other};"),
                    },
                };
                if let Some(c) = open.case.as_mut() {
                    push_capped(&mut c.output, &text);
                }
            }
            Event::Eof => break,
            _ => {}
        }
    }
    if open.case.is_some() {
        return Err(JunitError::Truncated);
    }
    Ok(cases)
}

fn start(e: &BytesStart<'_>, open: &mut Open, cases: &mut Vec<Case>, empty: bool) {
    let name = e.local_name();
    match name.as_ref() {
        "testcase" => {
            // A testcase inside a testcase is malformed; close the outer one first.
            if open.case.is_some() {
                finish(open, cases);
            }
            *open = Open::default();
            open.case = Some(Case {
                name: attr(e, "name"),
                classname: attr(e, "classname"),
                file: attr(e, "file"),
                duration_ms: seconds_to_ms(&attr(e, "time")),
                outcome: Outcome::Passed,
                message: String::new(),
                output: String::new(),
            });
            if empty {
                finish(open, cases);
            }
        }
        kind @ ("failure" | "error" | "skipped" | "flakyFailure" | "flakyError" | "rerunFailure"
        | "rerunError" | "system-out" | "system-err") => {
            let Some(case) = open.case.as_mut() else { return };
            match kind {
                "failure" => open.failed = true,
                "error" => open.errored = true,
                "skipped" => open.skipped = true,
                "flakyFailure" | "flakyError" => open.flaky = true,
                _ => {}
            }
            let ty = attr(e, "type");
            if matches!(kind, "failure" | "error") && ty == "test timeout" {
                open.timed_out = true;
            }
            // Without a message, the type says what happened ("test failure", "test timeout").
            let message = match attr(e, "message") {
                m if m.is_empty() && matches!(kind, "failure" | "error") => ty,
                m => m,
            };
            if !message.is_empty()
                && matches!(kind, "failure" | "error" | "skipped")
                && case.message.is_empty()
            {
                case.message = message;
            }
            if !empty {
                open.capture += 1;
            }
        }
        _ => {}
    }
}

fn finish(open: &mut Open, cases: &mut Vec<Case>) {
    let Some(mut case) = open.case.take() else { return };
    case.outcome = if open.timed_out {
        Outcome::TimedOut
    } else if open.failed || open.errored {
        Outcome::Failed
    } else if open.skipped {
        Outcome::Skipped
    } else if open.flaky {
        Outcome::Flaky
    } else {
        Outcome::Passed
    };
    if open.errored && !open.failed && case.message.is_empty() {
        case.message = "error".into();
    }
    cases.push(case);
    *open = Open::default();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcomes(xml: &str) -> Vec<(String, Outcome)> {
        parse(xml)
            .unwrap()
            .into_iter()
            .map(|c| (format!("{}|{}", c.classname, c.name), c.outcome))
            .collect()
    }

    /// shardgate's own JUnit export, read back by the reader every runner uses.
    #[test]
    fn shardgates_export_reads_back_with_the_same_outcomes() {
        use shardgate_common::report::{RunReport, TestReport};
        let t = |id: &str, outcome: Option<Outcome>, detail: &str, output: &str, quarantined| TestReport {
            id: id.into(),
            outcome,
            duration_ms: 1500,
            attempts: 1,
            worker: "w1".into(),
            detail: detail.into(),
            output: output.into(),
            quarantined,
        };
        let mut report = RunReport::new(&Default::default(), &[]);
        report.suite = "suite <&>".into();
        report.tests = vec![
            t("a", Some(Outcome::Passed), "", "hello \x1b[31mred\x1b[0m", false),
            t(
                "b",
                Some(Outcome::Flaky),
                "passed on attempt 3 after 2 failure(s)",
                "boom",
                false,
            ),
            t(
                "c",
                Some(Outcome::Failed),
                "failed 3 of 3 attempts: exit status 1",
                "bad & worse",
                false,
            ),
            t(
                "d",
                Some(Outcome::InfraError),
                "no result after 3 lost attempts",
                "",
                false,
            ),
            t("e", Some(Outcome::Skipped), "exit 77", "", false),
            t("f", None, "", "", false),
            t("q", Some(Outcome::Failed), "exit status 1", "", true),
            t("g", Some(Outcome::TimedOut), "timed out after 5000 ms", "", false),
        ];
        let xml = shardgate_common::junit::to_junit(&report);
        assert!(
            xml.contains(
                r#"<testsuite name="suite &lt;&amp;&gt;" tests="8" failures="3" errors="1" skipped="2""#
            ),
            "{xml}"
        );
        assert_eq!(xml.matches("<rerunFailure").count(), 2, "{xml}");
        assert_eq!(
            xml.matches("<flakyFailure").count(),
            2,
            "one per failed run: {xml}"
        );
        assert!(
            xml.contains(r#"<property name="quarantined" value="true"/>"#),
            "{xml}"
        );
        assert!(!xml.contains('\x1b'), "control characters are not XML");
        let got: Vec<(String, Outcome, u64)> = parse(&xml)
            .unwrap()
            .into_iter()
            .map(|c| (c.name, c.outcome, c.duration_ms))
            .collect();
        let want = [
            ("a", Outcome::Passed),
            ("b", Outcome::Flaky),
            ("c", Outcome::Failed),
            // Other tools read an `<error>` as a test error: red either way.
            ("d", Outcome::Failed),
            ("e", Outcome::Skipped),
            ("f", Outcome::Skipped),
            ("q", Outcome::Failed),
            ("g", Outcome::Failed),
        ];
        assert_eq!(
            got,
            want.iter()
                .map(|(n, o)| (n.to_string(), *o, 1500))
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn surefire_with_reruns() {
        let xml = r#"<?xml version="1.0" encoding="UTF-8"?>
<testsuite xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" name="com.example.CartTest" time="1.2" tests="4" errors="1" skipped="1" failures="1">
  <properties><property name="java.version" value="17"/></properties>
  <testcase name="addsItem" classname="com.example.CartTest" time="0.011"/>
  <testcase name="removesItem" classname="com.example.CartTest" time="0.3">
    <flakyFailure message="expected 2" type="java.lang.AssertionError"><![CDATA[java.lang.AssertionError: expected 2
	at com.example.CartTest.removesItem(CartTest.java:31)]]></flakyFailure>
    <system-out>first try</system-out>
  </testcase>
  <testcase name="totals" classname="com.example.CartTest" time="0.1">
    <failure message="expected 42.00 but was 41.99" type="java.lang.AssertionError">stack &amp; trace</failure>
    <rerunFailure message="expected 42.00 but was 41.99" type="java.lang.AssertionError">again</rerunFailure>
  </testcase>
  <testcase name="db" classname="com.example.CartTest" time="0"><error message="connection refused" type="java.net.ConnectException"/></testcase>
  <testcase name="later" classname="com.example.CartTest" time="0"><skipped message="not yet"/></testcase>
</testsuite>"#;
        let cases = parse(xml).unwrap();
        let got: Vec<_> = cases.iter().map(|c| (c.name.as_str(), c.outcome)).collect();
        assert_eq!(
            got,
            vec![
                ("addsItem", Outcome::Passed),
                ("removesItem", Outcome::Flaky),
                ("totals", Outcome::Failed),
                ("db", Outcome::Failed),
                ("later", Outcome::Skipped),
            ]
        );
        assert_eq!(cases[0].duration_ms, 11);
        assert_eq!(cases[2].message, "expected 42.00 but was 41.99");
        assert!(
            cases[2].output.starts_with("stack & trace"),
            "{:?}",
            cases[2].output
        );
        assert_eq!(cases[3].message, "connection refused");
        assert!(cases[1].output.contains("first try"));
    }

    #[test]
    fn pytest_xunit1_and_xunit2() {
        let xunit1 = r#"<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="0" failures="1" skipped="1" tests="3" time="0.05">
<testcase classname="tests.test_math.TestAdd" name="test_small[1-2]" file="tests/test_math.py" line="9" time="0.001"/>
<testcase classname="tests.test_math" name="test_big" file="tests/test_math.py" line="20" time="0.002"><failure message="assert 3 == 4">def test_big():
&gt;       assert 3 == 4
E       assert 3 == 4</failure><system-err>warning!</system-err></testcase>
<testcase classname="tests.test_math" name="test_skip" file="tests/test_math.py" line="30" time="0.000"><skipped type="pytest.skip" message="no network">tests/test_math.py:31: no network</skipped></testcase>
</testsuite></testsuites>"#;
        let cases = parse(xunit1).unwrap();
        assert_eq!(cases.len(), 3);
        assert_eq!(cases[0].file, "tests/test_math.py");
        assert_eq!(cases[1].outcome, Outcome::Failed);
        assert!(cases[1].output.contains(">       assert 3 == 4"));
        assert!(cases[1].output.contains("warning!"));
        assert_eq!(
            (cases[2].outcome, cases[2].message.as_str()),
            (Outcome::Skipped, "no network")
        );
        let xunit2 = r#"<testsuites><testsuite name="pytest"><testcase classname="test_x" name="test_a" time="0.5"/></testsuite></testsuites>"#;
        assert_eq!(outcomes(xunit2), vec![("test_x|test_a".into(), Outcome::Passed)]);
    }

    /// A cancelled or errored run never reads as green: what it did not run is an error, and a
    /// run with nothing else against it gets an error case of its own.
    #[test]
    fn a_cancelled_runs_export_is_not_green() {
        use shardgate_common::RunStatus;
        use shardgate_common::report::{RunReport, TestReport};
        let t = |id: &str, outcome: Option<Outcome>| TestReport {
            id: id.into(),
            outcome,
            duration_ms: 10,
            attempts: 1,
            worker: "w1".into(),
            detail: String::new(),
            output: String::new(),
            quarantined: false,
        };
        let mut report = RunReport::new(&Default::default(), &[]);
        report.suite = "s".into();
        report.status = RunStatus::Cancelled;
        report.message = "client interrupted".into();
        report.tests = vec![t("a", Some(Outcome::Passed)), t("b", None)];
        let xml = shardgate_common::junit::to_junit(&report);
        assert!(
            xml.contains(r#"tests="2" failures="0" errors="1" skipped="0""#),
            "{xml}"
        );
        assert!(
            xml.contains("not run: the run was cancelled (client interrupted)"),
            "{xml}"
        );
        let outcomes: Vec<Outcome> = parse(&xml).unwrap().into_iter().map(|c| c.outcome).collect();
        assert_eq!(outcomes, [Outcome::Passed, Outcome::Failed]);

        // Every test counted before the cancel: the run itself is the error.
        report.tests = vec![t("a", Some(Outcome::Passed))];
        let xml = shardgate_common::junit::to_junit(&report);
        assert!(xml.contains(r#"tests="2" failures="0" errors="1""#), "{xml}");
        assert!(xml.contains(r#"<testcase name="shardgate run""#), "{xml}");
        // An errored discovery lists no tests at all.
        report.status = RunStatus::Errored;
        report.tests.clear();
        let xml = shardgate_common::junit::to_junit(&report);
        assert!(xml.contains(r#"tests="1" failures="0" errors="1""#), "{xml}");
    }

    #[test]
    fn a_nextest_timeout_is_timed_out_and_a_bare_failure_says_its_type() {
        let xml = r#"<testsuites><testsuite name="nx">
<testcase name="tests::hangs" classname="nx" time="2.002"><failure type="test timeout"/><system-out>running 1 test</system-out></testcase>
<testcase name="tests::bad" classname="nx" time="0.1"><failure type="test failure"/></testcase>
</testsuite></testsuites>"#;
        let cases = parse(xml).unwrap();
        assert_eq!(
            (cases[0].outcome, cases[0].message.as_str()),
            (Outcome::TimedOut, "test timeout")
        );
        assert_eq!(
            (cases[1].outcome, cases[1].message.as_str()),
            (Outcome::Failed, "test failure")
        );
    }

    #[test]
    fn nextest_go_junit_report_and_jest() {
        let nextest = r#"<?xml version="1.0" encoding="UTF-8"?>
<testsuites name="nextest-run" tests="2" failures="1" errors="0" uuid="x" timestamp="2026-11-26T05:00:00Z" time="0.1">
  <testsuite name="mycrate::integration" tests="2" disabled="0" errors="0" failures="1">
    <testcase name="parse::rejects_bad_input" classname="mycrate::integration" timestamp="2026-11-26T05:00:00Z" time="0.010"/>
    <testcase name="parse::accepts_good_input" classname="mycrate::integration" timestamp="2026-11-26T05:00:00Z" time="0.020">
      <failure type="test failure">thread 'parse::accepts_good_input' panicked</failure>
      <system-out>running 1 test</system-out><system-err>panicked at src/lib.rs:3</system-err>
    </testcase>
  </testsuite>
</testsuites>"#;
        assert_eq!(
            outcomes(nextest),
            vec![
                (
                    "mycrate::integration|parse::rejects_bad_input".into(),
                    Outcome::Passed
                ),
                (
                    "mycrate::integration|parse::accepts_good_input".into(),
                    Outcome::Failed
                ),
            ]
        );
        let go = r#"<?xml version="1.0" encoding="UTF-8"?>
<testsuites tests="2" failures="1">
	<testsuite name="example.com/pkg" tests="2" failures="1" errors="0" id="0" hostname="h" time="0.003" timestamp="2026-11-26T05:00:00Z">
		<properties><property name="go.version" value="go1.23"></property></properties>
		<testcase name="TestOK" classname="example.com/pkg" time="0.000"></testcase>
		<testcase name="TestBad/sub_case" classname="example.com/pkg" time="0.001"><failure message="Failed" type="">bad_test.go:12: want 1, got 2</failure></testcase>
	</testsuite>
</testsuites>"#;
        assert_eq!(
            outcomes(go),
            vec![
                ("example.com/pkg|TestOK".into(), Outcome::Passed),
                ("example.com/pkg|TestBad/sub_case".into(), Outcome::Failed),
            ]
        );
        let jest = r#"<?xml version="1.0" encoding="UTF-8"?>
<testsuites name="jest tests" tests="2" failures="0" errors="0" time="1.1">
  <testsuite name="cart" errors="0" failures="0" skipped="1" timestamp="2026-11-26T05:00:00" time="0.9" tests="2">
    <testcase classname="cart adds an item" name="cart adds an item" time="0.004" file="src/cart.test.js"></testcase>
    <testcase classname="cart later" name="cart later" time="0"><skipped/></testcase>
  </testsuite>
</testsuites>"#;
        let cases = parse(jest).unwrap();
        assert_eq!(cases[0].file, "src/cart.test.js");
        assert_eq!(cases[1].outcome, Outcome::Skipped);
    }

    #[test]
    fn malformed_documents_are_errors_that_say_where() {
        let e = parse("<testsuite><testcase name='a'></testsuite>").unwrap_err();
        assert!(matches!(e, JunitError::Xml { .. }), "{e}");
        assert!(e.to_string().starts_with("malformed JUnit XML at byte"), "{e}");
        assert_eq!(
            parse("<testsuite><testcase name='a'>").unwrap_err(),
            JunitError::Truncated
        );
        assert!(parse("").unwrap().is_empty());
        assert!(parse("not xml at all").unwrap().is_empty());
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_input_never_panics(s in ".{0,400}") {
            let _ = parse(&s);
        }

        #[test]
        fn arbitrary_junit_like_input_never_panics(parts in proptest::collection::vec(
            proptest::sample::select(vec![
                "<testsuites>", "</testsuites>", "<testsuite name='s'>", "</testsuite>",
                "<testcase name='a' classname='c' time='x'>", "<testcase name='b'/>", "</testcase>",
                "<failure message='m'>", "</failure>", "<skipped/>", "<system-out>", "</system-out>",
                "<![CDATA[x]]>", "&amp;", "&#x41;", "&bogus;", "text", "<flakyFailure/>", "<error/>",
            ]), 0..40)) {
            let _ = parse(&parts.concat());
        }
    }
}
