//! How the CLI prints: aligned tables with relative times for people (coloured on a terminal
//! unless NO_COLOR is set), or the API objects exactly as JSON or YAML.

use super::Format;
use chrono::{DateTime, Utc};
use serde_json::Value;
use std::io::{IsTerminal, Write};

/// Whether a character may reach the terminal: not a C0 control other than newline and tab (ESC
/// starts escape sequences that clear the screen, move the cursor or set the title), not DEL, not
/// a C1 control (U+0080 to U+009F; U+009B is a one-character CSI).
fn printable(c: char) -> bool {
    !(c.is_control() && c != '\n' && c != '\t')
}

/// `text` without terminal control characters: everything the server sends (goals, results,
/// messages, logs, problem details) goes through this before it is printed.
pub fn clean(text: &str) -> String {
    if text.chars().all(printable) { text.to_owned() } else { text.chars().filter(|c| printable(*c)).collect() }
}

/// [`clean`] for a byte stream (logs): bytes in, text out, UTF-8 sequences split across chunks
/// kept whole, invalid UTF-8 shown as U+FFFD.
#[derive(Default)]
pub struct CleanStream {
    pending: Vec<u8>,
}

impl CleanStream {
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut text = String::new();
        let mut rest: &[u8] = &self.pending;
        loop {
            match std::str::from_utf8(rest) {
                Ok(valid) => {
                    text.push_str(valid);
                    rest = &[];
                    break;
                }
                Err(error) => {
                    let (valid, after) = rest.split_at(error.valid_up_to());
                    text.push_str(std::str::from_utf8(valid).expect("checked"));
                    match error.error_len() {
                        Some(bad) => {
                            text.push(char::REPLACEMENT_CHARACTER);
                            rest = &after[bad..];
                        }
                        None => {
                            rest = after; // an incomplete character: wait for the rest
                            break;
                        }
                    }
                }
            }
        }
        self.pending = rest.to_vec();
        clean(&text)
    }

    /// What is left at the end of the stream.
    pub fn finish(&mut self) -> String {
        let rest = String::from_utf8_lossy(&std::mem::take(&mut self.pending)).into_owned();
        clean(&rest)
    }
}

fn colour_enabled() -> bool {
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// A status word, coloured when the terminal allows.
pub fn paint_status(status: &str) -> String {
    let code = match status {
        "succeeded" => "32",
        "failed" => "31",
        "cancelled" => "33",
        "running" => "36",
        _ => "2",
    };
    if colour_enabled() { format!("\x1b[{code}m{status}\x1b[0m") } else { status.to_owned() }
}

/// "12s ago", "5m ago", "3h ago", "2d ago".
pub fn relative(time: &str, now: DateTime<Utc>) -> String {
    let Ok(time) = DateTime::parse_from_rfc3339(time) else { return "-".into() };
    let seconds = (now - time.with_timezone(&Utc)).num_seconds().max(0);
    match seconds {
        0..60 => format!("{seconds}s ago"),
        60..3600 => format!("{}m ago", seconds / 60),
        3600..86_400 => format!("{}h ago", seconds / 3600),
        _ => format!("{}d ago", seconds / 86_400),
    }
}

fn duration(job: &Value) -> String {
    let parse = |key: &str| job[key].as_str().and_then(|t| DateTime::parse_from_rfc3339(t).ok());
    match (parse("started_at"), parse("finished_at")) {
        (Some(start), Some(end)) => format!("{:.1}s", (end - start).as_seconds_f64()),
        (Some(start), None) => format!("{:.0}s", (Utc::now() - start.with_timezone(&Utc)).as_seconds_f64()),
        _ => "-".into(),
    }
}

fn print_structured(out: &mut impl Write, value: &Value, format: Format) {
    let text = match format {
        Format::Yaml => clean(&serde_saphyr::to_string(value).unwrap_or_default()),
        // JSON escapes C0 controls itself; C1 controls can only sit inside strings, where an
        // escape keeps the value exact.
        _ => {
            let text = serde_json::to_string_pretty(value).unwrap_or_default() + "\n";
            text.chars().fold(String::with_capacity(text.len()), |mut out, c| {
                if printable(c) {
                    out.push(c);
                } else {
                    out.push_str(&format!("\\u{:04x}", u32::from(c)));
                }
                out
            })
        }
    };
    let _ = out.write_all(text.as_bytes());
}

/// `queue` or `queue, position 3`.
fn queue_place(queue: &str, position: &Value) -> String {
    match position.as_u64() {
        Some(position) => format!("{queue}, position {position}"),
        None => queue.to_owned(),
    }
}

/// One job: key/value lines, or the object.
pub fn print_job(out: &mut impl Write, job: &Value, format: Format) {
    if format != Format::Table {
        return print_structured(out, job, format);
    }
    let now = Utc::now();
    let mut rows = vec![
        ("id", job["id"].as_str().unwrap_or_default().to_owned()),
        ("status", paint_status(&clean(job["status"].as_str().unwrap_or("?")))),
    ];
    for key in ["reason", "message"] {
        if let Some(value) = job[key].as_str() {
            rows.push((key, value.to_owned()));
        }
    }
    if let Some(queue) = job["queue"]["name"].as_str() {
        rows.push(("queue", queue_place(queue, &job["queue"]["position"])));
    }
    rows.push(("created", relative(job["created_at"].as_str().unwrap_or_default(), now)));
    rows.push(("duration", duration(job)));
    rows.push(("attempts", job["attempts"].to_string()));
    rows.push(("max_turns", job["max_turns"].to_string()));
    if let Some(labels) = job["labels"].as_object().filter(|l| !l.is_empty()) {
        let text: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default())).collect();
        rows.push(("labels", text.join(",")));
    }
    if let Some(trace) = job["trace_id"].as_str() {
        rows.push(("trace_id", trace.to_owned()));
    }
    rows.push(("goal", job["goal"].as_str().unwrap_or_default().to_owned()));
    if job["usage"].is_object() {
        rows.push(("usage", usage_summary(job)));
    }
    if let Some(result) = job["result"].as_str() {
        rows.push(("result", result.to_owned()));
    }
    for (key, value) in rows {
        // The status is cleaned before it is painted.
        let value = if key == "status" { value } else { clean(&value) };
        let _ = writeln!(out, "{key:<10} {value}");
    }
}

