//! The one conversion from the user-facing spec to the trusted model. It never fails as a whole:
//! a bad host drops that host, a bad port drops that port, and only a definition without a usable
//! identity or port is dropped entirely. Every drop is a [`Problem`] naming field and value.

use std::collections::{BTreeSet, HashSet};
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use super::Source;
use super::spec::{Manifest, PortSpec, TlsSpec, UdpData};
use super::{
    Check, Definition, DefinitionKey, GrpcCheck, HttpCheck, Port, Protocol, Timing, TlsVerify,
};

pub const API_VERSION: &str = "sealos.io/v1beta1";
pub const KIND: &str = "ClusterEndpoint";

/// A finding about one field of one definition.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Problem {
    /// File and document, or object reference.
    pub origin: String,
    /// Field path such as `spec.ports[1].hosts[0]`.
    pub field: String,
    pub value: String,
    pub reason: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.origin)?;
        if !self.field.is_empty() {
            write!(f, "{}", self.field)?;
            match &self.value {
                v if v.is_empty() => {}
                // Numbers read as numbers; anything else quoted, so spaces and empties show.
                v if v.parse::<f64>().is_ok() => write!(f, " = {v}")?,
                v => write!(f, " = {v:?}")?,
            }
            write!(f, ": ")?;
        }
        write!(f, "{}", self.reason)
    }
}

/// Collects problems with the origin filled in.
struct Report<'a> {
    origin: &'a str,
    problems: Vec<Problem>,
}

impl Report<'_> {
    fn add(
        &mut self,
        field: impl Into<String>,
        value: impl fmt::Display,
        reason: impl Into<String>,
    ) {
        self.problems.push(Problem {
            origin: self.origin.to_string(),
            field: field.into(),
            value: value.to_string(),
            reason: reason.into(),
        });
    }
}

/// Validates one manifest. Returns the definition (if anything usable is left) and every problem.
pub fn validate(manifest: &Manifest, origin: &str) -> (Option<Definition>, Vec<Problem>) {
    let mut report = Report {
        origin,
        problems: Vec::new(),
    };
    let definition = build_definition(manifest, &mut report);
    (definition, report.problems)
}

fn build_definition(m: &Manifest, report: &mut Report) -> Option<Definition> {
    if let Some(v) = &m.api_version
        && v != API_VERSION
    {
        report.add("apiVersion", v, format!("expected {API_VERSION}"));
        return None;
    }
    if let Some(k) = &m.kind
        && k != KIND
    {
        report.add("kind", k, format!("expected {KIND}"));
        return None;
    }
    let name = &m.metadata.name;
    if let Err(reason) = dns_1035_label(name) {
        report.add(
            "metadata.name",
            name,
            format!("not usable as a Service name: {reason}"),
        );
        return None;
    }
    let namespace = m
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    if let Err(reason) = dns_1123_label(&namespace) {
        report.add("metadata.namespace", &namespace, reason);
        return None;
    }

    let spec = &m.spec;
    let cluster_ip = match spec.cluster_ip.as_deref().map(str::trim) {
        None | Some("") => None,
        Some("None") => Some("None".to_string()),
        Some(other) => match other.parse::<std::net::IpAddr>() {
            // The API server checks it lies in the service range when the Service is created.
            Ok(ip) => Some(ip.to_string()),
            Err(_) => {
                report.add(
                    "spec.clusterIP",
                    other,
                    "expected \"None\" (headless) or an IP address in the service range",
                );
                return None;
            }
        },
    };
    let labels = valid_metadata(&m.metadata.labels, "metadata.labels", true, report);
    let annotations = valid_metadata(
        &m.metadata.annotations,
        "metadata.annotations",
        false,
        report,
    );
    let period = seconds(spec.period_seconds, 10, 1, "spec.periodSeconds", report);
    if spec.ports.is_empty() {
        report.add("spec.ports", "[]", "at least one port is required");
        return None;
    }

    let mut ports = Vec::new();
    let mut names = HashSet::new();
    let mut numbers = HashSet::new();
    let multi = spec.ports.len() > 1;
    for (i, p) in spec.ports.iter().enumerate() {
        let field = format!("spec.ports[{i}]");
        let period = period.unwrap_or(Duration::from_secs(10));
        let Some(port) = build_port(p, &field, period, multi, &spec.hosts, report) else {
            continue;
        };
        if !names.insert(port.name.clone()) {
            report.add(format!("{field}.name"), &port.name, "duplicate port name");
            continue;
        }
        if !numbers.insert((port.port, port.protocol)) {
            report.add(
                format!("{field}.port"),
                port.port,
                format!("duplicate {} port", port.protocol.as_str()),
            );
            continue;
        }
        ports.push(port);
    }
    if ports.is_empty() {
        report.add(
            "spec.ports",
            "",
            "no valid port left; the definition is skipped",
        );
        return None;
    }
    // An invalid period was reported above; the ports were still checked so all problems show.
    period?;

    let clusters = spec.clusters.as_ref().map(|c| {
        c.iter()
            .cloned()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect()
    });
    Some(Definition {
        key: DefinitionKey {
            namespace,
            name: name.clone(),
        },
        source: Source::File,
        object: None,
        origin: report.origin.to_string(),
        labels,
        annotations,
        cluster_ip,
        clusters,
        ports,
    })
}

