//! Offline checks of the shipped Kubernetes manifests: `infra/base`, `infra/overlays/dev` and
//! `infra/overlays/prod` are rendered with `kubectl kustomize` (no cluster needed) and every
//! object is checked for the security properties the deployment relies on: least-privilege
//! RBAC, an agent identity with no token and no bindings, default-deny NetworkPolicies, Pod
//! Security Admission labels, the admission policy's binding, quota and limits, and an API that
//! requires credentials (a tokens file from a Secret) and loads the shipped service policy.
//!
//! Needs `kubectl` (its built-in kustomize) on PATH; it fails, never skips, without it.

use crate::common;

use serde_json::{Value, json};
use std::{collections::BTreeMap, process::Command, sync::OnceLock};

const TARGETS: [&str; 3] = ["infra/base", "infra/overlays/dev", "infra/overlays/prod"];
const NAMESPACE: &str = "oats";
const AGENT_SA: &str = "oats-agent";
const POLICY: &str = "oats-agent-job-guardrails";

// ---------------------------------------------------------------------------------------------
// Rendering
// ---------------------------------------------------------------------------------------------

/// `kubectl <args>` in the crate root; stdout, or a panic with everything kubectl said.
fn kubectl(args: &[&str]) -> String {
    let out = Command::new("kubectl")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap_or_else(|e| panic!("cannot run kubectl (needed to render the manifests): {e}"));
    assert!(
        out.status.success(),
        "kubectl {} failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("kubectl prints UTF-8")
}

/// The objects `kubectl kustomize <dir>` renders (rendered once per test binary).
fn render(dir: &str) -> &'static [Value] {
    static RENDERED: OnceLock<BTreeMap<&'static str, Vec<Value>>> = OnceLock::new();
    let all = RENDERED.get_or_init(|| {
        TARGETS
            .iter()
            .map(|&target| {
                let text = kubectl(&["kustomize", target]);
                let docs: Vec<Value> =
                    serde_saphyr::from_multiple(&text).unwrap_or_else(|e| panic!("{target}: not YAML: {e}"));
                let docs: Vec<Value> = docs.into_iter().filter(|d| !d.is_null()).collect();
                assert!(docs.len() > 10, "{target} rendered only {} objects", docs.len());
                for d in &docs {
                    assert!(d["kind"].is_string() && d["metadata"]["name"].is_string(), "{target}: odd object {d}");
                }
                (target, docs)
            })
            .collect()
    });
    &all[dir]
}

fn kind<'a>(docs: &'a [Value], kind: &str) -> impl Iterator<Item = &'a Value> {
    let kind = kind.to_owned();
    docs.iter().filter(move |d| d["kind"] == kind.as_str())
}

fn one<'a>(docs: &'a [Value], k: &str, name: &str) -> &'a Value {
    let found: Vec<_> = kind(docs, k).filter(|d| d["metadata"]["name"] == name).collect();
    assert_eq!(found.len(), 1, "expected exactly one {k} {name}, found {}", found.len());
    found[0]
}

