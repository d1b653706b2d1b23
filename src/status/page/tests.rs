use super::*;
use crate::status::StatusState;
use crate::status::sample::{NOW, at, report};

fn page(report: &StatusReport) -> String {
    render(report, SystemTime::UNIX_EPOCH + NOW).unwrap()
}

#[test]
fn escaping_covers_every_character_that_means_something_in_html() {
    assert_eq!(
        esc(r#"<script>alert("x" & 'y')</script>"#).to_string(),
        "&lt;script&gt;alert(&quot;x&quot; &amp; &#39;y&#39;)&lt;/script&gt;"
    );
    assert_eq!(esc("plain, ünïcode").to_string(), "plain, ünïcode");
    assert_eq!(esc("").to_string(), "");
    assert_eq!(esc("&amp;").to_string(), "&amp;amp;");
}

#[test]
fn user_text_on_the_page_is_escaped() {
    let html = page(&report());
    assert!(!html.contains("<script>"), "{html}");
    assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    assert!(!html.contains("<b>bold</b>"));
    assert!(html.contains("&lt;b&gt;bold&lt;/b&gt;"));
}

#[test]
fn the_summary_counts_hosts_clusters_and_problems() {
    let html = page(&report());
    assert!(html.contains("✖ Needs attention"), "{html}");
    assert!(
        html.contains("2 definitions · 3/4 hosts ready · clusters: 1 ok, 1 failing · 1 problem<"),
        "{html}"
    );
    assert!(html.contains("<title>✖ 3/4 hosts ready"));
    assert!(html.contains("<meta http-equiv=\"refresh\" content=\"5\">"));
}

#[test]
fn a_healthy_daemon_says_all_good() {
    let mut healthy = report();
    healthy.definitions.truncate(1);
    healthy.clusters.truncate(1);
    healthy.problems.clear();
    let html = page(&healthy);
    assert!(html.contains("✔ All good"), "{html}");
    assert!(!html.contains("not ready"));
    assert!(html.contains("no probe: static, always ready"));
}

#[test]
fn definitions_with_hosts_not_ready_come_first_and_so_do_those_hosts() {
    let html = page(&report());
    let pos = |s: &str| html.find(s).unwrap_or_else(|| panic!("{s} missing"));
    assert!(pos("default/zeta") < pos("default/alpha"));
    assert!(pos("10.0.0.3") < pos("10.0.0.2"));
    assert!(pos("1/2 ready") < pos("2/2 ready"));
}

#[test]
fn a_host_row_says_its_state_in_words_since_when_and_why() {
    let html = page(&report());
    let row = html
        .split("<tr")
        .find(|r| r.contains("10.0.0.3"))
        .expect("row of 10.0.0.3");
    assert!(row.contains("✖ not ready"), "{row}");
    assert!(row.contains("for 3m12s"), "{row}");
    assert!(row.contains("2025-06-15T15:03:28Z"), "{row}");
    assert!(row.contains("refused</span> <small>×3"), "{row}");
    assert!(row.contains("1.2 ms") && row.contains("2s ago"), "{row}");
}

#[test]
fn clusters_show_connection_last_apply_and_error() {
    let html = page(&report());
    let row = |name: &str| {
        html.split("<tr")
            .find(|r| r.contains(&format!("<b>{name}</b>")))
            .unwrap()
            .to_string()
    };
    assert!(row("east").contains("✔ connected") && row("east").contains("1m15s ago"));
    assert!(row("west").contains("✖ not connected") && row("west").contains("No such file"));
    assert!(row("west").contains("never"));
}

#[test]
fn problems_list_file_field_value_and_reason() {
    let html = page(&report());
    let row = html.split("<tr").find(|r| r.contains("bad.yaml")).unwrap();
    assert!(row.contains("spec.ports[0].hosts[0]") && row.contains("not an IP address"));
}

#[test]
fn spans_read_the_way_people_say_them() {
    let now = SystemTime::UNIX_EPOCH + NOW;
    let cases = [
        (0, "0s"),
        (45, "45s"),
        (192, "3m12s"),
        (7500, "2h05m"),
        (273600, "3d04h"),
    ];
    for (secs, text) in cases {
        assert_eq!(span(now, at(secs)), text);
    }
    assert_eq!(
        span(at(10), now),
        "0s",
        "a clock stepping back is not an error"
    );
}

#[test]
fn the_page_renders_from_the_live_report_too() {
    let (_, desired) = tokio::sync::watch::channel(Default::default());
    let state = StatusState {
        desired,
        board: Default::default(),
        clusters: Default::default(),
        daemon: Default::default(),
    };
    let html = page(&crate::status::report(&state));
    assert!(html.contains("… Starting"), "{html}");
    assert!(html.contains("No definitions loaded."));
}