/// Every field is checked (so one run reports every problem); any invalid field drops the port.
fn build_port(
    p: &PortSpec,
    field: &str,
    period: Duration,
    multi: bool,
    shared_hosts: &[String],
    report: &mut Report,
) -> Option<Port> {
    let port = port_number(p.port, &format!("{field}.port"), report);
    let target_port = match p.target_port {
        None | Some(0) => port,
        Some(t) => port_number(t, &format!("{field}.targetPort"), report),
    };
    let protocol = match p
        .protocol
        .as_deref()
        .map(str::to_ascii_uppercase)
        .as_deref()
    {
        None | Some("TCP") => Some(Protocol::Tcp),
        Some("UDP") => Some(Protocol::Udp),
        Some("SCTP") => Some(Protocol::Sctp),
        Some(_) => {
            report.add(
                format!("{field}.protocol"),
                p.protocol.as_deref().unwrap_or(""),
                "expected TCP, UDP or SCTP",
            );
            None
        }
    };
    let name_ok = if p.name.is_empty() {
        if multi {
            report.add(
                format!("{field}.name"),
                "",
                "a name is required when there is more than one port",
            );
        }
        !multi
    } else if let Err(reason) = dns_1123_label(&p.name) {
        report.add(format!("{field}.name"), &p.name, reason);
        false
    } else {
        true
    };
    let timeout = seconds(
        p.timeout_seconds,
        1,
        1,
        &format!("{field}.timeoutSeconds"),
        report,
    );
    let initial_delay = seconds(
        p.initial_delay_seconds,
        0,
        0,
        &format!("{field}.initialDelaySeconds"),
        report,
    );
    let success_threshold = threshold(
        p.success_threshold,
        1,
        &format!("{field}.successThreshold"),
        report,
    );
    let failure_threshold = threshold(
        p.failure_threshold,
        3,
        &format!("{field}.failureThreshold"),
        report,
    );
    let check = build_check(p, field, report);
    let check_fits = match (protocol, &check) {
        (Some(protocol), Some(Some(check))) => probe_fits_protocol(check, protocol, field, report),
        _ => true,
    };

    // Before v0.2.1 the original operator kept one host list for all ports in `spec.hosts`.
    let (listed, hosts_field) = if p.hosts.is_empty() && !shared_hosts.is_empty() {
        (shared_hosts, "spec.hosts".to_string())
    } else {
        (p.hosts.as_slice(), format!("{field}.hosts"))
    };
    let mut hosts = Vec::new();
    for (j, raw) in listed.iter().enumerate() {
        let host_field = format!("{hosts_field}[{j}]");
        match endpoint_ip(raw) {
            Ok(ip) if hosts.contains(&ip) => report.add(host_field, raw, "duplicate host"),
            Ok(ip) => hosts.push(ip),
            Err(reason) => report.add(host_field, raw, reason),
        }
    }
    if !name_ok || !check_fits {
        return None;
    }
    Some(Port {
        name: p.name.clone(),
        protocol: protocol?,
        port: port?,
        target_port: target_port?,
        hosts,
        check: check?.map(Arc::new),
        timing: Timing {
            period,
            timeout: timeout?,
            initial_delay: initial_delay?,
            success_threshold: success_threshold?,
            failure_threshold: failure_threshold?,
        },
    })
}

