//! The real `endpoints-operator` binary run as users run it: a config file pointing at the test
//! control plane, a folder of definitions, and the status API on a free loopback port.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

use super::ControlPlane;
use super::process::{Component, Spawner};

pub struct Daemon {
    // Field order matters: the process stops before its folder goes away.
    component: Component,
    _spawner: Spawner,
    status: SocketAddr,
    definitions: PathBuf,
    dir: tempfile::TempDir,
}

/// The compiled daemon, as cargo builds it for integration tests.
/// (Examples, which cargo gives no such variable, find it beside their own folder.)
pub fn binary() -> PathBuf {
    match option_env!("CARGO_BIN_EXE_endpoints-operator") {
        Some(path) => PathBuf::from(path),
        None => std::env::current_exe()
            .ok()
            .and_then(|exe| Some(exe.parent()?.parent()?.join("endpoints-operator")))
            .unwrap_or_else(|| PathBuf::from("endpoints-operator")),
    }
}

impl Daemon {
    /// Starts `run` with one cluster (the control plane) and the given definition files.
    pub fn start(cp: &ControlPlane, files: &[(&str, String)]) -> Result<Daemon> {
        Daemon::start_on(cp, files, free_port()?)
    }

    /// Like [`Daemon::start`], with the status server on `status`.
    pub fn start_on(
        cp: &ControlPlane,
        files: &[(&str, String)],
        status: SocketAddr,
    ) -> Result<Daemon> {
        Daemon::start_with_config(cp, files, status, "")
    }

    /// Like [`Daemon::start_on`], with `extra` appended to the generated config file (TOML tables
    /// the generated part does not use, e.g. `[probes]`).
    pub fn start_with_config(
        cp: &ControlPlane,
        files: &[(&str, String)],
        status: SocketAddr,
        extra: &str,
    ) -> Result<Daemon> {
        Daemon::launch(
            cp,
            files,
            Launch {
                status,
                extra,
                ..Launch::new(&unique_instance())
            },
        )
    }

    /// Starts with a given `instance` name: a second daemon with the same name takes over (and
    /// prunes) what the first one wrote.
    pub fn start_as(cp: &ControlPlane, files: &[(&str, String)], instance: &str) -> Result<Daemon> {
        Daemon::launch(cp, files, Launch::new(instance))
    }

    /// Starts with the ClusterEndpoint object source on (`sources.crd = true`) for objects in
    /// `namespace` only (tests run side by side), as `instance`, with `extra` appended to the
    /// config (more `[[clusters]]`, say).
    pub fn start_with_objects(
        cp: &ControlPlane,
        files: &[(&str, String)],
        namespace: &str,
        instance: &str,
        extra: &str,
    ) -> Result<Daemon> {
        let objects_in = Some(namespace);
        Daemon::launch(
            cp,
            files,
            Launch {
                extra,
                objects_in,
                ..Launch::new(instance)
            },
        )
    }

    /// Starts as `instance` with `extra` appended to the config: daemons sharing an instance
    /// (with `[leader_election]`, say).
    pub fn start_as_with_config(
        cp: &ControlPlane,
        files: &[(&str, String)],
        instance: &str,
        extra: &str,
    ) -> Result<Daemon> {
        Daemon::launch(
            cp,
            files,
            Launch {
                extra,
                ..Launch::new(instance)
            },
        )
    }

    /// [`Daemon::start_with_objects`] reaching the control plane through `kubeconfig` instead of
    /// the admin's (a ServiceAccount token, say); the cluster keeps the control plane's name.
    pub fn start_with_kubeconfig(
        cp: &ControlPlane,
        kubeconfig: &Path,
        files: &[(&str, String)],
        namespace: &str,
        instance: &str,
        extra: &str,
    ) -> Result<Daemon> {
        let (kubeconfig, objects_in) = (Some(kubeconfig), Some(namespace));
        Daemon::launch(
            cp,
            files,
            Launch {
                kubeconfig,
                extra,
                objects_in,
                ..Launch::new(instance)
            },
        )
    }

