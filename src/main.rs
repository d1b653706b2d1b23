//! `endpoints-operator`: health-checked Services and EndpointSlices for hosts outside the cluster.

mod config;
mod daemon;
mod model;
mod plan;
mod probe;
mod probe_command;
mod render;
mod sink;
mod sources;
mod status;
mod timefmt;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use crate::config::Overrides;

#[derive(Parser)]
#[command(
    version,
    about = "Health-checked Kubernetes Services and EndpointSlices for hosts outside the cluster"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "ENDPOINTS_OPERATOR_LOG_FORMAT")]
    log_format: LogFormat,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: probe every host and keep each cluster's Services and EndpointSlices true.
    Run {
        #[command(flatten)]
        config: ConfigArgs,
        /// Status server address (overrides `status.listen`).
        #[arg(long)]
        listen: Option<SocketAddr>,
    },
    /// Validate the config and every definition file without touching the network; exit 1 on any problem.
    Check {
        #[command(flatten)]
        config: ConfigArgs,
        /// Definition files or folders to check instead of `sources.paths`.
        files: Vec<PathBuf>,
    },
    /// Show what `run` would create, update and delete in each cluster, changing nothing; exit 1
    /// on problems in the config or definitions or an unreachable cluster.
    Plan {
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Probe every host of the given definition files once and print a table; exit 1 if any fails.
    Probe {
        /// Definition files or folders.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Print the ClusterEndpoint CRD (YAML), ready for `kubectl apply -f -`.
    Crd,
}

#[derive(clap::Args)]
struct ConfigArgs {
    /// Daemon config file (TOML). Default: /etc/endpoints-operator/config.toml if it exists.
    #[arg(long, short, env = "ENDPOINTS_OPERATOR_CONFIG")]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    let Cli {
        command,
        log_format,
    } = Cli::parse();
    init_tracing(log_format);
    match command {
        Command::Run { config, listen } => {
            // One crypto stack for kube, reqwest and tonic.
            let _ = rustls::crypto::ring::default_provider().install_default();
            let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
            match runtime.block_on(daemon::run(config.config, Overrides { listen })) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Check { config, files } => check(config.config, files),
        Command::Plan { config } => plan::run(config.config.as_deref()),
        Command::Probe { files } => {
            let _ = rustls::crypto::ring::default_provider().install_default();
            let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
            runtime.block_on(probe_command::run(files))
        }
        Command::Crd => {
            print!("{}", model::crd::yaml());
            ExitCode::SUCCESS
        }
    }
}

fn check(config_path: Option<PathBuf>, files: Vec<PathBuf>) -> ExitCode {
    let config = match config::load(config_path.as_deref(), &Overrides::default()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    // With objects as a source, a config may rightly have no definition files at all.
    let files_required = !files.is_empty() || !config.sources.crd;
    let paths = if files.is_empty() {
        config.sources.paths.clone()
    } else {
        files
    };
    let mut loaded = sources::files::load(&paths);
    let clusters = config.target_clusters();
    let names: Vec<String> = clusters.iter().map(|c| c.name.clone()).collect();
    loaded
        .problems
        .extend(model::unknown_clusters(loaded.definitions.values(), &names));
    let mut config_errors = 0;
    for cluster in &clusters {
        if let Err(e) = config::check_kubeconfig(cluster) {
            eprintln!("error: cluster {}: {e}", cluster.name);
            config_errors += 1;
        }
    }
    for problem in &loaded.problems {
        eprintln!("error: {problem}");
    }
    if loaded.files.is_empty() && loaded.problems.is_empty() && files_required {
        let shown: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
        eprintln!(
            "error: no definition files (*.yaml, *.yml, *.toml) in {}",
            shown.join(", ")
        );
        return ExitCode::FAILURE;
    }
    let ports: usize = loaded.definitions.values().map(|d| d.ports.len()).sum();
    let hosts: usize = loaded
        .definitions
        .values()
        .flat_map(|d| &d.ports)
        .map(|p| p.hosts.len())
        .sum();
    println!(
        "{} file(s), {} definition(s), {ports} port(s), {hosts} host(s), {} problem(s)",
        loaded.files.len(),
        loaded.definitions.len(),
        loaded.problems.len() + config_errors
    );
    if loaded.problems.is_empty() && config_errors == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn init_tracing(format: LogFormat) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    // Colour only for a person at a terminal; journald and log files get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
