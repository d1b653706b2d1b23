//! `plan`: what `run` would create, update and delete in each cluster, shown as a diff, while
//! changing nothing. It follows `run`'s own paths: the same definitions and problems, rendering
//! with the readiness the cluster shows now (as `run` trusts on start; new hosts appear not
//! ready), the selector-conflict rule, server-side apply (as a dry run, compared with the live
//! object) and the same pruning of stale slices and of objects whose definition is gone.

use std::collections::{BTreeSet, HashSet};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use k8s_openapi::Resource as _;
use k8s_openapi::api::core::v1::{Endpoints, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{ApiResource, DynamicObject, ListParams, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, ResourceExt};
use serde_json::Value;

use crate::config::{self, ClusterConfig, Overrides};
use crate::model::{Definition, DefinitionKey, unknown_clusters};
use crate::probe::ServiceHost;
use crate::render::{self, FIELD_MANAGER, MANAGED_BY_LABEL, MANAGED_BY_VALUE, SERVICE_NAME_LABEL};
use crate::render::{SLICE_CONTROLLER, SLICE_MANAGED_BY_LABEL, pruneable};
use crate::sink::{connect, ready_hosts};
use crate::sources::files;

/// Metadata the API server keeps up by itself: never a change `run` makes.
const SERVER_MANAGED: &[&str] = &["resourceVersion", "managedFields", "generation", "uid"];
const CREATED: &str = "creationTimestamp";
/// Values longer than this many characters are cut (with `…`) in the diff.
const SHOWN_CHARS: usize = 100;
const CONFLICT: &str = "has a selector; left untouched";

/// Prints the plan of every configured cluster. Exit 1 on problems in the config or the
/// definitions, or when a cluster cannot be planned; 0 otherwise, with changes or not.
pub fn run(config_path: Option<&Path>) -> ExitCode {
    let config = config::load(config_path, &Overrides::default());
    let Ok(config) = config.inspect_err(|e| eprintln!("error: {e}")) else {
        return ExitCode::FAILURE;
    };
    let clusters = config.target_clusters();
    let names: Vec<String> = clusters.iter().map(|c| c.name.clone()).collect();
    if config.sources.crd {
        eprintln!("note: ClusterEndpoint objects (sources.crd) are not planned; only files are");
    }
    let mut loaded = files::load(&config.sources.paths);
    let unknown = unknown_clusters(loaded.definitions.values(), &names);
    loaded.problems.extend(unknown);
    for problem in &loaded.problems {
        eprintln!("error: {problem}");
    }
    let mut failed = !loaded.problems.is_empty();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    for cluster in &clusters {
        let planned = runtime.block_on(plan(cluster, &config.instance, &loaded));
        let url = runtime.block_on(server_url(cluster));
        let heading = format!("cluster {}{}", cluster.name, url.unwrap_or_default());
        match planned {
            Ok(plan) => {
                println!("{heading}:");
                plan.lines.iter().for_each(|line| println!("  {line}"));
                println!("  {} unchanged", plan.unchanged);
            }
            Err(e) => {
                println!("{heading}: not planned");
                eprintln!("error: cluster {}: {e:#}", cluster.name);
                failed = true;
            }
        }
    }
    ExitCode::from(u8::from(failed))
}

/// ` (https://…)`: a cluster's API server for the heading, resolved like `sink::connect` does.
async fn server_url(cluster: &ClusterConfig) -> Option<String> {
    let mut options = KubeConfigOptions::default();
    options.context.clone_from(&cluster.context);
    let config = match &cluster.kubeconfig {
        None if cluster.context.is_none() => kube::Config::infer().await.ok()?,
        None => kube::Config::from_kubeconfig(&options).await.ok()?,
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path).ok()?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &options)
                .await
                .ok()?
        }
    };
    Some(format!(" ({})", config.cluster_url))
}

