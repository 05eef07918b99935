//! The results: rows and notes as the run makes them, the table, and `bench/results.md` with
//! the rows of scenarios that did not run carried over from the file's earlier contents.

use crate::{Args, Bench, load::Load};
use anyhow::{Result, bail};
use chrono::Utc;
use std::{
    fmt::Write as _,
    process::{Command, Stdio},
};

pub(crate) struct Row {
    pub(crate) scenario: String,
    pub(crate) figure: String,
    pub(crate) value: String,
    pub(crate) reference: String,
    pub(crate) ratio: String,
    pub(crate) target: String,
    pub(crate) verdict: String,
}

pub(crate) const TABLE_HEAD: &str =
    "| # | figure | OATS | reference | ratio | target | result |\n|---|---|---|---|---|---|---|";
/// Every scenario, as the first column of the table names it.
pub(crate) const SCENARIOS: [&str; 9] = ["1", "2", "3", "4", "5", "6", "6k", "7", "8"];

/// A results file with the scenarios of this run replaced.
pub(crate) struct Merged {
    pub(crate) rows: Vec<String>,
    pub(crate) notes: Vec<String>,
    /// Which rows come from earlier runs, and from which: a sentence for the header.
    pub(crate) carried: Option<String>,
}

/// Merge this run's rows and notes (of the scenarios in `ran`) into an earlier results file:
/// the earlier rows and details of the scenarios that did not run stay where they were, those
/// of the scenarios that ran are replaced in place, and new scenarios go last.
pub(crate) fn merge_results(earlier: &str, ran: &[&str], rows: Vec<String>, notes: Vec<String>) -> Merged {
    let row_id = |line: &str| line.trim_start_matches('|').split('|').next().unwrap_or("").trim().to_owned();
    let note_id = |note: &str| note.split([' ', ':']).next().unwrap_or("").to_owned();
    let lines: Vec<&str> = earlier.lines().collect();
    let old_rows: Vec<(String, String)> = lines
        .iter()
        .skip_while(|l| !l.starts_with("|---"))
        .skip(1)
        .take_while(|l| l.starts_with('|'))
        .map(|l| (row_id(l), (*l).to_owned()))
        .collect();
    let old_notes: Vec<(String, String)> = lines
        .iter()
        .skip_while(|l| !l.starts_with("## Details"))
        .skip(1)
        .filter_map(|l| l.strip_prefix("- "))
        .map(|n| (note_id(n), n.to_owned()))
        .filter(|(id, _)| SCENARIOS.contains(&id.as_str()))
        .collect();
    let merge = |old: &[(String, String)], new: Vec<(String, String)>| {
        let mut out = Vec::new();
        let mut placed = Vec::<String>::new();
        for (id, line) in old {
            if !ran.contains(&id.as_str()) {
                out.push(line.clone());
            } else if !placed.contains(id) {
                placed.push(id.clone());
                out.extend(new.iter().filter(|(i, _)| i == id).map(|(_, l)| l.clone()));
            }
        }
        out.extend(new.iter().filter(|(i, _)| !placed.contains(i)).map(|(_, l)| l.clone()));
        out
    };
    let new_rows: Vec<(String, String)> = rows.into_iter().map(|r| (row_id(&r), r)).collect();
    let new_notes: Vec<(String, String)> = notes.into_iter().map(|n| (note_id(&n), n)).collect();

    // Where each carried scenario's rows come from: the earlier file's own run, or the run its
    // "carried over" line names.
    let earlier_run = lines.iter().find_map(|l| l.strip_prefix("- Date: ")).unwrap_or("an unknown date").to_owned();
    let mut sources: Vec<(String, String)> = Vec::new();
    if let Some(line) = lines.iter().find_map(|l| l.split_once("Rows carried over from earlier runs: ").map(|(_, r)| r))
    {
        for part in line.trim_end_matches('.').split("; ") {
            if let Some((ids, from)) = part.strip_prefix("scenarios ").and_then(|p| p.split_once(" from ")) {
                sources.extend(ids.split(", ").map(|id| (id.to_owned(), from.to_owned())));
            }
        }
    }
    let mut carried: Vec<(String, Vec<String>)> = Vec::new();
    let mut seen = Vec::new();
    for (id, _) in old_rows.iter().filter(|(id, _)| !ran.contains(&id.as_str())) {
        if seen.contains(id) {
            continue;
        }
        seen.push(id.clone());
        let from = sources.iter().find(|(s, _)| s == id).map_or(earlier_run.clone(), |(_, f)| f.clone());
        match carried.iter_mut().find(|(f, _)| *f == from) {
            Some((_, ids)) => ids.push(id.clone()),
            None => carried.push((from, vec![id.clone()])),
        }
    }
    let carried = (!carried.is_empty()).then(|| {
        let parts: Vec<String> =
            carried.iter().map(|(from, ids)| format!("scenarios {} from {from}", ids.join(", "))).collect();
        format!("Rows carried over from earlier runs: {}.", parts.join("; "))
    });
    Merged { rows: merge(&old_rows, new_rows), notes: merge(&old_notes, new_notes), carried }
}

