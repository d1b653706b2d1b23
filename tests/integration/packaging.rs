//! What ships beside the binary: the example config, the systemd unit, the deploy manifests and
//! the Helm chart, checked against the code and the real tools so they cannot drift; and the
//! deploy manifests' RBAC proven with a real ServiceAccount token driving the real daemon.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::authentication::v1::{SelfSubjectReview, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Endpoints, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::events::v1::Event;
use kube::api::{DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::discovery::{Discovery, Scope};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};

use crate::crd::endpoints;
use crate::daemon::{Scratch, expect, slices_become};
use crate::support::daemon::{Daemon, binary, run_cli};
use crate::support::{Case, ControlPlane, Host, TestNet, watch};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
/// The release namespace and ServiceAccount of deploy/endpoints-operator.yaml.
const NS: &str = "endpoints-operator";
const SA: &str = "endpoints-operator";
const CHART: &str = "charts/endpoints-operator";
const WAIT: Duration = Duration::from_secs(30);

pub fn cases() -> Vec<Case> {
    vec![
        Case::blocking(
            "packaging::the_example_config_and_definitions_pass_check",
            example_config,
        ),
        Case::blocking(
            "packaging::the_systemd_unit_passes_verify_reloads_on_hup_and_is_sandboxed",
            |_| systemd_unit(),
        ),
        Case::blocking(
            "packaging::the_dockerfile_builds_what_the_deployment_runs",
            |_| dockerfile(),
        ),
        Case::tokio(
            "packaging::the_deployments_config_mount_follows_configmap_edits",
            |_| config_mount_follows_edits(),
        ),
        Case::tokio(
            "packaging::deploy_manifests_apply_and_grant_exactly_what_the_daemon_uses",
            deploy_manifests,
        ),
        Case::blocking(
            "packaging::the_helm_chart_ships_the_deploy_crd_and_renders_the_deploy_manifests",
            helm_chart,
        ),
        Case::tokio(
            "packaging::a_service_account_token_does_all_the_daemon_needs_and_nothing_more",
            service_account_token,
        ),
    ]
}

fn example_config(cp: &ControlPlane) -> Result<()> {
    // The example names a kubeconfig under /etc; point it at the test cluster's, so `check`
    // also proves it reads kubeconfig files and finds the context.
    let dir = tempfile::tempdir()?;
    let text = std::fs::read_to_string(format!("{ROOT}/config/config.toml"))?;
    let text = text
        .replace(
            "/etc/endpoints-operator/kubeconfig",
            &cp.kubeconfig_path().display().to_string(),
        )
        .replace(
            "paths = [\"endpoints.d\"]",
            &format!("paths = [\"{ROOT}/config/endpoints.d\"]"),
        );
    let config = dir.path().join("config.toml");
    std::fs::write(&config, text)?;
    let (code, stdout, stderr) = run_cli(&["check", "--config", &config.display().to_string()])?;
    ensure!(code == 0, "{stdout}{stderr}");
    ensure!(
        stdout.contains("2 definition(s)") && stdout.contains("0 problem(s)"),
        "{stdout}"
    );
    // Unchanged, its kubeconfig does not exist here, and `check` says so.
    let (code, _, stderr) = run_cli(&["check", "--config", &format!("{ROOT}/config/config.toml")])?;
    ensure!(
        code == 1 && stderr.contains("/etc/endpoints-operator/kubeconfig"),
        "{stderr}"
    );
    Ok(())
}

