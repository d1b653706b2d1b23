//! Pure rendering: a definition plus host readiness becomes the Service, EndpointSlices and
//! Endpoints to apply. Deterministic names and sorted content, so equal input renders equal
//! objects and an unchanged world causes no writes.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{
    EndpointAddress, EndpointPort, EndpointSubset, Endpoints, Service, ServicePort, ServiceSpec,
};
use k8s_openapi::api::discovery::v1::{
    Endpoint, EndpointConditions, EndpointPort as SlicePort, EndpointSlice,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::model::{Definition, Port, Source};

/// Field manager for server-side apply.
pub const FIELD_MANAGER: &str = "endpoints-operator";
/// Marks every object this daemon writes, so pruning never touches anyone else's.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY_VALUE: &str = "endpoints-operator";
/// EndpointSlice controller id; kube-proxy and the mirroring controller read this label.
pub const SLICE_MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
pub const SLICE_CONTROLLER: &str = "endpoints-operator.sealos.io";
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Which daemon wrote an object and from which kind of source: pruning only ever deletes
/// objects whose labels match the pruner's own instance and source.
pub const INSTANCE_LABEL: &str = "endpoints-operator.sealos.io/instance";
pub const SOURCE_LABEL: &str = "endpoints-operator.sealos.io/source";
/// Source label values: definitions from files, and from `ClusterEndpoint` objects.
pub const SOURCE_FILE: &str = "file";
pub const SOURCE_OBJECT: &str = "crd";
/// Keeps the mirroring controller from copying our Endpoints into duplicate slices.
pub const SKIP_MIRROR_LABEL: &str = "endpointslice.kubernetes.io/skip-mirror";

/// Everything one definition puts into one cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct Objects {
    pub service: Service,
    pub slices: Vec<EndpointSlice>,
    pub endpoints: Endpoints,
}

/// Renders the objects; `ready` answers for probed hosts (static ports are always ready).
/// `instance` names the daemon (config `instance`) in every object's labels; `owner`, when
/// given, becomes every object's ownerReference, so deleting it deletes them.
pub fn render(
    def: &Definition,
    instance: &str,
    owner: Option<&OwnerReference>,
    ready: impl Fn(&Port, IpAddr) -> bool,
) -> Objects {
    let is_ready = |port: &Port, host: IpAddr| port.check.is_none() || ready(port, host);
    let mut objects = Objects {
        service: service(def),
        slices: slices(def, &is_ready),
        endpoints: endpoints(def, &is_ready),
    };
    let source = match def.source {
        Source::File => SOURCE_FILE,
        Source::Object { .. } => SOURCE_OBJECT,
    };
    let ours = [(INSTANCE_LABEL, instance), (SOURCE_LABEL, source)];
    let metas = std::iter::once(&mut objects.service.metadata)
        .chain(objects.slices.iter_mut().map(|s| &mut s.metadata))
        .chain(std::iter::once(&mut objects.endpoints.metadata));
    for meta in metas {
        let labels = meta.labels.get_or_insert_with(Default::default);
        labels.extend(ours.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        meta.owner_references = owner.map(|o| vec![o.clone()]);
    }
    objects
}

/// The ownerReference that ties a cluster's objects to the `ClusterEndpoint` in that cluster.
/// Not `blockOwnerDeletion`: deleting the object must never wait for anything of ours. Not
/// `controller` either: a Service adopted from elsewhere may have a controller already (the API
/// allows one), and garbage collection needs none.
pub fn owner_reference(def: &Definition) -> Option<OwnerReference> {
    let object = def.object.as_ref()?;
    Some(OwnerReference {
        api_version: crate::model::API_VERSION.into(),
        kind: crate::model::KIND.into(),
        name: def.key.name.clone(),
        uid: object.uid.clone(),
        controller: None,
        block_owner_deletion: None,
    })
}

/// Whether a live Service has a selector: then its endpoints belong to the endpoints
/// controller, and the daemon leaves it alone.
pub fn has_selector(service: &Service) -> bool {
    let selector = service.spec.as_ref().and_then(|s| s.selector.as_ref());
    selector.is_some_and(|s| !s.is_empty())
}

/// The other daemon instance whose labels an object carries, if it is managed by one: two
/// instances writing one object would overwrite each other forever.
pub fn other_instance<'a>(
    labels: Option<&'a BTreeMap<String, String>>,
    instance: &str,
) -> Option<&'a String> {
    let labels = labels?;
    let managed = labels
        .get(MANAGED_BY_LABEL)
        .is_some_and(|v| v == MANAGED_BY_VALUE);
    labels
        .get(INSTANCE_LABEL)
        .filter(|i| managed && *i != instance)
}

