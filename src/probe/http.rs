//! HTTP(S) GET with kubelet semantics: 200–399 is success; a redirect to the same host is
//! followed (at most 10), a redirect elsewhere counts as success unfollowed; at most 10 KiB of
//! body is read; TLS is not verified unless asked for; no proxy; no connection is kept after the probe.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use reqwest::redirect::{Attempt, Policy};

use super::{Failure, tls};
use crate::model::HttpCheck;

const MAX_BODY: usize = 10 * 1024;
const MAX_REDIRECTS: usize = 10;
const USER_AGENT: &str = concat!("endpoints-operator-probe/", env!("CARGO_PKG_VERSION"));

fn redirect_policy(attempt: Attempt) -> reqwest::redirect::Action {
    let same_host =
        attempt.previous().first().map(|first| first.host_str()) == Some(attempt.url().host_str());
    if attempt.previous().len() > MAX_REDIRECTS {
        attempt.error("too many redirects")
    } else if same_host {
        attempt.follow()
    } else {
        attempt.stop()
    }
}

/// One client per TLS setting (usually just one): no idle pool, so each probe opens and closes
/// its connection and nothing leaks between probes.
fn client(check: &HttpCheck, host: IpAddr) -> Result<reqwest::Client, Failure> {
    static CLIENTS: OnceLock<Mutex<HashMap<usize, reqwest::Client>>> = OnceLock::new();
    let config = tls::client_config(check.verify.as_ref(), host, &[b"http/1.1"])?;
    // The TLS module hands out one shared config per setting, so its address identifies it.
    let id = Arc::as_ptr(&config) as usize;
    let mut clients = CLIENTS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(client) = clients.get(&id) {
        return Ok(client.clone());
    }
    let client = reqwest::Client::builder()
        .redirect(Policy::custom(redirect_policy))
        .no_proxy()
        .pool_max_idle_per_host(0)
        .tls_backend_preconfigured((*config).clone())
        .user_agent(USER_AGENT)
        .build()
        .map_err(|e| Failure::Error(format!("HTTP client: {e}")))?;
    clients.insert(id, client.clone());
    Ok(client)
}

pub async fn probe(check: &HttpCheck, addr: SocketAddr, timeout: Duration) -> Result<(), Failure> {
    let scheme = if check.https { "https" } else { "http" };
    let url = format!("{scheme}://{addr}{}", check.path);
    let mut request = client(check, addr.ip())?.get(&url).timeout(timeout);
    for (name, value) in &check.headers {
        request = request.header(name, value);
    }
    let mut response = request
        .send()
        .await
        .map_err(|e| request_failure(&e, timeout))?;
    let status = response.status().as_u16();
    let mut read = 0;
    while read < MAX_BODY {
        match response.chunk().await {
            Ok(Some(chunk)) => read += chunk.len(),
            // The status is already decided; a body cut short does not change it.
            Ok(None) | Err(_) => break,
        }
    }
    if (200..400).contains(&status) {
        Ok(())
    } else {
        Err(Failure::HttpStatus(status))
    }
}

fn request_failure(e: &reqwest::Error, timeout: Duration) -> Failure {
    if e.is_timeout() {
        Failure::Timeout(timeout)
    } else {
        Failure::from_error(e)
    }
}
