//! The status page at `/`: what a person on call reads at a glance, built from the same report
//! as the JSON API. Server-rendered HTML without script; it reloads itself every 5 seconds.
//! What needs attention comes first: the verdict, problems, failing clusters, then definitions
//! with hosts not ready (those hosts first within each port). State is always said in words
//! as well as in colour.

use std::fmt::{self, Write};
use std::time::{Duration, SystemTime};

use super::{DefinitionReport, HostReport, PortReport, StatusReport, plural};
use crate::probe::state::Readiness;
use crate::sink::ClusterStatus;

/// `s` with the characters that mean something in HTML text and attribute values escaped.
pub struct Escaped<'a>(pub &'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rest = self.0;
        while let Some(i) = rest.find(['&', '<', '>', '"', '\'']) {
            f.write_str(&rest[..i])?;
            f.write_str(match rest.as_bytes()[i] {
                b'&' => "&amp;",
                b'<' => "&lt;",
                b'>' => "&gt;",
                b'"' => "&quot;",
                _ => "&#39;",
            })?;
            rest = &rest[i + 1..];
        }
        f.write_str(rest)
    }
}

fn esc(s: &str) -> Escaped<'_> {
    Escaped(s)
}

pub fn render(report: &StatusReport, now: SystemTime) -> Result<String, fmt::Error> {
    let mut out = String::with_capacity(16 * 1024);
    let summary = Summary::of(report);
    head(&mut out, &summary)?;
    header(&mut out, report, &summary, now)?;
    problems(&mut out, report)?;
    clusters(&mut out, &report.clusters, now)?;
    definitions(&mut out, &report.definitions, now)?;
    out.write_str("</main></body></html>\n")?;
    Ok(out)
}

struct Summary {
    hosts: usize,
    ready: usize,
    clusters_ok: usize,
    clusters_failing: usize,
    /// Clusters that have not answered yet and have no error either.
    clusters_waiting: usize,
    attention: bool,
}

impl Summary {
    fn of(report: &StatusReport) -> Summary {
        let hosts = || report.definitions.iter().flat_map(all_hosts);
        let (mut ok, mut failing, mut waiting) = (0, 0, 0);
        for cluster in &report.clusters {
            match cluster_state(cluster) {
                ClusterState::Ok => ok += 1,
                ClusterState::Failing => failing += 1,
                ClusterState::Waiting => waiting += 1,
            }
        }
        let ready = hosts().filter(|h| h.ready).count();
        let total = hosts().count();
        Summary {
            hosts: total,
            ready,
            clusters_ok: ok,
            clusters_failing: failing,
            clusters_waiting: waiting,
            attention: ready < total || failing > 0 || !report.problems.is_empty(),
        }
    }
}

fn all_hosts(def: &DefinitionReport) -> impl Iterator<Item = &HostReport> {
    def.ports.iter().flat_map(|p| &p.hosts)
}

enum ClusterState {
    Ok,
    Failing,
    Waiting,
}

fn cluster_state(c: &ClusterStatus) -> ClusterState {
    match c.connected {
        Some(false) => ClusterState::Failing,
        _ if c.pending > 0 || !c.conflicts.is_empty() => ClusterState::Failing,
        Some(true) => ClusterState::Ok,
        None if c.last_error.is_some() => ClusterState::Failing,
        None => ClusterState::Waiting,
    }
}

