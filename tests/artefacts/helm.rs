//! The Helm chart in `infra/helm/oats` against the kustomize manifests it mirrors. No cluster:
//! `helm` (built from its Go module by `testenv/helm.sh`, cached) lints and renders the chart,
//! `kubectl kustomize` renders `infra/base`, the overlays and `infra/monitoring`, and the objects
//! are compared keyed by kind/namespace/name, whole (apiVersion, metadata, spec, data, rules...).
//!
//! Differences that are by design, and normalised here before comparing:
//! - the API's ConfigMap is `oats-backend-api-config-<hash>` on both sides, but kustomize's hash
//!   and the chart's (sha256 of the data) differ: both become `oats-backend-api-config-<hash>`;
//! - `app.kubernetes.io/managed-by` is `Helm` in the chart (`kustomize` in the base);
//! - the providers file of ConfigMap `oats-llm-providers` is `infra/base/llm-providers.yaml` (with
//!   its comments) in kustomize and `llm.providers` (a YAML mapping) rendered by the chart: the two
//!   are compared parsed;
//! - kustomize (go-yaml v3) reads a folded scalar (`>-`) with more-indented lines with one extra
//!   line break before each of them, so the CEL expressions of the ValidatingAdmissionPolicy
//!   differ in whitespace only; that spec is compared with `policies/vap/agent-job-policy.yaml`
//!   itself instead (read by a spec-compliant parser), and with `\n\n` folded back in kustomize's.
//!
//! Needs Go (to build helm once) and kubectl; fails, never skips, without them.

use serde_json::{Value, json};
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::OnceLock,
};

const CHART: &str = "infra/helm/oats";
const CONFIG_PREFIX: &str = "oats-backend-api-config-";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn run(program: &Path, args: &[&str]) -> Output {
    let mut command = Command::new(program);
    command.args(args).current_dir(root());
    // Keep helm away from the user's repositories, plugins and caches.
    let home = Path::new(env!("CARGO_TARGET_TMPDIR")).join("helm-home");
    for (var, dir) in [("HELM_CONFIG_HOME", "config"), ("HELM_CACHE_HOME", "cache"), ("HELM_DATA_HOME", "data")] {
        command.env(var, home.join(dir));
    }
    command.output().unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()))
}

/// The helm binary, built on first use (once per test binary; testenv/helm.sh also locks).
fn helm_bin() -> &'static Path {
    static HELM: OnceLock<PathBuf> = OnceLock::new();
    HELM.get_or_init(|| {
        let out = run(Path::new("testenv/helm.sh"), &[]);
        assert!(
            out.status.success(),
            "testenv/helm.sh could not build helm (needs Go >= 1.26 and the Go module proxy):\n{}",
            text(&out)
        );
        let helm = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
        assert!(helm.is_file(), "testenv/helm.sh printed {helm:?}, which is not a file");
        helm
    })
}

fn helm(args: &[&str]) -> Output {
    run(helm_bin(), args)
}

fn parse(yaml: &str, what: &str) -> Vec<Value> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(yaml).unwrap_or_else(|e| panic!("{what}: not YAML: {e}"));
    docs.into_iter().filter(|d| !d.is_null()).collect()
}

/// `helm template oats infra/helm/oats ARGS...`, parsed.
fn template(args: &[&str]) -> Vec<Value> {
    let mut all = vec!["template", "oats", CHART];
    all.extend_from_slice(args);
    let out = helm(&all);
    assert!(out.status.success(), "helm {}:\n{}", all.join(" "), text(&out));
    parse(&String::from_utf8(out.stdout).unwrap(), &format!("helm {}", all.join(" ")))
}

/// `kubectl kustomize DIR`, parsed.
fn kustomize(dir: &str) -> Vec<Value> {
    let out = run(Path::new("kubectl"), &["kustomize", dir]);
    assert!(out.status.success(), "kubectl kustomize {dir}:\n{}", text(&out));
    parse(&String::from_utf8(out.stdout).unwrap(), &format!("kubectl kustomize {dir}"))
}

fn key(doc: &Value) -> String {
    let meta = &doc["metadata"];
    format!(
        "{}/{}/{}",
        doc["kind"].as_str().unwrap_or("?"),
        meta["namespace"].as_str().unwrap_or(""),
        meta["name"].as_str().unwrap_or("?")
    )
}

fn by_key(docs: &[Value]) -> BTreeMap<String, Value> {
    let mut map = BTreeMap::new();
    for doc in docs {
        assert!(map.insert(key(doc), doc.clone()).is_none(), "{} is rendered twice", key(doc));
    }
    map
}

fn is_config_name(s: &str) -> bool {
    s.strip_prefix(CONFIG_PREFIX)
        .is_some_and(|hash| hash.len() == 10 && hash.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()))
}

/// Replace the generated ConfigMap's hash (its name and every reference to it) by `<hash>`.
fn normalise_config_hash(value: &mut Value) {
    match value {
        Value::String(s) if is_config_name(s) => *s = format!("{CONFIG_PREFIX}<hash>"),
        Value::Array(items) => items.iter_mut().for_each(normalise_config_hash),
        Value::Object(map) => map.values_mut().for_each(normalise_config_hash),
        _ => {}
    }
}

/// The chart's `app.kubernetes.io/managed-by: Helm` is the base's `kustomize`.
fn normalise_managed_by(value: &mut Value) {
    match value {
        Value::Array(items) => items.iter_mut().for_each(normalise_managed_by),
        Value::Object(map) => {
            if let Some(Value::Object(labels)) = map.get_mut("labels")
                && let Some(v) = labels.get_mut("app.kubernetes.io/managed-by")
            {
                assert_eq!(v, "Helm", "the chart's managed-by label");
                *v = json!("kustomize");
            }
            map.values_mut().for_each(normalise_managed_by);
        }
        _ => {}
    }
}

/// kustomize's extra line breaks in folded scalars (see the module docs): `\n\n` -> `\n`.
fn unfold_kustomize_artefact(value: &mut Value) {
    match value {
        Value::String(s) => {
            while s.contains("\n\n") {
                *s = s.replace("\n\n", "\n");
            }
        }
        Value::Array(items) => items.iter_mut().for_each(unfold_kustomize_artefact),
        Value::Object(map) => map.values_mut().for_each(unfold_kustomize_artefact),
        _ => {}
    }
}

const VAP: &str = "ValidatingAdmissionPolicy//oats-agent-job-guardrails";
const PROVIDERS: &str = "ConfigMap/oats/oats-llm-providers";

