//! Who listens to which job: a backend says when a job's record changed (and the gateway when
//! its usage did), and only the watch streams of that job wake. No stream polls on a timer.
//!
//! The watchers of one job share what a change costs: the first to wake reads the job and its
//! usage once for the new version ([`JobSubscription::latest`]), and the first to send it encodes
//! it once ([`WatchEvent::encoded`](super::WatchEvent::encoded)); the others copy a refcount. A
//! thousand watchers of one job would otherwise each read, hash and serialise the same change.

use super::{JobId, JobRecord, JobUsage};
use bytes::Bytes;
use std::{
    collections::HashMap,
    future::Future,
    sync::{Arc, Mutex, OnceLock},
};
use tokio::sync::{OnceCell, watch};

/// Past this many channels, those nobody listens to any more are dropped on the next subscribe.
const TIDY_ABOVE: usize = 1024;

/// One version counter per job that someone watches.
#[derive(Debug, Default)]
pub struct JobChanges {
    channels: Mutex<Channels>,
}

#[derive(Debug, Default)]
struct Channels {
    by_job: HashMap<JobId, Feed>,
    /// The next subscribe past this many channels tidies: twice what the last tidy kept, so that
    /// thousands of watched jobs do not make every subscribe walk them all.
    tidy_above: usize,
}

/// A watched job's version counter and the snapshot its watchers share.
#[derive(Debug)]
struct Feed {
    version: watch::Sender<u64>,
    latest: Arc<Latest>,
}

/// The job as read for a version (`None`: gone), read by the first watcher that asks.
type Latest = Mutex<Option<(u64, Arc<OnceCell<Option<Arc<JobSnapshot>>>>)>>;

/// The job's observable state at one moment, shared by the watch streams that send it.
#[derive(Debug)]
pub struct JobSnapshot {
    /// A short name for this state (the events' `id`, `Last-Event-ID` on a resume).
    pub state: String,
    pub job: Arc<JobRecord>,
    pub usage: Option<JobUsage>,
    /// For a state shared by the job's watchers, its events as the API sends them, encoded by
    /// the first stream that sends each: a change and a closing one. `None`: one stream's own.
    pub(super) encoded: Option<[OnceLock<Bytes>; 2]>,
}

impl JobSnapshot {
    /// One stream's own view of the job.
    pub fn new(state: String, job: Arc<JobRecord>, usage: Option<JobUsage>) -> Self {
        Self { state, job, usage, encoded: None }
    }
}

/// One watch stream's subscription to a job's changes.
#[derive(Debug)]
pub struct JobSubscription {
    version: watch::Receiver<u64>,
    latest: Arc<Latest>,
}

impl JobSubscription {
    /// Until the job's next change; `Err` once the backend dropped the job's channel.
    pub async fn changed(&mut self) -> Result<(), watch::error::RecvError> {
        self.version.changed().await
    }

    /// The job as of its latest change: `read` runs for the first watcher to ask after a change;
    /// the others of that version (or a newer one) wait for its answer and share it.
    pub async fn latest<F, Fut>(&mut self, read: F) -> Option<Arc<JobSnapshot>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Option<JobSnapshot>>,
    {
        let version = *self.version.borrow_and_update();
        let cell = {
            let mut latest = self.latest.lock().unwrap();
            match &*latest {
                Some((read_for, cell)) if *read_for >= version => cell.clone(),
                _ => latest.insert((version, Arc::default())).1.clone(),
            }
        };
        let shared = |mut snapshot: JobSnapshot| {
            snapshot.encoded = Some(Default::default());
            Arc::new(snapshot)
        };
        cell.get_or_init(|| async { read().await.map(shared) }).await.clone()
    }
}

