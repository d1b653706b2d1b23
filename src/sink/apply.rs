//! Writing one definition's objects into one cluster: server-side apply of what changed, pruning
//! of slices that are no longer rendered, and removal of a definition that is gone.

use std::collections::BTreeSet;
use std::time::SystemTime;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::core::v1::{Endpoints, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::{debug, info, instrument};

use super::cluster::{ClusterSink, SyncError};
use crate::model::{Definition, DefinitionKey};
use crate::probe::TargetKey;
use crate::probe::state::Readiness;
use crate::render::{
    self, FIELD_MANAGER, SERVICE_NAME_LABEL, SLICE_CONTROLLER, SLICE_MANAGED_BY_LABEL, pruneable,
};

impl ClusterSink {
    #[instrument(skip_all, fields(cluster = %self.name, definition = %def.key))]
    pub(super) async fn sync(&mut self, def: &Definition) -> Result<(), SyncError> {
        let board = self.board.clone();
        let objects = render::render(def, &self.instance, |port, host| {
            let key = TargetKey {
                definition: def.key.clone(),
                port: port.name.clone(),
                host,
            };
            board.readiness(&key) == Readiness::Ready
        });
        if !self.applied.contains_key(&def.key) {
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
        self.apply(def, objects.service).await?;
        let slice_names: BTreeSet<String> = objects
            .slices
            .iter()
            .filter_map(|s| s.metadata.name.clone())
            .collect();
        for slice in objects.slices {
            self.apply(def, slice).await?;
        }
        self.apply(def, objects.endpoints).await?;
        let previous = self.applied.get(&def.key).map(|a| a.slice_names.clone());
        if previous.as_ref() != Some(&slice_names) {
            self.prune_slices(&def.key, &slice_names).await?;
        }
        self.applied.entry(def.key.clone()).or_default().slice_names = slice_names;
        self.update_status(|s| s.last_successful_apply = Some(SystemTime::now()));
        Ok(())
    }

    /// Server-side apply, skipped when the rendered object equals the last one applied and the
    /// cluster has not changed it since.
    async fn apply<K>(&mut self, def: &Definition, object: K) -> Result<(), SyncError>
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
        let cached = self
            .applied
            .get(&def.key)
            .and_then(|a| a.objects.get(&cache_key));
        if cached.is_some_and(|(value, _)| *value == rendered) {
            return Ok(());
        }
        let api: Api<K> = Api::namespaced(self.client.clone(), &def.key.namespace);
        let written = api
            .patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&object),
            )
            .await?;
        debug!(kind = K::KIND, %name, "applied");
        self.update_status(|s| s.writes += 1);
        let version = written.meta().resource_version.clone().unwrap_or_default();
        self.applied
            .entry(def.key.clone())
            .or_default()
            .objects
            .insert(cache_key, (rendered, version));
        Ok(())
    }

    async fn prune_slices(
        &mut self,
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
                self.update_status(|s| s.writes += 1);
            }
        }
        Ok(())
    }

    /// Deletes what this daemon applied for a definition that is gone (or no longer targets us).
    pub(super) async fn remove(&mut self, key: &DefinitionKey) -> Result<(), SyncError> {
        if self.applied.contains_key(key) || self.orphans.contains(key) {
            self.delete_if_ours::<Service>(key).await?;
            self.delete_if_ours::<Endpoints>(key).await?;
            self.prune_slices(key, &BTreeSet::new()).await?;
            info!(cluster = %self.name, definition = %key, "removed objects of a deleted definition");
        }
        self.applied.remove(key);
        self.orphans.remove(key);
        Ok(())
    }

    async fn delete_if_ours<K>(&mut self, key: &DefinitionKey) -> Result<(), SyncError>
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
        let ours = pruneable(existing.meta().labels.as_ref(), &self.instance);
        if ours {
            api.delete(&key.name, &DeleteParams::default()).await?;
            self.update_status(|s| s.writes += 1);
        }
        Ok(())
    }
}
