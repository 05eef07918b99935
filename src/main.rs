//! The `oats` binary: the server, its tooling, and the demo agent.

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use oats::{
    api::{self, ApiState, RequestLimits, types::CreateJobRequest},
    auth::{Authenticator, OidcSettings, OidcVerifier, TokenStore},
    backend::{
        kubernetes::{KubernetesBackend, kueue::QueueMetrics, render},
        local::{AgentGateway, LocalBackend, LocalSettings},
    },
    config::{BackendKind, Config, Queueing},
    http_server,
    jobs::{
        AgentCredentials, JobBackend, JobId, JobRequest, JobService, NewJob,
        archive::{ArchiveMetrics, ArchiveSettings, Archiver},
        history::JobHistory,
        policy::Policy,
    },
    llm::{
        Gateway, LlmMetrics, Providers,
        identity::{Identities, ServiceAccountRules, ServiceAccountVerifier},
    },
    store::Store,
    telemetry::{kube_client::KubeMetricsLayer, metrics::Metrics},
};
use poem_openapi::types::ParseFromJSON;
use std::{future::pending, io::Read, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};
use tokio_util::sync::CancellationToken;

/// mimalloc: a request allocates a few blocks of 1.5-5 KiB (its futures), past glibc's per-thread
/// cache, where each malloc and free took its slow path (a GET: 36.5k -> 32.6k instructions).
/// Built without transparent huge pages (`no_thp`), which would back its arenas 2 MiB at a time
/// and double the idle RSS.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "oats", version, about = "Run LLM agents as jobs on Kubernetes or locally")]
struct Cli {
    /// YAML configuration file (keys as in `oats config`); OATS_* variables override it.
    #[arg(long, global = true, env = "OATS_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the REST API, Swagger UI (/docs) and the OpenAPI document (/openapi.json).
    Serve {
        /// Address to listen on (overrides the `listen` key).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Once every listener is bound, write their addresses to this file, one `NAME ADDRESS`
        /// line each (`api`, `metrics`, `llm`): how a caller that asked for port 0 learns the ports.
        #[arg(long, env = "OATS_ADDRESSES_FILE")]
        addresses_file: Option<PathBuf>,
    },
    /// Talk to a running server: submit, get, list, logs, cancel, watch.
    Jobs {
        #[command(flatten)]
        connection: oats::cli::Connection,
        #[command(subcommand)]
        command: oats::cli::JobsCommand,
    },
    /// Print the OpenAPI document.
    Openapi {
        /// YAML instead of JSON.
        #[arg(long)]
        yaml: bool,
    },
    /// Read a job request (JSON, as for POST /api/v1/jobs) on stdin and print the Kubernetes
    /// Job that `serve` would create for it, as YAML.
    RenderJob,
    /// Print every configuration key with its environment variable and default (Markdown).
    Config,
    /// Run the demo agent (what the default configuration runs as each job; not an LLM).
    DemoAgent,
    /// Run the agent: work the job's goal through the LLM gateway with tools in its workspace
    /// (what local jobs run when a providers file is configured).
    Agent,
    /// Run another agent with OPENAI_API_KEY set from the job's token file (Kubernetes), e.g.
    /// `oats launch -- python agent.py`.
    Launch {
        /// The agent's program and arguments.
        #[arg(trailing_var_arg = true, required = true)]
        command: Vec<String>,
    },
    /// Copy this binary to PATH (the init container that gives agents of other images `oats launch`).
    InstallLauncher {
        /// Where to put the launcher.
        path: String,
    },
    /// Read an API token on stdin and print its SHA-256, as the tokens file stores it.
    HashToken,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    match cli.command {
        Command::DemoAgent => std::process::exit(runtime.block_on(oats::demo_agent::run())),
        Command::Agent => std::process::exit(runtime.block_on(oats::agent::run())),
        Command::Launch { command } => std::process::exit(oats::agent::launch(&command)),
        Command::InstallLauncher { path } => std::process::exit(oats::agent::install_launcher(&path)),
        Command::Jobs { connection, command } => {
            std::process::exit(runtime.block_on(oats::cli::run(connection, command)))
        }
        Command::Openapi { yaml } => {
            println!("{}", if yaml { api::spec_yaml() } else { api::spec_json() });
            Ok(())
        }
        Command::Config => {
            print!("{}", Config::markdown_table());
            Ok(())
        }
        Command::HashToken => {
            let mut token = String::new();
            std::io::stdin().read_to_string(&mut token).context("cannot read the token from stdin")?;
            println!("{}", oats::auth::hash_token(&token));
            Ok(())
        }
        Command::RenderJob => render_job(&load_config(cli.config.as_deref())?),
        Command::Serve { listen, addresses_file } => {
            let mut config = load_config(cli.config.as_deref())?;
            if let Some(listen) = listen {
                config.listen = Some(listen);
            }
            runtime.block_on(async {
                let telemetry = oats::telemetry::init(config.log_format);
                let served = serve(config, addresses_file).await;
                telemetry.shutdown();
                served
            })
        }
    }
}

