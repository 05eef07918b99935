//! The local backend's jobs in the store (`local_jobs`): one row per job and owner, its record
//! and events as JSON, replaced on every change.

use super::{Store, StoreError, now_millis};
use crate::jobs::{
    JobEvent, JobId, JobRecord,
    records::{KeptJob, LocalRecords, RecordsError},
};
use async_trait::async_trait;
use sqlx::Row;

/// Rows per INSERT of a batch: 7 parameters each, within both engines' limits on parameters.
const ROWS_PER_INSERT: usize = 500;

const COLUMNS: &str = "owner, id, created_ns, phase, record, events, updated_ms";

impl From<sqlx::Error> for RecordsError {
    fn from(error: sqlx::Error) -> Self {
        Self::Unavailable(StoreError::from(error).to_string())
    }
}

/// One row's values, encoded.
struct EncodedJob {
    id: String,
    created_ns: i64,
    phase: &'static str,
    record: String,
    events: String,
}

fn encode(record: &JobRecord, events: &[JobEvent]) -> EncodedJob {
    EncodedJob {
        id: record.id.to_string(),
        created_ns: record.created_at.timestamp_nanos_opt().unwrap_or(i64::MAX),
        phase: record.status.phase.as_str(),
        record: serde_json::to_string(record).expect("a job record serialises"),
        events: serde_json::to_string(events).expect("events serialise"),
    }
}

/// `($1, …, $7), ($8, …, $14), …` for `rows` rows.
fn values(rows: usize) -> String {
    (0..rows)
        .map(|r| format!("({})", (1..=7).map(|c| format!("${}", r * 7 + c)).collect::<Vec<_>>().join(", ")))
        .collect::<Vec<_>>()
        .join(", ")
}

#[async_trait]
impl LocalRecords for Store {
    async fn load(&self, owner: &str) -> Result<Vec<KeptJob>, RecordsError> {
        let rows = sqlx::query("SELECT id, record, events FROM local_jobs WHERE owner = $1 ORDER BY created_ns, id")
            .bind(owner)
            .fetch_all(&self.pool)
            .await?;
        let mut jobs = Vec::with_capacity(rows.len());
        for row in rows {
            let id: String = row.try_get("id")?;
            let record: String = row.try_get("record")?;
            let events: String = row.try_get("events")?;
            match (serde_json::from_str(&record), serde_json::from_str(&events)) {
                (Ok(record), Ok(events)) => jobs.push(KeptJob { record, events }),
                (Err(error), _) | (_, Err(error)) => {
                    tracing::warn!(job_id = %id, %error, "skipping an unreadable job record in the store");
                }
            }
        }
        Ok(jobs)
    }