fn systemd_unit() -> Result<()> {
    let unit = std::fs::read_to_string(format!("{ROOT}/systemd/endpoints-operator.service"))?;
    // The directives as written (`key=value` lines of any section).
    let directives: Vec<(&str, &str)> = unit
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .collect();
    let value = |key: &str| {
        directives
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| *v)
            .with_context(|| format!("the unit has no {key}="))
    };
    for (key, wanted) in [
        ("ExecReload", "/bin/kill -HUP $MAINPID"),
        // A static user that reads /etc/endpoints-operator through its group (see below).
        ("User", "endpoints-operator"),
        ("Group", "endpoints-operator"),
        ("RemoveIPC", "yes"),
        ("ProtectSystem", "strict"),
        ("NoNewPrivileges", "yes"),
        ("CapabilityBoundingSet", ""),
        ("AmbientCapabilities", ""),
        // Soft and hard alike: the daemon need not call setrlimit, which @resources filters.
        ("LimitNOFILE", "65536"),
        ("SystemCallErrorNumber", "EPERM"),
    ] {
        ensure!(
            value(key)? == wanted,
            "{key}={} (want {wanted:?})",
            value(key)?
        );
    }
    // A dynamic user could not read root's files, and systemd does not chown a
    // ConfigurationDirectory: neither may come back.
    for key in [
        "DynamicUser",
        "ConfigurationDirectory",
        "ConfigurationDirectoryMode",
    ] {
        ensure!(value(key).is_err(), "the unit sets {key}=");
    }
    // The install steps make that user and give the folder and every file in it (kubeconfigs
    // hold credentials) to root and its group, readable by the group and no one else.
    let steps: Vec<&str> = unit
        .lines()
        .filter_map(|l| l.strip_prefix("#   "))
        .collect();
    let step = |start: &str| {
        steps
            .iter()
            .find(|s| s.starts_with(start))
            .with_context(|| format!("no install step `{start}…` at the top of the unit"))
    };
    ensure!(
        step("useradd --system")?.contains("--shell /usr/sbin/nologin endpoints-operator"),
        "{steps:#?}"
    );
    ensure!(
        step("install -d ")?.starts_with(
            "install -d -o root -g endpoints-operator -m 0750 /etc/endpoints-operator "
        ),
        "{steps:#?}"
    );
    for file in ["config.toml", "east.kubeconfig", "postgres.yaml"] {
        let prefix = format!("install -o root -g endpoints-operator -m 0640 {file} ");
        step(&prefix)?;
    }
    let mut families: Vec<&str> = value("RestrictAddressFamilies")?.split(' ').collect();
    families.sort_unstable();
    ensure!(
        families == ["AF_INET", "AF_INET6", "AF_NETLINK", "AF_UNIX"],
        "RestrictAddressFamilies: {families:?}"
    );

    // verify needs the ExecStart binary to exist: point the unit at the one cargo built.
    let dir = tempfile::tempdir()?;
    let unit = unit.replace(
        "/usr/local/bin/endpoints-operator",
        &binary().display().to_string(),
    );
    let path = dir.path().join("endpoints-operator.service");
    std::fs::write(&path, unit)?;
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .context("running systemd-analyze (package systemd)")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {stderr}"
    );

    // systemd's own reading of the sandbox (offline: the unit file alone, nothing is started).
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--threshold=20", "--no-pager"])
        .arg(&path)
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stderr.contains("unrecognized option") {
        // Before systemd 250 there is no offline review; the directives were checked above.
        eprintln!("systemd-analyze security --offline is not supported here: {stderr}");
        return Ok(());
    }
    let exposure = stdout
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .with_context(|| format!("no exposure level in:\n{stdout}{stderr}"))?;
    eprintln!("systemd unit: {}", exposure.trim_start_matches('→').trim());
    ensure!(
        out.status.success(),
        "exposure above 2.0:\n{stdout}{stderr}"
    );
    for check in [
        "User=/DynamicUser=",
        "NoNewPrivileges=",
        "ProtectSystem=",
        "CapabilityBoundingSet=~CAP_SYS_ADMIN",
        "CapabilityBoundingSet=~CAP_NET_ADMIN",
        "RestrictAddressFamilies=~AF_PACKET",
        "RestrictAddressFamilies=~…",
    ] {
        ensure!(
            stdout
                .lines()
                .any(|l| l.starts_with('✓') && l.split_whitespace().nth(1) == Some(check)),
            "systemd-analyze security does not pass {check}:\n{stdout}"
        );
    }
    Ok(())
}

/// The Deployment of deploy/endpoints-operator.yaml (the chart renders the same).
fn deployment() -> Result<(Vec<Value>, Value)> {
    let text = std::fs::read_to_string(format!("{ROOT}/deploy/endpoints-operator.yaml"))?;
    let docs = documents(&text)?;
    let deployment = docs
        .iter()
        .find(|d| d["kind"] == "Deployment")
        .cloned()
        .context("deploy/ has no Deployment")?;
    Ok((docs, deployment))
}