const STYLE: &str = "
body{font:15px/1.4 system-ui,sans-serif;margin:0;color:#1f2328;background:#f6f8fa}
header{padding:12px 20px;color:#fff}
header.good{background:#1a7f37}header.bad{background:#cf222e}header.wait{background:#9a6700}
h1{font-size:16px;margin:0;font-weight:600}
.verdict{font-size:26px;font-weight:700;margin:2px 0}
.summary{font-size:18px;margin:0}.meta{margin:4px 0 0;opacity:.9;font-size:13px}
.meta a{color:#fff}
main{padding:4px 20px 20px}
h2{font-size:18px;margin:18px 0 6px}
h3{font-size:16px;margin:0 0 2px}
section.def{background:#fff;border:1px solid #d0d7de;border-radius:6px;padding:8px 12px;margin:10px 0}
section.def.bad{border:2px solid #cf222e}
.origin{color:#59636e;font-size:13px;margin:0 0 6px}
table{border-collapse:collapse;width:100%;background:#fff}
th,td{text-align:left;padding:3px 8px;border-bottom:1px solid #d8dee4;vertical-align:top}
th{font-size:13px;color:#59636e;font-weight:600}
tr.port th{background:#eef1f4;color:#1f2328;font-size:14px}
td.state{font-weight:700;white-space:nowrap}
.ready{color:#1a7f37}.notready{color:#cf222e}.unknown{color:#9a6700}
tr.bad td{background:#ffebe9}tr.wait td{background:#fff8c5}
.badge{display:inline-block;padding:0 8px;border-radius:10px;font-size:13px;font-weight:700;margin-right:6px}
.badge.good{background:#dafbe1;color:#1a7f37}.badge.bad{background:#cf222e;color:#fff}
.badge.wait{background:#fff8c5;color:#9a6700}
.mono,.err{font-family:ui-monospace,monospace;font-size:13px}.err{overflow-wrap:anywhere}
.muted,small{color:#59636e}
";

fn head(out: &mut String, s: &Summary) -> fmt::Result {
    let mark = if s.attention { "✖" } else { "✔" };
    write!(
        out,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"5\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{mark} {}/{} hosts ready · endpoints-operator</title><style>{STYLE}</style></head><body>",
        s.ready, s.hosts
    )
}

fn header(out: &mut String, report: &StatusReport, s: &Summary, now: SystemTime) -> fmt::Result {
    let (class, verdict) = match (s.attention, report.started) {
        (true, _) => ("bad", "✖ Needs attention"),
        (false, false) => ("wait", "… Starting: clusters are being set up"),
        (false, true) => ("good", "✔ All good"),
    };
    write!(
        out,
        "<header class=\"{class}\"><h1>endpoints-operator</h1><p class=\"verdict\">{verdict}</p>\
         <p class=\"summary\">{} definition{} · {}/{} hosts ready · clusters: {} ok, {} failing",
        report.definitions.len(),
        plural(report.definitions.len()),
        s.ready,
        s.hosts,
        s.clusters_ok,
        s.clusters_failing,
    )?;
    if s.clusters_waiting > 0 {
        write!(out, ", {} waiting", s.clusters_waiting)?;
    }
    write!(
        out,
        " · {} problem{}</p><p class=\"meta\">as of {} · page refreshes every 5 s · {} probes run · \
         <a href=\"/api/v1/status\">JSON</a> · <a href=\"/metrics\">metrics</a> · \
         <a href=\"/readyz\">readyz</a></p></header><main>",
        report.problems.len(),
        plural(report.problems.len()),
        humantime::format_rfc3339_seconds(now),
        report.probes.probes_total,
    )
}

fn problems(out: &mut String, report: &StatusReport) -> fmt::Result {
    if report.problems.is_empty() {
        return Ok(());
    }
    write!(
        out,
        "<h2 class=\"notready\">✖ Problems in the definitions and config ({})</h2><table>\
         <tr><th>Source</th><th>Field</th><th>Value</th><th>Reason</th></tr>",
        report.problems.len()
    )?;
    for p in &report.problems {
        write!(
            out,
            "<tr class=\"bad\"><td>{}</td><td class=\"mono\">{}</td><td class=\"err\">{}</td><td>{}</td></tr>",
            esc(&p.origin),
            esc(&p.field),
            esc(&p.value),
            esc(&p.reason)
        )?;
    }
    out.write_str("</table>")
}

fn clusters(out: &mut String, clusters: &[ClusterStatus], now: SystemTime) -> fmt::Result {
    out.write_str(
        "<h2>Clusters</h2><table><tr><th>State</th><th>Cluster</th><th>Last successful apply</th>\
         <th>Pending</th><th>Conflicts</th><th>Writes</th><th>Last error</th></tr>",
    )?;
    if clusters.is_empty() {
        out.write_str("<tr class=\"wait\"><td colspan=\"7\">none set up yet</td></tr>")?;
    }
    for c in clusters {
        let (row, cell, state) = match (cluster_state(c), c.connected) {
            (ClusterState::Ok, _) => ("", "ready", "✔ connected"),
            (ClusterState::Failing, Some(true)) => ("bad", "notready", "✖ connected, failing"),
            (ClusterState::Failing, _) => ("bad", "notready", "✖ not connected"),
            (ClusterState::Waiting, _) => ("wait", "unknown", "? no answer yet"),
        };
        write!(
            out,
            "<tr class=\"{row}\"><td class=\"state {cell}\">{state}</td><td><b>{}</b></td><td>",
            esc(&c.name)
        )?;
        match c.last_successful_apply {
            Some(t) => moment(out, t, now, "ago")?,
            None => out.write_str("<span class=\"muted\">never</span>")?,
        }
        write!(
            out,
            "</td><td>{}</td><td>{}</td><td>{}</td><td class=\"err\">{}</td></tr>",
            c.pending,
            c.conflicts.len(),
            c.writes,
            esc(c.last_error.as_deref().unwrap_or(""))
        )?;
        // Each failing definition says why on its own line.
        for (what, map) in [("apply error", &c.errors), ("conflict", &c.conflicts)] {
            for (definition, reason) in map {
                write!(
                    out,
                    "<tr class=\"bad\"><td></td><td colspan=\"6\" class=\"err\">{what} · {}: {}</td></tr>",
                    esc(definition),
                    esc(reason)
                )?;
            }
        }
    }
    out.write_str("</table>")
}

fn definitions(out: &mut String, defs: &[DefinitionReport], now: SystemTime) -> fmt::Result {
    write!(out, "<h2>Definitions ({})</h2>", defs.len())?;
    if defs.is_empty() {
        out.write_str("<p class=\"muted\">No definitions loaded.</p>")?;
    }
    let mut sorted: Vec<&DefinitionReport> = defs.iter().collect();
    // Stable: definitions with a host not ready first, each group in the report's order.
    sorted.sort_by_key(|d| all_hosts(d).all(|h| h.ready));
    for def in sorted {
        let total = all_hosts(def).count();
        let ready = all_hosts(def).filter(|h| h.ready).count();
        let class = if ready < total { "bad" } else { "good" };
        write!(
            out,
            "<section class=\"def {class}\"><h3><span class=\"badge {class}\">{ready}/{total} ready</span>\
             {}/{}</h3><p class=\"origin\">from {}</p><table>",
            esc(&def.namespace),
            esc(&def.name),
            esc(&def.origin)
        )?;
        for port in &def.ports {
            port_rows(out, port, now)?;
        }
        out.write_str("</table></section>")?;
    }
    Ok(())
}

fn port_rows(out: &mut String, port: &PortReport, now: SystemTime) -> fmt::Result {
    let name = if port.name.is_empty() {
        "(unnamed)"
    } else {
        &port.name
    };
    write!(
        out,
        "<tr class=\"port\"><th colspan=\"7\">port {} · {} → {}/{} · ",
        esc(name),
        port.port,
        port.target_port,
        port.protocol
    )?;
    match port.probe {
        Some(kind) => write!(out, "probe {kind}")?,
        None => out.write_str("no probe: static, always ready")?,
    }
    out.write_str(
        "</th></tr><tr><th>State</th><th>Host</th><th>Since</th><th>Last result</th>\
         <th>Latency</th><th>Last probe</th><th>Error</th></tr>",
    )?;
    let mut hosts: Vec<&HostReport> = port.hosts.iter().collect();
    hosts.sort_by_key(|h| h.ready);
    for host in hosts {
        host_row(out, host, now)?;
    }
    Ok(())
}

fn host_row(out: &mut String, host: &HostReport, now: SystemTime) -> fmt::Result {
    let Some(health) = &host.health else {
        return write!(
            out,
            "<tr><td class=\"state ready\">✔ ready</td><td>{}</td>\
             <td colspan=\"5\" class=\"muted\">static</td></tr>",
            host.host
        );
    };
    let (row, cell, state) = match (host.ready, health.state.readiness) {
        (true, _) => ("", "ready", "✔ ready"),
        (false, Readiness::Unknown) => ("wait", "unknown", "? not ready, undecided"),
        (false, _) => ("bad", "notready", "✖ not ready"),
    };
    write!(
        out,
        "<tr class=\"{row}\"><td class=\"state {cell}\">{state}</td><td>{}</td><td>",
        host.host
    )?;
    moment(out, health.since, now, "for")?;
    out.write_str("</td><td>")?;
    match health.last_result {
        Some(result) => {
            let (streak, kind) = if result == "success" {
                (health.state.consecutive_successes, "ready")
            } else {
                (health.state.consecutive_failures, "notready")
            };
            write!(
                out,
                "<span class=\"{kind}\">{}</span> <small>×{streak}</small>",
                esc(result)
            )?;
        }
        None => out.write_str("<span class=\"muted\">not probed yet</span>")?,
    }
    out.write_str("</td><td>")?;
    if let Some(ms) = health.last_latency_ms {
        write!(out, "{ms:.1} ms")?;
    }
    out.write_str("</td><td>")?;
    if let Some(t) = health.last_probe {
        write!(out, "{} ago", span(now, t))?;
    }
    write!(
        out,
        "</td><td class=\"err\">{}</td></tr>",
        esc(health.last_error.as_deref().unwrap_or(""))
    )
}

/// "for 3m12s" (or "3m12s ago") with the absolute time below it.
fn moment(out: &mut String, t: SystemTime, now: SystemTime, how: &str) -> fmt::Result {
    let stamp = humantime::format_rfc3339_seconds(t);
    let span = span(now, t);
    let text = if how == "for" {
        format!("for {span}")
    } else {
        format!("{span} {how}")
    };
    write!(
        out,
        "{text}<br><small><time datetime=\"{stamp}\">{stamp}</time></small>"
    )
}

/// A duration as people say it, to the precision that matters at its size: 45s, 3m12s, 2h05m, 3d04h.
fn span(now: SystemTime, then: SystemTime) -> String {
    // A clock that stepped back shows as zero, not as an error.
    let secs = now.duration_since(then).unwrap_or(Duration::ZERO).as_secs();
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s if s < 86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        s => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

#[cfg(test)]
mod tests;
