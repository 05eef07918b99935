//! Configuration: defaults, then a YAML file (`--config`), then `OATS_*` environment variables.
//!
//! Every key is declared once in the table below, with its type, default and documentation; the
//! README table is printed from it (`oats config`) and a test keeps the two in step.

use crate::{http_server::HttpLimits, jobs::JobLimits};
use std::{collections::BTreeMap, fmt, net::SocketAddr, path::Path, path::PathBuf, str::FromStr, time::Duration};

/// Why configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path} is not a YAML mapping of keys to values: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("unknown config key `{0}` (see `oats config` for every key)")]
    UnknownKey(String),
    #[error("config key `{key}`: {message}")]
    Invalid { key: String, message: String },
}

/// Where jobs run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    /// Kubernetes when in a cluster or a kubeconfig works, else local.
    Auto,
    Kubernetes,
    Local,
}

/// Who decides when a Kubernetes Job may start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queueing {
    /// Jobs start when created; OATS's per-replica tenant limits apply.
    None,
    /// Jobs are created suspended in their tenant's Kueue LocalQueue; Kueue admits them.
    Kueue,
}

/// How the server writes its own logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// JSON lines unless stderr is a terminal.
    Auto,
    Json,
    Text,
}

/// A value that can be written as one string in a file or an environment variable.
pub trait ConfigValue: Sized {
    fn parse_value(text: &str) -> Result<Self, String>;
    fn show(&self) -> String;
}

macro_rules! from_str_value {
    ($($ty:ty),*) => {$(
        impl ConfigValue for $ty {
            fn parse_value(text: &str) -> Result<Self, String> {
                <$ty>::from_str(text.trim()).map_err(|e| format!("`{text}`: {e}"))
            }
            fn show(&self) -> String {
                self.to_string()
            }
        }
    )*};
}
from_str_value!(u32, usize, SocketAddr);

impl ConfigValue for String {
    fn parse_value(text: &str) -> Result<Self, String> {
        Ok(text.trim().to_owned())
    }
    fn show(&self) -> String {
        self.clone()
    }
}

impl ConfigValue for PathBuf {
    fn parse_value(text: &str) -> Result<Self, String> {
        Ok(PathBuf::from(text.trim()))
    }
    fn show(&self) -> String {
        self.display().to_string()
    }
}

impl ConfigValue for Option<SocketAddr> {
    fn parse_value(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text.is_empty() { Ok(None) } else { SocketAddr::parse_value(text).map(Some) }
    }
    fn show(&self) -> String {
        self.map(|a| a.to_string()).unwrap_or_default()
    }
}

impl ConfigValue for Option<PathBuf> {
    fn parse_value(text: &str) -> Result<Self, String> {
        let text = text.trim();
        Ok((!text.is_empty()).then(|| PathBuf::from(text)))
    }
    fn show(&self) -> String {
        self.as_ref().map(|p| p.display().to_string()).unwrap_or_default()
    }
}

impl ConfigValue for Option<String> {
    fn parse_value(text: &str) -> Result<Self, String> {
        let text = text.trim();
        Ok((!text.is_empty()).then(|| text.to_owned()))
    }
    fn show(&self) -> String {
        self.clone().unwrap_or_default()
    }
}

/// A value that must never be printed (a database URL with its password): `Debug` and `show`
/// redact it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl ConfigValue for Option<Secret> {
    fn parse_value(text: &str) -> Result<Self, String> {
        let text = text.trim();
        Ok((!text.is_empty()).then(|| Secret(text.to_owned())))
    }
    fn show(&self) -> String {
        self.as_ref().map(|_| "<redacted>".to_owned()).unwrap_or_default()
    }
}

/// Lists are comma-separated in environment variables; YAML lists work in the file.
impl ConfigValue for Vec<String> {
    fn parse_value(text: &str) -> Result<Self, String> {
        Ok(text.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect())
    }
    fn show(&self) -> String {
        self.join(",")
    }
}

