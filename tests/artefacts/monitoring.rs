//! The shipped observability artefacts agree with the metrics contract and with each other:
//!
//! - every PromQL expression of the Grafana dashboards (`dashboards/*.json`) and of the
//!   PrometheusRule (`infra/monitoring/prometheusrule.yaml`) parses, and uses only metrics that
//!   `docs/metrics.md` documents (with documented labels), recording rules of that
//!   PrometheusRule, or a short allow-list of other exporters' metrics;
//! - the dashboards follow the conventions (uid, `datasource`/`job`/`namespace` variables,
//!   `$__rate_interval` in every rate, a unit and a description on every panel, exemplars and
//!   trace links on latency panels);
//! - every alert has a severity, a summary, a description and a runbook_url whose anchor exists
//!   in `docs/runbook.md`, and a positive and a negative promtool unit test in `tests/alerts/`;
//! - `scripts/check-alerts.sh` (promtool check rules + promtool test rules) passes;
//! - live: a real Prometheus server (Debian's `prometheus`) with the shipped rules loaded scrapes a
//!   real `oats serve` under scripted traffic, and every panel query of every dashboard returns a
//!   series (0 rather than "No data" on a healthy system), Kubernetes-only panels excepted.

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use promql_parser::label::{MatchOp, Matcher};
use promql_parser::parser::{self, Expr, VectorSelector};
use promql_parser::util::{ExprVisitor, walk_expr};
use serde_json::Value;

const DASHBOARDS: [&str; 4] = ["oats-api.json", "oats-jobs.json", "oats-kubernetes.json", "oats-llm.json"];
const PROMETHEUS_RULE: &str = "infra/monitoring/prometheusrule.yaml";
const RUNBOOK: &str = "docs/runbook.md";
const RUNBOOK_URL: &str = "https://github.com/oats-dev/oats/blob/main/docs/runbook.md";
const METRICS_DOC: &str = "docs/metrics.md";
const ALERT_TESTS: &str = "tests/alerts";
/// The name under which scripts/check-alerts.sh writes the extracted rules next to the tests.
const RULES_FILE_IN_TESTS: &str = "oats.rules.yaml";

/// Metrics of other exporters that dashboards and alerts may use (docs/metrics.md, last part).
const EXTERNAL_METRICS: [&str; 1] = ["up"];
const EXTERNAL_PREFIXES: [&str; 3] = ["kube_", "apiserver_", "kueue_"];
/// Target labels Prometheus adds to every scraped series (ServiceMonitor defaults).
const TARGET_LABELS: [&str; 7] = ["job", "namespace", "instance", "pod", "service", "container", "endpoint"];

/// `$__rate_interval` becomes this duration before parsing: valid PromQL, and odd enough that a
/// range equal to it can only come from the variable.
const RATE_INTERVAL_STANDIN: &str = "4m57s";
const RATE_INTERVAL_SECS: u64 = 4 * 60 + 57;
const RATE_FUNCTIONS: [&str; 3] = ["rate", "irate", "increase"];

fn path(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(path(rel)).unwrap_or_else(|e| panic!("cannot read {rel}: {e}"))
}

// ------------------------------------------------------------------------------------------
// docs/metrics.md
// ------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Histogram,
    Counter,
    Other,
}

#[derive(Debug)]
struct Documented {
    /// The documented name this series name belongs to.
    metric: String,
    kind: Kind,
    /// Backticked label-like words of the labels column (label names, plus some values: a
    /// superset is good enough to catch a misspelt label).
    labels: BTreeSet<String>,
}

fn backticked(text: &str) -> Vec<String> {
    text.split('`').skip(1).step_by(2).map(str::to_owned).collect()
}

fn is_label_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// Series names that may appear in queries, from the table of docs/metrics.md: histograms as
/// `_bucket`/`_count`/`_sum` (a classic histogram has no series under its bare name), counters
/// with their `_total` name.
fn documented_series() -> BTreeMap<String, Documented> {
    let doc = read(METRICS_DOC);
    let mut series = BTreeMap::new();
    for line in doc.lines().filter(|l| l.starts_with("| `")) {
        let line = line.replace("\\|", "\u{0}");
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        assert!(cells.len() >= 5, "{METRICS_DOC}: unexpected table row: {line}");
        let (names, kind_text, labels_text) = (cells[1], cells[2].to_lowercase(), cells[3]);
        let kind = if kind_text.starts_with("histogram") {
            Kind::Histogram
        } else if kind_text.starts_with("counter") {
            Kind::Counter
        } else {
            Kind::Other
        };
        let labels: BTreeSet<String> = backticked(labels_text).into_iter().filter(|l| is_label_name(l)).collect();
        for name in backticked(names) {
            assert!(is_label_name(&name), "{METRICS_DOC}: `{name}` is not a metric name");
            let names = match kind {
                Kind::Histogram => ["_bucket", "_count", "_sum"].iter().map(|s| format!("{name}{s}")).collect(),
                Kind::Counter if !name.ends_with("_total") => vec![format!("{name}_total")],
                _ => vec![name.clone()],
            };
            for n in names {
                let mut labels = labels.clone();
                if n.ends_with("_bucket") && kind == Kind::Histogram {
                    labels.insert("le".into());
                }
                series.insert(n, Documented { metric: name.clone(), kind, labels });
            }
        }
    }
    assert!(series.len() > 20, "{METRICS_DOC}: could not read the metrics table ({} series)", series.len());
    series
}

