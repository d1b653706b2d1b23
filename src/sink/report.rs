//! What a sink tells people besides the objects it writes: Events on the Service (and the
//! `ClusterEndpoint`) when hosts change or a Service is recreated or adopted, and the status of
//! each `ClusterEndpoint` in its cluster, written only when it changes.

use std::collections::BTreeMap;
use std::net::IpAddr;

use futures::StreamExt;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use tracing::warn;

use super::apply::Synced;
use super::cluster::{Applied, ClusterSink, Outcome, WRITES_IN_FLIGHT};
use super::events::Regarding;
use super::object_status::{Inputs, Standing, status_of};
use crate::model::crd::{ClusterEndpoint, ClusterEndpointStatus, condition};
use crate::model::{Definition, DefinitionId, DefinitionKey, Desired};
use crate::probe::TargetKey;
use crate::render::FIELD_MANAGER;

impl ClusterSink {
    /// Logs and posts Events for what a successful sync changed: hosts that turned ready or not
    /// ready since the last apply (none on the first one), a recreated or adopted Service.
    pub(super) fn announce(
        &self,
        def: &Definition,
        entry: &mut Applied,
        published: BTreeMap<(String, IpAddr), bool>,
        synced: Synced,
    ) {
        let owner = def
            .object
            .as_ref()
            .filter(|_| def.source == self.local_source());
        let service_uid = entry.service_uid.clone().unwrap_or_default();
        let post = |warning: bool, reason: &str, note: String| {
            self.events.publish(
                Regarding::Service(&def.key, &service_uid),
                warning,
                reason,
                note.clone(),
            );
            if let Some(object) = owner {
                self.events.publish(
                    Regarding::Object(&def.key, &object.uid),
                    warning,
                    reason,
                    note,
                );
            }
        };
        if synced.recreated {
            let note = format!(
                "Service recreated: its clusterIP cannot change in place (now {})",
                def.cluster_ip.as_deref().unwrap_or("allocated")
            );
            post(false, "Recreated", note);
        }
        if synced.adopted {
            post(false, "Adopted", "existing Service taken over".into());
        }
        for ((port, host), ready) in &published {
            let before = entry.published.get(&(port.clone(), *host));
            if before.is_none_or(|b| b == ready) {
                continue;
            }
            let target = TargetKey {
                definition: def.id(),
                port: port.clone(),
                host: *host,
            };
            let at = def
                .ports
                .iter()
                .find(|p| p.name == *port)
                .map_or(0, |p| p.target_port);
            let port_name = if port.is_empty() {
                String::new()
            } else {
                format!(" (port {port})")
            };
            if *ready {
                post(
                    false,
                    "HostReady",
                    format!("{host}:{at}{port_name} is ready"),
                );
            } else {
                let why = self
                    .board
                    .health(&target)
                    .and_then(|h| h.last_error)
                    .unwrap_or_else(|| "probe failed".into());
                post(
                    true,
                    "HostNotReady",
                    format!("{host}:{at}{port_name} is not ready: {why}"),
                );
            }
        }
        entry.published = published;
    }

