//! The list order kept as jobs change, so a page costs O(page) whatever the number of jobs.
//!
//! Every job sits in one ordered map (newest first, by `(created_at, id)`, the list's order and
//! cursor) and in the postings of its tenant, its phase and each of its labels. A page walks the
//! smallest posting its query names from the cursor on, checking the rest of the query on each
//! job: no scan of every job, no sort.

use super::{JobPhase, JobRecord, ListQuery};
use chrono::{DateTime, Utc};
use std::{
    cmp::Ordering,
    collections::{BTreeMap, HashMap},
    ops::Bound,
    sync::Arc,
};

/// A job's place in the list: newest first, then by id, descending (the page token's order).
/// Two integers, so the index's maps copy no strings: a job id (`job-` and 20 characters of
/// `a-z2-7`) as a number that orders as its text does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Position {
    created_ns: i64,
    id: u128,
}

impl Position {
    fn of(record: &JobRecord) -> Self {
        let id = id_number(record.id.as_str()).expect("a JobId is a job id");
        Self { created_ns: nanos(record.created_at), id }
    }
}

/// The list's time order, as the page token writes it.
fn nanos(at: DateTime<Utc>) -> i64 {
    at.timestamp_nanos_opt().unwrap_or(i64::MAX)
}

/// A job id's 20 characters after `job-` as a base-32 number whose digits are ranked in ASCII
/// order (`2`-`7` before `a`-`z`), so numbers compare as the ids do. `None` for what is no job id.
fn id_number(id: &str) -> Option<u128> {
    let digits = id.strip_prefix("job-").filter(|d| d.len() == 20)?;
    digits.bytes().try_fold(0, |n, b| {
        let digit = match b {
            b'2'..=b'7' => b - b'2',
            b'a'..=b'z' => b - b'a' + 6,
            _ => return None,
        };
        Some((n << 5) | u128::from(digit))
    })
}

impl Ord for Position {
    fn cmp(&self, other: &Self) -> Ordering {
        (other.created_ns, other.id).cmp(&(self.created_ns, self.id))
    }
}

impl PartialOrd for Position {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Jobs in list order, under one key of an index.
type Posting = BTreeMap<Position, Arc<JobRecord>>;

/// The jobs a backend holds, in list order and by tenant, phase and label.
#[derive(Debug, Default)]
pub struct JobIndex {
    all: Posting,
    /// By [`id_number`].
    positions: HashMap<u128, Position>,
    tenants: HashMap<String, Posting>,
    phases: HashMap<JobPhase, Posting>,
    labels: HashMap<(String, String), Posting>,
}

impl JobIndex {
    /// An index of `records` (a later record of the same id replaces an earlier one).
    pub fn of(records: impl IntoIterator<Item = Arc<JobRecord>>) -> Self {
        let mut index = Self::default();
        for record in records {
            index.put(record);
        }
        index
    }

    pub fn len(&self) -> usize {
        self.all.len()
    }

    pub fn is_empty(&self) -> bool {
        self.all.is_empty()
    }

    pub fn get(&self, id: &str) -> Option<&Arc<JobRecord>> {
        self.positions.get(&id_number(id)?).and_then(|position| self.all.get(position))
    }

    /// Every job, newest first.
    pub fn records(&self) -> impl Iterator<Item = &Arc<JobRecord>> {
        self.all.values()
    }

    /// Add a job, or replace its record.
    pub fn put(&mut self, record: Arc<JobRecord>) {
        self.remove(record.id.as_str());
        let position = Position::of(&record);
        let Self { tenants, phases, labels, .. } = self;
        insert_into(tenants, &record.tenant, &position, &record);
        insert_into(phases, &record.status.phase, &position, &record);
        for (key, value) in &record.spec.labels {
            insert_into(labels, &(key.clone(), value.clone()), &position, &record);
        }
        self.positions.insert(position.id, position);
        self.all.insert(position, record);
    }

    /// Forget a job; returns its record.
    pub fn remove(&mut self, id: &str) -> Option<Arc<JobRecord>> {
        let position = self.positions.remove(&id_number(id)?)?;
        let record = self.all.remove(&position)?;
        let Self { tenants, phases, labels, .. } = self;
        remove_from(tenants, &record.tenant, &position);
        remove_from(phases, &record.status.phase, &position);
        for (key, value) in &record.spec.labels {
            remove_from(labels, &(key.clone(), value.clone()), &position);
        }
        Some(record)
    }

