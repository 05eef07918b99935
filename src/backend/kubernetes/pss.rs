//! A checker for the Pod Security Standards *restricted* profile (which includes baseline),
//! following the upstream pod-security-admission checks, plus the OATS hardening the profile does
//! not require (read-only root filesystem, no service-account token).
//!
//! It judges a pod template the way Pod Security Admission judges the pods a Job creates, so a
//! template can be refused before a Job that could never start is created.

use k8s_openapi::api::core::v1::{Container, PodSecurityContext, PodSpec, PodTemplateSpec, SecurityContext};

/// One control a pod template fails, named by the upstream check id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub control: &'static str,
    pub detail: String,
}

const SAFE_SYSCTLS: &[&str] = &[
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
    "net.ipv4.tcp_rmem",
    "net.ipv4.tcp_wmem",
];
const SELINUX_TYPES: &[&str] = &["", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"];

/// Every restricted-profile control `template` fails; empty when it passes. The checks run in
/// the order of [`RESTRICTED`], each adding what it finds.
pub fn check_restricted(template: &PodTemplateSpec) -> Vec<Violation> {
    let mut v = Vec::new();
    let Some(spec) = &template.spec else {
        v.push(Violation { control: "spec", detail: "pod template has no spec".into() });
        return v;
    };
    let pod = Pod::new(template, spec);
    for check in RESTRICTED {
        check(&pod, &mut v);
    }
    v
}

/// What the checks read of a pod template.
struct Pod<'a> {
    template: &'a PodTemplateSpec,
    spec: &'a PodSpec,
    /// Regular and init containers.
    containers: Vec<&'a Container>,
    /// Every container's security context, ephemeral containers' included.
    contexts: Vec<(&'a str, Option<&'a SecurityContext>)>,
    psc: Option<&'a PodSecurityContext>,
}

impl<'a> Pod<'a> {
    fn new(template: &'a PodTemplateSpec, spec: &'a PodSpec) -> Self {
        let containers: Vec<&Container> = spec.containers.iter().chain(spec.init_containers.iter().flatten()).collect();
        let ephemeral =
            spec.ephemeral_containers.iter().flatten().map(|c| (c.name.as_str(), c.security_context.as_ref()));
        let contexts =
            containers.iter().map(|c| (c.name.as_str(), c.security_context.as_ref())).chain(ephemeral).collect();
        Self { template, spec, containers, contexts, psc: spec.security_context.as_ref() }
    }
}

