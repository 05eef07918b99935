//! The store: state that must outlive a process and agree across replicas (the LLM ledger, the
//! job history, the local backend's jobs). One interface, two engines behind sqlx's `Any`
//! driver: SQLite (embedded, a file in the state directory, the default) and PostgreSQL
//! (`database_url`, for several replicas). The SQL is written once, in the subset both engines
//! run.

mod history;
mod ledger;
mod local;
mod migrate;
mod record_cache;

pub use ledger::{CallTicket, LedgerLimits, today};

use sqlx::{
    AnyPool, Connection,
    any::{AnyConnectOptions, AnyPoolOptions},
};
use std::{os::unix::fs::OpenOptionsExt as _, path::Path, str::FromStr, time::Duration};

/// Why the store could not do what was asked. Never carries the database URL (it may hold a
/// password).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or answered with an error; the call may succeed later.
    #[error("the store is unavailable: {0}")]
    Unavailable(String),
    /// The database URL names no engine OATS supports.
    #[error("database_url must start with sqlite: or postgres:// (got a URL starting with `{0}`)")]
    UnsupportedEngine(String),
    /// A migration failed; the server must not start on a half-migrated schema.
    #[error("migration {version} ({name}) failed: {message}")]
    Migration { version: i64, name: &'static str, message: String },
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        Self::Unavailable(redact(&error.to_string()))
    }
}

/// Drop anything that looks like a URL with credentials from a driver's message.
fn redact(message: &str) -> String {
    message
        .split(' ')
        .map(|word| if word.contains("://") && word.contains('@') { "<database url>" } else { word })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Which database is behind the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Sqlite,
    Postgres,
}

impl Engine {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sqlite => "sqlite",
            Self::Postgres => "postgres",
        }
    }
}

/// A PostgreSQL connection idle this long is pinged before use (the server or the network may
/// have dropped it meanwhile); one in steady use is not.
const PING_IDLE_AFTER: Duration = Duration::from_secs(30);

/// A connection pool to the store's database, migrated to the schema this build expects.
#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    engine: Engine,
    archived: std::sync::Arc<record_cache::ArchivedRecords>,
}

impl Store {
    /// Open `url` (`sqlite:<path>` or `postgres://…`) and apply pending migrations. Several
    /// replicas may do this at once: PostgreSQL migrations run under an advisory lock.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let engine = if url.starts_with("sqlite:") {
            Engine::Sqlite
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Engine::Postgres
        } else {
            return Err(StoreError::UnsupportedEngine(url.chars().take_while(|c| *c != ':').collect()));
        };
        let options = AnyConnectOptions::from_str(url)?;
        let pool = match engine {
            // SQLite has one writer at a time; one connection keeps every transaction serial
            // instead of retrying on SQLITE_BUSY. A file cannot drop a connection: never pinged.
            Engine::Sqlite => {
                AnyPoolOptions::new().max_connections(1).after_connect(|conn, _| Box::pin(sqlite_pragmas(conn)))
            }
            Engine::Postgres => AnyPoolOptions::new().max_connections(16).before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for >= PING_IDLE_AFTER {
                        conn.ping().await?;
                    }
                    Ok(true)
                })
            }),
        }
        // sqlx pings every connection it hands out by default: a round trip before every query.
        .test_before_acquire(false)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(options)
        .await?;
        let store = Self { pool, engine, archived: Default::default() };
        migrate::run(&store).await?;
        Ok(store)
    }

    /// The embedded default: `oats.db` in the state directory (created if missing, readable by
    /// this user only, as its journal files then are too).
    pub async fn open_in(state_dir: &Path) -> Result<Self, StoreError> {
        let path = state_dir.join("oats.db");
        let failed = |e: std::io::Error| StoreError::Unavailable(format!("cannot create {}: {e}", path.display()));
        std::fs::create_dir_all(state_dir).map_err(failed)?;
        std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(&path).map_err(failed)?;
        Self::open(&format!("sqlite://{}?mode=rwc", path.display())).await
    }

    pub fn engine(&self) -> Engine {
        self.engine
    }

    /// Whether the database answers now.
    pub async fn ping(&self) -> bool {
        sqlx::query("SELECT 1").execute(&self.pool).await.is_ok()
    }

    /// Make an SQLite store refuse (or take again) every write, as a database that is down
    /// would: for tests of what a failed write does. SQLite has one connection, so this holds.
    #[cfg(test)]
    pub(crate) async fn refuse_writes(&self, refuse: bool) {
        assert_eq!(self.engine, Engine::Sqlite, "only an SQLite store can be made read-only");
        let pragma = if refuse { "PRAGMA query_only = ON" } else { "PRAGMA query_only = OFF" };
        sqlx::query(pragma).execute(&self.pool).await.unwrap();
    }
}

/// WAL lets readers go on while the one writer writes.
async fn sqlite_pragmas(conn: &mut sqlx::AnyConnection) -> Result<(), sqlx::Error> {
    for pragma in ["PRAGMA journal_mode = WAL", "PRAGMA synchronous = NORMAL", "PRAGMA busy_timeout = 5000"] {
        sqlx::query(pragma).execute(&mut *conn).await?;
    }
    Ok(())
}

/// Ids asked about in one query (well under SQLite's limit of bound parameters).
const IDS_PER_QUERY: usize = 500;

/// `$from, $from+1, …` for `count` parameters.
fn placeholders(from: usize, count: usize) -> String {
    (from..from + count).map(|i| format!("${i}")).collect::<Vec<_>>().join(", ")
}

impl Store {
    /// The rows of `select` (a query ending in `… IN`) for `ids`: one query per
    /// [`IDS_PER_QUERY`] ids.
    async fn rows_in(&self, select: &str, ids: &[&str]) -> Result<Vec<sqlx::any::AnyRow>, sqlx::Error> {
        let mut rows = Vec::new();
        for chunk in ids.chunks(IDS_PER_QUERY) {
            let sql = format!("{select} ({})", placeholders(1, chunk.len()));
            let mut query = sqlx::query(&sql);
            for id in chunk {
                query = query.bind(*id);
            }
            rows.extend(query.fetch_all(&self.pool).await?);
        }
        Ok(rows)
    }
}

/// Milliseconds since the Unix epoch, as stored.
fn now_millis() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// A count or amount as the database holds it (BIGINT), saturating at its ceiling.
fn db_int(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// A count or amount read back (never negative by construction).
fn from_db(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn driver_messages_lose_credentials() {
        let message = "error connecting to postgres://oats:s3cret@db:5432/oats: refused";
        assert!(!redact(message).contains("s3cret"));
    }

    #[tokio::test]
    async fn unknown_engines_are_refused_by_name() {
        let error = Store::open("mysql://u:p@h/db").await.err().unwrap();
        assert!(matches!(error, StoreError::UnsupportedEngine(ref e) if e == "mysql"));
        assert!(!error.to_string().contains("u:p"));
    }
}
