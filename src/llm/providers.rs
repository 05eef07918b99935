//! The providers file: which OpenAI-compatible upstreams the gateway forwards to, with their
//! models, prices and limits. Reloaded when it changes, like the tokens and policy files; a file
//! that fails to load is logged and the last good one stays in force.
//!
//! ```yaml
//! providers:
//!   - name: openai
//!     base_url: https://api.openai.com/v1
//!     api_key_file: /var/run/secrets/oats/providers/openai   # a mounted Secret
//!     timeout_seconds: 120
//!     max_concurrency: 64
//!     max_retries: 2
//!     models:
//!       - name: gpt-4o-mini
//!         aliases: [small-model]
//!         input_per_million_usd: 0.15
//!         output_per_million_usd: 0.60
//!         cached_input_per_million_usd: 0.075
//! ```

use crate::jobs::Prices;
use std::{
    collections::BTreeMap,
    fmt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock},
    time::{Duration, SystemTime},
};
use tokio::sync::Semaphore;

/// Why the providers file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ProvidersError {
    #[error("cannot read the providers file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("the providers file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("provider {provider}: {message}")]
    Invalid { provider: String, message: String },
}

/// A provider's API key. Never printed: not by `Debug`, not in errors.
#[derive(Clone)]
pub struct ApiKey(String);

