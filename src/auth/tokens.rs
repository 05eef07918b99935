//! Bearer API tokens from a file (mounted from a Secret), stored only as SHA-256 hashes and
//! reloaded when the file changes. A file that fails to load is reported and the last good set of
//! tokens stays in force.

use crate::jobs::{Caller, Role};
use sha2::{Digest, Sha256};
use std::{
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

/// Why a token file cannot be used. At start this stops the server; on a reload the file is
/// rejected and the tokens in force stay.
#[derive(Debug, thiserror::Error)]
pub enum TokensError {
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{}: {reason}", path.display())]
    Invalid { path: PathBuf, reason: TokenFileError },
}

/// What is wrong inside a token file.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    #[error("{0}")]
    Parse(String),
    #[error("token {0}: sha256 must be 64 hex digits")]
    BadHash(String),
    #[error("token {name}: tenant {tenant:?} is not usable: {why}")]
    UnusableTenant { name: String, tenant: String, why: String },
}

/// The token file: `tokens: [{name, sha256, tenant, role}]`, where `sha256` is the hex SHA-256
/// of the token (`oats hash-token` prints it).
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenFile {
    pub tokens: Vec<TokenEntry>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenEntry {
    pub name: String,
    pub sha256: String,
    pub tenant: String,
    pub role: Role,
}

struct Token {
    hash: [u8; 32],
    caller: Caller,
}

/// The hex SHA-256 of a token, as the token file stores it.
pub fn hash_token(token: &str) -> String {
    Sha256::digest(token.trim().as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// Equal in time independent of where the inputs differ.
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn parse(text: &str) -> Result<Vec<Token>, TokenFileError> {
    let file: TokenFile = serde_saphyr::from_str(text).map_err(|e| TokenFileError::Parse(e.to_string()))?;
    file.tokens
        .into_iter()
        .map(|entry| {
            let bytes = (0..entry.sha256.len())
                .step_by(2)
                .map(|i| entry.sha256.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
                .collect::<Option<Vec<u8>>>();
            let hash: [u8; 32] =
                bytes.and_then(|b| b.try_into().ok()).ok_or_else(|| TokenFileError::BadHash(entry.name.clone()))?;
            if let Err(why) = super::check_tenant(&entry.tenant) {
                return Err(TokenFileError::UnusableTenant { name: entry.name, tenant: entry.tenant, why });
            }
            Ok(Token {
                hash,
                caller: Caller { tenant: entry.tenant.into(), role: entry.role, name: entry.name.into() },
            })
        })
        .collect()
}

fn read(path: &Path) -> Result<Vec<Token>, TokensError> {
    let text = std::fs::read_to_string(path).map_err(|source| TokensError::Read { path: path.into(), source })?;
    parse(&text).map_err(|reason| TokensError::Invalid { path: path.into(), reason })
}

/// The current tokens, kept up to date with the file.
pub struct TokenStore {
    path: PathBuf,
    tokens: RwLock<Vec<Token>>,
    loaded: RwLock<Option<SystemTime>>,
}

impl TokenStore {
    /// Load the file; it must be valid at start.
    pub fn load(path: &Path) -> Result<Arc<Self>, TokensError> {
        let tokens = read(path)?;
        tracing::info!(path = %path.display(), tokens = tokens.len(), "API tokens loaded");
        Ok(Arc::new(Self {
            path: path.to_owned(),
            tokens: RwLock::new(tokens),
            loaded: RwLock::new(crate::reload::stamp(path)),
        }))
    }

    /// Check the file every `every` and reload it when it changed (Secret volumes update in place).
    pub fn watch(self: &Arc<Self>, every: Duration) {
        crate::reload::poll(self, every, Self::reload_if_changed);
    }

    fn reload_if_changed(&self) {
        let current = crate::reload::stamp(&self.path);
        if current == *self.loaded.read().unwrap() {
            return;
        }
        *self.loaded.write().unwrap() = current;
        match read(&self.path) {
            Ok(tokens) => {
                tracing::info!(path = %self.path.display(), tokens = tokens.len(), "API tokens reloaded");
                *self.tokens.write().unwrap() = tokens;
            }
            Err(error) => {
                tracing::error!(path = %self.path.display(), %error, "token file rejected; keeping the previous tokens")
            }
        }
    }

    /// The caller holding `token`, comparing against every stored hash in constant time.
    pub fn lookup(&self, token: &str) -> Option<Caller> {
        let presented: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let tokens = self.tokens.read().unwrap();
        let mut found = None;
        for stored in tokens.iter() {
            if constant_time_eq(&stored.hash, &presented) {
                found = Some(stored.caller.clone());
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(entries: &[(&str, &str, &str, &str)]) -> String {
        let mut text = String::from("tokens:\n");
        for (name, token, tenant, role) in entries {
            text.push_str(&format!(
                "  - name: {name}\n    sha256: {}\n    tenant: {tenant}\n    role: {role}\n",
                hash_token(token)
            ));
        }
        text
    }

    #[test]
    fn tokens_map_to_tenant_and_role() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.yaml");
        std::fs::write(&path, file(&[("ci", "secret-a", "acme", "submitter"), ("ro", "secret-b", "acme", "viewer")]))
            .unwrap();
        let store = TokenStore::load(&path).unwrap();
        let ci = store.lookup("secret-a").unwrap();
        assert_eq!((&*ci.tenant, ci.role, &*ci.name), ("acme", Role::Submitter, "ci"));
        assert_eq!(store.lookup("secret-b").unwrap().role, Role::Viewer);
        assert!(store.lookup("secret-c").is_none());
        assert!(store.lookup("").is_none());
    }

    #[test]
    fn a_bad_file_keeps_the_last_good_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.yaml");
        std::fs::write(&path, file(&[("ci", "secret-a", "acme", "submitter")])).unwrap();
        let store = TokenStore::load(&path).unwrap();
        std::fs::write(&path, "tokens: [{name: x, sha256: nothex, tenant: t, role: admin}]\n").unwrap();
        store.reload_if_changed();
        assert!(store.lookup("secret-a").is_some(), "the previous tokens stay in force");
        std::fs::write(&path, file(&[("new", "secret-new", "beta", "admin")])).unwrap();
        store.reload_if_changed();
        assert!(store.lookup("secret-a").is_none());
        assert_eq!(&*store.lookup("secret-new").unwrap().tenant, "beta");
    }

    #[test]
    fn a_tenant_that_cannot_be_a_label_value_is_a_load_error_naming_the_entry() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.yaml");
        for (tenant, why) in [
            ("\"Acme Corp\"", "alphanumerics"),
            ("acme/ml", "alphanumerics"),
            ("-acme", "starting and ending"),
            (&"a".repeat(64), "at most 63"),
            ("\"\"", "empty"),
        ] {
            let text = format!(
                "tokens:\n  - {{name: good, sha256: {}, tenant: acme, role: admin}}\n  - {{name: ci-bot, sha256: {}, tenant: {tenant}, role: submitter}}\n",
                hash_token("a"),
                hash_token("b")
            );
            std::fs::write(&path, text).unwrap();
            let error = TokenStore::load(&path).err().unwrap_or_else(|| panic!("tenant {tenant} accepted")).to_string();
            assert!(error.contains("token ci-bot: tenant") && error.contains(why), "{tenant}: {error}");
        }
        // At most 63 characters of the label alphabet is fine.
        let text = format!(
            "tokens:\n  - {{name: ok, sha256: {}, tenant: {}, role: admin}}\n",
            hash_token("a"),
            "a.b_c-9".repeat(9)
        );
        std::fs::write(&path, text).unwrap();
        assert!(TokenStore::load(&path).is_ok());
    }

    #[test]
    fn invalid_files_are_refused_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.yaml");
        for bad in [
            "tokens: [{name: x, sha256: abc, tenant: t, role: admin}]",
            "tokens: [{name: x, sha256: 00, tenant: t, role: root}]",
            "nope: 1",
        ] {
            std::fs::write(&path, bad).unwrap();
            assert!(TokenStore::load(&path).is_err(), "{bad} accepted");
        }
    }
}