/// The Dockerfile cannot be built here (no container engine), so what ties it to the manifests is
/// checked instead: the binary it builds is its entrypoint, its user is the Deployment's
/// runAsUser, its default command is the Deployment's args, whose config file is where the
/// ConfigMap is mounted, and the manifests run the version Cargo.toml has.
fn dockerfile() -> Result<()> {
    let text = std::fs::read_to_string(format!("{ROOT}/Dockerfile"))?;
    // Instructions with their continuation lines joined, comments dropped.
    let mut instructions: Vec<String> = Vec::new();
    let mut continued = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let part = line.trim_end_matches('\\').trim();
        match (continued, instructions.last_mut()) {
            (true, Some(last)) => {
                last.push(' ');
                last.push_str(part);
            }
            _ => instructions.push(part.to_string()),
        }
        continued = line.ends_with('\\');
    }
    let stages: Vec<usize> = (0..instructions.len())
        .filter(|&i| instructions[i].starts_with("FROM "))
        .collect();
    ensure!(
        stages.len() == 2,
        "want a build and a runtime stage: {instructions:#?}"
    );
    let (build, runtime) = instructions[1..].split_at(stages[1] - 1);
    let from = &instructions[0];
    let version = from
        .strip_prefix("FROM rust:")
        .and_then(|f| f.strip_suffix("-bookworm AS build"))
        .with_context(|| format!("the build stage is not the official Rust image: {from}"))?;
    let minor =
        |v: &str| -> Result<u32> { Ok(v.split('.').nth(1).context("no minor version")?.parse()?) };
    ensure!(
        minor(version)? >= minor(env!("CARGO_PKG_RUST_VERSION"))?,
        "rust:{version} is older than rust-version"
    );
    let run = build
        .iter()
        .find(|i| i.starts_with("RUN "))
        .context("no RUN in the build stage")?;
    ensure!(
        run.contains("cargo build --release --locked --bin endpoints-operator")
            && run.contains("target/release/endpoints-operator /out/endpoints-operator"),
        "{run}"
    );
    let one = |name: &str| {
        let found: Vec<&str> = runtime
            .iter()
            .filter_map(|i| i.strip_prefix(name)?.strip_prefix(' '))
            .collect();
        ensure!(
            found.len() == 1,
            "the runtime stage has {} {name}",
            found.len()
        );
        Ok(found[0])
    };
    let binary = one("COPY")?
        .strip_prefix("--from=build /out/endpoints-operator ")
        .context("the runtime stage copies something else")?;
    let entrypoint: Vec<String> = serde_json::from_str(one("ENTRYPOINT")?)?;
    ensure!(
        entrypoint == [binary],
        "ENTRYPOINT {entrypoint:?}, binary {binary}"
    );
    let cmd: Vec<String> = serde_json::from_str(one("CMD")?)?;

    let (docs, deployment) = deployment()?;
    let pod = &deployment["spec"]["template"]["spec"];
    let uid = pod["securityContext"]["runAsUser"]
        .as_u64()
        .context("runAsUser")?;
    ensure!(pod["securityContext"]["runAsNonRoot"] == true, "{pod:#}");
    ensure!(
        one("USER")? == format!("{uid}:{uid}"),
        "USER {} but runAsUser {uid}",
        one("USER")?
    );
    let container = &pod["containers"][0];
    ensure!(
        container["image"] == format!("endpoints-operator:{}", env!("CARGO_PKG_VERSION")),
        "image {} (Cargo.toml: {})",
        container["image"],
        env!("CARGO_PKG_VERSION")
    );
    let args: Vec<String> = serde_json::from_value(container["args"].clone())?;
    ensure!(
        args == cmd,
        "the Deployment runs {args:?}, the image {cmd:?}"
    );
    let chart = std::fs::read_to_string(format!("{ROOT}/{CHART}/Chart.yaml"))?;
    let chart: Value = serde_saphyr::from_str(&chart)?;
    ensure!(
        chart["appVersion"] == env!("CARGO_PKG_VERSION"),
        "appVersion {}",
        chart["appVersion"]
    );

    // The config file: a key of the ConfigMap mounted as the whole folder (see below).
    let config = Path::new(
        &cmd[cmd
            .iter()
            .position(|a| a == "--config")
            .context("--config")?
            + 1],
    );
    let mounts = container["volumeMounts"]
        .as_array()
        .context("volumeMounts")?;
    ensure!(
        mounts.iter().all(|m| m.get("subPath").is_none()),
        "a subPath mount never sees a ConfigMap edit: {mounts:#?}"
    );
    let mount = mounts
        .iter()
        .find(|m| {
            Path::new(m["mountPath"].as_str().unwrap_or_default()) == config.parent().unwrap()
        })
        .with_context(|| format!("nothing is mounted at the folder of {}", config.display()))?;
    let volume = pod["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| v["name"] == mount["name"])
        .context("no volume for the config mount")?;
    let configmap = &volume["configMap"]["name"];
    let data = docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == *configmap)
        .with_context(|| format!("no ConfigMap {configmap}"))?;
    let key = config.file_name().unwrap().to_string_lossy();
    ensure!(
        data["data"].get(key.as_ref()).is_some(),
        "ConfigMap {configmap} has no {key}"
    );
    Ok(())
}

