//! `plan` on the real control plane: it lists what `run` then does (creates, updates, deletes),
//! and running it changes nothing.
//!
//! `plan` and the daemon read the same config file and definitions folder. The config names an
//! instance of its own (the test namespace), so no other test's daemon ever prunes these objects
//! and this plan never lists anyone else's.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::{Endpoints, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::ListParams;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::daemon::{Scratch, expect, slices_become};
use crate::support::daemon::{binary, free_port, run_cli};
use crate::support::{Case, ControlPlane, Host, TestNet, watch};

const OURS: &str = "app.kubernetes.io/managed-by=endpoints-operator";

pub fn cases() -> Vec<Case> {
    vec![
        Case::tokio(
            "plan::lists_what_run_then_does_and_changes_nothing",
            plan_matches_run,
        ),
        Case::tokio(
            "plan::shows_selector_conflicts_and_refused_applies",
            conflicts_and_errors,
        ),
    ]
}

fn definition(ns: &str, hosts: &[&Host]) -> String {
    let hosts: Vec<String> = hosts.iter().map(|h| h.ip().to_string()).collect();
    format!(
        "apiVersion: sealos.io/v1beta1\nkind: ClusterEndpoint\nmetadata: {{name: web, namespace: {ns}}}\n\
         spec:\n  periodSeconds: 1\n  ports:\n    - {{name: http, port: 80, targetPort: 8080, hosts: [{}], \
         tcpSocket: {{enable: true}}, failureThreshold: 2, successThreshold: 3}}\n",
        hosts.join(", ")
    )
}

/// A config file (instance = the namespace) and a definitions folder beside it.
struct Files {
    dir: tempfile::TempDir,
    ns: String,
    cluster: String,
    kubeconfig: PathBuf,
}

impl Files {
    fn new(cp: &ControlPlane, ns: &str) -> Result<Files> {
        let dir = tempfile::Builder::new().prefix("eo-plan-").tempdir()?;
        std::fs::create_dir(dir.path().join("endpoints.d"))?;
        let files = Files {
            dir,
            ns: ns.to_string(),
            cluster: cp.name().to_string(),
            kubeconfig: cp.kubeconfig_path().to_path_buf(),
        };
        files.write_config()?;
        Ok(files)
    }

    /// (Re)writes the config with a free status port.
    fn write_config(&self) -> Result<()> {
        let text = format!(
            "instance = \"{}\"\n[status]\nlisten = \"{}\"\n[sources]\npaths = [\"endpoints.d\"]\n\
             [[clusters]]\nname = \"{}\"\nkubeconfig = \"{}\"\n",
            self.ns,
            free_port()?,
            self.cluster,
            self.kubeconfig.display()
        );
        Ok(std::fs::write(self.config(), text)?)
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("config.toml")
    }

    fn web_file(&self) -> PathBuf {
        self.dir.path().join("endpoints.d/web.yaml")
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("daemon.log")
    }

    /// Runs `plan`; it must exit 0. Returns the plan's entries about this namespace (header line
    /// → its diff lines) and the whole output.
    fn plan(&self) -> Result<(BTreeMap<String, Vec<String>>, String)> {
        let config = self.config().display().to_string();
        let (code, out, err) = run_cli(&["plan", "--config", &config])?;
        let shown = format!("stdout:\n{out}\nstderr:\n{err}");
        ensure!(code == 0, "plan exited {code}\n{shown}");
        ensure!(
            out.lines()
                .any(|l| l.starts_with(&format!("cluster {} (https://", self.cluster))),
            "no cluster heading\n{shown}"
        );
        Ok((entries(&out, &self.ns), shown))
    }

    /// Starts `run` with this config, like a user would.
    fn start(&self) -> Result<Running> {
        self.write_config()?;
        let log = std::fs::File::create(self.log())?;
        let mut command = Command::new(binary());
        command
            .args(["run", "--config"])
            .arg(self.config())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // SAFETY: only a syscall between fork and exec. The daemon dies with the test thread.
        unsafe {
            command.pre_exec(|| Ok(nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?));
        }
        Ok(Running {
            child: command.spawn().context("starting the daemon")?,
        })
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

/// The daemon process; stopped with SIGTERM (then SIGKILL) when dropped.
struct Running {
    child: Child,
}

impl Running {
    /// SIGTERM and wait up to 10 s; the exit code.
    fn stop(mut self) -> Option<i32> {
        self.terminate()
    }

    fn terminate(&mut self) -> Option<i32> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return status.code();
        }
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        None
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.terminate();
    }
}