impl ConfigValue for BackendKind {
    fn parse_value(text: &str) -> Result<Self, String> {
        match text.trim() {
            "auto" => Ok(Self::Auto),
            "kubernetes" => Ok(Self::Kubernetes),
            "local" => Ok(Self::Local),
            other => Err(format!("`{other}` is not one of auto, kubernetes, local")),
        }
    }
    fn show(&self) -> String {
        match self {
            Self::Auto => "auto",
            Self::Kubernetes => "kubernetes",
            Self::Local => "local",
        }
        .into()
    }
}

impl ConfigValue for Queueing {
    fn parse_value(text: &str) -> Result<Self, String> {
        match text.trim() {
            "none" => Ok(Self::None),
            "kueue" => Ok(Self::Kueue),
            other => Err(format!("`{other}` is not one of none, kueue")),
        }
    }
    fn show(&self) -> String {
        match self {
            Self::None => "none",
            Self::Kueue => "kueue",
        }
        .into()
    }
}

impl ConfigValue for LogFormat {
    fn parse_value(text: &str) -> Result<Self, String> {
        match text.trim() {
            "auto" => Ok(Self::Auto),
            "json" => Ok(Self::Json),
            "text" => Ok(Self::Text),
            other => Err(format!("`{other}` is not one of auto, json, text")),
        }
    }
    fn show(&self) -> String {
        match self {
            Self::Auto => "auto",
            Self::Json => "json",
            Self::Text => "text",
        }
        .into()
    }
}

