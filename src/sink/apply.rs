//! Writing one definition's objects into one cluster: server-side apply of what changed, pruning
//! of slices that are no longer rendered, and removal of a definition that is gone. A [`Writer`]
//! holds no per-definition state, so a sink can run several definitions' writes at once; each
//! call gets that definition's cache entry and updates it.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::core::v1::{Endpoints, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, Preconditions};
use kube::{Api, Client, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use tracing::{debug, info, instrument};

use super::cluster::{Applied, ClusterStatus, SyncError};
use crate::model::{API_VERSION, Definition, DefinitionKey, KIND};
use crate::render::{
    FIELD_MANAGER, MANAGED_BY_LABEL, MANAGED_BY_VALUE, Objects, SERVICE_NAME_LABEL,
    SLICE_CONTROLLER, SLICE_MANAGED_BY_LABEL, has_selector, other_instance, pruneable,
};

#[derive(Clone)]
pub(super) struct Writer {
    pub name: String,
    pub client: Client,
    pub instance: String,
    pub status: Arc<Mutex<ClusterStatus>>,
}

impl Writer {
    fn count_write(&self) {
        self.status.lock().unwrap_or_else(|e| e.into_inner()).writes += 1;
    }

    /// Applies what changed. `entry` is `None` the first time: then an existing Service with a
    /// selector is refused, a hand-made one is adopted, and the entry is created once something
    /// was written. A `clusterIP` the live Service cannot take (the field is immutable) has the
    /// Service recreated.
    #[instrument(skip_all, fields(cluster = %self.name, definition = %def.key))]
    pub async fn sync(
        &self,
        def: &Definition,
        objects: Objects,
        entry: &mut Option<Applied>,
    ) -> Result<Synced, SyncError> {
        let first = entry.is_none();
        let rendered_ip = objects
            .service
            .spec
            .as_ref()
            .and_then(|s| s.cluster_ip.clone());
        let cached_ip = entry.as_ref().map(|a| a.cluster_ip.clone());
        // Someone else changed the Service (its cache entry was dropped): look at it again, it
        // may have been given a selector.
        let service_changed = entry.as_ref().is_some_and(|a| {
            !(a.objects).contains_key(&(
                <Service as k8s_openapi::Resource>::KIND,
                def.key.name.clone(),
            ))
        });
        let mut synced = Synced::default();
        if first || service_changed || cached_ip != Some(rendered_ip.clone()) {
            synced = match self.prepare_service(def, &objects).await {
                Err(refused @ SyncError::SelectorConflict(_)) if !first => {
                    // The endpoints controller owns its endpoints now; slices of ours would add
                    // the external hosts to them.
                    self.prune_slices(&def.key, &BTreeSet::new(), true).await?;
                    self.release_service(&def.key).await?;
                    *entry = None;
                    return Err(refused);
                }
                other => other?,
            };
        }
        let applied = entry.get_or_insert_with(Applied::default);
        if synced.recreated {
            applied.objects.remove(&(
                <Service as k8s_openapi::Resource>::KIND,
                def.key.name.clone(),
            ));
        }
        // The live Service is prepared for this clusterIP: a retry after a failed apply does
        // not adopt or recreate again.
        applied.cluster_ip = rendered_ip;
        self.apply(&def.key, objects.service, applied).await?;
        let slice_names: BTreeSet<String> = objects
            .slices
            .iter()
            .filter_map(|s| s.metadata.name.clone())
            .collect();
        for slice in objects.slices {
            self.apply(&def.key, slice, applied).await?;
        }
        self.apply(&def.key, objects.endpoints, applied).await?;
        // The first time, slices left by an earlier run (another shape, fewer hosts) go too.
        if first || applied.slice_names != slice_names {
            self.prune_slices(&def.key, &slice_names, true).await?;
        }
        applied.slice_names = slice_names;
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .last_successful_apply = Some(SystemTime::now());
        Ok(synced)
    }

    /// Drops the ownerReference to a `ClusterEndpoint` from a Service that someone gave a
    /// selector: deleting that object must not have garbage collection take the Service too.
    /// The only write to a refused Service, and one that gives up a claim.
    async fn release_service(&self, key: &DefinitionKey) -> Result<(), SyncError> {
        let services: Api<Service> = Api::namespaced(self.client.clone(), &key.namespace);
        let Some(live) = services.get_opt(&key.name).await? else {
            return Ok(());
        };
        let owners = live.metadata.owner_references.unwrap_or_default();
        let ours = |o: &OwnerReference| o.api_version == API_VERSION && o.kind == KIND;
        if !owners.iter().any(ours) {
            return Ok(());
        }
        let kept: Vec<&OwnerReference> = owners.iter().filter(|o| !ours(o)).collect();
        // The resourceVersion makes it refuse to overwrite a concurrent change of the list.
        let patch = json!({"metadata": {
            "ownerReferences": kept,
            "resourceVersion": live.metadata.resource_version,
        }});
        services
            .patch(&key.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        self.count_write();
        info!(cluster = %self.name, definition = %key, "released a Service given a selector");
        Ok(())
    }

    /// Looks at the live Service before the first apply or a `clusterIP` change: refuses one
    /// with a selector, recreates one whose `clusterIP` cannot become the wanted one, and adopts
    /// a hand-made one so that its ports become exactly the definition's.
    async fn prepare_service(
        &self,
        def: &Definition,
        objects: &Objects,
    ) -> Result<Synced, SyncError> {
        let services: Api<Service> = Api::namespaced(self.client.clone(), &def.key.namespace);
        let Some(live) = services.get_opt(&def.key.name).await? else {
            return Ok(Synced::default());
        };
        let spec = live.spec.clone().unwrap_or_default();
        if has_selector(&live) {
            return Err(SyncError::SelectorConflict(def.key.to_string()));
        }
        if needs_recreate(spec.cluster_ip.as_deref(), def.cluster_ip.as_deref()) {
            let params = DeleteParams {
                preconditions: Some(Preconditions {
                    uid: live.metadata.uid.clone(),
                    resource_version: None,
                }),
                ..DeleteParams::default()
            };
            services.delete(&def.key.name, &params).await?;
            self.count_write();
            info!(cluster = %self.name, definition = %def.key, from = ?spec.cluster_ip, to = ?def.cluster_ip, "clusterIP cannot change in place; Service deleted to be recreated");
            return Ok(Synced {
                recreated: true,
                adopted: false,
            });
        }
        let labels = live.metadata.labels.as_ref();
        if let Some(other) = other_instance(labels, &self.instance) {
            return Err(SyncError::OtherInstance(def.key.to_string(), other.clone()));
        }
        if labels
            .and_then(|l| l.get(MANAGED_BY_LABEL))
            .is_some_and(|v| v == MANAGED_BY_VALUE)
        {
            return Ok(Synced::default());
        }
        // Apply never removes fields that another manager owns, such as the ports of a hand-made
        // Service: replace them outright, then drop every ownership record so the applies that
        // follow own exactly what they send.
        let ports = objects.service.spec.as_ref().map(|s| s.ports.clone());
        let params = PatchParams::default();
        services
            .patch(
                &def.key.name,
                &params,
                &Patch::Merge(json!({"spec": {"ports": ports}})),
            )
            .await?;
        services
            .patch(
                &def.key.name,
                &params,
                &Patch::Merge(json!({"metadata": {"managedFields": [{}]}})),
            )
            .await?;
        self.count_write();
        self.count_write();
        info!(cluster = %self.name, definition = %def.key, cluster_ip = ?spec.cluster_ip, "adopted an existing Service");
        Ok(Synced {
            recreated: false,
            adopted: true,
        })
    }

    /// Server-side apply, skipped when the rendered object equals the last one applied and the
    /// cluster has not changed it since.
    async fn apply<K>(
        &self,
        key: &DefinitionKey,
        object: K,
        applied: &mut Applied,
    ) -> Result<(), SyncError>
    where
        K: k8s_openapi::Resource
            + Resource<DynamicType = (), Scope = NamespaceResourceScope>
            + Serialize
            + DeserializeOwned
            + Clone
            + std::fmt::Debug,
    {
        let name = object.meta().name.clone().unwrap_or_default();
        let rendered = serde_json::to_value(&object)?;
        let cache_key = (K::KIND, name.clone());
        if applied
            .objects
            .get(&cache_key)
            .is_some_and(|(value, _)| *value == rendered)
        {
            return Ok(());
        }
        let api: Api<K> = Api::namespaced(self.client.clone(), &key.namespace);
        let written = api
            .patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&object),
            )
            .await?;
        debug!(kind = K::KIND, %name, "applied");
        self.count_write();
        let version = written.meta().resource_version.clone().unwrap_or_default();
        if K::KIND == <Service as k8s_openapi::Resource>::KIND {
            applied.service_uid = written.meta().uid.clone();
        }
        applied.objects.insert(cache_key, (rendered, version));
        Ok(())
    }

    /// Deletes our slices of a Service that are not in `keep`; slices from objects only when
    /// `objects_complete` (see [`pruneable`]).
    async fn prune_slices(
        &self,
        key: &DefinitionKey,
        keep: &BTreeSet<String>,
        objects_complete: bool,
    ) -> Result<(), SyncError> {
        let api: Api<EndpointSlice> = Api::namespaced(self.client.clone(), &key.namespace);
        let selector = format!(
            "{SERVICE_NAME_LABEL}={},{SLICE_MANAGED_BY_LABEL}={SLICE_CONTROLLER}",
            key.name
        );
        for slice in api.list(&ListParams::default().labels(&selector)).await? {
            let ours = pruneable(
                slice.metadata.labels.as_ref(),
                &self.instance,
                objects_complete,
            );
            let name = slice.metadata.name.unwrap_or_default();
            if ours && !keep.contains(&name) {
                api.delete(&name, &DeleteParams::default()).await?;
                info!(cluster = %self.name, definition = %key, slice = %name, "deleted stale EndpointSlice");
                self.count_write();
            }
        }
        Ok(())
    }

    /// Deletes what this daemon wrote for a definition that is gone (or no longer targets this
    /// cluster, or is an orphan found in the cluster).
    pub async fn remove(
        &self,
        key: &DefinitionKey,
        objects_complete: bool,
    ) -> Result<(), SyncError> {
        // A Service given a selector belongs to someone else now, with its Endpoints, whatever
        // labels of ours it still carries: only our slices go.
        let services: Api<Service> = Api::namespaced(self.client.clone(), &key.namespace);
        let live = services.get_opt(&key.name).await?;
        if !live.as_ref().is_some_and(has_selector) {
            self.delete_fetched_if_ours(&services, live, objects_complete)
                .await?;
            let endpoints: Api<Endpoints> = Api::namespaced(self.client.clone(), &key.namespace);
            let live = endpoints.get_opt(&key.name).await?;
            self.delete_fetched_if_ours(&endpoints, live, objects_complete)
                .await?;
        }
        self.prune_slices(key, &BTreeSet::new(), objects_complete)
            .await?;
        info!(cluster = %self.name, definition = %key, "removed objects of a deleted definition");
        Ok(())
    }

    /// Deletes `existing` (as fetched through `api`) if it carries this instance's labels.
    async fn delete_fetched_if_ours<K>(
        &self,
        api: &Api<K>,
        existing: Option<K>,
        objects_complete: bool,
    ) -> Result<(), SyncError>
    where
        K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
    {
        let Some(existing) = existing else {
            return Ok(());
        };
        let labels = existing.meta().labels.as_ref();
        if pruneable(labels, &self.instance, objects_complete) {
            let name = existing.meta().name.clone().unwrap_or_default();
            api.delete(&name, &DeleteParams::default()).await?;
            self.count_write();
        }
        Ok(())
    }
}