    /// SIGKILL: a daemon that dies without a word.
    pub fn kill(self) -> Result<()> {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.component.pid())?);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL)?;
        Ok(())
    }

    /// A fresh instance name, for tests that restart a daemon under the same one.
    pub fn new_instance() -> String {
        unique_instance()
    }

    /// Starts with `files` and an open-files limit of `open_files` (soft and hard, so the daemon
    /// cannot raise it), as a small `LimitNOFILE` would.
    pub fn start_with_open_files(
        cp: &ControlPlane,
        files: &[(&str, String)],
        open_files: u64,
        extra: &str,
    ) -> Result<Daemon> {
        let instance = unique_instance();
        let open_files = Some(open_files);
        Daemon::launch(
            cp,
            files,
            Launch {
                extra,
                open_files,
                ..Launch::new(&instance)
            },
        )
    }

    fn launch(cp: &ControlPlane, files: &[(&str, String)], launch: Launch<'_>) -> Result<Daemon> {
        let Launch {
            status,
            kubeconfig,
            extra,
            instance,
            objects_in,
            open_files,
        } = launch;
        let dir = tempfile::Builder::new().prefix("eo-daemon-").tempdir()?;
        let definitions = dir.path().join("endpoints.d");
        std::fs::create_dir(&definitions)?;
        for (name, text) in files {
            std::fs::write(definitions.join(name), text)?;
        }
        let objects = match objects_in {
            Some(ns) => format!("crd = true\nnamespaces = [\"{ns}\"]"),
            None => "crd = false".into(),
        };
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                "instance = \"{instance}\"\n[status]\nlisten = \"{status}\"\n[sources]\npaths = [\"endpoints.d\"]\n{objects}\n\
                 [[clusters]]\nname = \"{}\"\nkubeconfig = \"{}\"\n{extra}",
                cp.name(),
                kubeconfig.unwrap_or(cp.kubeconfig_path()).display()
            ),
        )?;
        let spawner = Spawner::new()?;
        let mut args = vec![
            "run".to_string(),
            "--config".into(),
            config.display().to_string(),
        ];
        // prlimit sets the limit and execs the daemon, so the process keeps its pid.
        let program = match open_files {
            Some(n) => {
                let daemon = binary().display().to_string();
                args.splice(0..0, [format!("--nofile={n}:{n}"), "--".into(), daemon]);
                PathBuf::from("prlimit")
            }
            None => binary(),
        };
        let component = Component::start(
            &spawner,
            "endpoints-operator",
            &program,
            &args,
            dir.path().join("daemon.log"),
        )?;
        Ok(Daemon {
            component,
            _spawner: spawner,
            status,
            definitions,
            dir,
        })
    }

    /// SIGTERM and wait; returns the exit code.
    pub fn stop(mut self) -> Result<Option<i32>> {
        Ok(self
            .component
            .stop_with_status()
            .map(|s| s.code())
            .unwrap_or(None))
    }

    pub fn definitions_dir(&self) -> &Path {
        &self.definitions
    }

    pub fn log_tail(&self, lines: usize) -> String {
        self.component.log_tail(lines)
    }

    /// `GET /api/v1/status`, waiting for the server to come up.
    pub async fn status(&self) -> Result<serde_json::Value> {
        let (code, _, body) = self.get("/api/v1/status").await?;
        anyhow::ensure!(code == 200, "status API answered {code}: {body}");
        Ok(serde_json::from_str(&body)?)
    }

    /// `GET path` on the status server, waiting for it to come up: (status code, content type,
    /// body).
    pub async fn get(&self, path: &str) -> Result<(u16, String, String)> {
        let url = format!("http://{}{path}", self.status);
        super::control_plane::install_crypto_provider();
        let client = reqwest::Client::builder().no_proxy().build()?;
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            match client.get(&url).send().await {
                Ok(r) => {
                    let code = r.status().as_u16();
                    let content_type = r
                        .headers()
                        .get(reqwest::header::CONTENT_TYPE)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_string();
                    return Ok((code, content_type, r.text().await?));
                }
                Err(e) if tokio::time::Instant::now() > deadline => {
                    return Err(e).with_context(|| {
                        format!("status server never answered\n{}", self.log_tail(30))
                    });
                }
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
            }
        }
    }

    /// The daemon's process id, for reading its CPU time and memory from `/proc`.
    pub fn pid(&self) -> u32 {
        self.component.pid()
    }

    /// Open file descriptors of the daemon process right now.
    pub fn open_fds(&self) -> Result<usize> {
        Ok(std::fs::read_dir(format!("/proc/{}/fd", self.component.pid()))?.count())
    }

    pub fn status_addr(&self) -> SocketAddr {
        self.status
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// How a test daemon is started, beyond its definition files.
struct Launch<'a> {
    status: SocketAddr,
    /// Default: the control plane's admin kubeconfig.
    kubeconfig: Option<&'a Path>,
    /// Appended to the generated config file.
    extra: &'a str,
    instance: &'a str,
    /// With the object source on, the one namespace it reads.
    objects_in: Option<&'a str>,
    /// Soft and hard open-files limit; default: inherited.
    open_files: Option<u64>,
}

impl<'a> Launch<'a> {
    fn new(instance: &'a str) -> Self {
        Launch {
            status: free_port().expect("no free loopback port"),
            kubeconfig: None,
            extra: "",
            instance,
            objects_in: None,
            open_files: None,
        }
    }
}

/// Tests run side by side on one API server; each daemon gets its own instance name so its
/// pruning never touches another test's objects.
fn unique_instance() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "test-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

pub fn free_port() -> Result<SocketAddr> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?)
}

/// Runs `endpoints-operator ARGS…` to completion: (exit code, stdout, stderr).
pub fn run_cli(args: &[&str]) -> Result<(i32, String, String)> {
    let out = Command::new(binary()).args(args).output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}