#[test]
fn the_metrics_table_is_read() {
    let series = documented_series();
    for name in [
        "http_server_request_duration_seconds_bucket",
        "http_server_request_duration_seconds_count",
        "oats_job_submissions_total",
        "oats_jobs",
        "oats_kube_cache_synced",
        "process_open_fds",
        "process_cpu_seconds_total",
    ] {
        assert!(series.contains_key(name), "{name} missing from what was read of {METRICS_DOC}");
    }
    assert!(!series.contains_key("http_server_request_duration_seconds"), "a bare histogram name is no series");
    assert_eq!(series["oats_job_duration_seconds_sum"].kind, Kind::Histogram);
    assert_eq!(series["oats_job_duration_seconds_sum"].metric, "oats_job_duration_seconds");
    let labels = &series["oats_kube_requests_total"].labels;
    assert!(["verb", "resource", "code"].iter().all(|l| labels.contains(*l)), "{labels:?}");
}

// ------------------------------------------------------------------------------------------
// PromQL
// ------------------------------------------------------------------------------------------

#[derive(Default)]
struct Collector {
    selectors: Vec<VectorSelector>,
    /// (function, range) of every rate/irate/increase over a range selector.
    rate_ranges: Vec<(String, Option<Duration>)>,
}

impl ExprVisitor for Collector {
    type Error = String;

    fn pre_visit(&mut self, expr: &Expr) -> Result<bool, String> {
        match expr {
            Expr::VectorSelector(vs) => self.selectors.push(vs.clone()),
            Expr::MatrixSelector(ms) => self.selectors.push(ms.vs.clone()),
            Expr::Call(call) if RATE_FUNCTIONS.contains(&call.func.name) => {
                let range = call.args.args.iter().find_map(|a| match a.as_ref() {
                    Expr::MatrixSelector(ms) => Some(ms.range),
                    _ => None,
                });
                self.rate_ranges.push((call.func.name.to_owned(), range));
            }
            _ => {}
        }
        Ok(true)
    }
}

fn parse(expr: &str, origin: &str) -> Collector {
    let ast = parser::parse(expr).unwrap_or_else(|e| panic!("{origin}: PromQL does not parse: {e}\n{expr}"));
    let mut collector = Collector::default();
    walk_expr(&mut collector, &ast).unwrap();
    collector
}

fn metric_name(vs: &VectorSelector, origin: &str) -> String {
    if let Some(name) = &vs.name {
        return name.clone();
    }
    let by_name: Vec<&Matcher> = vs.matchers.matchers.iter().filter(|m| m.name == "__name__").collect();
    match by_name.as_slice() {
        [m] if matches!(m.op, MatchOp::Equal) => m.value.clone(),
        _ => panic!("{origin}: selector {vs} has no exact metric name (use a name, or __name__=\"...\")"),
    }
}

fn is_external(name: &str) -> bool {
    EXTERNAL_METRICS.contains(&name) || EXTERNAL_PREFIXES.iter().any(|p| name.starts_with(p))
}

struct Vocabulary {
    documented: BTreeMap<String, Documented>,
    recorded: BTreeSet<String>,
}

impl Vocabulary {
    /// Every selector names a known metric, and the labels it matches on OATS metrics exist.
    /// Returns the metric names used.
    fn check(&self, collector: &Collector, origin: &str, expr: &str) -> BTreeSet<String> {
        let mut used = BTreeSet::new();
        for vs in &collector.selectors {
            let name = metric_name(vs, origin);
            if let Some(doc) = self.documented.get(&name) {
                for m in vs.matchers.matchers.iter().filter(|m| m.name != "__name__") {
                    assert!(
                        doc.labels.contains(&m.name) || TARGET_LABELS.contains(&m.name.as_str()),
                        "{origin}: label `{}` of {name} is not documented for {} in {METRICS_DOC} \
                         (documented: {:?})\n{expr}",
                        m.name,
                        doc.metric,
                        doc.labels
                    );
                }
            } else if !self.recorded.contains(&name) && !is_external(&name) {
                let hint = if self.documented.keys().any(|k| k.starts_with(&format!("{name}_"))) {
                    " (a histogram is queried as _bucket/_count/_sum)"
                } else {
                    ""
                };
                panic!(
                    "{origin}: metric `{name}` is neither in {METRICS_DOC}, nor a recording rule of \
                     {PROMETHEUS_RULE}, nor an allowed external metric{hint}\n{expr}"
                );
            }
            used.insert(name);
        }
        used
    }
}

// ------------------------------------------------------------------------------------------
// PrometheusRule
// ------------------------------------------------------------------------------------------

fn prometheus_rule() -> Value {
    let text = read(PROMETHEUS_RULE);
    let docs: Vec<Value> = serde_saphyr::from_multiple(&text).unwrap_or_else(|e| panic!("{PROMETHEUS_RULE}: {e}"));
    let mut rules: Vec<Value> = docs.into_iter().filter(|d| d["kind"] == "PrometheusRule").collect();
    assert_eq!(rules.len(), 1, "{PROMETHEUS_RULE}: expected one PrometheusRule");
    let rule = rules.remove(0);
    assert_eq!(rule["apiVersion"], "monitoring.coreos.com/v1");
    rule
}

fn rules() -> Vec<Value> {
    let pr = prometheus_rule();
    let groups = pr["spec"]["groups"].as_array().expect("spec.groups").clone();
    assert!(!groups.is_empty());
    groups
        .iter()
        .flat_map(|g| {
            assert!(g["name"].as_str().is_some_and(|n| !n.is_empty()), "a rule group without name");
            g["rules"].as_array().expect("group rules").clone()
        })
        .collect()
}

fn recorded_names() -> BTreeSet<String> {
    rules().iter().filter_map(|r| r["record"].as_str().map(str::to_owned)).collect()
}

