//! Archived records kept decoded. An archived row never changes (archiving again keeps the first
//! row) until retention removes it, so a replica may keep the records it has read: the next read
//! of the job, or of a page holding it, skips decoding its JSON, and the API reuses the response
//! bytes memoized in the record. Bounded by bytes, oldest entry out first. Retention forgets
//! entries as it deletes rows; a row another replica's pass deleted is forgotten here at this
//! replica's own pass (every replica runs one, with the same cutoff).
//!
//! A cached job's usage is kept with it too, once it can no longer change (see
//! [`USAGE_FINAL_AFTER_MS`]): a page or GET of such a job then asks the ledger nothing.

use crate::jobs::{JobId, JobRecord, JobUsage};
use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
};

/// Bytes of archived records kept, counted as twice their stored JSON (the decoded record and
/// the response bytes the API memoizes in it).
pub(super) const CACHED_BYTES: usize = 8 * 1024 * 1024;

/// How long after a job finished its usage is final. The gateway refuses calls of a finished
/// job; a call admitted just before it finished settles within its provider's timeout, and one
/// its replica abandoned is settled by the sweeper an hour after its reservation. Two hours is
/// past all of these (an agent's connection ends with its pod, so a request admitted while the
/// job ran cannot take longer to arrive).
pub(super) const USAGE_FINAL_AFTER_MS: i64 = 2 * 3_600_000;

/// What a job whose usage is final spent.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum FinalUsage {
    /// It never called a model: the ledger has no row for it.
    None,
    Spent(JobUsage),
}

#[derive(Default)]
pub(super) struct ArchivedRecords {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    by_id: HashMap<JobId, Entry>,
    /// Insertion order, for eviction; may name entries already purged (skipped when reached).
    order: VecDeque<JobId>,
    bytes: usize,
}

struct Entry {
    record: Arc<JobRecord>,
    /// The row's `finished_ms`, the column retention compares.
    finished_ms: i64,
    weight: usize,
    usage: Option<FinalUsage>,
}

impl ArchivedRecords {
    pub(super) fn get(&self, id: &str) -> Option<Arc<JobRecord>> {
        self.inner.lock().unwrap().by_id.get(id).map(|entry| entry.record.clone())
    }

    /// The usage of a cached job, once it is final.
    pub(super) fn final_usage(&self, id: &str) -> Option<FinalUsage> {
        self.inner.lock().unwrap().by_id.get(id).and_then(|entry| entry.usage.clone())
    }

    /// Keep the usage of `id`, read with no call of it in flight, if `id` is cached and
    /// finished long enough before `now_ms` for that usage to be final.
    pub(super) fn keep_usage(&self, id: &str, usage: FinalUsage, now_ms: i64) {
        if let Some(entry) = self.inner.lock().unwrap().by_id.get_mut(id)
            && entry.finished_ms <= now_ms.saturating_sub(USAGE_FINAL_AFTER_MS)
        {
            entry.usage = Some(usage);
        }
    }

    /// Keep `record`, read from a row whose JSON is `json_len` bytes.
    pub(super) fn insert(&self, record: Arc<JobRecord>, finished_ms: i64, json_len: usize) {
        let weight = 2 * json_len;
        if weight > CACHED_BYTES {
            return;
        }
        let mut inner = self.inner.lock().unwrap();
        let id = record.id.clone();
        if inner.by_id.contains_key(&id) {
            return;
        }
        inner.bytes += weight;
        inner.by_id.insert(id.clone(), Entry { record, finished_ms, weight, usage: None });
        inner.order.push_back(id);
        while inner.bytes > CACHED_BYTES {
            let Some(oldest) = inner.order.pop_front() else { break };
            if let Some(entry) = inner.by_id.remove(&oldest) {
                inner.bytes -= entry.weight;
            }
        }
    }

    /// Forget what retention removes from the database: rows finished before `cutoff_ms`.
    pub(super) fn purge(&self, cutoff_ms: i64) {
        let mut inner = self.inner.lock().unwrap();
        let mut freed = 0;
        inner.by_id.retain(|_, entry| {
            let keep = entry.finished_ms >= cutoff_ms;
            if !keep {
                freed += entry.weight;
            }
            keep
        });
        inner.bytes -= freed;
        let Inner { by_id, order, .. } = &mut *inner;
        order.retain(|id| by_id.contains_key(id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Arc<JobRecord> {
        let created = chrono::Utc::now();
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "id": JobId::random().as_str(), "tenant": "t",
                "spec": {"goal": "g", "max_turns": 1, "labels": {}, "timeout_seconds": 60, "model": null},
                "status": {"phase": "succeeded", "reason": null, "message": null},
                "created_at": created, "started_at": null, "finished_at": created, "attempts": 1,
                "result": null, "request_hash": "h", "trace": null,
            }))
            .unwrap(),
        )
    }

    #[test]
    fn the_oldest_entries_leave_once_the_bytes_are_spent() {
        let cache = ArchivedRecords::default();
        let json_len = CACHED_BYTES / 8; // four entries fit
        let records: Vec<_> = (0..6).map(|_| record()).collect();
        for record in &records {
            cache.insert(record.clone(), 0, json_len);
        }
        let kept: Vec<bool> = records.iter().map(|r| cache.get(r.id.as_str()).is_some()).collect();
        assert_eq!(kept, [false, false, true, true, true, true]);
        assert!(Arc::ptr_eq(&cache.get(records[5].id.as_str()).unwrap(), &records[5]), "the same shared record");
        cache.insert(record(), 0, CACHED_BYTES); // larger than the whole cache: not kept
        assert_eq!(cache.inner.lock().unwrap().bytes, 4 * 2 * json_len);
    }

    #[test]
    fn purging_forgets_exactly_what_finished_before_the_cutoff() {
        let cache = ArchivedRecords::default();
        let (old, recent) = (record(), record());
        cache.insert(old.clone(), 1_000, 100);
        cache.insert(recent.clone(), 2_000, 100);
        cache.purge(2_000);
        assert!(cache.get(old.id.as_str()).is_none());
        assert!(cache.get(recent.id.as_str()).is_some(), "finished at the cutoff: kept, as the database keeps it");
        let inner = cache.inner.lock().unwrap();
        assert_eq!((inner.bytes, inner.order.len()), (200, 1));
    }
}
