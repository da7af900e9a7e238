//! Memory and CPU readings of this process, from `/proc/self`.

fn status_kb(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Resident memory now, in bytes.
pub fn rss_bytes() -> u64 {
    status_kb("VmRSS:") * 1024
}

/// Peak resident memory so far, in bytes.
pub fn peak_rss_bytes() -> u64 {
    status_kb("VmHWM:") * 1024
}

/// CPU time (user and system, in seconds) from a `stat` line: fields 14 and 15, counted
/// after the command name, which is in parentheses and may hold spaces.
fn stat_cpu_s(stat: &str) -> f64 {
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // `rest` starts at field 3 (state); utime is field 14, stime 15; 100 ticks a second.
    (ticks(11) + ticks(12)) as f64 / 100.0
}

/// CPU time this process has used, in seconds, less that of its live threads named `except`
/// (threads that ended still count).
pub fn cpu_s_except(except: &str) -> f64 {
    let all = std::fs::read_to_string("/proc/self/stat").map_or(0.0, |s| stat_cpu_s(&s));
    all - cpu_s_of(&[except])
}

/// CPU time, in seconds, of this process's live threads whose names begin with one of
/// `prefixes`.
pub fn cpu_s_of(prefixes: &[&str]) -> f64 {
    let mut theirs = 0.0;
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for t in tasks.flatten() {
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            if prefixes.iter().any(|p| comm.trim_end().starts_with(p)) {
                theirs += std::fs::read_to_string(t.path().join("stat")).map_or(0.0, |s| stat_cpu_s(&s));
            }
        }
    }
    theirs
}

/// The `p`-quantile (0..=1) of `values`, which it sorts.
/// The median of `values` (the mean of the middle two for an even count); NaN for none.
pub fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    (values[(n - 1) / 2] + values[n / 2]) / 2.0
}

pub fn quantile(values: &mut [u64], p: f64) -> u64 {
    if values.is_empty() {
        return 0;
    }
    values.sort_unstable();
    values[((values.len() - 1) as f64 * p).round() as usize]
}