/// Plan lines naming `ns/…` (`+ create …`, `~ update …`, `- delete …`, `! …`), each with the
/// indented diff lines that follow it.
fn entries(out: &str, ns: &str) -> BTreeMap<String, Vec<String>> {
    let mut found = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in out.lines() {
        let trimmed = line.trim();
        if line.starts_with("      ") {
            if let Some(header) = &current {
                found
                    .entry(header.clone())
                    .or_insert_with(Vec::new)
                    .push(trimmed.to_string());
            }
            continue;
        }
        let change = ["+ ", "~ ", "- ", "! "]
            .iter()
            .any(|p| trimmed.starts_with(p));
        current = (change && trimmed.contains(&format!(" {ns}/"))).then(|| trimmed.to_string());
        if let Some(header) = &current {
            found.insert(header.clone(), Vec::new());
        }
    }
    found
}

fn headers(entries: &BTreeMap<String, Vec<String>>) -> BTreeSet<String> {
    entries.keys().cloned().collect()
}

/// Names of every Service, Endpoints and EndpointSlice in the namespace, labelled or not.
async fn everything(s: &Scratch) -> Result<BTreeSet<String>> {
    let all = ListParams::default();
    let mut names = BTreeSet::new();
    for o in s.api::<Service>().list(&all).await? {
        names.insert(format!("Service {}", o.metadata.name.unwrap_or_default()));
    }
    for o in s.api::<Endpoints>().list(&all).await? {
        names.insert(format!("Endpoints {}", o.metadata.name.unwrap_or_default()));
    }
    for o in s.api::<EndpointSlice>().list(&all).await? {
        names.insert(format!(
            "EndpointSlice {}",
            o.metadata.name.unwrap_or_default()
        ));
    }
    Ok(names)
}

fn unchanged(shown: &str, n: usize) -> bool {
    shown.lines().any(|l| l.trim() == format!("{n} unchanged"))
}