/// An object `run` deletes once its definition is gone (or stale, for a slice): labelled with
/// this instance, and for a slice also with our controller.
struct Deletable {
    kind: String,
    name: String,
    /// Namespace and Service name (for a slice, its `kubernetes.io/service-name` label).
    definition: DefinitionKey,
}

/// One cluster's plan: one line per change (diffs indented below), and what is there now.
#[derive(Default)]
struct Plan {
    lines: Vec<String>,
    unchanged: usize,
    deletable: Vec<Deletable>,
    /// Hosts the cluster shows ready.
    ready: HashSet<ServiceHost>,
}

async fn plan(cluster: &ClusterConfig, instance: &str, loaded: &files::Loaded) -> Result<Plan> {
    let definitions = &loaded.definitions;
    let client = connect(cluster).await?;
    let mut plan = Plan::default();
    // Everything labelled ours, as the daemon's watches see it.
    let ours = ListParams::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY_VALUE}"));
    for kind in kinds() {
        let api = Api::<DynamicObject>::all_with(client.clone(), &kind);
        for object in api.list(&ours).await? {
            plan.deletable
                .extend(deletable(&object, &kind.kind, instance));
        }
    }
    plan.ready
        .extend(ready_hosts(client.clone(), Duration::from_secs(5)).await);
    let targeted = definitions.values().filter(|d| d.targets(&cluster.name));
    let targeted: Vec<&Definition> = targeted.collect();
    for def in &targeted {
        plan.sync(&client, instance, def).await?;
    }
    // Orphans: objects of ours whose definition is gone or no longer targets this cluster (not
    // those of a definition that is there but unusable: `run` leaves them as they are).
    let wanted: BTreeSet<&DefinitionKey> = targeted.iter().map(|d| &d.key).collect();
    let orphans: BTreeSet<DefinitionKey> = (plan.deletable.iter())
        .map(|d| d.definition.clone())
        .filter(|key| !wanted.contains(key) && !loaded.unusable.holds(key, true))
        .collect();
    for orphan in &orphans {
        plan.delete(orphan, |_| true);
    }
    Ok(plan)
}

impl Plan {
    async fn sync(&mut self, client: &Client, instance: &str, def: &Definition) -> Result<()> {
        let services: Api<Service> = Api::namespaced(client.clone(), &def.key.namespace);
        let existing = services.get_opt(&def.key.name).await?;
        if existing.as_ref().is_some_and(render::has_selector) {
            let conflict = format!("! conflict Service {}: {CONFLICT}", def.key);
            self.lines.push(conflict);
            return Ok(());
        }
        let labels = existing.as_ref().and_then(|s| s.metadata.labels.as_ref());
        if let Some(other) = render::other_instance(labels, instance) {
            let conflict = format!(
                "! conflict Service {}: managed by instance {other:?}; left untouched",
                def.key
            );
            self.lines.push(conflict);
            return Ok(());
        }
        let objects = render::render(def, instance, None, |port, host| {
            let target = (def.key.clone(), port.name.clone(), host);
            self.ready.contains(&target)
        });
        let [service, slice, endpoints] = kinds();
        let mut rendered = vec![(service, serde_json::to_value(&objects.service)?)];
        for s in &objects.slices {
            rendered.push((slice.clone(), serde_json::to_value(s)?));
        }
        rendered.push((endpoints, serde_json::to_value(&objects.endpoints)?));
        for object in &rendered {
            // Like `run`, an apply the API refuses ends this definition's sync there.
            if !self.compare(client, object).await? {
                return Ok(());
            }
        }
        // Of a definition it keeps, `run` deletes only the slices it no longer renders.
        let keep: BTreeSet<String> = objects.slices.iter().map(|s| s.name_any()).collect();
        let stale = |d: &Deletable| d.kind == EndpointSlice::KIND && !keep.contains(&d.name);
        self.delete(&def.key, stale);
        Ok(())
    }