/// The providers file of ConfigMap oats-llm-providers, parsed (see the module docs).
fn parse_providers_file(doc: &mut Value) {
    if key(doc) == PROVIDERS {
        let data = &mut doc["data"]["providers.yaml"];
        let text = data.as_str().expect("data.providers.yaml").to_owned();
        *data = serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("providers.yaml: {e}"));
    }
}

fn helm_objects(args: &[&str]) -> BTreeMap<String, Value> {
    let mut docs = template(args);
    for doc in &mut docs {
        normalise_config_hash(doc);
        normalise_managed_by(doc);
        parse_providers_file(doc);
    }
    by_key(&docs)
}

fn kustomize_objects(dir: &str) -> BTreeMap<String, Value> {
    let mut docs = kustomize(dir);
    for doc in &mut docs {
        normalise_config_hash(doc);
        parse_providers_file(doc);
        if key(doc) == VAP {
            unfold_kustomize_artefact(doc);
        }
    }
    by_key(&docs)
}

/// Paths where two values differ (at most a few per object).
fn diff(path: &str, a: &Value, b: &Value, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for k in x.keys().chain(y.keys().filter(|k| !x.contains_key(*k))) {
                let p = format!("{path}.{k}");
                match (x.get(k), y.get(k)) {
                    (Some(va), Some(vb)) => diff(&p, va, vb, out),
                    (va, vb) => out.push(format!("{p}: {va:?} != {vb:?}")),
                }
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (va, vb)) in x.iter().zip(y).enumerate() {
                diff(&format!("{path}[{i}]"), va, vb, out);
            }
        }
        _ if a != b => out.push(format!("{path}: {a} != {b}")),
        _ => {}
    }
}

/// Same keys, and equal objects; the message lists every difference.
fn assert_same_objects(expected: &BTreeMap<String, Value>, actual: &BTreeMap<String, Value>, what: &str) {
    let mut problems = Vec::new();
    for k in expected.keys().filter(|k| !actual.contains_key(*k)) {
        problems.push(format!("missing from the chart: {k}"));
    }
    for k in actual.keys().filter(|k| !expected.contains_key(*k)) {
        problems.push(format!("only in the chart: {k}"));
    }
    for (k, e) in expected {
        if let Some(a) = actual.get(k) {
            let mut d = Vec::new();
            diff("", e, a, &mut d);
            problems.extend(d.into_iter().map(|d| format!("{k}: {d}  (expected != chart)")));
        }
    }
    assert!(problems.is_empty(), "{what}:\n  {}", problems.join("\n  "));
}

fn get<'a>(objects: &'a BTreeMap<String, Value>, key: &str) -> &'a Value {
    objects.get(key).unwrap_or_else(|| panic!("{key} is not rendered; rendered: {:?}", objects.keys()))
}

fn config_data(docs: &[Value]) -> (String, serde_json::Map<String, Value>) {
    let config: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"].as_str().is_some_and(is_config_name))
        .collect();
    assert_eq!(config.len(), 1, "exactly one {CONFIG_PREFIX}<hash> ConfigMap");
    let name = config[0]["metadata"]["name"].as_str().unwrap().to_owned();
    (name, config[0]["data"].as_object().cloned().unwrap_or_default())
}

