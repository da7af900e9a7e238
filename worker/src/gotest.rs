//! `go test`: listing with `go test -list`, running with `go test -json -run '^(A|B)$'` per
//! package, and reading test2json events. A test id is `<package import path> <TestName>`;
//! subtests count toward their top-level test.

use std::collections::HashMap;
use std::time::Duration;

use serde::Deserialize;
use shardgate_common::Outcome;

/// `go test -list . ./...` output: test names, each package closed by an `ok  <pkg>` line.
pub fn list(text: &str) -> Vec<String> {
    let mut pending: Vec<&str> = Vec::new();
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim_end();
        let is_name = ["Test", "Example", "Fuzz"].iter().any(|p| line.starts_with(p)) && is_ident(line);
        if is_name {
            pending.push(line);
            continue;
        }
        let mut fields = line.split_whitespace();
        if let (Some("ok"), Some(pkg)) = (fields.next(), fields.next()) {
            out.extend(pending.drain(..).map(|t| format!("{pkg} {t}")));
        }
    }
    out
}

/// A Go identifier: Unicode letters, digits and underscores (`TestÄpfel` is a test).
fn is_ident(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_alphanumeric() || c == '_')
}

/// Splits an id into package and test name.
pub fn split(id: &str) -> Option<(&str, &str)> {
    let (pkg, name) = id.rsplit_once(' ')?;
    (!pkg.is_empty() && is_ident(name)).then_some((pkg, name))
}

/// The `-run` pattern that selects exactly these top-level tests.
pub fn run_pattern(names: &[&str]) -> String {
    format!("^({})$", names.join("|"))
}

#[derive(Deserialize)]
struct Event {
    #[serde(rename = "Action")]
    action: String,
    #[serde(rename = "Test", default)]
    test: Option<String>,
    #[serde(rename = "Elapsed", default)]
    elapsed: Option<f64>,
    #[serde(rename = "Output", default)]
    output: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoResult {
    pub outcome: Outcome,
    pub duration: Duration,
    pub output: String,
}

/// Reads test2json events (one JSON object per line; other lines ignored) into results of
/// top-level tests.
pub fn parse(text: &str) -> HashMap<String, GoResult> {
    let mut out: HashMap<String, GoResult> = HashMap::new();
    for line in text.lines() {
        let Ok(ev) = serde_json::from_str::<Event>(line) else {
            continue;
        };
        let Some(test) = ev.test else { continue };
        let top = test.split('/').next().unwrap_or(&test).to_owned();
        let entry = out.entry(top.clone()).or_insert(GoResult {
            outcome: Outcome::InfraError,
            duration: Duration::ZERO,
            output: String::new(),
        });
        if let Some(o) = ev.output
            && entry.output.len() < 64 * 1024
        {
            entry.output.push_str(&o);
        }
        if test != top {
            continue;
        }
        let outcome = match ev.action.as_str() {
            "pass" => Outcome::Passed,
            "fail" => Outcome::Failed,
            "skip" => Outcome::Skipped,
            _ => continue,
        };
        entry.outcome = outcome;
        entry.duration = Duration::from_secs_f64(ev.elapsed.unwrap_or(0.0).clamp(0.0, 1e7));
    }
    // A test that started but never ended (the binary crashed) has no verdict of its own.
    out.retain(|_, r| r.outcome != Outcome::InfraError || !r.output.is_empty());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_tests_per_package() {
        let text = "TestA\nTestB\nExampleHello\nok  \texample.com/m/a\t0.002s\n?   \texample.com/m/cmd\t[no test files]\nTestC\nok  \texample.com/m/b\t0.001s\n";
        assert_eq!(
            list(text),
            vec![
                "example.com/m/a TestA",
                "example.com/m/a TestB",
                "example.com/m/a ExampleHello",
                "example.com/m/b TestC"
            ]
        );
        assert_eq!(split("example.com/m/a TestA"), Some(("example.com/m/a", "TestA")));
        assert_eq!(split("pkg Test(x)"), None);
        // Fuzz targets run their seed corpus under -run; Go names may be any Unicode letters.
        assert_eq!(
            list("FuzzParse\nTestÄpfel\nBenchmarkX\nok  \texample.com/m/f\t0.001s\n"),
            vec!["example.com/m/f FuzzParse", "example.com/m/f TestÄpfel"]
        );
        assert_eq!(split("p TestÄpfel"), Some(("p", "TestÄpfel")));
        assert_eq!(run_pattern(&["TestA", "TestB"]), "^(TestA|TestB)$");
    }

    #[test]
    fn reads_test2json() {
        let text = r#"{"Action":"start","Package":"p"}
{"Action":"run","Package":"p","Test":"TestA"}
{"Action":"output","Package":"p","Test":"TestA","Output":"=== RUN   TestA\n"}
{"Action":"pass","Package":"p","Test":"TestA","Elapsed":0.25}
{"Action":"run","Package":"p","Test":"TestB"}
{"Action":"run","Package":"p","Test":"TestB/sub"}
{"Action":"output","Package":"p","Test":"TestB/sub","Output":"    b_test.go:9: want 1, got 2\n"}
{"Action":"fail","Package":"p","Test":"TestB/sub","Elapsed":0}
{"Action":"fail","Package":"p","Test":"TestB","Elapsed":0.01}
{"Action":"skip","Package":"p","Test":"TestC","Elapsed":0}
not json
{"Action":"fail","Package":"p","Elapsed":0.3}"#;
        let r = parse(text);
        assert_eq!(r["TestA"].outcome, Outcome::Passed);
        assert_eq!(r["TestA"].duration, Duration::from_millis(250));
        assert_eq!(r["TestB"].outcome, Outcome::Failed);
        assert!(r["TestB"].output.contains("want 1, got 2"));
        assert_eq!(r["TestC"].outcome, Outcome::Skipped);
        assert!(!r.contains_key("TestB/sub"));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_output_never_panics(s in ".{0,300}") {
            let _ = parse(&s);
            let _ = list(&s);
        }
    }
}