    /// Dry-run server-side apply of a rendered object, compared with the live object.
    /// `Ok(false)`: the API refused the apply (recorded as an error line).
    async fn compare(
        &mut self,
        client: &Client,
        (kind, object): &(ApiResource, Value),
    ) -> kube::Result<bool> {
        let meta = &object["metadata"];
        let (ns, name) = (meta["namespace"].as_str(), meta["name"].as_str());
        let (ns, name) = (ns.unwrap_or_default(), name.unwrap_or_default());
        let what = format!("{} {ns}/{name}", kind.kind);
        let api = Api::<DynamicObject>::namespaced_with(client.clone(), ns, kind);
        let live = api.get_opt(name).await?;
        let params = PatchParams::apply(FIELD_MANAGER).force().dry_run();
        let answer = match api.patch(name, &params, &Patch::Apply(object)).await {
            Ok(answer) => answer,
            Err(kube::Error::Api(status)) => {
                let line = format!("! error {what}: {}", status.message);
                self.lines.push(line);
                return Ok(false);
            }
            Err(e) => return Err(e),
        };
        let changes = match live {
            None => {
                self.lines.push(format!("+ create {what}"));
                return Ok(true);
            }
            Some(live) => diff(&comparable(&live), &comparable(&answer)),
        };
        if changes.is_empty() {
            self.unchanged += 1;
        } else {
            self.lines.push(format!("~ update {what}"));
            self.lines
                .extend(changes.into_iter().map(|c| format!("    {c}")));
        }
        Ok(true)
    }

    /// `run`'s deletions among a definition's deletable objects: those that `pick` selects.
    fn delete(&mut self, key: &DefinitionKey, pick: impl Fn(&Deletable) -> bool) {
        for d in &self.deletable {
            if d.definition == *key && pick(d) {
                let line = format!("- delete {} {}/{}", d.kind, key.namespace, d.name);
                self.lines.push(line);
            }
        }
    }
}

/// The kinds `run` writes, in its order.
fn kinds() -> [ApiResource; 3] {
    let service = ApiResource::erase::<Service>(&());
    let slice = ApiResource::erase::<EndpointSlice>(&());
    [service, slice, ApiResource::erase::<Endpoints>(&())]
}

fn deletable(object: &DynamicObject, kind: &str, instance: &str) -> Option<Deletable> {
    let labels = object.metadata.labels.as_ref();
    let label = |key: &str| labels.and_then(|l| l.get(key)).cloned();
    let slice = kind == EndpointSlice::KIND;
    let controller = !slice || label(SLICE_MANAGED_BY_LABEL).as_deref() == Some(SLICE_CONTROLLER);
    if !(controller && pruneable(labels, instance, false)) {
        return None;
    }
    let service = if slice {
        label(SERVICE_NAME_LABEL)?
    } else {
        object.name_any()
    };
    let definition = DefinitionKey {
        namespace: object.namespace()?,
        name: service,
    };
    let (kind, name) = (kind.to_string(), object.name_any());
    Some(Deletable {
        kind,
        name,
        definition,
    })
}

/// An object as JSON without the metadata the API server maintains.
fn comparable(object: &DynamicObject) -> Value {
    let mut value = serde_json::to_value(object).unwrap_or(Value::Null);
    if let Some(meta) = value.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.retain(|key, _| !SERVER_MANAGED.contains(&key.as_str()) && key != CREATED);
    }
    value
}

/// Every leaf where `old` and `new` differ, as `path: old → new` lines in path order: objects
/// key by key, arrays index by index (extra elements show as added or removed).
pub fn diff(old: &Value, new: &Value) -> Vec<String> {
    let mut out = Vec::new();
    walk(String::new(), Some(old), Some(new), &mut out);
    out
}

