//! Waiting on the API server by watching, not by sleeping: a predicate is checked against the
//! current set of matching objects after every watch event, until it holds or time runs out.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::time::Duration;

use anyhow::{Result, bail};
use futures::StreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Resource};
use serde::de::DeserializeOwned;

/// Returns the objects (by name) once `done` holds for them.
pub async fn until<K, F>(
    api: Api<K>,
    labels: &str,
    timeout: Duration,
    mut done: F,
) -> Result<BTreeMap<String, K>>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    F: FnMut(&BTreeMap<String, K>) -> bool,
{
    let config = watcher::Config::default().labels(labels);
    let mut stream = watcher::watcher(api, config).boxed();
    let mut objects = BTreeMap::new();
    let mut building = BTreeMap::new();
    let mut synced = false;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let event = match tokio::time::timeout_at(deadline, stream.next()).await {
            Ok(Some(event)) => event?,
            Ok(None) => bail!("watch ended"),
            Err(_) => bail!(
                "condition not met within {timeout:?}; last seen: {:#?}",
                objects.keys().collect::<Vec<_>>()
            ),
        };
        match event {
            Event::Init => building.clear(),
            Event::InitApply(o) => {
                building.insert(o.meta().name.clone().unwrap_or_default(), o);
            }
            Event::InitDone => {
                objects = std::mem::take(&mut building);
                synced = true;
            }
            Event::Apply(o) => {
                objects.insert(o.meta().name.clone().unwrap_or_default(), o);
            }
            Event::Delete(o) => {
                objects.remove(&o.meta().name.clone().unwrap_or_default());
            }
        }
        if synced && done(&objects) {
            return Ok(objects);
        }
    }
}

/// Watches for `during` and fails as soon as `bad` holds for the objects.
pub async fn never<K, F>(api: Api<K>, labels: &str, during: Duration, mut bad: F) -> Result<()>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    F: FnMut(&BTreeMap<String, K>) -> bool,
{
    match until(api, labels, during, |objects| bad(objects)).await {
        Ok(objects) => bail!("the condition held: {objects:#?}"),
        Err(e) if e.to_string().starts_with("condition not met") => Ok(()),
        Err(e) => Err(e),
    }
}
