//! Listing: filters, newest-first order and keyset pagination.
//!
//! A page token names the last job of the previous page by `(created_at, id)`. The next page
//! starts strictly after that position, so jobs created meanwhile (which sort first) neither shift
//! nor repeat entries on later pages.

use super::{FieldError, JobError, JobPhase, JobRecord, LabelSelector};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::{DateTime, Utc};
use std::sync::Arc;

/// What to list.
#[derive(Debug, Clone)]
pub struct ListQuery {
    pub status: Option<JobPhase>,
    pub selector: Option<LabelSelector>,
    pub limit: usize,
    pub page_token: Option<PageToken>,
}

impl ListQuery {
    pub const DEFAULT_LIMIT: usize = 50;
    pub const MAX_LIMIT: usize = 500;

    /// Build a query from raw parameters, checking each.
    pub fn parse(
        status: Option<JobPhase>,
        label: Option<&str>,
        limit: Option<u32>,
        page_token: Option<&str>,
    ) -> Result<Self, JobError> {
        let mut errors = Vec::new();
        let selector = match label.map(LabelSelector::parse).transpose() {
            Ok(selector) => selector,
            Err(e) => {
                errors.push(e);
                None
            }
        };
        let limit = limit.map_or(Self::DEFAULT_LIMIT, |l| l as usize);
        if !(1..=Self::MAX_LIMIT).contains(&limit) {
            errors.push(FieldError::new("limit", format!("must be between 1 and {}", Self::MAX_LIMIT)));
        }
        if !errors.is_empty() {
            return Err(JobError::Invalid(errors));
        }
        let page_token = page_token.map(PageToken::decode).transpose()?;
        Ok(Self { status, selector, limit, page_token })
    }
}

/// One page of a listing.
#[derive(Debug, Clone)]
pub struct JobPage {
    pub items: Vec<Arc<JobRecord>>,
    pub next_page_token: Option<String>,
}

/// The position after which the next page starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageToken {
    created_at: DateTime<Utc>,
    id: String,
}

impl PageToken {
    fn of(record: &JobRecord) -> Self {
        Self { created_at: record.created_at, id: record.id.to_string() }
    }

    pub fn encode(&self) -> String {
        let nanos = self.created_at.timestamp_nanos_opt().unwrap_or(i64::MAX);
        URL_SAFE_NO_PAD.encode(format!("v1:{nanos}:{}", self.id))
    }

    pub fn decode(token: &str) -> Result<Self, JobError> {
        let invalid = || JobError::InvalidPageToken("it is not a token this server issued".into());
        let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| invalid())?;
        let text = String::from_utf8(bytes).map_err(|_| invalid())?;
        let mut parts = text.splitn(3, ':');
        let (Some("v1"), Some(nanos), Some(id)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(invalid());
        };
        let nanos: i64 = nanos.parse().map_err(|_| invalid())?;
        super::JobId::parse(id).map_err(|_| invalid())?;
        Ok(Self { created_at: DateTime::from_timestamp_nanos(nanos), id: id.to_owned() })
    }

    fn sort_key(&self) -> (DateTime<Utc>, &str) {
        (self.created_at, &self.id)
    }

    /// The `(created_at, id)` of the last job of the previous page (the history seeks to it).
    pub fn position(&self) -> (DateTime<Utc>, &str) {
        self.sort_key()
    }
}

fn sort_key(record: &JobRecord) -> (DateTime<Utc>, &str) {
    (record.created_at, record.id.as_str())
}

/// The jobs of `records` a page of `query` may show: up to `query.limit + 1` (one more tells
/// whether another page follows), newest first.
pub fn candidates(mut records: Vec<Arc<JobRecord>>, query: &ListQuery) -> Vec<Arc<JobRecord>> {
    records.retain(|r| {
        query.status.is_none_or(|s| r.status.phase == s)
            && query.selector.as_ref().is_none_or(|sel| sel.matches(&r.spec.labels))
            && query.page_token.as_ref().is_none_or(|t| sort_key(r) < t.sort_key())
    });
    let wanted = query.limit + 1;
    if records.len() > wanted {
        // Only the page needs ordering: move its records to the front, then sort just those.
        records.select_nth_unstable_by(wanted, newest_first);
        records.truncate(wanted);
    }
    records.sort_unstable_by(newest_first);
    records
}

/// Merge two candidate lists (each newest first) into one, a job in both counted once (the copy
/// in `preferred` wins), keeping up to `limit + 1`.
pub fn merge(preferred: Vec<Arc<JobRecord>>, other: Vec<Arc<JobRecord>>, limit: usize) -> Vec<Arc<JobRecord>> {
    let mut merged: Vec<Arc<JobRecord>> = Vec::with_capacity(limit + 1);
    let (mut a, mut b) = (preferred.into_iter().peekable(), other.into_iter().peekable());
    while merged.len() <= limit {
        let next = match (a.peek(), b.peek()) {
            (Some(x), Some(y)) => match newest_first(x, y) {
                std::cmp::Ordering::Greater => b.next(),
                std::cmp::Ordering::Equal => {
                    b.next(); // the same job (same id and creation time): keep the preferred copy
                    a.next()
                }
                std::cmp::Ordering::Less => a.next(),
            },
            (Some(_), None) => a.next(),
            (None, Some(_)) => b.next(),
            (None, None) => break,
        };
        merged.extend(next);
    }
    merged
}

