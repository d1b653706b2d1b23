//! A real Kubernetes control plane for integration tests: etcd, kube-apiserver and
//! kube-controller-manager on loopback ports, with a generated PKI and an admin kubeconfig.
//!
//! Starting is blocking and std-only so a harness can do it before any runtime exists; only
//! [`ControlPlane::client`] needs the caller's tokio runtime. See DESIGN.md Appendix A for why each
//! flag is there.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use kube::config::{KubeConfigOptions, Kubeconfig};
use rustls::pki_types::{IpAddr, ServerName};
use tempfile::TempDir;

use super::pki::Pki;
use super::process::{Component, Spawner};

/// How long a start (or an API server restart) may take before it counts as failed; 2 cores need it.
const START_TIMEOUT: Duration = Duration::from_secs(90);
/// Log lines of each component quoted in a start error.
const LOG_TAIL: usize = 40;
/// Must not overlap 10.240.0.0/16, where the test hosts live.
const SERVICE_CIDR: &str = "10.96.0.0/16";
/// Set (to anything) to keep logs, certificates and etcd data after a successful run too.
pub const KEEP_FILES_ENV: &str = "ENDPOINTS_OPERATOR_KEEP_TEST_FILES";
const KCM_CONTROLLERS: &str =
    "garbage-collector-controller,namespace-controller,endpointslice-mirroring-controller";

/// One cluster. Dropping it (or calling [`ControlPlane::shutdown`]) stops every component and
/// removes its files.
pub struct ControlPlane {
    name: String,
    bin: Binaries,
    dir: PathBuf,
    ports: Ports,
    pki: Pki,
    kubeconfig: PathBuf,
    server_url: String,
    /// TLS client settings (admin identity, test CA) for the std-only readiness probe.
    tls: Arc<rustls::ClientConfig>,
    state: Mutex<State>,
}

/// Everything that changes after start, behind one lock so trials on other threads can restart
/// components.
#[derive(Default)]
struct State {
    etcd: Option<Component>,
    apiserver: Option<Component>,
    controller_manager: Option<Component>,
    spawner: Option<Spawner>,
    tempdir: Option<TempDir>,
}

struct Binaries {
    etcd: PathBuf,
    apiserver: PathBuf,
    controller_manager: PathBuf,
}

#[derive(Clone, Copy)]
struct Ports {
    etcd_client: u16,
    etcd_peer: u16,
    apiserver: u16,
    controller_manager: u16,
}

impl ControlPlane {
    /// Builds (or finds) the binaries, starts all components and waits until the API server is
    /// ready and the `default` namespace exists. `name` names the kubeconfig's cluster and context.
    pub fn start(name: &str) -> Result<ControlPlane> {
        let began = Instant::now();
        let bin = Binaries::locate()?;
        let tempdir = tempfile::Builder::new()
            .prefix(&format!("eo-cp-{name}-"))
            .tempdir()
            .context("creating the control plane's temporary folder")?;
        let dir = tempdir.path().to_owned();
        let ports = Ports::pick()?;
        let pki = Pki::generate(&dir)?;
        let server_url = format!("https://127.0.0.1:{}", ports.apiserver);
        let kubeconfig = dir.join("kubeconfig");
        fs::write(&kubeconfig, kubeconfig_yaml(name, &server_url, &pki))
            .context("writing the kubeconfig")?;
        let tls = tls_config(&pki)?;

        let cp = ControlPlane {
            name: name.to_owned(),
            bin,
            dir,
            ports,
            pki,
            kubeconfig,
            server_url,
            tls,
            state: Mutex::new(State {
                spawner: Some(Spawner::new()?),
                tempdir: Some(tempdir),
                ..State::default()
            }),
        };
        if let Err(error) = cp.boot() {
            // Keep the logs and certificates for a post-mortem; the processes still go.
            let kept = cp.state().tempdir.take().map(TempDir::keep);
            cp.shutdown();
            let kept = kept.unwrap_or_default();
            eprintln!(
                "control plane {name}: start failed; files kept in {}",
                kept.display()
            );
            return Err(error.context(format!(
                "control plane {name} failed to start (files kept in {})",
                kept.display()
            )));
        }
        eprintln!(
            "control plane {name}: ready at {} in {:.1?} (files in {})",
            cp.server_url,
            began.elapsed(),
            cp.dir.display()
        );
        Ok(cp)
    }

    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    pub fn server_url(&self) -> &str {
        &self.server_url
    }

