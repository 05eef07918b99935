//! Offline analysis of the NetworkPolicies of `infra/overlays/dev` (the base's, plus the dev
//! PostgreSQL's) with np-guard's netpol-analyzer (`netpolicy`, built from its Go module by
//! `testenv/netpol.sh`, cached). No cluster, no CNI: the analyzer computes which connections the
//! policies allow between the workloads and namespaces written to a temp directory:
//!
//! - the rendered `infra/overlays/dev` (Namespace `oats`, the API Deployment, the PostgreSQL
//!   StatefulSet, the NetworkPolicies),
//! - one agent Job rendered by the library (`render_job`) plus a Pod of its template (`eval`
//!   needs Pod names), a Pod of the API Deployment's template, a Pod of the StatefulSet's,
//! - the peers the policies talk about: CoreDNS in kube-system, Prometheus in monitoring, the
//!   ingress controller in ingress-nginx, an OTLP collector in observability, a vLLM in `vllm`
//!   (an in-cluster LLM provider), a Keycloak in `keycloak` (an in-cluster OIDC identity
//!   provider) beside its database, and two pods the policies must keep out (an unlabelled pod in
//!   `oats`, a pod in `default`).
//!
//! A second directory adds the opt-in components' NetworkPolicies (`infra/components/*`: agents
//! on public HTTPS, the API to the in-cluster provider, the API to the identity provider), read
//! from their files (a component is only built from an overlay that lists it), plus the identity
//! provider's rule in its by-address form (an ipBlock, Helm `networkPolicy.identityProvider.cidrs`).
//!
//! Analyzer limits worked around here (netpol-analyzer v1.4.4):
//! - IPv4 only, and an IPv6 `ipBlock` is silently misread as an IPv4 range (its first 32 bits:
//!   `::/0` becomes 0.0.0.0/0, `fc00::/7` 252.0.0.0/7), which would make the agent's IPv6 rule
//!   look like "any IPv4 address on 443". So IPv6 peers are removed from the copy analysed here
//!   (a rule is dropped, never widened, if nothing else is left in it); tests/artefacts/manifests.rs checks
//!   the IPv6 rule's exceptions structurally.
//! - `eval --source-ip` is rejected unless a destination IP is given too, so ingress from
//!   outside the cluster is checked in the `list` output instead.
//!
//! Needs Go (to build the analyzer once) and kubectl; fails, never skips, without them.

use crate::common;

use common::fixtures;
use oats::{
    backend::kubernetes::render::{AgentTemplate, render_job},
    config::Config,
    jobs::{JobRequest, NewJob},
};
use serde_json::{Value, json};
use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