/// A kubelet-style ConfigMap folder, as the Deployment mounts it: each version of the files in a
/// hidden folder, `..data` a symlink to the current one, and each file a symlink through `..data`.
/// An edit arrives as a new version folder and an atomic rename of `..data`; the file itself
/// never changes. The daemon must follow that like an edit.
async fn config_mount_follows_edits() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let root = dir.path();
    // A cluster that never answers: the test is about what the daemon reads, not what it writes.
    let kubeconfig = root.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\nclusters: [{name: c, cluster: {server: \"https://127.0.0.1:1\"}}]\n\
         users: [{name: u, user: {token: x}}]\ncontexts: [{name: c, context: {cluster: c, user: u}}]\n\
         current-context: c\n",
    )?;
    for name in ["first", "second"] {
        std::fs::create_dir(root.join(name))?;
        std::fs::write(
            root.join(name).join("d.yaml"),
            format!(
                "apiVersion: sealos.io/v1beta1\nkind: ClusterEndpoint\nmetadata: {{name: {name}, namespace: default}}\n\
                 spec:\n  ports:\n    - {{port: 80, hosts: [\"10.240.255.1\"]}}\n"
            ),
        )?;
    }
    let listen = crate::support::daemon::free_port()?;
    let config = |definitions: &str| {
        format!(
            "[status]\nlisten = \"{listen}\"\n[sources]\npaths = [\"{}\"]\n[[clusters]]\nname = \"c\"\nkubeconfig = \"{}\"\n",
            root.join(definitions).display(),
            kubeconfig.display()
        )
    };
    let mounted = root.join("etc");
    std::fs::create_dir_all(mounted.join("..v1"))?;
    std::fs::write(mounted.join("..v1/config.toml"), config("first"))?;
    std::os::unix::fs::symlink("..v1", mounted.join("..data"))?;
    std::os::unix::fs::symlink("..data/config.toml", mounted.join("config.toml"))?;

    let log = std::fs::File::create(root.join("daemon.log"))?;
    let child = Command::new(binary())
        .args(["run", "--config"])
        .arg(mounted.join("config.toml"))
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _child = Kill(child);
    crate::support::control_plane::install_crypto_provider();
    let client = reqwest::Client::builder().no_proxy().build()?;
    let definitions = || async {
        let status = client
            .get(format!("http://{listen}/api/v1/status"))
            .send()
            .await?
            .text()
            .await?;
        let status: Value = serde_json::from_str(&status)?;
        let names: Vec<String> = status["definitions"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|d| Some(d["name"].as_str()?.to_string()))
            .collect();
        anyhow::Ok(names)
    };
    let until = |wanted: &'static str| async move {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let now = definitions().await.unwrap_or_default();
            if now == [wanted] {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                let log = std::fs::read_to_string(root.join("daemon.log")).unwrap_or_default();
                bail!("definitions {now:?}, want [{wanted}]\n{log}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    until("first").await?;
    // What the kubelet's atomic writer does on an edit.
    std::fs::create_dir(mounted.join("..v2"))?;
    std::fs::write(mounted.join("..v2/config.toml"), config("second"))?;
    std::os::unix::fs::symlink("..v2", mounted.join("..data_tmp"))?;
    std::fs::rename(mounted.join("..data_tmp"), mounted.join("..data"))?;
    std::fs::remove_dir_all(mounted.join("..v1"))?;
    until("second").await
}

/// Server-side applies deploy/endpoints-operator.yaml once per test run: the tests that need it
/// share it rather than race to create the same objects.
async fn apply_deploy(cp: &ControlPlane) -> Result<()> {
    static APPLIED: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    APPLIED
        .get_or_try_init(|| async {
            let client = cp.client();
            let text = std::fs::read_to_string(format!("{ROOT}/deploy/endpoints-operator.yaml"))?;
            let objects: Vec<DynamicObject> = serde_saphyr::from_multiple(&text)?;
            let discovery = Discovery::new(client.clone()).run().await?;
            for object in &objects {
                let types = object.types.clone().context("apiVersion/kind")?;
                let gvk = kube::api::GroupVersionKind::try_from(&types)?;
                let (resource, caps) = discovery
                    .resolve_gvk(&gvk)
                    .with_context(|| format!("unknown kind {gvk:?}"))?;
                let api: Api<DynamicObject> = match caps.scope {
                    Scope::Namespaced => Api::namespaced_with(
                        client.clone(),
                        &object.namespace().context("namespace")?,
                        &resource,
                    ),
                    Scope::Cluster => Api::all_with(client.clone(), &resource),
                };
                api.patch(
                    &object.name_any(),
                    &PatchParams::apply("packaging-test"),
                    &Patch::Apply(object),
                )
                .await
                .with_context(|| format!("applying {} {}", types.kind, object.name_any()))?;
            }
            anyhow::Ok(())
        })
        .await?;
    Ok(())
}

async fn deploy_manifests(cp: &'static ControlPlane) -> Result<()> {
    apply_deploy(cp).await?;
    let user = format!("system:serviceaccount:{NS}:{SA}");
    let reviews: Api<SubjectAccessReview> = Api::all(cp.client());
    // `resource` may name a subresource as RBAC rules do: `clusterendpoints/status`.
    let allowed = |namespace: &str, group: &str, resource: &str, verb: &str| {
        let (resource, subresource) = match resource.split_once('/') {
            Some((resource, sub)) => (resource, Some(sub.to_string())),
            None => (resource, None),
        };
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(user.clone()),
                resource_attributes: Some(ResourceAttributes {
                    group: Some(group.into()),
                    resource: Some(resource.into()),
                    subresource,
                    verb: Some(verb.into()),
                    namespace: Some(namespace.into()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let reviews = reviews.clone();
        async move {
            Ok::<_, anyhow::Error>(
                reviews
                    .create(&PostParams::default(), &review)
                    .await?
                    .status
                    .is_some_and(|s| s.allowed),
            )
        }
    };
    // create: a server-side apply that makes a new object is authorized as create.
    let core = ["get", "list", "watch", "create", "patch", "delete"];
    let granted: [(&str, &str, &str, &[&str]); 7] = [
        ("default", "", "services", &core),
        ("default", "", "endpoints", &core),
        ("default", "discovery.k8s.io", "endpointslices", &core),
        // Watched; patched only to drop the original operator's finalizer.
        (
            "default",
            "sealos.io",
            "clusterendpoints",
            &["get", "list", "watch", "patch"],
        ),
        (
            "default",
            "sealos.io",
            "clusterendpoints/status",
            &["patch"],
        ),
        ("default", "events.k8s.io", "events", &["create", "patch"]),
        // What kube-lease-manager calls: get, create when missing, patch to take, renew, release.
        (
            NS,
            "coordination.k8s.io",
            "leases",
            &["get", "create", "patch"],
        ),
    ];
    for (namespace, group, resource, verbs) in granted {
        for verb in verbs {
            ensure!(
                allowed(namespace, group, resource, verb).await?,
                "{verb} {group}/{resource} in {namespace} must be allowed"
            );
        }
    }
    for (namespace, group, resource, verb) in [
        ("default", "", "secrets", "get"),
        ("default", "", "pods", "list"),
        ("default", "", "services", "deletecollection"),
        ("default", "apps", "deployments", "patch"),
        // No finalizer of its own, and never deletes or rewrites a user's object.
        ("default", "sealos.io", "clusterendpoints", "update"),
        ("default", "sealos.io", "clusterendpoints", "delete"),
        ("default", "sealos.io", "clusterendpoints", "create"),
        ("default", "sealos.io", "clusterendpoints/status", "update"),
        (
            "default",
            "sealos.io",
            "clusterendpoints/finalizers",
            "update",
        ),
        ("default", "events.k8s.io", "events", "delete"),
        ("default", "", "events", "create"),
        // Leases: only those three verbs, and only in its own namespace.
        (NS, "coordination.k8s.io", "leases", "list"),
        (NS, "coordination.k8s.io", "leases", "watch"),
        (NS, "coordination.k8s.io", "leases", "update"),
        (NS, "coordination.k8s.io", "leases", "delete"),
        ("default", "coordination.k8s.io", "leases", "get"),
        ("default", "coordination.k8s.io", "leases", "create"),
        ("default", "coordination.k8s.io", "leases", "patch"),
        ("kube-system", "coordination.k8s.io", "leases", "patch"),
    ] {
        ensure!(
            !allowed(namespace, group, resource, verb).await?,
            "{verb} {group}/{resource} in {namespace} must be denied"
        );
    }
    Ok(())
}

/// `helm` from `$HELM`, else from PATH, else the one testenv/build.sh builds (and caches) from
/// the Go module proxy. Never skipped: without helm the test fails.
fn helm() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("HELM") {
        return Ok(PathBuf::from(path));
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("helm"))
            .find(|p| p.is_file())
    });
    if let Some(path) = on_path {
        return Ok(path);
    }
    let out = Command::new("bash")
        .arg(format!("{ROOT}/testenv/build.sh"))
        .arg("helm")
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running testenv/build.sh helm")?;
    ensure!(
        out.status.success(),
        "testenv/build.sh helm failed ({}): the chart test needs helm",
        out.status
    );
    let path = String::from_utf8(out.stdout)?;
    Ok(PathBuf::from(
        path.lines().last().unwrap_or_default().trim(),
    ))
}

/// `helm ARGS…` on the chart: (success, stdout, stderr).
fn run_helm(helm: &Path, args: &[&str]) -> Result<(bool, String, String)> {
    let out = Command::new(helm)
        .args(args)
        .current_dir(ROOT)
        .output()
        .with_context(|| format!("running {}", helm.display()))?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// `helm template endpoints-operator CHART -n endpoints-operator ARGS…`, as documents.
fn render(helm: &Path, args: &[&str]) -> Result<Vec<Value>> {
    let mut all = vec!["template", "endpoints-operator", CHART, "--namespace", NS];
    all.extend_from_slice(args);
    let (ok, stdout, stderr) = run_helm(helm, &all)?;
    ensure!(ok, "helm template {args:?}: {stderr}");
    documents(&stdout)
}

fn documents(text: &str) -> Result<Vec<Value>> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(text)?;
    Ok(docs.into_iter().filter(|d| !d.is_null()).collect())
}

/// Labels the chart adds to every object for Helm's bookkeeping, beyond deploy/'s content.
const HELM_LABELS: [&str; 5] = [
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
    "helm.sh/chart",
];

/// An object as it means: without Helm's labels and rollout checksums, with the config read as
/// TOML and definitions as YAML (so comments and layout do not count, every value does).
fn meaning(mut doc: Value) -> Result<Value> {
    // (`pointer_mut`, not indexing: `value["key"]` on a missing key would add a null.)
    let strip = |doc: &mut Value, at: &str, key: &str, drop: &dyn Fn(&str) -> bool| {
        let Some(parent) = doc.pointer_mut(at).and_then(Value::as_object_mut) else {
            return;
        };
        if let Some(map) = parent.get_mut(key).and_then(Value::as_object_mut) {
            map.retain(|k, _| !drop(k));
            if map.is_empty() {
                parent.remove(key);
            }
        }
    };
    strip(&mut doc, "/metadata", "labels", &|k| {
        HELM_LABELS.contains(&k)
    });
    strip(&mut doc, "/spec/template/metadata", "annotations", &|k| {
        k.starts_with("checksum/")
    });
    let data = match doc["kind"] == "ConfigMap" {
        true => doc.pointer_mut("/data").and_then(Value::as_object_mut),
        false => None,
    };
    for (file, text) in data.into_iter().flatten() {
        let raw = text.as_str().unwrap_or_default().to_string();
        *text = if file.ends_with(".toml") {
            serde_json::to_value(toml::from_str::<toml::Table>(&raw)?)?
        } else {
            Value::Array(documents(&raw)?)
        };
    }
    Ok(doc)
}

/// Objects by kind/namespace/name.
fn by_name(docs: Vec<Value>) -> Result<BTreeMap<String, Value>> {
    let mut out = BTreeMap::new();
    for doc in docs {
        let key = format!(
            "{}/{}/{}",
            doc["kind"].as_str().unwrap_or_default(),
            doc["metadata"]["namespace"].as_str().unwrap_or_default(),
            doc["metadata"]["name"].as_str().unwrap_or_default()
        );
        ensure!(
            out.insert(key.clone(), meaning(doc)?).is_none(),
            "{key} twice"
        );
    }
    Ok(out)
}

fn helm_chart(cp: &ControlPlane) -> Result<()> {
    let crd = std::fs::read(format!("{ROOT}/deploy/crd.yaml"))?;
    let mut shipped = Vec::new();
    for entry in std::fs::read_dir(format!("{ROOT}/{CHART}/crds"))? {
        let path = entry?.path();
        ensure!(
            path.extension().is_some_and(|e| e == "yaml"),
            "{} in crds/ is not a .yaml file",
            path.display()
        );
        ensure!(
            std::fs::read(&path)? == crd,
            "{} differs from deploy/crd.yaml: copy it over",
            path.display()
        );
        shipped.push(path);
    }
    ensure!(shipped.len() == 1, "crds/ holds {shipped:?}");

    let helm = helm()?;
    let (ok, stdout, stderr) = run_helm(&helm, &["lint", "--strict", CHART])?;
    ensure!(ok, "helm lint: {stdout}{stderr}");

    // The chart with its defaults is deploy/ (whose Namespace comes from --create-namespace).
    let chart = by_name(render(&helm, &["--include-crds"])?)?;
    let deploy_text = std::fs::read_to_string(format!("{ROOT}/deploy/endpoints-operator.yaml"))?;
    let crd_text = String::from_utf8(crd)?;
    let mut deploy = by_name([documents(&deploy_text)?, documents(&crd_text)?].concat())?;
    deploy
        .remove(&format!("Namespace//{NS}"))
        .context("deploy/ has a Namespace")?;
    let names = |m: &BTreeMap<String, Value>| m.keys().cloned().collect::<Vec<_>>();
    ensure!(
        names(&chart) == names(&deploy),
        "the chart renders {:?}, deploy/ holds {:?}",
        names(&chart),
        names(&deploy)
    );
    for (name, object) in &deploy {
        ensure!(
            chart[name] == *object,
            "{name} differs.\nchart: {:#}\ndeploy/: {object:#}",
            chart[name]
        );
    }

    // The rendered config and definitions are what `check` accepts (unknown keys are errors).
    let dir = tempfile::tempdir()?;
    let rendered = render(&helm, &[])?;
    let data = |name: &str| {
        rendered
            .iter()
            .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == name)
            .map(|d| d["data"].clone())
            .with_context(|| format!("no ConfigMap {name}"))
    };
    let definitions = dir.path().join("endpoints.d");
    std::fs::create_dir(&definitions)?;
    for (file, text) in data("endpoints-operator-definitions")?
        .as_object()
        .context("data")?
    {
        std::fs::write(definitions.join(file), text.as_str().unwrap_or_default())?;
    }
    let config = data("endpoints-operator")?["config.toml"]
        .as_str()
        .context("config.toml")?
        .replace("/etc/endpoints-operator/endpoints.d", "endpoints.d");
    let config_path = dir.path().join("config.toml");
    std::fs::write(
        &config_path,
        format!(
            "{config}[[clusters]]\nname = \"test\"\nkubeconfig = \"{}\"\n",
            cp.kubeconfig_path().display()
        ),
    )?;
    let (code, stdout, stderr) = run_cli(&["check", "--config", &config_path.to_string_lossy()])?;
    ensure!(
        code == 0 && stdout.contains("1 definition(s)"),
        "check of the rendered config: {stdout}{stderr}"
    );

    // Values reach the output.
    let set = [
        "--set",
        "replicas=3,statusPort=9999,crd=false,namespaces={a,b},image.tag=9.9,instance=east",
        "--set",
        "leaderElection.leaseSeconds=20",
        "--set-string",
        "extraConfig=[probes]\nconcurrency = 5",
    ];
    let custom = by_name(render(&helm, &set)?)?;
    let deployment = &custom[&format!("Deployment/{NS}/endpoints-operator")];
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    ensure!(deployment["spec"]["replicas"] == 3, "{deployment:#}");
    ensure!(
        container["image"] == "endpoints-operator:9.9",
        "{container:#}"
    );
    ensure!(
        container["ports"][0]["containerPort"] == 9999,
        "{container:#}"
    );
    let config = &custom[&format!("ConfigMap/{NS}/endpoints-operator")]["data"]["config.toml"];
    let wanted = json!({
        "instance": "east",
        "status": {"listen": "0.0.0.0:9999"},
        "sources": {"paths": ["/etc/endpoints-operator/endpoints.d"], "crd": false, "namespaces": ["a", "b"]},
        "leader_election": {"enabled": true, "lease_seconds": 20},
        "probes": {"concurrency": 5},
    });
    ensure!(*config == wanted, "config: {config:#}");

    // One replica may run without leader election (and then has no Role); more may not.
    let single = by_name(render(
        &helm,
        &["--set", "leaderElection.enabled=false,replicas=1"],
    )?)?;
    ensure!(
        !single.keys().any(|k| k.starts_with("Role")),
        "{:?}",
        names(&single)
    );
    let (ok, _, stderr) = run_helm(
        &helm,
        &[
            "template",
            "x",
            CHART,
            "--set",
            "leaderElection.enabled=false",
        ],
    )?;
    ensure!(
        !ok && stderr.contains("needs leaderElection.enabled"),
        "two replicas without leader election rendered: {stderr}"
    );
    Ok(())
}

/// A kubeconfig for the control plane that authenticates with `token` alone.
fn token_kubeconfig(cp: &ControlPlane, token: &str, path: &Path) -> Result<()> {
    let admin = Kubeconfig::read_from(cp.kubeconfig_path())?;
    let ca = admin
        .clusters
        .first()
        .and_then(|c| c.cluster.as_ref()?.certificate_authority_data.clone())
        .context("the admin kubeconfig has no CA")?;
    std::fs::write(
        path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {}\n    \
             certificate-authority-data: {ca}\nusers:\n- name: {SA}\n  user:\n    token: {token}\n\
             contexts:\n- name: test\n  context:\n    cluster: test\n    user: {SA}\n\
             current-context: test\n",
            cp.server_url()
        ),
    )?;
    Ok(())
}

async fn client_from(kubeconfig: &Path) -> Result<Client> {
    crate::support::control_plane::install_crypto_provider();
    let mut config = kube::Config::from_custom_kubeconfig(
        Kubeconfig::read_from(kubeconfig)?,
        &KubeConfigOptions::default(),
    )
    .await?;
    config.proxy_url = None;
    Ok(Client::try_from(config)?)
}

/// The API server's 403 and nothing else.
fn forbidden<T: std::fmt::Debug>(what: &str, result: kube::Result<T>) -> Result<()> {
    match result {
        Err(kube::Error::Api(e)) if e.code == 403 => Ok(()),
        other => bail!("{what}: want 403 Forbidden, got {other:?}"),
    }
}

fn web(name: &str, ns: &str, host: &Host, finalizers: &[&str]) -> Result<DynamicObject> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "sealos.io/v1beta1",
        "kind": "ClusterEndpoint",
        "metadata": {"name": name, "namespace": ns, "finalizers": finalizers},
        "spec": {"periodSeconds": 1, "ports": [{
            "name": "http", "port": 80, "targetPort": 8080, "hosts": [host.ip().to_string()],
            "tcpSocket": {"enable": true}, "failureThreshold": 2
        }]}
    }))?)
}