impl JobChanges {
    /// A subscription that sees every change of `id` from now on.
    pub fn subscribe(&self, id: &JobId) -> JobSubscription {
        let mut channels = self.channels.lock().unwrap();
        if channels.by_job.len() > channels.tidy_above.max(TIDY_ABOVE) {
            channels.by_job.retain(|_, feed| feed.version.receiver_count() > 0);
            channels.tidy_above = channels.by_job.len() * 2;
        }
        let feed = channels
            .by_job
            .entry(id.clone())
            .or_insert_with(|| Feed { version: watch::channel(0).0, latest: Arc::default() });
        JobSubscription { version: feed.version.subscribe(), latest: feed.latest.clone() }
    }

    /// `id` changed: wake its watchers (nothing to do when there are none).
    pub fn changed(&self, id: &str) {
        if let Some(feed) = self.channels.lock().unwrap().by_job.get(id) {
            feed.version.send_modify(|version| *version += 1);
        }
    }

    /// Everything may have changed (a re-list): wake every watcher.
    pub fn changed_all(&self) {
        for feed in self.channels.lock().unwrap().by_job.values() {
            feed.version.send_modify(|version| *version += 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_the_watchers_of_a_changed_job_wake_and_none_misses_a_change() {
        let changes = JobChanges::default();
        let (a, b) = (JobId::random(), JobId::random());
        let (mut watch_a, watch_b) = (changes.subscribe(&a), changes.subscribe(&b));
        changes.changed(a.as_str());
        // The change happened before anyone awaited it: it is not lost.
        tokio::time::timeout(std::time::Duration::from_secs(1), watch_a.changed()).await.unwrap().unwrap();
        assert!(!watch_b.version.has_changed().unwrap(), "b's watcher stays asleep");
        changes.changed_all();
        assert!(watch_b.version.has_changed().unwrap());
        changes.changed(JobId::random().as_str()); // nobody watches it: a no-op
    }

    #[test]
    fn channels_nobody_listens_to_are_dropped_and_the_others_kept() {
        let changes = JobChanges::default();
        let kept: Vec<_> = (0..TIDY_ABOVE).map(|_| changes.subscribe(&JobId::random())).collect();
        for _ in 0..10 * TIDY_ABOVE {
            drop(changes.subscribe(&JobId::random()));
        }
        // Tidied whenever twice the channels kept were passed: never more than that, plus the newest.
        let count = changes.channels.lock().unwrap().by_job.len();
        assert!(count <= 2 * TIDY_ABOVE + 1, "{count} channels for {TIDY_ABOVE} listened to");
        assert!(
            kept.iter().all(|subscription| subscription.version.has_changed().is_ok()),
            "a listened-to channel was dropped"
        );
    }

    #[tokio::test]
    async fn watchers_woken_together_by_a_change_share_one_read_of_it() {
        let changes = JobChanges::default();
        let id = JobId::random();
        let mut subscriptions: Vec<_> = (0..50).map(|_| changes.subscribe(&id)).collect();
        let record = crate::jobs::page::tests::record_in(0, "t", crate::jobs::JobPhase::Pending, &[]);
        changes.changed(id.as_str());
        let reads = std::sync::atomic::AtomicUsize::new(0);
        let read = || async {
            reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            // A read takes a while (the store): the other watchers ask meanwhile.
            tokio::task::yield_now().await;
            Some(JobSnapshot::new("pending-1".into(), record.clone(), None))
        };
        let seen = futures::future::join_all(subscriptions.iter_mut().map(|s| s.latest(read))).await;
        assert_eq!(reads.load(std::sync::atomic::Ordering::Relaxed), 1);
        let first = seen[0].clone().unwrap();
        assert!(seen.iter().all(|snapshot| Arc::ptr_eq(snapshot.as_ref().unwrap(), &first)));

        // The next change is read anew.
        changes.changed(id.as_str());
        let again = subscriptions[0].latest(read).await.unwrap();
        assert!(!Arc::ptr_eq(&again, &first));
        assert_eq!(reads.load(std::sync::atomic::Ordering::Relaxed), 2);
    }
}
