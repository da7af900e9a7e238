//! What the client shows a person: live progress on stderr (a bar on a terminal, plain lines
//! otherwise) and the final summary on stdout. `--json` replaces the summary with a document.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use shardgate_common::report::{Counts, RunReport};
use shardgate_common::{Outcome, RunStatus, pb};

/// Lines of a failed test's output shown in the text summary.
const OUTPUT_LINES: usize = 20;

pub struct Progress {
    bar: Option<ProgressBar>,
    last_line: Option<Instant>,
    /// The coordinator's last estimate of the time left, and when it came.
    eta: Option<(Duration, Instant)>,
    /// The bar shows counts once the run has tests (a discovery may come first).
    sized: bool,
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}

impl Progress {
    pub fn new() -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            // A spinner until the run has tests: an empty bar is not a full one.
            let bar = ProgressBar::new_spinner();
            bar.set_style(
                ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}").expect("static template"),
            );
            bar.set_message("waiting for the run's tests");
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Self {
            bar,
            last_line: None,
            eta: None,
            sized: false,
        }
    }

    /// The time left as the coordinator last estimated it, counted down since.
    fn eta_text(&self) -> String {
        match self.eta {
            Some((left, at)) if !left.is_zero() => {
                let left = left.saturating_sub(at.elapsed());
                format!(
                    ", ETA ~{}",
                    humantime::format_duration(Duration::from_secs(left.as_secs().max(1)))
                )
            }
            _ => String::new(),
        }
    }

    /// A line for the person watching, above the bar or on its own.
    pub fn note(&self, msg: &str) {
        match &self.bar {
            Some(bar) => bar.println(msg),
            None => eprintln!("{msg}"),
        }
    }

    pub fn event(&mut self, ev: &pb::RunEvent) {
        use pb::run_event::Event;
        match &ev.event {
            Some(Event::Snapshot(s)) | Some(Event::Progress(s)) | Some(Event::Finished(s)) => {
                self.eta = Some((Duration::from_millis(s.eta_ms), Instant::now()));
                self.counts(&s.run_id, s.counts.as_ref(), RunStatus::from_wire(s.status));
            }
            Some(Event::TestFinished(t)) => {
                if let Some(r) = &t.result {
                    let outcome = Outcome::from_wire(r.outcome);
                    if outcome.is_some_and(|o| !o.is_green()) {
                        let o = outcome.map(Outcome::as_str).unwrap_or("?");
                        self.note(&format!(
                            "{:<11} {} ({}, worker {})",
                            o.to_uppercase(),
                            r.test_id,
                            r.detail,
                            r.worker
                        ));
                    }
                }
                self.eta = Some((Duration::from_millis(t.eta_ms), Instant::now()));
                self.counts(&t.run_id, t.counts.as_ref(), None);
            }
            None => {}
        }
    }

    fn counts(&mut self, run_id: &str, c: Option<&pb::RunCounts>, status: Option<RunStatus>) {
        let Some(c) = c else { return };
        let c = Counts::from(c);
        let done = c.total.saturating_sub(c.queued + c.running + c.assigned);
        let ended = status.is_some_and(RunStatus::is_terminal);
        let msg = format!(
            "{}{}",
            short_counts(&c),
            if ended { String::new() } else { self.eta_text() }
        );
        if c.total == 0 && !ended {
            // Nothing to count yet (the tests are being discovered): no "0/0".
            return;
        }
        match &self.bar {
            Some(bar) => {
                if !self.sized {
                    self.sized = true;
                    bar.set_style(
                        ProgressStyle::with_template(
                            "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}",
                        )
                        .expect("static template")
                        .progress_chars("=> "),
                    );
                }
                bar.set_length(c.total as u64);
                bar.set_position(done as u64);
                bar.set_message(msg);
            }
            None => {
                let due = self
                    .last_line
                    .is_none_or(|t| t.elapsed() >= Duration::from_secs(2));
                if due || ended {
                    self.last_line = Some(Instant::now());
                    eprintln!(
                        "run {run_id}: {done}/{} done, {} running ({msg})",
                        c.total, c.running
                    );
                }
            }
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

fn short_counts(c: &Counts) -> String {
    let mut parts = vec![format!("{} passed", c.passed)];
    for (n, what) in [
        (c.failed, "failed"),
        (c.flaky, "flaky"),
        (c.timed_out, "timed out"),
        (c.infra_error, "infra error"),
        (c.skipped, "skipped"),
    ] {
        if n > 0 {
            parts.push(format!("{n} {what}"));
        }
    }
    parts.join(", ")
}

/// Prints the report: JSON, or a text summary with the failed tests and their output.
pub fn print_report(report: &RunReport, json: bool) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, report)?;
        writeln!(out)?;
        return out.flush();
    }
    let verdict = report
        .verdict
        .map(|v| v.as_str().to_uppercase())
        .unwrap_or_else(|| report.status.as_str().to_uppercase());
    writeln!(
        out,
        "run {}: {verdict}: {} tests in {:.1}s ({}) [suite {}, revision {}, runner {}]",
        report.run_id,
        report.counts.total,
        report.makespan_ms as f64 / 1000.0,
        short_counts(&report.counts),
        report.suite,
        report.revision,
        report.runner,
    )?;
    if !report.message.is_empty() {
        writeln!(out, "  {}", report.message)?;
    }
    if let Some(d) = &report.deploy {
        let took = d.finished_at_ms.saturating_sub(d.started_at_ms) as f64 / 1000.0;
        writeln!(
            out,
            "deploy {}: {} ({took:.1} s)",
            d.deploy_id,
            d.state.to_uppercase()
        )?;
        if d.state != "succeeded" && !d.detail.is_empty() {
            for line in d.detail.lines() {
                writeln!(out, "  {line}")?;
            }
        }
    }
    let flaky: Vec<_> = report
        .tests
        .iter()
        .filter(|t| t.outcome == Some(Outcome::Flaky))
        .collect();
    if !flaky.is_empty() {
        writeln!(out, "\nflaky (failed, then passed on a retry):")?;
        for t in flaky {
            writeln!(
                out,
                "  FLAKY       {}  ({}; {} attempts)",
                t.id, t.detail, t.attempts
            )?;
        }
    }
    let bad: Vec<_> = report
        .tests
        .iter()
        .filter(|t| t.outcome.is_some_and(|o| !o.is_green()))
        .collect();
    if !bad.is_empty() {
        writeln!(out, "\nnot passed:")?;
    }
    for t in bad {
        let o = t.outcome.map(Outcome::as_str).unwrap_or("?");
        writeln!(
            out,
            "  {:<11} {}  ({}; worker {}; {} ms; attempt {})",
            o.to_uppercase(),
            t.id,
            t.detail,
            t.worker,
            t.duration_ms,
            t.attempts
        )?;
        let lines: Vec<&str> = t.output.lines().collect();
        let skip = lines.len().saturating_sub(OUTPUT_LINES);
        if skip > 0 {
            writeln!(out, "      | … {skip} earlier lines")?;
        }
        for l in &lines[skip..] {
            writeln!(out, "      | {l}")?;
        }
    }
    out.flush()
}