async fn gone<K>(api: &Api<K>, name: &str) -> Result<()>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    watch::until(api.clone(), "", WAIT, |objects| !objects.contains_key(name))
        .await
        .with_context(|| format!("{name} did not go"))?;
    Ok(())
}

async fn service_account_token(cp: &'static ControlPlane) -> Result<()> {
    apply_deploy(cp).await?;
    let admin = cp.client();
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            expiration_seconds: Some(3600),
            ..Default::default()
        }),
        ..Default::default()
    };
    let token = Api::<ServiceAccount>::namespaced(admin.clone(), NS)
        .create_token_request(SA, &PostParams::default(), &request)
        .await
        .context("TokenRequest for the ServiceAccount")?
        .status
        .and_then(|s| s.token)
        .context("no token issued")?;
    let dir = tempfile::tempdir()?;
    let kubeconfig = dir.path().join("service-account.kubeconfig");
    token_kubeconfig(cp, &token, &kubeconfig)?;
    let sa = client_from(&kubeconfig).await?;
    let me = Api::<SelfSubjectReview>::all(sa.clone())
        .create(&PostParams::default(), &SelfSubjectReview::default())
        .await
        .context("the token does not authenticate")?;
    let user = me.status.and_then(|s| s.user_info?.username);
    ensure!(
        user.as_deref() == Some(&format!("system:serviceaccount:{NS}:{SA}")),
        "the token is {user:?}"
    );

    let net = TestNet::new()?;
    let (h1, h2) = (net.add_host()?, net.add_host()?);
    let _server1 = h1.serve_tcp(8080)?;
    let server2 = h2.serve_tcp(8080)?;
    let s = Scratch::new(cp, "packaging-token").await?;
    let objects = endpoints(&admin, &s.ns);
    objects
        .create(
            &PostParams::default(),
            &web("from-object", &s.ns, &h2, &[])?,
        )
        .await?;
    let file = format!(
        "apiVersion: sealos.io/v1beta1\nkind: ClusterEndpoint\nmetadata: {{name: from-file, namespace: {}}}\n\
         spec:\n  periodSeconds: 1\n  ports:\n    - {{name: http, port: 80, targetPort: 8080, hosts: [\"{}\"], \
         tcpSocket: {{enable: true}}}}\n",
        s.ns,
        h1.ip()
    );
    let instance = Daemon::new_instance();
    let election =
        format!("[leader_election]\nenabled = true\nnamespace = \"{NS}\"\nlease_seconds = 10\n");
    let daemon = Daemon::start_with_kubeconfig(
        cp,
        &kubeconfig,
        &[("from-file.yaml", file)],
        &s.ns,
        &instance,
        &election,
    )?;
    let log = |daemon: &Daemon| daemon.log_tail(40);

    // The Lease: created in the release namespace and held.
    let lease_name = format!("endpoints-operator-{instance}");
    let leases: Api<Lease> = Api::namespaced(admin.clone(), NS);
    watch::until(leases.clone(), "", WAIT, |leases| {
        leases
            .get(&lease_name)
            .and_then(|l| l.spec.as_ref()?.holder_identity.as_ref())
            .is_some_and(|holder| !holder.is_empty())
    })
    .await
    .with_context(|| format!("no held Lease {NS}/{lease_name}\n{}", log(&daemon)))?;

    // Service, EndpointSlices and Endpoints, for a file and for an object.
    for (name, host) in [("from-file", &h1), ("from-object", &h2)] {
        let slice = format!("{name}-80-tcp-ipv4");
        slices_become(&s, name, &expect(&[(&slice, host, true)]), WAIT)
            .await
            .with_context(|| log(&daemon))?;
        s.api::<Service>().get(name).await?;
        let subsets = s.api::<Endpoints>().get(name).await?.subsets;
        let ip = host.ip().to_string();
        ensure!(
            subsets
                .iter()
                .flatten()
                .flat_map(|s| s.addresses.iter().flatten())
                .any(|a| a.ip == ip),
            "Endpoints {name}: {subsets:?}"
        );
    }
    // The object's status.
    watch::until(objects.clone(), "", WAIT, |objects| {
        objects
            .get("from-object")
            .is_some_and(|o| o.data["status"]["phase"] == "Healthy")
    })
    .await
    .with_context(|| format!("no status written\n{}", log(&daemon)))?;
    // Events: a host going down is told on the object.
    server2.stop();
    let events: Api<Event> = Api::namespaced(admin.clone(), &s.ns);
    watch::until(events, "", WAIT, |events| {
        events.values().any(|e| {
            e.reason.as_deref() == Some("HostNotReady")
                && e.regarding.as_ref().and_then(|r| r.kind.as_deref()) == Some("ClusterEndpoint")
        })
    })
    .await
    .with_context(|| format!("no HostNotReady Event\n{}", log(&daemon)))?;
    // Pruning: a removed file's objects are deleted.
    std::fs::remove_file(daemon.definitions_dir().join("from-file.yaml"))?;
    gone(&s.api::<Service>(), "from-file")
        .await
        .with_context(|| log(&daemon))?;
    // Leading, connected, nothing failing or pending, ready.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let status = daemon.status().await?;
        let cluster = &status["clusters"][0];
        let settled =
            cluster["pending"] == 0 && cluster["errors"].as_object().is_some_and(|e| e.is_empty());
        if cluster["leading"] == true && cluster["connected"] == true && settled {
            break;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "{cluster:#}\n{}",
            log(&daemon)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (code, _, body) = daemon.get("/readyz").await?;
    ensure!(code == 200, "/readyz {code}: {body}");
    // The original operator's finalizer is patched off an object being deleted. (Last: the
    // garbage collector then races the daemon to delete the object's Service, and a 404 the
    // daemon gets may stay listed as a pending error.)
    objects
        .create(
            &PostParams::default(),
            &web(
                "legacy",
                &s.ns,
                &h1,
                &["sealos.io/cluster-endpoints.finalizers"],
            )?,
        )
        .await?;
    slices_become(
        &s,
        "legacy",
        &expect(&[("legacy-80-tcp-ipv4", &h1, true)]),
        WAIT,
    )
    .await?;
    objects.delete("legacy", &DeleteParams::default()).await?;
    gone(&objects, "legacy")
        .await
        .with_context(|| format!("the finalizer stayed\n{}", log(&daemon)))?;
    // Nothing it tried was refused.
    let text = std::fs::read_to_string(daemon.dir().join("daemon.log"))?;
    ensure!(
        // ("403" alone would match timestamps.)
        !text.to_lowercase().contains("forbidden"),
        "the daemon was refused something:\n{text}"
    );

    // The same token is refused what the daemon does not need.
    forbidden(
        "get secrets",
        Api::<Secret>::namespaced(sa.clone(), &s.ns)
            .get("any")
            .await,
    )?;
    forbidden(
        "delete clusterendpoints",
        endpoints(&sa, &s.ns)
            .delete("from-object", &DeleteParams::default())
            .await,
    )?;
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "intruder"},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]}
    }))?;
    forbidden(
        "create pods",
        Api::<Pod>::namespaced(sa.clone(), &s.ns)
            .create(&PostParams::default(), &pod)
            .await,
    )?;
    forbidden(
        "list leases in another namespace",
        Api::<Lease>::namespaced(sa.clone(), &s.ns)
            .list(&ListParams::default())
            .await,
    )?;
    forbidden(
        "list leases in its own namespace",
        Api::<Lease>::namespaced(sa.clone(), NS)
            .list(&ListParams::default())
            .await,
    )?;
    forbidden(
        "delete its Lease",
        Api::<Lease>::namespaced(sa.clone(), NS)
            .delete(&lease_name, &DeleteParams::default())
            .await,
    )?;

    ensure!(daemon.stop()? == Some(0), "the daemon did not stop cleanly");
    let _ = leases.delete(&lease_name, &DeleteParams::default()).await;
    s.cleanup().await;
    Ok(())
}