macro_rules! config_keys {
    ($( #[doc = $doc:literal] $name:ident : $ty:ty = $default:expr ; )*) => {
        /// The whole server configuration. See the README table (or `oats config`) for each key.
        #[derive(Debug, Clone)]
        pub struct Config {
            $( #[doc = $doc] pub $name: $ty, )*
        }

        impl Default for Config {
            fn default() -> Self {
                Self { $( $name: $default, )* }
            }
        }

        impl Config {
            /// Every key with its documentation and its default as text.
            pub fn keys() -> Vec<(&'static str, &'static str, String)> {
                let defaults = Self::default();
                vec![$( (stringify!($name), $doc.trim(), defaults.$name.show()), )*]
            }

            fn set(&mut self, key: &str, value: &str) -> Result<(), ConfigError> {
                match key {
                    $( stringify!($name) => {
                        self.$name = ConfigValue::parse_value(value)
                            .map_err(|message| ConfigError::Invalid { key: key.to_owned(), message })?;
                    } )*
                    _ => return Err(ConfigError::UnknownKey(key.to_owned())),
                }
                Ok(())
            }
        }
    };
}

config_keys! {
    /// Where jobs run: `auto`, `kubernetes` or `local`. `auto` picks Kubernetes when running in a cluster or when a kubeconfig works, else local.
    backend: BackendKind = BackendKind::Auto;
    /// Address and port the HTTP server listens on (also `serve --listen`). Empty: `0.0.0.0:8000` with authentication on, `127.0.0.1:8000` with it off, so an open server is not reachable from other machines unless an address is given.
    listen: Option<SocketAddr> = None;
    /// Separate address for `GET /metrics` (e.g. `0.0.0.0:9090`). Empty: only on the API port.
    metrics_listen: Option<SocketAddr> = None;
    /// Server log format: `auto` (JSON unless stderr is a terminal), `json` or `text`.
    log_format: LogFormat = LogFormat::Auto;
    /// Tenant of callers while authentication is off (no tokens file and no OIDC issuer).
    tenant: String = "default".into();
    /// YAML file of API tokens (`tokens: [{name, sha256, tenant, role}]`), mounted from a Secret and reloaded on change. Setting it (or an OIDC issuer) turns authentication on.
    auth_tokens_file: Option<PathBuf> = None;
    /// OIDC issuer whose JWTs are accepted (turns authentication on).
    oidc_issuer: Option<String> = None;
    /// JWKS address of the issuer. Empty: discovered from the issuer's `.well-known/openid-configuration`.
    oidc_jwks_url: Option<String> = None;
    /// Audience (`aud`) a JWT must carry.
    oidc_audience: String = "oats".into();
    /// JWT claim holding the tenant.
    oidc_tenant_claim: String = "tenant".into();
    /// JWT claim holding the role (`viewer`, `submitter` or `admin`).
    oidc_role_claim: String = "oats_role".into();
    /// Clock skew allowed when checking `exp` and `nbf`, in seconds.
    oidc_clock_skew_seconds: u32 = 60;
    /// Seconds the issuer's key set is cached before it is fetched again.
    oidc_jwks_refresh_seconds: u32 = 300;
    /// YAML policy file (per-tenant limits; see `policies/oats-policy.yaml`), reloaded on change. Empty: built-in limits.
    policy_file: Option<PathBuf> = None;
    /// Kubernetes namespace for agent Jobs. Empty: the pod's own namespace in a cluster, else the kubeconfig's, else `default`.
    namespace: Option<String> = None;
    /// Container image of the agent.
    agent_image: String = "oats-agent:0.1.0".into();
    /// Image pull policy of the agent container: `Always`, `IfNotPresent` or `Never`.
    agent_image_pull_policy: String = "IfNotPresent".into();
    /// Command of the agent container (comma-separated). Empty: the image's entrypoint.
    agent_command: Vec<String> = Vec::new();
    /// Service account of agent pods; it should have no permissions and no token.
    agent_service_account: String = "oats-agent".into();
    /// Non-zero user and group id agent containers run as.
    agent_uid: u32 = 65532;
    /// CPU request of the agent container.
    agent_cpu_request: String = "250m".into();
    /// CPU limit of the agent container.
    agent_cpu_limit: String = "1".into();
    /// Memory request of the agent container.
    agent_memory_request: String = "256Mi".into();
    /// Memory limit of the agent container.
    agent_memory_limit: String = "512Mi".into();
    /// Ephemeral storage request of the agent container.
    agent_ephemeral_storage_request: String = "64Mi".into();
    /// Ephemeral storage limit of the agent container.
    agent_ephemeral_storage_limit: String = "1Gi".into();
    /// Size limit of the agent's writable /tmp (an emptyDir).
    agent_tmp_size: String = "64Mi".into();
    /// Size limit of the agent's writable /workspace (an emptyDir).
    agent_workspace_size: String = "512Mi".into();
    /// Timeout of a job that does not ask for one, in seconds.
    default_timeout_seconds: u32 = 600;
    /// Longest timeout a job may ask for, in seconds (at most 86400).
    max_timeout_seconds: u32 = 3600;
    /// Seconds a finished job is kept before it is removed: on Kubernetes the Job (deleted by its TTL controller), locally its record, output and workspace; a finished job counts against `max_kept_jobs` until then (on both backends). After it, the job is answered from the job history (`retention_days`).
    ttl_seconds_after_finished: u32 = 600;
    /// Who starts Kubernetes Jobs: `none` (at once) or `kueue` (created suspended in the tenant's LocalQueue, from the policy's `local_queue`; Kueue admits them against its ClusterQueue quotas, cluster-wide). Kueue must be installed (infra/kueue).
    queueing: Queueing = Queueing::None;
    /// LocalQueue (in `namespace`) of tenants whose policy names none, when `queueing` is `kueue`.
    kueue_default_queue: String = "oats".into();
    /// Retries of a failed agent pod before the job fails.
    backoff_limit: u32 = 0;
    /// Opt-in: name of a Secret mounted into every agent pod, for agents that must call a provider directly (the admission policy's `llmSecretName` must name it too). Empty: agents hold no secret; they reach models through the LLM gateway.
    llm_secret_name: Option<String> = None;
    /// Keys of that Secret mounted as files under /var/run/secrets/oats/llm (comma-separated).
    llm_secret_keys: Vec<String> = Vec::new();
    /// Directory of the local backend's job output and workspaces, and of the store's SQLite file by default (job records are in the store).
    state_dir: PathBuf = default_state_dir();
    /// Jobs the local backend runs at once; the rest wait as pending.
    local_concurrency: usize = 4;
    /// Agent command of the local backend (comma-separated). Empty: the built-in demo agent (`oats demo-agent`).
    local_agent_command: Vec<String> = Vec::new();
    /// Environment variables the local backend passes through to agents, besides the job contract.
    local_env_allowlist: Vec<String> = ["PATH", "LANG", "LC_ALL", "TZ"].map(String::from).to_vec();
    /// Most bytes of output the local backend keeps per job (at least 65536); past it, one line says the rest was dropped.
    local_max_log_bytes: usize = 32 * 1024 * 1024;
    /// Highest `max_turns` a job may ask for (at most 100).
    max_turns: u32 = JobLimits::MAX_TURNS_CEILING;
    /// Largest goal, in bytes of UTF-8 (at most 16384).
    max_goal_bytes: usize = JobLimits::GOAL_BYTES_CEILING;
    /// Most labels a job may carry (at most 16).
    max_labels: usize = JobLimits::LABELS_CEILING;
    /// Largest request body accepted, in bytes.
    max_body_bytes: usize = 65_536;
    /// Seconds between SIGTERM (readiness turns 503, streams end) and closing the listener, so load balancers stop sending first.
    shutdown_delay_seconds: u32 = 5;
    /// Seconds in-flight requests get to finish after the listener closes. On Kubernetes keep preStop + delay + grace at least 5 s below the pod's terminationGracePeriodSeconds (shipped: 5 + 5 + 15 = 25 of 30).
    shutdown_grace_seconds: u32 = 15;
    /// Seconds a client may take to send a request body before the server answers 408.
    request_read_timeout_seconds: u32 = 30;
    /// Seconds a client has to send a request's line and headers (a new connection's first request, or a later one once its first byte arrives); slower connections are closed. Every listener (API, metrics, LLM gateway).
    http_header_read_timeout_seconds: u32 = 10;
    /// Seconds a kept-alive connection may wait for its next request before it is closed (requests in progress, streams included, are never cut).
    http_idle_timeout_seconds: u32 = 60;
    /// Largest request line and headers, in bytes (at least 8192); a larger request head gets 431.
    http_max_header_bytes: usize = 32_768;
    /// Requests (streams) one HTTP/2 connection may have in progress at once.
    http2_max_concurrent_streams: u32 = 100;
    /// Connections each listener serves at once; further connections wait in the accept queue until one closes.
    http_max_connections: usize = 2048;
    /// Database of the store (the local backend's jobs, job history, the LLM ledger): `postgres://…` for several replicas (prefer `database_url_file` when it holds a password), or `sqlite:<path>`. Empty: SQLite file `oats.db` in `state_dir`.
    database_url: Option<Secret> = None;
    /// File holding the database URL (a mounted Secret); wins over `database_url`.
    database_url_file: Option<PathBuf> = None;
    /// Most bytes of a finished job's output kept in its history (the tail when longer; stored compressed).
    archive_log_bytes: usize = 1024 * 1024;
    /// Days a finished job stays in the history (then it is purged, within the hour). 0 turns the history off: finished jobs are gone once the backend removes them.
    retention_days: u32 = 30;
    /// YAML file of LLM providers (see `examples/providers.yaml`), reloaded on change. Setting it turns the LLM gateway on; local jobs then run `oats agent` unless `local_agent_command` says otherwise.
    llm_providers_file: Option<PathBuf> = None;
    /// Address the LLM gateway (OpenAI-compatible, for agents only) listens on.
    llm_listen: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 8001));
    /// Base URL agents are given as `OPENAI_BASE_URL`. Empty: `http://<llm_listen>/v1` (local backend) or `http://oats-llm-gateway.<namespace>.svc:8001/v1` (Kubernetes).
    llm_gateway_url: Option<String> = None;
    /// The OATS image whose binary is copied into agents of a profile's own image, so they can run under `oats launch` (Kubernetes).
    agent_launcher_image: String = "oats-agent:0.1.0".into();
    /// Audience of the projected service-account token agents on Kubernetes present to the gateway.
    llm_token_audience: String = "oats-llm".into();
    /// Largest request body an agent may send to the gateway, in bytes.
    llm_max_body_bytes: usize = 4 * 1024 * 1024;
}