const NS: &str = "oats";
const AGENT: &str = "agent";
const API: &str = "api";
const POSTGRES: &str = "postgres";
/// The LLM gateway's port on the API pods.
const GATEWAY: u16 = 8001;
/// The in-cluster OIDC identity provider of infra/components/oidc-identity-provider: namespace,
/// pod, HTTPS port.
const IDP_NS: &str = "keycloak";
const IDP: &str = "keycloak";
const IDP_PORT: u16 = 8443;
/// An identity provider outside the cluster on a private address (the by-address form).
const IDP_ADDRESS: &str = "10.20.0.15";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn run(program: &str, args: &[&str]) -> std::process::Output {
    Command::new(program)
        .args(args)
        .current_dir(root())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

fn text(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// The analyzer binary (built on first use) and the fixture directories, once per test binary:
/// `dir` as shipped, `opt_in` with the components too.
struct Analysis {
    netpolicy: PathBuf,
    dir: tempfile::TempDir,
    opt_in: tempfile::TempDir,
}

/// Which fixture a query runs against.
#[derive(Clone, Copy)]
enum Fixture {
    Shipped,
    OptIn,
}

fn analysis() -> &'static Analysis {
    static ANALYSIS: OnceLock<Analysis> = OnceLock::new();
    ANALYSIS.get_or_init(|| {
        let out = run("testenv/netpol.sh", &[]);
        assert!(
            out.status.success(),
            "testenv/netpol.sh could not build np-guard's netpol-analyzer (needs Go and the Go module proxy):\n{}",
            text(&out)
        );
        let netpolicy = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
        assert!(netpolicy.is_file(), "testenv/netpol.sh printed {netpolicy:?}, which is not a file");
        let dir = tempfile::tempdir().unwrap();
        write_fixtures(dir.path(), &[]);
        let opt_in = tempfile::tempdir().unwrap();
        write_fixtures(
            opt_in.path(),
            &[
                "infra/components/agents-public-https",
                "infra/components/llm-in-cluster-provider",
                "infra/components/oidc-identity-provider",
            ],
        );
        append_identity_provider_by_address(opt_in.path());
        Analysis { netpolicy, dir, opt_in }
    })
}

// ---------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------

/// The rendered dev overlay, plus the NetworkPolicy of each component of `components`.
fn write_fixtures(dir: &Path, components: &[&str]) {
    let out = run("kubectl", &["kustomize", "infra/overlays/dev"]);
    assert!(out.status.success(), "kubectl kustomize infra/overlays/dev: {}", text(&out));
    let mut rendered: Vec<Value> = serde_saphyr::from_multiple(&String::from_utf8(out.stdout).unwrap()).unwrap();
    for component in components {
        let path = root().join(component).join("networkpolicy.yaml");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        rendered.push(serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display())));
    }

    let mut docs: Vec<Value> = Vec::new();
    let mut policies = 0;
    for mut doc in rendered.into_iter().filter(|d| !d.is_null()) {
        match doc["kind"].as_str().unwrap_or("") {
            "NetworkPolicy" => {
                policies += 1;
                drop_ipv6_peers(&mut doc);
                docs.push(doc);
            }
            "Namespace" => docs.push(doc),
            kind @ ("Deployment" | "StatefulSet") => {
                // A Pod with the workload's template, for `eval`.
                let name = if kind == "Deployment" { API } else { POSTGRES };
                let template = &doc["spec"]["template"];
                docs.push(pod(name, NS, &template["metadata"]["labels"], template["spec"].clone()));
                docs.push(doc);
            }
            _ => {}
        }
    }
    assert_eq!(
        policies,
        5 + components.len(),
        "expected the four NetworkPolicies of infra/base, the dev PostgreSQL's and one per component"
    );

    // The agent: exactly the Job OATS renders, and a Pod of its template.
    let job = serde_json::to_value(render_job(&agent_job(), &AgentTemplate::from_config(&agent_config(), NS))).unwrap();
    let template = &job["spec"]["template"];
    docs.push(pod(AGENT, NS, &template["metadata"]["labels"], template["spec"].clone()));
    docs.push(job);
    // An agent whose profile grants public HTTPS, as OATS renders it.
    let mut web = agent_job();
    web.resources = Some(oats::jobs::policy::ResourceProfile {
        cpu_request: "250m".into(),
        cpu_limit: "1".into(),
        memory_request: "256Mi".into(),
        memory_limit: "512Mi".into(),
        image: None,
        command: None,
        egress: Some(oats::jobs::policy::Egress::PublicHttps),
    });
    let web = serde_json::to_value(render_job(&web, &AgentTemplate::from_config(&agent_config(), NS))).unwrap();
    let template = &web["spec"]["template"];
    docs.push(pod(WEB_AGENT, NS, &template["metadata"]["labels"], template["spec"].clone()));

    for (ns, name, labels) in [
        ("kube-system", "coredns", json!({"k8s-app": "kube-dns"})),
        ("monitoring", "prometheus", json!({"app.kubernetes.io/name": "prometheus"})),
        ("ingress-nginx", "ingress-controller", json!({"app.kubernetes.io/name": "ingress-nginx"})),
        ("observability", "otel-collector", json!({"app.kubernetes.io/name": "opentelemetry-collector"})),
        ("vllm", "vllm", json!({"app.kubernetes.io/name": "vllm"})),
        (IDP_NS, IDP, json!({"app.kubernetes.io/name": "keycloak"})),
        ("default", "intruder", json!({"app": "intruder"})),
    ] {
        docs.push(json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": ns, "labels": {"kubernetes.io/metadata.name": ns}},
        }));
        docs.push(pod(name, ns, &labels, json!({"containers": [{"name": "main", "image": "example:1"}]})));
    }
    // The identity provider's database, beside it: not the IdP.
    docs.push(pod(
        "keycloak-postgres",
        IDP_NS,
        &json!({"app.kubernetes.io/name": "postgresql"}),
        json!({"containers": [{"name": "main", "image": "example:1"}]}),
    ));
    // A pod in `oats` that none of the allow policies selects: default deny applies.
    docs.push(pod(
        "neighbour",
        NS,
        &json!({"app": "debug"}),
        json!({"containers": [{"name": "main", "image": "example:1"}]}),
    ));

    let yaml: Vec<String> = docs.iter().map(|d| serde_saphyr::to_string(d).unwrap()).collect();
    std::fs::write(dir.join("resources.yaml"), yaml.join("---\n")).unwrap();
}