/// What a sync did besides applying.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Synced {
    /// The Service was deleted because its `clusterIP` could not change in place.
    pub recreated: bool,
    /// A Service made by someone else was taken over.
    pub adopted: bool,
}

/// Whether a live Service's `clusterIP` cannot become the wanted one without recreating it.
/// `None` wanted: any allocated address will do, but not headless.
fn needs_recreate(live: Option<&str>, wanted: Option<&str>) -> bool {
    let live = live.filter(|ip| !ip.is_empty());
    match (wanted, live) {
        (_, None) => false,
        (None, Some(live)) => live == "None",
        (Some(wanted), Some(live)) => wanted != live,
    }
}

#[cfg(test)]
mod tests {
    use super::needs_recreate;

    #[test]
    fn only_a_clusterip_that_cannot_change_in_place_recreates_the_service() {
        let cases = [
            (Some("10.96.0.5"), None, false),
            (Some("None"), None, true),
            (Some("10.96.0.5"), Some("None"), true),
            (Some("None"), Some("None"), false),
            (Some("10.96.0.5"), Some("10.96.0.5"), false),
            (Some("10.96.0.5"), Some("10.96.0.9"), true),
            (None, Some("None"), false),
            (Some(""), Some("None"), false),
        ];
        for (live, wanted, recreate) in cases {
            assert_eq!(
                needs_recreate(live, wanted),
                recreate,
                "{live:?} -> {wanted:?}"
            );
        }
    }
}
