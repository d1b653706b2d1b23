//! `ClusterEndpoint` objects as a source: one watch per cluster (all namespaces, or the
//! configured ones) whose objects are validated into the same model as files. Every update
//! carries the cluster's complete list, and the first one comes only once all of it is listed,
//! so a half-read list never looks like deleted objects.
//!
//! Objects being deleted are left out. The original operator put a finalizer on its objects
//! that nothing removes once it is gone; this source removes that finalizer from objects being
//! deleted, so they do not hang. It adds no finalizer of its own.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use futures::StreamExt;
use futures::stream::select_all;
use kube::api::{Patch, PatchParams};
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::model::crd::ClusterEndpoint;
use crate::model::spec::{Manifest, Metadata};
use crate::model::{
    Definition, DefinitionId, DefinitionKey, ObjectInfo, ObjectState, Problem, Source, validate,
};
use crate::sink::WATCH_TIMEOUT_SECS;

/// Finalizers of the original operator (current and old group), removed from objects being
/// deleted.
pub const LEGACY_FINALIZERS: [&str; 2] = [
    "sealos.io/cluster-endpoints.finalizers",
    "sealyun.com/cluster-endpoints.finalizers",
];

/// Annotations that describe the object itself and must not be copied onto its Service.
const OWN_ANNOTATIONS: [&str; 1] = ["kubectl.kubernetes.io/last-applied-configuration"];

/// The objects of one cluster, validated.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ObjectList {
    pub cluster: String,
    pub definitions: Vec<Definition>,
    /// Every object, also those without a usable definition.
    pub objects: BTreeMap<DefinitionId, ObjectState>,
}

/// Starts watching a cluster's objects; each change sends the cluster's whole list.
pub fn spawn(
    cluster: String,
    client: Client,
    namespaces: &[String],
    updates: mpsc::Sender<ObjectList>,
) -> JoinHandle<()> {
    let apis: Vec<(String, Api<ClusterEndpoint>)> = if namespaces.is_empty() {
        vec![(String::new(), Api::all(client.clone()))]
    } else {
        (namespaces.iter())
            .map(|ns| (ns.clone(), Api::namespaced(client.clone(), ns)))
            .collect()
    };
    tokio::spawn(watch(cluster, client, apis, updates))
}