    /// Up to `query.limit + 1` jobs after the query's page token, newest first, that match its
    /// status and selector, of `tenant` (or of every tenant).
    pub fn page(&self, tenant: Option<&str>, query: &ListQuery) -> Vec<Arc<JobRecord>> {
        let mut postings = vec![&self.all];
        let named =
            tenant.map(|t| self.tenants.get(t)).into_iter().chain(query.status.map(|p| self.phases.get(&p))).chain(
                query
                    .selector
                    .iter()
                    .flat_map(|s| s.required_pairs())
                    .map(|(k, v)| self.labels.get(&(k.to_owned(), v.to_owned()))),
            );
        for posting in named {
            match posting {
                Some(posting) => postings.push(posting),
                None => return Vec::new(), // no job has that tenant, phase or label
            }
        }
        let walk = postings.into_iter().min_by_key(|p| p.len()).expect("all is always there");
        let start = match &query.page_token {
            Some(token) => {
                let (created_at, id) = token.position();
                match id_number(id) {
                    Some(id) => Bound::Excluded(Position { created_ns: nanos(created_at), id }),
                    None => return Vec::new(),
                }
            }
            None => Bound::Unbounded,
        };
        walk.range((start, Bound::Unbounded))
            .map(|(_, record)| record)
            .filter(|r| {
                tenant.is_none_or(|t| r.tenant == t)
                    && query.status.is_none_or(|s| r.status.phase == s)
                    && query.selector.as_ref().is_none_or(|s| s.matches(&r.spec.labels))
            })
            .take(query.limit + 1)
            .cloned()
            .collect()
    }
}

fn insert_into<K: std::hash::Hash + Eq + Clone>(
    postings: &mut HashMap<K, Posting>,
    key: &K,
    position: &Position,
    record: &Arc<JobRecord>,
) {
    if let Some(posting) = postings.get_mut(key) {
        posting.insert(*position, record.clone());
    } else {
        postings.insert(key.clone(), Posting::from([(*position, record.clone())]));
    }
}

fn remove_from<K: std::hash::Hash + Eq>(postings: &mut HashMap<K, Posting>, key: &K, position: &Position) {
    if let Some(posting) = postings.get_mut(key) {
        posting.remove(position);
        if posting.is_empty() {
            postings.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::{JobId, JobState, page, page::tests::record_in as record};
    use rand::{Rng, SeedableRng, rngs::StdRng, seq::IndexedRandom};

    fn query(status: Option<JobPhase>, label: Option<&str>, limit: u32, token: Option<&str>) -> ListQuery {
        ListQuery::parse(status, label, Some(limit), token).unwrap()
    }

    fn ids(records: &[Arc<JobRecord>]) -> Vec<JobId> {
        records.iter().map(|r| r.id.clone()).collect()
    }

    #[test]
    fn pages_are_newest_first_ties_by_id_and_follow_changes() {
        let (a, b, c) = (
            record(3, "t", JobPhase::Running, &[("team", "x")]),
            record(1, "t", JobPhase::Pending, &[]),
            record(3, "u", JobPhase::Running, &[("team", "y")]),
        );
        let mut index = JobIndex::of([a.clone(), b.clone(), c.clone()]);
        // a and c were created in the same second: the larger id comes first.
        let (first, second) = if a.id > c.id { (&a, &c) } else { (&c, &a) };
        assert_eq!(
            ids(&index.page(None, &query(None, None, 10, None))),
            ids(&[first.clone(), second.clone(), b.clone()])
        );
        assert_eq!(ids(&index.page(Some("t"), &query(None, None, 10, None))), ids(&[a.clone(), b.clone()]));
        assert_eq!(ids(&index.page(None, &query(None, Some("team=y"), 10, None))), ids(std::slice::from_ref(&c)));
        assert!(index.page(Some("nobody"), &query(None, None, 10, None)).is_empty());
        // a finishes: it leaves Running's posting and joins Succeeded's.
        let mut done = JobRecord::clone(&a);
        done.status = JobState::new(JobPhase::Succeeded);
        index.put(Arc::new(done));
        assert_eq!(
            ids(&index.page(None, &query(Some(JobPhase::Running), None, 10, None))),
            ids(std::slice::from_ref(&c))
        );
        assert_eq!(
            ids(&index.page(None, &query(Some(JobPhase::Succeeded), None, 10, None))),
            ids(std::slice::from_ref(&a))
        );
        assert_eq!(index.get(a.id.as_str()).unwrap().status.phase, JobPhase::Succeeded);
        assert_eq!(index.remove(b.id.as_str()).map(|r| r.id.clone()), Some(b.id.clone()));
        assert_eq!((index.len(), index.remove(b.id.as_str()).is_none()), (2, true));
        assert!(index.tenants.get("t").is_some_and(|p| p.len() == 1), "an emptied posting shrinks");
        assert!(index.page(None, &query(Some(JobPhase::Pending), None, 10, None)).is_empty());
        assert!(!index.phases.contains_key(&JobPhase::Pending), "an empty posting is dropped");
    }

    #[test]
    fn id_numbers_order_as_the_ids_do() {
        let mut ids: Vec<JobId> = (0..2000).map(|_| JobId::random()).collect();
        ids.push(JobId::parse(&format!("job-{}", "2".repeat(20))).unwrap());
        ids.push(JobId::parse(&format!("job-{}", "z".repeat(20))).unwrap());
        ids.push(JobId::parse(&format!("job-{}7", "a".repeat(19))).unwrap());
        ids.push(JobId::parse(&format!("job-{}a", "7".repeat(19))).unwrap());
        let mut by_text = ids.clone();
        by_text.sort();
        ids.sort_by_key(|id| id_number(id.as_str()).unwrap());
        assert_eq!(ids, by_text);
        for not_an_id in [
            "",
            "job-",
            "job-aaaa",
            "task-aaaaaaaaaaaaaaaaaaaa",
            "job-aaaaaaaaaaaaaaaaaaa1",
            "job-AAAAAAAAAAAAAAAAAAAA",
        ] {
            assert_eq!(id_number(not_an_id), None, "{not_an_id}");
        }
    }

    /// Whatever happened to the jobs, every page the index cuts equals the page of a plain sort
    /// of all of them, for every kind of query, page by page.
    #[test]
    fn every_page_equals_a_full_sort_after_random_changes() {
        let mut rng = StdRng::seed_from_u64(7);
        let tenants = ["a", "b", "c"];
        let teams = ["x", "y", "z"];
        let mut live: HashMap<JobId, Arc<JobRecord>> = HashMap::new();
        let mut index = JobIndex::default();
        for _ in 0..600 {
            let existing: Vec<JobId> = live.keys().cloned().collect();
            match rng.random_range(0..10) {
                0..6 => {
                    let phase = *JobPhase::ALL.choose(&mut rng).unwrap();
                    let team = *teams.choose(&mut rng).unwrap();
                    let labels: &[(&str, &str)] =
                        if rng.random_bool(0.5) { &[("team", team), ("env", "dev")] } else { &[("team", team)] };
                    // Few distinct seconds, so ties on creation time are common.
                    let r = record(rng.random_range(0..40), tenants.choose(&mut rng).unwrap(), phase, labels);
                    live.insert(r.id.clone(), r.clone());
                    index.put(r);
                }
                6..9 if !existing.is_empty() => {
                    let id = existing.choose(&mut rng).unwrap();
                    let mut changed = JobRecord::clone(&live[id]);
                    changed.status = JobState::new(*JobPhase::ALL.choose(&mut rng).unwrap());
                    let changed = Arc::new(changed);
                    live.insert(id.clone(), changed.clone());
                    index.put(changed);
                }
                _ if !existing.is_empty() => {
                    let id = existing.choose(&mut rng).unwrap();
                    live.remove(id);
                    index.remove(id.as_str());
                }
                _ => {}
            }
        }
        assert_eq!(index.len(), live.len());
        let selectors =
            [None, Some("team=x"), Some("team=y,env=dev"), Some("env in (dev)"), Some("!env"), Some("team!=z")];
        for tenant in [None, Some("a"), Some("c")] {
            for status in [None, Some(JobPhase::Running), Some(JobPhase::Failed)] {
                for selector in selectors {
                    let mut token: Option<String> = None;
                    let mut walked = 0;
                    loop {
                        let q = query(status, selector, 7, token.as_deref());
                        let all: Vec<_> =
                            live.values().filter(|r| tenant.is_none_or(|t| r.tenant == t)).cloned().collect();
                        let expected = page::candidates(all, &q);
                        let got = index.page(tenant, &q);
                        assert_eq!(ids(&got), ids(&expected), "{tenant:?} {status:?} {selector:?} after {walked}");
                        let cut = page::cut(got, q.limit);
                        walked += cut.items.len();
                        match cut.next_page_token {
                            Some(next) => token = Some(next),
                            None => break,
                        }
                    }
                }
            }
        }
    }
}