/// UDP ports take only the UDP probe and TCP ports only the others; SCTP cannot be probed.
fn probe_fits_protocol(
    check: &Check,
    protocol: Protocol,
    field: &str,
    report: &mut Report,
) -> bool {
    let fits = match protocol {
        Protocol::Udp => matches!(check, Check::Udp(_)),
        Protocol::Tcp => !matches!(check, Check::Udp(_)),
        Protocol::Sctp => false,
    };
    if !fits {
        let reason = match protocol {
            Protocol::Sctp => "SCTP ports cannot be probed; leave the probe out to publish the hosts as always ready".to_string(),
            _ => format!("a {} probe does not fit a {} port", check.kind(), protocol.as_str()),
        };
        report.add(format!("{field}.protocol"), protocol.as_str(), reason);
    }
    fits
}

/// `Ok(None)` is a static port. More than one enabled probe is ambiguous and drops the port.
fn build_check(p: &PortSpec, field: &str, report: &mut Report) -> Option<Option<Check>> {
    let mut checks = Vec::new();
    if p.tcp_socket.as_ref().is_some_and(|t| t.enable) {
        checks.push(("tcpSocket", Check::Tcp));
    }
    if let Some(h) = &p.http_get {
        let https = match h.scheme.as_deref().map(str::to_ascii_uppercase).as_deref() {
            None | Some("") | Some("HTTP") => false,
            Some("HTTPS") => true,
            Some(_) => {
                let value = h.scheme.as_deref().unwrap_or("");
                report.add(
                    format!("{field}.httpGet.scheme"),
                    value,
                    "expected HTTP or HTTPS",
                );
                return None;
            }
        };
        let path = match h.path.as_deref() {
            None | Some("") => "/".to_string(),
            Some(p) if p.starts_with('/') => p.to_string(),
            Some(p) => format!("/{p}"),
        };
        if path.chars().any(|c| c.is_whitespace() || c.is_control()) {
            report.add(
                format!("{field}.httpGet.path"),
                &path,
                "spaces and control characters must be percent-encoded",
            );
            return None;
        }
        let mut headers = Vec::new();
        for (k, header) in h.http_headers.iter().enumerate() {
            if header.name.is_empty() || !header.name.bytes().all(is_token_byte) {
                report.add(
                    format!("{field}.httpGet.httpHeaders[{k}].name"),
                    &header.name,
                    "not a valid HTTP header name",
                );
                return None;
            }
            if header.value.chars().any(|c| c.is_control() && c != '\t') {
                report.add(
                    format!("{field}.httpGet.httpHeaders[{k}].value"),
                    &header.value,
                    "control characters (such as line breaks) are not allowed in a header value",
                );
                return None;
            }
            headers.push((header.name.clone(), header.value.clone()));
        }
        let verify = match &h.tls {
            Some(_) if !https => {
                report.add(
                    format!("{field}.httpGet.tls"),
                    "",
                    "TLS settings need scheme HTTPS",
                );
                return None;
            }
            Some(tls) => tls_verify(tls, &format!("{field}.httpGet.tls"), report)?,
            None => None,
        };
        checks.push((
            "httpGet",
            Check::Http(HttpCheck {
                https,
                path,
                headers,
                verify,
            }),
        ));
    }
    if let Some(u) = p.udp_socket.as_ref().filter(|u| u.enable) {
        let data = match &u.data {
            None => Vec::new(),
            Some(UdpData::Text(s)) => s.clone().into_bytes(),
            Some(UdpData::Bytes(b)) => b.clone(),
        };
        checks.push(("udpSocket", Check::Udp(data)));
    }
    if let Some(g) = p.grpc.as_ref().filter(|g| g.enable) {
        let tls = match &g.tls {
            Some(tls) => Some(tls_verify(tls, &format!("{field}.grpc.tls"), report)?),
            None => None,
        };
        checks.push((
            "grpc",
            Check::Grpc(GrpcCheck {
                service: g.service.clone().unwrap_or_default(),
                tls,
            }),
        ));
    }
    match checks.len() {
        0 | 1 => Some(checks.pop().map(|(_, c)| c)),
        _ => {
            let kinds: Vec<_> = checks.iter().map(|(k, _)| *k).collect();
            report.add(
                field.to_string(),
                kinds.join(", "),
                "more than one probe is enabled; enable exactly one",
            );
            None
        }
    }
}

