//! The benchmark behind DESIGN §7: 10,000 host:port targets (100 test hosts × 100 TCP servers)
//! probed by the real daemon (release build) against a real control plane.
//!
//! It measures, at rest, the daemon's CPU (% of one core), its RSS, probes per second, how late
//! probes start against their schedule and the API writes it makes; then it kills 10 hosts at
//! once (1,000 targets; packets dropped, then servers stopped) and watches the EndpointSlices on
//! the API server for the moment each killed host turns not ready there.
//!
//! Run it through `testenv/bench.sh [--period 10|1] [--window SECS] [--kill drop|rst|both|none]`
//! (root: it creates network namespaces). Ctrl-C or an error removes everything it started.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use futures::StreamExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::runtime::watcher::{self, Event};
use serde_json::Value;
use support::daemon::{Daemon, free_port};
use support::{ControlPlane, Host, Server, TestNet, servers};
use tokio::time::Instant;

/// First TCP port of the servers on every host; definition `bench-NN` probes `FIRST_PORT + NN`.
const FIRST_PORT: u16 = 20000;
/// Probe settings of every definition (periodSeconds comes from `--period`).
const TIMEOUT_S: u64 = 1;
const FAILURE_THRESHOLD: u32 = 3;
const SUCCESS_THRESHOLD: u32 = 1;
/// What DESIGN §7 allows between the daemon's decision and the slice on the API server.
const APPLY_BUDGET: Duration = Duration::from_millis(250);
/// DESIGN §7 goals at 10,000 targets / 10 s; printed beside the figures, never asserted.
const GOAL_CPU_PERCENT: f64 = 10.0;
const GOAL_RSS_MIB: f64 = 64.0;
const SLICE_LABELS: &str = "endpointslice.kubernetes.io/managed-by=endpoints-operator.sealos.io";
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Set by Ctrl-C; every long step checks it, and the async part races against it.
static STOP: AtomicBool = AtomicBool::new(false);

#[derive(Parser, Debug)]
#[command(
    about = "Benchmark the endpoints-operator daemon at 10,000 targets against a local control plane"
)]
struct Args {
    /// periodSeconds of every definition (10 and 1 are the documented runs).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=300))]
    period: u64,
    /// Length of the measurement at rest, seconds [default: 60 for a 10 s period, 20 for 1 s].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    window: Option<u64>,
    /// How killed hosts die: packets dropped (probes time out), servers stopped (RST), both
    /// (two rounds on different hosts, each revived afterwards) or none.
    #[arg(long, value_enum, default_value_t = KillMode::Both)]
    kill: KillMode,
    /// Test hosts (network namespaces); every definition lists all of them.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u16).range(1..=253))]
    hosts: u16,
    /// TCP servers per host = definitions (`bench-00` … probes port 20000 …).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u16).range(1..=100))]
    ports: u16,
    /// Hosts killed at once in each round.
    #[arg(long, default_value_t = 10)]
    kill_hosts: usize,
    /// `[probes] concurrency` for the daemon [default: the daemon's own default].
    #[arg(long)]
    concurrency: Option<usize>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum KillMode {
    Drop,
    Rst,
    Both,
    None,
}

impl KillMode {
    fn rounds(self) -> Vec<Death> {
        match self {
            KillMode::Drop => vec![Death::Drop],
            KillMode::Rst => vec![Death::Rst],
            KillMode::Both => vec![Death::Drop, Death::Rst],
            KillMode::None => vec![],
        }
    }
}

/// One way for a host to die.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Death {
    /// Its packets to the prober are dropped: probes time out.
    Drop,
    /// Its servers are stopped: connects are refused at once.
    Rst,
}

