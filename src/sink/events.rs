//! Kubernetes Events, so `kubectl describe svc` (and `describe cep`) tell why a host vanished or
//! a sync failed. Publishing runs in the background: an Event is never worth delaying a write.

use k8s_openapi::Resource;
use k8s_openapi::api::core::v1::{ObjectReference, Service};
use kube::Client;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use tracing::debug;

use crate::model::{API_VERSION, DefinitionKey, KIND};

#[derive(Clone)]
pub struct Events {
    recorder: Recorder,
}

/// What an Event is about, with its uid: `kubectl describe` matches Events by it.
pub enum Regarding<'a> {
    Service(&'a DefinitionKey, &'a str),
    Object(&'a DefinitionKey, &'a str),
}

impl Events {
    pub fn new(client: Client, instance: &str) -> Self {
        let reporter = Reporter {
            controller: crate::render::FIELD_MANAGER.into(),
            instance: Some(instance.into()),
        };
        Events {
            recorder: Recorder::new(client, reporter),
        }
    }

    /// `reason` is a short PascalCase word, `note` the sentence a person reads.
    pub fn publish(&self, regarding: Regarding<'_>, warning: bool, reason: &str, note: String) {
        let (api_version, kind, key, uid) = match regarding {
            Regarding::Service(key, uid) => (Service::API_VERSION, Service::KIND, key, uid),
            Regarding::Object(key, uid) => (API_VERSION, KIND, key, uid),
        };
        let reference = ObjectReference {
            api_version: Some(api_version.into()),
            kind: Some(kind.into()),
            namespace: Some(key.namespace.clone()),
            name: Some(key.name.clone()),
            uid: Some(uid.into()),
            ..Default::default()
        };
        let event = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.into(),
            note: Some(note.chars().take(1024).collect()),
            action: reason.into(),
            secondary: None,
        };
        let recorder = self.recorder.clone();
        tokio::spawn(async move {
            if let Err(e) = recorder.publish(&event, &reference).await {
                debug!(error = %e, "cannot publish an Event");
            }
        });
    }
}
