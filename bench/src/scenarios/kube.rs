//! Scenario 3 (`POST /api/v1/jobs` on the test control plane vs creating the same Job with a
//! kube client) and 6k (the memory and start-up of the Kubernetes watch cache).

use crate::{
    Bench,
    load::Target,
    procs::{proc_cpu, proc_status, settled_rss},
    seed::goal_text,
};
use anyhow::{Result, anyhow, bail};
use chrono::Utc;
use futures::StreamExt;
use oats::jobs::{JobId, JobLimits, JobRequest, NewJob};
use reqwest::Client;
use serde_json::json;
use std::{
    collections::BTreeMap,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

impl Bench {
    pub(crate) async fn kube_scenarios(&mut self, kubeconfig: Option<PathBuf>, s3: bool, s6k: bool) -> Result<()> {
        println!("== Kubernetes scenarios (3: POST vs direct create; 6k: watch-cache memory)");
        let testenv = match kubeconfig {
            Some(path) => TestEnv { dir: None, kubeconfig: path },
            None => TestEnv::up().await?,
        };
        let result = self.kube_inner(&testenv.kubeconfig, s3, s6k).await;
        testenv.down();
        result
    }

    pub(crate) async fn kube_inner(&mut self, kubeconfig: &Path, s3: bool, s6k: bool) -> Result<()> {
        use k8s_openapi::api::{
            batch::v1::Job,
            core::v1::{Namespace, ServiceAccount},
        };
        use kube::{Api, api::PostParams};
        let options = kube::config::KubeConfigOptions::default();
        let kc = kube::config::Kubeconfig::read_from(kubeconfig)?;
        let client = kube::Client::try_from(kube::Config::from_custom_kubeconfig(kc, &options).await?)?;
        let suffix: String = JobId::random().as_str()[4..12].to_owned();
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let make_ns = |name: String| {
            let namespaces = namespaces.clone();
            let client = client.clone();
            async move {
                namespaces
                    .create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": name}}))?)
                    .await?;
                let sas: Api<ServiceAccount> = Api::namespaced(client, &name);
                sas.create(
                    &PostParams::default(),
                    &serde_json::from_value(json!({"metadata": {"name": "oats-agent"}}))?,
                )
                .await?;
                anyhow::Ok(name)
            }
        };
        let kube_env = |ns: &str| -> Vec<(String, String)> {
            vec![
                ("OATS_BACKEND".into(), "kubernetes".into()),
                ("OATS_NAMESPACE".into(), ns.into()),
                ("KUBECONFIG".into(), kubeconfig.display().to_string()),
                ("OATS_LOG_FORMAT".into(), "json".into()),
            ]
        };
        let config = oats::config::Config::default();
        let request = || JobRequest {
            goal: goal_text(0),
            max_turns: 5,
            labels: BTreeMap::from([("kwok.oats.dev/outcome".to_owned(), "run".to_owned())]),
            ..Default::default()
        };
        let new_job = |template_ns: &str| -> Result<Job> {
            let spec = request().validate(&JobLimits::default()).map_err(|e| anyhow!("invalid request: {e:?}"))?;
            let job = NewJob {
                id: JobId::random(),
                tenant: config.tenant.clone(),
                request_hash: spec.fingerprint(),
                spec,
                created_at: Utc::now(),
                trace: None,
                resources: None,
                queue: Default::default(),
            };
            Ok(oats::backend::kubernetes::render::render_job(
                &job,
                &oats::backend::kubernetes::render::AgentTemplate::from_config(&config, template_ns),
            ))
        };

        if s3 {
            println!("-- scenario 3: POST /api/v1/jobs through OATS vs the same Job created directly");
            let ns = make_ns(format!("oats-bench-post-{suffix}")).await?;
            let oats = self.start_oats("oats-kube", &kube_env(&ns), false).await?;
            let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
            let body = json!({"goal": goal_text(0), "max_turns": 5, "labels": {"kwok.oats.dev/outcome": "run"}});
            let url = oats.url("/api/v1/jobs");
            let post = |http: Client, url: String, body: serde_json::Value| async move {
                let t = Instant::now();
                let r = http.post(url).json(&body).send().await?;
                let status = r.status();
                let text = r.text().await?;
                if status.as_u16() != 201 {
                    bail!("POST answered {status}: {text}");
                }
                anyhow::Ok(t.elapsed())
            };
            let direct = |jobs: Api<Job>, job: Job| async move {
                let t = Instant::now();
                jobs.create(&PostParams::default(), &job).await?;
                anyhow::Ok(t.elapsed())
            };
            for _ in 0..5 {
                post(self.http.clone(), url.clone(), body.clone()).await?;
                direct(jobs.clone(), new_job(&ns)?).await?;
            }
            let pairs = 100;
            let (mut via, mut raw) = (Vec::new(), Vec::new());
            let cpu0 = proc_cpu(oats.pid() as i32, self.clk_tck);
            for i in 0..pairs {
                // Alternate which goes first, so neither always meets the API server right after the other.
                if i % 2 == 0 {
                    via.push(post(self.http.clone(), url.clone(), body.clone()).await?);
                    raw.push(direct(jobs.clone(), new_job(&ns)?).await?);
                } else {
                    raw.push(direct(jobs.clone(), new_job(&ns)?).await?);
                    via.push(post(self.http.clone(), url.clone(), body.clone()).await?);
                }
            }
            let oats_cpu = proc_cpu(oats.pid() as i32, self.clk_tck) - cpu0;
            let ms = |v: &mut Vec<Duration>, p: f64| {
                v.sort();
                v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1].as_secs_f64() * 1e3
            };
            let (v50, r50) = (ms(&mut via, 0.5), ms(&mut raw, 0.5));
            let (v90, r90) = (ms(&mut via, 0.9), ms(&mut raw, 0.9));
            let (v99, r99) = (ms(&mut via, 0.99), ms(&mut raw, 0.99));
            self.row(
                "3",
                &format!("POST job on the test control plane, median of {pairs} (sequential)"),
                format!("{v50:.2} ms (p90 {v90:.2}, p99 {v99:.2})"),
                format!("{r50:.2} ms direct kube create (p90 {r90:.2}, p99 {r99:.2})"),
                Some(v50 / r50),
                "≤ 1.20 (< 20% added)",
                Some(v50 / r50 <= 1.20),
            );
            self.note(format!(
                "3: OATS overhead at the median {:.2} ms; OATS server CPU {:.1} ms per POST (including its watch-cache updates); \
                 jobs carry label kwok.oats.dev/outcome=run so their pods stay Running",
                v50 - r50,
                oats_cpu / pairs as f64 * 1e3,
            ));
            drop(oats);
            if s6k {
                // The same namespace now holds ~210 Jobs and (some of) their pods: the cache as it is in use.
                tokio::time::sleep(Duration::from_secs(3)).await;
                let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), &ns);
                let pod_count = pods.list(&Default::default()).await?.items.len();
                let job_count = jobs.list(&Default::default()).await?.items.len();
                let full = self.start_oats("oats-kube-full", &kube_env(&ns), false).await?;
                let rss = settled_rss(&full).await;
                drop(full);
                let empty = make_ns(format!("oats-bench-empty-{suffix}")).await?;
                let base = self.start_oats("oats-kube-empty", &kube_env(&empty), false).await?;
                let rss0 = settled_rss(&base).await;
                drop(base);
                self.row(
                    "6k",
                    &format!(
                        "kube cache in use: RSS with {job_count} Jobs + {pod_count} Pods (scenario 3's namespace)"
                    ),
                    format!("{:.1} MiB", rss as f64 / 1024.0),
                    format!("{:.1} MiB (empty namespace)", rss0 as f64 / 1024.0),
                    None,
                    "",
                    None,
                );
                self.note(format!(
                    "6k: scenario 3's namespace afterwards ({job_count} Jobs, {pod_count} Pods so far; the controller \
                     manager creates pods at ~20/s): {:.1} KiB more per job than an empty namespace. Too few objects for a \
                     per-object figure (fixed costs of the first LIST dominate); the 2,000-Job row below is the one to read.",
                    (rss as f64 - rss0 as f64) / job_count.max(1) as f64
                ));
            }
        }

        if s6k {
            const STEPS: [usize; 2] = [2_000, 10_000];
            println!("-- scenario 6k: OATS watch cache with {STEPS:?} Jobs (suspended: no pods)");
            let ns = make_ns(format!("oats-bench-cache-{suffix}")).await?;
            let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
            let empty = make_ns(format!("oats-bench-none-{suffix}")).await?;
            let base = self.start_oats("oats-kube-none", &kube_env(&empty), false).await?;
            let rss0 = settled_rss(&base).await;
            drop(base);
            self.row(
                "6k",
                "kube cache: RSS with an empty namespace (baseline)",
                format!("{:.1} MiB", rss0 as f64 / 1024.0),
                "".into(),
                None,
                "",
                None,
            );
            let (mut cached, mut previous, mut names) = (0usize, None::<(usize, u64)>, Vec::new());
            for step in STEPS {
                let t = Instant::now();
                let manifests: Vec<Job> = (cached..step)
                    .map(|_| {
                        let mut job = new_job(&ns)?;
                        job.spec.as_mut().expect("rendered Jobs have a spec").suspend = Some(true);
                        Ok(job)
                    })
                    .collect::<Result<_>>()?;
                let created: Vec<Result<Job, kube::Error>> = futures::stream::iter(manifests)
                    .map(|job| {
                        let jobs = jobs.clone();
                        async move { jobs.create(&PostParams::default(), &job).await }
                    })
                    .buffer_unordered(8)
                    .collect()
                    .await;
                let failed = created.iter().filter(|r| r.is_err()).count();
                cached += created.len() - failed;
                names.extend(created.iter().flatten().filter_map(|job| job.metadata.name.clone()));
                println!("created {} Jobs in {:.1}s ({failed} failed)", created.len(), t.elapsed().as_secs_f64());
                let full = self.start_oats(&format!("oats-kube-{step}"), &kube_env(&ns), false).await?;
                let mut readies = vec![full.ready_after()];
                let rss = settled_rss(&full).await;
                let hwm = proc_status(full.pid() as i32, "VmHWM");
                if step == 10_000 {
                    // Reads on the Kubernetes backend: the same shared records, from the watch cache.
                    let paths = names.iter().map(|name| format!("/api/v1/jobs/{name}"));
                    let load = self.closed(Target::new(&full, paths), &full).await;
                    self.load_note(&format!("6k GET job on the Kubernetes backend, {cached} Jobs, saturated"), &load);
                    self.row(
                        "6k",
                        &format!(
                            "kube backend: GET job, {cached} cached Jobs, saturated (not pinned; the control plane shares \
                             the cores): req/s"
                        ),
                        format!("{:.0} ({:.1} µs CPU/request)", load.rps(), load.server_cpu / load.requests.max(1) as f64 * 1e6),
                        "".into(),
                        None,
                        "",
                        None,
                    );
                }
                drop(full);
                for again in 1..3 {
                    let server = self.start_oats(&format!("oats-kube-{step}-{again}"), &kube_env(&ns), false).await?;
                    readies.push(server.ready_after());
                }
                readies.sort();
                let ready = readies[1];
                self.row(
                    "6k",
                    &format!("kube cache: RSS with {cached} Jobs (no pods)"),
                    format!("{:.1} MiB (peak {:.1})", rss as f64 / 1024.0, hwm as f64 / 1024.0),
                    format!("{:.1} MiB (empty namespace)", rss0 as f64 / 1024.0),
                    Some(rss as f64 / rss0 as f64),
                    if step == 10_000 { "< 64 MiB" } else { "" },
                    (step == 10_000).then_some(rss < 64 * 1024),
                );
                self.row(
                    "6k",
                    &format!("kube: time from start to ready, {cached} Jobs (median of 3)"),
                    format!("{:.2} s", ready.as_secs_f64()),
                    format!("{:.2} s, {:.2} s (the others)", readies[0].as_secs_f64(), readies[2].as_secs_f64()),
                    None,
                    if step == 10_000 { "< 2 s" } else { "" },
                    (step == 10_000).then_some(ready < Duration::from_secs(2)),
                );
                if let Some((before, rss_before)) = previous {
                    let slope = (rss as f64 - rss_before as f64) / (cached - before) as f64;
                    let average = (rss as f64 - rss0 as f64) / cached as f64;
                    self.row(
                        "6k",
                        &format!("kube cache: memory per cached Job ({before}→{cached} slope)"),
                        format!("{slope:.2} KiB"),
                        format!("{average:.2} KiB (average over the empty namespace)"),
                        None,
                        "< 4 KiB",
                        Some(slope < 4.0),
                    );
                }
                previous = Some((cached, rss));
            }
        }
        Ok(())
    }
}

