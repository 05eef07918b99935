//! Embedded, versioned migrations, applied at start.
//!
//! Each migration runs in its own transaction and is recorded in `oats_migrations`. Replicas
//! starting together take turns through a PostgreSQL session advisory lock (SQLite is one
//! process's embedded file).

use super::{Engine, Store, StoreError, now_millis};
use sqlx::{Connection, Row};

/// Every migration, in order. Never edit one that has shipped; add the next.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "llm ledger", include_str!("migrations/0001_llm_ledger.sql")),
    (2, "job history", include_str!("migrations/0002_job_history.sql")),
    (3, "local jobs", include_str!("migrations/0003_local_jobs.sql")),
];

/// Key of the advisory lock ("oats" in ASCII).
const LOCK_KEY: i64 = 0x6f61_7473;

pub(super) async fn run(store: &Store) -> Result<(), StoreError> {
    let mut conn = store.pool.acquire().await?;
    if store.engine == Engine::Postgres {
        sqlx::query("SELECT pg_advisory_lock($1)").bind(LOCK_KEY).execute(&mut *conn).await?;
    }
    let applied = apply_pending(store.engine, &mut conn).await;
    if store.engine == Engine::Postgres {
        sqlx::query("SELECT pg_advisory_unlock($1)").bind(LOCK_KEY).execute(&mut *conn).await?;
    }
    applied
}

async fn apply_pending(engine: Engine, conn: &mut sqlx::AnyConnection) -> Result<(), StoreError> {
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS oats_migrations (version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_at BIGINT NOT NULL)",
    )
    .execute(&mut *conn)
    .await?;
    for &(version, name, sql) in MIGRATIONS {
        let failed = |e: sqlx::Error| StoreError::Migration { version, name, message: e.to_string() };
        let mut tx = conn.begin().await.map_err(failed)?;
        let done = sqlx::query("SELECT COUNT(*) AS n FROM oats_migrations WHERE version = $1")
            .bind(version)
            .fetch_one(&mut *tx)
            .await
            .map_err(failed)?
            .try_get::<i64, _>("n")
            .map_err(failed)?;
        if done > 0 {
            continue;
        }
        for statement in statements(sql) {
            sqlx::query(&statement).execute(&mut *tx).await.map_err(failed)?;
        }
        sqlx::query("INSERT INTO oats_migrations (version, name, applied_at) VALUES ($1, $2, $3)")
            .bind(version)
            .bind(name)
            .bind(now_millis())
            .execute(&mut *tx)
            .await
            .map_err(failed)?;
        tx.commit().await.map_err(failed)?;
        tracing::info!(version, name, engine = engine.as_str(), "store migration applied");
    }
    Ok(())
}

/// The statements of a migration file: `--` comments dropped, split at `;`.
fn statements(sql: &str) -> Vec<String> {
    let code: String =
        sql.lines().map(|line| line.split_once("--").map_or(line, |(code, _)| code)).collect::<Vec<_>>().join("\n");
    code.split(';').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn migration_files_split_into_statements() {
        let statements = super::statements(
            "-- a comment; with a semicolon\nCREATE TABLE t (a TEXT); -- trailing\nCREATE INDEX i ON t (a);\n",
        );
        assert_eq!(statements, ["CREATE TABLE t (a TEXT)", "CREATE INDEX i ON t (a)"]);
    }
}