fn load_config(path: Option<&std::path::Path>) -> Result<Config> {
    Ok(Config::load(path, std::env::vars())?)
}

fn render_job(config: &Config) -> Result<()> {
    let mut input = String::new();
    std::io::stdin().read_to_string(&mut input).context("cannot read the job request from stdin")?;
    let value: serde_json::Value = serde_json::from_str(&input).context("the job request is not JSON")?;
    let request =
        CreateJobRequest::parse_from_json(Some(value)).map_err(|e| anyhow::anyhow!("{}", e.into_message()))?;
    let spec = JobRequest::from(request).validate(&config.job_limits()).map_err(oats::jobs::JobError::Invalid)?;
    let rules = match &config.policy_file {
        Some(path) => Policy::load(path)?.rules_for(&config.tenant),
        None => Policy::builtin().rules_for(&config.tenant),
    };
    let resources = match rules.profile_for(&spec) {
        (Some(name), None) => bail!("no resource profile {name}"),
        (_, resources) => resources,
    };
    let job = NewJob {
        id: JobId::random(),
        tenant: config.tenant.clone(),
        request_hash: spec.fingerprint(),
        trace: None,
        resources,
        queue: rules.queue_choice(),
        spec,
        created_at: chrono::Utc::now(),
    };
    let namespace = config.namespace.clone().unwrap_or_else(|| "default".into());
    let manifest = render::render_job(&job, &render::AgentTemplate::from_config(config, &namespace));
    print!("{}", serde_saphyr::to_string(&manifest)?);
    Ok(())
}

async fn serve(config: Config, addresses_file: Option<PathBuf>) -> Result<()> {
    let mut metrics = Metrics::new();
    let llm_metrics = LlmMetrics::default();
    llm_metrics.register(metrics.registry_mut());
    let archive_metrics = ArchiveMetrics::default();
    archive_metrics.register(metrics.registry_mut());
    let queue_metrics = QueueMetrics::default();
    if config.queueing == Queueing::Kueue {
        queue_metrics.register(metrics.registry_mut());
    }
    let metrics = Arc::new(metrics);
    let http_limits = config.http_limits();
    let providers = load_providers(&config)?;
    let credentials = Arc::new(AgentCredentials::random());
    // Bound before the backend starts: agents are given the gateway's address as bound (port 0
    // means any free port).
    let llm_listener = match &providers {
        Some(_) => Some(http_server::bind(config.llm_listen).await?),
        None => None,
    };
    let llm_address = llm_listener.as_ref().map(|l| l.local_addr()).transpose()?;
    let gateway_url = llm_address.map(|address| agent_gateway_url(&config, address));
    let agent_gateway = gateway_url.map(|base_url| AgentGateway { base_url, credentials: credentials.clone() });
    let store = open_store(&config).await?;
    let (backend, kube) = select_backend(&config, &metrics, queue_metrics, agent_gateway, &store).await?;
    tracing::info!(backend = backend.name(), listen = %config.api_listen(), "starting OATS");
    let counted = backend.clone();
    metrics.jobs.count_jobs_with(Box::new(move || counted.counts()));
    let policy = load_policy(&config)?;
    let mut jobs = JobService::new(backend.clone(), config.job_limits(), policy.clone(), metrics.jobs.clone());
    if config.retention_days > 0 {
        let history: Arc<dyn JobHistory> = Arc::new(store.clone());
        let archiver = Arc::new(Archiver::new(backend, history.clone(), archive_settings(&config), archive_metrics));
        jobs = jobs.with_history(history, archiver.horizon().await);
        archiver.spawn();
    }
    if providers.is_some() || config.database_url()?.is_some() {
        jobs = jobs.with_usage(Arc::new(store.clone()));
    }
    let jobs = Arc::new(jobs);
    let mut bound = vec![];
    if let (Some(providers), Some(listener)) = (providers, llm_listener) {
        let kubernetes = kube.map(|(client, namespace)| {
            let rules = ServiceAccountRules {
                audience: config.llm_token_audience.clone(),
                namespace,
                service_account: config.agent_service_account.clone(),
            };
            ServiceAccountVerifier::new(client, rules)
        });
        let identities = Identities { local: credentials, kubernetes };
        let gateway = Gateway::new(jobs.clone(), identities, providers, store, llm_metrics, config.llm_max_body_bytes);
        gateway.sweep_abandoned_calls();
        gateway.publish_tenant_gauges(policy);
        tracing::info!(address = %listener.local_addr()?, "serving the LLM gateway for agents");
        bound.push(("llm", listener.local_addr()?));
        tokio::spawn(http_server::serve(listener, oats::llm::app(gateway), http_limits, pending(), None));
    }
    let shutdown = CancellationToken::new();
    let state = Arc::new(ApiState {
        jobs,
        auth: authenticator(&config)?,
        metrics: metrics.clone(),
        shutdown: shutdown.clone(),
        heartbeat: api::Heartbeat::every(api::HEARTBEAT),
    });
    let limits = RequestLimits {
        max_body_bytes: config.max_body_bytes,
        read_timeout: Duration::from_secs(config.request_read_timeout_seconds.into()),
    };
    let app = api::build_app(state, limits);
    if let Some(address) = config.metrics_listen {
        tracing::info!(%address, "serving /metrics on a separate port");
        let listener = http_server::bind(address).await?;
        bound.push(("metrics", listener.local_addr()?));
        tokio::spawn(http_server::serve(listener, api::metrics_app(metrics), http_limits, pending(), None));
    }
    let delay = Duration::from_secs(config.shutdown_delay_seconds.into());
    let grace = Duration::from_secs(config.shutdown_grace_seconds.into());
    let listener = http_server::bind(config.api_listen()).await?;
    bound.insert(0, ("api", listener.local_addr()?));
    if let Some(path) = &addresses_file {
        http_server::write_addresses(path, &bound).with_context(|| format!("cannot write {}", path.display()))?;
    }
    http_server::serve(listener, app, http_limits, drain(shutdown, delay), Some(grace))
        .await
        .context("the HTTP server failed")?;
    tracing::info!("stopped");
    Ok(())
}

