//! Who listens to which job: a backend says when a job's record changed (and the gateway when
//! its usage did), and only the watch streams of that job wake. No stream polls on a timer.

use super::JobId;
use std::{collections::HashMap, sync::Mutex};
use tokio::sync::watch;

/// Past this many channels, those nobody listens to any more are dropped on the next subscribe.
const TIDY_ABOVE: usize = 1024;

/// One version counter per job that someone watches.
#[derive(Debug, Default)]
pub struct JobChanges {
    channels: Mutex<Channels>,
}

#[derive(Debug, Default)]
struct Channels {
    by_job: HashMap<JobId, watch::Sender<u64>>,
    /// The next subscribe past this many channels tidies: twice what the last tidy kept, so that
    /// thousands of watched jobs do not make every subscribe walk them all.
    tidy_above: usize,
}

impl JobChanges {
    /// A receiver that sees every change of `id` from now on (`changed().await`).
    pub fn subscribe(&self, id: &JobId) -> watch::Receiver<u64> {
        let mut channels = self.channels.lock().unwrap();
        if channels.by_job.len() > channels.tidy_above.max(TIDY_ABOVE) {
            channels.by_job.retain(|_, sender| sender.receiver_count() > 0);
            channels.tidy_above = channels.by_job.len() * 2;
        }
        channels.by_job.entry(id.clone()).or_insert_with(|| watch::channel(0).0).subscribe()
    }

    /// `id` changed: wake its watchers (nothing to do when there are none).
    pub fn changed(&self, id: &str) {
        if let Some(sender) = self.channels.lock().unwrap().by_job.get(id) {
            sender.send_modify(|version| *version += 1);
        }
    }

    /// Everything may have changed (a re-list): wake every watcher.
    pub fn changed_all(&self) {
        for sender in self.channels.lock().unwrap().by_job.values() {
            sender.send_modify(|version| *version += 1);
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
        assert!(!watch_b.has_changed().unwrap(), "b's watcher stays asleep");
        changes.changed_all();
        assert!(watch_b.has_changed().unwrap());
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
        assert!(kept.iter().all(|receiver| receiver.has_changed().is_ok()), "a listened-to channel was dropped");
    }
}