/// The identity provider's rule in its by-address form, as the component's comment says to
/// write it and as Helm renders `networkPolicy.identityProvider.cidrs`: the component's policy
/// with an ipBlock of [`IDP_ADDRESS`] on 443 for its `to` and ports.
fn append_identity_provider_by_address(dir: &Path) {
    let path = root().join("infra/components/oidc-identity-provider/networkpolicy.yaml");
    let mut policy: Value = serde_saphyr::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    policy["metadata"]["name"] = json!("oats-backend-api-identity-provider-by-address");
    policy["spec"]["egress"] = json!([{
        "to": [{"ipBlock": {"cidr": format!("{IDP_ADDRESS}/32")}}],
        "ports": [{"protocol": "TCP", "port": 443}],
    }]);
    let resources = dir.join("resources.yaml");
    let mut yaml = std::fs::read_to_string(&resources).unwrap();
    yaml.push_str("---\n");
    yaml.push_str(&serde_saphyr::to_string(&policy).unwrap());
    std::fs::write(resources, yaml).unwrap();
}

fn pod(name: &str, namespace: &str, labels: &Value, spec: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": spec,
    })
}

fn agent_config() -> Config {
    Config {
        llm_secret_name: Some("oats-llm-credentials".into()),
        llm_secret_keys: vec!["api-key".into()],
        ..Config::default()
    }
}

fn agent_job() -> NewJob {
    let request = JobRequest { timeout_seconds: Some(600), ..fixtures::request("Probe the network policies", 3) };
    fixtures::new_job(request)
}

/// Remove IPv6 ipBlock peers (the analyzer misreads them, see the module doc). A rule whose
/// peer list would become empty is removed: an empty `to`/`from` would mean "everywhere".
fn drop_ipv6_peers(policy: &mut Value) {
    for (direction, peers_key) in [("egress", "to"), ("ingress", "from")] {
        let Some(rules) = policy["spec"][direction].as_array_mut() else { continue };
        rules.retain_mut(|rule| {
            let Some(peers) = rule[peers_key].as_array_mut() else { return true };
            let before = peers.len();
            peers.retain(|p| !p["ipBlock"]["cidr"].as_str().is_some_and(|c| c.contains(':')));
            !(before > 0 && peers.is_empty())
        });
    }
}

// ---------------------------------------------------------------------------------------------
// Queries
// ---------------------------------------------------------------------------------------------

enum Peer<'a> {
    Pod(&'a str, &'a str),
    Ip(&'a str),
}