    /// The kubeconfig context (and cluster) name given to [`ControlPlane::start`].
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The kube config for the admin user; usable without a runtime.
    pub fn kube_config(&self) -> kube::Config {
        let kubeconfig =
            Kubeconfig::read_from(&self.kubeconfig).expect("reading the test kubeconfig");
        // Building a Config from a Kubeconfig never awaits anything unless exec auth is configured.
        let mut config = futures::executor::block_on(kube::Config::from_custom_kubeconfig(
            kubeconfig,
            &KubeConfigOptions::default(),
        ))
        .expect("the test kubeconfig is valid");
        // A proxy from the environment (HTTPS_PROXY) must never see loopback test traffic.
        config.proxy_url = None;
        config
    }

    /// An admin client; call it inside a tokio runtime (the client spawns its worker there).
    pub fn client(&self) -> kube::Client {
        install_crypto_provider();
        kube::Client::try_from(self.kube_config())
            .expect("building a kube client for the test cluster")
    }

    /// Stops the API server (SIGTERM); etcd and the data stay, so [`Self::start_apiserver`] resumes.
    pub fn stop_apiserver(&self) {
        drop(self.state().apiserver.take());
    }

    /// Starts the API server again on the same port with the same certificates and waits until it
    /// is ready. Blocking: from async code, call it through `tokio::task::spawn_blocking`.
    pub fn start_apiserver(&self) -> Result<()> {
        {
            let mut state = self.state();
            if state.apiserver.is_none() {
                state.apiserver = Some(self.component(&state, "kube-apiserver")?);
            }
        }
        self.wait_ready()
    }

    /// Stops the controller manager: no more garbage collection, namespace cleanup or mirroring.
    pub fn stop_controller_manager(&self) {
        drop(self.state().controller_manager.take());
    }

    pub fn start_controller_manager(&self) -> Result<()> {
        let mut state = self.state();
        if state.controller_manager.is_none() {
            state.controller_manager = Some(self.component(&state, "kube-controller-manager")?);
        }
        Ok(())
    }

    /// Stops everything and removes the files. Idempotent; also what `Drop` does, for owners that
    /// leaked the control plane into a `&'static`.
    pub fn shutdown(&self) {
        let mut state = self.state();
        // Dependents first, so nothing logs a storm of connection errors while going down.
        drop(state.controller_manager.take());
        drop(state.apiserver.take());
        drop(state.etcd.take());
        drop(state.spawner.take());
        let Some(tempdir) = state.tempdir.take() else {
            return;
        };
        if std::env::var_os(KEEP_FILES_ENV).is_some() {
            let kept = tempdir.keep();
            eprintln!(
                "control plane {}: files kept in {}",
                self.name,
                kept.display()
            );
        } else if let Err(e) = tempdir.close() {
            let dir = self.dir.display();
            eprintln!("control plane {}: removing {dir}: {e}", self.name);
        }
    }

    fn boot(&self) -> Result<()> {
        {
            let mut state = self.state();
            // The API server retries etcd until it answers, so there is nothing to wait for here.
            state.etcd = Some(self.component(&state, "etcd")?);
            state.apiserver = Some(self.component(&state, "kube-apiserver")?);
        }
        self.wait_ready()?;
        // The garbage collector learns resource kinds when it starts (then every 30 s), so the
        // CRD comes first, as in a cluster where the operator was installed before its objects.
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(async { super::crd::install(&self.client()).await })
            .context("installing the ClusterEndpoint CRD")?;
        self.start_controller_manager()?;
        // Catch a controller manager that dies on its flags right away rather than in a later test.
        thread::sleep(Duration::from_millis(500));
        let mut state = self.state();
        if let Some(status) = state
            .controller_manager
            .as_mut()
            .and_then(Component::exited)
        {
            bail!(
                "kube-controller-manager exited ({status})\n{}",
                logs(&state)
            );
        }
        Ok(())
    }

    /// Starts one component by name, with its flags, logging to `<dir>/<name>.log`.
    fn component(&self, state: &State, name: &'static str) -> Result<Component> {
        let (program, args) = match name {
            "etcd" => (&self.bin.etcd, self.etcd_args()),
            "kube-apiserver" => (&self.bin.apiserver, self.apiserver_args()),
            "kube-controller-manager" => {
                (&self.bin.controller_manager, self.controller_manager_args())
            }
            _ => unreachable!("unknown component {name}"),
        };
        let spawner = state
            .spawner
            .as_ref()
            .context("the control plane was shut down")?;
        Component::start(
            spawner,
            name,
            program,
            &args,
            self.dir.join(format!("{name}.log")),
        )
    }

