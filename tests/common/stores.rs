//! The store on both engines: SQLite in a temporary directory, and the PostgreSQL server
//! scripts/test.sh starts (`OATS_TEST_DATABASE_URL`, `OATS_TEST_DATABASE_URL2`).

use oats::{jobs::JobId, store::Store};

/// The PostgreSQL URL of the test server; its absence is a failure, not a skip.
pub fn postgres_url() -> String {
    std::env::var("OATS_TEST_DATABASE_URL").expect(
        "OATS_TEST_DATABASE_URL is not set: run the suite with scripts/test.sh, which starts a PostgreSQL server",
    )
}

/// A second database of the same server, for a test that needs one to itself.
pub fn second_postgres_url() -> String {
    std::env::var("OATS_TEST_DATABASE_URL2").expect(
        "OATS_TEST_DATABASE_URL2 is not set: run the suite with scripts/test.sh, which starts a PostgreSQL server",
    )
}

/// Each engine by name, with the directory that holds the SQLite one.
pub async fn engines() -> Vec<(&'static str, Store, Option<tempfile::TempDir>)> {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = Store::open_in(dir.path()).await.expect("SQLite opens");
    let postgres = Store::open(&postgres_url()).await.expect("PostgreSQL opens");
    vec![("sqlite", sqlite, Some(dir)), ("postgres", postgres, None)]
}

/// A tenant name no other test (or earlier run against the same database) uses.
pub fn tenant() -> String {
    format!("t-{}", JobId::random().as_str().trim_start_matches("job-"))
}
