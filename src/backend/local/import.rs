//! State directories of the format before the store: each job's record and events in
//! `jobs/<id>/record.json`. At start, every such file is imported into the store in one
//! transaction (jobs already there are left as they are, so an import cut short by a crash is
//! simply done again), then renamed `record.json.imported`; the job's output, result and
//! workspace stay where they are.

use super::private_dir;
use crate::jobs::{
    BackendError, JobEvent, JobRecord,
    records::{KeptJob, LocalRecords},
};
use std::{os::unix::fs::PermissionsExt as _, path::Path};

/// The file each job's record and events were kept in.
pub const RECORD_FILE: &str = "record.json";
/// What an imported record file is renamed to.
pub const IMPORTED_FILE: &str = "record.json.imported";

/// A record file as the backend wrote it (its `pgid` is not needed: the server kills every
/// process of every job it knows at start).
#[derive(serde::Deserialize)]
struct RecordFile {
    record: JobRecord,
    events: Vec<JobEvent>,
}

/// Import the record files under `jobs_dir` for `owner`; how many jobs were found. A file that
/// cannot be read is left in place, with a warning, as the server before did.
pub async fn import_record_files(
    jobs_dir: &Path,
    records: &dyn LocalRecords,
    owner: &str,
) -> Result<usize, BackendError> {
    let failed = |e: std::io::Error| BackendError::Internal(format!("cannot read {}: {e}", jobs_dir.display()));
    private_dir(jobs_dir).await.map_err(failed)?;
    let mut dir = tokio::fs::read_dir(jobs_dir).await.map_err(failed)?;
    let mut found = Vec::new();
    let mut files = Vec::new();
    while let Some(entry) = dir.next_entry().await.map_err(failed)? {
        let path = entry.path().join(RECORD_FILE);
        let Ok(text) = tokio::fs::read(&path).await else { continue };
        match serde_json::from_slice::<RecordFile>(&text) {
            Ok(file) => {
                // Directories written by older versions become private too.
                let _ = tokio::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(0o700)).await;
                found.push(KeptJob { record: file.record, events: file.events });
                files.push(path);
            }
            Err(error) => tracing::warn!(path = %path.display(), %error, "skipping an unreadable job record"),
        }
    }
    if found.is_empty() {
        return Ok(0);
    }
    let added = records
        .put_missing(owner, &found)
        .await
        .map_err(|e| BackendError::Internal(format!("cannot import the job records of {}: {e}", jobs_dir.display())))?;
    for path in &files {
        tokio::fs::rename(path, path.with_file_name(IMPORTED_FILE))
            .await
            .map_err(|e| BackendError::Internal(format!("cannot rename {}: {e}", path.display())))?;
    }
    tracing::info!(
        found = found.len(),
        imported = added,
        "imported the job records of an older state directory into the store; each record.json is now record.json.imported"
    );
    Ok(found.len())
}