/// A page of at most `limit` out of `candidates` (newest first, up to `limit + 1`).
pub fn cut(mut candidates: Vec<Arc<JobRecord>>, limit: usize) -> JobPage {
    let more = candidates.len() > limit;
    candidates.truncate(limit);
    let next_page_token = if more { candidates.last().map(|r| PageToken::of(r).encode()) } else { None };
    JobPage { items: candidates, next_page_token }
}

fn newest_first(a: &Arc<JobRecord>, b: &Arc<JobRecord>) -> std::cmp::Ordering {
    sort_key(b).cmp(&sort_key(a))
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// Filter, order newest first and cut one page out of `records`.
    fn paginate(records: Vec<Arc<JobRecord>>, query: &ListQuery) -> JobPage {
        cut(candidates(records, query), query.limit)
    }
    use crate::jobs::{JobId, JobLimits, JobRequest, JobState};
    use chrono::TimeZone;

    /// A job of `tenant` created `second`s after a fixed instant, in `phase`, with `labels`.
    pub(in crate::jobs) fn record_in(
        second: i64,
        tenant: &str,
        phase: JobPhase,
        labels: &[(&str, &str)],
    ) -> Arc<JobRecord> {
        let spec = JobRequest {
            goal: "g".into(),
            max_turns: 1,
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ..Default::default()
        }
        .validate(&JobLimits::default())
        .unwrap();
        Arc::new(JobRecord {
            id: JobId::random(),
            tenant: tenant.into(),
            spec,
            status: JobState::new(phase),
            created_at: Utc.timestamp_opt(1_700_000_000 + second, 0).unwrap(),
            started_at: None,
            finished_at: None,
            attempts: 0,
            result: None,
            request_hash: String::new(),
            trace: None,
            queue: None,
            json: Default::default(),
        })
    }

    fn record(second: i64, phase: JobPhase, team: &str) -> Arc<JobRecord> {
        record_in(second, "default", phase, &[("team", team)])
    }

    #[test]
    fn pages_walk_every_job_once_newest_first_despite_inserts() {
        // 25 jobs created at distinct seconds, listed in a shuffled order (7 is prime to 25).
        let seconds: Vec<i64> = (0..25).map(|i| (i * 7) % 25).collect();
        let mut all: Vec<Arc<JobRecord>> = seconds.iter().map(|&s| record(s, JobPhase::Pending, "a")).collect();
        let id_at = |second: i64| all[seconds.iter().position(|&s| s == second).unwrap()].id.clone();
        let expected: Vec<JobId> = (0..25).rev().map(id_at).collect();
        let mut seen = Vec::new();
        let mut token = None;
        loop {
            let query = ListQuery::parse(None, None, Some(10), token.as_deref()).unwrap();
            let page = paginate(all.clone(), &query);
            seen.extend(page.items.iter().map(|r| r.id.clone()));
            // A newer job arrives between pages; it must not disturb the walk.
            all.push(record(1000 + seen.len() as i64, JobPhase::Pending, "a"));
            match page.next_page_token {
                Some(t) => token = Some(t),
                None => break,
            }
        }
        assert_eq!(seen, expected, "newest first: seconds 24, 23, ..., 0");
    }

    #[test]
    fn filters_by_status_and_label() {
        let all = vec![
            record(1, JobPhase::Running, "a"),
            record(2, JobPhase::Succeeded, "a"),
            record(3, JobPhase::Running, "b"),
        ];
        let query = ListQuery::parse(Some(JobPhase::Running), Some("team=a"), None, None).unwrap();
        let page = paginate(all.clone(), &query);
        assert_eq!(page.items, vec![all[0].clone()]);
        assert!(page.next_page_token.is_none());
    }

    #[test]
    fn limits_and_tokens_are_checked() {
        assert!(ListQuery::parse(None, None, Some(0), None).is_err());
        assert!(ListQuery::parse(None, None, Some(501), None).is_err());
        assert_eq!(ListQuery::parse(None, None, Some(500), None).unwrap().limit, 500);
        assert_eq!(ListQuery::parse(None, None, None, None).unwrap().limit, 50);
        for bad in ["", "%%%", "djE6MTox", "bm9wZQ"] {
            assert!(
                matches!(ListQuery::parse(None, None, None, Some(bad)), Err(JobError::InvalidPageToken(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_merge_keeps_the_order_counts_a_shared_job_once_and_prefers_the_first_copy() {
        let (newest, shared, oldest) = (
            record(30, JobPhase::Running, "a"),
            record(20, JobPhase::Running, "a"),
            record(10, JobPhase::Running, "a"),
        );
        let mut archived_copy = JobRecord::clone(&shared);
        archived_copy.status = JobState::new(JobPhase::Succeeded);
        let archived = vec![Arc::new(archived_copy), oldest.clone()];
        let merged = merge(vec![newest.clone(), shared.clone()], archived.clone(), 5);
        assert_eq!(merged, vec![newest.clone(), shared.clone(), oldest.clone()]);
        assert_eq!(merged[1].status.phase, JobPhase::Running, "the first list's copy");
        // limit + 1 at most: one more than a page says a next page exists.
        assert_eq!(merge(vec![newest.clone(), shared.clone()], archived, 1), vec![newest, shared]);
    }
}
