//! Job history in the store: one row per archived job (record and events as JSON, the output's
//! tail compressed), ordered for listing by `(created_ns, id)` like the live list, and claims
//! that let one replica archive each job.

use super::{Store, StoreError, db_int, ledger::USAGE_COLUMNS, now_millis};
use crate::jobs::{
    JobEvent, JobId, JobRecord, ListQuery,
    history::{ArchivedJob, HistoryError, JobHistory},
};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::{Row, any::AnyRow};
use std::{
    collections::{HashMap, HashSet},
    io::{Read, Write},
    sync::Arc,
    time::Duration,
};

/// Rows read per query while a label selector filters a page (the selector is applied here, not
/// in SQL: labels are part of the JSON record); without one, a query reads just the page.
const PAGE_BATCH: i64 = 200;

impl From<StoreError> for HistoryError {
    fn from(error: StoreError) -> Self {
        Self::Unavailable(error.to_string())
    }
}

fn unavailable(error: sqlx::Error) -> HistoryError {
    StoreError::from(error).into()
}

fn nanos(time: DateTime<Utc>) -> i64 {
    time.timestamp_nanos_opt().unwrap_or(i64::MAX)
}

fn compress(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(bytes).and_then(|()| encoder.finish()).expect("compressing into memory cannot fail")
}

fn decompress(id: &JobId, bytes: &[u8]) -> Result<Vec<u8>, HistoryError> {
    let mut out = Vec::new();
    flate2::read::ZlibDecoder::new(bytes)
        .read_to_end(&mut out)
        .map_err(|e| HistoryError::Corrupt { id: id.to_string(), message: format!("logs: {e}") })?;
    Ok(out)
}

fn decode<T: serde::de::DeserializeOwned>(id: &str, what: &str, json: &str) -> Result<T, HistoryError> {
    serde_json::from_str(json).map_err(|e| HistoryError::Corrupt { id: id.to_owned(), message: format!("{what}: {e}") })
}

impl Store {
    /// The record of an archived row (`id`, `record`, `finished_ms`): kept decoded after the
    /// first read (see [`record_cache`](super::record_cache)).
    fn record_of(&self, row: &AnyRow) -> Result<Arc<JobRecord>, HistoryError> {
        let id: String = row.try_get("id").map_err(unavailable)?;
        if let Some(record) = self.archived.get(&id) {
            return Ok(record);
        }
        let json: String = row.try_get("record").map_err(unavailable)?;
        let finished_ms: i64 = row.try_get("finished_ms").map_err(unavailable)?;
        let record: Arc<JobRecord> = decode(&id, "record", &json).map(Arc::new)?;
        self.archived.insert(record.clone(), finished_ms, json.len());
        Ok(record)
    }
}

impl Store {
    /// Columns of one archived job (and its id).
    async fn archived_column(&self, id: &JobId, column: &str) -> Result<Option<AnyRow>, HistoryError> {
        sqlx::query(&format!("SELECT id, {column} FROM job_archive WHERE id = $1"))
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(unavailable)
    }
}

#[async_trait]
impl JobHistory for Store {
    async fn claim(&self, id: &JobId, holder: &str, lease: Duration) -> Result<bool, HistoryError> {
        let now = now_millis();
        let expires = now.saturating_add(i64::try_from(lease.as_millis()).unwrap_or(i64::MAX));
        let claimed = sqlx::query(
            "INSERT INTO job_archive_claims (id, holder, expires_ms) \
             SELECT $1, $2, $3 WHERE NOT EXISTS (SELECT 1 FROM job_archive WHERE id = $1) \
             ON CONFLICT (id) DO UPDATE SET holder = excluded.holder, expires_ms = excluded.expires_ms \
             WHERE job_archive_claims.expires_ms < $4 OR job_archive_claims.holder = excluded.holder",
        )
        .bind(id.as_str())
        .bind(holder)
        .bind(expires)
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(claimed.rows_affected() == 1)
    }