/// `netpolicy eval`: is a connection from pod `src` to `dst` on `protocol/port` allowed, as shipped?
fn allowed(src: (&str, &str), dst: Peer, protocol: &str, port: u16) -> bool {
    allowed_in(Fixture::Shipped, src, dst, protocol, port)
}

/// The same, in `fixture`.
fn allowed_in(fixture: Fixture, src: (&str, &str), dst: Peer, protocol: &str, port: u16) -> bool {
    let a = analysis();
    let dir = match fixture {
        Fixture::Shipped => &a.dir,
        Fixture::OptIn => &a.opt_in,
    };
    let dirpath = dir.path().to_str().unwrap();
    let port = port.to_string();
    let mut args = vec!["eval", "--dirpath", dirpath, "-n", src.0, "-s", src.1, "-p", &port, "--protocol", protocol];
    match dst {
        Peer::Pod(ns, name) => args.extend(["--destination-namespace", ns, "-d", name]),
        Peer::Ip(ip) => args.extend(["--destination-ip", ip]),
    }
    let out = Command::new(&a.netpolicy).args(&args).output().expect("netpolicy runs");
    let said = text(&out);
    assert!(out.status.success(), "netpolicy {}: {said}", args.join(" "));
    // e.g. "oats/agent => 8.8.8.8 over tcp/443: true"
    let line = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.contains(" => ") && l.contains(" over "))
        .unwrap_or_else(|| panic!("netpolicy {}: no verdict in {said}", args.join(" ")))
        .to_owned();
    match line.rsplit(": ").next() {
        Some("true") => true,
        Some("false") => false,
        _ => panic!("netpolicy {}: cannot read {line:?}", args.join(" ")),
    }
}

/// `netpolicy list -o json`: every allowed connection as (src, dst, conn).
fn connections() -> &'static [(String, String, String)] {
    static LIST: OnceLock<Vec<(String, String, String)>> = OnceLock::new();
    LIST.get_or_init(|| {
        let a = analysis();
        let out = Command::new(&a.netpolicy)
            .args(["list", "--dirpath", a.dir.path().to_str().unwrap(), "-o", "json"])
            .output()
            .expect("netpolicy runs");
        assert!(out.status.success(), "netpolicy list: {}", text(&out));
        let list: Vec<Value> = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("netpolicy list -o json: {e}: {}", text(&out)));
        assert!(!list.is_empty(), "netpolicy list found no connection at all: {}", text(&out));
        list.iter()
            .map(|c| {
                let s = |k: &str| c[k].as_str().unwrap_or_else(|| panic!("no {k} in {c}")).to_owned();
                (s("src"), s("dst"), s("conn"))
            })
            .collect()
    })
}

const AGENT_SRC: (&str, &str) = (NS, AGENT);
const API_SRC: (&str, &str) = (NS, API);

// ---------------------------------------------------------------------------------------------
// Agents
// ---------------------------------------------------------------------------------------------

/// The agent whose profile grants `egress: public-https`.
const WEB_AGENT: &str = "web-agent";

#[test]
fn a_profile_with_public_https_opens_public_443_for_its_agents_only() {
    for ip in ["8.8.8.8", "140.82.112.3"] {
        assert!(allowed((NS, WEB_AGENT), Peer::Ip(ip), "tcp", 443), "the web agent cannot reach {ip}:443");
        assert!(!allowed((NS, WEB_AGENT), Peer::Ip(ip), "tcp", 80), "the web agent reaches {ip}:80");
        assert!(!allowed((NS, AGENT), Peer::Ip(ip), "tcp", 443), "a plain agent reaches {ip}:443");
    }
    for ip in ["10.96.0.1", "169.254.169.254", "192.168.1.1"] {
        assert!(!allowed((NS, WEB_AGENT), Peer::Ip(ip), "tcp", 443), "the web agent reaches private {ip}");
    }
}

