//! Kueue, with `queueing: kueue`: each queued job's place in its LocalQueue and whether Kueue
//! preempted it. Read every [`REFRESH_EVERY`] while jobs wait — one list of the namespace's
//! Workloads and one call to Kueue's visibility API per LocalQueue with waiting jobs — and kept
//! here, so requests read memory and never call Kueue.

use crate::jobs::{JobChanges, JobPhase, JobReason, JobRecord, JobState};
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, GroupVersionKind, ListParams},
};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::{Registry, Unit},
};
use serde_json::Value;
use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, RwLock},
    time::Duration,
};

/// How often waiting jobs' places are read from Kueue.
const REFRESH_EVERY: Duration = Duration::from_secs(2);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueLabel {
    queue: String,
}

/// `oats_queue_*`: OATS's jobs in Kueue's queues. Queue names come from the configuration and the
/// policy (the labels OATS puts on its Jobs), so the label set is bounded.
#[derive(Clone)]
pub struct QueueMetrics {
    waiting: Family<QueueLabel, Gauge>,
    wait: Family<QueueLabel, Histogram, fn() -> Histogram>,
}

impl Default for QueueMetrics {
    fn default() -> Self {
        // 1 s to about 9 hours.
        Self {
            waiting: Family::default(),
            wait: Family::new_with_constructor(|| Histogram::new(exponential_buckets(1.0, 2.0, 16))),
        }
    }
}

impl QueueMetrics {
    pub fn register(&self, registry: &mut Registry) {
        let registry = registry.sub_registry_with_prefix("oats_queue");
        registry.register("jobs", "OATS jobs waiting for Kueue's admission, by LocalQueue", self.waiting.clone());
        registry.register_with_unit(
            "wait",
            "Time from a job's creation to Kueue's admission, by LocalQueue (observed by every replica)",
            Unit::Seconds,
            self.wait.clone(),
        );
    }
}

/// What Kueue says about one waiting job.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Place {
    /// 1-based place in its LocalQueue, when the visibility API listed it.
    position: Option<u32>,
    preempted: bool,
}

/// The places of waiting jobs, by job id (their Job's name).
pub struct QueueView {
    client: Client,
    namespace: String,
    places: RwLock<HashMap<String, Place>>,
    /// Jobs seen waiting and not yet admitted, so each admission's wait is observed once.
    waiting: RwLock<HashSet<String>>,
    /// Queues that had waiting jobs, so a queue that empties shows 0.
    queues_seen: RwLock<HashSet<String>>,
    metrics: QueueMetrics,
    /// Watch streams of a job whose place changed are woken.
    changes: Arc<JobChanges>,
    /// Told of every job Kueue preempted and holds again (the backend fails it when its tenant
    /// asked for that).
    on_preempted: Box<dyn Fn(&str) + Send + Sync>,
}

impl QueueView {
    pub fn new(
        client: Client,
        namespace: String,
        metrics: QueueMetrics,
        changes: Arc<JobChanges>,
        on_preempted: Box<dyn Fn(&str) + Send + Sync>,
    ) -> Arc<Self> {
        Arc::new(Self {
            client,
            namespace,
            places: RwLock::default(),
            waiting: RwLock::default(),
            queues_seen: RwLock::default(),
            metrics,
            changes,
            on_preempted,
        })
    }

    /// Refresh in the background while `any_waiting` says jobs wait, for as long as the process runs.
    pub fn spawn(self: &Arc<Self>, any_waiting: impl Fn() -> bool + Send + 'static) {
        let view = self.clone();
        tokio::spawn(async move {
            loop {
                let wanted = any_waiting() || !view.waiting.read().unwrap().is_empty();
                if wanted && let Err(error) = view.refresh().await {
                    tracing::warn!(%error, "cannot read Kueue's workloads or queue positions");
                }
                tokio::time::sleep(REFRESH_EVERY).await;
            }
        });
    }

    /// A record with what Kueue says of it: its place, and `Preempted` for a job Kueue stopped.
    pub fn place(&self, record: &Arc<JobRecord>) -> Arc<JobRecord> {
        let Some(queue) = &record.queue else { return record.clone() };
        let Some(place) = self.places.read().unwrap().get(record.id.as_str()).cloned() else { return record.clone() };
        let mut placed = JobRecord::clone(record);
        if place.preempted {
            placed.status = JobState::with_reason(
                JobPhase::Pending,
                JobReason::Preempted,
                format!("Kueue stopped the job to make room for another; it waits in queue {} again", queue.name),
            );
        }
        if let Some(queue) = &mut placed.queue {
            queue.position = place.position;
        }
        Arc::new(placed)
    }

    async fn refresh(&self) -> Result<(), kube::Error> {
        let workloads = self.workloads().await?;
        let mut places = HashMap::new();
        let mut waiting_by_queue: HashMap<String, i64> = HashMap::new();
        let mut by_workload = HashMap::new();
        let mut admitted = Vec::new();
        for workload in &workloads {
            let Some(job) = owner_job(workload) else { continue };
            let queue = workload.data["spec"]["queueName"].as_str().unwrap_or_default().to_owned();
            if condition(workload, "Admitted").is_some() {
                admitted.push((job, queue, admission_wait(workload)));
                continue;
            }
            *waiting_by_queue.entry(queue).or_default() += 1;
            by_workload.insert(workload.metadata.name.clone().unwrap_or_default(), job.clone());
            places.insert(job, Place { position: None, preempted: preempted(workload) });
        }
        for queue in waiting_by_queue.keys() {
            for (workload, position) in self.positions(queue).await? {
                if let Some(place) = by_workload.get(&workload).and_then(|job| places.get_mut(job)) {
                    place.position = Some(position);
                }
            }
        }
        for (job, _) in places.iter().filter(|(_, place)| place.preempted) {
            (self.on_preempted)(job);
        }
        self.publish(&places, &waiting_by_queue, admitted);
        Ok(())
    }