    async fn put(&self, owner: &str, record: &JobRecord, events: &[JobEvent]) -> Result<(), RecordsError> {
        let row = encode(record, events);
        sqlx::query(&format!(
            "INSERT INTO local_jobs ({COLUMNS}) VALUES {} ON CONFLICT (owner, id) DO UPDATE SET \
             phase = excluded.phase, record = excluded.record, events = excluded.events, \
             updated_ms = excluded.updated_ms",
            values(1)
        ))
        .bind(owner)
        .bind(row.id)
        .bind(row.created_ns)
        .bind(row.phase)
        .bind(row.record)
        .bind(row.events)
        .bind(now_millis())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn put_missing(&self, owner: &str, jobs: &[KeptJob]) -> Result<u64, RecordsError> {
        let now = now_millis();
        let mut tx = self.pool.begin().await?;
        let mut added = 0;
        for chunk in jobs.chunks(ROWS_PER_INSERT) {
            let sql = format!(
                "INSERT INTO local_jobs ({COLUMNS}) VALUES {} ON CONFLICT (owner, id) DO NOTHING",
                values(chunk.len())
            );
            let mut query = sqlx::query(&sql);
            for job in chunk {
                let row = encode(&job.record, &job.events);
                query = query
                    .bind(owner)
                    .bind(row.id)
                    .bind(row.created_ns)
                    .bind(row.phase)
                    .bind(row.record)
                    .bind(row.events)
                    .bind(now);
            }
            added += query.execute(&mut *tx).await?.rows_affected();
        }
        tx.commit().await?;
        Ok(added)
    }

    async fn remove(&self, owner: &str, id: &JobId) -> Result<(), RecordsError> {
        sqlx::query("DELETE FROM local_jobs WHERE owner = $1 AND id = $2")
            .bind(owner)
            .bind(id.as_str())
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::{JobLimits, JobPhase, JobRequest, JobState, NewJob};
    use chrono::Utc;

    /// SQLite in a temporary directory and the test PostgreSQL (`OATS_TEST_DATABASE_URL`, set by
    /// scripts/test.sh; its absence is a failure, not a skip).
    async fn engines() -> (tempfile::TempDir, Vec<Store>) {
        let url = std::env::var("OATS_TEST_DATABASE_URL")
            .expect("OATS_TEST_DATABASE_URL is not set: run the suite with scripts/test.sh, which starts PostgreSQL");
        let dir = tempfile::tempdir().unwrap();
        let stores = vec![Store::open_in(dir.path()).await.unwrap(), Store::open(&url).await.unwrap()];
        (dir, stores)
    }

    fn job(goal: &str, created_at: chrono::DateTime<Utc>) -> KeptJob {
        let spec = JobRequest { goal: goal.into(), max_turns: 2, ..Default::default() }
            .validate(&JobLimits::default())
            .unwrap();
        let new = NewJob {
            id: JobId::random(),
            tenant: "t".into(),
            spec,
            created_at,
            request_hash: "h".into(),
            trace: None,
            resources: None,
            queue: Default::default(),
        };
        let event = JobEvent {
            time: created_at,
            kind: "Normal".into(),
            reason: "Submitted".into(),
            message: "accepted".into(),
            object: "Process/agent".into(),
            count: 1,
        };
        KeptJob { record: new.pending_record(), events: vec![event] }
    }

    fn json(job: &KeptJob) -> serde_json::Value {
        serde_json::json!({"record": job.record, "events": job.events})
    }

    #[tokio::test]
    async fn jobs_are_stored_replaced_and_removed_per_owner_on_both_engines() {
        let (_dir, stores) = engines().await;
        for store in stores {
            let engine = store.engine().as_str();
            let (owner, other) = (format!("owner-{}", JobId::random()), format!("other-{}", JobId::random()));
            let now = Utc::now();
            let older = job("older", now - chrono::Duration::seconds(5));
            let mut newer = job("newer", now);
            store.put(&owner, &newer.record, &newer.events).await.unwrap();
            store.put(&owner, &older.record, &older.events).await.unwrap();
            // The same id under another owner is another job.
            let mut foreign = older.clone();
            foreign.record.tenant = "someone else".into();
            store.put(&other, &foreign.record, &foreign.events).await.unwrap();

            newer.record.status = JobState::new(JobPhase::Running);
            newer.events.push(JobEvent { reason: "Started".into(), ..newer.events[0].clone() });
            store.put(&owner, &newer.record, &newer.events).await.unwrap();

            let loaded: Vec<_> = store.load(&owner).await.unwrap().iter().map(json).collect();
            assert_eq!(loaded, [json(&older), json(&newer)], "{engine}: oldest first, the newest state");
            let theirs: Vec<_> = store.load(&other).await.unwrap().iter().map(json).collect();
            assert_eq!(theirs, [json(&foreign)], "{engine}");

            store.remove(&owner, &older.record.id).await.unwrap();
            store.remove(&owner, &older.record.id).await.unwrap();
            let loaded: Vec<_> = store.load(&owner).await.unwrap().iter().map(json).collect();
            assert_eq!(loaded, [json(&newer)], "{engine}");
            assert_eq!(store.load(&other).await.unwrap().len(), 1, "{engine}: another owner's job stays");
        }
    }

    #[tokio::test]
    async fn a_batch_adds_only_what_is_missing_and_can_be_repeated_on_both_engines() {
        let (_dir, stores) = engines().await;
        for store in stores {
            let engine = store.engine().as_str();
            let owner = format!("owner-{}", JobId::random());
            let base = Utc::now() - chrono::Duration::hours(1);
            let jobs: Vec<KeptJob> =
                (0..1_234).map(|i| job(&format!("job {i}"), base + chrono::Duration::seconds(i))).collect();
            // A job stored since (changed by its backend) is not overwritten by a repeated batch.
            let mut changed = jobs[7].clone();
            changed.record.status = JobState::new(JobPhase::Succeeded);
            assert_eq!(store.put_missing(&owner, &jobs[..100]).await.unwrap(), 100, "{engine}");
            store.put(&owner, &changed.record, &changed.events).await.unwrap();
            assert_eq!(store.put_missing(&owner, &jobs).await.unwrap(), 1_134, "{engine}");
            assert_eq!(store.put_missing(&owner, &jobs).await.unwrap(), 0, "{engine}");
            let loaded = store.load(&owner).await.unwrap();
            let mut expected: Vec<_> = jobs.iter().map(json).collect();
            expected[7] = json(&changed);
            assert_eq!(loaded.iter().map(json).collect::<Vec<_>>(), expected, "{engine}");
        }
    }
}
