//! The compact forms of Jobs and Pods the watch cache keeps: only the fields the status mapping
//! reads, parsed straight from the API server's JSON.

use super::render::JOB_ID_LABEL;
use k8s_openapi::{
    NamespaceResourceScope,
    api::{
        batch::v1::Job,
        core::v1::{Pod, PodStatus},
    },
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
};
use kube::{Resource, ResourceExt};
use serde::{Deserialize, Deserializer};
use std::{borrow::Cow, collections::BTreeMap};

/// A `batch/v1` Job, as much of it as OATS reads.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct CachedJob {
    #[serde(default, deserialize_with = "compact_meta")]
    pub metadata: ObjectMeta,
    pub spec: Option<CachedJobSpec>,
    pub status: Option<k8s_openapi::api::batch::v1::JobStatus>,
}

/// `spec.template.spec.containers[].env[]` of a Job (where the job's spec travels) and `spec.suspend`.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct CachedJobSpec {
    #[serde(default)]
    pub template: CachedPodTemplate,
    /// Kueue holds a queued Job suspended until it admits it.
    pub suspend: Option<bool>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct CachedPodTemplate {
    pub spec: Option<CachedPodSpec>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct CachedPodSpec {
    #[serde(default)]
    pub containers: Vec<CachedContainer>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct CachedContainer {
    pub name: String,
    #[serde(default)]
    pub env: Vec<CachedEnvVar>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct CachedEnvVar {
    pub name: String,
    pub value: Option<String>,
}

/// A Pod of an agent, as much of it as OATS reads: name, labels, creation time and status.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct CachedPod {
    #[serde(default, deserialize_with = "compact_meta")]
    pub metadata: ObjectMeta,
    pub status: Option<PodStatus>,
}

impl CachedJob {
    /// The cached form of a whole Job (tests build Jobs with the renderer and k8s-openapi types).
    #[cfg(test)]
    pub fn from_job(job: &Job) -> Option<Self> {
        serde_json::to_value(job).ok().and_then(|value| serde_json::from_value(value).ok())
    }
}

impl CachedPod {
    #[cfg(test)]
    pub fn from_pod(pod: &Pod) -> Option<Self> {
        serde_json::to_value(pod).ok().and_then(|value| serde_json::from_value(value).ok())
    }

    pub(super) fn job_id(&self) -> Option<&String> {
        self.labels().get(JOB_ID_LABEL)
    }
}

/// The metadata fields OATS reads; the rest (managed fields above all) is skipped unparsed.
fn compact_meta<'de, D: Deserializer<'de>>(deserializer: D) -> Result<ObjectMeta, D::Error> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Wire {
        name: Option<String>,
        namespace: Option<String>,
        resource_version: Option<String>,
        creation_timestamp: Option<Time>,
        labels: Option<BTreeMap<String, String>>,
        annotations: Option<BTreeMap<String, String>>,
    }
    let wire = Wire::deserialize(deserializer)?;
    let annotations = wire.annotations.map(|mut a| {
        a.remove("kubectl.kubernetes.io/last-applied-configuration");
        a
    });
    Ok(ObjectMeta {
        name: wire.name,
        namespace: wire.namespace,
        resource_version: wire.resource_version,
        creation_timestamp: wire.creation_timestamp,
        labels: wire.labels,
        annotations,
        ..Default::default()
    })
}

/// `Resource` of a compact type: the API coordinates of the full type it stands for.
macro_rules! resource_like {
    ($compact:ty, $full:ty) => {
        impl Resource for $compact {
            type DynamicType = ();
            type Scope = NamespaceResourceScope;

            fn kind(dt: &()) -> Cow<'_, str> {
                <$full>::kind(dt)
            }
            fn group(dt: &()) -> Cow<'_, str> {
                <$full>::group(dt)
            }
            fn version(dt: &()) -> Cow<'_, str> {
                <$full>::version(dt)
            }
            fn plural(dt: &()) -> Cow<'_, str> {
                <$full>::plural(dt)
            }
            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }
            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}
resource_like!(CachedJob, Job);
resource_like!(CachedPod, Pod);

/// Drop the parts of a pod's status the mapping never reads (it is kept while the pod lives).
pub(super) fn compact_pod_status(pod: &mut CachedPod) {
    if let Some(status) = pod.status.as_mut() {
        status.host_ip = None;
        status.host_ips = None;
        status.pod_ip = None;
        status.pod_ips = None;
        status.qos_class = None;
        status.init_container_statuses = None;
        status.ephemeral_container_statuses = None;
        status.resource_claim_statuses = None;
        for container in status.container_statuses.iter_mut().flatten() {
            container.image_id = String::new();
            container.container_id = None;
            container.last_state = None;
            container.volume_mounts = None;
            container.allocated_resources = None;
            container.resources = None;
        }
    }
}