    async fn archive(&self, job: &ArchivedJob) -> Result<bool, HistoryError> {
        let record = &job.record;
        let record_json = serde_json::to_string(record).expect("a job record serialises");
        let events_json = serde_json::to_string(&job.events).expect("events serialise");
        let finished = record.finished_at.map_or_else(now_millis, |t| t.timestamp_millis());
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        let stored = sqlx::query(
            "INSERT INTO job_archive (id, tenant, created_ns, finished_ms, phase, record, events, logs, log_bytes, \
             logs_truncated, archived_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) \
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(record.id.as_str())
        .bind(record.tenant.as_str())
        .bind(nanos(record.created_at))
        .bind(finished)
        .bind(record.status.phase.as_str())
        .bind(record_json)
        .bind(events_json)
        .bind(compress(&job.logs))
        .bind(db_int(job.logs.len() as u64))
        .bind(i64::from(job.logs_truncated))
        .bind(now_millis())
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        sqlx::query("DELETE FROM job_archive_claims WHERE id = $1")
            .bind(record.id.as_str())
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
        Ok(stored.rows_affected() == 1)
    }

    async fn archived_among(&self, ids: &[JobId]) -> Result<HashSet<JobId>, HistoryError> {
        let mut archived = HashSet::new();
        let ids: Vec<&str> = ids.iter().map(JobId::as_str).collect();
        for row in self.rows_in("SELECT id FROM job_archive WHERE id IN", &ids).await.map_err(unavailable)? {
            let id: String = row.try_get("id").map_err(unavailable)?;
            if let Ok(id) = JobId::parse(&id) {
                archived.insert(id);
            }
        }
        Ok(archived)
    }

    async fn record(&self, id: &JobId) -> Result<Option<Arc<JobRecord>>, HistoryError> {
        if let Some(record) = self.archived.get(id.as_str()) {
            return Ok(Some(record));
        }
        // Its ledger row comes in the same query: a job read once is usually read again, and
        // then needs no query at all once its usage is final.
        let row = sqlx::query(&format!(
            "SELECT id, record, finished_ms, job_id, {USAGE_COLUMNS} FROM job_archive \
             LEFT JOIN llm_job_ledger ON llm_job_ledger.job_id = job_archive.id WHERE id = $1"
        ))
        .bind(id.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(unavailable)?;
        let Some(row) = row else { return Ok(None) };
        let record = self.record_of(&row)?;
        self.keep_usage_of_row(id.as_str(), &row, now_millis())?;
        Ok(Some(record))
    }

    async fn page(&self, tenant: Option<&str>, query: &ListQuery) -> Result<Vec<Arc<JobRecord>>, HistoryError> {
        let wanted = query.limit + 1;
        let mut page = Vec::with_capacity(wanted);
        let mut after = query.page_token.as_ref().map(|t| {
            let (created_at, id) = t.position();
            (nanos(created_at), id.to_owned())
        });
        // Without a selector every row counts: read just the page; with one, read ahead.
        let batch = if query.selector.is_some() { PAGE_BATCH } else { wanted as i64 };
        loop {
            let positions = self.page_positions(tenant, query, after.as_ref(), batch).await?;
            let exhausted = positions.len() < batch as usize;
            let records = self.records_of(positions.iter().map(|(_, id)| id.as_str())).await?;
            for (position, record) in positions.into_iter().zip(records) {
                after = Some(position);
                // A row purged between the two reads has no record: it is past retention.
                let Some(record) = record else { continue };
                if query.selector.as_ref().is_none_or(|s| s.matches(&record.spec.labels)) {
                    page.push(record);
                    if page.len() == wanted {
                        return Ok(page);
                    }
                }
            }
            if exhausted {
                return Ok(page);
            }
        }
    }

    async fn events(&self, id: &JobId) -> Result<Option<Vec<JobEvent>>, HistoryError> {
        let Some(row) = self.archived_column(id, "events").await? else { return Ok(None) };
        let json: String = row.try_get("events").map_err(unavailable)?;
        decode(id.as_str(), "events", &json).map(Some)
    }

    async fn logs(&self, id: &JobId) -> Result<Option<Vec<u8>>, HistoryError> {
        let Some(row) = self.archived_column(id, "logs").await? else { return Ok(None) };
        let bytes: Vec<u8> = row.try_get("logs").map_err(unavailable)?;
        decompress(id, &bytes).map(Some)
    }

    async fn newest_created(&self) -> Result<Option<DateTime<Utc>>, HistoryError> {
        let row = sqlx::query("SELECT MAX(created_ns) AS newest FROM job_archive")
            .fetch_one(&self.pool)
            .await
            .map_err(unavailable)?;
        let newest: Option<i64> = row.try_get("newest").map_err(unavailable)?;
        Ok(newest.map(DateTime::from_timestamp_nanos))
    }

    async fn purge(&self, finished_before: DateTime<Utc>) -> Result<u64, HistoryError> {
        let purged = sqlx::query("DELETE FROM job_archive WHERE finished_ms < $1")
            .bind(finished_before.timestamp_millis())
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        self.archived.purge(finished_before.timestamp_millis());
        // Claims of jobs that were never archived (their backend forgot them first) expire too.
        sqlx::query("DELETE FROM job_archive_claims WHERE expires_ms < $1")
            .bind(finished_before.timestamp_millis())
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(purged.rows_affected())
    }
}

impl Store {
    /// The records of `ids`, in their order: those kept decoded as they are, the rest read in
    /// few queries (a page read again reads no record from the database).
    async fn records_of<'a>(
        &self,
        ids: impl Iterator<Item = &'a str>,
    ) -> Result<Vec<Option<Arc<JobRecord>>>, HistoryError> {
        let mut records: Vec<(&str, Option<Arc<JobRecord>>)> = ids.map(|id| (id, self.archived.get(id))).collect();
        let missing: Vec<&str> = records.iter().filter(|(_, record)| record.is_none()).map(|(id, _)| *id).collect();
        let mut read = HashMap::with_capacity(missing.len());
        let select = "SELECT id, record, finished_ms FROM job_archive WHERE id IN";
        for row in self.rows_in(select, &missing).await.map_err(unavailable)? {
            let record = self.record_of(&row)?;
            read.insert(record.id.clone(), record);
        }
        for (id, record) in &mut records {
            if record.is_none() {
                *record = read.get(*id).cloned();
            }
        }
        Ok(records.into_iter().map(|(_, record)| record).collect())
    }

    /// The positions (`(created_ns, id)`) of a page's next rows, newest first, strictly after
    /// `after`.
    async fn page_positions(
        &self,
        tenant: Option<&str>,
        query: &ListQuery,
        after: Option<&(i64, String)>,
        batch: i64,
    ) -> Result<Vec<(i64, String)>, HistoryError> {
        let mut conditions = Vec::new();
        let mut next = 1;
        let mut param = || {
            next += 1;
            format!("${}", next - 1)
        };
        if tenant.is_some() {
            conditions.push(format!("tenant = {}", param()));
        }
        if query.status.is_some() {
            conditions.push(format!("phase = {}", param()));
        }
        if after.is_some() {
            // A row value: both engines seek the (created_ns, id) index to it.
            let (ns, id) = (param(), param());
            conditions.push(format!("(created_ns, id) < ({ns}, {id})"));
        }
        let filter = if conditions.is_empty() { String::new() } else { format!("WHERE {}", conditions.join(" AND ")) };
        let sql = format!(
            "SELECT id, created_ns FROM job_archive {filter} ORDER BY created_ns DESC, id DESC LIMIT {}",
            param()
        );
        let mut statement = sqlx::query(&sql);
        if let Some(tenant) = tenant {
            statement = statement.bind(tenant);
        }
        if let Some(status) = query.status {
            statement = statement.bind(status.as_str());
        }
        if let Some((ns, id)) = after {
            statement = statement.bind(*ns).bind(id.as_str());
        }
        let rows = statement.bind(batch).fetch_all(&self.pool).await.map_err(unavailable)?;
        rows.iter()
            .map(|row| Ok((row.try_get("created_ns").map_err(unavailable)?, row.try_get("id").map_err(unavailable)?)))
            .collect()
    }
}