async fn watch(
    cluster: String,
    client: Client,
    apis: Vec<(String, Api<ClusterEndpoint>)>,
    updates: mpsc::Sender<ObjectList>,
) {
    let scopes: BTreeSet<String> = apis.iter().map(|(ns, _)| ns.clone()).collect();
    let streams = apis.into_iter().map(|(scope, api)| {
        watcher::watcher(api, watcher::Config::default().timeout(WATCH_TIMEOUT_SECS))
            .map(move |event| (scope.clone(), event))
            .boxed()
    });
    let mut events = select_all(streams);
    // Per scope: the objects in force, and the list being read during a (re)list.
    let mut objects: BTreeMap<(String, String), ClusterEndpoint> = BTreeMap::new();
    let mut relisting: BTreeMap<String, BTreeMap<(String, String), ClusterEndpoint>> =
        BTreeMap::new();
    let mut listed: BTreeSet<String> = BTreeSet::new();
    let mut failing = false;
    let mut sent: Option<ObjectList> = None;
    let mut last_good = HashMap::new();
    while let Some((scope, event)) = events.next().await {
        let changed = match event {
            Ok(Event::Init) => {
                relisting.insert(scope, BTreeMap::new());
                false
            }
            Ok(Event::InitApply(object)) => {
                if let Some(list) = relisting.get_mut(&scope) {
                    list.insert(key_of(&object), object);
                }
                false
            }
            Ok(Event::InitDone) => {
                let fresh = relisting.remove(&scope).unwrap_or_default();
                objects.retain(|(ns, _), _| !in_scope(&scope, ns));
                objects.extend(fresh);
                listed.insert(scope);
                true
            }
            Ok(Event::Apply(object)) => {
                objects.insert(key_of(&object), object);
                true
            }
            Ok(Event::Delete(object)) => {
                objects.remove(&key_of(&object));
                true
            }
            Err(e) => {
                // The watcher retries by itself; the last list stays in force meanwhile.
                if !failing {
                    warn!(%cluster, error = %e, "watching ClusterEndpoint objects failed; retrying");
                }
                failing = true;
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        failing = false;
        if !changed || listed != scopes {
            continue;
        }
        release_legacy_finalizers(&client, objects.values()).await;
        let list = validate_all(&cluster, objects.values(), &mut last_good);
        // A status written by the sinks comes back as a change: not one worth passing on.
        if sent.as_ref().is_some_and(|s| same_but_status(s, &list)) {
            continue;
        }
        sent = Some(list.clone());
        if updates.send(list).await.is_err() {
            return;
        }
    }
}

fn same_but_status(a: &ObjectList, b: &ObjectList) -> bool {
    a.definitions == b.definitions
        && a.objects.len() == b.objects.len()
        && (a.objects.iter().zip(&b.objects))
            .all(|((ia, a), (ib, b))| ia == ib && a.info == b.info && a.problems == b.problems)
}

fn key_of(object: &ClusterEndpoint) -> (String, String) {
    (object.namespace().unwrap_or_default(), object.name_any())
}

/// Whether a namespace belongs to a watch scope ("" is every namespace).
fn in_scope(scope: &str, namespace: &str) -> bool {
    scope.is_empty() || scope == namespace
}

/// Validates each live object into a definition for its own cluster (plus any it names). As with
/// files, an edit with problems never takes away what is in force: the object's last version
/// without problems (kept in `last_good`, by uid) stays until it is fixed.
pub fn validate_all<'a>(
    cluster: &str,
    objects: impl IntoIterator<Item = &'a ClusterEndpoint>,
    last_good: &mut HashMap<String, Definition>,
) -> ObjectList {
    let mut good = HashMap::new();
    let mut list = ObjectList {
        cluster: cluster.to_string(),
        ..Default::default()
    };
    for object in objects {
        if object.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let id = DefinitionId {
            key: DefinitionKey {
                namespace: object.namespace().unwrap_or_default(),
                name: object.name_any(),
            },
            source: Source::Object {
                cluster: cluster.to_string(),
            },
        };
        let origin = format!("cluster {cluster}: ClusterEndpoint {}", id.key);
        let (definition, mut problems) = validate(&manifest_of(object), &origin);
        let info = ObjectInfo {
            uid: object.uid().unwrap_or_default(),
            generation: object.metadata.generation,
        };
        let kept = last_good.remove(&info.uid).filter(|_| !problems.is_empty());
        let in_force = problems.is_empty() || kept.is_some();
        let definition = match kept {
            Some(kept) => {
                problems.push(Problem {
                    origin: origin.clone(),
                    field: String::new(),
                    value: String::new(),
                    reason: "this version has problems; the last version without problems stays in force".into(),
                });
                Some(kept)
            }
            None => definition.map(|d| own(d, &id, &info, cluster)),
        };
        if let Some(definition) = definition {
            if in_force {
                good.insert(info.uid.clone(), definition.clone());
            }
            list.definitions.push(definition);
        }
        let state = ObjectState {
            info,
            problems,
            status: object.status.clone(),
        };
        list.objects.insert(id, state);
    }
    *last_good = good;
    list
}

/// A definition read from an object: its source, the object, and its own cluster among its
/// targets.
fn own(
    mut definition: Definition,
    id: &DefinitionId,
    info: &ObjectInfo,
    cluster: &str,
) -> Definition {
    definition.source = id.source.clone();
    definition.object = Some(info.clone());
    let mut clusters = definition.clusters.take().unwrap_or_default();
    if !clusters.iter().any(|c| c == cluster) {
        clusters.push(cluster.to_string());
        clusters.sort();
    }
    definition.clusters = Some(clusters);
    definition
}

fn manifest_of(object: &ClusterEndpoint) -> Manifest {
    let mut annotations = object.annotations().clone();
    annotations.retain(|k, _| !OWN_ANNOTATIONS.contains(&k.as_str()));
    Manifest {
        api_version: None,
        kind: None,
        metadata: Metadata {
            name: object.name_any(),
            namespace: object.namespace(),
            labels: object.labels().clone(),
            annotations,
            ..Default::default()
        },
        spec: object.spec.clone(),
        status: None,
    }
}

/// Removes the original operator's finalizer from objects being deleted. The patch carries the
/// resourceVersion it was computed from, so a concurrent change makes it fail, not clobber.
async fn release_legacy_finalizers<'a>(
    client: &Client,
    objects: impl IntoIterator<Item = &'a ClusterEndpoint>,
) {
    for object in objects {
        if object.metadata.deletion_timestamp.is_none() {
            continue;
        }
        let finalizers = object.finalizers();
        let kept: Vec<&String> = (finalizers.iter())
            .filter(|f| !LEGACY_FINALIZERS.contains(&f.as_str()))
            .collect();
        if kept.len() == finalizers.len() {
            continue;
        }
        let api: Api<ClusterEndpoint> =
            Api::namespaced(client.clone(), &object.namespace().unwrap_or_default());
        let patch = json!({
            "metadata": {"finalizers": kept, "resourceVersion": object.resource_version()}
        });
        let name = object.name_any();
        match api
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                info!(object = %name, namespace = ?object.namespace(), "removed the original operator's finalizer from an object being deleted")
            }
            Err(e) => {
                warn!(object = %name, error = %e, "cannot remove the original operator's finalizer")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(uid: &str, generation: i64, hosts: &[&str]) -> ClusterEndpoint {
        serde_json::from_value(json!({
            "apiVersion": "sealos.io/v1beta1",
            "kind": "ClusterEndpoint",
            "metadata": {
                "name": "db", "namespace": "apps", "uid": uid, "generation": generation,
                "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}", "team": "a"}
            },
            "spec": {"ports": [{"name": "pg", "port": 5432, "hosts": hosts}]}
        }))
        .unwrap()
    }

    #[test]
    fn an_object_targets_its_own_cluster_and_keeps_its_own_annotations_to_itself() {
        let list = validate_all(
            "east",
            [&object("u1", 1, &["10.0.0.1"])],
            &mut HashMap::new(),
        );
        let def = &list.definitions[0];
        assert_eq!(
            def.source,
            Source::Object {
                cluster: "east".into()
            }
        );
        assert_eq!(def.clusters.as_deref(), Some(&["east".to_string()][..]));
        assert_eq!(def.object.as_ref().map(|o| o.uid.as_str()), Some("u1"));
        assert_eq!(def.annotations.keys().collect::<Vec<_>>(), ["team"]);
    }

    #[test]
    fn an_edit_with_problems_keeps_the_last_good_version_in_force() {
        let mut last_good = HashMap::new();
        let good = validate_all("east", [&object("u1", 1, &["10.0.0.1"])], &mut last_good);
        let bad = validate_all("east", [&object("u1", 2, &["127.0.0.1"])], &mut last_good);
        assert_eq!(bad.definitions, good.definitions);
        let state = bad.objects.values().next().unwrap();
        assert_eq!(state.info.generation, Some(2));
        let reasons: Vec<&str> = state.problems.iter().map(|p| p.reason.as_str()).collect();
        assert!(
            reasons.iter().any(|r| r.contains("stays in force")),
            "{reasons:?}"
        );
        // Fixed: the new version is taken; another object starts from scratch.
        let fixed = validate_all("east", [&object("u1", 3, &["10.0.0.2"])], &mut last_good);
        assert_eq!(
            fixed.definitions[0].ports[0].hosts,
            ["10.0.0.2".parse::<std::net::IpAddr>().unwrap()]
        );
        let other = validate_all(
            "east",
            [&object("u2", 1, &["127.0.0.1", "10.0.0.3"])],
            &mut last_good,
        );
        assert_eq!(other.definitions[0].ports[0].hosts.len(), 1);
    }
}