/// A job's model usage in one line (`3 calls, 1,234 tokens in / 567 out, $0.0123`), or `-`.
pub fn usage_summary(job: &Value) -> String {
    let usage = &job["usage"];
    let Some(calls) = usage["model_calls"].as_u64() else { return "-".into() };
    let count = |key: &str| usage[key].as_u64().unwrap_or(0);
    let mut text = format!(
        "{calls} calls, {} tokens in / {} out, ${:.4}",
        count("input_tokens"),
        count("output_tokens"),
        usage["cost_usd"].as_f64().unwrap_or(0.0)
    );
    if let Some(refused) = usage["refused"].as_str() {
        text.push_str(&format!(", refused: {refused}"));
    }
    text
}

/// Jobs as an aligned table (or the page object).
pub fn print_list(out: &mut impl Write, items: &[Value], next_page_token: Option<&str>, format: Format) {
    if format != Format::Table {
        let mut page = serde_json::json!({"items": items});
        if let Some(token) = next_page_token {
            page["next_page_token"] = token.into();
        }
        return print_structured(out, &page, format);
    }
    let now = Utc::now();
    let rows: Vec<[String; 7]> = items
        .iter()
        .map(|job| {
            let goal: String = job["goal"].as_str().unwrap_or_default().chars().take(40).collect();
            [
                clean(job["id"].as_str().unwrap_or_default()),
                clean(job["status"].as_str().unwrap_or_default()),
                clean(job["reason"].as_str().unwrap_or("-")),
                relative(job["created_at"].as_str().unwrap_or_default(), now),
                duration(job),
                tokens_and_cost(job),
                clean(&goal.replace(['\n', '\r', '\t'], " ")),
            ]
        })
        .collect();
    let header = ["ID", "STATUS", "REASON", "CREATED", "DURATION", "TOKENS/COST", "GOAL"];
    let widths: Vec<usize> =
        (0..7).map(|i| rows.iter().map(|r| r[i].chars().count()).chain([header[i].len()]).max().unwrap_or(0)).collect();
    let line = |cells: [&str; 7], status_painted: Option<String>| {
        let mut text = String::new();
        for (i, cell) in cells.iter().enumerate() {
            let padding = " ".repeat(widths[i].saturating_sub(cell.chars().count()));
            let shown =
                if i == 1 { status_painted.clone().unwrap_or_else(|| cell.to_string()) } else { cell.to_string() };
            text.push_str(&shown);
            if i < 6 {
                text.push_str(&padding);
                text.push_str("  ");
            }
        }
        text
    };
    let _ = writeln!(out, "{}", line(header, None));
    for row in &rows {
        let cells = [&*row[0], &*row[1], &*row[2], &*row[3], &*row[4], &*row[5], &*row[6]];
        let _ = writeln!(out, "{}", line(cells, Some(paint_status(&row[1]))));
    }
    if let Some(token) = next_page_token {
        let _ = writeln!(out, "(more: --all, or the API's page_token {token})");
    }
}

/// Tokens and cost for the list's column: `6,051/$0.0188`, or `-` for a job without model calls.
fn tokens_and_cost(job: &Value) -> String {
    let usage = &job["usage"];
    match usage["model_calls"].as_u64() {
        Some(_) => {
            let tokens = usage["input_tokens"].as_u64().unwrap_or(0) + usage["output_tokens"].as_u64().unwrap_or(0);
            format!("{tokens}/${:.4}", usage["cost_usd"].as_f64().unwrap_or(0.0))
        }
        None => "-".into(),
    }
}