#[test]
fn the_agent_reaches_the_llm_gateway_and_dns_only() {
    assert!(allowed(AGENT_SRC, Peer::Pod(NS, API), "tcp", GATEWAY), "the agent cannot reach the gateway");
    for protocol in ["udp", "tcp"] {
        assert!(allowed(AGENT_SRC, Peer::Pod("kube-system", "coredns"), protocol, 53), "agent DNS over {protocol}");
    }
    // No internet: the gateway calls the providers, the agent never does.
    for ip in ["8.8.8.8", "1.1.1.1", "140.82.112.3"] {
        for (protocol, port) in [("tcp", 443), ("tcp", 80), ("udp", 443), ("tcp", 22)] {
            assert!(!allowed(AGENT_SRC, Peer::Ip(ip), protocol, port), "the agent reaches {ip} {protocol}/{port}");
        }
    }
    // The API's other ports: the REST API, metrics.
    for port in [8000, 9090, 443] {
        assert!(!allowed(AGENT_SRC, Peer::Pod(NS, API), "tcp", port), "the agent reaches the API on {port}");
    }
}

#[test]
fn the_agent_cannot_reach_metadata_private_ranges_or_the_cluster() {
    // Cloud metadata, the Kubernetes API ClusterIP, and every private / CGNAT / link-local
    // range (first, inner and last addresses).
    let blocked = [
        "169.254.169.254",
        "169.254.0.1",
        "169.254.255.254",
        "10.96.0.1",
        "10.0.0.1",
        "10.255.255.254",
        "172.16.0.1",
        "172.20.1.1",
        "172.31.255.254",
        "192.168.0.1",
        "192.168.255.254",
        "100.64.0.1",
        "100.127.255.254",
    ];
    for ip in blocked {
        for port in [443, 80, GATEWAY] {
            assert!(!allowed(AGENT_SRC, Peer::Ip(ip), "tcp", port), "the agent reaches {ip}:{port}");
        }
    }
    for (ns, pod, port) in [
        (NS, "neighbour", 443),
        (NS, "neighbour", GATEWAY),
        (NS, POSTGRES, 5432),
        ("monitoring", "prometheus", 9090),
        ("observability", "otel-collector", 4317),
        ("ingress-nginx", "ingress-controller", 443),
        ("default", "intruder", 443),
        ("kube-system", "coredns", 443),
        ("vllm", "vllm", 8000),
    ] {
        assert!(!allowed(AGENT_SRC, Peer::Pod(ns, pod), "tcp", port), "the agent reaches {ns}/{pod}:{port}");
    }
}

