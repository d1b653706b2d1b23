//! Leader election on the real control plane: two daemons of one instance, one writer; a killed
//! leader is replaced within the Lease duration; a leader stopping releases its Lease.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::coordination::v1::Lease;
use serde_json::Value;

use crate::daemon::{Scratch, expect, slices_become};
use crate::support::daemon::Daemon;
use crate::support::{Case, ControlPlane, Host, TestNet, watch};

const LEASE_SECONDS: u64 = 10;

pub fn cases() -> Vec<Case> {
    vec![
        Case::tokio(
            "leader::two_daemons_one_writer_and_a_killed_leader_is_replaced_within_the_lease",
            killed_leader,
        ),
        Case::tokio(
            "leader::a_leader_that_stops_releases_its_lease",
            stopping_leader,
        ),
    ]
}

fn definition(ns: &str, host: &Host) -> String {
    format!(
        "apiVersion: sealos.io/v1beta1\nkind: ClusterEndpoint\nmetadata: {{name: web, namespace: {ns}}}\n\
         spec:\n  periodSeconds: 1\n  ports:\n    - {{name: http, port: 80, targetPort: 8080, hosts: [\"{}\"], \
         tcpSocket: {{enable: true}}, failureThreshold: 2}}\n",
        host.ip()
    )
}

/// Two daemons of one instance, electing in `ns`.
fn pair(cp: &ControlPlane, s: &Scratch, host: &Host) -> Result<(Daemon, Daemon)> {
    let instance = Daemon::new_instance();
    let files = [("web.yaml", definition(&s.ns, host))];
    let election = format!(
        "[leader_election]\nenabled = true\nnamespace = \"{}\"\nlease_seconds = {LEASE_SECONDS}\n",
        s.ns
    );
    Ok((
        Daemon::start_as_with_config(cp, &files, &instance, &election)?,
        Daemon::start_as_with_config(cp, &files, &instance, &election)?,
    ))
}

fn cluster(status: &Value) -> &Value {
    &status["clusters"][0]
}

/// Waits until exactly one daemon leads; returns (leader, standby).
async fn leader_of(a: Daemon, b: Daemon) -> Result<(Daemon, Daemon)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (sa, sb) = (a.status().await?, b.status().await?);
        let (la, lb) = (&cluster(&sa)["leading"], &cluster(&sb)["leading"]);
        ensure!(
            !(la == true && lb == true),
            "both daemons lead: {sa:#} {sb:#}"
        );
        if la == true && lb == false {
            return Ok((a, b));
        }
        if lb == true && la == false {
            return Ok((b, a));
        }
        ensure!(Instant::now() < deadline, "no leader: {la} {lb}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Polls the status API until the daemon leads; returns how long that took.
async fn leads_within(daemon: &Daemon, limit: Duration) -> Result<Duration> {
    let began = Instant::now();
    loop {
        if cluster(&daemon.status().await?)["leading"] == true {
            return Ok(began.elapsed());
        }
        ensure!(
            began.elapsed() < limit,
            "the standby did not take over within {limit:?}\n{}",
            daemon.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn killed_leader(cp: &'static ControlPlane) -> Result<()> {
    let net = TestNet::new()?;
    let h1 = net.add_host()?;
    let server = h1.serve_tcp(8080)?;
    let s = Scratch::new(cp, "leader-kill").await?;
    let (a, b) = pair(cp, &s, &h1)?;
    let ready = expect(&[("web-80-tcp-ipv4", &h1, true)]);
    slices_become(&s, "web", &ready, Duration::from_secs(30)).await?;
    let (leader, standby) = leader_of(a, b).await?;
    let idle = cluster(&standby.status().await?)["writes"].clone();
    ensure!(idle == 0, "the standby wrote {idle} times");

    leader.kill()?;
    let took = leads_within(&standby, Duration::from_secs(LEASE_SECONDS + 10)).await?;
    eprintln!("standby took over {took:.1?} after the leader was killed (lease {LEASE_SECONDS} s)");
    // The new leader writes: a host going down reaches the slice.
    server.stop();
    let down = expect(&[("web-80-tcp-ipv4", &h1, false)]);
    slices_become(&s, "web", &down, Duration::from_secs(30))
        .await
        .context("the new leader does not write")?;
    drop(standby);
    s.cleanup().await;
    Ok(())
}

async fn stopping_leader(cp: &'static ControlPlane) -> Result<()> {
    let net = TestNet::new()?;
    let h1 = net.add_host()?;
    let _server = h1.serve_tcp(8080)?;
    let s = Scratch::new(cp, "leader-stop").await?;
    let (a, b) = pair(cp, &s, &h1)?;
    let ready = expect(&[("web-80-tcp-ipv4", &h1, true)]);
    slices_become(&s, "web", &ready, Duration::from_secs(30)).await?;
    let (leader, standby) = leader_of(a, b).await?;
    let leases = s.api::<Lease>();
    let held = watch::until(leases.clone(), "", Duration::from_secs(10), |leases| {
        leases.values().any(|l| {
            l.spec
                .as_ref()
                .and_then(|s| s.holder_identity.as_ref())
                .is_some()
        })
    })
    .await?;
    let holder = |leases: &std::collections::BTreeMap<String, Lease>| {
        leases
            .values()
            .find_map(|l| l.spec.as_ref()?.holder_identity.clone())
    };
    let first = holder(&held).context("holder")?;

    ensure!(leader.stop()? == Some(0), "the leader did not stop cleanly");
    // Released on the way out (not left to expire), and then taken within the Lease duration.
    let released = watch::until(leases, "", Duration::from_secs(3), |l| {
        holder(l) != Some(first.clone())
    })
    .await;
    released.context("the stopping leader did not release its Lease")?;
    let took = leads_within(&standby, Duration::from_secs(LEASE_SECONDS + 2)).await?;
    eprintln!("standby took over {took:.1?} after the leader stopped");
    drop(standby);
    s.cleanup().await;
    Ok(())
}