/// The restricted profile's checks (baseline's included), in the order violations are listed.
const RESTRICTED: [fn(&Pod<'_>, &mut Vec<Violation>); 6] =
    [host_namespaces, container_contexts, host_ports_and_probes, pod_context, apparmor_annotations, volume_types];

/// Baseline: no host network, PID or IPC namespace.
fn host_namespaces(pod: &Pod<'_>, v: &mut Vec<Violation>) {
    let mut fail = |control: &'static str, detail: String| v.push(Violation { control, detail });
    let spec = pod.spec;
    if spec.host_network == Some(true) || spec.host_pid == Some(true) || spec.host_ipc == Some(true) {
        fail("hostNamespaces", "hostNetwork, hostPID and hostIPC must be unset or false".into());
    }
}

/// Each container's security context: baseline (privileged, capabilities, procMount, Windows
/// host process, SELinux, AppArmor, seccomp), then restricted (no escalation, drop ALL, non-root).
fn container_contexts(pod: &Pod<'_>, v: &mut Vec<Violation>) {
    let mut fail = |control: &'static str, detail: String| v.push(Violation { control, detail });
    let psc = pod.psc;
    for (name, sc) in &pod.contexts {
        let sc = sc.cloned().unwrap_or_default();
        if sc.privileged == Some(true) {
            fail("privileged", format!("container {name} is privileged"));
        }
        // capabilities_restricted replaces capabilities_baseline at this level (upstream's
        // override): the API server names only the restricted control.
        if let Some(add) = sc.capabilities.as_ref().and_then(|c| c.add.as_ref()) {
            for cap in add.iter().filter(|cap| *cap != "NET_BIND_SERVICE") {
                fail("capabilities_restricted", format!("container {name} adds {cap}"));
            }
        }
        if sc.proc_mount.as_deref().is_some_and(|p| p != "Default") {
            fail("procMount", format!("container {name} sets procMount"));
        }
        if sc.windows_options.as_ref().and_then(|w| w.host_process) == Some(true) {
            fail("windowsHostProcess", format!("container {name} is a Windows host process"));
        }
        if let Some(se) = &sc.se_linux_options
            && (!SELINUX_TYPES.contains(&se.type_.as_deref().unwrap_or("")) || se.user.is_some() || se.role.is_some())
        {
            fail("seLinuxOptions", format!("container {name} sets forbidden SELinux options"));
        }
        if sc.app_armor_profile.as_ref().is_some_and(|p| p.type_ == "Unconfined") {
            fail("appArmorProfile", format!("container {name} is AppArmor unconfined"));
        }
        match sc.seccomp_profile.as_ref().map(|p| p.type_.as_str()) {
            Some("RuntimeDefault" | "Localhost") => {}
            Some(other) => fail("seccompProfile_restricted", format!("container {name} uses seccomp {other}")),
            None if psc.and_then(|p| p.seccomp_profile.as_ref()).is_none() => {
                fail("seccompProfile_restricted", format!("container {name} has no seccomp profile"))
            }
            None => {}
        }
        // Restricted.
        if sc.allow_privilege_escalation != Some(false) {
            fail("allowPrivilegeEscalation", format!("container {name} must set allowPrivilegeEscalation=false"));
        }
        if !sc.capabilities.as_ref().and_then(|c| c.drop.as_ref()).is_some_and(|d| d.iter().any(|c| c == "ALL")) {
            fail("capabilities_restricted", format!("container {name} must drop ALL capabilities"));
        }
        if sc.run_as_non_root == Some(false)
            || (sc.run_as_non_root.is_none() && psc.and_then(|p| p.run_as_non_root) != Some(true))
        {
            fail("runAsNonRoot", format!("container {name} may run as root"));
        }
        if sc.run_as_user == Some(0) {
            fail("runAsUser", format!("container {name} runs as uid 0"));
        }
    }
}

/// Baseline: no host ports, and probes and lifecycle hooks that name no host.
fn host_ports_and_probes(pod: &Pod<'_>, v: &mut Vec<Violation>) {
    let mut fail = |control: &'static str, detail: String| v.push(Violation { control, detail });
    for c in &pod.containers {
        for port in c.ports.iter().flatten() {
            if port.host_port.is_some_and(|p| p != 0) {
                fail("hostPorts", format!("container {} uses a host port", c.name));
            }
        }
        let probes = [&c.liveness_probe, &c.readiness_probe, &c.startup_probe];
        let probe_hosts = probes.into_iter().flatten().flat_map(|p| {
            [p.http_get.as_ref().and_then(|h| h.host.clone()), p.tcp_socket.as_ref().and_then(|t| t.host.clone())]
        });
        let lifecycle_hosts = c.lifecycle.iter().flat_map(|l| [&l.post_start, &l.pre_stop]).flatten().flat_map(|h| {
            [h.http_get.as_ref().and_then(|g| g.host.clone()), h.tcp_socket.as_ref().and_then(|t| t.host.clone())]
        });
        if probe_hosts.chain(lifecycle_hosts).flatten().any(|h| !h.is_empty()) {
            fail("hostProbesAndHostLifecycle", format!("container {} probes or hooks a host", c.name));
        }
    }
}

/// The pod's security context: root uid, seccomp, sysctls, SELinux, AppArmor.
fn pod_context(pod: &Pod<'_>, v: &mut Vec<Violation>) {
    let mut fail = |control: &'static str, detail: String| v.push(Violation { control, detail });
    if let Some(psc) = pod.psc {
        if psc.run_as_user == Some(0) {
            fail("runAsUser", "pod runs as uid 0".into());
        }
        match psc.seccomp_profile.as_ref().map(|p| p.type_.as_str()) {
            Some("RuntimeDefault" | "Localhost") | None => {}
            Some(other) => fail("seccompProfile_restricted", format!("pod uses seccomp {other}")),
        }
        for sysctl in psc.sysctls.iter().flatten() {
            if !SAFE_SYSCTLS.contains(&sysctl.name.as_str()) {
                fail("sysctls", format!("pod sets unsafe sysctl {}", sysctl.name));
            }
        }
        if psc.se_linux_options.as_ref().is_some_and(|se| {
            !SELINUX_TYPES.contains(&se.type_.as_deref().unwrap_or("")) || se.user.is_some() || se.role.is_some()
        }) {
            fail("seLinuxOptions", "pod sets forbidden SELinux options".into());
        }
        if psc.app_armor_profile.as_ref().is_some_and(|p| p.type_ == "Unconfined") {
            fail("appArmorProfile", "pod is AppArmor unconfined".into());
        }
    }
}

/// Baseline: AppArmor annotations name only the runtime's default or a local profile.
fn apparmor_annotations(pod: &Pod<'_>, v: &mut Vec<Violation>) {
    let mut fail = |control: &'static str, detail: String| v.push(Violation { control, detail });
    let annotations = pod.template.metadata.as_ref().and_then(|m| m.annotations.as_ref());
    for (key, value) in annotations.into_iter().flatten() {
        if key.starts_with("container.apparmor.security.beta.kubernetes.io/")
            && !(value.is_empty() || value == "runtime/default" || value.starts_with("localhost/"))
        {
            fail("appArmorProfile", format!("annotation {key}={value}"));
        }
    }
}

/// Restricted: only the volume types the profile allows.
fn volume_types(pod: &Pod<'_>, v: &mut Vec<Violation>) {
    let mut fail = |control: &'static str, detail: String| v.push(Violation { control, detail });
    // restrictedVolumes replaces hostPathVolumes at this level, as upstream overrides it.
    for volume in pod.spec.volumes.iter().flatten() {
        if volume.host_path.is_some() {
            fail("restrictedVolumes", format!("volume {} is a hostPath", volume.name));
            continue;
        }
        let allowed = volume.config_map.is_some()
            || volume.downward_api.is_some()
            || volume.empty_dir.is_some()
            || volume.projected.is_some()
            || volume.secret.is_some()
            || volume.csi.is_some()
            || volume.persistent_volume_claim.is_some()
            || volume.ephemeral.is_some()
            || volume.image.is_some();
        if !allowed {
            fail("restrictedVolumes", format!("volume {} has a type the restricted profile forbids", volume.name));
        }
    }
}

/// OATS hardening beyond the profile: read-only roots and no API token in agent pods.
pub fn check_hardening(template: &PodTemplateSpec) -> Vec<Violation> {
    let mut v = Vec::new();
    let Some(spec) = &template.spec else { return v };
    if spec.automount_service_account_token != Some(false) {
        v.push(Violation { control: "automountServiceAccountToken", detail: "must be false".into() });
    }
    for c in spec.containers.iter().chain(spec.init_containers.iter().flatten()) {
        if c.security_context.as_ref().and_then(|s| s.read_only_root_filesystem) != Some(true) {
            v.push(Violation {
                control: "readOnlyRootFilesystem",
                detail: format!("container {} has a writable root filesystem", c.name),
            });
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        backend::kubernetes::render::{AgentTemplate, render_job},
        config::Config,
        jobs::{JobId, JobLimits, JobRequest, NewJob},
    };
    use k8s_openapi::api::core::v1::{
        Capabilities, ContainerPort, HostPathVolumeSource, PodSecurityContext, SeccompProfile, Sysctl, Volume,
    };

    fn template() -> PodTemplateSpec {
        let spec = JobRequest { goal: "g".into(), max_turns: 1, ..Default::default() }
            .validate(&JobLimits::default())
            .unwrap();
        let job = NewJob {
            id: JobId::random(),
            tenant: "t".into(),
            spec,
            created_at: chrono::Utc::now(),
            request_hash: String::new(),
            trace: None,
            resources: None,
            queue: Default::default(),
        };
        render_job(&job, &AgentTemplate::from_config(&Config::default(), "ns")).spec.unwrap().template
    }

    fn controls_after(change: impl FnOnce(&mut PodTemplateSpec)) -> Vec<&'static str> {
        let mut t = template();
        change(&mut t);
        let mut controls: Vec<_> = check_restricted(&t).into_iter().map(|v| v.control).collect();
        controls.dedup();
        controls
    }

    fn container(t: &mut PodTemplateSpec) -> &mut SecurityContext {
        t.spec.as_mut().unwrap().containers[0].security_context.get_or_insert_default()
    }

    #[test]
    fn the_rendered_template_passes_everything() {
        assert!(check_restricted(&template()).is_empty());
        assert!(check_hardening(&template()).is_empty());
    }

    #[test]
    fn each_control_catches_its_violation() {
        type Breaks = Box<dyn FnOnce(&mut PodTemplateSpec)>;
        let cases: Vec<(&str, Breaks)> = vec![
            ("hostNamespaces", Box::new(|t| t.spec.as_mut().unwrap().host_pid = Some(true))),
            ("privileged", Box::new(|t| container(t).privileged = Some(true))),
            ("allowPrivilegeEscalation", Box::new(|t| container(t).allow_privilege_escalation = None)),
            (
                "capabilities_restricted",
                Box::new(|t| container(t).capabilities = Some(Capabilities { add: None, drop: None })),
            ),
            ("runAsNonRoot", Box::new(|t| container(t).run_as_non_root = Some(false))),
            ("runAsUser", Box::new(|t| container(t).run_as_user = Some(0))),
            ("procMount", Box::new(|t| container(t).proc_mount = Some("Unmasked".into()))),
            (
                "seccompProfile_restricted",
                Box::new(|t| {
                    container(t).seccomp_profile =
                        Some(SeccompProfile { type_: "Unconfined".into(), localhost_profile: None })
                }),
            ),
            (
                "hostPorts",
                Box::new(|t| {
                    t.spec.as_mut().unwrap().containers[0].ports =
                        Some(vec![ContainerPort { container_port: 80, host_port: Some(80), ..Default::default() }])
                }),
            ),
            (
                "sysctls",
                Box::new(|t| {
                    t.spec.as_mut().unwrap().security_context.get_or_insert_default().sysctls =
                        Some(vec![Sysctl { name: "kernel.msgmax".into(), value: "1".into() }])
                }),
            ),
        ];
        for (control, change) in cases {
            assert_eq!(controls_after(change), vec![control], "{control}");
        }
        let with_host_path = controls_after(|t| {
            t.spec.as_mut().unwrap().volumes.get_or_insert_default().push(Volume {
                name: "host".into(),
                host_path: Some(HostPathVolumeSource { path: "/".into(), type_: None }),
                ..Default::default()
            })
        });
        assert_eq!(with_host_path, vec!["restrictedVolumes"]);
        let adds_sys_admin = controls_after(|t| {
            container(t).capabilities =
                Some(Capabilities { add: Some(vec!["SYS_ADMIN".into()]), drop: Some(vec!["ALL".into()]) })
        });
        assert_eq!(adds_sys_admin, vec!["capabilities_restricted"]);
        let pod_level_root = controls_after(|t| {
            t.spec.as_mut().unwrap().security_context =
                Some(PodSecurityContext { run_as_user: Some(0), ..Default::default() })
        });
        // The containers still say runAsNonRoot, but lose the pod-level seccomp profile.
        assert_eq!(pod_level_root, vec!["seccompProfile_restricted", "runAsUser"]);
    }

    #[test]
    fn hardening_catches_writable_roots_and_tokens() {
        let mut t = template();
        container(&mut t).read_only_root_filesystem = None;
        t.spec.as_mut().unwrap().automount_service_account_token = None;
        let controls: Vec<_> = check_hardening(&t).into_iter().map(|v| v.control).collect();
        assert_eq!(controls, ["automountServiceAccountToken", "readOnlyRootFilesystem"]);
    }
}