    fn etcd_args(&self) -> Vec<String> {
        let client = format!("http://127.0.0.1:{}", self.ports.etcd_client);
        let peer = format!("http://127.0.0.1:{}", self.ports.etcd_peer);
        vec![
            "--name=test".into(),
            format!("--data-dir={}", self.dir.join("etcd").display()),
            format!("--listen-client-urls={client}"),
            format!("--advertise-client-urls={client}"),
            format!("--listen-peer-urls={peer}"),
            format!("--initial-advertise-peer-urls={peer}"),
            format!("--initial-cluster=test={peer}"),
            "--unsafe-no-fsync".into(),
            "--log-level=warn".into(),
        ]
    }

    fn apiserver_args(&self) -> Vec<String> {
        let port = self.ports.apiserver;
        let pki = &self.pki;
        vec![
            format!("--etcd-servers=http://127.0.0.1:{}", self.ports.etcd_client),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={port}"),
            "--advertise-address=127.0.0.1".into(),
            // With a loopback advertise address the built-in reconciler would write invalid
            // Endpoints for the `kubernetes` Service.
            "--endpoint-reconciler-type=none".into(),
            format!("--tls-cert-file={}", pki.serving_cert_file.display()),
            format!("--tls-private-key-file={}", pki.serving_key_file.display()),
            format!("--client-ca-file={}", pki.ca_cert_file.display()),
            format!("--service-account-issuer=https://127.0.0.1:{port}"),
            format!(
                "--service-account-key-file={}",
                pki.sa_public_key_file.display()
            ),
            format!(
                "--service-account-signing-key-file={}",
                pki.sa_private_key_file.display()
            ),
            format!("--service-cluster-ip-range={SERVICE_CIDR}"),
            "--authorization-mode=RBAC".into(),
            // No serviceaccount controller runs, so pods (if any) could not get a default account.
            "--disable-admission-plugins=ServiceAccount".into(),
            // Otherwise a SIGTERM waits (up to a minute) for clients' watches, such as the
            // controller manager's, to end by themselves.
            "--shutdown-watch-termination-grace-period=1s".into(),
            // Never touch /var/run/kubernetes, the default place for generated certificates.
            format!("--cert-dir={}", self.dir.join("apiserver-certs").display()),
        ]
    }

    fn controller_manager_args(&self) -> Vec<String> {
        vec![
            format!("--kubeconfig={}", self.kubeconfig.display()),
            format!("--controllers={KCM_CONTROLLERS}"),
            "--leader-elect=false".into(),
            // Its own HTTPS endpoint (unused) stays on loopback with a self-signed cert in our dir.
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={}", self.ports.controller_manager),
            format!("--cert-dir={}", self.dir.join("kcm-certs").display()),
        ]
    }