/// Whether labels mark an object as written by this daemon instance and as one it may delete
/// when its definition is gone. Objects from `ClusterEndpoint`s only once every cluster's objects
/// have been listed (`objects_complete`): before that, a missing one may just not be known yet.
pub fn pruneable(
    labels: Option<&BTreeMap<String, String>>,
    instance: &str,
    objects_complete: bool,
) -> bool {
    let Some(labels) = labels else { return false };
    let is = |key: &str, value: &str| labels.get(key).is_some_and(|v| v == value);
    is(MANAGED_BY_LABEL, MANAGED_BY_VALUE)
        && is(INSTANCE_LABEL, instance)
        && (is(SOURCE_LABEL, SOURCE_FILE) || (objects_complete && is(SOURCE_LABEL, SOURCE_OBJECT)))
}

fn meta(def: &Definition, name: String, extra: &[(&str, &str)]) -> ObjectMeta {
    let mut labels = def.labels.clone();
    labels.insert(MANAGED_BY_LABEL.into(), MANAGED_BY_VALUE.into());
    for (k, v) in extra {
        labels.insert((*k).into(), (*v).into());
    }
    ObjectMeta {
        name: Some(name),
        namespace: Some(def.key.namespace.clone()),
        labels: Some(labels),
        ..Default::default()
    }
}

fn service(def: &Definition) -> Service {
    let mut metadata = meta(def, def.key.name.clone(), &[]);
    if !def.annotations.is_empty() {
        metadata.annotations = Some(def.annotations.clone());
    }
    let ports = def
        .ports
        .iter()
        .map(|p| ServicePort {
            name: non_empty(&p.name),
            protocol: Some(p.protocol.as_str().into()),
            port: p.port.into(),
            target_port: Some(IntOrString::Int(p.target_port.into())),
            ..Default::default()
        })
        .collect();
    Service {
        metadata,
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            cluster_ip: def.cluster_ip.clone(),
            ports: Some(ports),
            ..Default::default()
        }),
        status: None,
    }
}

/// At most this many endpoints per slice, the EndpointSlice controller's default (the API
/// allows 1000; smaller slices keep each update small).
pub const MAX_ENDPOINTS_PER_SLICE: usize = 100;

/// The name of one slice, stable across runs and unique per definition: read from the right it
/// is `[-chunk]`, family, protocol, port number, and the rest is the Service name, so no two
/// (definition, port, family, chunk) combinations can produce the same name.
pub fn slice_name(def: &Definition, port: &Port, family: Family, chunk: usize) -> String {
    let base = format!(
        "{}-{}-{}-{}",
        def.key.name,
        port.port,
        port.protocol.as_str().to_ascii_lowercase(),
        family.suffix()
    );
    if chunk == 0 {
        base
    } else {
        format!("{base}-{chunk}")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn of(ip: IpAddr) -> Family {
        if ip.is_ipv4() { Family::V4 } else { Family::V6 }
    }
    fn suffix(self) -> &'static str {
        match self {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        }
    }
    fn address_type(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }
}

/// Slices per (port, family), each with at most [`MAX_ENDPOINTS_PER_SLICE`] endpoints: every
/// endpoint in a slice shares its ports, and each port has its own hosts. Unhealthy hosts stay
/// listed with `ready: false`.
fn slices(def: &Definition, is_ready: &impl Fn(&Port, IpAddr) -> bool) -> Vec<EndpointSlice> {
    let mut out = Vec::new();
    for port in &def.ports {
        let mut by_family: BTreeMap<Family, Vec<IpAddr>> = BTreeMap::new();
        for host in &port.hosts {
            by_family.entry(Family::of(*host)).or_default().push(*host);
        }
        for (family, mut hosts) in by_family {
            hosts.sort();
            for (chunk, hosts) in hosts.chunks(MAX_ENDPOINTS_PER_SLICE).enumerate() {
                let endpoints = hosts
                    .iter()
                    .map(|h| {
                        let ready = is_ready(port, *h);
                        Endpoint {
                            addresses: vec![h.to_string()],
                            conditions: Some(EndpointConditions {
                                ready: Some(ready),
                                serving: Some(ready),
                                terminating: Some(false),
                            }),
                            ..Default::default()
                        }
                    })
                    .collect();
                let extra = [
                    (SERVICE_NAME_LABEL, def.key.name.as_str()),
                    (SLICE_MANAGED_BY_LABEL, SLICE_CONTROLLER),
                ];
                out.push(EndpointSlice {
                    metadata: meta(def, slice_name(def, port, family, chunk), &extra),
                    address_type: family.address_type().into(),
                    endpoints: Some(endpoints),
                    ports: Some(vec![SlicePort {
                        name: Some(port.name.clone()),
                        port: Some(port.target_port.into()),
                        protocol: Some(port.protocol.as_str().into()),
                        app_protocol: None,
                    }]),
                });
            }
        }
    }
    out
}