fn deployment(docs: &[Value]) -> &Value {
    docs.iter().find(|d| d["kind"] == "Deployment" && d["metadata"]["name"] == "oats-backend-api").expect("Deployment")
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

// ---------------------------------------------------------------------------------------------

#[test]
fn chart_metadata() {
    let chart: Value = serde_saphyr::from_str(&read(&format!("{CHART}/Chart.yaml"))).unwrap();
    assert_eq!(chart["apiVersion"], "v2");
    assert_eq!(chart["name"], "oats");
    assert_eq!(chart["version"], "0.1.0");
    assert_eq!(chart["appVersion"], "0.1.0");
}

#[test]
fn lint_passes() {
    for args in [
        vec![],
        vec!["-f", "infra/helm/oats/values-dev.yaml"],
        vec!["-f", "infra/helm/oats/values-prod.yaml"],
        vec![
            "--set-file",
            "policy.content=policies/oats-policy.yaml",
            "--set",
            "auth.tokensSecret.name=team-tokens,auth.tokensSecret.create=false",
            "--set",
            "otel.endpoint=http://otel-collector.observability:4318",
            "--set",
            "monitoring.serviceMonitor.enabled=true,monitoring.prometheusRule.enabled=true",
        ],
        vec!["--set", "policy.enabled=false,auth.tokensSecret.name="],
        vec!["--set", "llm.enabled=false,database.urlSecret.name=,agents.allowPublicHttps=true"],
        vec!["--set", "database.devPostgres.enabled=true,llm.providerKeysSecret.create=false,llm.port=9001"],
    ] {
        let mut all = vec!["lint", "--strict", CHART];
        all.extend_from_slice(&args);
        let out = helm(&all);
        let output = text(&out);
        assert!(out.status.success(), "helm {} failed:\n{output}", all.join(" "));
        assert!(!output.contains("[ERROR]") && !output.contains("[WARNING]"), "helm {}:\n{output}", all.join(" "));
        assert!(output.contains("0 chart(s) failed"), "helm {}:\n{output}", all.join(" "));
    }
}

/// files/ holds verbatim copies of what the chart cannot reach outside its directory.
#[test]
fn chart_copies_are_verbatim() {
    for (copy, source) in [
        ("files/agent-job-policy.yaml", "policies/vap/agent-job-policy.yaml"),
        ("files/prometheusrule.yaml", "infra/monitoring/prometheusrule.yaml"),
        ("files/oats-policy.yaml", "policies/oats-policy.yaml"),
    ] {
        assert!(
            read(&format!("{CHART}/{copy}")) == read(source),
            "{CHART}/{copy} is out of date: cp {source} {CHART}/{copy}"
        );
    }
}

#[test]
fn default_values_render_infra_base() {
    let chart = helm_objects(&[]);
    assert_same_objects(
        &kustomize_objects("infra/base"),
        &chart,
        "helm template (default values) vs kubectl kustomize infra/base",
    );

    // The admission policy, against its source file read by a spec-compliant YAML parser.
    let source: Value = serde_saphyr::from_str(&read("policies/vap/agent-job-policy.yaml")).unwrap();
    let mut d = Vec::new();
    diff("spec", &source["spec"], &get(&chart, VAP)["spec"], &mut d);
    assert!(d.is_empty(), "{VAP} vs policies/vap/agent-job-policy.yaml:\n  {}", d.join("\n  "));

    // Authentication and the shipped policy are on by default (as in the base); tracing is not.
    let docs = template(&[]);
    let (_, data) = config_data(&docs);
    assert_eq!(data["OATS_AUTH_TOKENS_FILE"], "/etc/oats/auth/tokens.yaml");
    assert_eq!(data["OATS_POLICY_FILE"], "/etc/oats/policy/oats-policy.yaml");
    assert!(!data.contains_key("OTEL_EXPORTER_OTLP_ENDPOINT"), "OTEL_EXPORTER_OTLP_ENDPOINT is set by default");
}

#[test]
fn dev_and_prod_values_render_the_overlays() {
    let dev = helm_objects(&["-f", "infra/helm/oats/values-dev.yaml"]);
    assert_same_objects(&kustomize_objects("infra/overlays/dev"), &dev, "values-dev.yaml vs infra/overlays/dev");

    // The prod overlay also ships the Grafana dashboards (infra/monitoring -> dashboards/), which
    // the chart does not.
    let mut prod_overlay = kustomize_objects("infra/overlays/prod");
    let dashboards: Vec<String> = prod_overlay
        .iter()
        .filter(|(_, d)| d["kind"] == "ConfigMap" && d["metadata"]["labels"]["grafana_dashboard"] == "1")
        .map(|(k, _)| k.clone())
        .collect();
    assert!(!dashboards.is_empty(), "the prod overlay has dashboard ConfigMaps");
    for k in &dashboards {
        prod_overlay.remove(k);
    }
    let prod = helm_objects(&["-f", "infra/helm/oats/values-prod.yaml"]);
    assert_same_objects(&prod_overlay, &prod, "values-prod.yaml vs infra/overlays/prod (without dashboards)");
}

#[test]
fn monitoring_toggles_render_infra_monitoring() {
    let monitoring = kustomize_objects("infra/monitoring");
    let default = helm_objects(&[]);
    let both =
        helm_objects(&["--set", "monitoring.serviceMonitor.enabled=true,monitoring.prometheusRule.enabled=true"]);
    let mut expected = default.clone();
    for k in ["ServiceMonitor/oats/oats-backend-api", "PrometheusRule/oats/oats-backend-api"] {
        assert!(!default.contains_key(k), "{k} is rendered by default");
        expected.insert(k.to_owned(), get(&monitoring, k).clone());
    }
    assert_same_objects(&expected, &both, "monitoring on vs infra/base + infra/monitoring");

    let only_rules = helm_objects(&["--set", "monitoring.prometheusRule.enabled=true"]);
    assert!(only_rules.contains_key("PrometheusRule/oats/oats-backend-api"));
    assert!(!only_rules.contains_key("ServiceMonitor/oats/oats-backend-api"));

    // The release label follows monitoring.labels (Prometheus' serviceMonitorSelector/ruleSelector).
    let relabelled = helm_objects(&["--set", "monitoring.serviceMonitor.enabled=true,monitoring.labels.release=prom"]);
    assert_eq!(get(&relabelled, "ServiceMonitor/oats/oats-backend-api")["metadata"]["labels"]["release"], "prom");
}

/// The Deployment's read-only mounts (policy, tokens, providers file, provider keys, database URL):
/// (volume, mountPath, source) each, as `volumeMounts` entries (read-only, no subPath) and `volumes`
/// sources; panics on a mismatch. The two writable emptyDirs (/tmp, the state directory) are
/// always there.
fn assert_mounts(docs: &[Value], expected: &[(&str, &str, Value)]) {
    let pod = &deployment(docs)["spec"]["template"]["spec"];
    let mounts = pod["containers"][0]["volumeMounts"].as_array().unwrap();
    let volumes = pod["volumes"].as_array().unwrap();
    let scratch = ["tmp", "state"];
    let names: Vec<&str> = mounts.iter().filter_map(|m| m["name"].as_str()).filter(|n| !scratch.contains(n)).collect();
    let wanted: Vec<&str> = expected.iter().map(|(v, _, _)| *v).collect();
    assert_eq!(names, wanted, "mounts besides /tmp and the state directory");
    assert_eq!(volumes.len(), expected.len() + scratch.len(), "volumes: {volumes:?}");
    for name in scratch {
        let volume = volumes.iter().find(|v| v["name"] == name).unwrap_or_else(|| panic!("no volume {name}"));
        assert!(volume["emptyDir"].is_object(), "{volume}");
    }
    for (volume, dir, source) in expected {
        // Directories, no subPath: kubelet updates reach the files, which OATS reloads.
        let mount = mounts.iter().find(|m| m["name"] == *volume).unwrap_or_else(|| panic!("no mount {volume}"));
        assert_eq!(mount, &json!({"name": volume, "mountPath": dir, "readOnly": true}));
        let mut expected = source.clone();
        expected["name"] = json!(volume);
        assert!(volumes.contains(&expected), "volume {volume}: {volumes:?}");
    }
}

/// The default mounts of the providers file, the provider keys and the database URL (as infra/base).
fn gateway_and_store_mounts() -> [(&'static str, &'static str, Value); 3] {
    [
        ("llm-providers", "/etc/oats/llm", json!({"configMap": {"name": "oats-llm-providers"}})),
        (
            "llm-provider-keys",
            "/var/run/secrets/oats/providers",
            json!({"secret": {"secretName": "oats-llm-provider-keys"}}),
        ),
        ("database", "/var/run/secrets/oats/database", json!({"secret": {"secretName": "oats-database"}})),
    ]
}

/// `first`, then the default gateway and store mounts.
fn with_gateway_and_store(first: Vec<(&'static str, &'static str, Value)>) -> Vec<(&'static str, &'static str, Value)> {
    first.into_iter().chain(gateway_and_store_mounts()).collect()
}

#[test]
fn policy_tokens_and_otlp_values() {
    // Defaults: the shipped policy and a placeholder tokens Secret, mounted (as infra/base).
    let default_docs = template(&[]);
    let (default_name, default_data) = config_data(&default_docs);
    let env = default_data.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()));
    let config = oats::config::Config::load(None, env).expect("the chart's configuration loads");
    assert_eq!(config.policy_file.as_deref(), Some(Path::new("/etc/oats/policy/oats-policy.yaml")));
    assert_eq!(config.auth_tokens_file.as_deref(), Some(Path::new("/etc/oats/auth/tokens.yaml")));
    assert_mounts(
        &default_docs,
        &with_gateway_and_store(vec![
            ("policy", "/etc/oats/policy", json!({"configMap": {"name": "oats-backend-api-policy"}})),
            ("auth-tokens", "/etc/oats/auth", json!({"secret": {"secretName": "oats-api-tokens"}})),
        ]),
    );
    let dir = tempfile::tempdir().unwrap();
    // The policy ConfigMap is the chart's copy of policies/oats-policy.yaml, and OATS loads it.
    let policy = default_docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == "oats-backend-api-policy")
        .expect("ConfigMap oats-backend-api-policy");
    assert_eq!(policy["metadata"]["namespace"], "oats");
    let content = policy["data"]["oats-policy.yaml"].as_str().expect("data.oats-policy.yaml");
    assert_eq!(content, read("policies/oats-policy.yaml"));
    std::fs::write(dir.path().join("oats-policy.yaml"), content).unwrap();
    oats::jobs::policy::Policy::load(&dir.path().join("oats-policy.yaml")).expect("OATS loads the rendered policy");
    // The tokens placeholder is a tokens file OATS loads and that lets nobody in.
    let secret = default_docs
        .iter()
        .find(|d| d["kind"] == "Secret" && d["metadata"]["name"] == "oats-api-tokens")
        .expect("Secret oats-api-tokens");
    let tokens = secret["stringData"]["tokens.yaml"].as_str().expect("stringData.tokens.yaml");
    std::fs::write(dir.path().join("tokens.yaml"), tokens).unwrap();
    let store = oats::auth::TokenStore::load(&dir.path().join("tokens.yaml")).expect("OATS loads the placeholder");
    assert!(store.lookup("").is_none() && store.lookup("REPLACE_ME").is_none());

    // Another policy, an existing tokens Secret elsewhere, and tracing.
    let custom_policy = "defaults:\n  max_turns: 5\n";
    std::fs::write(dir.path().join("custom-policy.yaml"), custom_policy).unwrap();
    let docs = template(&[
        "--set-file",
        &format!("policy.content={}", dir.path().join("custom-policy.yaml").display()),
        "--set",
        "policy.mountPath=/etc/oats/limits",
        "--set",
        "auth.tokensSecret.name=team-tokens,auth.tokensSecret.create=false",
        "--set",
        "auth.tokensSecret.key=api-tokens.yaml,auth.tokensSecret.mountPath=/var/run/oats-auth",
        "--set",
        "otel.endpoint=http://otel-collector.observability:4318,otel.protocol=grpc",
    ]);

    // The API's configuration: the base's keys with the moved files, plus the OTLP endpoint.
    let (name, data) = config_data(&docs);
    assert_ne!(name, default_name, "a configuration change must change the ConfigMap's name (rolls the Deployment)");
    let mut expected = default_data.clone();
    expected.insert("OATS_POLICY_FILE".into(), json!("/etc/oats/limits/oats-policy.yaml"));
    expected.insert("OATS_AUTH_TOKENS_FILE".into(), json!("/var/run/oats-auth/api-tokens.yaml"));
    expected.insert("OTEL_EXPORTER_OTLP_ENDPOINT".into(), json!("http://otel-collector.observability:4318"));
    expected.insert("OTEL_EXPORTER_OTLP_PROTOCOL".into(), json!("grpc"));
    assert_eq!(data, expected);

    // OATS itself reads that environment as intended (unknown OATS_* keys would be ignored).
    let known: Vec<String> =
        oats::config::Config::keys().into_iter().map(|(k, _, _)| format!("OATS_{}", k.to_ascii_uppercase())).collect();
    for k in data.keys().filter(|k| k.starts_with("OATS_")) {
        assert!(known.contains(k), "{k} is not an OATS setting (README.md, Configuration)");
    }
    let env = data.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()));
    let config = oats::config::Config::load(None, env).expect("the chart's configuration loads");
    assert_eq!(config.policy_file.as_deref(), Some(Path::new("/etc/oats/limits/oats-policy.yaml")));
    assert_eq!(config.auth_tokens_file.as_deref(), Some(Path::new("/var/run/oats-auth/api-tokens.yaml")));

    // The policy ConfigMap holds the file as given.
    let policy = docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == "oats-backend-api-policy")
        .expect("ConfigMap oats-backend-api-policy");
    assert_eq!(policy["data"]["oats-policy.yaml"], custom_policy);

    // The Deployment loads the new ConfigMap and mounts the existing Secret; none is rendered.
    assert_eq!(
        deployment(&docs)["spec"]["template"]["spec"]["containers"][0]["envFrom"][0]["configMapRef"]["name"],
        name.as_str()
    );
    assert_mounts(
        &docs,
        &with_gateway_and_store(vec![
            ("policy", "/etc/oats/limits", json!({"configMap": {"name": "oats-backend-api-policy"}})),
            ("auth-tokens", "/var/run/oats-auth", json!({"secret": {"secretName": "team-tokens"}})),
        ]),
    );
    let placeholders = ["oats-llm-provider-keys", "oats-database"];
    assert!(
        docs.iter().all(|d| d["kind"] != "Secret" || placeholders.contains(&d["metadata"]["name"].as_str().unwrap())),
        "a tokens Secret is rendered"
    );

    // Everything else is the default render.
    let mut changed = by_key(&docs);
    let mut default = by_key(&default_docs);
    for objects in [&mut changed, &mut default] {
        objects.retain(|k, _| {
            !k.starts_with("Deployment/")
                && !k.starts_with("ConfigMap/oats/oats-backend-api-")
                && k != "Secret/oats/oats-api-tokens"
        });
    }
    assert_same_objects(&default, &changed, "objects other than the Deployment, its ConfigMaps and the tokens Secret");

    // A policy given as a YAML mapping is rendered as that YAML.
    let source: Value = serde_saphyr::from_str(&read("policies/oats-policy.yaml")).unwrap();
    let values = dir.path().join("values.json");
    std::fs::write(&values, serde_json::to_string(&json!({"policy": {"content": source}})).unwrap()).unwrap();
    let docs = template(&["-f", values.to_str().unwrap()]);
    let policy = docs.iter().find(|d| d["metadata"]["name"] == "oats-backend-api-policy").expect("policy ConfigMap");
    let mut rendered: Value = serde_saphyr::from_str(policy["data"]["oats-policy.yaml"].as_str().unwrap()).unwrap();
    // toYaml writes 2.0 as 2: the same number to OATS, another Value to serde_json.
    let mut source = source;
    numbers_as_floats(&mut rendered);
    numbers_as_floats(&mut source);
    assert_eq!(rendered, source);
}