/// The providers file, when the gateway is on.
fn load_providers(config: &Config) -> Result<Option<Arc<Providers>>> {
    let Some(path) = &config.llm_providers_file else {
        tracing::info!("no llm_providers_file; the LLM gateway is off");
        return Ok(None);
    };
    let providers = Providers::load(path)?;
    providers.watch(RELOAD_EVERY);
    Ok(Some(providers))
}

/// The store (the local backend's jobs, job history, the gateway's ledger): the configured
/// database, else SQLite in the state directory.
async fn open_store(config: &Config) -> Result<Store> {
    let store = match config.database_url()? {
        Some(url) => Store::open(&url).await?,
        None => Store::open_in(&config.state_dir).await?,
    };
    tracing::info!(engine = store.engine().as_str(), "store opened");
    Ok(store)
}

fn archive_settings(config: &Config) -> ArchiveSettings {
    ArchiveSettings {
        log_bytes: config.archive_log_bytes,
        retention: chrono::Duration::days(config.retention_days.into()),
        holder: std::env::var("HOSTNAME").unwrap_or_else(|_| format!("oats-{}", std::process::id())),
    }
}

/// The gateway's address as agents see it, given the address its listener is bound to.
fn agent_gateway_url(config: &Config, bound: SocketAddr) -> String {
    config.llm_gateway_url.clone().unwrap_or_else(|| format!("http://{bound}/v1"))
}

/// How often the tokens and policy files are checked for changes.
const RELOAD_EVERY: Duration = Duration::from_secs(2);

fn load_policy(config: &Config) -> Result<Arc<Policy>> {
    let Some(path) = &config.policy_file else {
        tracing::info!("no policy file; built-in limits apply");
        return Ok(Policy::builtin());
    };
    let policy = Policy::load(path)?;
    policy.watch(RELOAD_EVERY);
    Ok(policy)
}