pub(crate) fn machine_header(cores: usize, pin: bool, args: &Args) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    let revision =
        command_output("git", &["rev-parse", "--short", "HEAD"]).map(|s| s.trim().to_owned()).unwrap_or_default();
    let dirty =
        command_output("git", &["status", "--porcelain", "--untracked-files=no"]).is_ok_and(|s| !s.trim().is_empty());
    let pinning = if pin {
        "server under test pinned to CPU 1, load generator to CPU 0 (taskset) in scenarios 1, 2, 5 and 7 (in 7 the fake upstream of the gateway runs on CPU 0 too)"
    } else {
        "no CPU pinning"
    };
    format!(
        "- Machine: **{cores} cores** ({cpu}), load average at start {}\n- Date: {}, revision `{revision}`{}\n- Load: {} s measured per window after 1 s warm-up ({} s in the paired rounds of scenarios 1 and 5: {} rounds, judged by the median of the rounds' ratios), {} connections when saturating; {pinning}",
        load.join(" "),
        Utc::now().format("%Y-%m-%d %H:%M UTC"),
        if dirty { " (with uncommitted changes)" } else { "" },
        args.duration,
        crate::rounds::PAIRED_WINDOW.as_secs(),
        crate::rounds::PAIRED_ROUNDS,
        args.concurrency,
    )
}

pub(crate) fn command_output(program: &str, args: &[&str]) -> Result<String> {
    let output = Command::new(program).args(args).stderr(Stdio::null()).output()?;
    if !output.status.success() {
        bail!("{program} failed");
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

impl Bench {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn row(
        &mut self,
        scenario: &str,
        figure: &str,
        value: String,
        reference: String,
        ratio: Option<f64>,
        target: &str,
        pass: Option<bool>,
    ) {
        let row = Row {
            scenario: scenario.into(),
            figure: figure.into(),
            value,
            reference,
            ratio: ratio.map_or("".into(), |r| format!("{r:.2}")),
            target: target.into(),
            verdict: match pass {
                Some(true) => "pass".into(),
                Some(false) => "**miss**".into(),
                None => "".into(),
            },
        };
        println!(
            "  [{}] {}: {} | ref {} | ratio {} | target {} {}",
            row.scenario, row.figure, row.value, row.reference, row.ratio, row.target, row.verdict
        );
        self.rows.push(row);
    }

    pub(crate) fn note(&mut self, text: String) {
        println!("  note: {text}");
        self.notes.push(text);
    }

    pub(crate) fn table(&self) -> String {
        let mut out = format!("{TABLE_HEAD}\n");
        for row in self.table_rows() {
            let _ = writeln!(out, "{row}");
        }
        out
    }

    pub(crate) fn table_rows(&self) -> Vec<String> {
        self.rows
            .iter()
            .map(|r| {
                format!(
                    "| {} | {} | {} | {} | {} | {} | {} |",
                    r.scenario, r.figure, r.value, r.reference, r.ratio, r.target, r.verdict
                )
            })
            .collect()
    }

    pub(crate) fn load_note(&mut self, name: &str, load: &Load) {
        let text = format!(
            "{name}: {:.0} req/s, p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms, {} errors; server {:.2} CPU s ({:.0} µs CPU/request, {:.0}% of one core), peak RSS {:.1} MiB; load generator {:.0}% of its core",
            load.rps(),
            load.pct(0.50),
            load.pct(0.99),
            load.pct(0.999),
            load.errors,
            load.server_cpu,
            load.server_cpu / load.requests.max(1) as f64 * 1e6,
            load.server_cpu / load.secs * 100.0,
            load.server_hwm_kib as f64 / 1024.0,
            load.client_cpu / load.secs * 100.0,
        );
        self.note(text);
    }
}