/// Every number as an f64, so that `2` and `2.0` compare equal.
fn numbers_as_floats(value: &mut Value) {
    match value {
        Value::Number(n) => *value = json!(n.as_f64().unwrap()),
        Value::Array(items) => items.iter_mut().for_each(numbers_as_floats),
        Value::Object(map) => map.values_mut().for_each(numbers_as_floats),
        _ => {}
    }
}

/// Both can be turned off (authentication off is the laptop default, not a deployment).
#[test]
fn policy_and_tokens_can_be_disabled() {
    // The policy value is a mapping; a file given the old way is refused with a hint.
    let out = helm(&["template", "oats", CHART, "--set-file", "policy=policies/oats-policy.yaml"]);
    assert!(!out.status.success() && text(&out).contains("policy.content"), "{}", text(&out));

    let docs = template(&["--set", "policy.enabled=false,auth.tokensSecret.name="]);
    let (_, data) = config_data(&docs);
    for absent in ["OATS_POLICY_FILE", "OATS_AUTH_TOKENS_FILE"] {
        assert!(!data.contains_key(absent), "{absent} is set");
    }
    assert_mounts(&docs, &gateway_and_store_mounts());
    assert!(docs.iter().all(|d| d["metadata"]["name"] != "oats-backend-api-policy"));
    assert!(docs.iter().all(|d| d["metadata"]["name"] != "oats-api-tokens"));

    // An existing Secret: mounted, not rendered (values-prod.yaml does this).
    let docs = template(&["--set", "auth.tokensSecret.create=false"]);
    assert!(docs.iter().all(|d| d["metadata"]["name"] != "oats-api-tokens"), "the Secret is rendered");
    assert_eq!(config_data(&docs).1["OATS_AUTH_TOKENS_FILE"], "/etc/oats/auth/tokens.yaml");
    assert_mounts(
        &docs,
        &with_gateway_and_store(vec![
            ("policy", "/etc/oats/policy", json!({"configMap": {"name": "oats-backend-api-policy"}})),
            ("auth-tokens", "/etc/oats/auth", json!({"secret": {"secretName": "oats-api-tokens"}})),
        ]),
    );
}