/// `$XDG_DATA_HOME/oats`, else `~/.local/share/oats`, else `./oats-state`.
fn default_state_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("oats");
    }
    match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        Some(home) => PathBuf::from(home).join(".local/share/oats"),
        None => PathBuf::from("oats-state"),
    }
}

/// A scalar or list in the YAML file, turned into the same text an environment variable holds.
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum FileValue {
    Text(String),
    Integer(i64),
    Bool(bool),
    List(Vec<String>),
    Null(()),
}

impl fmt::Display for FileValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Text(t) => f.write_str(t),
            Self::Integer(i) => write!(f, "{i}"),
            Self::Bool(b) => write!(f, "{b}"),
            Self::List(items) => f.write_str(&items.join(",")),
            Self::Null(()) => Ok(()),
        }
    }
}

impl Config {
    /// Defaults, overridden by the file (if any), overridden by `OATS_<KEY>` variables.
    pub fn load(file: Option<&Path>, env: impl IntoIterator<Item = (String, String)>) -> Result<Self, ConfigError> {
        let mut config = Self::default();
        if let Some(path) = file {
            let text =
                std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
            let values: BTreeMap<String, FileValue> = serde_saphyr::from_str(&text)
                .map_err(|e| ConfigError::Parse { path: path.to_owned(), message: e.to_string() })?;
            for (key, value) in values {
                config.set(&key, &value.to_string())?;
            }
        }
        let known: Vec<&str> = Self::keys().iter().map(|(k, _, _)| *k).collect();
        for (name, value) in env {
            let Some(key) = name.strip_prefix("OATS_").map(str::to_ascii_lowercase) else { continue };
            if known.contains(&key.as_str()) {
                config.set(&key, &value)?;
            }
        }
        config.check()?;
        Ok(config)
    }