fn alert_names() -> BTreeSet<String> {
    rules().iter().filter_map(|r| r["alert"].as_str().map(str::to_owned)).collect()
}

fn vocabulary() -> Vocabulary {
    Vocabulary { documented: documented_series(), recorded: recorded_names() }
}

/// GitHub's heading anchors: lowercase, spaces to '-', punctuation other than '-' and '_' dropped.
fn github_anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

fn runbook_anchors() -> BTreeSet<String> {
    read(RUNBOOK).lines().filter(|l| l.starts_with('#')).map(|l| github_anchor(l.trim_start_matches('#'))).collect()
}

#[test]
fn rule_expressions_use_documented_metrics() {
    let vocabulary = vocabulary();
    let mut used = BTreeSet::new();
    for rule in rules() {
        let name = rule["record"].as_str().or(rule["alert"].as_str()).expect("a rule is a record or an alert");
        let expr = rule["expr"].as_str().unwrap_or_else(|| panic!("{name}: expr is not a string"));
        let origin = format!("{PROMETHEUS_RULE} {name}");
        used.extend(vocabulary.check(&parse(expr, &origin), &origin, expr));
    }
    // Every recording rule is used by an alert or a dashboard (here: by some rule or dashboard).
    let mut dashboard_metrics = BTreeSet::new();
    for file in DASHBOARDS {
        for (_, expr) in dashboard_exprs(&dashboard(file)) {
            dashboard_metrics
                .extend(parse(&substitute(&expr, file), file).selectors.iter().map(|v| metric_name(v, file)));
        }
    }
    for record in &vocabulary.recorded {
        assert!(
            used.contains(record) || dashboard_metrics.contains(record),
            "recording rule {record} is used by no alert and no dashboard"
        );
    }
}

#[test]
fn recording_rules_follow_the_naming_convention() {
    for record in recorded_names() {
        let parts: Vec<&str> = record.split(':').collect();
        assert!(
            parts.len() == 3 && parts.iter().all(|p| is_label_name(p)),
            "recording rule {record} is not named level:metric:operations"
        );
        assert!(parts[0].split('_').any(|l| l == "job"), "recording rule {record} must keep `job` (level)");
    }
}

#[test]
fn every_alert_is_complete_and_has_a_runbook_section() {
    let anchors = runbook_anchors();
    let rules = rules();
    let alerts: Vec<&Value> = rules.iter().filter(|r| r["alert"].is_string()).collect();
    assert!(alerts.len() >= 8, "only {} alerts", alerts.len());
    for alert in alerts {
        let name = alert["alert"].as_str().unwrap();
        assert!(
            name.starts_with("Oats") && name.chars().all(|c| c.is_ascii_alphanumeric()),
            "{name}: alerts are CamelCase and start with Oats"
        );
        assert!(alert["for"].as_str().is_some_and(|f| !f.is_empty()), "{name}: no `for`");
        let severity = alert["labels"]["severity"].as_str().unwrap_or_default();
        assert!(["critical", "warning", "info"].contains(&severity), "{name}: severity {severity:?}");
        let annotations = &alert["annotations"];
        for key in ["summary", "description", "runbook_url"] {
            assert!(
                annotations[key].as_str().is_some_and(|v| !v.trim().is_empty()),
                "{name}: annotation {key} is missing"
            );
        }
        let summary = annotations["summary"].as_str().unwrap();
        assert!(
            summary.ends_with('.') && summary.starts_with(|c: char| c.is_uppercase()),
            "{name}: the summary is one sentence with a capital letter and a period: {summary:?}"
        );
        let anchor = name.to_lowercase();
        assert_eq!(
            annotations["runbook_url"].as_str().unwrap(),
            format!("{RUNBOOK_URL}#{anchor}"),
            "{name}: runbook_url"
        );
        assert!(anchors.contains(&anchor), "{name}: {RUNBOOK} has no section with anchor #{anchor}");
    }
}

#[test]
fn every_runbook_alert_section_belongs_to_an_alert() {
    let alerts = alert_names();
    for line in read(RUNBOOK).lines().filter(|l| l.starts_with("## ")) {
        let heading = line.trim_start_matches('#').trim();
        if heading.starts_with("Oats") {
            assert!(alerts.contains(heading), "{RUNBOOK}: section {heading:?} is about no alert");
        }
    }
}

#[test]
fn every_alert_has_a_positive_and_a_negative_promtool_test() {
    let mut positive = BTreeSet::new();
    let mut negative = BTreeSet::new();
    let mut files = 0;
    for entry in std::fs::read_dir(path(ALERT_TESTS)).expect("tests/alerts exists") {
        let file = entry.unwrap().path();
        if file.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        files += 1;
        let text = std::fs::read_to_string(&file).unwrap();
        let origin = file.display().to_string();
        let doc: Value = serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{origin}: {e}"));
        assert_eq!(
            doc["rule_files"],
            serde_json::json!([RULES_FILE_IN_TESTS]),
            "{origin}: rule_files must be [{RULES_FILE_IN_TESTS}] (scripts/check-alerts.sh writes it)"
        );
        for test in doc["tests"].as_array().unwrap_or_else(|| panic!("{origin}: no tests")) {
            for case in test["alert_rule_test"].as_array().into_iter().flatten() {
                let alert = case["alertname"].as_str().unwrap_or_else(|| panic!("{origin}: alertname")).to_owned();
                match case["exp_alerts"].as_array() {
                    Some(expected) if !expected.is_empty() => positive.insert(alert),
                    _ => negative.insert(alert),
                };
            }
        }
    }
    assert!(files > 0, "no promtool tests in {ALERT_TESTS}");
    for alert in alert_names() {
        assert!(positive.contains(&alert), "{alert}: no promtool test where it fires ({ALERT_TESTS})");
        assert!(negative.contains(&alert), "{alert}: no promtool test where it stays quiet ({ALERT_TESTS})");
    }
    let known = alert_names();
    for alert in positive.union(&negative) {
        assert!(known.contains(alert), "{ALERT_TESTS} tests {alert}, which is no alert");
    }
}