fn name(doc: &Value) -> String {
    format!("{}/{}", doc["kind"].as_str().unwrap_or("?"), doc["metadata"]["name"].as_str().unwrap_or("?"))
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array().map(|a| a.iter().filter_map(Value::as_str).collect()).unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// RBAC
// ---------------------------------------------------------------------------------------------

/// What is wrong with one RBAC rule (empty: nothing).
fn rule_violations(rule: &Value) -> Vec<String> {
    let verbs = strings(&rule["verbs"]);
    let resources = strings(&rule["resources"]);
    let groups = strings(&rule["apiGroups"]);
    let mut bad = Vec::new();
    for (field, values) in [("verbs", &verbs), ("resources", &resources), ("apiGroups", &groups)]
        .into_iter()
        .chain([("nonResourceURLs", &strings(&rule["nonResourceURLs"]))])
    {
        if values.iter().any(|v| v.contains('*')) {
            bad.push(format!("wildcard in {field}: {values:?}"));
        }
    }
    let core = groups.contains(&"");
    let any_of = |list: &[&str], wanted: &[&str]| wanted.iter().any(|w| list.contains(w));
    for verb in ["escalate", "bind", "impersonate"] {
        if verbs.contains(&verb) {
            bad.push(format!("verb {verb}"));
        }
    }
    if core && resources.contains(&"secrets") && any_of(&verbs, &["get", "list", "watch"]) {
        bad.push(format!("reads secrets ({verbs:?})"));
    }
    for sub in ["pods/exec", "pods/attach", "pods/portforward", "pods/ephemeralcontainers", "serviceaccounts/token"] {
        if core && resources.contains(&sub) {
            bad.push(format!("grants {sub} ({verbs:?})"));
        }
    }
    if core && resources.contains(&"namespaces") && any_of(&verbs, &["patch", "update"]) {
        bad.push(format!("may relabel namespaces ({verbs:?}): that would weaken Pod Security Admission"));
    }
    if groups.contains(&"admissionregistration.k8s.io") {
        bad.push(format!("may change admission policies/webhooks ({resources:?})"));
    }
    if groups.contains(&"rbac.authorization.k8s.io") && !verbs.iter().all(|v| ["get", "list", "watch"].contains(v)) {
        bad.push(format!("may change RBAC ({resources:?} {verbs:?})"));
    }
    bad
}

#[test]
fn the_rbac_checker_catches_what_it_should() {
    let bad = [
        json!({"apiGroups": ["*"], "resources": ["jobs"], "verbs": ["get"]}),
        json!({"apiGroups": ["batch"], "resources": ["*"], "verbs": ["get"]}),
        json!({"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["*"]}),
        json!({"apiGroups": [""], "resources": ["secrets"], "verbs": ["list"]}),
        json!({"apiGroups": [""], "resources": ["pods/exec"], "verbs": ["create"]}),
        json!({"apiGroups": [""], "resources": ["namespaces"], "verbs": ["patch"]}),
        json!({"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["roles"], "verbs": ["escalate"]}),
        json!({"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["clusterroles"], "verbs": ["bind"]}),
        json!({"apiGroups": [""], "resources": ["users"], "verbs": ["impersonate"]}),
    ];
    for rule in bad {
        assert!(!rule_violations(&rule).is_empty(), "not caught: {rule}");
    }
    let fine = json!({"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["create", "get", "patch"]});
    assert!(rule_violations(&fine).is_empty());
    let secret_create = json!({"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]});
    assert!(rule_violations(&secret_create).is_empty(), "create-only on secrets reveals nothing");
}

#[test]
fn rbac_is_namespaced_least_privilege_without_wildcards() {
    for target in TARGETS {
        let docs = render(target);
        let roles: Vec<_> = kind(docs, "Role").collect();
        assert!(!roles.is_empty(), "{target}: no Role at all");
        for k in ["ClusterRole", "ClusterRoleBinding"] {
            let found: Vec<_> = kind(docs, k).map(name).collect();
            assert!(found.is_empty(), "{target}: OATS is namespace-scoped, but ships {found:?}");
        }
        let mut problems = Vec::new();
        for role in roles {
            assert_eq!(role["metadata"]["namespace"], NAMESPACE, "{target}: {}", name(role));
            for rule in role["rules"].as_array().expect("rules") {
                problems.extend(rule_violations(rule).into_iter().map(|p| format!("{}: {p}", name(role))));
            }
        }
        assert!(problems.is_empty(), "{target}: {problems:#?}");
    }
}

#[test]
fn the_agent_service_account_has_no_token_and_no_bindings() {
    for target in TARGETS {
        let docs = render(target);
        for sa in [AGENT_SA, "default"] {
            let account = one(docs, "ServiceAccount", sa);
            assert_eq!(account["automountServiceAccountToken"], false, "{target}: ServiceAccount {sa}");
        }
        // Groups that include the agent's identity count as binding it.
        let agent_groups = ["system:serviceaccounts", "system:serviceaccounts:oats", "system:authenticated"];
        for binding in kind(docs, "RoleBinding").chain(kind(docs, "ClusterRoleBinding")) {
            for subject in binding["subjects"].as_array().into_iter().flatten() {
                let (k, n) = (subject["kind"].as_str().unwrap_or(""), subject["name"].as_str().unwrap_or(""));
                let binds_agent = (k == "ServiceAccount" && n == AGENT_SA)
                    || (k == "User" && n == "system:serviceaccount:oats:oats-agent")
                    || (k == "Group" && agent_groups.contains(&n));
                assert!(!binds_agent, "{target}: {} binds the agent ({subject})", name(binding));
            }
        }
        // The agent Job's identity as configured for the API is that account.
        let config = api_config(docs);
        assert_eq!(config["OATS_AGENT_SERVICE_ACCOUNT"], AGENT_SA, "{target}");
    }
}

/// The API's generated ConfigMap (`oats-backend-api-config-<hash>`).
fn api_config(docs: &[Value]) -> &Value {
    let found: Vec<_> = kind(docs, "ConfigMap")
        .filter(|d| d["metadata"]["name"].as_str().is_some_and(|n| n.starts_with("oats-backend-api-config")))
        .collect();
    assert_eq!(found.len(), 1, "expected one oats-backend-api-config ConfigMap");
    &found[0]["data"]
}

// ---------------------------------------------------------------------------------------------
// Namespace and Pod Security Admission
// ---------------------------------------------------------------------------------------------

#[test]
fn the_namespace_enforces_restricted_pod_security_with_pinned_versions() {
    for target in TARGETS {
        let docs = render(target);
        let ns = one(docs, "Namespace", NAMESPACE);
        let labels = &ns["metadata"]["labels"];
        for mode in ["enforce", "audit", "warn"] {
            assert_eq!(labels[format!("pod-security.kubernetes.io/{mode}")], "restricted", "{target}: {mode}");
            let version = labels[format!("pod-security.kubernetes.io/{mode}-version")]
                .as_str()
                .unwrap_or_else(|| panic!("{target}: {mode}-version is not set (it would float)"));
            let pinned = version.strip_prefix("v1.").is_some_and(|m| !m.is_empty() && m.parse::<u32>().is_ok());
            // enforce is pinned to the tested policy version; audit/warn may track `latest` on
            // purpose, so new checks show up as warnings before enforce is bumped.
            if mode == "enforce" {
                assert!(pinned, "{target}: enforce-version must be pinned to v1.N, not {version:?}");
            } else {
                assert!(pinned || version == "latest", "{target}: {mode}-version {version:?}");
            }
        }
        // Every namespaced object lands in `oats`; cluster-scoped ones carry no namespace.
        for doc in docs {
            let k = doc["kind"].as_str().unwrap();
            let cluster_scoped = ["Namespace", "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"];
            if cluster_scoped.contains(&k) {
                assert!(doc["metadata"]["namespace"].is_null(), "{target}: {} has a namespace", name(doc));
            } else {
                assert_eq!(doc["metadata"]["namespace"], NAMESPACE, "{target}: {}", name(doc));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// NetworkPolicy
// ---------------------------------------------------------------------------------------------

fn selects_all(selector: &Value) -> bool {
    selector.as_object().is_some_and(|s| {
        s.get("matchLabels").is_none_or(|m| m.as_object().is_some_and(|m| m.is_empty()))
            && s.get("matchExpressions").is_none_or(|m| m.as_array().is_some_and(|m| m.is_empty()))
    })
}

fn ip_blocks(rule: &Value) -> Vec<&Value> {
    rule["to"].as_array().into_iter().flatten().filter_map(|peer| peer.get("ipBlock")).collect()
}

/// The ports of a rule, as numbers.
fn rule_ports(rule: &Value) -> Vec<i64> {
    rule["ports"].as_array().into_iter().flatten().map(|p| p["port"].as_i64().expect("numeric port")).collect()
}

/// A peer that is the pods `app=<app>` of the policy's own namespace (a podSelector alone).
fn is_pods_of_this_namespace(peer: &Value, app: &str) -> bool {
    peer.get("namespaceSelector").is_none()
        && peer.get("ipBlock").is_none()
        && peer["podSelector"] == json!({"matchLabels": {"app": app}})
}

/// A rule to HTTPS on public addresses: the IPv4 and IPv6 "everything" blocks, each excluding the
/// private, CGNAT and link-local ranges (cloud metadata), on TCP 443 only.
fn assert_public_https_only(rule: &Value, what: &str) {
    let peers = rule["to"].as_array().expect("to");
    assert_eq!(peers.len(), 2, "{what}: expected the IPv4 and IPv6 internet ipBlocks: {rule}");
    for block in ip_blocks(rule) {
        let except = strings(&block["except"]);
        let required: &[&str] = match block["cidr"].as_str() {
            Some("0.0.0.0/0") => &["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "169.254.0.0/16"],
            Some("::/0") => &["fc00::/7", "fe80::/10", "fd00:ec2::254/128"],
            other => panic!("{what}: unexpected ipBlock {other:?}"),
        };
        for cidr in required {
            assert!(except.contains(cidr), "{what}: egress to {:?} does not exclude {cidr}", block["cidr"]);
        }
    }
    assert_eq!(ip_blocks(rule).len(), 2, "{what}: {rule}");
    assert_eq!(rule_ports(rule), [443], "{what}: internet egress must be HTTPS only");
    assert!(rule["ports"].as_array().unwrap().iter().all(|p| p["protocol"] == "TCP"), "{what}: {rule}");
}

/// The rule to cluster DNS (CoreDNS in kube-system, port 53).
fn is_dns_rule(rule: &Value) -> bool {
    rule["to"]
        == json!([{
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
            "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
        }])
        && rule_ports(rule) == [53, 53]
}

#[test]
fn network_policies_deny_by_default_and_isolate_the_agents() {
    for target in TARGETS {
        let docs = render(target);
        let policies: Vec<_> = kind(docs, "NetworkPolicy").collect();
        for p in &policies {
            let types = strings(&p["spec"]["policyTypes"]);
            assert!(!types.is_empty(), "{target}: {} must set policyTypes explicitly", name(p));
        }
        // A default deny of both directions for every pod of the namespace.
        let default_deny = policies.iter().any(|p| {
            let spec = &p["spec"];
            let types = strings(&spec["policyTypes"]);
            selects_all(&spec["podSelector"])
                && types.contains(&"Ingress")
                && types.contains(&"Egress")
                && spec["ingress"].as_array().is_none_or(|r| r.is_empty())
                && spec["egress"].as_array().is_none_or(|r| r.is_empty())
        });
        assert!(default_deny, "{target}: no default-deny (Ingress+Egress, podSelector {{}}) NetworkPolicy");

        // The agents: isolated for ingress, egress only DNS and the LLM gateway (API pods, 8001).
        let agent = one(docs, "NetworkPolicy", "oats-agent");
        assert_eq!(agent["spec"]["podSelector"]["matchLabels"], json!({"app": "oats-agent"}), "{target}");
        assert!(strings(&agent["spec"]["policyTypes"]).contains(&"Ingress"), "{target}");
        assert!(agent["spec"]["ingress"].as_array().is_none_or(|r| r.is_empty()), "{target}: agent ingress");
        let egress = agent["spec"]["egress"].as_array().expect("agent egress rules");
        assert_eq!(egress.len(), 2, "{target}: agent egress is DNS and the gateway only: {egress:#?}");
        assert!(is_dns_rule(&egress[0]), "{target}: agent egress[0] is not cluster DNS: {}", egress[0]);
        let gateway = &egress[1];
        let peers = gateway["to"].as_array().expect("to");
        assert!(
            peers.len() == 1 && is_pods_of_this_namespace(&peers[0], "oats-backend-api"),
            "{target}: agent egress[1] must be the API pods of this namespace only: {gateway}"
        );
        assert_eq!(rule_ports(gateway), [8001], "{target}: agents reach the gateway's port only");
        // No policy of the render lets the agents out anywhere else (nor in from anywhere), but
        // the one for agents whose profile grants public HTTPS (a pod label only OATS sets).
        for policy in &policies {
            let selects_agents = selects_all(&policy["spec"]["podSelector"])
                || policy["spec"]["podSelector"]["matchLabels"]["app"] == "oats-agent";
            if selects_agents {
                let ingress = policy["spec"]["ingress"].as_array().map_or(0, Vec::len);
                assert_eq!(ingress, 0, "{target}: {} allows ingress to the agents", name(policy));
                if policy["metadata"]["name"] == "oats-agent-profile-public-https" {
                    let selector = &policy["spec"]["podSelector"]["matchLabels"];
                    assert_eq!(*selector, json!({"app": "oats-agent", "oats.dev/egress": "public-https"}), "{target}");
                    assert_eq!(rule_ports(&policy["spec"]["egress"][0]), [443], "{target}: public HTTPS only");
                } else if policy["metadata"]["name"] != "oats-agent" {
                    let egress = policy["spec"]["egress"].as_array().map_or(0, Vec::len);
                    assert_eq!(egress, 0, "{target}: {} opens more egress for the agents", name(policy));
                }
            }
        }

        // The API: ingress only on 8000 (ingress controller), 9090 (Prometheus) and 8001 (agents).
        let api = one(docs, "NetworkPolicy", "oats-backend-api");
        let ingress = api["spec"]["ingress"].as_array().unwrap();
        let mut ports: Vec<i64> = ingress.iter().flat_map(rule_ports).collect();
        ports.sort();
        assert_eq!(ports, [8000, 8001, 9090], "{target}");
        for rule in ingress {
            let peers = rule["from"].as_array().expect("ingress from");
            for peer in peers {
                assert!(peer.get("ipBlock").is_none(), "{target}: API ingress from an ipBlock");
                assert!(
                    peer.get("namespaceSelector").is_none() || !selects_all(&peer["namespaceSelector"]),
                    "{target}: API ingress from every namespace"
                );
            }
            // The gateway's port admits the agent pods of this namespace and nothing else; the
            // agents get no other port.
            let from_agents = peers.iter().any(|p| is_pods_of_this_namespace(p, "oats-agent"));
            if rule_ports(rule).contains(&8001) || from_agents {
                assert_eq!(rule_ports(rule), [8001], "{target}: {rule}");
                assert!(
                    peers.len() == 1 && is_pods_of_this_namespace(&peers[0], "oats-agent"),
                    "{target}: the gateway port is for the agent pods only: {rule}"
                );
            }
        }

        // The API's egress: DNS, the API server (an ipBlock per address), OTLP, the LLM providers
        // (public HTTPS) and PostgreSQL; in that order (the prod patches test it).
        let egress = api["spec"]["egress"].as_array().unwrap();
        assert_eq!(egress.len(), 5, "{target}: API egress rules: {egress:#?}");
        assert!(is_dns_rule(&egress[0]), "{target}: API egress[0]");
        let api_server: Vec<&str> = ip_blocks(&egress[1]).iter().filter_map(|b| b["cidr"].as_str()).collect();
        assert_eq!(egress[1]["to"].as_array().unwrap().len(), api_server.len(), "{target}: API server by ipBlock only");
        for cidr in &api_server {
            assert!(cidr.ends_with("/32") || cidr.ends_with("/128"), "{target}: API-server egress to range {cidr}");
        }
        assert_eq!(rule_ports(&egress[1]), [443, 6443], "{target}");
        if target.ends_with("prod") {
            assert!(!api_server.contains(&"10.96.0.1/32"), "{target}: the prod patch did not replace the base CIDR");
        } else {
            assert_eq!(api_server, ["10.96.0.1/32"], "{target}");
        }
        assert_eq!(rule_ports(&egress[2]), [4317, 4318], "{target}: API egress[2] is OTLP");
        assert!(ip_blocks(&egress[2]).is_empty(), "{target}");
        assert_public_https_only(&egress[3], &format!("{target}: API egress to the LLM providers"));
        let database = &egress[4];
        assert_eq!(rule_ports(database), [5432], "{target}: API egress[4] is PostgreSQL");
        let peers = database["to"].as_array().unwrap();
        if target.ends_with("prod") {
            // An external database: an ipBlock per address, never the in-cluster dev pods.
            assert!(!peers.is_empty(), "{target}");
            for peer in peers {
                let cidr = peer["ipBlock"]["cidr"].as_str().unwrap_or_else(|| panic!("{target}: {peer}"));
                assert!(cidr.ends_with("/32") || cidr.ends_with("/128"), "{target}: database egress to range {cidr}");
            }
        } else {
            assert!(
                peers.len() == 1 && is_pods_of_this_namespace(&peers[0], "oats-postgres"),
                "{target}: database egress must be the oats-postgres pods: {database}"
            );
        }

        // Only the API may reach the dev PostgreSQL, and it reaches nothing.
        let postgres: Vec<_> = policies.iter().filter(|p| p["metadata"]["name"] == "oats-postgres").collect();
        if target.ends_with("dev") {
            let spec = &postgres.first().unwrap_or_else(|| panic!("{target}: no NetworkPolicy oats-postgres"))["spec"];
            assert_eq!(spec["podSelector"], json!({"matchLabels": {"app": "oats-postgres"}}), "{target}");
            assert_eq!(strings(&spec["policyTypes"]), ["Ingress", "Egress"], "{target}");
            assert_eq!(
                spec["ingress"],
                json!([{
                    "from": [{"podSelector": {"matchLabels": {"app": "oats-backend-api"}}}],
                    "ports": [{"protocol": "TCP", "port": 5432}],
                }]),
                "{target}"
            );
            assert!(spec["egress"].as_array().is_none_or(|e| e.is_empty()), "{target}: PostgreSQL egress");
        } else {
            assert!(postgres.is_empty(), "{target}: the dev PostgreSQL's policy");
        }
    }
}

/// The Kueue component: queueing on, and a Role that only reads Kueue (and deletes a Job).
#[test]
fn the_kueue_component_switches_queueing_on_with_least_privilege() {
    let dir = format!("{}/infra/components/kueue-queueing", env!("CARGO_MANIFEST_DIR"));
    let kustomization: Value =
        serde_saphyr::from_str(&std::fs::read_to_string(format!("{dir}/kustomization.yaml")).unwrap()).unwrap();
    assert_eq!(kustomization["kind"], "Component");
    let literals = strings(&kustomization["configMapGenerator"][0]["literals"]);
    assert_eq!(literals, ["OATS_QUEUEING=kueue", "OATS_KUEUE_DEFAULT_QUEUE=oats"]);
    let rbac = std::fs::read_to_string(format!("{dir}/rbac.yaml")).unwrap();
    let docs: Vec<Value> = rbac.split("\n---\n").map(|d| serde_saphyr::from_str(d).unwrap()).collect();
    let role = docs.iter().find(|d| d["kind"] == "Role").unwrap();
    assert_eq!(role["metadata"]["namespace"], NAMESPACE);
    let verbs: Vec<(String, Vec<&str>)> = role["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|rule| {
            assert!(rule_violations(rule).is_empty(), "{rule}: {:?}", rule_violations(rule));
            (format!("{}/{}", strings(&rule["apiGroups"])[0], strings(&rule["resources"])[0]), strings(&rule["verbs"]))
        })
        .collect();
    assert_eq!(
        verbs,
        [
            ("kueue.x-k8s.io/workloads".to_owned(), vec!["get", "list", "watch"]),
            ("visibility.kueue.x-k8s.io/localqueues/pendingworkloads".to_owned(), vec!["get"]),
            ("batch/jobs".to_owned(), vec!["delete"]),
        ]
    );
}

/// The opt-in components (infra/components): each adds one NetworkPolicy, no more than it says.
#[test]
fn the_opt_in_network_components_open_what_they_say() {
    let read = |path: &str| -> Value {
        let text = std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR"))).unwrap();
        serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
    };
    for dir in ["agents-public-https", "llm-in-cluster-provider", "oidc-identity-provider"] {
        let kustomization = read(&format!("infra/components/{dir}/kustomization.yaml"));
        assert_eq!(kustomization["kind"], "Component", "{dir}");
        assert_eq!(kustomization["resources"], json!(["networkpolicy.yaml"]), "{dir}");
    }
    // Agents: public HTTPS only, private ranges and metadata still excluded; still no ingress.
    let web = read("infra/components/agents-public-https/networkpolicy.yaml");
    assert_eq!(web["metadata"]["namespace"], NAMESPACE);
    assert_eq!(web["spec"]["podSelector"], json!({"matchLabels": {"app": "oats-agent"}}));
    assert_eq!(strings(&web["spec"]["policyTypes"]), ["Egress"]);
    let egress = web["spec"]["egress"].as_array().unwrap();
    assert_eq!(egress.len(), 1);
    assert_public_https_only(&egress[0], "agents-public-https");
    // The API: an in-cluster provider, by namespace and pod labels, on its port.
    let provider = read("infra/components/llm-in-cluster-provider/networkpolicy.yaml");
    assert_eq!(provider["metadata"]["namespace"], NAMESPACE);
    assert_eq!(provider["spec"]["podSelector"], json!({"matchLabels": {"app": "oats-backend-api"}}));
    assert_eq!(strings(&provider["spec"]["policyTypes"]), ["Egress"]);
    for rule in provider["spec"]["egress"].as_array().unwrap() {
        assert!(ip_blocks(rule).is_empty(), "llm-in-cluster-provider: by selectors only: {rule}");
        for peer in rule["to"].as_array().unwrap() {
            assert!(!selects_all(&peer["namespaceSelector"]), "llm-in-cluster-provider: every namespace: {peer}");
            assert!(!selects_all(&peer["podSelector"]), "llm-in-cluster-provider: every pod: {peer}");
        }
        assert!(!rule_ports(rule).is_empty(), "llm-in-cluster-provider: every port: {rule}");
    }
    // The API: the OIDC identity provider, one rule, by namespace and pod labels, on its port(s).
    let idp = read("infra/components/oidc-identity-provider/networkpolicy.yaml");
    assert_eq!(idp["metadata"]["namespace"], NAMESPACE);
    assert_eq!(idp["spec"]["podSelector"], json!({"matchLabels": {"app": "oats-backend-api"}}));
    assert_eq!(strings(&idp["spec"]["policyTypes"]), ["Egress"]);
    assert!(idp["spec"]["ingress"].is_null(), "oidc-identity-provider: ingress");
    let egress = idp["spec"]["egress"].as_array().unwrap();
    assert_eq!(egress.len(), 1, "oidc-identity-provider: one rule");
    assert!(ip_blocks(&egress[0]).is_empty(), "oidc-identity-provider: the example is by selectors");
    for peer in egress[0]["to"].as_array().unwrap() {
        assert!(!selects_all(&peer["namespaceSelector"]), "oidc-identity-provider: every namespace: {peer}");
        assert!(!selects_all(&peer["podSelector"]), "oidc-identity-provider: every pod: {peer}");
    }
    assert!(!rule_ports(&egress[0]).is_empty(), "oidc-identity-provider: every port");
}

// ---------------------------------------------------------------------------------------------
// Admission policy
// ---------------------------------------------------------------------------------------------

#[test]
fn the_admission_policy_is_bound_by_namespace_name_and_denies() {
    for target in TARGETS {
        let docs = render(target);
        let policy = one(docs, "ValidatingAdmissionPolicy", POLICY);
        assert_eq!(policy["apiVersion"], "admissionregistration.k8s.io/v1", "{target}");
        assert_eq!(policy["spec"]["failurePolicy"], "Fail", "{target}");
        let rules = policy["spec"]["matchConstraints"]["resourceRules"].as_array().unwrap();
        assert!(
            rules.iter().any(|r| strings(&r["apiGroups"]) == ["batch"]
                && strings(&r["resources"]) == ["jobs"]
                && strings(&r["operations"]).contains(&"CREATE")
                && strings(&r["operations"]).contains(&"UPDATE")),
            "{target}: the policy must match batch jobs on CREATE and UPDATE"
        );
        // No requester-controlled switch: matchConditions must not look at labels/annotations.
        for condition in policy["spec"]["matchConditions"].as_array().into_iter().flatten() {
            let expression = condition["expression"].as_str().unwrap();
            assert!(
                !expression.contains("labels") && !expression.contains("annotations"),
                "{target}: matchCondition {} depends on metadata the requester sets",
                condition["name"]
            );
        }

        let bindings: Vec<_> =
            kind(docs, "ValidatingAdmissionPolicyBinding").filter(|b| b["spec"]["policyName"] == POLICY).collect();
        assert_eq!(bindings.len(), 1, "{target}: expected one binding of {POLICY}");
        let binding = &bindings[0]["spec"];
        assert_eq!(binding["validationActions"], json!(["Deny"]), "{target}");
        let resources = &binding["matchResources"];
        assert!(resources["objectSelector"].is_null(), "{target}: objectSelector labels are set by the requester");
        let selector = resources["namespaceSelector"].as_object().expect("namespaceSelector");
        let by_name = selector.get("matchLabels") == Some(&json!({"kubernetes.io/metadata.name": NAMESPACE}))
            && selector.get("matchExpressions").is_none_or(|e| e.as_array().is_some_and(|e| e.is_empty()))
            || selector.get("matchExpressions")
                == Some(&json!([{"key": "kubernetes.io/metadata.name", "operator": "In", "values": [NAMESPACE]}]))
                && selector.get("matchLabels").is_none_or(|m| m.as_object().is_some_and(|m| m.is_empty()));
        assert!(by_name, "{target}: the binding must select namespace {NAMESPACE} by kubernetes.io/metadata.name only");

        // The parameters exist, fail closed, and fit what OATS renders in this environment.
        let param_ref = &binding["paramRef"];
        assert_eq!(param_ref["parameterNotFoundAction"], "Deny", "{target}");
        assert_eq!(param_ref["namespace"], NAMESPACE, "{target}");
        let params = &one(docs, "ConfigMap", param_ref["name"].as_str().unwrap())["data"];
        let prefixes: Vec<&str> = params["allowedImagePrefixes"].as_str().unwrap().split(',').map(str::trim).collect();
        assert!(prefixes.iter().all(|p| p.ends_with('/') || p.ends_with(':')), "{target}: prefix {prefixes:?}");
        let config = api_config(docs);
        let image = config["OATS_AGENT_IMAGE"].as_str().unwrap();
        assert!(prefixes.iter().any(|p| image.starts_with(p)), "{target}: {image} is not allowed by {prefixes:?}");
        if target == "infra/base" {
            assert!(prefixes.contains(&"oats-agent:") && prefixes.contains(&"registry.example.com/oats/"));
        }
        assert_eq!(params["serviceAccountName"], config["OATS_AGENT_SERVICE_ACCOUNT"], "{target}");
        let max: u32 = params["maxActiveDeadlineSeconds"].as_str().unwrap().parse().unwrap();
        let default_max = oats::config::Config::default().max_timeout_seconds;
        assert!(
            max >= default_max,
            "{target}: maxActiveDeadlineSeconds {max} < OATS' max_timeout_seconds {default_max}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// ResourceQuota and LimitRange
// ---------------------------------------------------------------------------------------------

/// A Kubernetes quantity in base units (cores, bytes); enough for the suffixes used here.
fn quantity(q: &Value) -> f64 {
    let s = match q {
        Value::String(s) => s.as_str(),
        Value::Number(n) => return n.as_f64().unwrap(),
        other => panic!("not a quantity: {other}"),
    };
    let units =
        [("Ki", 1024f64), ("Mi", 1024f64.powi(2)), ("Gi", 1024f64.powi(3)), ("Ti", 1024f64.powi(4)), ("m", 1e-3)];
    for (suffix, factor) in units {
        if let Some(n) = s.strip_suffix(suffix) {
            return n.parse::<f64>().unwrap_or_else(|_| panic!("bad quantity {s}")) * factor;
        }
    }
    s.parse().unwrap_or_else(|_| panic!("bad quantity {s}"))
}

#[test]
fn quota_and_limit_range_fit_the_agent_and_the_api() {
    let config = oats::config::Config::default();
    for target in TARGETS {
        let docs = render(target);
        let quota: Vec<_> = kind(docs, "ResourceQuota").collect();
        assert_eq!(quota.len(), 1, "{target}: one ResourceQuota");
        let hard = &quota[0]["spec"]["hard"];
        for key in ["pods", "requests.cpu", "requests.memory", "limits.cpu", "limits.memory", "count/jobs.batch"] {
            assert!(!hard[key].is_null(), "{target}: the quota does not cap {key}");
        }
        let ranges: Vec<_> = kind(docs, "LimitRange").collect();
        assert_eq!(ranges.len(), 1, "{target}: one LimitRange");
        let container = ranges[0]["spec"]["limits"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["type"] == "Container")
            .expect("a Container limit");

        // The defaults are the agent's defaults (src/config.rs).
        for (field, key, value) in [
            ("defaultRequest", "cpu", &config.agent_cpu_request),
            ("defaultRequest", "memory", &config.agent_memory_request),
            ("defaultRequest", "ephemeral-storage", &config.agent_ephemeral_storage_request),
            ("default", "cpu", &config.agent_cpu_limit),
            ("default", "memory", &config.agent_memory_limit),
            ("default", "ephemeral-storage", &config.agent_ephemeral_storage_limit),
        ] {
            assert_eq!(
                quantity(&container[field][key]),
                quantity(&json!(value)),
                "{target}: LimitRange {field}.{key} differs from the agent default {value}"
            );
        }
        // Every container of every workload here fits between min and max.
        let in_range = |what: &str, resources: &Value| {
            for section in ["requests", "limits"] {
                for (key, value) in resources[section].as_object().into_iter().flatten() {
                    let v = quantity(value);
                    if let Some(max) = container["max"].get(key) {
                        assert!(v <= quantity(max), "{target}: {what} {section}.{key} {value} > max {max}");
                    }
                    if let Some(min) = container["min"].get(key) {
                        assert!(v >= quantity(min), "{target}: {what} {section}.{key} {value} < min {min}");
                    }
                }
            }
        };
        for deployment in kind(docs, "Deployment") {
            for c in deployment["spec"]["template"]["spec"]["containers"].as_array().unwrap() {
                in_range(&name(deployment), &c["resources"]);
            }
        }
        // ... and so does the agent, with its defaults and with every resource profile of the
        // shipped service policy (policies/oats-policy.yaml).
        let agent = json!({
            "requests": {"cpu": config.agent_cpu_request, "memory": config.agent_memory_request},
            "limits": {"cpu": config.agent_cpu_limit, "memory": config.agent_memory_limit},
        });
        in_range("agent (defaults)", &agent);
        let profiles = shipped_resource_profiles();
        assert!(!profiles.is_empty(), "policies/oats-policy.yaml has no resource_profiles");
        for (profile, p) in profiles {
            let resources = json!({
                "requests": {"cpu": p["cpu_request"], "memory": p["memory_request"]},
                "limits": {"cpu": p["cpu_limit"], "memory": p["memory_limit"]},
            });
            in_range(&format!("agent (profile {profile})"), &resources);
        }
        // The quota holds at least one agent and the API replicas.
        assert!(quantity(&hard["limits.cpu"]) >= quantity(&json!(config.agent_cpu_limit)) * 10.0, "{target}");
    }
}

/// Every `resource_profiles` entry of policies/oats-policy.yaml (defaults and tenants).
fn shipped_resource_profiles() -> Vec<(String, Value)> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/policies/oats-policy.yaml");
    let text = std::fs::read_to_string(path).unwrap();
    let doc: Value = serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut sections = vec![("defaults".to_owned(), &doc["defaults"])];
    for (tenant, rules) in doc["tenants"].as_object().into_iter().flatten() {
        sections.push((format!("tenants.{tenant}"), rules));
    }
    let mut out = Vec::new();
    for (section, rules) in sections {
        for (name, profile) in rules["resource_profiles"].as_object().into_iter().flatten() {
            out.push((format!("{section}.{name}"), profile.clone()));
        }
    }
    out
}

/// The namespace quota is shared by every tenant: no tenant at the limits of the shipped policy
/// (policies/oats-policy.yaml: `max_kept_jobs`, `max_concurrent_jobs` of its largest profile) may
/// exhaust any item of it. What one tenant can hold, plus the workloads of the namespace (the API
/// replicas, the dev PostgreSQL), plus one more agent of the largest profile for someone else,
/// fits under every hard limit, in every target. (The arithmetic: docs/runbook.md, "Sharing the
/// namespace quota".)
#[test]
fn no_tenant_of_the_shipped_policy_can_exhaust_the_namespace_quota() {
    let config = oats::config::Config::default();
    let path = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/policies/oats-policy.yaml"));
    let policy = oats::jobs::policy::PolicyDocument::read(path).unwrap();
    let mut tenants: Vec<String> = policy.tenant_names().map(str::to_owned).collect();
    tenants.push("any-other-tenant".into());
    // An agent's requests and limits: [cpu request, memory request, cpu limit, memory limit].
    let agent = |p: Option<&oats::jobs::policy::ResourceProfile>| -> [f64; 4] {
        let (cr, mr, cl, ml) = match p {
            Some(p) => (&p.cpu_request, &p.memory_request, &p.cpu_limit, &p.memory_limit),
            None => (
                &config.agent_cpu_request,
                &config.agent_memory_request,
                &config.agent_cpu_limit,
                &config.agent_memory_limit,
            ),
        };
        [cr, mr, cl, ml].map(|q| quantity(&json!(q)))
    };
    let largest = |profiles: Vec<[f64; 4]>| -> [f64; 4] {
        profiles.into_iter().fold([0.0; 4], |acc, p| std::array::from_fn(|i| acc[i].max(p[i])))
    };
    let every_profile = largest(
        tenants
            .iter()
            .flat_map(|t| policy.rules_for(t).resource_profiles.into_values())
            .map(|p| agent(Some(&p)))
            .chain([agent(None)])
            .collect(),
    );
    for target in TARGETS {
        let docs = render(target);
        let hard = &kind(docs, "ResourceQuota").next().unwrap()["spec"]["hard"];
        let hard = |key: &str| quantity(&hard[key]);
        // The namespace's own workloads: pods, and [cpu req, mem req, cpu lim, mem lim].
        let (mut own_pods, mut own) = (0.0, [0.0; 4]);
        for workload in kind(docs, "Deployment").chain(kind(docs, "StatefulSet")) {
            let replicas = workload["spec"]["replicas"].as_f64().unwrap_or(1.0);
            own_pods += replicas;
            for c in workload["spec"]["template"]["spec"]["containers"].as_array().unwrap() {
                let r = &c["resources"];
                let values =
                    [&r["requests"]["cpu"], &r["requests"]["memory"], &r["limits"]["cpu"], &r["limits"]["memory"]];
                for (total, v) in own.iter_mut().zip(values) {
                    *total += replicas * quantity(v);
                }
            }
        }
        for tenant in &tenants {
            let rules = policy.rules_for(tenant);
            let kept = f64::from(rules.max_kept_jobs);
            let running = f64::from(rules.max_concurrent_jobs.min(rules.max_kept_jobs));
            let profiles: Vec<_> = rules.resource_profiles.values().map(|p| agent(Some(p))).collect();
            // Without profiles, the server's agent resources apply.
            let biggest = largest(if profiles.is_empty() { vec![agent(None)] } else { profiles });
            let what = format!("{target}: tenant {tenant} (max_kept_jobs {kept}, max_concurrent_jobs {running})");
            assert!(kept < hard("count/jobs.batch"), "{what}: can hold every Job of the quota");
            assert!(running + own_pods < hard("pods"), "{what}: can hold every pod of the quota");
            for (i, key) in ["requests.cpu", "requests.memory", "limits.cpu", "limits.memory"].into_iter().enumerate() {
                let held = running * biggest[i];
                assert!(
                    held + own[i] + every_profile[i] <= hard(key),
                    "{what}: {running} agents of its largest profile hold {held} of {key}; with the \
                     namespace's workloads ({}) and one more agent ({}) that is above the quota's {}",
                    own[i],
                    every_profile[i],
                    hard(key)
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Authentication and the service policy of the API
// ---------------------------------------------------------------------------------------------

/// The API container's environment as OATS sees it: the ConfigMaps of `envFrom`, then the literal
/// values of `env` (downward-API values such as OATS_NAMESPACE are left out).
fn api_environment(docs: &[Value], target: &str) -> BTreeMap<String, String> {
    let deployment = one(docs, "Deployment", "oats-backend-api");
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let mut env = BTreeMap::new();
    for source in container["envFrom"].as_array().into_iter().flatten() {
        let name = source["configMapRef"]["name"].as_str().unwrap_or_else(|| panic!("{target}: envFrom {source}"));
        for (k, v) in one(docs, "ConfigMap", name)["data"].as_object().into_iter().flatten() {
            env.insert(k.clone(), v.as_str().unwrap_or_default().to_owned());
        }
    }
    for var in container["env"].as_array().into_iter().flatten() {
        if let Some(value) = var["value"].as_str() {
            env.insert(var["name"].as_str().unwrap().to_owned(), value.to_owned());
        }
    }
    env
}

/// The volume of the API container that holds `file` (mounted on a directory above it, without
/// subPath, read-only), and the key of that volume the file is.
fn volume_of<'a>(docs: &'a [Value], target: &str, file: &str) -> (&'a Value, String) {
    let pod = &one(docs, "Deployment", "oats-backend-api")["spec"]["template"]["spec"];
    let mounts = pod["containers"][0]["volumeMounts"].as_array().expect("volumeMounts");
    let mount = mounts
        .iter()
        .find(|m| {
            m["mountPath"].as_str().is_some_and(|dir| file.starts_with(&format!("{}/", dir.trim_end_matches('/'))))
        })
        .unwrap_or_else(|| panic!("{target}: no volume is mounted above {file}: {mounts:?}"));
    assert!(
        mount["subPath"].is_null() && mount["subPathExpr"].is_null(),
        "{target}: {file} is mounted with subPath, so Kubernetes never updates it (OATS reloads it on change)"
    );
    assert_eq!(mount["readOnly"], true, "{target}: the mount of {file} must be read-only");
    let volume = pod["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap_or_else(|| panic!("{target}: no volume {} for {file}", mount["name"]));
    let dir = mount["mountPath"].as_str().unwrap().trim_end_matches('/');
    (volume, file[dir.len() + 1..].to_owned())
}

/// Authentication must not silently be off: the API's environment names a tokens file
/// (OATS_AUTH_TOKENS_FILE; with neither it nor OATS_OIDC_ISSUER every caller is an anonymous
/// admin), and that file comes from the Secret `oats-api-tokens`. Base and dev ship that Secret
/// as a placeholder which lets nobody in; prod leaves it out (created out of band), and nothing
/// shipped ever holds the hash of a real token.
#[test]
fn the_api_requires_credentials() {
    for target in TARGETS {
        let docs = render(target);
        let env = api_environment(docs, target);
        let file = env.get("OATS_AUTH_TOKENS_FILE").unwrap_or_else(|| {
            panic!("{target}: OATS_AUTH_TOKENS_FILE is not set: the API would run with authentication OFF")
        });
        assert_eq!(file, "/etc/oats/auth/tokens.yaml", "{target}");
        // OATS reads the setting as intended (a typo'd key would be ignored, leaving auth off).
        let config = oats::config::Config::load(None, env.clone()).unwrap_or_else(|e| panic!("{target}: {e}"));
        assert_eq!(config.auth_tokens_file.as_deref(), Some(std::path::Path::new(file)), "{target}");

        let (volume, key) = volume_of(docs, target, file);
        let secret = &volume["secret"];
        assert_eq!(secret["secretName"], "oats-api-tokens", "{target}: the tokens file must come from that Secret");
        assert!(secret["optional"] != true, "{target}: an optional tokens Secret would let the pod start without it");
        if let Some(items) = secret["items"].as_array() {
            assert!(items.iter().any(|i| i["path"] == key.as_str()), "{target}: {key} is not projected: {items:?}");
        }

        let secrets: Vec<_> = kind(docs, "Secret").filter(|s| s["metadata"]["name"] == "oats-api-tokens").collect();
        if target.ends_with("prod") {
            assert!(secrets.is_empty(), "{target}: the placeholder tokens would overwrite the real ones on apply");
            continue;
        }
        assert_eq!(secrets.len(), 1, "{target}: the placeholder Secret oats-api-tokens");
        let text = secrets[0]["stringData"][key.as_str()]
            .as_str()
            .unwrap_or_else(|| panic!("{target}: oats-api-tokens has no stringData.{key}"));
        // A tokens file OATS loads, that lets nobody in.
        let parsed: oats::auth::TokenFile =
            serde_saphyr::from_str(text).unwrap_or_else(|e| panic!("{target}: not a tokens file: {e}"));
        assert_eq!(parsed.tokens.len(), 1, "{target}: one placeholder entry");
        for token in &parsed.tokens {
            assert_eq!(token.sha256, "0".repeat(64), "{target}: token {}: commit no real token's hash", token.name);
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tokens.yaml"), text).unwrap();
        let store = oats::auth::TokenStore::load(&dir.path().join("tokens.yaml")).expect("OATS loads the placeholder");
        for guess in [
            "",
            "REPLACE_ME",
            "placeholder-replace-me",
            "0000000000000000000000000000000000000000000000000000000000000000",
        ] {
            assert!(store.lookup(guess).is_none(), "{target}: the placeholder accepts {guess:?}");
        }
    }
}

/// The shipped service policy (policies/oats-policy.yaml, the single source) is what the API
/// loads: OATS_POLICY_FILE names a file of the ConfigMap `oats-backend-api-policy`, mounted as a
/// directory so that edits reach the pods.
#[test]
fn the_api_loads_the_shipped_service_policy() {
    let source = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/policies/oats-policy.yaml")).unwrap();
    for target in TARGETS {
        let docs = render(target);
        let env = api_environment(docs, target);
        let file = env.get("OATS_POLICY_FILE").unwrap_or_else(|| panic!("{target}: OATS_POLICY_FILE is not set"));
        assert_eq!(file, "/etc/oats/policy/oats-policy.yaml", "{target}");
        let (volume, key) = volume_of(docs, target, file);
        assert_eq!(volume["configMap"]["name"], "oats-backend-api-policy", "{target}: {volume}");
        let policy = one(docs, "ConfigMap", "oats-backend-api-policy");
        let text = policy["data"][key.as_str()].as_str().unwrap_or_else(|| panic!("{target}: no data.{key}"));
        assert_eq!(text, source, "{target}: the ConfigMap differs from policies/oats-policy.yaml");
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(&key), text).unwrap();
        oats::jobs::policy::Policy::load(&dir.path().join(&key)).unwrap_or_else(|e| panic!("{target}: {e}"));
    }
}

// ---------------------------------------------------------------------------------------------
// LLM gateway, provider keys and the store
// ---------------------------------------------------------------------------------------------

const PROVIDER_KEYS: &str = "oats-llm-provider-keys";
const DATABASE: &str = "oats-database";

/// The gateway listens on its own port `llm`, reached through a Service of its own (so that the
/// NetworkPolicies can single it out), and agents are given that Service's URL. The providers file
/// is the ConfigMap oats-llm-providers, loads in OATS, and names key files of the provider keys
/// Secret, which base and dev ship as placeholders and prod leaves out.
#[test]
fn the_llm_gateway_has_a_service_of_its_own_and_loads_the_shipped_providers() {
    for target in TARGETS {
        let docs = render(target);
        let env = api_environment(docs, target);
        let config = oats::config::Config::load(None, env.clone()).unwrap_or_else(|e| panic!("{target}: {e}"));
        assert_eq!(config.llm_listen.to_string(), "0.0.0.0:8001", "{target}: OATS_LLM_LISTEN");
        let url = format!("http://oats-llm-gateway.{NAMESPACE}.svc:8001/v1");
        assert_eq!(config.llm_gateway_url.as_deref(), Some(url.as_str()), "{target}: OATS_LLM_GATEWAY_URL");
        let file = config.llm_providers_file.clone().unwrap_or_else(|| panic!("{target}: the gateway is off"));
        assert_eq!(file, std::path::Path::new("/etc/oats/llm/providers.yaml"), "{target}");

        // Container port `llm`, and the Service oats-llm-gateway in front of it (nothing else).
        let pod = &one(docs, "Deployment", "oats-backend-api")["spec"]["template"]["spec"];
        let ports = pod["containers"][0]["ports"].as_array().unwrap();
        assert!(
            ports.contains(&json!({"name": "llm", "containerPort": 8001, "protocol": "TCP"})),
            "{target}: {ports:?}"
        );
        let service = one(docs, "Service", "oats-llm-gateway");
        assert_eq!(service["spec"]["selector"], json!({"app": "oats-backend-api"}), "{target}");
        assert_eq!(
            service["spec"]["ports"],
            json!([{"name": "llm", "port": 8001, "targetPort": "llm", "protocol": "TCP"}]),
            "{target}"
        );
        assert_eq!(service["spec"]["type"], "ClusterIP", "{target}");
        // The API's Service does not expose the gateway.
        let api_ports = &one(docs, "Service", "oats-backend-api")["spec"]["ports"];
        assert!(
            api_ports.as_array().unwrap().iter().all(|p| p["port"] != 8001 && p["targetPort"] != "llm"),
            "{target}"
        );
        // The ServiceMonitor (prod) scrapes the API's Service, not the gateway's.
        for monitor in kind(docs, "ServiceMonitor") {
            let selector = monitor["spec"]["selector"]["matchLabels"].as_object().unwrap();
            let labels = &service["metadata"]["labels"];
            assert!(
                !selector.iter().all(|(k, v)| &labels[k] == v),
                "{target}: {} selects oats-llm-gateway",
                name(monitor)
            );
        }

        // The providers file: the shipped one, directory-mounted, and OATS loads it.
        let (volume, key) = volume_of(docs, target, file.to_str().unwrap());
        assert_eq!(volume["configMap"]["name"], "oats-llm-providers", "{target}: {volume}");
        let providers = one(docs, "ConfigMap", "oats-llm-providers");
        let text = providers["data"][key.as_str()].as_str().unwrap_or_else(|| panic!("{target}: no data.{key}"));
        let source =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/infra/base/llm-providers.yaml")).unwrap();
        assert_eq!(text, source, "{target}: the ConfigMap differs from infra/base/llm-providers.yaml");
        let parsed: Value = serde_saphyr::from_str(text).unwrap_or_else(|e| panic!("{target}: {e}"));
        let entries = parsed["providers"].as_array().unwrap_or_else(|| panic!("{target}: no providers"));
        assert!(!entries.is_empty(), "{target}: no provider");

        // Every api_key_file is a key of the provider keys Secret, mounted read-only (no subPath).
        let secrets: Vec<_> = kind(docs, "Secret").filter(|s| s["metadata"]["name"] == PROVIDER_KEYS).collect();
        let dir = tempfile::tempdir().unwrap();
        let mut local = parsed.clone();
        for (i, provider) in entries.iter().enumerate() {
            let Some(key_file) = provider["api_key_file"].as_str() else { continue };
            let (volume, key) = volume_of(docs, target, key_file);
            assert_eq!(volume["secret"]["secretName"], PROVIDER_KEYS, "{target}: {key_file} comes from {volume}");
            if target.ends_with("prod") {
                assert!(secrets.is_empty(), "{target}: the placeholder keys would overwrite the real ones on apply");
            } else {
                assert_eq!(secrets.len(), 1, "{target}: the placeholder Secret {PROVIDER_KEYS}");
                assert_eq!(secrets[0]["stringData"][key.as_str()], "REPLACE_ME", "{target}: {key}");
            }
            // OATS loads the file (with the key files where a test can write them).
            let copy = dir.path().join(&key);
            std::fs::write(&copy, "REPLACE_ME\n").unwrap();
            local["providers"][i]["api_key_file"] = json!(copy.to_str().unwrap());
        }
        let path = dir.path().join("providers.yaml");
        std::fs::write(&path, serde_saphyr::to_string(&local).unwrap()).unwrap();
        let catalog =
            oats::llm::Catalog::load(&path).unwrap_or_else(|e| panic!("{target}: OATS refuses the providers: {e}"));
        assert!(!catalog.is_empty(), "{target}: no model");
    }
}

/// The provider keys and the database URL are mounted into the API pods and nowhere else: not into
/// the agent Jobs OATS renders (the Secret it names there is another one), not into any other
/// workload of the render.
#[test]
fn provider_keys_and_the_database_url_reach_the_api_pods_only() {
    for target in TARGETS {
        let docs = render(target);
        // Every pod template of the render that mounts or reads either Secret.
        let mut users = Vec::new();
        for workload in docs.iter().filter(|d| d["spec"]["template"]["spec"].is_object()) {
            let text = serde_json::to_string(&workload["spec"]["template"]).unwrap();
            for secret in [PROVIDER_KEYS, DATABASE] {
                if text.contains(&format!("\"{secret}\"")) {
                    users.push((name(workload), secret));
                }
            }
        }
        assert_eq!(
            users,
            [
                ("Deployment/oats-backend-api".to_owned(), PROVIDER_KEYS),
                ("Deployment/oats-backend-api".to_owned(), DATABASE)
            ],
            "{target}"
        );

        // The agent Job OATS would create with this configuration.
        let env = api_environment(docs, target);
        let config = oats::config::Config::load(None, env).unwrap_or_else(|e| panic!("{target}: {e}"));
        for secret in [PROVIDER_KEYS, DATABASE] {
            assert_ne!(config.llm_secret_name.as_deref(), Some(secret), "{target}: agents would mount {secret}");
        }
        let template = oats::backend::kubernetes::render::AgentTemplate::from_config(&config, NAMESPACE);
        let job = serde_json::to_value(oats::backend::kubernetes::render::render_job(&agent_job(), &template)).unwrap();
        let text = serde_json::to_string(&job).unwrap();
        for needle in [PROVIDER_KEYS, DATABASE, "/var/run/secrets/oats/providers", "/var/run/secrets/oats/database"] {
            assert!(!text.contains(needle), "{target}: the agent Job refers to {needle}");
        }
    }
}

/// Agents hold no long-lived secret as shipped: no Secret for them in any render, no
/// OATS_LLM_SECRET_NAME (an opt-in for agents that call a provider directly), the gateway's
/// projected token their only credential; and the admission policy's parameters say the same as
/// the API's configuration and what OATS renders (commands, the secret it may mount, egress).
#[test]
fn agent_pods_hold_no_secret_and_the_policy_parameters_fit_what_oats_renders() {
    use oats::backend::kubernetes::render::{AgentTemplate, render_job};
    for target in TARGETS {
        let docs = render(target);
        let env = api_environment(docs, target);
        for key in ["OATS_LLM_SECRET_NAME", "OATS_LLM_SECRET_KEYS"] {
            assert!(!env.contains_key(key), "{target}: {key} mounts a Secret into every agent pod");
        }
        for secret in kind(docs, "Secret") {
            assert_ne!(
                secret["metadata"]["labels"]["app.kubernetes.io/component"],
                "agent",
                "{target}: {}",
                name(secret)
            );
            assert_ne!(secret["metadata"]["name"], "oats-llm-credentials", "{target}");
        }
        let config = oats::config::Config::load(None, env.clone()).unwrap_or_else(|e| panic!("{target}: {e}"));
        assert!(config.llm_providers_file.is_some(), "{target}: the gateway is off");
        let template = AgentTemplate::from_config(&config, NAMESPACE);
        let job = serde_json::to_value(render_job(&agent_job(), &template)).unwrap();
        let pod = &job["spec"]["template"]["spec"];
        let volumes: Vec<&str> =
            pod["volumes"].as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap()).collect();
        assert_eq!(volumes, ["tmp", "workspace", "llm-token"], "{target}");
        let agent = &pod["containers"][0];
        assert!(agent["envFrom"].is_null(), "{target}");
        assert!(agent["env"].as_array().unwrap().iter().all(|e| e["valueFrom"].is_null()), "{target}");

        let binding =
            kind(docs, "ValidatingAdmissionPolicyBinding").find(|b| b["spec"]["policyName"] == POLICY).unwrap();
        let params = &one(docs, "ConfigMap", binding["spec"]["paramRef"]["name"].as_str().unwrap())["data"];
        let param = |key: &str| params[key].as_str().unwrap_or_else(|| panic!("{target}: no parameter {key}"));
        assert_eq!(param("llmSecretName"), config.llm_secret_name.as_deref().unwrap_or(""), "{target}");
        assert_eq!(param("agentCommand"), config.agent_command.join(","), "{target}");
        assert_eq!(param("allowedEgress"), "", "{target}: the shipped policy grants no profile egress");
        for key in ["allowedTolerationKeys", "allowedRuntimeClassNames", "allowedPriorityClassNames"] {
            assert_eq!(param(key), "", "{target}: {key}");
        }
        for key in ["allowNodeName", "allowHostUsers"] {
            assert_eq!(param(key), "false", "{target}: {key}");
        }
        // The launcher's commands are the ones OATS renders for an agent of a profile's own image.
        let mut own = agent_job();
        own.resources = Some(oats::jobs::policy::ResourceProfile {
            cpu_request: "1".into(),
            cpu_limit: "1".into(),
            memory_request: "1Gi".into(),
            memory_limit: "1Gi".into(),
            image: Some("registry.example.com/oats/team:1".into()),
            command: None,
            egress: None,
        });
        let job = serde_json::to_value(render_job(&own, &template)).unwrap();
        let init = &job["spec"]["template"]["spec"]["initContainers"][0];
        let joined =
            |v: &Value| v.as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect::<Vec<_>>().join(",");
        assert_eq!(param("installLauncherCommand"), joined(&init["command"]), "{target}");
        // The launcher's image is one the policy allows (the agent image, rewritten by `images:`).
        let launcher_image = init["image"].as_str().unwrap();
        assert_eq!(Some(launcher_image), env.get("OATS_AGENT_IMAGE").map(String::as_str), "{target}");
        assert!(
            param("allowedImagePrefixes").split(',').any(|p| launcher_image.starts_with(p.trim())),
            "{target}: the launcher image {launcher_image} is not allowed"
        );
        let launcher = format!("{}/oats,launch,--", oats::backend::kubernetes::render::LAUNCHER_DIR);
        assert_eq!(param("launcherCommand"), launcher, "{target}");
    }
    // The policy guards the label domains of meshes and batch queues that OATS guards.
    let policy = std::fs::read_to_string("policies/vap/agent-job-policy.yaml").unwrap();
    let line = policy.lines().skip_while(|l| !l.contains("name: guardedLabelDomains")).nth(2).unwrap();
    let domains: Vec<&str> =
        line.trim().trim_matches(['[', ']']).split(',').map(|d| d.trim().trim_matches('\'')).collect();
    assert_eq!(
        domains,
        oats::jobs::policy::GUARDED_LABEL_DOMAINS,
        "policies/vap/agent-job-policy.yaml guardedLabelDomains"
    );
}

fn agent_job() -> oats::jobs::NewJob {
    common::fixtures::new_job(common::fixtures::request("Check the mounts", 3))
}

/// The store: PostgreSQL from the Secret oats-database (several replicas share one ledger), the
/// SQLite fallback's state directory writable. Base ships a placeholder URL, dev the URL of its
/// own PostgreSQL (with that database's password), prod none (your database, out of band).
#[test]
fn the_store_is_a_shared_postgresql_from_a_secret() {
    for target in TARGETS {
        let docs = render(target);
        let env = api_environment(docs, target);
        let config = oats::config::Config::load(None, env.clone()).unwrap_or_else(|e| panic!("{target}: {e}"));
        let file = config.database_url_file.clone().unwrap_or_else(|| panic!("{target}: no OATS_DATABASE_URL_FILE"));
        assert_eq!(file, std::path::Path::new("/var/run/secrets/oats/database/url"), "{target}");
        let (volume, key) = volume_of(docs, target, file.to_str().unwrap());
        assert_eq!(volume["secret"]["secretName"], DATABASE, "{target}: {volume}");
        assert!(volume["secret"]["optional"] != true, "{target}: replicas must not start without the shared store");

        // OATS_STATE_DIR (SQLite without a database URL) is a writable emptyDir.
        assert_eq!(config.state_dir, std::path::Path::new("/var/lib/oats"), "{target}");
        let pod = &one(docs, "Deployment", "oats-backend-api")["spec"]["template"]["spec"];
        let mount = pod["containers"][0]["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["mountPath"] == "/var/lib/oats")
            .unwrap_or_else(|| panic!("{target}: nothing mounted at OATS_STATE_DIR (read-only root filesystem)"));
        assert!(mount["readOnly"] != true, "{target}: the state directory must be writable");
        let volume = pod["volumes"].as_array().unwrap().iter().find(|v| v["name"] == mount["name"]).unwrap();
        assert!(volume["emptyDir"].is_object(), "{target}: {volume}");

        let secrets: Vec<_> = kind(docs, "Secret").filter(|s| s["metadata"]["name"] == DATABASE).collect();
        if target.ends_with("prod") {
            assert!(secrets.is_empty(), "{target}: a placeholder would overwrite the real database URL on apply");
            // Nothing in prod is a placeholder: every Secret comes from out of band.
            let shipped: Vec<_> = kind(docs, "Secret").map(name).collect();
            assert!(shipped.is_empty(), "{target}: ships Secrets {shipped:?}");
            assert!(kind(docs, "StatefulSet").next().is_none(), "{target}: prod uses an external PostgreSQL");
            continue;
        }
        assert_eq!(secrets.len(), 1, "{target}: Secret {DATABASE}");
        let url = secrets[0]["stringData"][key.as_str()].as_str().unwrap_or_else(|| panic!("{target}: no {key}"));
        assert!(url.starts_with("postgres://"), "{target}: {url}");
        let (credentials, rest) = url["postgres://".len()..].split_once('@').unwrap();
        assert_eq!(rest, "oats-postgres:5432/oats", "{target}: the URL names Service oats-postgres");
        let (user, password) = credentials.split_once(':').unwrap();
        assert_eq!(user, "oats", "{target}");
        if target.ends_with("dev") {
            // The dev database's role and password.
            let postgres = one(docs, "Secret", "oats-postgres");
            assert_eq!(
                postgres["stringData"]["password"], password,
                "{target}: the URL's password is not the database's"
            );
            let container = &one(docs, "StatefulSet", "oats-postgres")["spec"]["template"]["spec"]["containers"][0];
            let var = |n: &str| container["env"].as_array().unwrap().iter().find(|e| e["name"] == n).cloned();
            assert_eq!(var("POSTGRES_USER").unwrap()["value"], user, "{target}");
            assert_eq!(var("POSTGRES_DB").unwrap()["value"], "oats", "{target}");
            assert_eq!(
                var("POSTGRES_PASSWORD").unwrap()["valueFrom"]["secretKeyRef"],
                json!({"name": "oats-postgres", "key": "password"}),
                "{target}"
            );
        } else {
            assert_eq!(password, "REPLACE_ME", "{target}: base ships a placeholder");
            assert!(kind(docs, "StatefulSet").next().is_none(), "{target}: the dev PostgreSQL is not in base");
        }
    }
}

/// The dev overlay's PostgreSQL passes Pod Security "restricted" (which the namespace enforces)
/// and OATS' hardening, with the checker OATS applies to agent Jobs; it gets a Service, a PVC the
/// quota admits and resources the LimitRange admits.
#[test]
fn the_dev_postgresql_is_restricted_and_complete() {
    use oats::backend::kubernetes::pss::{check_hardening, check_restricted};
    let docs = render("infra/overlays/dev");
    let statefulset = one(docs, "StatefulSet", "oats-postgres");
    let template: k8s_openapi::api::core::v1::PodTemplateSpec =
        serde_json::from_value(statefulset["spec"]["template"].clone()).expect("a pod template");
    let violations = check_restricted(&template);
    assert!(violations.is_empty(), "oats-postgres fails Pod Security restricted: {violations:#?}");
    // And OATS' hardening beyond the profile: read-only root filesystem, no service-account token.
    let hardening = check_hardening(&template);
    assert!(hardening.is_empty(), "oats-postgres: {hardening:#?}");

    let spec = &statefulset["spec"]["template"]["spec"];
    let uid = spec["securityContext"]["runAsUser"].as_i64().unwrap();
    assert!([70, 999].contains(&uid), "the postgres image's own user, not {uid}");
    assert_eq!(spec["securityContext"]["runAsNonRoot"], true);
    assert_eq!(spec["securityContext"]["seccompProfile"]["type"], "RuntimeDefault");
    let container = &spec["containers"][0];
    assert_eq!(container["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(container["securityContext"]["capabilities"]["drop"], json!(["ALL"]));
    assert!(container["image"].as_str().unwrap().starts_with("postgres:"), "{}", container["image"]);
    assert_eq!(statefulset["spec"]["replicas"], 1);

    // Data on a PVC (the quota admits it), the Service the URL names.
    let claims = statefulset["spec"]["volumeClaimTemplates"].as_array().expect("volumeClaimTemplates");
    assert_eq!(claims.len(), 1);
    let data = claims[0]["metadata"]["name"].as_str().unwrap();
    assert!(container["volumeMounts"].as_array().unwrap().iter().any(|m| m["name"] == data));
    let quota = &kind(docs, "ResourceQuota").next().unwrap()["spec"]["hard"];
    assert!(quantity(&quota["persistentvolumeclaims"]) >= 1.0, "the dev quota admits no PVC");
    let service = one(docs, "Service", "oats-postgres");
    assert_eq!(service["spec"]["selector"], json!({"app": "oats-postgres"}));
    assert_eq!(service["spec"]["ports"][0]["port"], 5432);
    assert_eq!(statefulset["spec"]["serviceName"], "oats-postgres");
    assert_eq!(statefulset["spec"]["template"]["metadata"]["labels"]["app"], "oats-postgres");

    // Resources within the LimitRange, as every container of the namespace.
    let limits = &kind(docs, "LimitRange").next().unwrap()["spec"]["limits"][0];
    for section in ["requests", "limits"] {
        for key in ["cpu", "memory", "ephemeral-storage"] {
            let v = quantity(&container["resources"][section][key]);
            assert!(v <= quantity(&limits["max"][key]) && v >= quantity(&limits["min"][key]), "{section}.{key}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The Deployment: replicas, probes and the shutdown
// ---------------------------------------------------------------------------------------------

/// Replicas per target, the probes on the paths OATS serves (liveness never on readiness: a
/// lost API server must not restart the pods), and the shutdown the grace period leaves room for.
#[test]
fn the_deployment_runs_its_replicas_with_probes_on_the_served_paths_and_a_grace_period() {
    for (target, replicas) in TARGETS.into_iter().zip([2, 1, 3]) {
        let docs = render(target);
        let deploy = one(docs, "Deployment", "oats-backend-api");
        assert_eq!(deploy["spec"]["replicas"], replicas, "{target}");
        assert_eq!(deploy["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"], 0, "{target}: rolls without a gap");
        let pod = &deploy["spec"]["template"]["spec"];
        assert_eq!(pod["terminationGracePeriodSeconds"], 30, "{target}");
        let api = &pod["containers"][0];
        assert_eq!(api["name"], "api");
        assert_eq!(api["lifecycle"]["preStop"], json!({"sleep": {"seconds": 5}}), "{target}");
        let http = api["ports"].as_array().unwrap().iter().find(|p| p["name"] == "http").unwrap();
        assert_eq!(http["containerPort"], 8000, "{target}");
        assert_eq!(
            api_config(docs)["OATS_LISTEN"],
            "0.0.0.0:8000",
            "{target}: the probes' port is the one OATS listens on"
        );
        let probe = |name: &str| {
            let probe = &api[name];
            assert_eq!(probe["httpGet"]["port"], "http", "{target}: {name}");
            (
                probe["httpGet"]["path"].as_str().unwrap(),
                probe["periodSeconds"].as_i64().unwrap(),
                probe["failureThreshold"].as_i64().unwrap(),
            )
        };
        assert_eq!(probe("startupProbe"), ("/healthz", 2, 30), "{target}: up to 60 s to start");
        assert_eq!(probe("livenessProbe"), ("/healthz", 10, 3), "{target}");
        assert_eq!(probe("readinessProbe"), ("/readyz", 5, 3), "{target}");
    }
}