    fn publish(
        &self,
        places: &HashMap<String, Place>,
        waiting_by_queue: &HashMap<String, i64>,
        admitted: Vec<(String, String, Option<f64>)>,
    ) {
        {
            let mut waiting = self.waiting.write().unwrap();
            for (job, queue, wait) in admitted {
                if waiting.remove(&job)
                    && let Some(seconds) = wait
                {
                    self.metrics.wait.get_or_create(&QueueLabel { queue }).observe(seconds);
                }
            }
            waiting.extend(places.keys().cloned());
        }
        let mut queues = self.queues_seen.write().unwrap();
        queues.extend(waiting_by_queue.keys().cloned());
        // A queue that emptied shows 0, not its last count.
        for queue in queues.iter() {
            let count = waiting_by_queue.get(queue).copied().unwrap_or(0);
            self.metrics.waiting.get_or_create(&QueueLabel { queue: queue.clone() }).set(count);
        }
        let old = std::mem::replace(&mut *self.places.write().unwrap(), places.clone());
        let moved = places.iter().filter(|(job, place)| old.get(*job) != Some(place)).map(|(job, _)| job);
        for job in moved.chain(old.keys().filter(|job| !places.contains_key(*job))) {
            self.changes.changed(job);
        }
    }

    async fn workloads(&self) -> Result<Vec<DynamicObject>, kube::Error> {
        let kind = GroupVersionKind::gvk("kueue.x-k8s.io", "v1beta2", "Workload");
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), &self.namespace, &ApiResource::from_gvk(&kind));
        Ok(api.list(&ListParams::default()).await?.items)
    }

    /// `(workload name, 1-based position)` of the pending workloads of `queue`, from Kueue's
    /// visibility API (served through the API server).
    async fn positions(&self, queue: &str) -> Result<Vec<(String, u32)>, kube::Error> {
        let path = format!(
            "/apis/visibility.kueue.x-k8s.io/v1beta2/namespaces/{}/localqueues/{queue}/pendingworkloads",
            self.namespace
        );
        let request = http::Request::get(path).body(Vec::new()).map_err(kube::Error::HttpError)?;
        let answer: Value = self.client.request(request).await?;
        Ok(answer["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|item| {
                let name = item["metadata"]["name"].as_str()?.to_owned();
                let position = item["positionInLocalQueue"].as_u64()?;
                Some((name, u32::try_from(position + 1).ok()?))
            })
            .collect())
    }
}

/// The name of the Job a Workload stands for.
fn owner_job(workload: &DynamicObject) -> Option<String> {
    workload.metadata.owner_references.as_ref()?.iter().find(|o| o.kind == "Job").map(|o| o.name.clone())
}

/// A condition of the Workload that holds (`status: "True"`).
fn condition<'a>(workload: &'a DynamicObject, kind: &str) -> Option<&'a Value> {
    workload.data["status"]["conditions"].as_array()?.iter().find(|c| c["type"] == kind && c["status"] == "True")
}

/// Whether Kueue evicted the workload to make room for another (and it waits again).
fn preempted(workload: &DynamicObject) -> bool {
    condition(workload, "Preempted").is_some()
        || condition(workload, "Evicted").is_some_and(|c| c["reason"] == "Preempted")
}

/// Seconds from the workload's creation to its admission.
fn admission_wait(workload: &DynamicObject) -> Option<f64> {
    let admitted = condition(workload, "Admitted")?["lastTransitionTime"].as_str()?;
    let admitted = chrono::DateTime::parse_from_rfc3339(admitted).ok()?;
    let created = super::status::to_chrono(workload.metadata.creation_timestamp.as_ref()?);
    Some((admitted.with_timezone(&chrono::Utc) - created).num_milliseconds().max(0) as f64 / 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(conditions: Value) -> DynamicObject {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "kueue.x-k8s.io/v1beta2",
            "kind": "Workload",
            "metadata": {
                "name": "job-job-abc-1a2b3",
                "creationTimestamp": "2026-12-01T10:00:00Z",
                "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": "job-abc", "uid": "u"}],
            },
            "spec": {"queueName": "oats"},
            "status": {"conditions": conditions},
        }))
        .unwrap()
    }

    #[test]
    fn kueue_workloads_say_whose_they_are_and_why_they_wait() {
        let waiting = workload(serde_json::json!([
            {"type": "QuotaReserved", "status": "False", "reason": "Pending", "lastTransitionTime": "2026-12-01T10:00:00Z"},
        ]));
        assert_eq!(owner_job(&waiting).as_deref(), Some("job-abc"));
        assert!(!preempted(&waiting) && condition(&waiting, "Admitted").is_none());

        let preempted_one = workload(serde_json::json!([
            {"type": "Evicted", "status": "True", "reason": "Preempted", "lastTransitionTime": "2026-12-01T10:05:00Z"},
            {"type": "Admitted", "status": "False", "reason": "NoReservation", "lastTransitionTime": "2026-12-01T10:05:00Z"},
        ]));
        assert!(preempted(&preempted_one));

        let admitted = workload(serde_json::json!([
            {"type": "Admitted", "status": "True", "reason": "Admitted", "lastTransitionTime": "2026-12-01T10:00:42Z"},
        ]));
        assert_eq!(admission_wait(&admitted), Some(42.0));
        assert!(!preempted(&admitted));
    }
}