#[test]
fn namespace_and_image_values() {
    let digest = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    let docs = template(&[
        "--set",
        "namespace=oats-staging,image.repository=registry.example.com/oats/oats-backend-api,image.tag=1.2.3",
        "--set",
        &format!("image.digest={digest},image.pullPolicy=Always"),
        "--set",
        "agent.image.repository=registry.example.com/oats/oats-agent,agent.image.tag=1.2.3,agent.image.pullPolicy=Always",
        "--set",
        "replicaCount=4,resources.limits.cpu=2",
    ]);
    let objects = by_key(&docs);
    for doc in &docs {
        let cluster_scoped = ["Namespace", "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"];
        if !cluster_scoped.contains(&doc["kind"].as_str().unwrap()) {
            assert_eq!(doc["metadata"]["namespace"], "oats-staging", "{}", key(doc));
        }
    }
    assert!(objects.contains_key("Namespace//oats-staging"));
    let binding = get(&objects, "RoleBinding/oats-staging/oats-backend-api-job-manager");
    assert_eq!(binding["subjects"][0]["namespace"], "oats-staging");
    let vapb = get(&objects, "ValidatingAdmissionPolicyBinding//oats-agent-job-guardrails");
    assert_eq!(vapb["spec"]["paramRef"]["namespace"], "oats-staging");
    assert_eq!(
        vapb["spec"]["matchResources"]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
        "oats-staging"
    );

    let deploy = deployment(&docs);
    assert_eq!(deploy["spec"]["replicas"], 4);
    let container = &deploy["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["image"], format!("registry.example.com/oats/oats-backend-api:1.2.3@{digest}"));
    assert_eq!(container["imagePullPolicy"], "Always");
    assert_eq!(container["resources"]["limits"]["cpu"], 2);
    let (_, data) = config_data(&docs);
    assert_eq!(data["OATS_AGENT_IMAGE"], "registry.example.com/oats/oats-agent:1.2.3");
    assert_eq!(data["OATS_AGENT_IMAGE_PULL_POLICY"], "Always");

    // namespace "" = the release namespace; createNamespace=false leaves the Namespace out.
    let docs = template(&["--namespace", "team-a", "--set", "namespace=,createNamespace=false"]);
    assert!(docs.iter().all(|d| d["kind"] != "Namespace"));
    assert_eq!(deployment(&docs)["metadata"]["namespace"], "team-a");
}

#[test]
fn agent_image_outside_the_admission_policy_is_refused() {
    let out = helm(&["template", "oats", CHART, "--set", "agent.image.repository=evil.example/agent"]);
    assert!(!out.status.success(), "an agent image every Job of which would be denied must not render");
    let message = text(&out);
    assert!(message.contains("allowedImagePrefixes") && message.contains("evil.example/agent:0.1.0"), "{message}");

    // Without the admission policy there is nothing to contradict.
    let docs = template(&["--set", "agent.image.repository=evil.example/agent,admissionPolicy.enabled=false"]);
    assert!(docs.iter().all(|d| !d["kind"].as_str().unwrap().starts_with("ValidatingAdmissionPolicy")));
    assert!(docs.iter().all(|d| d["metadata"]["name"] != "oats-agent-job-guardrails-params"));
}

/// The admission policy's parameters.
fn guardrail_params(docs: &[Value]) -> &serde_json::Map<String, Value> {
    find(docs, "ConfigMap", "oats-agent-job-guardrails-params").expect("the policy's parameters")["data"]
        .as_object()
        .unwrap()
}

#[test]
fn the_agents_secret_is_an_opt_in_and_the_policy_parameters_follow_the_values() {
    // Defaults (as infra/base): agents get no Secret, and the policy admits none.
    let docs = template(&[]);
    let (_, data) = config_data(&docs);
    for key in ["OATS_LLM_SECRET_NAME", "OATS_LLM_SECRET_KEYS", "OATS_AGENT_COMMAND"] {
        assert!(!data.contains_key(key), "{key} is set by default");
    }
    assert!(
        docs.iter().all(|d| d["kind"] != "Secret" || d["metadata"]["labels"]["app.kubernetes.io/component"] != "agent")
    );
    let params = guardrail_params(&docs);
    assert_eq!(
        (&params["llmSecretName"], &params["agentCommand"], &params["allowedEgress"]),
        (&json!(""), &json!(""), &json!(""))
    );

    // The opt-in: the two variables, the placeholder, and the parameter that admits its volume.
    let docs = template(&[
        "--set",
        "llmSecret.name=team-llm,llmSecret.keys={api-key,org},llmSecret.create=true",
        "--set",
        "agent.command={/app/agent,--quiet}",
        "--set",
        "admissionPolicy.allowedEgress={public-https},admissionPolicy.allowedTolerationKeys={gpu,spot}",
        "--set",
        "admissionPolicy.allowNodeName=true",
    ]);
    let (_, data) = config_data(&docs);
    assert_eq!(data["OATS_LLM_SECRET_NAME"], "team-llm");
    assert_eq!(data["OATS_LLM_SECRET_KEYS"], "api-key,org");
    assert_eq!(data["OATS_AGENT_COMMAND"], "/app/agent,--quiet");
    let secret = find(&docs, "Secret", "team-llm").expect("the placeholder Secret");
    assert_eq!(secret["stringData"], json!({"api-key": "REPLACE_ME", "org": "REPLACE_ME"}));
    let params = guardrail_params(&docs);
    assert_eq!(params["llmSecretName"], "team-llm");
    assert_eq!(params["agentCommand"], "/app/agent,--quiet");
    assert_eq!(params["allowedEgress"], "public-https");
    assert_eq!(params["allowedTolerationKeys"], "gpu,spot");
    assert_eq!(params["allowNodeName"], "true");
    // OATS loads that configuration and renders the volume the parameters name.
    let env: BTreeMap<String, String> = data.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned())).collect();
    let config = oats::config::Config::load(None, env).unwrap();
    assert_eq!(config.llm_secret_name.as_deref(), Some("team-llm"));
    assert_eq!(config.agent_command, ["/app/agent", "--quiet"]);

    // Without create, no placeholder; a name without keys does not render.
    let docs = template(&["--set", "llmSecret.name=team-llm,llmSecret.keys={api-key}"]);
    assert!(find(&docs, "Secret", "team-llm").is_none());
    let out = helm(&["template", "oats", CHART, "--set", "llmSecret.name=team-llm"]);
    assert!(!out.status.success() && text(&out).contains("llmSecret.keys"), "{}", text(&out));
}

