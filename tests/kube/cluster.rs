//! The real control plane of `testenv/` (kube-apiserver, etcd, controller-manager, scheduler and
//! kwok on loopback), prepared once per test binary: `infra/base` applied server-side into the
//! restricted namespace `oats`, and a kubeconfig holding a TokenRequest token of the shipped
//! `oats-backend-api` service account, so OATS runs with exactly the RBAC it ships with.
#![allow(dead_code)] // each test binary uses a part

use crate::common::Server;
use serde_json::Value;
use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
    time::{Duration, Instant},
};

pub const NAMESPACE: &str = "oats";

/// A label value unique to this run, so reruns against the same cluster never see old jobs.
pub fn unique(name: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    format!("{name}-{}-{nanos}", std::process::id())
}

/// The prepared control plane.
pub struct Cluster {
    pub dir: PathBuf,
    pub admin_kubeconfig: PathBuf,
    pub oats_kubeconfig: PathBuf,
}

/// The control plane, prepared on first use. Fails the test when none is running: a test that
/// cannot run never passes. `scripts/test.sh` starts one; with `OATS_SKIP_KUBE_E2E=1` it leaves
/// these test binaries out and says so.
pub fn cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(prepare)
}

fn prepare() -> Cluster {
    let dir = std::env::var("OATS_TESTENV_DIR").expect(
        "no control plane (OATS_TESTENV_DIR is not set): run the suite with scripts/test.sh, \
         or `testenv/testenv.sh up && eval \"$(testenv/testenv.sh env)\"`",
    );
    let dir = PathBuf::from(dir);
    let admin_kubeconfig = dir.join("admin.kubeconfig");
    assert!(admin_kubeconfig.exists(), "{} is missing; is testenv up?", admin_kubeconfig.display());
    let cluster = Cluster { oats_kubeconfig: dir.join("oats-backend-api.kubeconfig"), admin_kubeconfig, dir };
    cluster.kubectl_ok(&["apply", "--server-side", "--force-conflicts", "-k", "infra/base"]);
    cluster.wait_for_service_account("oats-backend-api");
    let token = cluster.kubectl_ok(&["create", "token", "oats-backend-api", "-n", NAMESPACE, "--duration=3h"]);
    let token = token.trim().to_owned();
    let server = cluster.kubectl_ok(&["config", "view", "--raw", "-o", "jsonpath={.clusters[0].cluster.server}"]);
    let ca = cluster.kubectl_ok(&[
        "config",
        "view",
        "--raw",
        "-o",
        "jsonpath={.clusters[0].cluster.certificate-authority-data}",
    ]);
    let kubeconfig = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: testenv\n  cluster:\n    server: {server}\n    \
         certificate-authority-data: {ca}\nusers:\n- name: oats-backend-api\n  user:\n    token: {token}\n\
         contexts:\n- name: oats\n  context:\n    cluster: testenv\n    user: oats-backend-api\n    \
         namespace: {NAMESPACE}\ncurrent-context: oats\n"
    );
    std::fs::write(&cluster.oats_kubeconfig, kubeconfig).unwrap();
    cluster
}

impl Cluster {
    /// Run kubectl as the cluster admin.
    pub fn kubectl(&self, args: &[&str]) -> std::process::Output {
        self.kubectl_as(&self.admin_kubeconfig, args)
    }

    pub fn kubectl_as(&self, kubeconfig: &Path, args: &[&str]) -> std::process::Output {
        Command::new("kubectl").arg("--kubeconfig").arg(kubeconfig).args(args).output().expect("kubectl runs")
    }