/// promtool check rules + promtool test rules, through the script CI and developers run.
#[test]
fn promtool_checks_and_unit_tests_pass() {
    let script = path("scripts/check-alerts.sh");
    let out = Command::new("bash")
        .arg(&script)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "scripts/check-alerts.sh failed (promtool is needed: apt-get install -y --no-install-recommends \
         prometheus python3-yaml)\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    assert!(stdout.contains("SUCCESS"), "no SUCCESS from promtool:\n{stdout}\n{stderr}");
    assert!(!stdout.contains("FAILED"), "{stdout}\n{stderr}");
}

// ------------------------------------------------------------------------------------------
// Dashboards
// ------------------------------------------------------------------------------------------

fn dashboard(file: &str) -> Value {
    let rel = format!("dashboards/{file}");
    serde_json::from_str(&read(&rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// All panels, those nested in (collapsed) rows included, rows themselves excluded.
fn panels(dashboard: &Value) -> Vec<&Value> {
    fn walk<'a>(list: &'a Value, out: &mut Vec<&'a Value>) {
        for panel in list.as_array().into_iter().flatten() {
            if panel["type"] == "row" {
                walk(&panel["panels"], out);
            } else {
                out.push(panel);
                walk(&panel["panels"], out);
            }
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// (panel title, expr) of every target.
fn dashboard_exprs(dashboard: &Value) -> Vec<(String, String)> {
    panels(dashboard)
        .into_iter()
        .flat_map(|p| {
            let title = p["title"].as_str().unwrap_or("?").to_owned();
            p["targets"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(move |t| t["expr"].as_str().map(|e| (title.clone(), e.to_owned())))
        })
        .collect()
}

/// Grafana variables to values that make valid PromQL. `$__rate_interval` becomes an odd
/// duration so that ranges that came from it can be recognised after parsing.
fn substitute(expr: &str, origin: &str) -> String {
    substitute_with(expr, origin, |name| {
        Some(match name {
            "__rate_interval" => RATE_INTERVAL_STANDIN,
            "__interval" => "1m",
            "__range" => "1h",
            "job" | "namespace" | "instance" => "oats",
            _ => return None,
        })
    })
}

/// Grafana variables to the values `value` gives (None: an unknown variable, a test failure).
fn substitute_with<'v>(expr: &str, origin: &str, value: impl Fn(&str) -> Option<&'v str>) -> String {
    let value =
        |name: &str| value(name).unwrap_or_else(|| panic!("{origin}: unknown Grafana variable ${name} in {expr}"));
    let mut out = String::with_capacity(expr.len());
    let mut rest = expr;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        rest = &rest[i + 1..];
        let (name, len) = if let Some(braced) = rest.strip_prefix('{') {
            let end = braced.find('}').unwrap_or_else(|| panic!("{origin}: unclosed ${{ in {expr}"));
            // ${var:format} -> var
            let inner = &braced[..end];
            (inner.split(':').next().unwrap(), end + 2)
        } else {
            let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(rest.len());
            (&rest[..end], end)
        };
        assert!(!name.is_empty(), "{origin}: stray $ in {expr}");
        out.push_str(value(name));
        rest = &rest[len..];
    }
    out.push_str(rest);
    out
}

#[test]
fn grafana_variables_are_substituted() {
    assert_eq!(
        substitute(r#"rate(x{job=~"$job",namespace=~"${namespace}",i=~"${instance:regex}"}[$__rate_interval])"#, "t"),
        format!(r#"rate(x{{job=~"oats",namespace=~"oats",i=~"oats"}}[{RATE_INTERVAL_STANDIN}])"#)
    );
    let c = parse(&substitute("increase(x[$__rate_interval]) + rate(y[5m])", "t"), "t");
    assert_eq!(
        c.rate_ranges,
        vec![
            ("increase".to_owned(), Some(Duration::from_secs(RATE_INTERVAL_SECS))),
            ("rate".to_owned(), Some(Duration::from_secs(300)))
        ]
    );
}

fn is_prometheus_datasource(ds: &Value) -> bool {
    ds["uid"] == "${datasource}" && ds["type"] == "prometheus"
}

#[test]
fn dashboards_have_uid_variables_and_links() {
    let mut uids = BTreeSet::new();
    let vocabulary = vocabulary();
    for file in DASHBOARDS {
        let d = dashboard(file);
        let uid = d["uid"].as_str().unwrap_or_default();
        assert!(!uid.is_empty() && uid.len() <= 40, "{file}: a stable uid (at most 40 characters)");
        assert!(uids.insert(uid.to_owned()), "{file}: uid {uid} is used twice");
        assert!(d["title"].as_str().is_some_and(|t| !t.is_empty()), "{file}: title");
        let schema = d["schemaVersion"].as_u64().unwrap_or(0);
        assert!((36..=42).contains(&schema), "{file}: schemaVersion {schema}");
        assert!(d["tags"].as_array().is_some_and(|t| t.contains(&Value::from("oats"))), "{file}: tag oats");

        let vars = d["templating"]["list"].as_array().unwrap_or_else(|| panic!("{file}: templating.list"));
        let var = |name: &str| {
            vars.iter().find(|v| v["name"] == name).unwrap_or_else(|| panic!("{file}: no `{name}` variable"))
        };
        let ds = var("datasource");
        assert_eq!(ds["type"], "datasource", "{file}: datasource variable type");
        assert_eq!(ds["query"], "prometheus", "{file}: datasource variable query");
        for name in ["job", "namespace"] {
            let v = var(name);
            assert_eq!(v["type"], "query", "{file}: `{name}` is a query variable");
            assert!(is_prometheus_datasource(&v["datasource"]), "{file}: `{name}` uses ${{datasource}}");
            let query = v["query"]["query"].as_str().or(v["query"].as_str()).unwrap_or_default();
            let origin = format!("{file} variable {name}");
            let inner = query
                .strip_prefix("label_values(")
                .and_then(|q| q.strip_suffix(&format!(", {name})")))
                .unwrap_or_else(|| panic!("{origin}: expected label_values(<selector>, {name}), got {query:?}"));
            let inner = substitute(inner, &origin);
            vocabulary.check(&parse(&inner, &origin), &origin, &inner);
        }
        // Every variable query uses the same data source.
        for v in vars.iter().filter(|v| v["type"] == "query") {
            assert!(is_prometheus_datasource(&v["datasource"]), "{file}: variable {} data source", v["name"]);
        }

        // A link to the trace explorer on the dashboard.
        let links = d["links"].as_array().unwrap_or_else(|| panic!("{file}: links"));
        assert!(
            links.iter().any(|l| l["url"].as_str().is_some_and(|u| u.contains("/explore"))),
            "{file}: no dashboard link to the trace explorer"
        );
    }
}

#[test]
fn dashboard_panels_have_units_descriptions_and_the_datasource_variable() {
    for file in DASHBOARDS {
        let d = dashboard(file);
        let panels = panels(&d);
        assert!(panels.len() >= 8, "{file}: only {} panels", panels.len());
        let mut ids = BTreeSet::new();
        for p in panels {
            let title = p["title"].as_str().unwrap_or_default();
            assert!(!title.is_empty(), "{file}: a panel without title");
            assert!(ids.insert(p["id"].to_string()), "{file}: panel id {} twice", p["id"]);
            assert!(
                p["description"].as_str().is_some_and(|s| !s.trim().is_empty()),
                "{file}: panel {title:?} has no description"
            );
            assert!(
                p["fieldConfig"]["defaults"]["unit"].as_str().is_some_and(|s| !s.is_empty()),
                "{file}: panel {title:?} has no unit (fieldConfig.defaults.unit)"
            );
            assert!(is_prometheus_datasource(&p["datasource"]), "{file}: panel {title:?} data source");
            let targets = p["targets"].as_array().unwrap_or_else(|| panic!("{file}: panel {title:?} has no targets"));
            assert!(!targets.is_empty(), "{file}: panel {title:?} has no targets");
            for t in targets {
                assert!(is_prometheus_datasource(&t["datasource"]), "{file}: a target of {title:?}: data source");
                assert!(t["expr"].as_str().is_some_and(|e| !e.is_empty()), "{file}: a target of {title:?} has no expr");
            }
        }
    }
}

#[test]
fn dashboard_queries_parse_and_use_documented_metrics() {
    let vocabulary = vocabulary();
    for file in DASHBOARDS {
        let d = dashboard(file);
        let exprs = dashboard_exprs(&d);
        assert!(!exprs.is_empty(), "{file}: no queries");
        for (title, raw) in exprs {
            let origin = format!("{file} panel {title:?}");
            let expr = substitute(&raw, &origin);
            let collector = parse(&expr, &origin);
            vocabulary.check(&collector, &origin, &raw);
            // OATS series are filtered by the dashboard's job and namespace variables.
            for vs in &collector.selectors {
                let name = metric_name(vs, &origin);
                if is_external(&name) {
                    continue;
                }
                for label in ["job", "namespace"] {
                    assert!(
                        vs.matchers.matchers.iter().any(|m| m.name == label && m.value == "oats"),
                        "{origin}: {name} is not filtered by ${label} ({label}=~\"${label}\")\n{raw}"
                    );
                }
            }
        }
    }
}

#[test]
fn every_rate_in_dashboards_uses_rate_interval() {
    for file in DASHBOARDS {
        for (title, raw) in dashboard_exprs(&dashboard(file)) {
            let origin = format!("{file} panel {title:?}");
            for (func, range) in parse(&substitute(&raw, &origin), &origin).rate_ranges {
                assert_eq!(
                    range,
                    Some(Duration::from_secs(RATE_INTERVAL_SECS)),
                    "{origin}: {func}() must use [$__rate_interval]\n{raw}"
                );
            }
        }
    }
}

#[test]
fn latency_panels_show_exemplars_with_trace_links() {
    let mut latency_panels = 0;
    for file in DASHBOARDS {
        let d = dashboard(file);
        for p in panels(&d) {
            let title = p["title"].as_str().unwrap_or_default();
            let targets = p["targets"].as_array().cloned().unwrap_or_default();
            let latency = p["fieldConfig"]["defaults"]["unit"] == "s"
                && targets.iter().any(|t| {
                    t["expr"]
                        .as_str()
                        .is_some_and(|e| e.contains("histogram_quantile") && e.contains("_seconds_bucket"))
                });
            if !latency {
                continue;
            }
            latency_panels += 1;
            for t in &targets {
                assert_eq!(
                    t["exemplar"], true,
                    "{file}: panel {title:?}: target {} without exemplar: true",
                    t["refId"]
                );
            }
            let links = serde_json::to_string(&p["fieldConfig"]).unwrap();
            assert!(
                links.contains("\"trace_id\"") && links.contains("${__value.raw}") && links.contains("/explore"),
                "{file}: panel {title:?}: no data link from the exemplars' trace_id to the trace explorer"
            );
        }
    }
    assert!(latency_panels >= 3, "only {latency_panels} latency panels");
}

// ------------------------------------------------------------------------------------------
// Live: a real Prometheus scrapes a real OATS under traffic, with the shipped rules loaded
// ------------------------------------------------------------------------------------------

/// Panels whose every metric only exists on the Kubernetes backend (docs/metrics.md) or comes
/// from another exporter of the cluster (kube-state-metrics, kube-apiserver): the live test, on
/// the local backend, skips them. Every other panel query must return a series.
const KUBERNETES_ONLY_PANELS: [(&str, &str); 14] = [
    ("oats-jobs.json", "Agent Kubernetes Jobs (kube-state-metrics)"),
    ("oats-kubernetes.json", "Requests by verb and resource"),
    ("oats-kubernetes.json", "Requests by code"),
    ("oats-kubernetes.json", "Error ratio"),
    ("oats-kubernetes.json", "Request latency p99 by verb and resource"),
    ("oats-kubernetes.json", "Request latency p50 / p90 / p99"),
    ("oats-kubernetes.json", "kube-apiserver 5xx ratio (cluster)"),
    ("oats-kubernetes.json", "Watch errors"),
    ("oats-kubernetes.json", "Watch restarts (re-lists)"),
    ("oats-kubernetes.json", "Watch cache synced"),
    ("oats-kubernetes.json", "API replicas available (kube-state-metrics)"),
    ("oats-kubernetes.json", "OATS jobs waiting in Kueue by queue"),
    ("oats-kubernetes.json", "Kueue admission wait, mean by queue"),
    ("oats-kubernetes.json", "Kueue pending workloads by ClusterQueue (Kueue's metrics)"),
];

/// Metrics that exist only where OATS runs against Kubernetes (docs/metrics.md) or that other
/// exporters of the cluster provide.
fn kubernetes_only_metric(name: &str) -> bool {
    (name.starts_with("oats_kube_") && name != "oats_kube_quota_refusals_total")
        || name.starts_with("kube_")
        || name.starts_with("apiserver_")
        // With `queueing: kueue` only, and Kueue's own exporter.
        || name.starts_with("oats_queue_")
        || name.starts_with("kueue_")
}

fn kubernetes_only_panel(file: &str, title: &str) -> bool {
    KUBERNETES_ONLY_PANELS.iter().any(|(f, t)| *f == file && *t == title)
}

/// Panels that show exactly 0 on a healthy system (no 5xx, no failed submission, no denial).
const ZERO_ON_A_HEALTHY_SYSTEM: [(&str, &str); 6] = [
    ("oats-api.json", "5xx error ratio"),
    ("oats-api.json", "5xx error ratio by route"),
    ("oats-api.json", "Error budget burn rate (1h)"),
    ("oats-api.json", "Error budget burn rate by window"),
    ("oats-jobs.json", "Submission error ratio"),
    ("oats-jobs.json", "Policy denials by rule"),
];

/// The scrape job and namespace the shipped rules expect (the ServiceMonitor's), and a short
/// stand-in for `$__rate_interval` so that the rate windows fill within seconds.
const LIVE_JOB: &str = "oats-backend-api";
const LIVE_NAMESPACE: &str = "oats";
const LIVE_RATE_INTERVAL: &str = "10s";

/// The live test skips exactly the panels made of Kubernetes-only metrics, no more, no fewer.
#[test]
fn the_kubernetes_only_panels_are_exactly_those_of_kubernetes_only_metrics() {
    let mut found = BTreeSet::new();
    for file in DASHBOARDS {
        let d = dashboard(file);
        let mut by_panel: BTreeMap<String, bool> = BTreeMap::new();
        for (title, raw) in dashboard_exprs(&d) {
            let origin = format!("{file} panel {title:?}");
            let only_kube = parse(&substitute(&raw, &origin), &origin)
                .selectors
                .iter()
                .all(|vs| kubernetes_only_metric(&metric_name(vs, &origin)));
            *by_panel.entry(title).or_insert(true) &= only_kube;
        }
        for (title, only_kube) in by_panel {
            assert_eq!(
                kubernetes_only_panel(file, &title),
                only_kube,
                "{file} panel {title:?}: KUBERNETES_ONLY_PANELS must list exactly the panels whose metrics \
                 all exist only on Kubernetes (the live test skips those)"
            );
            if only_kube {
                found.insert((file, title));
            }
        }
    }
    assert_eq!(found.len(), KUBERNETES_ONLY_PANELS.len(), "a panel of KUBERNETES_ONLY_PANELS does not exist");
}

/// The `prometheus` server of Debian's package (the same package as promtool).
fn prometheus_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("OATS_TEST_PROMETHEUS") {
        return PathBuf::from(bin);
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/bin")])
        .map(|dir| dir.join("prometheus"))
        .find(|bin| bin.is_file())
        .unwrap_or_else(|| {
            panic!(
                "the prometheus server binary is missing: this test runs a real Prometheus. Install it with \
                 `apt-get install -y --no-install-recommends prometheus` (scripts/install-test-tools.sh does), \
                 or point OATS_TEST_PROMETHEUS at one"
            )
        })
}

/// A Prometheus server on a loopback port of its own choosing, killed on drop.
struct Prometheus {
    child: std::process::Child,
    base: String,
    log: PathBuf,
    http: reqwest::Client,
}

impl Prometheus {
    /// Scrape `target` every second as job `oats-backend-api` in namespace `oats`, and evaluate
    /// the shipped PrometheusRule's groups every second.
    async fn start(dir: &std::path::Path, target: &str) -> Self {
        let bin = prometheus_binary();
        std::fs::create_dir_all(dir.join("data")).unwrap();
        // PrometheusRule .spec is a rule file's content; JSON is YAML.
        let groups = prometheus_rule()["spec"]["groups"].clone();
        std::fs::write(dir.join("rules.json"), serde_json::json!({ "groups": groups }).to_string()).unwrap();
        std::fs::write(
            dir.join("prometheus.yml"),
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 rule_files: [rules.json]\n\
                 scrape_configs:\n  - job_name: {LIVE_JOB}\n    static_configs:\n      - targets: ['{target}']\n        \
                 labels: {{namespace: {LIVE_NAMESPACE}}}\n"
            ),
        )
        .unwrap();
        let log = dir.join("prometheus.log");
        // Port 0: Prometheus logs the address it got ("Listening on", at level info).
        let mut child = Command::new(&bin)
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg("--web.listen-address=127.0.0.1:0")
            .arg("--storage.tsdb.retention.time=1h")
            .arg("--log.level=info")
            .current_dir(dir)
            .stdout(std::fs::File::create(dir.join("prometheus.out")).unwrap())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let address = loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let listening = text
                .lines()
                .filter(|l| l.contains("msg=\"Listening on\""))
                .find_map(|l| l.split_whitespace().find_map(|field| field.strip_prefix("address=")).map(str::to_owned));
            if let Some(address) = listening {
                break address;
            }
            let exited = child.try_wait().unwrap();
            assert!(exited.is_none() && std::time::Instant::now() < deadline, "Prometheus did not listen:\n{text}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let prometheus = Self {
            child,
            base: format!("http://{address}"),
            log,
            http: reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap(),
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = prometheus.http.get(format!("{}/-/ready", prometheus.base)).send().await
                && r.status().is_success()
            {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "Prometheus never became ready:\n{}", prometheus.log_text());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        prometheus
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn api(&self, path: &str, params: &[(&str, &str)]) -> Value {
        let response = self.http.get(format!("{}{path}", self.base)).query(params).send().await.unwrap();
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["status"], "success", "Prometheus {path} {params:?}: {body}");
        body["data"].clone()
    }

    /// The series an instant query returns now.
    async fn query(&self, expr: &str) -> Vec<Value> {
        let data = self.api("/api/v1/query", &[("query", expr)]).await;
        match data["resultType"].as_str() {
            Some("vector") => data["result"].as_array().cloned().unwrap_or_default(),
            Some("scalar") => vec![data["result"].clone()],
            other => panic!("unexpected result type {other:?} of {expr}: {data}"),
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a healthy system sees: steady submissions that succeed, reads, lists, logs and the odd
/// 404, until `stop`. Any other answer fails the test (no 5xx, no policy denial).
async fn steady_traffic(http: reqwest::Client, base: String, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) {
    use reqwest::StatusCode;
    let mut previous: Option<String> = None;
    let mut i = 0u32;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        i += 1;
        let body = serde_json::json!({"goal": format!("steady traffic {i}"), "max_turns": 1});
        let r = http.post(format!("{base}/api/v1/jobs")).json(&body).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::CREATED, "submission {i}: {}", r.text().await.unwrap_or_default());
        let job: Value = r.json().await.unwrap();
        let id = job["id"].as_str().unwrap().to_owned();
        let get = |path: String| {
            let http = http.clone();
            async move { http.get(path).send().await.unwrap().status() }
        };
        assert_eq!(get(format!("{base}/api/v1/jobs/{id}")).await, StatusCode::OK);
        assert_eq!(get(format!("{base}/api/v1/jobs?limit=5")).await, StatusCode::OK);
        assert_eq!(get(format!("{base}/api/v1/jobs/job-aaaaaaaaaaaaaaaaaaaa")).await, StatusCode::NOT_FOUND);
        assert_eq!(get(format!("{base}/api/v1/no-such-thing")).await, StatusCode::NOT_FOUND);
        if let Some(previous) = &previous {
            assert_eq!(get(format!("{base}/api/v1/jobs/{previous}/logs")).await, StatusCode::OK);
            assert_eq!(get(format!("{base}/api/v1/jobs/{previous}/events")).await, StatusCode::OK);
        }
        previous = Some(id);
        // About 80 submissions a minute: under the shipped policy's 120.
        tokio::time::sleep(Duration::from_millis(750)).await;
    }
}

/// Tenants of the shipped policy with a daily spend limit get their limit series at start; an
/// idle gateway (its upstream is never called: the demo agent runs the jobs) exports its zeros.
fn idle_gateway_providers(dir: &std::path::Path) -> PathBuf {
    std::fs::write(dir.join("provider.key"), "sk-never-used\n").unwrap();
    let file = dir.join("providers.yaml");
    std::fs::write(
        &file,
        "providers:\n  - name: idle\n    base_url: http://127.0.0.1:9/v1\n    api_key_file: provider.key\n    \
         models:\n      - name: idle-model\n        upstream: idle-model\n        input_per_million_usd: 1\n        \
         output_per_million_usd: 2\n",
    )
    .unwrap();
    file
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_panel_shows_a_value_on_a_live_system() {
    use std::sync::{Arc, atomic::AtomicBool, atomic::Ordering};
    let dir = tempfile::tempdir().unwrap();
    let providers = idle_gateway_providers(dir.path());
    let agent = format!("{},demo-agent", env!("CARGO_BIN_EXE_oats"));
    let policy = path("policies/oats-policy.yaml");
    let server = common::Server::start_local(
        &dir.path().join("state"),
        &[
            ("OATS_POLICY_FILE", policy.to_str().unwrap()),
            ("OATS_LLM_PROVIDERS_FILE", providers.to_str().unwrap()),
            ("OATS_LOCAL_AGENT_COMMAND", &agent),
        ],
    )
    .await;
    let target = server.base.trim_start_matches("http://").to_owned();
    let prometheus = Prometheus::start(&dir.path().join("prometheus"), &target).await;

    // The scripted part: a job that fails, a job that is cancelled.
    let failing = server.create("this one fails #fail", 2).await;
    let slow = server.create("a long one, to cancel", 50).await;
    let slow_id = slow["id"].as_str().unwrap();
    server.wait_for(slow_id, "running", Duration::from_secs(20)).await;
    let cancel = server.http.post(server.url(&format!("/api/v1/jobs/{slow_id}/cancel"))).send().await.unwrap();
    assert_eq!(cancel.status(), reqwest::StatusCode::OK);
    server.wait_for(failing["id"].as_str().unwrap(), "failed", Duration::from_secs(20)).await;
    server.wait_for(slow_id, "cancelled", Duration::from_secs(20)).await;

    let stop = Arc::new(AtomicBool::new(false));
    let traffic = tokio::spawn(steady_traffic(server.http.clone(), server.base.clone(), stop.clone()));

    // Long enough for the rate windows to fill: 15 scrapes of steady traffic.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let scrapes =
            prometheus.query(&format!("count_over_time(up{{job=\"{LIVE_JOB}\"}}[30s]) >= 15 and up == 1")).await;
        if !scrapes.is_empty() {
            break;
        }
        assert!(!traffic.is_finished(), "the traffic stopped early");
        assert!(
            std::time::Instant::now() < deadline,
            "Prometheus never scraped OATS 15 times:\n{}",
            prometheus.log_text()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The shipped rules loaded and evaluate without error (once each has been evaluated).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let rule_groups = loop {
        let rule_groups = prometheus.api("/api/v1/rules", &[]).await;
        let evaluated = rule_groups["groups"].as_array().is_some_and(|groups| {
            !groups.is_empty()
                && groups.iter().flat_map(|g| g["rules"].as_array().unwrap()).all(|r| r["health"] != "unknown")
        });
        if evaluated {
            break rule_groups;
        }
        assert!(std::time::Instant::now() < deadline, "the rules were never evaluated: {rule_groups}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let groups = rule_groups["groups"].as_array().unwrap();
    assert_eq!(groups.len(), prometheus_rule()["spec"]["groups"].as_array().unwrap().len(), "rule groups loaded");
    for group in groups {
        for rule in group["rules"].as_array().unwrap() {
            assert_eq!(rule["health"], "ok", "rule {} of {}: {}", rule["name"], group["name"], rule["lastError"]);
        }
    }

    let values = |name: &str| -> Option<&'static str> {
        Some(match name {
            "__rate_interval" | "__interval" => LIVE_RATE_INTERVAL,
            "__range" => "1m",
            "job" => LIVE_JOB,
            "namespace" => LIVE_NAMESPACE,
            "instance" => ".+",
            _ => return None,
        })
    };
    let mut empty = Vec::new();
    let mut nan_only = Vec::new();
    let mut not_zero = Vec::new();
    let mut checked = 0;
    for file in DASHBOARDS {
        let d = dashboard(file);
        for (title, raw) in dashboard_exprs(&d) {
            if kubernetes_only_panel(file, &title) {
                continue;
            }
            let origin = format!("{file} panel {title:?}");
            let expr = substitute_with(&raw, &origin, values);
            let result = prometheus.query(&expr).await;
            checked += 1;
            // An instant vector's samples are [time, "value"]; a scalar is [time, "value"] too.
            let values: Vec<&str> =
                result.iter().map(|s| s["value"][1].as_str().or(s[1].as_str()).unwrap_or("?")).collect();
            if result.is_empty() {
                empty.push(format!("{origin}\n    {expr}"));
            } else if values.iter().all(|v| *v == "NaN") {
                nan_only.push(format!("{origin}\n    {expr}"));
            } else if ZERO_ON_A_HEALTHY_SYSTEM.contains(&(file, title.as_str())) && values.iter().any(|v| *v != "0") {
                not_zero.push(format!("{origin}: {values:?}\n    {expr}"));
            }
        }
    }
    // The daily limit of the shipped policy's `trial` tenant is there from the start.
    let limit = prometheus.query("oats_llm_tenant_daily_limit_usd{tenant=\"trial\"}").await;
    assert_eq!(limit.len(), 1, "{limit:?}");
    assert_eq!(limit[0]["value"][1], "5", "{limit:?}");
    stop.store(true, Ordering::Relaxed);
    traffic.await.expect("the traffic script failed");
    assert!(checked >= 60, "only {checked} panel queries checked");
    assert!(
        empty.is_empty(),
        "{} of {checked} panel queries return no series on a healthy system (Grafana shows \"No data\"):\n{}",
        empty.len(),
        empty.join("\n")
    );
    assert!(nan_only.is_empty(), "panel queries that return only NaN under steady traffic:\n{}", nan_only.join("\n"));
    assert!(
        not_zero.is_empty(),
        "error and denial panels that are not 0 on a healthy system:\n{}",
        not_zero.join("\n")
    );
}