fn authenticator(config: &Config) -> Result<Authenticator> {
    let tokens = match &config.auth_tokens_file {
        Some(path) => {
            let store = TokenStore::load(path)?;
            store.watch(RELOAD_EVERY);
            Some(store)
        }
        None => None,
    };
    let oidc = match &config.oidc_issuer {
        Some(issuer) => Some(OidcVerifier::new(OidcSettings {
            issuer: issuer.clone(),
            jwks_url: config.oidc_jwks_url.clone(),
            audience: config.oidc_audience.clone(),
            tenant_claim: config.oidc_tenant_claim.clone(),
            role_claim: config.oidc_role_claim.clone(),
            clock_skew: Duration::from_secs(config.oidc_clock_skew_seconds.into()),
            refresh_every: Duration::from_secs(config.oidc_jwks_refresh_seconds.into()),
        })?),
        None => None,
    };
    let auth = Authenticator::new(tokens, oidc, &config.tenant);
    if !auth.is_enabled() {
        tracing::warn!(
            tenant = %config.tenant,
            "authentication is OFF: every caller is an admin of the default tenant; set auth_tokens_file or oidc_issuer"
        );
    }
    Ok(auth)
}

/// A Kubernetes client and the agents' namespace, when jobs run on Kubernetes.
type KubeAccess = Option<(kube::Client, String)>;

/// Pick and start the backend, saying which and why.
async fn select_backend(
    config: &Config,
    metrics: &Arc<Metrics>,
    queue_metrics: QueueMetrics,
    gateway: Option<AgentGateway>,
    store: &Store,
) -> Result<(Arc<dyn JobBackend>, KubeAccess)> {
    let kubernetes = match config.backend {
        BackendKind::Local => None,
        BackendKind::Kubernetes => {
            Some(kube_client(metrics).await.context("backend=kubernetes but no cluster is reachable")?)
        }
        BackendKind::Auto => match kube_client(metrics).await {
            Ok(client) => {
                tracing::info!("backend=auto: a Kubernetes API server answered, using the kubernetes backend");
                Some(client)
            }
            Err(error) => {
                tracing::info!(reason = %format!("{error:#}"), "backend=auto: no usable cluster, using the local backend");
                None
            }
        },
    };
    if let Some(client) = kubernetes {
        let namespace = config.namespace.clone().unwrap_or_else(|| client.default_namespace().to_owned());
        tracing::info!(%namespace, "agent Jobs go to this namespace");
        let template = render::AgentTemplate::from_config(config, &namespace);
        let backend = Arc::new(KubernetesBackend::start(client.clone(), template, metrics.clone(), queue_metrics));
        return Ok((backend, Some((client, namespace))));
    }
    let command = if config.local_agent_command.is_empty() {
        let exe = std::env::current_exe().context("cannot locate the oats binary for the agent")?;
        // With a model to talk to, the real agent; without one, the demo.
        let agent = if gateway.is_some() { "agent" } else { "demo-agent" };
        vec![exe.to_string_lossy().into_owned(), agent.into()]
    } else {
        config.local_agent_command.clone()
    };
    let settings = LocalSettings {
        state_dir: config.state_dir.clone(),
        concurrency: config.local_concurrency,
        command,
        env_allowlist: config.local_env_allowlist.clone(),
        max_log_bytes: config.local_max_log_bytes as u64,
        gateway,
        kept_after_finish: Duration::from_secs(config.ttl_seconds_after_finished.into()),
    };
    tracing::info!(state_dir = %settings.state_dir.display(), "local backend state directory");
    let backend = LocalBackend::start(settings, metrics.clone(), Arc::new(store.clone())).await?;
    Ok((Arc::new(backend), None))
}

/// A client for the in-cluster service account or the kubeconfig, checked by asking the server
/// for its version.
async fn kube_client(metrics: &Arc<Metrics>) -> Result<kube::Client> {
    let config = kube::Config::infer().await.context("no in-cluster service account and no usable kubeconfig")?;
    let client = kube::client::ClientBuilder::try_from(config)
        .context("cannot build a Kubernetes client")?
        .with_layer(&KubeMetricsLayer(metrics.clone()))
        .build();
    match tokio::time::timeout(Duration::from_secs(5), client.apiserver_version()).await {
        Ok(Ok(version)) => {
            tracing::info!(version = %version.git_version, "Kubernetes API server reachable");
            Ok(client)
        }
        Ok(Err(error)) => bail!("the Kubernetes API server did not answer: {error}"),
        Err(_) => bail!("the Kubernetes API server did not answer within 5s"),
    }
}

/// On Ctrl-C or SIGTERM: report not ready and end streams at once, keep serving for `delay` so
/// endpoints can update, then resolve, which closes the listener and lets in-flight requests finish.
async fn drain(shutdown: CancellationToken, delay: Duration) {
    shutdown_signal().await;
    tracing::info!(delay_seconds = delay.as_secs(), "shutting down: readiness is now 503");
    shutdown.cancel();
    tokio::time::sleep(delay).await;
    tracing::info!("closing the listener; finishing in-flight requests");
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
}
