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
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, Client, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::{debug, info, instrument};

use super::cluster::{Applied, ClusterStatus, SyncError};
use crate::model::{Definition, DefinitionKey};
use crate::render::{
    FIELD_MANAGER, Objects, SERVICE_NAME_LABEL, SLICE_CONTROLLER, SLICE_MANAGED_BY_LABEL, pruneable,
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
    /// selector is refused, and the entry is created once something was written.
    #[instrument(skip_all, fields(cluster = %self.name, definition = %def.key))]
    pub async fn sync(
        &self,
        def: &Definition,
        objects: Objects,
        entry: &mut Option<Applied>,
    ) -> Result<(), SyncError> {
        let first = entry.is_none();
        if first {
            let services: Api<Service> = Api::namespaced(self.client.clone(), &def.key.namespace);
            if let Some(existing) = services.get_opt(&def.key.name).await?
                && existing
                    .spec
                    .as_ref()
                    .and_then(|s| s.selector.as_ref())
                    .is_some_and(|s| !s.is_empty())
            {
                return Err(SyncError::SelectorConflict(def.key.to_string()));
            }
        }
        let applied = entry.get_or_insert_with(Applied::default);
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
            self.prune_slices(&def.key, &slice_names).await?;
        }
        applied.slice_names = slice_names;
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .last_successful_apply = Some(SystemTime::now());
        Ok(())
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
        applied.objects.insert(cache_key, (rendered, version));
        Ok(())
    }

    async fn prune_slices(
        &self,
        key: &DefinitionKey,
        keep: &BTreeSet<String>,
    ) -> Result<(), SyncError> {
        let api: Api<EndpointSlice> = Api::namespaced(self.client.clone(), &key.namespace);
        let selector = format!(
            "{SERVICE_NAME_LABEL}={},{SLICE_MANAGED_BY_LABEL}={SLICE_CONTROLLER}",
            key.name
        );
        for slice in api.list(&ListParams::default().labels(&selector)).await? {
            let ours = pruneable(slice.metadata.labels.as_ref(), &self.instance);
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
    pub async fn remove(&self, key: &DefinitionKey) -> Result<(), SyncError> {
        self.delete_if_ours::<Service>(key).await?;
        self.delete_if_ours::<Endpoints>(key).await?;
        self.prune_slices(key, &BTreeSet::new()).await?;
        info!(cluster = %self.name, definition = %key, "removed objects of a deleted definition");
        Ok(())
    }

    async fn delete_if_ours<K>(&self, key: &DefinitionKey) -> Result<(), SyncError>
    where
        K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
            + Clone
            + DeserializeOwned
            + std::fmt::Debug,
    {
        let api: Api<K> = Api::namespaced(self.client.clone(), &key.namespace);
        let Some(existing) = api.get_opt(&key.name).await? else {
            return Ok(());
        };
        if pruneable(existing.meta().labels.as_ref(), &self.instance) {
            api.delete(&key.name, &DeleteParams::default()).await?;
            self.count_write();
        }
        Ok(())
    }
}