/// Legacy Endpoints: one subset per port (with at least one host), ready and not-ready split.
fn endpoints(def: &Definition, is_ready: &impl Fn(&Port, IpAddr) -> bool) -> Endpoints {
    let subsets = def
        .ports
        .iter()
        .filter(|p| !p.hosts.is_empty())
        .map(|port| {
            let mut hosts = port.hosts.clone();
            hosts.sort();
            let address = |h: &IpAddr| EndpointAddress {
                ip: h.to_string(),
                ..Default::default()
            };
            let (ready, not_ready): (Vec<IpAddr>, Vec<IpAddr>) =
                hosts.iter().partition(|h| is_ready(port, **h));
            EndpointSubset {
                addresses: non_empty_vec(ready.iter().map(address).collect()),
                not_ready_addresses: non_empty_vec(not_ready.iter().map(address).collect()),
                ports: Some(vec![EndpointPort {
                    name: non_empty(&port.name),
                    port: port.target_port.into(),
                    protocol: Some(port.protocol.as_str().into()),
                    app_protocol: None,
                }]),
            }
        })
        .collect::<Vec<_>>();
    Endpoints {
        metadata: meta(def, def.key.name.clone(), &[(SKIP_MIRROR_LABEL, "true")]),
        subsets: non_empty_vec(subsets),
    }
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

fn non_empty_vec<T>(v: Vec<T>) -> Option<Vec<T>> {
    (!v.is_empty()).then_some(v)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::model::spec::Manifest;
    use crate::sources::files::parse_yaml;

    fn definition(yaml: &str) -> Definition {
        let manifest: Manifest = parse_yaml("test", yaml).remove(0).manifest.unwrap();
        let (def, problems) = crate::model::validate(&manifest, "test");
        assert!(problems.is_empty(), "{problems:?}");
        def.unwrap()
    }

    const TWO_PORTS: &str = "
metadata: {name: db, namespace: prod, labels: {team: data}}
spec:
  ports:
    - {name: pg, port: 5432, targetPort: 15432, hosts: [10.0.0.9, 10.0.0.1, 2001:db8::1], tcpSocket: {enable: true}}
    - {name: metrics, port: 9187, hosts: [10.0.0.1]}
";

    #[test]
    fn the_service_has_no_selector_and_every_port() {
        let objects = render(&definition(TWO_PORTS), "default", None, |_, _| true);
        let spec = objects.service.spec.unwrap();
        assert!(spec.selector.is_none());
        assert_eq!(spec.cluster_ip, None);
        let ports: Vec<_> = spec
            .ports
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p.name.clone().unwrap(),
                    p.port,
                    p.target_port.clone().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            ports,
            [
                ("pg".into(), 5432, IntOrString::Int(15432)),
                ("metrics".into(), 9187, IntOrString::Int(9187))
            ]
        );
        let labels = objects.service.metadata.labels.unwrap();
        assert_eq!(labels["team"], "data");
        assert_eq!(labels[MANAGED_BY_LABEL], MANAGED_BY_VALUE);
    }

    #[test]
    fn one_slice_per_port_and_family_with_sorted_single_address_endpoints() {
        let objects = render(&definition(TWO_PORTS), "default", None, |_, ip| {
            ip != "10.0.0.9".parse::<IpAddr>().unwrap()
        });
        let names: Vec<_> = objects
            .slices
            .iter()
            .map(|s| s.metadata.name.clone().unwrap())
            .collect();
        assert_eq!(
            names,
            ["db-5432-tcp-ipv4", "db-5432-tcp-ipv6", "db-9187-tcp-ipv4"]
        );
        let pg4 = &objects.slices[0];
        assert_eq!(pg4.address_type, "IPv4");
        let rows: Vec<_> = pg4
            .endpoints
            .iter()
            .flatten()
            .map(|e| (e.addresses.clone(), e.conditions.as_ref().unwrap().ready))
            .collect();
        assert_eq!(
            rows,
            [
                (vec!["10.0.0.1".to_string()], Some(true)),
                (vec!["10.0.0.9".to_string()], Some(false))
            ]
        );
        assert_eq!(pg4.ports.as_ref().unwrap()[0].port, Some(15432));
        let labels = pg4.metadata.labels.as_ref().unwrap();
        assert_eq!(labels[SERVICE_NAME_LABEL], "db");
        assert_eq!(labels[SLICE_MANAGED_BY_LABEL], SLICE_CONTROLLER);
    }

    #[test]
    fn endpoints_split_ready_and_not_ready_and_skip_mirroring() {
        let objects = render(&definition(TWO_PORTS), "default", None, |_, ip| {
            ip != "10.0.0.9".parse::<IpAddr>().unwrap()
        });
        assert_eq!(
            objects.endpoints.metadata.labels.as_ref().unwrap()[SKIP_MIRROR_LABEL],
            "true"
        );
        let subsets = objects.endpoints.subsets.unwrap();
        let ips = |a: &Option<Vec<EndpointAddress>>| {
            a.iter().flatten().map(|a| a.ip.clone()).collect::<Vec<_>>()
        };
        assert_eq!(ips(&subsets[0].addresses), ["10.0.0.1", "2001:db8::1"]);
        assert_eq!(ips(&subsets[0].not_ready_addresses), ["10.0.0.9"]);
        assert_eq!(subsets[0].ports.as_ref().unwrap()[0].port, 15432);
    }

    #[test]
    fn a_static_port_is_ready_whatever_the_board_says() {
        let objects = render(&definition(TWO_PORTS), "default", None, |_, _| false);
        let metrics = &objects.slices[2];
        assert_eq!(
            metrics.endpoints.as_ref().unwrap()[0]
                .conditions
                .as_ref()
                .unwrap()
                .ready,
            Some(true)
        );
    }

    #[test]
    fn slice_names_never_collide_across_definitions() {
        let a = definition(
            "metadata: {name: a-b}\nspec:\n  ports: [{name: c, port: 80, hosts: [10.0.0.1]}]\n",
        );
        let b = definition(
            "metadata: {name: a}\nspec:\n  ports: [{name: b-c, port: 80, hosts: [10.0.0.2]}]\n",
        );
        let c = definition(
            "metadata: {name: a-b-80}\nspec:\n  ports: [{name: c, port: 90, hosts: [10.0.0.3]}]\n",
        );
        let names: BTreeSet<String> = [a, b, c]
            .iter()
            .flat_map(|d| render(d, "default", None, |_, _| true).slices)
            .filter_map(|s| s.metadata.name)
            .collect();
        assert_eq!(names.len(), 3, "{names:?}");
    }

    #[test]
    fn many_hosts_are_split_into_slices_of_at_most_a_hundred() {
        let hosts: Vec<String> = (0..250)
            .map(|i| format!("10.1.{}.{}", i / 200, i % 200 + 1))
            .collect();
        let def = definition(&format!(
            "metadata: {{name: big}}\nspec:\n  ports: [{{port: 80, hosts: [{}]}}]\n",
            hosts.join(", ")
        ));
        let slices = render(&def, "default", None, |_, _| true).slices;
        let shape: Vec<(String, usize)> = slices
            .iter()
            .map(|s| {
                (
                    s.metadata.name.clone().unwrap(),
                    s.endpoints.as_ref().unwrap().len(),
                )
            })
            .collect();
        assert_eq!(
            shape,
            [
                ("big-80-tcp-ipv4".into(), 100),
                ("big-80-tcp-ipv4-1".into(), 100),
                ("big-80-tcp-ipv4-2".into(), 50)
            ]
        );
    }

    #[test]
    fn headless_sets_cluster_ip_none_and_rendering_is_deterministic() {
        let def = definition(
            "metadata: {name: h}\nspec:\n  clusterIP: None\n  ports: [{port: 80, hosts: [10.0.0.2]}]\n",
        );
        let a = render(&def, "default", None, |_, _| true);
        assert_eq!(
            a.service.spec.as_ref().unwrap().cluster_ip.as_deref(),
            Some("None")
        );
        assert_eq!(a.slices[0].metadata.name.as_deref(), Some("h-80-tcp-ipv4"));
        assert_eq!(a, render(&def, "default", None, |_, _| true));
    }
}