impl Death {
    fn label(self) -> &'static str {
        match self {
            Death::Drop => "drop (timeout)",
            Death::Rst => "rst (refused)",
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) if STOP.load(Ordering::SeqCst) => {
            eprintln!("bench: interrupted; everything it started is removed");
            ExitCode::from(130)
        }
        Err(e) => {
            eprintln!("bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<()> {
    let rounds = args.kill.rounds();
    if args.kill_hosts == 0 || args.kill_hosts * rounds.len() > usize::from(args.hosts) {
        bail!(
            "--kill-hosts {} × {} round(s) needs more than --hosts {}",
            args.kill_hosts,
            rounds.len(),
            args.hosts
        );
    }
    let targets = usize::from(args.hosts) * usize::from(args.ports);
    // Every server socket lives in this process; the daemon inherits the limit too.
    let nofile = raise_nofile((targets as u64 + 8192).max(65536))?;
    if nofile < targets as u64 + 1024 {
        bail!("RLIMIT_NOFILE is {nofile}, too low for {targets} servers");
    }
    on_ctrl_c();

    println!(
        "endpoints-operator benchmark: {} hosts × {} ports = {targets} targets, period {} s \
         (RLIMIT_NOFILE now {nofile})",
        args.hosts, args.ports, args.period
    );
    println!("Starting the control plane (the first run builds it: tens of minutes)…");
    let cp = ControlPlane::start("bench")?;
    let result = if STOP.load(Ordering::SeqCst) {
        Err(anyhow::anyhow!("interrupted"))
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?
            .block_on(async {
                tokio::select! {
                    result = bench(&cp, args) => result,
                    () = interrupted() => Err(anyhow::anyhow!("interrupted")),
                }
            })
    };
    // `bench` has dropped its daemon, servers and hosts by now, whichever way it ended.
    println!("Stopping the control plane…");
    cp.shutdown();
    print!("{}", result?);
    Ok(())
}

async fn bench(cp: &ControlPlane, args: &Args) -> Result<String> {
    let period = Duration::from_secs(args.period);
    let window = Duration::from_secs(args.window.unwrap_or((6 * args.period).max(20)));
    let targets = usize::from(args.hosts) * usize::from(args.ports);

    // Declaration order is teardown order reversed: the daemon stops first, then the servers,
    // then the hosts' namespaces go.
    let net = TestNet::new()?;
    let began = std::time::Instant::now();
    let mut hosts: Vec<Host> = Vec::new();
    for i in 1..=args.hosts {
        check_stop()?;
        hosts.push(net.add_host()?);
        if i % 10 == 0 || i == args.hosts {
            println!(
                "  test hosts: {i}/{} ({:.1} s)",
                args.hosts,
                began.elapsed().as_secs_f64()
            );
        }
    }
    let began = std::time::Instant::now();
    let mut servers: Vec<Vec<Server>> = Vec::new();
    for (i, host) in hosts.iter().enumerate() {
        check_stop()?;
        servers.push(serve_ports(host, args.ports)?);
        if (i + 1) % 10 == 0 || i + 1 == hosts.len() {
            println!(
                "  TCP servers: {}/{targets} ({:.1} s)",
                (i + 1) * usize::from(args.ports),
                began.elapsed().as_secs_f64()
            );
        }
    }

    let view = SliceView::start(cp.client());
    let definitions = definitions(&hosts, args.ports, args.period);
    let extra = args
        .concurrency
        .map(|c| format!("[probes]\nconcurrency = {c}\n"))
        .unwrap_or_default();
    let daemon =
        Daemon::start_with_config(cp, &[("bench.yaml", definitions)], free_port()?, &extra)?;
    let _cleanup = Announce(format!(
        "Cleaning up: the daemon, {targets} servers and {} test hosts…",
        hosts.len()
    ));
    println!(
        "Daemon started (pid {}, release build, probes.concurrency {}): status http://{}/api/v1/status, log {}",
        daemon.pid(),
        args.concurrency
            .map_or_else(|| "default".to_string(), |c| c.to_string()),
        daemon.status_addr(),
        daemon.dir().join("daemon.log").display()
    );

    // Every target ready in the slices, watched on the API server: the status API is left alone
    // until then, so the memory read next is what probing and applying alone cost.
    let started = Instant::now();
    let all_ips: Vec<IpAddr> = hosts.iter().map(|h| IpAddr::V4(h.ip())).collect();
    // Generous: a slow start is itself a figure worth seeing in the table.
    let limit = 3 * period + Duration::from_secs(300);
    let mut shown = usize::MAX;
    loop {
        check_alive(&daemon)?;
        let ready = view.ready_count(&all_ips);
        if ready != shown && (ready == targets || shown == usize::MAX || ready / 500 != shown / 500)
        {
            println!(
                "  ready in the EndpointSlices: {ready}/{targets} ({:.1} s)",
                started.elapsed().as_secs_f64()
            );
            shown = ready;
        }
        if ready == targets {
            break;
        }
        if started.elapsed() > limit {
            let clusters = match daemon.status().await {
                Ok(status) => status["clusters"].to_string(),
                Err(e) => format!("(no status: {e:#})"),
            };
            bail!(
                "only {ready}/{targets} targets ready in the slices after {limit:?}; \
                 clusters on the status API: {clusters}\n{}",
                daemon.log_tail(30)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let time_to_ready = started.elapsed();
    println!("  settling 3 s");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pid = daemon.pid();
    let (_, rss_before_status_kib) = process_memory(pid)?;
    let status = daemon.status().await?;
    let (total, ready) = count_ready(&status);
    if (total, ready) != (targets, targets) {
        bail!("the status API shows {ready}/{total} targets ready, expected {targets}");
    }
    println!(
        "All {targets} targets ready after {:.1} s (daemon RSS {:.1} MiB before the first status \
         API call, {:.1} MiB after it)",
        time_to_ready.as_secs_f64(),
        rss_before_status_kib as f64 / 1024.0,
        process_memory(pid)?.1 as f64 / 1024.0
    );

    println!("Measuring at rest for {} s…", window.as_secs());
    let s0 = daemon.status().await?;
    let s0_at = Instant::now();
    let cpu0 = process_ticks(pid)?;
    let threads0 = thread_ticks(pid);
    let self0 = process_ticks(std::process::id())?.total();
    let machine0 = machine_ticks()?;
    let t0 = Instant::now();
    tokio::time::sleep(window).await;
    let cpu1 = process_ticks(pid)?;
    let threads1 = thread_ticks(pid);
    let self1 = process_ticks(std::process::id())?.total();
    let machine1 = machine_ticks()?;
    let wall = t0.elapsed().as_secs_f64();
    let (peak_kib, rss_kib) = process_memory(pid)?;
    let asked = Instant::now();
    let s1 = daemon.status().await?;
    let status_call = asked.elapsed();
    let s1_wall = s0_at.elapsed().as_secs_f64();
    let ticks = clock_ticks() as f64;
    let rest = Rest {
        cpu_percent: 100.0 * (cpu1.total() - cpu0.total()) as f64 / ticks / wall,
        user_percent: 100.0 * (cpu1.user - cpu0.user) as f64 / ticks / wall,
        sys_percent: 100.0 * (cpu1.system - cpu0.system) as f64 / ticks / wall,
        threads: thread_percentages(&threads0, &threads1, ticks, wall),
        status_call,
        status_bytes: serde_json::to_vec(&s1).map_or(0, |v| v.len()),
        bench_percent: 100.0 * (self1 - self0) as f64 / ticks / wall,
        machine_percent: 100.0 * (machine1.0 - machine0.0) as f64
            / (machine1.1 - machine0.1).max(1) as f64,
        peak_mib: peak_kib as f64 / 1024.0,
        rss_before_status_mib: rss_before_status_kib as f64 / 1024.0,
        rss_mib: rss_kib as f64 / 1024.0,
        probes_per_s: (probes_total(&s1)? - probes_total(&s0)?) as f64 / s1_wall,
        lateness: Lateness::between(&s0, &s1)?,
        writes: writes(&s1)? - writes(&s0)?,
    };
    println!(
        "  CPU {:.2} % of one core, RSS {:.1} MiB (peak {:.1}), {:.0} probes/s, lateness p50 {} p99 {}, {} writes",
        rest.cpu_percent,
        rest.rss_mib,
        rest.peak_mib,
        rest.probes_per_s,
        rest.lateness.p50,
        rest.lateness.p99,
        rest.writes
    );

    let mut results = Vec::new();
    for (i, death) in args.kill.rounds().into_iter().enumerate() {
        let group = &hosts[i * args.kill_hosts..(i + 1) * args.kill_hosts];
        let first = i * args.kill_hosts;
        let round = kill_round(
            death,
            group,
            &mut servers[first..first + args.kill_hosts],
            &daemon,
            &view,
            args,
        )
        .await?;
        results.push(round);
    }
    let peak_after_kills = process_memory(pid)?.0 as f64 / 1024.0;

    Ok(report(
        args,
        targets,
        time_to_ready,
        window,
        &rest,
        peak_after_kills,
        &results,
    ))
}

/// Figures of the measurement at rest.
struct Rest {
    cpu_percent: f64,
    user_percent: f64,
    sys_percent: f64,
    /// Per thread of the daemon (by name), % of one core.
    threads: String,
    /// One `GET /api/v1/status` at rest, and the size of its JSON.
    status_call: Duration,
    status_bytes: usize,
    bench_percent: f64,
    machine_percent: f64,
    peak_mib: f64,
    rss_mib: f64,
    rss_before_status_mib: f64,
    probes_per_s: f64,
    lateness: Lateness,
    writes: u64,
}

/// Figures of one kill round.
struct Round {
    death: Death,
    killed_hosts: usize,
    expected: usize,
    kill_took: Duration,
    /// Kill → slice shows ready=false, per (definition, host).
    from_kill: Vec<f64>,
    /// Start of the first failing probe → slice shows ready=false.
    from_first_failure: Vec<f64>,
    /// Targets whose first probe after the kill started while the kill was under way.
    raced: usize,
    /// The daemon's not-ready decision (`since` on the status API) → slice shows it.
    decision_to_slice: Vec<f64>,
    lateness: Lateness,
    writes: u64,
    /// Revive → slice shows ready=true again.
    recovery: Vec<f64>,
}

async fn kill_round(
    death: Death,
    group: &[Host],
    servers: &mut [Vec<Server>],
    daemon: &Daemon,
    view: &SliceView,
    args: &Args,
) -> Result<Round> {
    let period = Duration::from_secs(args.period);
    let ips: Vec<IpAddr> = group.iter().map(|h| IpAddr::V4(h.ip())).collect();
    let expected = ips.len() * usize::from(args.ports);
    println!(
        "Kill round {}: {} hosts at once = {expected} targets ({})",
        death.label(),
        group.len(),
        ips.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(" ")
    );
    // When each killed target was last probed, to find the start of its first failing probe.
    let before = daemon.status().await?;
    let last_probe = host_times(&before, &ips, "lastProbe")?;
    view.arm(&ips, Watch::Down);

    // Each host dies on its own thread, all at once; each records when its kill began and when it
    // was certainly in effect.
    let kill_sys = SystemTime::now();
    let kill_at = Instant::now();
    let windows: Vec<(Instant, Instant)> = match death {
        Death::Drop => in_parallel(group, |h: &Host| h.drop_packets())?,
        Death::Rst => {
            let stopping: Vec<Vec<Server>> = servers.iter_mut().map(std::mem::take).collect();
            in_parallel(stopping, |servers: Vec<Server>| {
                servers.into_iter().for_each(Server::stop);
                Ok(())
            })?
        }
    };
    let killed: HashMap<IpAddr, (Instant, Instant)> = ips.iter().copied().zip(windows).collect();
    let kill_took = killed
        .values()
        .map(|(_, done)| *done)
        .max()
        .unwrap_or(kill_at)
        - kill_at;
    println!(
        "  killed in {} ms (per host: {}–{} ms)",
        kill_took.as_millis(),
        killed
            .values()
            .map(|(a, b)| (*b - *a).as_millis())
            .min()
            .unwrap_or(0),
        killed
            .values()
            .map(|(a, b)| (*b - *a).as_millis())
            .max()
            .unwrap_or(0)
    );
    let wall = |t: Instant| kill_sys + t.duration_since(kill_at);

    let limit = period * (FAILURE_THRESHOLD + 1) + Duration::from_secs(TIMEOUT_S + 60);
    let down = view.wait(Watch::Down, expected, kill_at, limit).await;
    let after = daemon.status().await?;
    let since = host_times(&after, &ips, "since")?;
    let mut from_kill = Vec::new();
    let mut from_first_failure = Vec::new();
    let mut raced = 0;
    let mut decision_to_slice = Vec::new();
    for (key, seen) in &down {
        let (began, done) = killed[&key.1];
        from_kill.push(seen.duration_since(began).as_secs_f64());
        let seen_sys = wall(*seen);
        if let Some(last) = last_probe.get(key) {
            // The schedule is fixed (a tick less than 5 ms late does not shift it), so the first
            // probe after the kill starts a whole number of periods after the last one before it.
            let gap = wall(began).duration_since(*last).unwrap_or_default();
            let periods = (gap.as_secs_f64() / period.as_secs_f64()).ceil().max(1.0);
            let first_failure = *last + period.mul_f64(periods);
            if first_failure < wall(done) {
                // That probe raced the kill: it may have succeeded, and then the real first
                // failure is a period later. Such targets are left out of this figure.
                raced += 1;
            } else if let Ok(d) = seen_sys.duration_since(first_failure) {
                from_first_failure.push(d.as_secs_f64());
            }
        }
        if let Some(decided) = since.get(key) {
            let d = match seen_sys.duration_since(*decided) {
                Ok(d) => d.as_secs_f64(),
                Err(e) => -e.duration().as_secs_f64(),
            };
            decision_to_slice.push(d);
        }
    }
    if down.len() < expected {
        println!(
            "  WARNING: only {}/{expected} killed targets turned not ready within {} s",
            down.len(),
            limit.as_secs()
        );
    }
    let lateness = Lateness::between(&before, &after)?;
    let writes = writes(&after)? - writes(&before)?;
    sort(&mut from_kill);
    sort(&mut from_first_failure);
    sort(&mut decision_to_slice);
    println!(
        "  not ready in the slices: {}/{expected}; from kill p50 {:.2} s, max {:.2} s; \
         lateness during the round p50 {} p99 {}; {writes} writes",
        down.len(),
        pct(&from_kill, 0.5),
        pct(&from_kill, 1.0),
        lateness.p50,
        lateness.p99
    );

    // Bring them back, so the next round starts from rest.
    view.arm(&ips, Watch::Up);
    let revive_at = Instant::now();
    match death {
        Death::Drop => {
            in_parallel(group, |h: &Host| h.restore_packets())?;
        }
        Death::Rst => {
            for (host, host_servers) in group.iter().zip(servers.iter_mut()) {
                *host_servers = serve_ports(host, args.ports)?;
            }
        }
    }
    let limit = period * (SUCCESS_THRESHOLD + 1) + Duration::from_secs(TIMEOUT_S + 60);
    let up = view.wait(Watch::Up, expected, revive_at, limit).await;
    let mut recovery: Vec<f64> = up
        .values()
        .map(|t| t.duration_since(revive_at).as_secs_f64())
        .collect();
    sort(&mut recovery);
    println!(
        "  revived: ready again in the slices {}/{expected}, max {:.2} s after the revive",
        up.len(),
        pct(&recovery, 1.0)
    );
    Ok(Round {
        death,
        killed_hosts: group.len(),
        expected,
        kill_took,
        from_kill,
        from_first_failure,
        raced,
        decision_to_slice,
        lateness,
        writes,
        recovery,
    })
}

fn report(
    args: &Args,
    targets: usize,
    time_to_ready: Duration,
    window: Duration,
    rest: &Rest,
    peak_after_kills: f64,
    rounds: &[Round],
) -> String {
    let period = Duration::from_secs(args.period);
    let bound = period * (FAILURE_THRESHOLD - 1) + Duration::from_secs(TIMEOUT_S) + APPLY_BUDGET;
    let goal_note = if args.period == 10 && targets == 10_000 {
        ""
    } else {
        " (goal is for 10k/10 s)"
    };
    let mut out = String::new();
    let mut row = |figure: &str, measured: String, goal: &str| {
        let _ = writeln!(out, "  {figure:<46} {measured:<32} {goal}");
    };
    row("figure", "measured".into(), "goal");
    row(
        "targets (hosts × ports)",
        format!("{targets} ({} × {})", args.hosts, args.ports),
        "10000",
    );
    row(
        "period / timeout / failureThreshold",
        format!("{} s / {TIMEOUT_S} s / {FAILURE_THRESHOLD}", args.period),
        "",
    );
    row(
        "start → all ready in the slices",
        format!("{:.1} s", time_to_ready.as_secs_f64()),
        "",
    );
    row(
        "daemon CPU, % of one core",
        format!(
            "{:.2} % (user {:.2}, sys {:.2})",
            rest.cpu_percent, rest.user_percent, rest.sys_percent
        ),
        &format!("≤ {GOAL_CPU_PERCENT} %{goal_note}"),
    );
    row("  by thread", rest.threads.clone(), "");
    row(
        "daemon RSS peak (VmHWM) / now",
        format!("{:.1} MiB / {:.1} MiB", rest.peak_mib, rest.rss_mib),
        &format!("≤ {GOAL_RSS_MIB} MiB{goal_note}"),
    );
    row(
        "daemon RSS at rest, before any status call",
        format!("{:.1} MiB", rest.rss_before_status_mib),
        "",
    );
    if !rounds.is_empty() {
        row(
            "daemon RSS peak after the kill rounds",
            format!("{peak_after_kills:.1} MiB"),
            "",
        );
    }
    row(
        "probes/s",
        format!("{:.0}", rest.probes_per_s),
        &format!(
            "{:.0} (targets / period)",
            targets as f64 / args.period as f64
        ),
    );
    row(
        "probe lateness p50 / p99",
        format!("{} / {}", rest.lateness.p50, rest.lateness.p99),
        "",
    );
    row(
        &format!("API writes at rest ({} s)", window.as_secs()),
        rest.writes.to_string(),
        "0",
    );
    for r in rounds {
        let name = match r.death {
            Death::Drop => "drop",
            Death::Rst => "rst",
        };
        row(
            &format!("detection {name}: targets seen not ready"),
            format!(
                "{}/{} ({} hosts)",
                r.from_kill.len(),
                r.expected,
                r.killed_hosts
            ),
            "",
        );
        row(
            &format!("  {name}: kill → slice p50/p99/max"),
            triple(&r.from_kill),
            &format!(
                "≤ bound + 1 period = {:.2} s",
                (bound + period).as_secs_f64()
            ),
        );
        row(
            &format!("  {name}: 1st failing probe → slice p50/p99/max"),
            triple(&r.from_first_failure),
            &format!(
                "≤ bound {:.2} s (n = {}; {} raced the kill)",
                bound.as_secs_f64(),
                r.from_first_failure.len(),
                r.raced
            ),
        );
        row(
            &format!("  {name}: decision → slice p50/p99/max"),
            triple_ms(&r.decision_to_slice),
            &format!("≤ {} ms", APPLY_BUDGET.as_millis()),
        );
        row(
            &format!("  {name}: lateness p50 / p99 during the round"),
            format!("{} / {}", r.lateness.p50, r.lateness.p99),
            "",
        );
        row(
            &format!("  {name}: API writes during the round"),
            r.writes.to_string(),
            "",
        );
        row(
            &format!("  {name}: revive → ready in slice p50/max"),
            format!(
                "{:.2} s / {:.2} s",
                pct(&r.recovery, 0.5),
                pct(&r.recovery, 1.0)
            ),
            "",
        );
        row(
            &format!("  {name}: time to kill all {} hosts", r.killed_hosts),
            format!("{} ms", r.kill_took.as_millis()),
            "",
        );
    }
    row(
        "one status API call at rest",
        format!(
            "{} ms, {:.1} MB of JSON",
            rest.status_call.as_millis(),
            rest.status_bytes as f64 / 1e6
        ),
        "",
    );
    row(
        "context: machine busy (all cores)",
        format!(
            "{:.1} % of {} cores",
            rest.machine_percent,
            std::thread::available_parallelism().map_or(0, |n| n.get())
        ),
        "",
    );
    row(
        "context: bench process (servers, watch)",
        format!("{:.1} % of one core", rest.bench_percent),
        "",
    );
    let mut text = format!(
        "\n=== endpoints-operator benchmark: {targets} targets, period {} s ===\n{out}",
        args.period
    );
    let _ = writeln!(
        text,
        "  bound = (failureThreshold−1)·period + timeout + {} ms = {:.2} s. From the kill, the first \
         failing probe starts\n  up to one period later (each target keeps its own random phase), \
         so kill → slice may exceed the bound by up to one period.",
        APPLY_BUDGET.as_millis(),
        bound.as_secs_f64()
    );
    let _ = writeln!(
        text,
        "  The test hosts are veth peers on this machine: their half of every TCP handshake runs in \
         softirq on the\n  connecting thread, so the daemon's sys time includes work a remote host \
         would do. Everything shares {} cores.",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    text
}

// ---------------------------------------------------------------------------------------------
// Setup

/// One TCP server per port `FIRST_PORT..FIRST_PORT+ports` on `host`, bound from one thread in its
/// namespace (cheaper than a namespace switch per socket).
fn serve_ports(host: &Host, ports: u16) -> Result<Vec<Server>> {
    let ip = host.ip();
    let listeners = host
        .in_netns(|| {
            (0..ports)
                .map(|i| {
                    let listener = TcpListener::bind(SocketAddr::from((ip, FIRST_PORT + i)))?;
                    listener.set_nonblocking(true)?;
                    Ok(listener)
                })
                .collect::<std::io::Result<Vec<_>>>()
        })
        .with_context(|| format!("binding {ports} ports in {}", host.netns()))?;
    listeners
        .into_iter()
        .map(|l| servers::tcp(l).context("serving TCP"))
        .collect()
}

/// `bench-NN` probes port `FIRST_PORT + NN` on every host.
fn definitions(hosts: &[Host], ports: u16, period: u64) -> String {
    let list = hosts
        .iter()
        .map(|h| h.ip().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    (0..ports)
        .map(|i| {
            format!(
                "apiVersion: sealos.io/v1beta1
kind: ClusterEndpoint
metadata: {{name: {name}, namespace: default}}
spec:
  periodSeconds: {period}
  ports:
    - port: {port}
      hosts: [{list}]
      tcpSocket: {{enable: true}}
      timeoutSeconds: {TIMEOUT_S}
      failureThreshold: {FAILURE_THRESHOLD}
      successThreshold: {SUCCESS_THRESHOLD}
",
                name = definition_name(i),
                port = FIRST_PORT + i,
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

fn definition_name(i: u16) -> String {
    format!("bench-{i:02}")
}

/// Runs `f` on every item at once, one thread each, released together; returns per item when
/// its `f` began and ended.
fn in_parallel<T, F>(items: impl IntoIterator<Item = T>, f: F) -> Result<Vec<(Instant, Instant)>>
where
    T: Send,
    F: Fn(T) -> Result<()> + Sync,
{
    let items: Vec<T> = items.into_iter().collect();
    let start = std::sync::Barrier::new(items.len());
    std::thread::scope(|scope| {
        let handles: Vec<_> = items
            .into_iter()
            .map(|item| {
                let (start, f) = (&start, &f);
                scope.spawn(move || {
                    start.wait();
                    let began = Instant::now();
                    f(item).map(|()| (began, Instant::now()))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    })
}

/// Prints its message when dropped: the first thing teardown does.
struct Announce(String);

impl Drop for Announce {
    fn drop(&mut self) {
        println!("{}", self.0);
    }
}

// ---------------------------------------------------------------------------------------------
// Watching the EndpointSlices

/// What the API server currently says, per service and host, and when watched hosts changed.
#[derive(Default)]
struct ViewState {
    ready: HashMap<String, HashMap<IpAddr, bool>>,
    armed: HashSet<IpAddr>,
    watch: Option<Watch>,
    /// (service, host) → when it was first seen in the watched state since arming.
    seen: BTreeMap<(String, IpAddr), Instant>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Watch {
    Down,
    Up,
}

#[derive(Clone)]
struct SliceView(Arc<Mutex<ViewState>>);

impl SliceView {
    /// Watches our EndpointSlices in the background for as long as the runtime lives.
    fn start(client: kube::Client) -> SliceView {
        let view = SliceView(Arc::default());
        let state = view.0.clone();
        tokio::spawn(async move {
            let api: Api<EndpointSlice> = Api::namespaced(client, "default");
            let config = watcher::Config::default().labels(SLICE_LABELS);
            let mut events = watcher::watcher(api, config).boxed();
            while let Some(event) = events.next().await {
                // The event's own arrival time, not whenever a waiter looks.
                let now = Instant::now();
                let slice = match event {
                    Ok(Event::Apply(s) | Event::InitApply(s)) => s,
                    Ok(_) => continue,
                    Err(e) => {
                        eprintln!("EndpointSlice watch: {e}; retrying");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        continue;
                    }
                };
                let Some(service) = slice
                    .metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(SERVICE_NAME_LABEL))
                    .cloned()
                else {
                    continue;
                };
                let mut hosts = HashMap::new();
                for endpoint in slice.endpoints.into_iter().flatten() {
                    let ready = endpoint
                        .conditions
                        .as_ref()
                        .and_then(|c| c.ready)
                        .unwrap_or(false);
                    for address in endpoint.addresses {
                        if let Ok(ip) = address.parse::<IpAddr>() {
                            hosts.insert(ip, ready);
                        }
                    }
                }
                let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(watch) = state.watch {
                    for (ip, ready) in &hosts {
                        if state.armed.contains(ip) && *ready == (watch == Watch::Up) {
                            state.seen.entry((service.clone(), *ip)).or_insert(now);
                        }
                    }
                }
                state.ready.insert(service, hosts);
            }
        });
        view
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ViewState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// From now on, records when each of `ips` is first seen down (or up) in each slice.
    fn arm(&self, ips: &[IpAddr], watch: Watch) {
        let mut state = self.lock();
        state.armed = ips.iter().copied().collect();
        state.watch = Some(watch);
        state.seen.clear();
    }

    /// Waits until `expected` (service, host) pairs were seen in the armed state, or `limit`
    /// after `from`; returns what was seen.
    async fn wait(
        &self,
        watch: Watch,
        expected: usize,
        from: Instant,
        limit: Duration,
    ) -> BTreeMap<(String, IpAddr), Instant> {
        loop {
            {
                let state = self.lock();
                debug_assert_eq!(state.watch, Some(watch));
                if state.seen.len() >= expected || from.elapsed() > limit {
                    return state.seen.clone();
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// How many (service, host) pairs among `ips` the slices show ready.
    fn ready_count(&self, ips: &[IpAddr]) -> usize {
        let state = self.lock();
        state
            .ready
            .values()
            .map(|hosts| ips.iter().filter(|ip| hosts.get(ip) == Some(&true)).count())
            .sum()
    }
}

// ---------------------------------------------------------------------------------------------
// The status API

fn hosts_of(status: &Value) -> impl Iterator<Item = (&str, &Value)> {
    status["definitions"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|def| {
            let name = def["name"].as_str().unwrap_or_default();
            def["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|port| port["hosts"].as_array().into_iter().flatten())
                .map(move |host| (name, host))
        })
}

/// (targets, ready targets) on the status API.
fn count_ready(status: &Value) -> (usize, usize) {
    hosts_of(status).fold((0, 0), |(total, ready), (_, host)| {
        (total + 1, ready + usize::from(host["ready"] == true))
    })
}

/// A timestamp field of each of `ips`' targets, keyed like the slice view: (service, host).
fn host_times(
    status: &Value,
    ips: &[IpAddr],
    field: &str,
) -> Result<HashMap<(String, IpAddr), SystemTime>> {
    let mut out = HashMap::new();
    for (name, host) in hosts_of(status) {
        let Some(ip) = host["host"].as_str().and_then(|s| s.parse::<IpAddr>().ok()) else {
            continue;
        };
        if !ips.contains(&ip) {
            continue;
        }
        if let Some(text) = host[field].as_str() {
            let time = humantime::parse_rfc3339(text)
                .with_context(|| format!("status API: {field} = {text:?}"))?;
            out.insert((name.to_string(), ip), time);
        }
    }
    Ok(out)
}

fn probes_total(status: &Value) -> Result<u64> {
    status["probes"]["probesTotal"]
        .as_u64()
        .context("status API: no probes.probesTotal")
}

fn writes(status: &Value) -> Result<u64> {
    status["clusters"][0]["writes"]
        .as_u64()
        .context("status API: no clusters[0].writes")
}

/// Percentiles of probe lateness between two status snapshots, as histogram bucket bounds.
struct Lateness {
    p50: String,
    p99: String,
}

impl Lateness {
    fn between(before: &Value, after: &Value) -> Result<Lateness> {
        let before = histogram(before)?;
        let after = histogram(after)?;
        if before.len() != after.len() {
            bail!("status API: the lateness histogram changed shape");
        }
        let delta: Vec<(Option<u64>, u64)> = after
            .iter()
            .zip(&before)
            .map(|((bound, a), (_, b))| (*bound, a.saturating_sub(*b)))
            .collect();
        let last_bound = delta.iter().filter_map(|(b, _)| *b).max().unwrap_or(0);
        let pick = |q: f64| {
            let total = delta.last().map_or(0, |(_, c)| *c);
            if total == 0 {
                return "n/a".to_string();
            }
            let need = (q * total as f64).ceil() as u64;
            match delta.iter().find(|(_, c)| *c >= need) {
                Some((Some(ms), _)) => format!("≤ {ms} ms"),
                _ => format!("> {last_bound} ms"),
            }
        };
        Ok(Lateness {
            p50: pick(0.5),
            p99: pick(0.99),
        })
    }
}

/// `probes.latenessMs`: cumulative `[upper bound ms | null, count]` pairs.
fn histogram(status: &Value) -> Result<Vec<(Option<u64>, u64)>> {
    status["probes"]["latenessMs"]
        .as_array()
        .context("status API: no probes.latenessMs")?
        .iter()
        .map(|pair| {
            let count = pair[1]
                .as_u64()
                .context("status API: bad latenessMs count")?;
            Ok((pair[0].as_u64(), count))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// /proc and limits

/// CPU time of a process (all its threads), in clock ticks.
#[derive(Clone, Copy)]
struct Ticks {
    user: u64,
    system: u64,
}

impl Ticks {
    fn total(self) -> u64 {
        self.user + self.system
    }
}

/// utime and stime of a process from `/proc/PID/stat`.
fn process_ticks(pid: u32) -> Result<Ticks> {
    process_ticks_at(&format!("/proc/{pid}/stat"))
}

/// utime and stime from a `stat` file of a process or thread.
fn process_ticks_at(path: &str) -> Result<Ticks> {
    let stat = std::fs::read_to_string(path)
        .with_context(|| format!("reading {path} (did the process exit?)"))?;
    // Fields resume after the command name's last ')': state is field 3, utime 14, stime 15.
    let fields: Vec<&str> = stat[stat.rfind(')').context("odd /proc stat")? + 1..]
        .split_whitespace()
        .collect();
    let field = |n: usize| -> Result<u64> {
        fields
            .get(n - 3)
            .and_then(|f| f.parse().ok())
            .with_context(|| format!("{path} field {n}"))
    };
    Ok(Ticks {
        user: field(14)?,
        system: field(15)?,
    })
}

/// CPU ticks of each thread of a process, by thread id, with the thread's name.
fn thread_ticks(pid: u32) -> BTreeMap<u32, (String, u64)> {
    let mut out = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        let name = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if let Ok(ticks) = process_ticks_at(&task.path().join("stat").display().to_string()) {
            out.insert(tid, (name.trim().to_string(), ticks.total()));
        }
    }
    out
}

/// "name a %, name b %": threads that used CPU between the two readings, busiest first.
fn thread_percentages(
    before: &BTreeMap<u32, (String, u64)>,
    after: &BTreeMap<u32, (String, u64)>,
    ticks: f64,
    wall: f64,
) -> String {
    let mut used: Vec<(String, f64)> = after
        .iter()
        .map(|(tid, (name, t))| {
            let t0 = before.get(tid).map_or(0, |(_, t0)| *t0);
            (
                name.clone(),
                100.0 * t.saturating_sub(t0) as f64 / ticks / wall,
            )
        })
        .filter(|(_, pct)| *pct >= 0.05)
        .collect();
    used.sort_by(|a, b| b.1.total_cmp(&a.1));
    used.iter()
        .map(|(name, pct)| format!("{name} {pct:.1}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// (VmHWM, VmRSS) in KiB.
fn process_memory(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let kib = |key: &str| -> Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
            .with_context(|| format!("/proc/{pid}/status has no {key}"))
    };
    Ok((kib("VmHWM:")?, kib("VmRSS:")?))
}

/// (busy, total) clock ticks of all CPUs since boot.
fn machine_ticks() -> Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("empty /proc/stat")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    let total: u64 = v.iter().sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Ok((total - idle, total))
}

fn clock_ticks() -> u64 {
    // SAFETY: sysconf only reads a system constant.
    let ticks = unsafe { nix::libc::sysconf(nix::libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as u64 } else { 100 }
}

/// Raises RLIMIT_NOFILE to `want` (soft and, if needed, hard; root may), else as far as the hard
/// limit allows. Returns the soft limit now in force; children started later inherit it.
fn raise_nofile(want: u64) -> Result<u64> {
    use nix::libc::{RLIMIT_NOFILE, getrlimit, rlimit, setrlimit};
    let mut current = rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read/write the struct passed by reference.
    unsafe {
        if getrlimit(RLIMIT_NOFILE, &mut current) != 0 {
            return Err(std::io::Error::last_os_error()).context("getrlimit(RLIMIT_NOFILE)");
        }
        if current.rlim_cur >= want {
            return Ok(current.rlim_cur);
        }
        let wanted = rlimit {
            rlim_cur: want,
            rlim_max: current.rlim_max.max(want),
        };
        if setrlimit(RLIMIT_NOFILE, &wanted) == 0 {
            return Ok(want);
        }
        let hard = rlimit {
            rlim_cur: current.rlim_max,
            rlim_max: current.rlim_max,
        };
        if setrlimit(RLIMIT_NOFILE, &hard) == 0 {
            return Ok(current.rlim_max);
        }
    }
    Ok(current.rlim_cur)
}

// ---------------------------------------------------------------------------------------------
// Interruption and small helpers

/// Ctrl-C sets [`STOP`]; the benchmark then unwinds through its destructors.
fn on_ctrl_c() {
    std::thread::spawn(|| {
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        runtime.block_on(async {
            loop {
                if tokio::signal::ctrl_c().await.is_err() {
                    return;
                }
                if STOP.swap(true, Ordering::SeqCst) {
                    eprintln!("bench: still cleaning up…");
                } else {
                    eprintln!("bench: interrupted; cleaning up…");
                }
            }
        });
    });
}

/// Fails with the daemon's log if it has exited (its /proc entry is gone or a zombie).
fn check_alive(daemon: &Daemon) -> Result<()> {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", daemon.pid())).unwrap_or_default();
    let state = stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next());
    if matches!(state, None | Some("Z")) {
        bail!("the daemon exited\n{}", daemon.log_tail(30));
    }
    Ok(())
}

fn check_stop() -> Result<()> {
    if STOP.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

async fn interrupted() {
    while !STOP.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn sort(v: &mut [f64]) {
    v.sort_by(f64::total_cmp);
}

/// The `q` quantile of sorted `v` (nearest rank); NaN when empty.
fn pct(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

fn triple(v: &[f64]) -> String {
    format!(
        "{:.2} / {:.2} / {:.2} s",
        pct(v, 0.5),
        pct(v, 0.99),
        pct(v, 1.0)
    )
}

fn triple_ms(v: &[f64]) -> String {
    format!(
        "{:.0} / {:.0} / {:.0} ms",
        1000.0 * pct(v, 0.5),
        1000.0 * pct(v, 0.99),
        1000.0 * pct(v, 1.0)
    )
}
