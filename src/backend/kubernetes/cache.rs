//! The watch cache of the Kubernetes backend.
//!
//! Jobs and Pods are read from the API server's JSON straight into [`CachedJob`] and
//! [`CachedPod`] (in `wire`), which name only the fields the status mapping reads (managed fields, the pod
//! template and everything else are skipped while parsing, never allocated). A Job is then kept
//! as its finished record plus the few [`JobFacts`] needed to recompute it when one of its pods
//! changes, so a read is a map lookup or a pass over shared records, and a cached job costs
//! about the size of its record.

use super::{
    status::{self, JobFacts},
    wire::{CachedJob, CachedPod, compact_pod_status},
};
use crate::jobs::{JobCounts, JobIndex, JobPhase, JobReason, JobRecord, JobState, ListQuery, page};
use kube::{ResourceExt, runtime::watcher::Event};
use std::{
    collections::HashMap,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

/// How long a job this replica created is known from its create's answer alone, should the
/// watch never deliver it (it normally does within milliseconds).
const CREATED_TTL: Duration = Duration::from_secs(600);

/// One cached job: its record, and what recomputing the record needs.
#[derive(Clone)]
pub struct Entry {
    pub facts: JobFacts,
    pub record: Arc<JobRecord>,
}

impl Entry {
    fn of(job: &CachedJob, pods: &[Arc<CachedPod>]) -> Option<Self> {
        let pods: Vec<&CachedPod> = pods.iter().map(Arc::as_ref).collect();
        let facts = JobFacts::of(job);
        let record = Arc::new(status::job_record_with(job, &facts, &pods)?);
        Some(Self { facts, record })
    }

    fn refresh(&mut self, pods: &[Arc<CachedPod>]) {
        let pods: Vec<&CachedPod> = pods.iter().map(Arc::as_ref).collect();
        let mut record = JobRecord::clone(&self.record);
        status::apply_pods(&mut record, &self.facts, &pods);
        self.record = Arc::new(record);
    }
}

/// A job this replica created (or read from the API server) that the watch has not delivered yet.
struct Created {
    record: Arc<JobRecord>,
    at: Instant,
}

#[derive(Default)]
struct State {
    /// By job id (the Job's name).
    jobs: HashMap<String, Entry>,
    /// The records of `jobs` in list order (kept in step with `jobs`).
    index: JobIndex,
    /// By job id, then in no order; pods may arrive before their Job.
    pods: HashMap<String, Vec<Arc<CachedPod>>>,
    /// By job id: jobs known from the API server's answers but not (yet) from the watch. A job
    /// counts (for the concurrency rule) and reads from the moment its create returns.
    created: HashMap<String, Created>,
}

impl State {
    fn pods_of(&self, id: &str) -> &[Arc<CachedPod>] {
        self.pods.get(id).map(Vec::as_slice).unwrap_or_default()
    }

    /// Recompute every record from its pods, and the index from the records.
    fn refresh_all(&mut self) {
        let Self { jobs, pods, .. } = self;
        for (id, entry) in jobs.iter_mut() {
            entry.refresh(pods.get(id).map(Vec::as_slice).unwrap_or_default());
        }
        self.index = JobIndex::of(self.jobs.values().map(|e| e.record.clone()));
    }

    fn insert(&mut self, id: String, entry: Entry) {
        self.index.put(entry.record.clone());
        self.jobs.insert(id, entry);
    }

    fn remove(&mut self, id: &str) -> Option<Entry> {
        self.index.remove(id);
        self.jobs.remove(id)
    }
}

/// The jobs and pods the watches have seen. A re-list builds fresh maps that replace the old ones
/// when it completes, so readers never see a half-listed cache.
#[derive(Default)]
pub struct JobCache {
    state: RwLock<State>,
    /// The Jobs of a re-list in progress, and when it started.
    listing_jobs: Mutex<Option<(HashMap<String, Entry>, Instant)>>,
    listing_pods: Mutex<Option<HashMap<String, Vec<Arc<CachedPod>>>>>,
    /// Jobs that left the cluster, as last seen, until the archiver takes them.
    departed: Mutex<Vec<Arc<JobRecord>>>,
    /// The newest creation time among them, ever (not drained).
    newest_departed: Mutex<Option<chrono::DateTime<chrono::Utc>>>,
    /// Jobs that just left, still read (and listed) from here for [`RECENTLY_DEPARTED_TTL`], so a
    /// job is never missing between its Job's deletion and its archiving.
    recently_departed: Mutex<HashMap<String, (Instant, Arc<JobRecord>)>>,
}

/// How long a job that left the cluster is still answered from memory (its archiving takes a
/// second or two; longer only while the database is down).
const RECENTLY_DEPARTED_TTL: Duration = Duration::from_secs(120);

/// Most departed jobs kept for the archiver (it takes them every second).
const MAX_DEPARTED: usize = 10_000;

/// A job as it is remembered once its Job is gone: a job that had not finished failed with reason
/// `Deleted` at the moment it was seen to go.
fn as_departed(record: &Arc<JobRecord>) -> Arc<JobRecord> {
    if record.status.phase.is_terminal() {
        return record.clone();
    }
    let mut gone = JobRecord::clone(record);
    gone.status = JobState::with_reason(
        JobPhase::Failed,
        JobReason::Deleted,
        "the Kubernetes Job was deleted before it finished",
    );
    gone.finished_at = Some(chrono::Utc::now());
    Arc::new(gone)
}

impl JobCache {
    /// Apply one event of the Job watch; returns the entry an applied Job now has.
    pub fn apply_job_event(&self, event: Event<CachedJob>) -> Option<(String, Entry)> {
        match event {
            Event::Init => *self.listing_jobs.lock().unwrap() = Some((HashMap::new(), Instant::now())),
            Event::InitApply(job) => {
                let id = job.name_any();
                let entry = Entry::of(&job, self.state.read().unwrap().pods_of(&id))?;
                if let Some((listing, _)) = self.listing_jobs.lock().unwrap().as_mut() {
                    listing.insert(id.clone(), entry.clone());
                }
                return Some((id, entry));
            }
            Event::InitDone => {
                if let Some((listing, started)) = self.listing_jobs.lock().unwrap().take() {
                    let mut state = self.state.write().unwrap();
                    let gone = state.jobs.iter().filter(|(id, _)| !listing.contains_key(*id)).map(|(_, e)| &e.record);
                    self.depart(gone);
                    state.jobs = listing;
                    // A job created before the list started is in it, unless it is gone.
                    let State { jobs, created, .. } = &mut *state;
                    created.retain(|id, c| !jobs.contains_key(id) && c.at > started);
                    // Pods that changed while the list ran.
                    state.refresh_all();
                }
            }
            Event::Apply(job) => {
                let id = job.name_any();
                let mut state = self.state.write().unwrap();
                state.created.remove(&id);
                let Some(entry) = Entry::of(&job, state.pods_of(&id)) else {
                    state.remove(&id);
                    return None;
                };
                state.insert(id.clone(), entry.clone());
                return Some((id, entry));
            }
            Event::Delete(job) => {
                let mut state = self.state.write().unwrap();
                let gone = state.remove(&job.name_any());
                self.depart(gone.iter().map(|e| &e.record));
                state.created.remove(&job.name_any());
            }
        }
        None
    }

    fn depart<'a>(&self, records: impl Iterator<Item = &'a Arc<JobRecord>>) {
        let mut departed = self.departed.lock().unwrap();
        let mut newest = self.newest_departed.lock().unwrap();
        let mut recent = self.recently_departed.lock().unwrap();
        recent.retain(|_, (at, _)| at.elapsed() < RECENTLY_DEPARTED_TTL);
        for record in records {
            *newest = (*newest).max(Some(record.created_at));
            let gone = as_departed(record);
            if recent.len() < MAX_DEPARTED {
                recent.insert(gone.id.to_string(), (Instant::now(), gone.clone()));
            }
            if departed.len() < MAX_DEPARTED {
                departed.push(gone);
            }
        }
    }

    /// Whether the tenant of job `id` fails it if Kueue preempts it, and it is not failed yet.
    pub fn fails_on_preemption(&self, id: &str) -> bool {
        let state = self.state.read().unwrap();
        state.jobs.get(id).is_some_and(|e| e.facts.fails_on_preemption && e.facts.preempted_at.is_none())
    }

    /// Whether any job waits in a Kueue queue.
    pub fn any_queued(&self) -> bool {
        self.state.read().unwrap().jobs.values().any(|e| e.record.queue.is_some())
    }

    /// The creation time of the newest job that ever left the cluster while watched.
    pub fn newest_departed(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        *self.newest_departed.lock().unwrap()
    }

    /// The jobs that left the cluster since the last call.
    pub fn take_departed(&self) -> Vec<Arc<JobRecord>> {
        std::mem::take(&mut *self.departed.lock().unwrap())
    }

    /// Know a job this replica just created (its record from the create's answer) until the
    /// watch delivers it, so it is read and counted at once.
    pub fn note_created(&self, id: &str, record: Arc<JobRecord>) {
        let mut state = self.state.write().unwrap();
        state.created.retain(|_, c| c.at.elapsed() < CREATED_TTL);
        if !state.jobs.contains_key(id) {
            state.created.insert(id.to_owned(), Created { record, at: Instant::now() });
        }
    }

    /// A newer record of a job known only from the API server's answers (e.g. read by a cancel).
    pub fn note_read(&self, id: &str, record: Arc<JobRecord>) {
        if let Some(created) = self.state.write().unwrap().created.get_mut(id) {
            created.record = record;
        }
    }

    /// The Job as this replica's cancel patched it, before the watch brings that change: from
    /// the moment the cancel answers, this replica (its gateway included) sees the job cancelled.
    /// A job the watch already shows finished keeps what the watch shows.
    pub fn note_cancelled(&self, job: &CachedJob) {
        let id = job.name_any();
        let mut state = self.state.write().unwrap();
        if state.jobs.get(&id).is_none_or(|entry| entry.record.status.phase.is_terminal()) {
            return;
        }
        if let Some(entry) = Entry::of(job, state.pods_of(&id)) {
            state.insert(id, entry);
        }
    }

    /// Apply one event of the Pod watch, recomputing the record of the pod's job.
    pub fn apply_pod_event(&self, event: Event<CachedPod>) {
        match event {
            Event::Init => *self.listing_pods.lock().unwrap() = Some(HashMap::new()),
            Event::InitApply(mut pod) => {
                compact_pod_status(&mut pod);
                if let (Some(id), Some(listing)) = (pod.job_id().cloned(), self.listing_pods.lock().unwrap().as_mut()) {
                    listing.entry(id).or_default().push(Arc::new(pod));
                }
            }
            Event::InitDone => {
                if let Some(listing) = self.listing_pods.lock().unwrap().take() {
                    let mut state = self.state.write().unwrap();
                    state.pods = listing;
                    state.refresh_all();
                }
            }
            Event::Apply(mut pod) => {
                compact_pod_status(&mut pod);
                let Some(id) = pod.job_id().cloned() else { return };
                let name = pod.name_any();
                let mut state = self.state.write().unwrap();
                let pods = state.pods.entry(id.clone()).or_default();
                pods.retain(|p| p.name_any() != name);
                pods.push(Arc::new(pod));
                Self::refresh(&mut state, &id);
            }
            Event::Delete(pod) => {
                let Some(id) = pod.job_id().cloned() else { return };
                let name = pod.name_any();
                let mut state = self.state.write().unwrap();
                if let Some(pods) = state.pods.get_mut(&id) {
                    pods.retain(|p| p.name_any() != name);
                    if pods.is_empty() {
                        state.pods.remove(&id);
                    }
                }
                Self::refresh(&mut state, &id);
            }
        }
    }

    fn refresh(state: &mut State, id: &str) {
        let State { jobs, pods, index, .. } = state;
        if let Some(entry) = jobs.get_mut(id) {
            entry.refresh(pods.get(id).map(Vec::as_slice).unwrap_or_default());
            index.put(entry.record.clone());
        }
    }

    pub fn get(&self, id: &str) -> Option<Arc<JobRecord>> {
        let state = self.state.read().unwrap();
        match state.jobs.get(id) {
            Some(entry) => Some(entry.record.clone()),
            None => state.created.get(id).filter(|c| c.at.elapsed() < CREATED_TTL).map(|c| c.record.clone()),
        }
    }

    /// A job that left the cluster less than [`RECENTLY_DEPARTED_TTL`] ago, as last seen.
    pub fn recently_departed(&self, id: &str) -> Option<Arc<JobRecord>> {
        let recent = self.recently_departed.lock().unwrap();
        recent.get(id).filter(|(at, _)| at.elapsed() < RECENTLY_DEPARTED_TTL).map(|(_, record)| record.clone())
    }

    pub fn records(&self) -> Vec<Arc<JobRecord>> {
        let state = self.state.read().unwrap();
        let mut records: Vec<_> = state.index.records().cloned().collect();
        records.extend(self.unwatched(&state));
        records
    }

    /// Up to `query.limit + 1` jobs of `tenant` (or of all) after the query's page token, newest
    /// first, that match it: the watched jobs from the index, merged with the few known otherwise.
    pub fn page(&self, tenant: Option<&str>, query: &ListQuery) -> Vec<Arc<JobRecord>> {
        let state = self.state.read().unwrap();
        let watched = state.index.page(tenant, query);
        let mut unwatched = self.unwatched(&state);
        if let Some(tenant) = tenant {
            unwatched.retain(|r| r.tenant == tenant);
        }
        if unwatched.is_empty() {
            return watched;
        }
        page::merge(watched, page::candidates(unwatched, query), query.limit)
    }

    /// Jobs known but not (or no longer) watched: created by this replica and not delivered yet,
    /// or departed moments ago.
    fn unwatched(&self, state: &State) -> Vec<Arc<JobRecord>> {
        let created =
            state.created.iter().filter(|(id, c)| !state.jobs.contains_key(*id) && c.at.elapsed() < CREATED_TTL);
        let recent = self.recently_departed.lock().unwrap();
        let departed = recent
            .iter()
            .filter(|(id, (at, _))| !state.jobs.contains_key(*id) && at.elapsed() < RECENTLY_DEPARTED_TTL)
            .map(|(_, (_, record))| record.clone());
        created.map(|(_, c)| c.record.clone()).chain(departed).collect()
    }

    pub fn pods(&self, id: &str) -> Vec<Arc<CachedPod>> {
        self.state.read().unwrap().pods_of(id).to_vec()
    }

    /// How many of a tenant's jobs have not finished (judged from the Jobs alone), counting the
    /// ones this replica created that the watch has not delivered yet.
    pub fn active_jobs(&self, tenant: &str) -> usize {
        let state = self.state.read().unwrap();
        let watched = state.jobs.values().filter(|e| e.record.tenant == tenant && !e.facts.is_finished()).count();
        let created = state
            .created
            .iter()
            .filter(|(id, c)| {
                c.record.tenant == tenant
                    && !c.record.status.phase.is_terminal()
                    && c.at.elapsed() < CREATED_TTL
                    && !state.jobs.contains_key(*id)
            })
            .count();
        watched + created
    }

    /// How many of a tenant's Jobs are in the namespace, finished or not (a finished Job stays
    /// until its `ttlSecondsAfterFinished` removes it, and the watch then delivers the delete),
    /// counting the ones this replica created that the watch has not delivered yet.
    pub fn kept_jobs(&self, tenant: &str) -> usize {
        let state = self.state.read().unwrap();
        let watched = state.jobs.values().filter(|e| e.record.tenant == tenant).count();
        let created = state
            .created
            .iter()
            .filter(|(id, c)| {
                c.record.tenant == tenant && c.at.elapsed() < CREATED_TTL && !state.jobs.contains_key(*id)
            })
            .count();
        watched + created
    }

    pub fn counts(&self, now: chrono::DateTime<chrono::Utc>) -> JobCounts {
        let a_minute_ago = now - chrono::Duration::minutes(1);
        let state = self.state.read().unwrap();
        let mut counts = JobCounts::default();
        for (id, entry) in &state.jobs {
            let record = &entry.record;
            counts.add(record.status.phase);
            if !record.status.phase.is_terminal() && state.pods_of(id).is_empty() && record.created_at < a_minute_ago {
                counts.without_pod += 1;
            }
        }
        counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        backend::kubernetes::render::{AgentTemplate, JOB_ID_LABEL, render_job},
        config::Config,
        jobs::{JobId, JobLimits, JobPhase, JobRequest, NewJob},
    };
    use serde_json::json;

    fn job(id: &str, tenant: &str) -> CachedJob {
        let spec = JobRequest { goal: "do it".into(), max_turns: 3, ..Default::default() }
            .validate(&JobLimits::default())
            .unwrap();
        let new = NewJob {
            id: JobId::parse(id).unwrap(),
            tenant: tenant.into(),
            spec,
            created_at: chrono::Utc::now(),
            request_hash: "h".into(),
            trace: None,
            resources: None,
            queue: Default::default(),
        };
        CachedJob::from_job(&render_job(&new, &AgentTemplate::from_config(&Config::default(), "ns"))).unwrap()
    }

    fn pod(name: &str, job: &str, phase: &str) -> CachedPod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {JOB_ID_LABEL: job}, "creationTimestamp": "2026-11-26T10:00:00Z"},
            "status": {"phase": phase, "containerStatuses": [{
                "name": "agent", "image": "i", "imageID": "sha256:1", "ready": true, "restartCount": 0,
                "state": {"running": {"startedAt": "2026-11-26T10:00:01Z"}},
            }]},
        }))
        .unwrap()
    }

    const A: &str = "job-aaaaaaaaaaaaaaaaaaaa";
    const B: &str = "job-bbbbbbbbbbbbbbbbbbbb";

    #[test]
    fn parsing_keeps_only_what_the_mapping_reads() {
        let parsed: CachedJob = serde_json::from_value(json!({
            "metadata": {
                "name": A, "uid": "u", "resourceVersion": "7",
                "managedFields": [{"manager": "kubectl", "fieldsV1": {"f:spec": {}}}],
                "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}", "oats.dev/profile": "small"},
                "ownerReferences": [{"apiVersion": "v1", "kind": "X", "name": "x", "uid": "y"}],
            },
            "spec": {"template": {"metadata": {"labels": {"a": "b"}}, "spec": {
                "containers": [{"name": "agent", "image": "i", "env": [{"name": "OATS_GOAL", "value": "g"}]}],
                "volumes": [{"name": "v", "emptyDir": {}}],
            }}},
        }))
        .unwrap();
        assert_eq!(parsed.metadata.resource_version.as_deref(), Some("7"));
        assert!(parsed.metadata.managed_fields.is_none() && parsed.metadata.uid.is_none());
        assert!(parsed.metadata.owner_references.is_none());
        assert_eq!(parsed.metadata.annotations.unwrap().keys().collect::<Vec<_>>(), ["oats.dev/profile"]);
        let container = &parsed.spec.unwrap().template.spec.unwrap().containers[0];
        assert_eq!((container.name.as_str(), container.env[0].value.as_deref()), ("agent", Some("g")));
    }

    #[test]
    fn a_cancel_is_seen_before_the_watch_brings_it_and_never_undoes_a_finish() {
        let cache = JobCache::default();
        cache.apply_pod_event(Event::Apply(pod("a-1", A, "Running")));
        cache.apply_job_event(Event::Apply(job(A, "t1")));
        cache.note_cancelled(&cancelled_copy_of(A));
        assert_eq!(cache.get(A).unwrap().status.phase, JobPhase::Cancelled, "the patch, before its watch event");
        cache.note_cancelled(&job(A, "t1"));
        assert_eq!(cache.get(A).unwrap().status.phase, JobPhase::Cancelled, "a finished job stays finished");
        cache.note_cancelled(&cancelled_copy_of(B));
        assert!(cache.get(B).is_none(), "a Job the watch has not brought is left to it");
    }

    fn cancelled_copy_of(id: &str) -> CachedJob {
        let mut job = job(id, "t1");
        job.metadata.annotations.get_or_insert_default().insert(
            crate::backend::kubernetes::render::CANCELLED_AT_ANNOTATION.to_owned(),
            "2026-12-02T12:00:00Z".to_owned(),
        );
        job
    }

    #[test]
    fn a_pod_seen_before_its_job_counts_and_changes_update_the_record() {
        let cache = JobCache::default();
        cache.apply_pod_event(Event::Apply(pod("a-1", A, "Running")));
        let (_, entry) = cache.apply_job_event(Event::Apply(job(A, "t1"))).unwrap();
        assert_eq!(entry.record.status.phase, JobPhase::Running);
        assert_eq!(cache.get(A).unwrap().attempts, 1);

        cache.apply_pod_event(Event::Delete(pod("a-1", A, "Running")));
        assert_eq!(cache.get(A).unwrap().status.phase, JobPhase::Pending);
        assert!(cache.pods(A).is_empty());

        cache.apply_job_event(Event::Delete(job(A, "t1")));
        assert!(cache.get(A).is_none());
        let gone = cache.recently_departed(A).expect("kept as it was last seen until it is archived");
        assert_eq!((gone.status.phase, gone.status.reason), (JobPhase::Failed, Some(JobReason::Deleted)));
        assert_eq!(cache.active_jobs("t1"), 0, "a deleted Job counts no more");
        assert_eq!(cache.take_departed().len(), 1, "and the archiver is told");
    }

    #[test]
    fn a_relist_replaces_the_cache_when_it_completes() {
        let cache = JobCache::default();
        cache.apply_job_event(Event::Apply(job(A, "t1")));
        cache.apply_job_event(Event::Init);
        cache.apply_job_event(Event::InitApply(job(B, "t1")));
        // Until the list completes, readers see the old cache.
        assert!(cache.get(A).is_some() && cache.get(B).is_none());
        // A pod that arrives mid-list is reflected once the list lands.
        cache.apply_pod_event(Event::Apply(pod("b-1", B, "Running")));
        cache.apply_job_event(Event::InitDone);
        assert!(cache.get(A).is_none());
        assert_eq!(cache.recently_departed(A).unwrap().status.reason, Some(JobReason::Deleted), "A left unwatched");
        assert_eq!(cache.kept_jobs("t1"), 1, "only B is in the namespace");
        assert_eq!(cache.get(B).unwrap().status.phase, JobPhase::Running);
    }

    #[test]
    fn foreign_jobs_are_not_cached_and_counts_follow_the_cache() {
        let cache = JobCache::default();
        let mut foreign = job(A, "t1");
        foreign.metadata.labels = None;
        assert!(cache.apply_job_event(Event::Apply(foreign)).is_none());
        assert!(cache.records().is_empty());

        cache.apply_job_event(Event::Apply(job(A, "t1")));
        cache.apply_job_event(Event::Apply(job(B, "t2")));
        assert_eq!((cache.active_jobs("t1"), cache.active_jobs("t2"), cache.active_jobs("t3")), (1, 1, 0));
        let counts = cache.counts(chrono::Utc::now() + chrono::Duration::minutes(5));
        assert_eq!(counts.by_phase.iter().sum::<u64>(), 2);
        assert_eq!(counts.without_pod, 2);
        cache.apply_pod_event(Event::Apply(pod("a-1", A, "Running")));
        assert_eq!(cache.counts(chrono::Utc::now() + chrono::Duration::minutes(5)).without_pod, 1);
    }

    #[test]
    fn kept_jobs_count_finished_jobs_until_their_delete_arrives() {
        let cache = JobCache::default();
        let finished = |id: &str| {
            let mut job = job(id, "t1");
            job.status = Some(k8s_openapi::api::batch::v1::JobStatus {
                succeeded: Some(1),
                conditions: Some(vec![k8s_openapi::api::batch::v1::JobCondition {
                    type_: "Complete".into(),
                    status: "True".into(),
                    ..Default::default()
                }]),
                ..Default::default()
            });
            job
        };
        cache.apply_job_event(Event::Apply(job(A, "t1")));
        cache.apply_job_event(Event::Apply(finished(B)));
        cache.apply_job_event(Event::Apply(job("job-cccccccccccccccccccc", "t2")));
        assert_eq!((cache.active_jobs("t1"), cache.kept_jobs("t1"), cache.kept_jobs("t2")), (1, 2, 1));
        // One this replica just created counts at once.
        let d = "job-dddddddddddddddddddd";
        cache.note_created(d, Arc::new(status::job_record(&job(d, "t1"), &[]).unwrap()));
        assert_eq!(cache.kept_jobs("t1"), 3);
        cache.apply_job_event(Event::Apply(job(d, "t1")));
        assert_eq!(cache.kept_jobs("t1"), 3, "counted once, from the watch");
        // The TTL controller deletes the finished Job: it no longer counts.
        cache.apply_job_event(Event::Delete(finished(B)));
        assert_eq!((cache.active_jobs("t1"), cache.kept_jobs("t1")), (2, 2));
    }

    #[test]
    fn a_created_job_counts_until_the_watch_delivers_it_or_a_later_list_misses_it() {
        let cache = JobCache::default();
        let record = |id: &str| Arc::new(status::job_record(&job(id, "t1"), &[]).unwrap());
        cache.note_created(A, record(A));
        assert_eq!((cache.active_jobs("t1"), cache.records().len()), (1, 1));
        assert!(cache.get(A).is_some());
        // Delivered by the watch: counted once, from the watch.
        cache.apply_job_event(Event::Apply(job(A, "t1")));
        assert_eq!((cache.active_jobs("t1"), cache.records().len()), (1, 1));
        cache.apply_job_event(Event::Delete(job(A, "t1")));
        assert_eq!(cache.active_jobs("t1"), 0, "a deleted job is not counted from its create");

        // A re-list that started before the create may miss the job: it stays counted.
        cache.apply_job_event(Event::Init);
        cache.note_created(B, record(B));
        cache.apply_job_event(Event::InitDone);
        assert_eq!(cache.active_jobs("t1"), 1);
        // A re-list that started after the create and misses it: the job is gone.
        cache.apply_job_event(Event::Init);
        cache.apply_job_event(Event::InitDone);
        assert_eq!(cache.active_jobs("t1"), 0);
        assert!(cache.get(B).is_none());
    }
}