impl ApiKey {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ProvidersFile {
    providers: Vec<ProviderEntry>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ProviderEntry {
    name: String,
    base_url: String,
    api_key_file: Option<PathBuf>,
    #[serde(default = "default_timeout")]
    timeout_seconds: u64,
    #[serde(default = "default_connect_timeout")]
    connect_timeout_seconds: u64,
    #[serde(default = "default_concurrency")]
    max_concurrency: usize,
    #[serde(default = "default_retries")]
    max_retries: u32,
    /// Longest time spent retrying one call, waits included.
    #[serde(default = "default_retry_window")]
    retry_window_seconds: u64,
    models: Vec<ModelEntry>,
}

fn default_timeout() -> u64 {
    120
}
fn default_connect_timeout() -> u64 {
    5
}
fn default_concurrency() -> usize {
    64
}
fn default_retries() -> u32 {
    2
}
fn default_retry_window() -> u64 {
    30
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelEntry {
    name: String,
    /// The provider's name for the model, when it differs from `name`.
    upstream: Option<String>,
    #[serde(default)]
    aliases: Vec<String>,
    #[serde(default)]
    input_per_million_usd: f64,
    #[serde(default)]
    output_per_million_usd: f64,
    cached_input_per_million_usd: Option<f64>,
    /// Output tokens a call may produce when the caller sets no `max_tokens`.
    #[serde(default = "default_max_output")]
    max_output_tokens: u64,
}

fn default_max_output() -> u64 {
    4096
}

/// One upstream.
#[derive(Debug)]
pub struct Provider {
    pub name: String,
    /// Without a trailing slash, e.g. `https://api.openai.com/v1`.
    pub base_url: String,
    pub api_key: Option<ApiKey>,
    pub timeout: Duration,
    pub connect_timeout: Duration,
    pub max_retries: u32,
    pub retry_window: Duration,
    /// Calls in flight to this provider, at most `max_concurrency`.
    pub slots: Arc<Semaphore>,
    pub max_concurrency: usize,
}

/// A model agents may ask for, by its name or an alias.
#[derive(Debug, Clone)]
pub struct Model {
    /// The name OATS shows (metrics, usage, `/v1/models`).
    pub name: String,
    pub aliases: Vec<String>,
    /// The name sent upstream.
    pub upstream: String,
    pub prices: Prices,
    pub max_output_tokens: u64,
    pub provider: Arc<Provider>,
}

/// Every configured model, by every name it answers to.
#[derive(Debug, Default)]
pub struct Catalog {
    models: Vec<Arc<Model>>,
    by_name: BTreeMap<String, Arc<Model>>,
    /// The key files read, so that a rotated key is noticed.
    key_files: Vec<PathBuf>,
}

/// The catalog in force, reloaded when the providers file or a key file changes.
pub struct Providers {
    path: PathBuf,
    catalog: RwLock<Arc<Catalog>>,
    loaded: Mutex<Option<SystemTime>>,
}

impl Providers {
    pub fn load(path: &Path) -> Result<Arc<Self>, ProvidersError> {
        let catalog = Catalog::load(path)?;
        let stamp = stamp_of(path, &catalog.key_files);
        Ok(Arc::new(Self { path: path.to_owned(), catalog: RwLock::new(Arc::new(catalog)), loaded: Mutex::new(stamp) }))
    }

    /// Providers given in code (tests, benchmarks), never reloaded.
    pub fn fixed(catalog: Catalog) -> Arc<Self> {
        Arc::new(Self { path: PathBuf::new(), catalog: RwLock::new(Arc::new(catalog)), loaded: Mutex::new(None) })
    }

    pub fn catalog(&self) -> Arc<Catalog> {
        self.catalog.read().unwrap().clone()
    }

    /// Check the files every `every`, for as long as `self` lives.
    pub fn watch(self: &Arc<Self>, every: Duration) {
        crate::reload::poll(self, every, Self::reload_if_changed);
    }

    fn reload_if_changed(&self) {
        let current = stamp_of(&self.path, &self.catalog().key_files);
        if current == *self.loaded.lock().unwrap() {
            return;
        }
        match Catalog::load(&self.path) {
            Ok(catalog) => {
                tracing::info!(models = catalog.models.len(), "providers file reloaded");
                *self.loaded.lock().unwrap() = stamp_of(&self.path, &catalog.key_files);
                *self.catalog.write().unwrap() = Arc::new(catalog);
            }
            Err(error) => {
                tracing::error!(%error, "providers file not reloaded; the last good one stays in force");
                *self.loaded.lock().unwrap() = current;
            }
        }
    }
}

/// One stamp for the providers file and every key file it names.
fn stamp_of(path: &Path, key_files: &[PathBuf]) -> Option<SystemTime> {
    let mut stamp = crate::reload::stamp(path)?;
    for file in key_files {
        if let Some(key_stamp) = crate::reload::stamp(file) {
            stamp = stamp.max(key_stamp) + Duration::from_nanos(1);
        }
    }
    Some(stamp)
}

impl Catalog {
    /// Read and check the file, and read each provider's key file.
    pub fn load(path: &Path) -> Result<Self, ProvidersError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ProvidersError::Read { path: path.to_owned(), source })?;
        let file: ProvidersFile = serde_saphyr::from_str(&text)
            .map_err(|e| ProvidersError::Parse { path: path.to_owned(), message: e.to_string() })?;
        let base_dir = path.parent().unwrap_or(Path::new("."));
        let mut catalog = Catalog::default();
        for entry in file.providers {
            let invalid = |message: String| ProvidersError::Invalid { provider: entry.name.clone(), message };
            let (provider, key_file) = provider(&entry, base_dir).map_err(invalid)?;
            catalog.key_files.extend(key_file);
            let provider = Arc::new(provider);
            for model in &entry.models {
                let prices = Prices::per_million(
                    model.input_per_million_usd,
                    model.output_per_million_usd,
                    model.cached_input_per_million_usd.unwrap_or(model.input_per_million_usd),
                )
                .ok_or_else(|| invalid(format!("model {}: prices must be amounts of dollars", model.name)))?;
                let model = Arc::new(Model {
                    name: model.name.clone(),
                    aliases: model.aliases.clone(),
                    upstream: model.upstream.clone().unwrap_or_else(|| model.name.clone()),
                    prices,
                    max_output_tokens: model.max_output_tokens.max(1),
                    provider: provider.clone(),
                });
                for name in std::iter::once(&model.name).chain(&model.aliases) {
                    if catalog.by_name.insert(name.clone(), model.clone()).is_some() {
                        return Err(invalid(format!("model name {name} is declared twice")));
                    }
                }
                catalog.models.push(model);
            }
        }
        Ok(catalog)
    }

    /// The model called `name` (or aliased so).
    pub fn model(&self, name: &str) -> Option<&Arc<Model>> {
        self.by_name.get(name)
    }

    pub fn models(&self) -> &[Arc<Model>] {
        &self.models
    }