#[test]
fn nothing_connects_to_the_agent() {
    for (ns, pod) in [
        (NS, API),
        (NS, POSTGRES),
        (NS, "neighbour"),
        ("monitoring", "prometheus"),
        ("ingress-nginx", "ingress-controller"),
        ("kube-system", "coredns"),
        ("default", "intruder"),
    ] {
        for port in [443, 8000, 8080, GATEWAY] {
            assert!(!allowed((ns, pod), Peer::Pod(NS, AGENT), "tcp", port), "{ns}/{pod} reaches the agent on {port}");
        }
    }
    // From anywhere, IP ranges included: no connection ends at the agent Pod or Job.
    let into_agent: Vec<_> = connections()
        .iter()
        .filter(|(_, dst, _)| dst.starts_with(&format!("{NS}/{AGENT}[")) || dst.ends_with("[Job]"))
        .collect();
    assert!(into_agent.is_empty(), "connections into the agent: {into_agent:#?}");
    // ... while the agent's own egress shows up (the analysis did see the agent): the gateway.
    let from_agent: Vec<_> = connections().iter().filter(|(src, _, _)| src == &format!("{NS}/{AGENT}[Pod]")).collect();
    assert!(
        from_agent.iter().any(|(_, dst, conn)| dst == &format!("{NS}/{API}[Pod]") && conn.contains("8001")),
        "{from_agent:#?}"
    );
    // ... and nothing else but DNS: no IP range at all, no other workload.
    let api_workloads = [format!("{NS}/{API}["), format!("{NS}/oats-backend-api[")];
    for (_, dst, _) in &from_agent {
        assert!(
            api_workloads.iter().any(|w| dst.starts_with(w.as_str())) || dst.starts_with("kube-system/coredns["),
            "the agent reaches {dst}: {from_agent:#?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// API
// ---------------------------------------------------------------------------------------------

#[test]
fn prometheus_scrapes_the_ingress_controller_and_the_agents_reach_the_api_nobody_else() {
    assert!(allowed(("monitoring", "prometheus"), Peer::Pod(NS, API), "tcp", 9090), "Prometheus cannot scrape 9090");
    assert!(!allowed(("monitoring", "prometheus"), Peer::Pod(NS, API), "tcp", 8000));
    assert!(!allowed(("monitoring", "prometheus"), Peer::Pod(NS, API), "tcp", GATEWAY));
    assert!(allowed(("ingress-nginx", "ingress-controller"), Peer::Pod(NS, API), "tcp", 8000), "ingress -> 8000");
    assert!(!allowed(("ingress-nginx", "ingress-controller"), Peer::Pod(NS, API), "tcp", 9090));
    assert!(!allowed(("ingress-nginx", "ingress-controller"), Peer::Pod(NS, API), "tcp", GATEWAY));
    // The gateway's port: the agents only.
    assert!(allowed(AGENT_SRC, Peer::Pod(NS, API), "tcp", GATEWAY), "agent -> gateway");
    for (ns, pod) in [
        (NS, "neighbour"),
        (NS, POSTGRES),
        ("default", "intruder"),
        ("observability", "otel-collector"),
        ("vllm", "vllm"),
    ] {
        for port in [8000, 9090, GATEWAY] {
            assert!(!allowed((ns, pod), Peer::Pod(NS, API), "tcp", port), "{ns}/{pod} reaches the API on {port}");
        }
    }
    // No IP range (outside the cluster) reaches the API directly.
    let from_ips: Vec<_> =
        connections().iter().filter(|(src, dst, _)| !src.contains('/') && dst.starts_with(&format!("{NS}/"))).collect();
    assert!(from_ips.is_empty(), "external addresses reach pods in {NS}: {from_ips:#?}");
}

#[test]
fn the_api_reaches_dns_the_kubernetes_api_the_collector_the_providers_and_postgresql_only() {
    for port in [443, 6443] {
        assert!(allowed(API_SRC, Peer::Ip("10.96.0.1"), "tcp", port), "API -> kube-apiserver :{port}");
    }
    assert!(allowed(API_SRC, Peer::Pod("kube-system", "coredns"), "udp", 53));
    for (ns, pod) in [("observability", "otel-collector"), ("monitoring", "prometheus")] {
        for port in [4317, 4318] {
            assert!(allowed(API_SRC, Peer::Pod(ns, pod), "tcp", port), "API -> {ns}/{pod}:{port}");
        }
    }
    // The LLM providers: HTTPS on public addresses.
    for ip in ["8.8.8.8", "104.18.6.192", "140.82.112.3"] {
        assert!(allowed(API_SRC, Peer::Ip(ip), "tcp", 443), "the API cannot reach the provider at {ip}:443");
        assert!(!allowed(API_SRC, Peer::Ip(ip), "tcp", 80), "the API reaches {ip}:80");
    }
    // ... never private ranges, metadata or other cluster addresses.
    for ip in ["10.96.0.2", "10.0.0.1", "172.16.0.1", "192.168.1.1", "100.64.0.1", "169.254.169.254"] {
        for port in [443, 80, 5432] {
            assert!(!allowed(API_SRC, Peer::Ip(ip), "tcp", port), "the API reaches {ip}:{port}");
        }
    }
    // PostgreSQL (the store), on its port only.
    assert!(allowed(API_SRC, Peer::Pod(NS, POSTGRES), "tcp", 5432), "the API cannot reach PostgreSQL");
    assert!(!allowed(API_SRC, Peer::Pod(NS, POSTGRES), "tcp", 22));
    for (ns, pod, port) in [
        (NS, AGENT, 8080),
        (NS, AGENT, GATEWAY),
        ("default", "intruder", 443),
        ("default", "intruder", 5432),
        ("observability", "otel-collector", 80),
        ("vllm", "vllm", 8000),
    ] {
        assert!(!allowed(API_SRC, Peer::Pod(ns, pod), "tcp", port), "the API reaches {ns}/{pod}:{port}");
    }
}

#[test]
fn postgresql_admits_the_api_only_and_reaches_nothing() {
    for (ns, pod) in [(NS, AGENT), (NS, "neighbour"), ("default", "intruder"), ("monitoring", "prometheus")] {
        assert!(!allowed((ns, pod), Peer::Pod(NS, POSTGRES), "tcp", 5432), "{ns}/{pod} reaches PostgreSQL");
    }
    for (ip, port) in [("8.8.8.8", 443), ("10.96.0.1", 443)] {
        assert!(!allowed((NS, POSTGRES), Peer::Ip(ip), "tcp", port), "PostgreSQL reaches {ip}:{port}");
    }
    assert!(!allowed((NS, POSTGRES), Peer::Pod("kube-system", "coredns"), "udp", 53));
    assert!(!allowed((NS, POSTGRES), Peer::Pod(NS, API), "tcp", 8000));
}

#[test]
fn other_pods_in_the_namespace_are_denied_both_ways() {
    for (ip, protocol, port) in [("8.8.8.8", "tcp", 443), ("10.96.0.1", "tcp", 443)] {
        assert!(!allowed((NS, "neighbour"), Peer::Ip(ip), protocol, port), "neighbour reaches {ip}:{port}");
    }
    assert!(!allowed((NS, "neighbour"), Peer::Pod("kube-system", "coredns"), "udp", 53));
    assert!(!allowed(("default", "intruder"), Peer::Pod(NS, "neighbour"), "tcp", 443));
}

// ---------------------------------------------------------------------------------------------
// Opt-in components
// ---------------------------------------------------------------------------------------------

#[test]
fn the_opt_ins_open_public_https_for_agents_and_the_in_cluster_provider_for_the_api() {
    let opt_in = |src, dst, protocol, port| allowed_in(Fixture::OptIn, src, dst, protocol, port);
    // agents-public-https: public HTTPS, still nothing private, still no other port.
    for ip in ["8.8.8.8", "140.82.112.3"] {
        assert!(opt_in(AGENT_SRC, Peer::Ip(ip), "tcp", 443), "agents-public-https: the agent cannot reach {ip}:443");
        assert!(!opt_in(AGENT_SRC, Peer::Ip(ip), "tcp", 80), "agents-public-https: the agent reaches {ip}:80");
    }
    for ip in ["169.254.169.254", "10.96.0.1", "10.0.0.1", "172.16.0.1", "192.168.0.1", "100.64.0.1"] {
        assert!(!opt_in(AGENT_SRC, Peer::Ip(ip), "tcp", 443), "agents-public-https: the agent reaches {ip}:443");
    }
    assert!(opt_in(AGENT_SRC, Peer::Pod(NS, API), "tcp", GATEWAY));
    assert!(!opt_in(AGENT_SRC, Peer::Pod(NS, API), "tcp", 8000));
    assert!(!opt_in(AGENT_SRC, Peer::Pod(NS, POSTGRES), "tcp", 5432));
    assert!(!opt_in(AGENT_SRC, Peer::Pod("vllm", "vllm"), "tcp", 8000), "the in-cluster provider is the API's only");
    // llm-in-cluster-provider: the API reaches vLLM on its port, nothing else there.
    assert!(opt_in(API_SRC, Peer::Pod("vllm", "vllm"), "tcp", 8000), "llm-in-cluster-provider: API -> vllm:8000");
    assert!(!opt_in(API_SRC, Peer::Pod("vllm", "vllm"), "tcp", 22));
    assert!(!opt_in(API_SRC, Peer::Pod("default", "intruder"), "tcp", 8000));
    // Nothing else changes: nobody else reaches the agents or the API.
    assert!(!opt_in(("vllm", "vllm"), Peer::Pod(NS, API), "tcp", GATEWAY));
    assert!(!opt_in((NS, API), Peer::Pod(NS, AGENT), "tcp", 443));
}

#[test]
fn the_api_reaches_a_configured_identity_provider_only_with_the_opt_in_and_on_its_port_only() {
    let opt_in = |src, dst, protocol, port| allowed_in(Fixture::OptIn, src, dst, protocol, port);
    // As shipped: an IdP in the cluster or on a private address is out of reach (the public-HTTPS
    // rule excludes both), so an issuer there needs the opt-in.
    for port in [IDP_PORT, 443, 8080] {
        assert!(!allowed(API_SRC, Peer::Pod(IDP_NS, IDP), "tcp", port), "as shipped the API reaches the IdP on {port}");
    }
    assert!(!allowed(API_SRC, Peer::Ip(IDP_ADDRESS), "tcp", 443), "as shipped the API reaches {IDP_ADDRESS}:443");

    // infra/components/oidc-identity-provider: the IdP's pods, on its port only.
    assert!(opt_in(API_SRC, Peer::Pod(IDP_NS, IDP), "tcp", IDP_PORT), "the API cannot reach the IdP on {IDP_PORT}");
    for port in [443, 8080, 9000, 22] {
        assert!(!opt_in(API_SRC, Peer::Pod(IDP_NS, IDP), "tcp", port), "the API reaches the IdP on {port}");
    }
    assert!(!opt_in(API_SRC, Peer::Pod(IDP_NS, IDP), "udp", IDP_PORT));
    // Nothing else in its namespace or elsewhere on that port.
    for (ns, pod) in [(IDP_NS, "keycloak-postgres"), ("default", "intruder"), (NS, "neighbour"), ("vllm", "vllm")] {
        assert!(!opt_in(API_SRC, Peer::Pod(ns, pod), "tcp", IDP_PORT), "the API reaches {ns}/{pod}:{IDP_PORT}");
    }
    // By address (Helm networkPolicy.identityProvider.cidrs): that address, on its port.
    assert!(opt_in(API_SRC, Peer::Ip(IDP_ADDRESS), "tcp", 443), "the API cannot reach {IDP_ADDRESS}:443");
    assert!(!opt_in(API_SRC, Peer::Ip(IDP_ADDRESS), "tcp", 80));
    for ip in ["10.20.0.16", "10.96.0.2", "169.254.169.254"] {
        assert!(!opt_in(API_SRC, Peer::Ip(ip), "tcp", 443), "the API reaches {ip}:443");
    }
    // Only the API gains anything: the agents and other pods still cannot reach the IdP.
    for src in [AGENT_SRC, (NS, WEB_AGENT), (NS, "neighbour"), (NS, POSTGRES)] {
        assert!(!opt_in(src, Peer::Pod(IDP_NS, IDP), "tcp", IDP_PORT), "{src:?} reaches the IdP");
        assert!(!opt_in(src, Peer::Ip(IDP_ADDRESS), "tcp", 443), "{src:?} reaches {IDP_ADDRESS}");
    }
    // ... and nothing reaches the API from there.
    assert!(!opt_in((IDP_NS, IDP), Peer::Pod(NS, API), "tcp", 8000));
}