/// `Some(None)`: TLS without verification; `None`: the settings are invalid (reported).
fn tls_verify(tls: &TlsSpec, field: &str, report: &mut Report) -> Option<Option<TlsVerify>> {
    if let Some(name) = &tls.server_name
        && rustls::pki_types::ServerName::try_from(name.as_str()).is_err()
    {
        report.add(
            format!("{field}.serverName"),
            name,
            "not a DNS name or IP address",
        );
        return None;
    }
    let Some(ca) = &tls.ca_bundle else {
        if let Some(name) = &tls.server_name {
            report.add(
                format!("{field}.serverName"),
                name,
                "needs caBundle: without it nothing is verified",
            );
            return None;
        }
        return Some(None);
    };
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(ca.as_bytes()).collect();
    match certs {
        Ok(certs) if !certs.is_empty() => Some(Some(TlsVerify {
            ca_pem: ca.clone(),
            server_name: tls.server_name.clone(),
        })),
        _ => {
            let start: String = ca.chars().take(40).collect();
            report.add(format!("{field}.caBundle"), start, "not PEM certificates");
            None
        }
    }
}

/// Labels or annotations the API server accepts; invalid entries are reported and left out.
fn valid_metadata(
    entries: &std::collections::BTreeMap<String, String>,
    field: &str,
    labels: bool,
    report: &mut Report,
) -> std::collections::BTreeMap<String, String> {
    let mut valid = std::collections::BTreeMap::new();
    for (key, value) in entries {
        if let Err(reason) = qualified_name(key) {
            report.add(
                format!("{field}[{key}]"),
                key,
                format!("invalid key: {reason}"),
            );
        } else if labels && !(value.is_empty() || (value.len() <= 63 && name_part(value))) {
            let reason = "a label value is empty or up to 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit";
            report.add(format!("{field}[{key}]"), value, reason);
        } else {
            valid.insert(key.clone(), value.clone());
        }
    }
    valid
}

/// `[prefix/]name` as Kubernetes label and annotation keys are written.
fn qualified_name(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        let ok = !prefix.is_empty()
            && prefix.len() <= 253
            && prefix.split('.').all(|l| dns_1123_label(l).is_ok());
        if !ok {
            return Err("the prefix before '/' must be a DNS subdomain".into());
        }
    }
    if name.is_empty() || name.len() > 63 || !name_part(name) {
        return Err("the name must be 1-63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit".into());
    }
    Ok(())
}

fn name_part(s: &str) -> bool {
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    edge(s.chars().next())
        && edge(s.chars().last())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// An address the API server accepts in an EndpointSlice or Endpoints, in canonical form.
pub fn endpoint_ip(raw: &str) -> Result<IpAddr, String> {
    let ip: IpAddr = raw.trim().parse().map_err(|_| {
        "not an IP address (host names are not resolved; list the addresses)".to_string()
    })?;
    let reason = match ip {
        IpAddr::V4(v4) if v4.is_unspecified() => "the unspecified address cannot be an endpoint",
        IpAddr::V4(v4) if v4.is_loopback() => "loopback addresses cannot be endpoints",
        IpAddr::V4(v4) if v4.is_link_local() => "link-local addresses cannot be endpoints",
        IpAddr::V4(v4) if v4.is_multicast() || v4.is_broadcast() => {
            "multicast and broadcast addresses cannot be endpoints"
        }
        IpAddr::V6(v6) if v6.is_unspecified() => "the unspecified address cannot be an endpoint",
        IpAddr::V6(v6) if v6.is_loopback() => "loopback addresses cannot be endpoints",
        IpAddr::V6(v6) if v6.is_unicast_link_local() => "link-local addresses cannot be endpoints",
        IpAddr::V6(v6) if v6.is_multicast() => "multicast addresses cannot be endpoints",
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => {
            "IPv4-mapped IPv6 addresses are ambiguous; write the IPv4 address"
        }
        _ => return Ok(ip),
    };
    Err(reason.to_string())
}

fn port_number(value: i64, field: &str, report: &mut Report) -> Option<u16> {
    match u16::try_from(value) {
        Ok(p) if p > 0 => Some(p),
        _ => {
            report.add(field, value, "must be between 1 and 65535");
            None
        }
    }
}

fn seconds(
    value: Option<i64>,
    default: u64,
    min: i64,
    field: &str,
    report: &mut Report,
) -> Option<Duration> {
    match value {
        None => Some(Duration::from_secs(default)),
        Some(v) if v >= min && v <= 86_400 => Some(Duration::from_secs(v as u64)),
        Some(v) => {
            report.add(field, v, format!("must be between {min} and 86400 seconds"));
            None
        }
    }
}

fn threshold(value: Option<i64>, default: u32, field: &str, report: &mut Report) -> Option<u32> {
    match value {
        None => Some(default),
        Some(v) if (1..=1000).contains(&v) => Some(v as u32),
        Some(v) => {
            report.add(field, v, "must be between 1 and 1000");
            None
        }
    }
}

fn dns_1123_label(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err("must be 1-63 lowercase letters, digits or '-', starting and ending with a letter or digit".into())
    }
}