    /// Computes the status of each `ClusterEndpoint` of this cluster among `outcomes` and
    /// writes those that changed, with Events for a conflict, a refusal, an invalid spec or a
    /// failed sync when it begins.
    pub(super) async fn write_statuses(
        &mut self,
        snapshot: &Desired,
        outcomes: BTreeMap<DefinitionKey, Outcome>,
    ) {
        let mut writes = Vec::new();
        for (key, outcome) in outcomes {
            let id = DefinitionId {
                key: key.clone(),
                source: self.local_source(),
            };
            let Some(object) = snapshot.objects.get(&id) else {
                continue;
            };
            let definition = snapshot.definitions.get(&id);
            let winner = snapshot.winner(&self.name, &key);
            let standing = match (winner, outcome) {
                (Some(w), _) if w.id() != id => Standing::Overridden(w.origin.clone()),
                (_, Outcome::Waiting) => Standing::Waiting,
                (_, Outcome::Refused(reason)) => Standing::Refused(reason),
                (
                    _,
                    Outcome::Applied {
                        service,
                        endpoints,
                        error,
                    },
                ) => Standing::Applied {
                    service,
                    endpoints,
                    error,
                },
                (_, Outcome::Nothing) => Standing::Waiting,
            };
            let inputs = Inputs {
                generation: object.info.generation,
                definition,
                problems: &object.problems,
                standing,
            };
            let uid = &object.info.uid;
            let cached = (self.statuses.get(&key)).filter(|(of, _)| of == uid);
            let previous = cached.map(|(_, status)| status).or(object.status.as_ref());
            // Objects applied before (by an earlier run, say) are not "waiting" again.
            let applied_before = previous.is_some_and(|p| {
                p.conditions
                    .iter()
                    .any(|c| c.type_ == condition::SYNC_SERVICE_READY && c.status == "True")
            });
            if inputs.standing == Standing::Waiting && applied_before && definition.is_some() {
                continue;
            }
            let status = status_of(
                &inputs,
                |port, host| {
                    self.board.health(&TargetKey {
                        definition: id.clone(),
                        port: port.name.clone(),
                        host,
                    })
                },
                previous,
            );
            if previous == Some(&status) {
                continue;
            }
            self.announce_status(&key, uid, previous, &status);
            writes.push((key, uid.clone(), status));
        }
        let client = self.writer.client.clone();
        let written: Vec<_> = futures::stream::iter(writes)
            .map(|(key, uid, status)| {
                let client = client.clone();
                async move {
                    let result = write_status(client, &key, &status).await;
                    (key, uid, status, result)
                }
            })
            .buffer_unordered(WRITES_IN_FLIGHT)
            .collect()
            .await;
        for (key, uid, status, result) in written {
            match result {
                Ok(()) => {
                    self.update_status(|s| s.writes += 1);
                    self.statuses.insert(key, (uid, status));
                }
                // Not cached, so the next pass for this key tries again.
                Err(e) => {
                    warn!(cluster = %self.name, object = %key, error = %e, "cannot write ClusterEndpoint status")
                }
            }
        }
    }

    /// Events on the object for the start of a conflict, a refusal, an invalid spec or a
    /// failed sync (each once, when its condition turns to that reason).
    fn announce_status(
        &self,
        key: &DefinitionKey,
        uid: &str,
        previous: Option<&ClusterEndpointStatus>,
        status: &ClusterEndpointStatus,
    ) {
        let reason_of = |s: Option<&ClusterEndpointStatus>, type_: &str| {
            s.and_then(|s| s.conditions.iter().find(|c| c.type_ == type_))
                .map(|c| (c.reason.clone(), c.message.clone()))
        };
        for type_ in [condition::INITIALIZED, condition::SYNC_SERVICE_READY] {
            let Some((reason, message)) = reason_of(Some(status), type_) else {
                continue;
            };
            let warn = matches!(
                reason.as_str(),
                "InvalidSpec" | "Conflict" | "Refused" | "SyncFailed"
            );
            if warn && reason_of(previous, type_) != Some((reason.clone(), message.clone())) {
                self.events
                    .publish(Regarding::Object(key, uid), true, &reason, message);
            }
        }
    }
}

/// Writes a `ClusterEndpoint`'s status by server-side apply: fields it no longer has go.
async fn write_status(
    client: Client,
    key: &DefinitionKey,
    status: &ClusterEndpointStatus,
) -> Result<(), kube::Error> {
    let api: Api<ClusterEndpoint> = Api::namespaced(client, &key.namespace);
    let patch = serde_json::json!({
        "apiVersion": crate::model::API_VERSION,
        "kind": crate::model::KIND,
        "status": status,
    });
    let params = PatchParams::apply(FIELD_MANAGER).force();
    api.patch_status(&key.name, &params, &Patch::Apply(&patch))
        .await
        .map(drop)
}
