//! The one-line summary on stdout, the optional JSON report, and the shared pieces of both.

use std::path::Path;

use hdrhistogram::Histogram;
use serde_json::{json, Map, Value};

use crate::client::{new_hist, Stats};
use crate::coord::{secs_between, snap, Snap};
use crate::verify::LedgerCheck;

pub struct Report {
    label: String,
    fields: Vec<(String, Value)>,
    extra: Map<String, Value>,
    /// Why the run failed, if it did (exit status 1).
    pub failures: Vec<String>,
}

impl Report {
    pub fn new(label: &str) -> Report {
        Report {
            label: label.to_owned(),
            fields: Vec::new(),
            extra: Map::new(),
            failures: Vec::new(),
        }
    }

    /// A field of the summary line (and of the JSON report).
    pub fn add(&mut self, key: &str, v: impl Into<Value>) -> &mut Self {
        self.fields.push((key.to_owned(), v.into()));
        self
    }

    /// A float with `digits` decimals.
    pub fn addf(&mut self, key: &str, v: f64, digits: usize) -> &mut Self {
        if digits == 0 || (v.fract() == 0.0 && v.abs() < 1e15) {
            let n = v.round();
            if n.is_finite() && n.abs() < 9e15 {
                self.fields.push((key.to_owned(), Value::from(n as i64)));
                return self;
            }
        }
        let s = format!("{v:.digits$}");
        let v: Value = s
            .parse::<f64>()
            .ok()
            .and_then(|f| serde_json::Number::from_f64(f).map(Value::Number))
            .unwrap_or(Value::Null);
        self.fields.push((key.to_owned(), v));
        self
    }

    /// Only in the JSON report.
    pub fn extra(&mut self, key: &str, v: impl Into<Value>) -> &mut Self {
        self.extra.insert(key.to_owned(), v.into());
        self
    }

    pub fn fail(&mut self, why: impl Into<String>) {
        self.failures.push(why.into());
    }

    /// The per-delivery checks' counts, and the faults `--inject` played (when it did).
    pub fn add_checks(&mut self, st: &Stats) -> &mut Self {
        self.add("misrouted", st.misrouted)
            .add("wrong_fields", st.wrong_fields)
            .add("corrupt", st.corrupt)
            .add("changed", st.changed);
        if st.injected > 0 {
            self.add("injected", st.injected);
        }
        self
    }

    /// Fails the run for every delivery-guarantee violation the stats and the ledger found.
    pub fn fail_on_violations(&mut self, st: &Stats, check: &LedgerCheck) {
        for (what, n) in [
            ("gaps", st.gaps),
            ("duplicates", st.dups + check.extra),
            ("reorderings", st.reorders),
            ("missing deliveries", check.missing),
            (
                "senders with swapped or misplaced messages",
                check.mismatched,
            ),
            ("sends without SendOk", st.unconfirmed),
            ("messages in an inbox they were not sent to", st.misrouted),
            (
                "messages with another from_uid, from_device or client_msg_id than sent",
                st.wrong_fields,
            ),
            ("messages with corrupt content", st.corrupt),
            ("seqs that came again with another message", st.changed),
        ] {
            if n > 0 {
                self.fail(format!("{n} {what}"));
            }
        }
    }

    pub fn line(&self) -> String {
        let mut s = format!("imgate-bench {}", self.label);
        for (k, v) in &self.fields {
            let v = match v {
                Value::String(s) if s.is_empty() => "-".to_owned(),
                Value::String(s) => s.replace(' ', "_"),
                Value::Null => "-".to_owned(),
                other => other.to_string(),
            };
            s.push(' ');
            s.push_str(k);
            s.push('=');
            s.push_str(&v);
        }
        s
    }

    pub fn json(&self) -> Value {
        let mut m = Map::new();
        m.insert("scenario".into(), self.label.clone().into());
        for (k, v) in &self.fields {
            m.insert(k.clone(), v.clone());
        }
        for (k, v) in &self.extra {
            m.insert(k.clone(), v.clone());
        }
        m.insert("failures".into(), json!(self.failures));
        m.insert("ok".into(), self.failures.is_empty().into());
        Value::Object(m)
    }

    /// Prints the summary (stdout), the failures (stderr), writes the JSON file; returns the
    /// exit status.
    pub fn finish(&self, json_file: Option<&Path>) -> std::process::ExitCode {
        println!("{}", self.line());
        for f in &self.failures {
            eprintln!("imgate-bench {}: FAIL: {f}", self.label);
        }
        if let Some(path) = json_file {
            let text = serde_json::to_string_pretty(&self.json()).unwrap_or_default();
            if let Err(e) = std::fs::write(path, text + "\n") {
                eprintln!("imgate-bench: cannot write {}: {e}", path.display());
                return std::process::ExitCode::from(2);
            }
        }
        if self.failures.is_empty() {
            std::process::ExitCode::SUCCESS
        } else {
            std::process::ExitCode::FAILURE
        }
    }
}

/// Merges (value, count) pairs into one histogram.
pub fn merge_hist<'a>(parts: impl IntoIterator<Item = &'a [(u64, u64)]>) -> Histogram<u64> {
    let mut h = new_hist();
    for p in parts {
        for &(v, c) in p {
            let _ = h.record_n(v, c);
        }
    }
    h
}

/// Adds p50/p99/p999/max (µs) of a histogram in ns.
pub fn add_latency(r: &mut Report, h: &Histogram<u64>) {
    let us = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    if h.is_empty() {
        r.add("p50_us", Value::Null)
            .add("p99_us", Value::Null)
            .add("p999_us", Value::Null)
            .add("max_us", Value::Null);
        return;
    }
    r.addf("p50_us", us(0.5), 1)
        .addf("p99_us", us(0.99), 1)
        .addf("p999_us", us(0.999), 1)
        .addf("max_us", h.max() as f64 / 1000.0, 1);
}

/// Server and bench CPU between two barriers: srv_cpu (%, 100 = one core) and cli_cpu.
pub fn add_cpu(r: &mut Report, snaps: &[Snap], from: &str, to: &str) -> Option<f64> {
    let secs = secs_between(snaps, from, to);
    let (Some(a), Some(b)) = (snap(snaps, from), snap(snaps, to)) else {
        return None;
    };
    if secs <= 0.0 {
        return None;
    }
    r.add(
        "cli_cpu",
        format!("{:.0}%", (b.cli_cpu_s - a.cli_cpu_s) / secs * 100.0),
    );
    match (a.srv, b.srv) {
        (Some(x), Some(y)) => {
            let pct = (y.cpu_s - x.cpu_s) / secs * 100.0;
            r.add("srv_cpu", format!("{pct:.0}%"));
            Some(y.cpu_s - x.cpu_s)
        }
        _ => None,
    }
}

/// Error tallies and violation notes go to stderr and into the JSON report.
pub fn add_errors(r: &mut Report, stats: &Stats) {
    r.extra("errors_by_kind", json!(stats.errors));
    if !stats.notes.is_empty() {
        r.extra("notes", json!(stats.notes));
    }
    for (k, v) in &stats.errors {
        eprintln!("  error {k}: {v}");
    }
    for n in &stats.notes {
        eprintln!("  {n}");
    }
}

/// The most frequent error kind, as the limit that stopped the setup.
pub fn dominant_error(stats: &Stats) -> Option<String> {
    stats
        .errors
        .iter()
        .max_by_key(|(_, v)| **v)
        .map(|(k, _)| k.clone())
}