    /// Polls until `/readyz` is 200 and the `default` namespace exists; fails early when a
    /// component exits and on timeout, quoting every component's log.
    fn wait_ready(&self) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            {
                let mut guard = self.state();
                let state = &mut *guard;
                let exited = [&mut state.etcd, &mut state.apiserver]
                    .into_iter()
                    .flatten()
                    .find_map(|c| Some((c.name(), c.exited()?)));
                if let Some((name, status)) = exited {
                    bail!("{name} exited ({status}) during start\n{}", logs(state));
                }
            }
            let last = match self
                .get("/readyz")
                .and_then(|readyz| Ok((readyz, self.get("/api/v1/namespaces/default")?)))
            {
                Ok((200, 200)) => return Ok(()),
                Ok((readyz, ns)) => format!("/readyz {readyz}, namespace default {ns}"),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() >= deadline {
                bail!(
                    "API server not ready after {START_TIMEOUT:?} (last: {last})\n{}",
                    logs(&self.state())
                );
            }
            thread::sleep(Duration::from_millis(250));
        }
    }

    /// A minimal HTTPS GET as admin, returning the status code; std + rustls, no runtime.
    fn get(&self, path: &str) -> Result<u16> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.ports.apiserver));
        let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
        tcp.set_write_timeout(Some(Duration::from_secs(5)))?;
        let server =
            ServerName::IpAddress(IpAddr::from(std::net::IpAddr::from(Ipv4Addr::LOCALHOST)));
        let tls = rustls::ClientConnection::new(self.tls.clone(), server)?;
        let mut stream = rustls::StreamOwned::new(tls, tcp);
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )?;
        stream.flush()?;
        let mut status_line = String::new();
        BufReader::new(stream).read_line(&mut status_line)?;
        let code = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok());
        code.with_context(|| format!("malformed HTTP status line {status_line:?}"))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panicking trial must not wedge teardown; the state stays consistent across a panic.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl Binaries {
    /// Runs testenv/build.sh (fast once cached) and applies envtest's per-binary overrides.
    fn locate() -> Result<Binaries> {
        let overrides = [
            std::env::var_os("TEST_ASSET_ETCD"),
            std::env::var_os("TEST_ASSET_KUBE_APISERVER"),
            std::env::var_os("TEST_ASSET_KUBE_CONTROLLER_MANAGER"),
        ];
        let folder = if overrides.iter().all(Option::is_some) {
            PathBuf::new()
        } else {
            build_folder()?
        };
        let [etcd, apiserver, controller_manager] = overrides;
        let pick = |over: Option<std::ffi::OsString>, name: &str| -> Result<PathBuf> {
            let path = over.map_or_else(|| folder.join(name), PathBuf::from);
            if !path.is_file() {
                bail!("control plane binary {} does not exist", path.display());
            }
            Ok(path)
        };
        Ok(Binaries {
            etcd: pick(etcd, "etcd")?,
            apiserver: pick(apiserver, "kube-apiserver")?,
            controller_manager: pick(controller_manager, "kube-controller-manager")?,
        })
    }
}

/// The folder testenv/build.sh prints; its progress output goes straight to our stderr.
fn build_folder() -> Result<PathBuf> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("testenv/build.sh");
    let output = Command::new("bash")
        .arg(&script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !output.status.success() {
        bail!(
            "{} failed ({}); its output is above. The integration tests need etcd, kube-apiserver \
             and kube-controller-manager: let the script build them or set KUBEBUILDER_ASSETS",
            script.display(),
            output.status
        );
    }
    let folder = String::from_utf8(output.stdout).context("build.sh printed a non-UTF-8 path")?;
    let folder = folder.lines().last().unwrap_or_default().trim();
    if folder.is_empty() {
        bail!("{} printed no folder", script.display());
    }
    Ok(PathBuf::from(folder))
}

impl Ports {
    /// Free loopback ports, all held at once so they differ; released just before use, which is a
    /// small race with other processes that the kernel's randomised ephemeral ports make unlikely.
    fn pick() -> Result<Ports> {
        let listeners = (0..4)
            .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
            .collect::<Result<Vec<_>, _>>()
            .context("picking free loopback ports")?;
        let ports = listeners
            .iter()
            .map(|l| l.local_addr().map(|a| a.port()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Ports {
            etcd_client: ports[0],
            etcd_peer: ports[1],
            apiserver: ports[2],
            controller_manager: ports[3],
        })
    }
}

/// An admin kubeconfig with everything embedded, so it works from anywhere (kubectl included).
fn kubeconfig_yaml(name: &str, server: &str, pki: &Pki) -> String {
    // A JSON string is a valid YAML scalar, which quotes the name safely whatever it contains.
    let name = serde_json::to_string(name).expect("a string serialises");
    let ca = BASE64.encode(&pki.ca_pem);
    let cert = BASE64.encode(&pki.admin_cert_pem);
    let key = BASE64.encode(&pki.admin_key_pem);
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: {name}
  cluster:
    server: {server}
    certificate-authority-data: {ca}
users:
- name: admin
  user:
    client-certificate-data: {cert}
    client-key-data: {key}
contexts:
- name: {name}
  context:
    cluster: {name}
    user: admin
current-context: {name}
"
    )
}

fn tls_config(pki: &Pki) -> Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca_der.clone())?;
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_client_auth_cert(vec![pki.admin_cert_der.clone()], pki.admin_key_der())?;
    Ok(Arc::new(config))
}

/// kube and reqwest are built without a bundled provider; the daemon installs ring at start, and
/// tests must do the same before their first client. Losing the race to another thread is fine.
pub fn install_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

fn logs(state: &State) -> String {
    [&state.etcd, &state.apiserver, &state.controller_manager]
        .into_iter()
        .flatten()
        .map(|c| c.log_tail(LOG_TAIL))
        .collect::<Vec<_>>()
        .join("\n")
}