    /// Run kubectl as the admin and return stdout, failing the test on error.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(
            out.status.success(),
            "kubectl {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn kubectl_json(&self, args: &[&str]) -> Value {
        let mut args = args.to_vec();
        args.extend(["-o", "json"]);
        serde_json::from_str(&self.kubectl_ok(&args)).unwrap()
    }

    fn wait_for_service_account(&self, name: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.kubectl(&["get", "serviceaccount", name, "-n", NAMESPACE]).status.success() {
            assert!(Instant::now() < deadline, "service account {name} never appeared");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The testenv script (to stop and start kube-apiserver).
    pub fn testenv(&self, verb: &str) {
        let status = Command::new("testenv/testenv.sh")
            .arg(verb)
            .env("OATS_TESTENV_DIR", &self.dir)
            .status()
            .expect("testenv.sh runs");
        assert!(status.success(), "testenv.sh {verb} failed");
    }

    /// Start OATS against this cluster as the `oats-backend-api` service account.
    pub async fn start_oats(&self, log_dir: &Path) -> Server {
        self.start_oats_with(log_dir, &[]).await
    }

    /// [`Cluster::start_oats`] with extra environment (which wins over the defaults).
    ///
    /// As shipped, the LLM gateway is on, so every Job is rendered as in a deployment (the
    /// gateway's projected token and address, no Secret): a providers file whose one provider
    /// is a dummy address nothing listens on, the gateway on a port of its own (port 0), and a state
    /// directory (the SQLite store) per server. Tests that call the gateway override the three.
    pub async fn start_oats_with(&self, log_dir: &Path, extra: &[(&str, &str)]) -> Server {
        std::fs::create_dir_all(log_dir).unwrap();
        let providers = log_dir.join("default-providers.yaml");
        std::fs::write(
            &providers,
            "providers:\n  - name: dummy\n    base_url: http://127.0.0.1:9/v1\n    models:\n      - name: dummy-model\n",
        )
        .unwrap();
        let state = tempfile::Builder::new().prefix("oats-state-").tempdir_in(log_dir).unwrap().keep();
        let mut env = vec![
            ("OATS_BACKEND".to_owned(), "kubernetes".to_owned()),
            ("OATS_NAMESPACE".to_owned(), NAMESPACE.to_owned()),
            ("KUBECONFIG".to_owned(), self.oats_kubeconfig.display().to_string()),
            ("OATS_LOG_FORMAT".to_owned(), "json".to_owned()),
            ("OATS_LLM_PROVIDERS_FILE".to_owned(), providers.display().to_string()),
            ("OATS_LLM_LISTEN".to_owned(), "127.0.0.1:0".to_owned()),
            ("OATS_STATE_DIR".to_owned(), state.display().to_string()),
            // Every test's server watches the whole test namespace; without a shared database
            // each would archive every other test's jobs (and its Kubernetes call counts would
            // include that). The history tests turn it on.
            ("OATS_RETENTION_DAYS".to_owned(), "0".to_owned()),
        ];
        for (key, value) in extra {
            env.retain(|(k, _)| k != key);
            env.push((key.to_string(), value.to_string()));
        }
        Server::start(env, log_dir).await
    }

    /// Jobs with a label, as the admin sees them.
    pub fn jobs_labelled(&self, selector: &str) -> Vec<Value> {
        let list = self.kubectl_json(&["get", "jobs", "-n", NAMESPACE, "-l", selector]);
        list["items"].as_array().unwrap().clone()
    }
}

/// A namespace of one test, deleted when the guard drops (also when the test fails), with the
/// agents' service account in it. OATS runs there as the cluster admin: the shipped Role is
/// bound in `oats` only. Metrics of an OATS watching it count this test's Jobs and nothing else.
pub struct TestNamespace {
    pub cluster: &'static Cluster,
    pub name: String,
}

impl TestNamespace {
    pub fn create(cluster: &'static Cluster, prefix: &str) -> Self {
        let name = unique(prefix);
        cluster.kubectl_ok(&["create", "namespace", &name]);
        let guard = Self { cluster, name };
        guard.cluster.kubectl_ok(&["create", "serviceaccount", "oats-agent", "-n", &guard.name]);
        guard
    }

    /// OATS (the admin's kubeconfig) with its agents' Jobs in this namespace.
    pub async fn start_oats(&self, log_dir: &Path, extra: &[(&str, &str)]) -> Server {
        let kubeconfig = self.cluster.admin_kubeconfig.display().to_string();
        let mut env = vec![("KUBECONFIG", kubeconfig.as_str()), ("OATS_NAMESPACE", self.name.as_str())];
        env.extend_from_slice(extra);
        self.cluster.start_oats_with(log_dir, &env).await
    }

    /// The Jobs in this namespace.
    pub fn jobs(&self) -> Vec<Value> {
        let list = self.cluster.kubectl_json(&["get", "jobs", "-n", &self.name]);
        list["items"].as_array().unwrap().clone()
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        let _ = self.cluster.kubectl(&["delete", "namespace", &self.name, "--wait=false"]);
    }
}

/// Deletes, when dropped (also when the test fails), the Jobs (and their pods) a test labelled
/// with `selector`, so the cluster stays small.
pub struct JobsCleanup {
    cluster: &'static Cluster,
    selector: String,
}

impl Cluster {
    /// The Jobs labelled `e2e=<run>` are deleted when the returned guard drops.
    pub fn delete_jobs_on_drop(&'static self, run: &str) -> JobsCleanup {
        JobsCleanup { cluster: self, selector: format!("e2e={run}") }
    }
}

impl Drop for JobsCleanup {
    fn drop(&mut self) {
        let _ = self.cluster.kubectl(&[
            "delete",
            "jobs",
            "-n",
            NAMESPACE,
            "-l",
            &self.selector,
            "--cascade=background",
            "--wait=false",
        ]);
    }
}