/// A one-line progress indicator on stderr, only on a terminal.
pub struct Spinner {
    enabled: bool,
    frame: usize,
    shown: bool,
}

impl Spinner {
    pub fn new(wanted: bool) -> Self {
        Self { enabled: wanted && std::io::stderr().is_terminal(), frame: 0, shown: false }
    }

    pub fn tick(&mut self, job: &Value) {
        if !self.enabled {
            return;
        }
        const FRAMES: [char; 10] = ['⠋', '⠙', '⠹', '⠸', '⠼', '⠴', '⠦', '⠧', '⠇', '⠏'];
        self.frame = (self.frame + 1) % FRAMES.len();
        let reason = job["reason"].as_str().map(|r| format!(" ({})", clean(r))).unwrap_or_default();
        let place = job["queue"]["name"]
            .as_str()
            .map(|queue| format!(" in {}", clean(&queue_place(queue, &job["queue"]["position"]))))
            .unwrap_or_default();
        eprint!("\r{} pending{reason}{place}   ", FRAMES[self.frame]);
        self.shown = true;
    }

    pub fn clear(&mut self) {
        if self.shown {
            eprint!("\r\x1b[2K");
            self.shown = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn relative_times() {
        let now = Utc.with_ymd_and_hms(2026, 11, 26, 12, 0, 0).unwrap();
        assert_eq!(relative("2026-11-26T11:59:50Z", now), "10s ago");
        assert_eq!(relative("2026-11-26T11:55:00Z", now), "5m ago");
        assert_eq!(relative("2026-11-26T09:00:00Z", now), "3h ago");
        assert_eq!(relative("2026-11-23T12:00:00Z", now), "3d ago");
        assert_eq!(relative("garbage", now), "-");
    }

    #[test]
    fn a_queued_job_shows_its_queue_and_place() {
        let job = serde_json::json!({"id": "job-q", "status": "pending", "reason": "Queued", "queue": {"name": "team-a", "position": 3}});
        let mut out = Vec::new();
        print_job(&mut out, &job, Format::Table);
        let text = String::from_utf8(out).unwrap();
        assert!(text.lines().any(|l| l.starts_with("queue") && l.ends_with("team-a, position 3")), "{text}");
        assert_eq!(queue_place("team-a", &Value::Null), "team-a");
    }

    #[test]
    fn control_characters_never_reach_the_terminal() {
        assert_eq!(clean("plain\ttext\nüñï"), "plain\ttext\nüñï");
        assert_eq!(clean("\u{1b}[2Jwiped\u{7}\r\u{7f}\u{9b}31m\u{0}"), "[2Jwiped31m");
        let mut stream = CleanStream::default();
        let bytes = "a\u{1b}]0;title\u{7}ü\u{9b}b\n".as_bytes();
        // Split inside the two-byte characters ü and U+009B.
        let (one, two) = bytes.split_at(bytes.len() - 5);
        let text = stream.push(one) + &stream.push(two) + &stream.finish();
        assert_eq!(text, "a]0;titleüb\n");
        assert_eq!(CleanStream::default().push(b"bad \xff byte"), "bad \u{fffd} byte");
        let job = serde_json::json!({"id": "job-a", "status": "failed", "goal": "\u{1b}[2J", "result": "r\u{9b}", "message": "m\u{7}"});
        for format in [Format::Table, Format::Json, Format::Yaml] {
            let mut out = Vec::new();
            print_job(&mut out, &job, format);
            let text = String::from_utf8(out).unwrap();
            assert!(text.chars().all(printable), "{format:?}: {text:?}");
        }
        let mut out = Vec::new();
        print_job(&mut out, &job, Format::Json);
        let parsed: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(parsed, job, "JSON stays exact");
        let mut out = Vec::new();
        print_list(&mut out, &[job], None, Format::Table);
        assert!(String::from_utf8(out).unwrap().chars().all(printable));
    }

    #[test]
    fn tables_align_columns() {
        let jobs = vec![
            serde_json::json!({"id": "job-a", "status": "running", "created_at": "2026-11-26T11:59:50Z", "goal": "short"}),
            serde_json::json!({"id": "job-bbbb", "status": "succeeded", "reason": null, "created_at": "2026-11-26T11:00:00Z", "goal": "a\\nb"}),
        ];
        let mut out = Vec::new();
        print_list(&mut out, &jobs, None, Format::Table);
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        let column =
            |line: &str| line.find("STATUS").or_else(|| line.find("running")).or_else(|| line.find("succeeded"));
        assert_eq!(column(lines[0]), column(lines[1]));
        assert_eq!(column(lines[1]), column(lines[2]));
    }
}
