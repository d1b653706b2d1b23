//! Test hosts "outside the cluster": network namespaces on a private bridge, addressed from
//! 10.240.0.0/16, with servers running in this process.
//!
//! Layout of one [`TestNet`] (K = 1..=250, claimed per net, N = 2..=254 per host):
//!
//! ```text
//!  root namespace                         namespace eo-K-N
//!  bridge eobK 10.240.K.1/24 ── veth eovK-N ═══ eth0 10.240.K.N/24, default via 10.240.K.1
//!  unreachable 10.240.0.0/16 (guard)
//! ```
//!
//! The guard route makes sure no packet for the test range can leave the machine, whatever a test
//! probes: the bridges' /24s are more specific, everything else in the /16 is unreachable. Concurrent
//! test processes coordinate through flock'd files in [`STATE_DIR`]; the last one out removes the
//! guard, and resources of processes that died are swept by the next user.
//!
//! A socket keeps the namespace it was created in, so servers bind on a short-lived thread that
//! joined the host's namespace and are then served by ordinary tasks; nothing runs `ip netns exec`.

use std::fs::{self, File};
use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::process::Command;
use std::sync::Mutex;

use anyhow::{Context, Result, bail};
use nix::fcntl::{Flock, FlockArg};
use nix::sched::{CloneFlags, setns};

use super::servers::{self, HttpRequest, HttpResponse, Server};

/// Where processes record which /24 they own, and the lock that serialises claiming one.
const STATE_DIR: &str = "/run/endpoints-operator-tests";
/// The whole test range; only ever routed to local bridges.
const GUARD: &str = "10.240.0.0/16";

/// One /24 of test hosts; dropping it removes its namespaces, links and (if last) the guard route.
pub struct TestNet {
    k: u8,
    hosts: Mutex<Vec<Host>>,
}

/// A host in its own network namespace. Cheap to clone; it lives until its [`TestNet`] is dropped.
#[derive(Clone, Debug)]
pub struct Host {
    netns: String,
    veth: String,
    ip: Ipv4Addr,
    gateway: Ipv4Addr,
}

impl TestNet {
    /// Claims a free 10.240.K.0/24, installs the guard route and brings up the bridge.
    pub fn new() -> Result<TestNet> {
        fs::create_dir_all(STATE_DIR).with_context(|| format!("creating {STATE_DIR}"))?;
        let k = {
            let _lock = lock()?;
            sweep_stale();
            // Installed before any host exists, so no test address is ever routed off the machine.
            ip(&["route", "replace", "unreachable", GUARD])?;
            let claimed = claim_subnet();
            if claimed.is_err() {
                remove_guard_if_unused();
            }
            claimed?
        };
        // From here on, Drop undoes whatever part of the setup happened.
        let net = TestNet {
            k,
            hosts: Mutex::new(Vec::new()),
        };
        let bridge = net.bridge();
        ip(&["addr", "add", &format!("10.240.{k}.1/24"), "dev", &bridge])?;
        ip(&["link", "set", &bridge, "up"])?;
        Ok(net)
    }

    /// The K of 10.240.K.0/24.
    pub fn subnet(&self) -> u8 {
        self.k
    }

    /// The root namespace's address on this net, the source of every probe to its hosts.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 240, self.k, 1)
    }

    /// Creates the next host, 10.240.K.N with N counting from 2.
    pub fn add_host(&self) -> Result<Host> {
        let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        let n = u8::try_from(hosts.len() + 2)
            .ok()
            .filter(|n| *n < 255)
            .context("a TestNet holds at most 253 hosts")?;
        let k = self.k;
        let host = Host {
            netns: format!("eo-{k}-{n}"),
            veth: format!("eov{k}-{n}"),
            ip: Ipv4Addr::new(10, 240, k, n),
            gateway: self.gateway(),
        };
        ip(&["netns", "add", &host.netns])?;
        // Registered before the links exist so Drop removes a half-built host as well.
        hosts.push(host.clone());
        let ns = host.netns.as_str();
        // The peer is created directly inside the namespace, so its name cannot clash with ours.
        ip(&[
            "link", "add", &host.veth, "type", "veth", "peer", "name", "eth0", "netns", ns,
        ])?;
        ip(&["link", "set", &host.veth, "master", &self.bridge(), "up"])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{}/24", host.ip),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", ns, "link", "set", "eth0", "up"])?;
        ip(&[
            "-n",
            ns,
            "route",
            "add",
            "default",
            "via",
            &host.gateway.to_string(),
        ])?;
        Ok(host)
    }

    fn bridge(&self) -> String {
        format!("eob{}", self.k)
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        // All of it under the lock: once the bridge is gone another net may claim the same K, and
        // it must not then lose its owner file (or its hosts) to the rest of our teardown.
        let lock = lock();
        if let Err(e) = &lock {
            eprintln!("test network cleanup: continuing without the lock: {e:#}");
        }
        let hosts = std::mem::take(self.hosts.get_mut().unwrap_or_else(|e| e.into_inner()));
        for host in hosts {
            // Deleting the veth first matters: a namespace outlives `ip netns del` while sockets
            // created in it are open, and would keep its veth pair (and our end of it) alive.
            let _ = ip(&["link", "del", &host.veth]);
            warn(ip(&["netns", "del", &host.netns]));
        }
        warn(ip(&["link", "del", &self.bridge()]));
        // Unlocked, the next claim of this K (or the next sweep) tidies up instead.
        if lock.is_ok() {
            warn(fs::remove_file(owner_file(self.k)).context("removing the owner file"));
            remove_guard_if_unused();
        }
    }
}