// ---------------------------------------------------------------------------------------------
// LLM gateway, store and the network opt-ins
// ---------------------------------------------------------------------------------------------

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> Option<&'a Value> {
    docs.iter().find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
}

fn network_policy<'a>(docs: &'a [Value], name: &str) -> &'a Value {
    find(docs, "NetworkPolicy", name).unwrap_or_else(|| panic!("NetworkPolicy {name} is not rendered"))
}

/// The providers file loads in OATS (key files moved to where a test can write them).
fn assert_providers_load(text: &str) {
    let mut file: Value = serde_saphyr::from_str(text).unwrap_or_else(|e| panic!("providers file: {e}"));
    let dir = tempfile::tempdir().unwrap();
    for (i, provider) in file["providers"].clone().as_array().expect("providers").iter().enumerate() {
        if provider["api_key_file"].is_string() {
            let key = dir.path().join(format!("key-{i}"));
            std::fs::write(&key, "REPLACE_ME\n").unwrap();
            file["providers"][i]["api_key_file"] = json!(key.to_str().unwrap());
        }
    }
    let path = dir.path().join("providers.yaml");
    std::fs::write(&path, serde_saphyr::to_string(&file).unwrap()).unwrap();
    let catalog = oats::llm::Catalog::load(&path).unwrap_or_else(|e| panic!("OATS refuses the providers file: {e}"));
    assert!(!catalog.is_empty());
}

fn container_port_names(docs: &[Value]) -> Vec<String> {
    deployment(docs)["spec"]["template"]["spec"]["containers"][0]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn llm_gateway_values() {
    // Defaults (as infra/base): the gateway on, with the example provider of llm-providers.yaml.
    let docs = template(&[]);
    let (_, data) = config_data(&docs);
    assert_eq!(data["OATS_LLM_PROVIDERS_FILE"], "/etc/oats/llm/providers.yaml");
    assert_eq!(data["OATS_LLM_LISTEN"], "0.0.0.0:8001");
    assert_eq!(data["OATS_LLM_GATEWAY_URL"], "http://oats-llm-gateway.oats.svc:8001/v1");
    let shipped =
        find(&docs, "ConfigMap", "oats-llm-providers").expect("ConfigMap oats-llm-providers")["data"]["providers.yaml"]
            .as_str()
            .unwrap()
            .to_owned();
    let source: Value = serde_saphyr::from_str(&read("infra/base/llm-providers.yaml")).unwrap();
    assert_eq!(
        serde_saphyr::from_str::<Value>(&shipped).unwrap(),
        source,
        "llm.providers vs infra/base/llm-providers.yaml"
    );
    assert_providers_load(&shipped);
    assert!(find(&docs, "Secret", "oats-llm-provider-keys").is_some());

    // A providers file given as a file, another port and namespace, an existing keys Secret.
    let dir = tempfile::tempdir().unwrap();
    let providers = "# in-cluster only\nproviders:\n  - name: vllm\n    base_url: http://vllm.vllm.svc:8000/v1\n    models:\n      - {name: llama, input_per_million_usd: 0, output_per_million_usd: 0}\n";
    std::fs::write(dir.path().join("providers.yaml"), providers).unwrap();
    let docs = template(&[
        "--set-file",
        &format!("llm.providers={}", dir.path().join("providers.yaml").display()),
        "--set",
        "llm.port=9001,namespace=oats-staging,llm.providerKeysSecret.create=false",
    ]);
    let rendered = find(&docs, "ConfigMap", "oats-llm-providers").unwrap();
    assert_eq!(rendered["data"]["providers.yaml"], providers, "a string is rendered verbatim");
    assert_providers_load(providers);
    let (_, data) = config_data(&docs);
    assert_eq!(data["OATS_LLM_LISTEN"], "0.0.0.0:9001");
    assert_eq!(data["OATS_LLM_GATEWAY_URL"], "http://oats-llm-gateway.oats-staging.svc:9001/v1");
    let env = data.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()));
    let config = oats::config::Config::load(None, env).expect("the chart's configuration loads");
    assert_eq!(config.llm_listen.port(), 9001);
    let service = find(&docs, "Service", "oats-llm-gateway").expect("Service oats-llm-gateway");
    assert_eq!(
        service["spec"]["ports"],
        json!([{"name": "llm", "port": 9001, "targetPort": "llm", "protocol": "TCP"}])
    );
    assert_eq!(service["spec"]["selector"], json!({"app": "oats-backend-api"}));
    let ports = &deployment(&docs)["spec"]["template"]["spec"]["containers"][0]["ports"];
    assert!(ports.as_array().unwrap().contains(&json!({"name": "llm", "containerPort": 9001, "protocol": "TCP"})));
    let agent = network_policy(&docs, "oats-agent");
    assert_eq!(agent["spec"]["egress"][1]["ports"], json!([{"protocol": "TCP", "port": 9001}]));
    let api = network_policy(&docs, "oats-backend-api");
    assert_eq!(
        api["spec"]["ingress"][2],
        json!({"from": [{"podSelector": {"matchLabels": {"app": "oats-agent"}}}], "ports": [{"protocol": "TCP", "port": 9001}]})
    );
    assert!(find(&docs, "Secret", "oats-llm-provider-keys").is_none(), "create=false renders no Secret");
    assert_mounts(
        &docs,
        &with_gateway_and_store(vec![
            ("policy", "/etc/oats/policy", json!({"configMap": {"name": "oats-backend-api-policy"}})),
            ("auth-tokens", "/etc/oats/auth", json!({"secret": {"secretName": "oats-api-tokens"}})),
        ]),
    );

    // Off: no gateway, no port, no providers or keys, and agents keep DNS only.
    let docs = template(&["--set", "llm.enabled=false"]);
    for (kind, name) in
        [("ConfigMap", "oats-llm-providers"), ("Secret", "oats-llm-provider-keys"), ("Service", "oats-llm-gateway")]
    {
        assert!(find(&docs, kind, name).is_none(), "{kind} {name} is rendered with llm.enabled=false");
    }
    let (_, data) = config_data(&docs);
    for absent in ["OATS_LLM_PROVIDERS_FILE", "OATS_LLM_LISTEN", "OATS_LLM_GATEWAY_URL"] {
        assert!(!data.contains_key(absent), "{absent} is set with llm.enabled=false");
    }
    assert_eq!(container_port_names(&docs), ["http", "metrics"]);
    assert_mounts(
        &docs,
        &[
            ("policy", "/etc/oats/policy", json!({"configMap": {"name": "oats-backend-api-policy"}})),
            ("auth-tokens", "/etc/oats/auth", json!({"secret": {"secretName": "oats-api-tokens"}})),
            ("database", "/var/run/secrets/oats/database", json!({"secret": {"secretName": "oats-database"}})),
        ],
    );
    assert_eq!(network_policy(&docs, "oats-agent")["spec"]["egress"].as_array().unwrap().len(), 1, "DNS only");
    let ingress = network_policy(&docs, "oats-backend-api")["spec"]["ingress"].as_array().unwrap().clone();
    assert_eq!(ingress.len(), 2, "no gateway port: {ingress:?}");

    // The gateway needs a providers file.
    let out = helm(&["template", "oats", CHART, "--set", "llm.providers=null"]);
    assert!(!out.status.success() && text(&out).contains("llm.providers"), "{}", text(&out));
}