/// The test control plane (testenv/), started for the run unless given a kubeconfig.
pub(crate) struct TestEnv {
    /// Set when this run started it (and so stops it).
    pub(crate) dir: Option<PathBuf>,
    pub(crate) kubeconfig: PathBuf,
}

impl TestEnv {
    pub(crate) const DIR: &'static str = "/tmp/oats-te-bench";

    pub(crate) fn script() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../testenv/testenv.sh")
    }

    pub(crate) async fn up() -> Result<Self> {
        println!("starting the test control plane in {} (testenv/testenv.sh up)", Self::DIR);
        let t = Instant::now();
        let log = std::fs::File::create(std::env::temp_dir().join("oats-bench-testenv.log"))?;
        let status = tokio::process::Command::new(Self::script())
            .arg("up")
            .env("OATS_TESTENV_DIR", Self::DIR)
            .stdout(log.try_clone()?)
            .stderr(log)
            .status()
            .await?;
        let env =
            Self { dir: Some(PathBuf::from(Self::DIR)), kubeconfig: Path::new(Self::DIR).join("admin.kubeconfig") };
        if !status.success() {
            env.down();
            bail!(
                "testenv/testenv.sh up failed; see {}",
                std::env::temp_dir().join("oats-bench-testenv.log").display()
            );
        }
        println!("control plane up in {:.0}s", t.elapsed().as_secs_f64());
        Ok(env)
    }

    pub(crate) fn down(&self) {
        if let Some(dir) = &self.dir {
            let _ = std::io::stdout().flush();
            let _ = Command::new(Self::script())
                .arg("down")
                .env("OATS_TESTENV_DIR", dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}