impl Host {
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// The namespace's name (as in `ip netns list`), for debugging by hand.
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// A TCP server that accepts connections and holds them until the peer closes.
    pub fn serve_tcp(&self, port: u16) -> Result<Server> {
        Ok(servers::tcp(self.bind_tcp(port)?)?)
    }

    /// A one-request-per-connection HTTP/1.1 server answering with `responder`.
    pub fn serve_http<F>(&self, port: u16, responder: F) -> Result<Server>
    where
        F: Fn(&HttpRequest) -> HttpResponse + Send + Sync + 'static,
    {
        Ok(servers::http(self.bind_tcp(port)?, responder)?)
    }

    /// A UDP server that sends every datagram back to its sender.
    pub fn serve_udp_echo(&self, port: u16) -> Result<Server> {
        Ok(servers::udp_echo(self.bind_udp(port)?)?)
    }

    /// A gRPC health server (see [`servers::grpc_health`]).
    pub fn serve_grpc_health(
        &self,
        port: u16,
        statuses: &[(&str, tonic_health::ServingStatus)],
    ) -> Result<Server> {
        Ok(servers::grpc_health(self.bind_tcp(port)?, statuses, None)?)
    }

    /// The same over TLS with the given identity.
    pub fn serve_grpcs_health(
        &self,
        port: u16,
        statuses: &[(&str, tonic_health::ServingStatus)],
        tls: tonic::transport::ServerTlsConfig,
    ) -> Result<Server> {
        Ok(servers::grpc_health(
            self.bind_tcp(port)?,
            statuses,
            Some(tls),
        )?)
    }

    /// An HTTPS server (see [`servers::https`]).
    pub fn serve_https<F>(
        &self,
        port: u16,
        tls: std::sync::Arc<rustls::ServerConfig>,
        responder: F,
    ) -> Result<Server>
    where
        F: Fn(&HttpRequest) -> HttpResponse + Send + Sync + 'static,
    {
        Ok(servers::https(self.bind_tcp(port)?, tls, responder)?)
    }

    /// A non-blocking listener on `ip:port` inside the host, for servers of other kinds (gRPC…).
    pub fn bind_tcp(&self, port: u16) -> Result<TcpListener> {
        let addr = SocketAddr::from((self.ip, port));
        self.in_netns(move || {
            let listener = TcpListener::bind(addr)?;
            listener.set_nonblocking(true)?;
            Ok(listener)
        })
        .with_context(|| format!("binding TCP {addr} in {}", self.netns))
    }

    /// A non-blocking UDP socket bound to `ip:port` inside the host.
    pub fn bind_udp(&self, port: u16) -> Result<UdpSocket> {
        let addr = SocketAddr::from((self.ip, port));
        self.in_netns(move || {
            let socket = UdpSocket::bind(addr)?;
            socket.set_nonblocking(true)?;
            Ok(socket)
        })
        .with_context(|| format!("binding UDP {addr} in {}", self.netns))
    }