fn walk(path: String, old: Option<&Value>, new: Option<&Value>, out: &mut Vec<String>) {
    match (old, new) {
        (Some(Value::Object(a)), Some(Value::Object(b))) => {
            let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for k in keys {
                walk(join(&path, k), a.get(k), b.get(k), out);
            }
        }
        (Some(Value::Array(a)), Some(Value::Array(b))) => {
            for i in 0..a.len().max(b.len()) {
                walk(format!("{path}[{i}]"), a.get(i), b.get(i), out);
            }
        }
        (a, b) if a != b => out.push(format!("{path}: {} → {}", short(a), short(b))),
        _ => {}
    }
}

/// `a.b` for plain keys, `a["app.kubernetes.io/name"]` for keys with other characters.
fn join(path: &str, key: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
    if key.is_empty() || !key.chars().all(plain) {
        format!("{path}[{}]", Value::from(key))
    } else if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// Compact JSON cut to [`SHOWN_CHARS`] characters, or `(absent)`.
fn short(value: Option<&Value>) -> String {
    let text = value.map_or("(absent)".into(), Value::to_string);
    if text.chars().count() <= SHOWN_CHARS {
        return text;
    }
    let cut: String = text.chars().take(SHOWN_CHARS - 1).collect();
    format!("{cut}…")
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn lines(old: Value, new: Value) -> Vec<String> {
        diff(&old, &new)
    }

    #[test]
    fn equal_values_have_no_changes() {
        let v = json!({"a": [1, {"b": null}], "c": "x"});
        assert!(diff(&v, &v.clone()).is_empty());
    }

    #[test]
    fn nested_changes_name_their_path() {
        assert_eq!(
            lines(
                json!({"spec": {"ports": [{"port": 80, "name": "http"}]}}),
                json!({"spec": {"ports": [{"port": 8080, "name": "http"}]}})
            ),
            ["spec.ports[0].port: 80 → 8080"]
        );
    }

    #[test]
    fn added_and_removed_keys_and_elements_show_as_absent() {
        assert_eq!(
            lines(
                json!({"gone": 1, "list": ["a"]}),
                json!({"new": true, "list": ["a", {"addresses": ["10.0.0.3"]}]})
            ),
            [
                "gone: 1 → (absent)",
                "list[1]: (absent) → {\"addresses\":[\"10.0.0.3\"]}",
                "new: (absent) → true"
            ]
        );
        assert_eq!(lines(json!([1, 2]), json!([1])), ["[1]: 2 → (absent)"]);
    }

    #[test]
    fn keys_with_dots_or_slashes_are_quoted() {
        assert_eq!(
            lines(
                json!({"metadata": {"labels": {"app.kubernetes.io/managed-by": "x"}}}),
                json!({"metadata": {"labels": {"app.kubernetes.io/managed-by": "y"}}})
            ),
            [r#"metadata.labels["app.kubernetes.io/managed-by"]: "x" → "y""#]
        );
    }

    #[test]
    fn a_change_of_type_is_one_change_at_that_path() {
        assert_eq!(
            lines(json!({"a": {"b": 1}}), json!({"a": [1]})),
            [r#"a: {"b":1} → [1]"#]
        );
    }

    #[test]
    fn long_values_are_cut() {
        let long = "x".repeat(300);
        let shown = lines(json!({"a": null}), json!({"a": long})).remove(0);
        assert!(shown.ends_with('…'), "{shown}");
        assert_eq!(
            shown.chars().count(),
            "a: null → ".chars().count() + SHOWN_CHARS
        );
    }

    #[test]
    fn server_managed_metadata_is_ignored() {
        let mut live = DynamicObject::new("web", &ApiResource::erase::<Service>(&()));
        live.metadata.resource_version = Some("7".into());
        live.metadata.uid = Some("u".into());
        let mut answer = live.clone();
        answer.metadata.resource_version = Some("8".into());
        answer.metadata.generation = Some(2);
        assert!(diff(&comparable(&live), &comparable(&answer)).is_empty());
        answer.metadata.labels = Some([("a".to_string(), "b".to_string())].into());
        assert_eq!(
            diff(&comparable(&live), &comparable(&answer)),
            [r#"metadata.labels: (absent) → {"a":"b"}"#]
        );
    }
}