    fn check(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: String| Err(ConfigError::Invalid { key: key.into(), message });
        if self.max_turns == 0 || self.max_turns > JobLimits::MAX_TURNS_CEILING {
            return invalid("max_turns", format!("must be between 1 and {}", JobLimits::MAX_TURNS_CEILING));
        }
        if self.max_goal_bytes == 0 || self.max_goal_bytes > JobLimits::GOAL_BYTES_CEILING {
            return invalid("max_goal_bytes", format!("must be between 1 and {}", JobLimits::GOAL_BYTES_CEILING));
        }
        if self.max_labels > JobLimits::LABELS_CEILING {
            return invalid("max_labels", format!("must be at most {}", JobLimits::LABELS_CEILING));
        }
        if self.max_timeout_seconds < JobLimits::MIN_TIMEOUT_SECONDS
            || self.max_timeout_seconds > JobLimits::TIMEOUT_CEILING_SECONDS
        {
            return invalid(
                "max_timeout_seconds",
                format!(
                    "must be between {} and {}",
                    JobLimits::MIN_TIMEOUT_SECONDS,
                    JobLimits::TIMEOUT_CEILING_SECONDS
                ),
            );
        }
        if self.default_timeout_seconds < JobLimits::MIN_TIMEOUT_SECONDS
            || self.default_timeout_seconds > self.max_timeout_seconds
        {
            return invalid(
                "default_timeout_seconds",
                format!("must be between {} and max_timeout_seconds", JobLimits::MIN_TIMEOUT_SECONDS),
            );
        }
        if !["Always", "IfNotPresent", "Never"].contains(&self.agent_image_pull_policy.as_str()) {
            return invalid("agent_image_pull_policy", "must be Always, IfNotPresent or Never".into());
        }
        if self.agent_uid == 0 {
            return invalid("agent_uid", "agents never run as root; use a non-zero id".into());
        }
        if self.local_max_log_bytes < 65_536 {
            return invalid("local_max_log_bytes", "must be at least 65536".into());
        }
        if self.local_concurrency == 0 {
            return invalid("local_concurrency", "must be at least 1".into());
        }
        if self.request_read_timeout_seconds == 0 {
            return invalid("request_read_timeout_seconds", "must be at least 1".into());
        }
        for (key, value) in [
            ("http_header_read_timeout_seconds", self.http_header_read_timeout_seconds as usize),
            ("http_idle_timeout_seconds", self.http_idle_timeout_seconds as usize),
            ("http2_max_concurrent_streams", self.http2_max_concurrent_streams as usize),
            ("http_max_connections", self.http_max_connections),
        ] {
            if value == 0 {
                return invalid(key, "must be at least 1".into());
            }
        }
        if self.http_max_header_bytes < HttpLimits::MIN_HEADER_BYTES {
            return invalid("http_max_header_bytes", "must be at least 8192".into());
        }
        if self.max_body_bytes < 1024 {
            return invalid("max_body_bytes", "must be at least 1024".into());
        }
        if self.oidc_issuer.is_some() && self.oidc_audience.is_empty() {
            return invalid("oidc_audience", "an OIDC issuer needs an audience".into());
        }
        if let Err(message) = crate::jobs::check_label_value(&self.tenant)
            .and_then(|()| if self.tenant.is_empty() { Err("must not be empty".into()) } else { Ok(()) })
        {
            return invalid("tenant", message);
        }
        if self.archive_log_bytes < 4096 {
            return invalid("archive_log_bytes", "must be at least 4096".into());
        }
        if self.llm_max_body_bytes < 1024 {
            return invalid("llm_max_body_bytes", "must be at least 1024".into());
        }
        if let Some(url) = &self.llm_gateway_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return invalid("llm_gateway_url", "must be an http:// or https:// URL".into());
        }
        if self.llm_secret_name.is_some() && self.llm_secret_keys.is_empty() {
            return invalid("llm_secret_keys", "name at least one key of llm_secret_name to mount".into());
        }
        Ok(())
    }

    /// The store's database URL: from `database_url_file`, else `database_url`; `None` for the
    /// embedded SQLite default. The URL may hold a password: never log it.
    pub fn database_url(&self) -> Result<Option<String>, ConfigError> {
        match &self.database_url_file {
            Some(path) => {
                let text =
                    std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.clone(), source })?;
                Ok(Some(text.trim().to_owned()).filter(|u| !u.is_empty()))
            }
            None => Ok(self.database_url.as_ref().map(|url| url.expose().to_owned())),
        }
    }

    /// Whether callers must authenticate (a tokens file or an OIDC issuer is configured).
    pub fn auth_enabled(&self) -> bool {
        self.auth_tokens_file.is_some() || self.oidc_issuer.is_some()
    }

    /// The API's address: `listen` when given, else port 8000 on every interface with
    /// authentication on and on loopback only with it off.
    pub fn api_listen(&self) -> SocketAddr {
        self.listen.unwrap_or_else(|| {
            let host = if self.auth_enabled() { [0, 0, 0, 0] } else { [127, 0, 0, 1] };
            SocketAddr::from((host, 8000))
        })
    }

    /// The request limits this configuration sets.
    pub fn job_limits(&self) -> JobLimits {
        JobLimits {
            max_goal_bytes: self.max_goal_bytes,
            max_turns: self.max_turns,
            max_labels: self.max_labels,
            default_timeout_seconds: self.default_timeout_seconds,
            max_timeout_seconds: self.max_timeout_seconds,
            max_model_len: JobLimits::MODEL_LEN_CEILING,
        }
    }

    /// The limits of every HTTP listener this configuration sets.
    pub fn http_limits(&self) -> HttpLimits {
        HttpLimits {
            header_read_timeout: Duration::from_secs(self.http_header_read_timeout_seconds.into()),
            idle_timeout: Duration::from_secs(self.http_idle_timeout_seconds.into()),
            max_header_bytes: self.http_max_header_bytes,
            max_concurrent_streams: self.http2_max_concurrent_streams,
            max_connections: self.http_max_connections,
        }
    }

    /// The README's configuration table, generated from the declarations above.
    pub fn markdown_table() -> String {
        let mut out = String::from("| key | environment variable | default | meaning |\n|---|---|---|---|\n");
        for (key, doc, default) in Self::keys() {
            let default = if default.is_empty() { "(empty)".to_owned() } else { format!("`{default}`") };
            out.push_str(&format!("| `{key}` | `OATS_{}` | {default} | {doc} |\n", key.to_ascii_uppercase()));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn environment_overrides_file_overrides_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("oats.yaml");
        std::fs::write(
            &file,
            "backend: local\nlocal_concurrency: 2\nllm_secret_keys: [api-key, org]\nllm_secret_name: llm\n",
        )
        .unwrap();
        let config =
            Config::load(Some(&file), env(&[("OATS_LOCAL_CONCURRENCY", "7"), ("OATS_URL", "ignored")])).unwrap();
        assert_eq!(config.backend, BackendKind::Local);
        assert_eq!(config.local_concurrency, 7);
        assert_eq!(config.llm_secret_keys, ["api-key", "org"]);
        assert_eq!(config.api_listen().port(), 8000);
    }

    #[test]
    fn bad_values_and_unknown_file_keys_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("oats.yaml");
        std::fs::write(&file, "no_such_key: 1\n").unwrap();
        assert!(matches!(Config::load(Some(&file), env(&[])), Err(ConfigError::UnknownKey(_))));
        for (key, value) in [
            ("OATS_BACKEND", "docker"),
            ("OATS_MAX_TURNS", "101"),
            ("OATS_MAX_TURNS", "many"),
            ("OATS_AGENT_UID", "0"),
            ("OATS_DEFAULT_TIMEOUT_SECONDS", "7200"),
            ("OATS_AGENT_IMAGE_PULL_POLICY", "Sometimes"),
            ("OATS_LLM_SECRET_NAME", "llm"),
        ] {
            assert!(Config::load(None, env(&[(key, value)])).is_err(), "{key}={value} accepted");
        }
    }

    #[test]
    fn the_database_url_is_never_printed() {
        let config = Config::load(None, env(&[("OATS_DATABASE_URL", "postgres://oats:s3cret@db/oats")])).unwrap();
        assert!(!format!("{config:?}").contains("s3cret"));
        assert_eq!(config.database_url().unwrap().as_deref(), Some("postgres://oats:s3cret@db/oats"));
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("url");
        std::fs::write(&file, "postgres://oats:fromfile@db/oats\n").unwrap();
        let env = env(&[("OATS_DATABASE_URL_FILE", file.to_str().unwrap()), ("OATS_DATABASE_URL", "ignored")]);
        let config = Config::load(None, env).unwrap();
        assert_eq!(config.database_url().unwrap().as_deref(), Some("postgres://oats:fromfile@db/oats"));
    }

    #[test]
    fn without_authentication_the_api_listens_on_loopback_unless_told_otherwise() {
        let loopback: SocketAddr = "127.0.0.1:8000".parse().unwrap();
        let everywhere: SocketAddr = "0.0.0.0:8000".parse().unwrap();
        assert_eq!(Config::load(None, env(&[])).unwrap().api_listen(), loopback);
        let tokens = env(&[("OATS_AUTH_TOKENS_FILE", "/etc/oats/tokens.yaml")]);
        assert_eq!(Config::load(None, tokens).unwrap().api_listen(), everywhere);
        let oidc = env(&[("OATS_OIDC_ISSUER", "https://idp.example")]);
        assert_eq!(Config::load(None, oidc).unwrap().api_listen(), everywhere);
        // An address given explicitly (environment or file) is kept, authentication or not.
        let explicit = env(&[("OATS_LISTEN", "0.0.0.0:9000")]);
        assert_eq!(Config::load(None, explicit).unwrap().api_listen(), "0.0.0.0:9000".parse().unwrap());
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("oats.yaml");
        std::fs::write(&file, "listen: 0.0.0.0:8000\n").unwrap();
        assert_eq!(Config::load(Some(&file), env(&[])).unwrap().api_listen(), everywhere);
    }

    #[test]
    fn http_limits_are_checked() {
        for (key, value) in [
            ("OATS_HTTP_MAX_HEADER_BYTES", "4096"),
            ("OATS_HTTP_HEADER_READ_TIMEOUT_SECONDS", "0"),
            ("OATS_HTTP_MAX_CONNECTIONS", "0"),
            ("OATS_HTTP2_MAX_CONCURRENT_STREAMS", "0"),
        ] {
            assert!(Config::load(None, env(&[(key, value)])).is_err(), "{key}={value} accepted");
        }
        let limits = Config::default().http_limits();
        assert_eq!(limits.max_header_bytes, 32_768);
        assert!(limits.header_read_timeout < limits.idle_timeout);
    }

    #[test]
    fn readme_documents_every_key() {
        let readme = include_str!("../README.md");
        for (key, _, _) in Config::keys() {
            assert!(readme.contains(&format!("`OATS_{}`", key.to_ascii_uppercase())), "README lacks {key}");
        }
    }
}