async fn plan_matches_run(cp: &'static ControlPlane) -> Result<()> {
    let net = TestNet::new()?;
    let (h1, h2, h3) = (net.add_host()?, net.add_host()?, net.add_host()?);
    // h3 serves nothing: it stays not ready, as `plan` shows a new host.
    let _servers = [h1.serve_tcp(8080)?, h2.serve_tcp(8080)?];
    let s = Scratch::new(cp, "plan").await?;
    let ns = s.ns.clone();
    let files = Files::new(cp, &ns)?;
    std::fs::write(files.web_file(), definition(&ns, &[&h1, &h2]))?;
    let slice = format!("{ns}/web-80-tcp-ipv4");

    // (1) An empty namespace: everything is created, and planning writes nothing.
    let (plan, shown) = files.plan()?;
    let creates = BTreeSet::from([
        format!("+ create Service {ns}/web"),
        format!("+ create EndpointSlice {slice}"),
        format!("+ create Endpoints {ns}/web"),
    ]);
    ensure!(
        headers(&plan) == creates,
        "plan of an empty namespace\n{shown}"
    );
    let left = everything(&s).await?;
    ensure!(left.is_empty(), "plan created objects: {left:?}");

    // (2) After `run` applied it: nothing to do.
    let daemon = files.start()?;
    let both = expect(&[
        ("web-80-tcp-ipv4", &h1, true),
        ("web-80-tcp-ipv4", &h2, true),
    ]);
    slices_become(&s, "web", &both, Duration::from_secs(30))
        .await
        .with_context(|| files.log_tail())?;
    watch::until(s.api::<Endpoints>(), OURS, Duration::from_secs(10), |e| {
        e.get("web").is_some_and(|e| ready_ips(e).len() == 2)
    })
    .await?;
    ensure!(daemon.stop() == Some(0), "the daemon did not exit 0");
    let (plan, shown) = files.plan()?;
    ensure!(plan.is_empty(), "plan after run\n{shown}");
    ensure!(unchanged(&shown, 3), "three objects unchanged\n{shown}");

    // (3) A new host: the slice and the Endpoints change, nothing else.
    std::fs::write(files.web_file(), definition(&ns, &[&h1, &h2, &h3]))?;
    let (plan, shown) = files.plan()?;
    let updates = BTreeSet::from([
        format!("~ update EndpointSlice {slice}"),
        format!("~ update Endpoints {ns}/web"),
    ]);
    ensure!(headers(&plan) == updates, "plan of a new host\n{shown}");
    ensure!(unchanged(&shown, 1), "the Service is unchanged\n{shown}");
    let h3_ip = h3.ip().to_string();
    for (header, diff) in &plan {
        ensure!(
            diff.iter().any(|l| l.contains(&h3_ip)),
            "{header} does not show {h3_ip}\n{shown}"
        );
    }
    let service_version = s
        .api::<Service>()
        .get("web")
        .await?
        .metadata
        .resource_version;
    let daemon = files.start()?;
    let three = expect(&[
        ("web-80-tcp-ipv4", &h1, true),
        ("web-80-tcp-ipv4", &h2, true),
        ("web-80-tcp-ipv4", &h3, false),
    ]);
    slices_become(&s, "web", &three, Duration::from_secs(30))
        .await
        .with_context(|| files.log_tail())?;
    watch::until(s.api::<Endpoints>(), OURS, Duration::from_secs(10), |e| {
        e.get("web")
            .is_some_and(|e| not_ready_ips(e) == BTreeSet::from([h3_ip.clone()]))
    })
    .await?;
    ensure!(daemon.stop() == Some(0), "the daemon did not exit 0");
    let (plan, shown) = files.plan()?;
    ensure!(
        plan.is_empty(),
        "the cluster is what the plan said\n{shown}"
    );
    ensure!(
        s.api::<Service>()
            .get("web")
            .await?
            .metadata
            .resource_version
            == service_version,
        "the Service was written although the plan left it unchanged"
    );

    // (4) The definition is gone: its objects are deleted.
    std::fs::remove_file(files.web_file())?;
    let (plan, shown) = files.plan()?;
    let deletes = BTreeSet::from([
        format!("- delete Service {ns}/web"),
        format!("- delete EndpointSlice {slice}"),
        format!("- delete Endpoints {ns}/web"),
    ]);
    ensure!(
        headers(&plan) == deletes,
        "plan of a removed definition\n{shown}"
    );
    ensure!(
        plan.values().all(Vec::is_empty),
        "deletes carry no diff\n{shown}"
    );
    let daemon = files.start()?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = everything(&s).await?;
        if left.is_empty() {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "run did not delete {left:?}\n{}",
            files.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(daemon);
    s.cleanup().await;
    Ok(())
}

fn ready_ips(e: &Endpoints) -> BTreeSet<String> {
    let subsets = e.subsets.iter().flatten();
    subsets
        .flat_map(|s| s.addresses.iter().flatten().map(|a| a.ip.clone()))
        .collect()
}

fn not_ready_ips(e: &Endpoints) -> BTreeSet<String> {
    let subsets = e.subsets.iter().flatten();
    subsets
        .flat_map(|s| s.not_ready_addresses.iter().flatten().map(|a| a.ip.clone()))
        .collect()
}

/// A Service with a selector is a conflict (as `run` refuses it); an apply the API refuses (no
/// such namespace) is shown with the API's reason. Both are part of a computed plan: exit 0.
async fn conflicts_and_errors(cp: &'static ControlPlane) -> Result<()> {
    let s = Scratch::new(cp, "plan-conflict").await?;
    let ns = s.ns.clone();
    let mut selected = Service::default();
    selected.metadata.name = Some("payments".into());
    selected.spec = Some(k8s_openapi::api::core::v1::ServiceSpec {
        selector: Some([("app".to_string(), "payments".to_string())].into()),
        ports: Some(vec![k8s_openapi::api::core::v1::ServicePort {
            port: 80,
            ..Default::default()
        }]),
        ..Default::default()
    });
    let created = s
        .api::<Service>()
        .create(&Default::default(), &selected)
        .await?;
    let files = Files::new(cp, &ns)?;
    let static_def = |name: &str, namespace: &str| {
        format!(
            "apiVersion: sealos.io/v1beta1\nkind: ClusterEndpoint\n\
             metadata: {{name: {name}, namespace: {namespace}}}\n\
             spec:\n  ports: [{{port: 80, hosts: [192.0.2.10]}}]\n"
        )
    };
    let dir = files.dir.path().join("endpoints.d");
    std::fs::write(dir.join("payments.yaml"), static_def("payments", &ns))?;
    std::fs::write(
        dir.join("db.yaml"),
        static_def("db", &format!("{ns}-missing")),
    )?;
    let (plan, shown) = files.plan()?;
    let conflict = format!("! conflict Service {ns}/payments: has a selector; left untouched");
    ensure!(
        headers(&plan) == BTreeSet::from([conflict]),
        "plan with a selector Service\n{shown}"
    );
    ensure!(
        shown.contains(&format!("! error Service {ns}-missing/db: ")),
        "the refused apply is shown\n{shown}"
    );
    let now = s.api::<Service>().get("payments").await?;
    ensure!(
        now.metadata.resource_version == created.metadata.resource_version,
        "plan changed the selector Service"
    );
    let ours = ListParams::default().labels(OURS);
    ensure!(
        s.api::<Service>().list(&ours).await?.items.is_empty()
            && s.api::<Endpoints>().list(&ours).await?.items.is_empty()
            && s.api::<EndpointSlice>().list(&ours).await?.items.is_empty(),
        "plan wrote objects"
    );
    s.cleanup().await;
    Ok(())
}
