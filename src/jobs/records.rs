//! Where a backend that is its own system of record (the local backend) keeps its jobs: each
//! job's record and events, written through on every change and read back at start.
//!
//! The domain owns the contract; the store implements it. Reads are served from the backend's
//! memory, so the store is only written, and read once at start.

use super::{JobEvent, JobId, JobRecord};
use async_trait::async_trait;

/// A job as kept: its record and its events, oldest first.
#[derive(Debug, Clone)]
pub struct KeptJob {
    pub record: JobRecord,
    pub events: Vec<JobEvent>,
}

/// Why the records could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum RecordsError {
    /// The database cannot be reached or refused the write; it may succeed later.
    #[error("the job records are unavailable: {0}")]
    Unavailable(String),
}

/// The jobs of one owner (a backend's state directory: several may share a database), each
/// under its id.
#[async_trait]
pub trait LocalRecords: Send + Sync {
    /// Every job of `owner`, oldest first. Rows that cannot be read are skipped with a warning.
    async fn load(&self, owner: &str) -> Result<Vec<KeptJob>, RecordsError>;

    /// Store the job as it is now (inserted, or replacing what was stored).
    async fn put(&self, owner: &str, record: &JobRecord, events: &[JobEvent]) -> Result<(), RecordsError>;

    /// Store the jobs that are not stored yet, in one transaction, leaving stored ones as they
    /// are (so an import or a seed can be repeated); how many were new.
    async fn put_missing(&self, owner: &str, jobs: &[KeptJob]) -> Result<u64, RecordsError>;

    /// Forget a job (gone is fine).
    async fn remove(&self, owner: &str, id: &JobId) -> Result<(), RecordsError>;
}