    pub fn is_empty(&self) -> bool {
        self.models.is_empty()
    }
}

fn provider(entry: &ProviderEntry, base_dir: &Path) -> Result<(Provider, Option<PathBuf>), String> {
    let base_url = entry.base_url.trim_end_matches('/').to_owned();
    if !(base_url.starts_with("http://") || base_url.starts_with("https://")) {
        return Err("base_url must be an http:// or https:// URL".into());
    }
    if entry.name.is_empty() || !entry.name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
        return Err("name must be letters, digits, '-', '_' or '.'".into());
    }
    let key_file = entry.api_key_file.as_ref().map(|f| if f.is_absolute() { f.clone() } else { base_dir.join(f) });
    let api_key = match &key_file {
        Some(file) => {
            let key = std::fs::read_to_string(file)
                .map_err(|e| format!("cannot read the API key file {}: {}", file.display(), e.kind()))?;
            let key = key.trim().to_owned();
            if key.is_empty() {
                return Err(format!("the API key file {} is empty", file.display()));
            }
            Some(ApiKey(key))
        }
        None => None,
    };
    if entry.max_concurrency == 0 {
        return Err("max_concurrency must be at least 1".into());
    }
    if entry.models.is_empty() {
        return Err("declare at least one model".into());
    }
    let provider = Provider {
        name: entry.name.clone(),
        base_url,
        api_key,
        timeout: Duration::from_secs(entry.timeout_seconds.max(1)),
        connect_timeout: Duration::from_secs(entry.connect_timeout_seconds.max(1)),
        max_retries: entry.max_retries.min(10),
        retry_window: Duration::from_secs(entry.retry_window_seconds),
        slots: Arc::new(Semaphore::new(entry.max_concurrency)),
        max_concurrency: entry.max_concurrency,
    };
    Ok((provider, key_file))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, yaml: &str) -> PathBuf {
        let path = dir.join("providers.yaml");
        std::fs::write(&path, yaml).unwrap();
        path
    }

    #[test]
    fn models_answer_to_their_aliases_and_keys_stay_hidden() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("key"), "sk-secret-value\n").unwrap();
        let path = write(
            dir.path(),
            "providers:\n  - name: local\n    base_url: http://127.0.0.1:9/v1/\n    api_key_file: key\n    models:\n      - name: m1\n        upstream: up-1\n        aliases: [small]\n        input_per_million_usd: 2.5\n        output_per_million_usd: 10\n",
        );
        let catalog = Catalog::load(&path).unwrap();
        let model = catalog.model("small").unwrap();
        assert_eq!((model.name.as_str(), model.upstream.as_str()), ("m1", "up-1"));
        assert_eq!(model.prices, Prices { input: 2500, output: 10_000, cached_input: 2500 });
        assert_eq!(model.provider.base_url, "http://127.0.0.1:9/v1");
        assert_eq!(model.provider.api_key.as_ref().unwrap().expose(), "sk-secret-value");
        assert!(!format!("{catalog:?}").contains("sk-secret"));
    }

    #[test]
    fn bad_files_are_clear_errors_without_the_key() {
        let dir = tempfile::tempdir().unwrap();
        for (yaml, expected) in [
            ("providers:\n  - name: p\n    base_url: ftp://x\n    models: [{name: m}]\n", "base_url"),
            ("providers:\n  - name: p\n    base_url: http://x\n    models: []\n", "at least one model"),
            (
                "providers:\n  - name: p\n    base_url: http://x\n    api_key_file: missing\n    models: [{name: m}]\n",
                "API key file",
            ),
            ("providers:\n  - name: p\n    base_url: http://x\n    models: [{name: m}, {name: m}]\n", "twice"),
            (
                "providers:\n  - name: p\n    base_url: http://x\n    models: [{name: m, input_per_million_usd: -1}]\n",
                "prices",
            ),
            ("providers: [{name: p, base_url: http://x, bogus: 1, models: [{name: m}]}]\n", "bogus"),
        ] {
            let error = Catalog::load(&write(dir.path(), yaml)).unwrap_err().to_string();
            assert!(error.contains(expected), "{yaml}: {error}");
        }
    }
}
