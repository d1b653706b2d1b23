//! Notices of changes to the objects this daemon manages, from watches on the cluster. Someone
//! deleting or editing them is drift: the sink re-applies instead of trusting its cache.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Endpoints, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tracing::debug;

use crate::model::DefinitionKey;
use crate::render::{INSTANCE_LABEL, MANAGED_BY_LABEL, MANAGED_BY_VALUE, SERVICE_NAME_LABEL};

/// One object of ours as the cluster now has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    pub definition: DefinitionKey,
    pub kind: &'static str,
    pub name: String,
    /// `None`: the object was deleted.
    pub resource_version: Option<String>,
    /// Its labels, which tell whether it may be pruned once its definition is gone.
    pub labels: BTreeMap<String, String>,
}

/// Watches Services, Endpoints and EndpointSlices carrying our label, in every namespace, and
/// sends a notice per change. Watch errors are retried with the watcher's own backoff.
pub fn spawn(client: Client, instance: &str, notices: mpsc::Sender<Notice>) {
    tokio::spawn(watch::<Service>(
        client.clone(),
        instance.to_string(),
        notices.clone(),
    ));
    tokio::spawn(watch::<Endpoints>(
        client.clone(),
        instance.to_string(),
        notices.clone(),
    ));
    tokio::spawn(watch::<EndpointSlice>(
        client,
        instance.to_string(),
        notices,
    ));
}

async fn watch<K>(client: Client, instance: String, notices: mpsc::Sender<Notice>)
where
    K: k8s_openapi::Resource
        + Resource<DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + 'static,
{
    // An object that stops matching (its labels edited away) arrives as deleted: re-applied.
    let selector = format!("{MANAGED_BY_LABEL}={MANAGED_BY_VALUE},{INSTANCE_LABEL}={instance}");
    let config = watcher::Config::default().labels(&selector);
    let mut events = watcher::watcher(Api::<K>::all(client), config).boxed();
    while let Some(event) = events.next().await {
        let (object, deleted) = match event {
            Ok(Event::Apply(o) | Event::InitApply(o)) => (o, false),
            Ok(Event::Delete(o)) => (o, true),
            Ok(_) => continue,
            Err(e) => {
                debug!(kind = K::KIND, error = %e, "watch of managed objects failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let Some(notice) = notice_of(&object, deleted) else {
            continue;
        };
        if notices.send(notice).await.is_err() {
            return;
        }
    }
}

fn notice_of<K: k8s_openapi::Resource + Resource>(object: &K, deleted: bool) -> Option<Notice> {
    let meta = object.meta();
    let name = meta.name.clone()?;
    // A slice belongs to the Service named in its label; the other kinds share the Service name.
    let service = if K::KIND == "EndpointSlice" {
        meta.labels.as_ref()?.get(SERVICE_NAME_LABEL)?.clone()
    } else {
        name.clone()
    };
    Some(Notice {
        definition: DefinitionKey {
            namespace: meta.namespace.clone()?,
            name: service,
        },
        kind: K::KIND,
        name,
        labels: meta.labels.clone().unwrap_or_default(),
        resource_version: if deleted {
            None
        } else {
            meta.resource_version.clone()
        },
    })
}