fn dns_1035_label(s: &str) -> Result<(), String> {
    dns_1123_label(s)?;
    if s.starts_with(|c: char| c.is_ascii_lowercase()) {
        Ok(())
    } else {
        Err("must start with a lowercase letter".into())
    }
}

fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::spec::{ClusterEndpointSpec, HttpGetSpec, Metadata, TcpSocketSpec};

    fn manifest(ports: Vec<PortSpec>) -> Manifest {
        Manifest {
            api_version: Some(API_VERSION.into()),
            kind: Some(KIND.into()),
            metadata: Metadata {
                name: "db".into(),
                namespace: Some("prod".into()),
                ..Default::default()
            },
            spec: ClusterEndpointSpec {
                ports,
                ..Default::default()
            },
            status: None,
        }
    }

    fn tcp_port(name: &str, port: i64, hosts: &[&str]) -> PortSpec {
        PortSpec {
            name: name.into(),
            port,
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            tcp_socket: Some(TcpSocketSpec { enable: true }),
            ..Default::default()
        }
    }

    #[test]
    fn shared_hosts_of_the_original_before_v0_2_1_serve_ports_without_their_own() {
        let mut m = manifest(vec![
            tcp_port("pg", 5432, &[]),
            tcp_port("admin", 8080, &["10.0.0.9"]),
        ]);
        m.spec.hosts = vec!["10.0.0.1".into(), "127.0.0.1".into()];
        let (def, problems) = validate(&m, "f.yaml");
        let def = def.unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(def.ports[0].hosts, [ip("10.0.0.1")]);
        assert_eq!(def.ports[1].hosts, [ip("10.0.0.9")]);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(
            (problems[0].field.as_str(), problems[0].value.as_str()),
            ("spec.hosts[1]", "127.0.0.1")
        );
    }

    #[test]
    fn defaults_follow_the_original_operator() {
        let (def, problems) =
            validate(&manifest(vec![tcp_port("", 5432, &["10.0.0.1"])]), "f.yaml");
        assert!(problems.is_empty(), "{problems:?}");
        let port = &def.unwrap().ports[0];
        assert_eq!(port.target_port, 5432);
        assert_eq!(port.protocol, Protocol::Tcp);
        assert_eq!(
            port.timing,
            Timing {
                period: Duration::from_secs(10),
                timeout: Duration::from_secs(1),
                initial_delay: Duration::ZERO,
                success_threshold: 1,
                failure_threshold: 3
            }
        );
        assert_eq!(port.check.as_deref(), Some(&Check::Tcp));
    }

    #[test]
    fn each_invalid_host_is_reported_and_the_rest_are_kept() {
        let hosts = [
            "10.240.0.2",
            "127.0.0.1",
            "db-replica.internal",
            "169.254.10.10",
            "10.240.0.3",
            "::1",
            "fe80::1",
            "224.0.0.5",
            "0.0.0.0",
            "10.240.0.2",
        ];
        let (def, problems) = validate(&manifest(vec![tcp_port("pg", 5432, &hosts)]), "f.yaml");
        let kept: Vec<String> = def.unwrap().ports[0]
            .hosts
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(kept, ["10.240.0.2", "10.240.0.3"]);
        let reported: Vec<(&str, &str)> = problems
            .iter()
            .map(|p| (p.field.as_str(), p.value.as_str()))
            .collect();
        assert_eq!(
            reported,
            [
                ("spec.ports[0].hosts[1]", "127.0.0.1"),
                ("spec.ports[0].hosts[2]", "db-replica.internal"),
                ("spec.ports[0].hosts[3]", "169.254.10.10"),
                ("spec.ports[0].hosts[5]", "::1"),
                ("spec.ports[0].hosts[6]", "fe80::1"),
                ("spec.ports[0].hosts[7]", "224.0.0.5"),
                ("spec.ports[0].hosts[8]", "0.0.0.0"),
                ("spec.ports[0].hosts[9]", "10.240.0.2"),
            ]
        );
        assert!(problems[1].reason.contains("not an IP address"));
        assert!(problems.iter().all(|p| p.origin == "f.yaml"));
    }

    #[test]
    fn ipv6_hosts_are_kept_in_canonical_form() {
        assert_eq!(
            endpoint_ip("2001:DB8:0:0::1").unwrap().to_string(),
            "2001:db8::1"
        );
        assert!(endpoint_ip("::ffff:10.0.0.1").is_err());
        assert!(endpoint_ip("010.0.0.1").is_err());
    }

    #[test]
    fn a_bad_port_drops_only_that_port() {
        let ports = vec![
            tcp_port("ok", 80, &["10.0.0.1"]),
            tcp_port("bad", 70000, &["10.0.0.1"]),
        ];
        let (def, problems) = validate(&manifest(ports), "f.yaml");
        assert_eq!(def.unwrap().ports.len(), 1);
        assert_eq!(problems.len(), 1);
        assert_eq!(
            (problems[0].field.as_str(), problems[0].value.as_str()),
            ("spec.ports[1].port", "70000")
        );
    }

    #[test]
    fn http_scheme_is_optional_and_case_insensitive() {
        let mut port = tcp_port("web", 80, &["10.0.0.1"]);
        port.tcp_socket = None;
        port.http_get = Some(HttpGetSpec {
            path: Some("healthz".into()),
            ..Default::default()
        });
        let (def, _) = validate(&manifest(vec![port.clone()]), "f");
        assert_eq!(
            def.unwrap().ports[0].check.as_deref(),
            Some(&Check::Http(HttpCheck {
                https: false,
                path: "/healthz".into(),
                headers: vec![],
                verify: None
            }))
        );
        port.http_get.as_mut().unwrap().scheme = Some("https".into());
        let (def, _) = validate(&manifest(vec![port.clone()]), "f");
        assert_eq!(
            def.unwrap().ports[0].check.as_ref().unwrap().kind(),
            "https"
        );
        port.http_get.as_mut().unwrap().scheme = Some("ftp".into());
        let (def, problems) = validate(&manifest(vec![port]), "f");
        assert!(def.is_none());
        assert_eq!(problems[0].field, "spec.ports[0].httpGet.scheme");
    }

    #[test]
    fn a_disabled_probe_makes_a_static_port_and_two_probes_are_ambiguous() {
        let mut port = tcp_port("p", 80, &["10.0.0.1"]);
        port.tcp_socket = Some(TcpSocketSpec { enable: false });
        let (def, _) = validate(&manifest(vec![port.clone()]), "f");
        assert_eq!(def.unwrap().ports[0].check, None);
        port.tcp_socket = Some(TcpSocketSpec { enable: true });
        port.http_get = Some(HttpGetSpec::default());
        let (def, problems) = validate(&manifest(vec![port]), "f");
        assert!(def.is_none());
        assert_eq!(problems[0].value, "tcpSocket, httpGet");
    }

    #[test]
    fn names_and_thresholds_are_checked() {
        let mut m = manifest(vec![
            tcp_port("a", 80, &[]),
            tcp_port("a", 81, &[]),
            tcp_port("", 82, &[]),
            tcp_port("a", 83, &[]),
        ]);
        m.spec.ports[0].failure_threshold = Some(0);
        m.spec.period_seconds = Some(5);
        let (def, problems) = validate(&m, "f");
        let fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "spec.ports[0].failureThreshold",
                "spec.ports[2].name",
                "spec.ports[3].name"
            ]
        );
        assert_eq!(problems[2].reason, "duplicate port name");
        assert_eq!(
            def.unwrap()
                .ports
                .iter()
                .map(|p| p.port)
                .collect::<Vec<_>>(),
            [81]
        );
        m.metadata.name = "1db".into();
        let (_, problems) = validate(&m, "f");
        assert_eq!(problems[0].field, "metadata.name");
    }

    fn fields(problems: &[Problem]) -> Vec<&str> {
        problems.iter().map(|p| p.field.as_str()).collect()
    }

    #[test]
    fn every_problem_of_a_port_is_reported_in_one_run() {
        let mut port = tcp_port("pg", 0, &["127.0.0.1"]);
        port.timeout_seconds = Some(0);
        port.failure_threshold = Some(0);
        port.protocol = Some("tcpp".into());
        let mut m = manifest(vec![port]);
        m.spec.period_seconds = Some(0);
        let (def, problems) = validate(&m, "f");
        assert!(def.is_none());
        assert_eq!(
            fields(&problems),
            [
                "spec.periodSeconds",
                "spec.ports[0].port",
                "spec.ports[0].protocol",
                "spec.ports[0].timeoutSeconds",
                "spec.ports[0].failureThreshold",
                "spec.ports[0].hosts[0]",
                "spec.ports",
            ]
        );
    }

    #[test]
    fn a_probe_must_fit_the_port_protocol() {
        let mut udp = tcp_port("dns", 53, &["10.0.0.1"]);
        udp.protocol = Some("UDP".into());
        let mut sctp = tcp_port("sig", 2905, &["10.0.0.1"]);
        sctp.protocol = Some("SCTP".into());
        let (_, problems) = validate(&manifest(vec![udp, sctp, tcp_port("ok", 80, &[])]), "f");
        assert_eq!(
            fields(&problems),
            ["spec.ports[0].protocol", "spec.ports[1].protocol"]
        );
        assert!(
            problems[0]
                .reason
                .contains("tcp probe does not fit a UDP port"),
            "{problems:?}"
        );
        assert!(
            problems[1].reason.contains("SCTP ports cannot be probed"),
            "{problems:?}"
        );
    }

    #[test]
    fn invalid_labels_and_annotations_are_dropped_and_reported() {
        let mut m = manifest(vec![tcp_port("", 80, &[])]);
        m.metadata.labels = [("team", "data"), ("bad key!", "x"), ("tier", "not ok")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        m.metadata.annotations = [("a/b/c", "x"), ("example.com/note", "any text: fine")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let (def, problems) = validate(&m, "f");
        let def = def.unwrap();
        assert_eq!(def.labels.keys().collect::<Vec<_>>(), ["team"]);
        assert_eq!(
            def.annotations.keys().collect::<Vec<_>>(),
            ["example.com/note"]
        );
        assert_eq!(
            fields(&problems),
            [
                "metadata.labels[bad key!]",
                "metadata.labels[tier]",
                "metadata.annotations[a/b/c]"
            ]
        );
    }

    #[test]
    fn cluster_ip_may_be_none_or_a_fixed_address() {
        let mut m = manifest(vec![tcp_port("", 80, &[])]);
        m.spec.cluster_ip = Some("10.96.0.100".into());
        assert_eq!(
            validate(&m, "f").0.unwrap().cluster_ip.as_deref(),
            Some("10.96.0.100")
        );
        m.spec.cluster_ip = Some("None".into());
        assert_eq!(
            validate(&m, "f").0.unwrap().cluster_ip.as_deref(),
            Some("None")
        );
        m.spec.cluster_ip = Some("auto".into());
        assert_eq!(fields(&validate(&m, "f").1), ["spec.clusterIP"]);
    }

    #[test]
    fn header_values_and_paths_cannot_smuggle_control_characters() {
        let mut port = tcp_port("web", 80, &[]);
        port.tcp_socket = None;
        port.http_get = Some(HttpGetSpec {
            http_headers: vec![crate::model::spec::HttpHeader {
                name: "X".into(),
                value: "a\r\nInjected: 1".into(),
            }],
            ..Default::default()
        });
        assert_eq!(
            fields(&validate(&manifest(vec![port.clone()]), "f").1),
            ["spec.ports[0].httpGet.httpHeaders[0].value", "spec.ports"]
        );
        port.http_get = Some(HttpGetSpec {
            path: Some("/health check".into()),
            ..Default::default()
        });
        assert_eq!(
            fields(&validate(&manifest(vec![port]), "f").1),
            ["spec.ports[0].httpGet.path", "spec.ports"]
        );
    }

    #[test]
    fn problems_print_as_file_field_value_reason() {
        let p = Problem {
            origin: "f.yaml".into(),
            field: "spec.ports[0].port".into(),
            value: "70000".into(),
            reason: "too big".into(),
        };
        assert_eq!(p.to_string(), "f.yaml: spec.ports[0].port = 70000: too big");
        let p = Problem {
            origin: "f.yaml".into(),
            field: String::new(),
            value: String::new(),
            reason: "line 3 column 1: oops".into(),
        };
        assert_eq!(p.to_string(), "f.yaml: line 3 column 1: oops");
    }
}