#[test]
fn database_values() {
    // Defaults (as infra/base): a placeholder URL, mounted; egress to the oats-postgres pods.
    let docs = template(&[]);
    let secret = find(&docs, "Secret", "oats-database").expect("Secret oats-database");
    assert_eq!(secret["stringData"]["url"], "postgres://oats:REPLACE_ME@oats-postgres:5432/oats");
    assert_eq!(config_data(&docs).1["OATS_DATABASE_URL_FILE"], "/var/run/secrets/oats/database/url");
    assert!(find(&docs, "StatefulSet", "oats-postgres").is_none(), "the dev PostgreSQL is off by default");
    let egress = network_policy(&docs, "oats-backend-api")["spec"]["egress"].as_array().unwrap().clone();
    assert_eq!(
        egress.last().unwrap(),
        &json!({"to": [{"podSelector": {"matchLabels": {"app": "oats-postgres"}}}], "ports": [{"protocol": "TCP", "port": 5432}]})
    );

    // The dev PostgreSQL: its objects, and the URL Secret holds its URL and password.
    let docs = template(&["--set", "database.devPostgres.enabled=true,database.devPostgres.password=s3cret-dev"]);
    for (kind, name) in
        [("StatefulSet", "oats-postgres"), ("Service", "oats-postgres"), ("NetworkPolicy", "oats-postgres")]
    {
        assert!(find(&docs, kind, name).is_some(), "{kind} {name} is not rendered");
    }
    assert_eq!(find(&docs, "Secret", "oats-postgres").unwrap()["stringData"]["password"], "s3cret-dev");
    assert_eq!(
        find(&docs, "Secret", "oats-database").unwrap()["stringData"]["url"],
        "postgres://oats:s3cret-dev@oats-postgres:5432/oats"
    );
    let statefulset = find(&docs, "StatefulSet", "oats-postgres").unwrap();
    let pod_template: k8s_openapi::api::core::v1::PodTemplateSpec =
        serde_json::from_value(statefulset["spec"]["template"].clone()).unwrap();
    let violations = oats::backend::kubernetes::pss::check_restricted(&pod_template);
    assert!(violations.is_empty(), "the chart's dev PostgreSQL fails Pod Security restricted: {violations:#?}");
    // Its NetworkPolicy follows networkPolicy.enabled.
    let docs = template_without_network_policies();
    assert!(docs.iter().all(|d| d["kind"] != "NetworkPolicy"));

    // An external database by address, with an existing Secret.
    let docs = template(&[
        "--set",
        "database.urlSecret.create=false,networkPolicy.database.cidrs={10.20.30.40/32},networkPolicy.database.port=6432",
    ]);
    assert!(find(&docs, "Secret", "oats-database").is_none());
    assert_mounts(
        &docs,
        &with_gateway_and_store(vec![
            ("policy", "/etc/oats/policy", json!({"configMap": {"name": "oats-backend-api-policy"}})),
            ("auth-tokens", "/etc/oats/auth", json!({"secret": {"secretName": "oats-api-tokens"}})),
        ]),
    );
    let egress = network_policy(&docs, "oats-backend-api")["spec"]["egress"].as_array().unwrap().clone();
    assert_eq!(
        egress.last().unwrap(),
        &json!({"to": [{"ipBlock": {"cidr": "10.20.30.40/32"}}], "ports": [{"protocol": "TCP", "port": 6432}]})
    );

    // No database URL: SQLite in the state directory (one replica): no Secret, mount or rule.
    let docs = template(&["--set", "database.urlSecret.name=,stateDir.sizeLimit=1Gi"]);
    let (_, data) = config_data(&docs);
    assert!(!data.contains_key("OATS_DATABASE_URL_FILE"));
    assert_eq!(data["OATS_STATE_DIR"], "/var/lib/oats");
    assert!(find(&docs, "Secret", "oats-database").is_none());
    let pod = &deployment(&docs)["spec"]["template"]["spec"];
    let state = pod["volumes"].as_array().unwrap().iter().find(|v| v["name"] == "state").unwrap();
    assert_eq!(state["emptyDir"]["sizeLimit"], "1Gi");
    let egress = network_policy(&docs, "oats-backend-api")["spec"]["egress"].as_array().unwrap().clone();
    assert!(egress.iter().all(|r| !r["ports"].to_string().contains("5432")), "{egress:?}");
}

fn template_without_network_policies() -> Vec<Value> {
    template(&["--set", "database.devPostgres.enabled=true,networkPolicy.enabled=false"])
}

