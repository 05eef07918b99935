//! Files the service reloads when they change (the API tokens, the policy), by polling: Secret
//! and ConfigMap volumes are updated in place, without events a process could wait for.

use std::{
    path::Path,
    sync::{Arc, Weak},
    time::{Duration, SystemTime},
};

/// What identifies a version of a file: modification time plus length, so a rewrite within the
/// same second is still noticed.
pub fn stamp(path: &Path) -> Option<SystemTime> {
    let meta = std::fs::metadata(path).ok()?;
    Some(meta.modified().ok()? + Duration::from_nanos(meta.len()))
}

/// Call `reload` on `target` every `every`, for as long as `target` lives.
pub fn poll<T: Send + Sync + 'static>(target: &Arc<T>, every: Duration, reload: fn(&T)) {
    let target: Weak<T> = Arc::downgrade(target);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            let Some(target) = target.upgrade() else { return };
            reload(&target);
        }
    });
}