    /// Runs `f` on a fresh thread that has joined the host's network namespace; sockets it creates
    /// stay in that namespace. The thread ends with `f`, so no other code runs in there.
    pub fn in_netns<T, F>(&self, f: F) -> io::Result<T>
    where
        T: Send,
        F: FnOnce() -> io::Result<T> + Send,
    {
        let path = format!("/run/netns/{}", self.netns);
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    setns(File::open(&path)?, CloneFlags::CLONE_NEWNET)?;
                    f()
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Makes the host silently discard everything it sends to the root namespace, so probes from
    /// there time out. (No netem and no netfilter here; a blackhole route for the gateway drops the
    /// SYN-ACKs, echoes and ICMP errors without telling anyone.)
    pub fn drop_packets(&self) -> Result<()> {
        ip(&[
            "-n",
            &self.netns,
            "route",
            "replace",
            "blackhole",
            &self.gateway_32(),
        ])
    }

    /// Undoes [`Self::drop_packets`]; harmless if packets were not being dropped.
    pub fn restore_packets(&self) -> Result<()> {
        let deleted = ip(&[
            "-n",
            &self.netns,
            "route",
            "del",
            "blackhole",
            &self.gateway_32(),
        ]);
        match deleted {
            Err(e) if format!("{e:#}").contains("No such process") => Ok(()),
            other => other,
        }
    }

    /// Takes the root side of the host's link down: the host disappears from the bridge.
    pub fn link_down(&self) -> Result<()> {
        ip(&["link", "set", &self.veth, "down"])
    }

    pub fn link_up(&self) -> Result<()> {
        ip(&["link", "set", &self.veth, "up"])
    }

    fn gateway_32(&self) -> String {
        format!("{}/32", self.gateway)
    }
}

/// Runs `ip args…`, turning a failure into an error that quotes the command and its stderr.
fn ip(args: &[&str]) -> Result<()> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !output.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

fn warn(result: Result<()>) {
    if let Err(e) = result {
        eprintln!("test network cleanup: {e:#}");
    }
}

/// The cross-process lock for claiming, sweeping and the guard route.
fn lock() -> Result<Flock<File>> {
    let path = format!("{STATE_DIR}/lock");
    let file = File::create(&path).with_context(|| format!("opening {path}"))?;
    Flock::lock(file, FlockArg::LockExclusive)
        .map_err(|(_, errno)| anyhow::anyhow!("locking {path}: {errno}"))
}

/// Takes the first K whose bridge does not exist yet; creating the bridge is the atomic claim.
/// Call with the lock held.
fn claim_subnet() -> Result<u8> {
    let mut last_error = None;
    for k in 1..=250u8 {
        match ip(&["link", "add", &format!("eob{k}"), "type", "bridge"]) {
            Ok(()) => {
                fs::write(owner_file(k), Owner::current()?.to_string())
                    .context("recording the subnet's owner")?;
                return Ok(k);
            }
            Err(e) => last_error = Some(e),
        }
    }
    Err(last_error
        .expect("the loop ran")
        .context("no free 10.240.K.0/24 test subnet (K = 1..=250)"))
}

/// Removes every namespace, link and owner file whose owning process is gone. Call with the lock held.
fn sweep_stale() {
    let live: Vec<u8> = (1..=250).filter(|k| owner_is_live(*k)).collect();
    let stale = |name: &str| subnet_of(name).is_some_and(|k| !live.contains(&k));
    for name in dir_names(STATE_DIR).filter(|n| n.starts_with("net-")) {
        if stale(&name) {
            let _ = fs::remove_file(format!("{STATE_DIR}/{name}"));
        }
    }
    // veths before namespaces and bridges: see TestNet's Drop.
    let mut links: Vec<String> = dir_names("/sys/class/net").filter(|n| stale(n)).collect();
    links.sort_by_key(|n| n.starts_with("eob"));
    for name in links {
        warn(ip(&["link", "del", &name]));
    }
    for name in dir_names("/run/netns").filter(|n| stale(n)) {
        warn(ip(&["netns", "del", &name]));
    }
}

/// Removes the guard route unless another live process still has a subnet. Call with the lock held.
fn remove_guard_if_unused() {
    if !(1..=250).any(owner_is_live) {
        warn(ip(&["route", "del", "unreachable", GUARD]));
    }
}

/// K for our names: `net-K` (owner files), `eobK`, `eovK-N` (links), `eo-K-N` (namespaces).
fn subnet_of(name: &str) -> Option<u8> {
    let rest = ["net-", "eob", "eov", "eo-"]
        .iter()
        .find_map(|prefix| name.strip_prefix(prefix))?;
    rest.split('-').next()?.parse().ok()
}

fn dir_names(dir: &str) -> impl Iterator<Item = String> {
    fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().into_string().ok())
}

fn owner_file(k: u8) -> String {
    format!("{STATE_DIR}/net-{k}")
}

fn owner_is_live(k: u8) -> bool {
    fs::read_to_string(owner_file(k))
        .ok()
        .and_then(|text| Owner::parse(&text))
        .is_some_and(|owner| Owner::of(owner.pid).as_ref() == Some(&owner))
}

/// A process identity that survives PID reuse: the PID plus its start time in clock ticks.
#[derive(Debug, PartialEq)]
struct Owner {
    pid: u32,
    start: u64,
}

impl Owner {
    fn current() -> Result<Owner> {
        Owner::of(std::process::id()).context("reading our own /proc/self/stat")
    }

    /// The identity of a running process, `None` if there is no such process.
    fn of(pid: u32) -> Option<Owner> {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name may contain spaces and parentheses; fields resume after the last ')'.
        // starttime is field 22, the 20th after that parenthesis.
        let after_comm = &stat[stat.rfind(')')? + 1..];
        let start = after_comm.split_whitespace().nth(19)?.parse().ok()?;
        Some(Owner { pid, start })
    }

    fn parse(text: &str) -> Option<Owner> {
        let (pid, start) = text.trim().split_once(' ')?;
        Some(Owner {
            pid: pid.parse().ok()?,
            start: start.parse().ok()?,
        })
    }
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.pid, self.start)
    }
}