/// agents.allowPublicHttps, networkPolicy.llmProviders.inCluster and
/// networkPolicy.identityProvider render the NetworkPolicies of the kustomize components
/// (infra/components), and nothing by default.
#[test]
fn network_opt_ins_render_the_kustomize_components() {
    let component = |dir: &str| -> (String, Value) {
        let doc: Value = serde_saphyr::from_str(&read(&format!("infra/components/{dir}/networkpolicy.yaml"))).unwrap();
        (key(&doc), doc)
    };
    let (web_key, web) = component("agents-public-https");
    let (provider_key, provider) = component("llm-in-cluster-provider");
    let (idp_key, idp) = component("oidc-identity-provider");

    let default = helm_objects(&[]);
    assert!(!default.contains_key(&web_key) && !default.contains_key(&provider_key) && !default.contains_key(&idp_key));

    let dir = tempfile::tempdir().unwrap();
    let values = dir.path().join("values.json");
    let in_cluster = json!([{"namespace": "vllm", "podLabels": {"app.kubernetes.io/name": "vllm"}, "ports": [8000]}]);
    let identity_provider =
        json!({"namespace": "keycloak", "podLabels": {"app.kubernetes.io/name": "keycloak"}, "ports": [8443]});
    let opt_in = json!({
        "agents": {"allowPublicHttps": true},
        "networkPolicy": {"llmProviders": {"inCluster": in_cluster}, "identityProvider": identity_provider},
    });
    std::fs::write(&values, serde_json::to_string(&opt_in).unwrap()).unwrap();
    let all = helm_objects(&["-f", values.to_str().unwrap()]);
    let mut expected = default.clone();
    expected.insert(web_key, web);
    expected.insert(provider_key, provider);
    expected.insert(idp_key, idp);
    assert_same_objects(&expected, &all, "opt-ins vs infra/base + infra/components/*");

    // Without public HTTPS for the providers (only in-cluster ones), the API's rule is gone.
    let docs = template(&["--set", "networkPolicy.llmProviders.publicHttps=false"]);
    let egress = network_policy(&docs, "oats-backend-api")["spec"]["egress"].as_array().unwrap().clone();
    assert_eq!(egress.len(), 4, "{egress:?}");
    assert!(egress.iter().all(|r| !r.to_string().contains("0.0.0.0/0")));
}

/// networkPolicy.identityProvider by address (an IdP outside the cluster on a private address):
/// one egress rule, an ipBlock per address, on its ports only; nothing without a namespace or an
/// address, and no rule that would open every port or select pods of the wrong namespace.
#[test]
fn the_identity_provider_value_opens_its_addresses_on_its_ports_only() {
    let docs = template(&["--set", "networkPolicy.identityProvider.cidrs={10.20.0.15/32,10.20.0.16/32}"]);
    let policy = network_policy(&docs, "oats-backend-api-identity-provider");
    assert_eq!(policy["spec"]["podSelector"], json!({"matchLabels": {"app": "oats-backend-api"}}));
    assert_eq!(policy["spec"]["policyTypes"], json!(["Egress"]));
    assert_eq!(
        policy["spec"]["egress"],
        json!([{
            "to": [{"ipBlock": {"cidr": "10.20.0.15/32"}}, {"ipBlock": {"cidr": "10.20.0.16/32"}}],
            "ports": [{"protocol": "TCP", "port": 443}],
        }])
    );
    // The API's own policy is unchanged: the IdP's rule is a policy of its own.
    let base = network_policy(&template(&[]), "oats-backend-api")["spec"]["egress"].clone();
    assert_eq!(network_policy(&docs, "oats-backend-api")["spec"]["egress"], base);

    for (set, message) in [
        ("networkPolicy.identityProvider.namespace=keycloak,networkPolicy.identityProvider.ports=null", "ports"),
        ("networkPolicy.identityProvider.podLabels.app=keycloak", "needs networkPolicy.identityProvider.namespace"),
    ] {
        let out = helm(&["template", "oats", CHART, "--set", set]);
        assert!(!out.status.success() && text(&out).contains(message), "{set}: {}", text(&out));
    }
}

/// The chart's Deployment, written out by hand: replicas per values file, probes on the paths
/// OATS serves, and the grace period its shutdown fits in.
#[test]
fn the_deployment_runs_its_replicas_with_probes_and_a_grace_period() {
    for (values, replicas) in [(None, 2), (Some("values-dev.yaml"), 1), (Some("values-prod.yaml"), 3)] {
        let file = values.map(|v| format!("{CHART}/{v}"));
        let args: Vec<&str> = file.as_deref().map(|f| vec!["-f", f]).unwrap_or_default();
        let docs = template(&args);
        let deploy = deployment(&docs);
        let what = values.unwrap_or("default values");
        assert_eq!(deploy["spec"]["replicas"], replicas, "{what}");
        let pod = &deploy["spec"]["template"]["spec"];
        assert_eq!(pod["terminationGracePeriodSeconds"], 30, "{what}");
        let api = &pod["containers"][0];
        assert_eq!(api["lifecycle"]["preStop"]["sleep"]["seconds"], 5, "{what}");
        for (probe, path) in
            [("startupProbe", "/healthz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")]
        {
            assert_eq!(api[probe]["httpGet"], json!({"path": path, "port": "http"}), "{what}: {probe}");
        }
    }
}

/// `kueue.enabled` does what infra/components/kueue-queueing does: queueing on, the default
/// queue, and the same Role for the API's ServiceAccount.
#[test]
fn kueue_values_match_the_kustomize_component() {
    let docs = template(&["--set", "kueue.enabled=true", "--set", "kueue.defaultQueue=team-a"]);
    let (_, data) = config_data(&docs);
    assert_eq!(
        (data["OATS_QUEUEING"].as_str(), data["OATS_KUEUE_DEFAULT_QUEUE"].as_str()),
        (Some("kueue"), Some("team-a"))
    );
    let component: Vec<Value> = parse(&read("infra/components/kueue-queueing/rbac.yaml"), "the component's rbac.yaml");
    let chart = by_key(&docs);
    for object in &component {
        let key = key(object);
        let rendered = chart.get(&key).unwrap_or_else(|| panic!("the chart lacks {key}"));
        for field in ["rules", "roleRef", "subjects"] {
            assert_eq!(rendered[field], object[field], "{key}.{field}");
        }
    }
    let off = by_key(&template(&[]));
    assert!(!off.keys().any(|k| k.contains("oats-kueue-reader")), "no Kueue Role unless enabled");
    assert!(!config_data(&template(&[])).1.contains_key("OATS_QUEUEING"));
}
