//! The example Grafana dashboard, contrib/grafana/xfrmsync-sync.json, held
//! against what a running `xfrmsync sync` serves: a metric renamed or added
//! in metrics.rs fails here until the dashboard follows, rather than
//! leaving an empty panel (or an unwatched metric) for an operator to find.
//! The daemon runs in a network namespace of the test's own, with no SA.

mod common;

use common::{private_netns, start_sync_daemon};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Child;
use std::time::{Duration, Instant};

const DASHBOARD: &str = include_str!("../contrib/grafana/xfrmsync-sync.json");
const METRICS_PORT: u16 = 9491;
const PREFIX: &str = "xfrmsync_sync_";
const INSTANCE_FILTER: &str = "instance=~\"$instance\"";

/// One standby daemon, killed and its directory removed however the test ends.
struct Daemon {
    dir: PathBuf,
    child: Option<Child>,
}

impl Daemon {
    fn start() -> Daemon {
        let dir = std::env::temp_dir().join(format!("xfrmsync-grafana-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut daemon = Daemon { dir, child: None };
        // metrics_per_sa on, so that the per-SA families are served too.
        let top = format!("role = \"standby\"\nmetrics = \"127.0.0.1:{METRICS_PORT}\"\nmetrics_per_sa = 10\n");
        let child = start_sync_daemon(&daemon.dir, &top, 7900, 7901);
        daemon.child = Some(child);
        daemon
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    /// The body of `GET /metrics`, once the endpoint answers.
    fn scrape(&mut self) -> String {
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                panic!("the daemon exited ({status}):\n{}", self.log());
            }
            if let Some(answer) = get_metrics() {
                if let Some(body) = answer.strip_prefix("HTTP/1.0 200 ").and_then(|a| a.split_once("\r\n\r\n")) {
                    return body.1.to_string();
                }
            }
            assert!(Instant::now() < until, "no 200 on :{METRICS_PORT}/metrics within 10 s:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The whole answer, or `None` while nothing listens yet.
fn get_metrics() -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", METRICS_PORT)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    stream.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    Some(answer)
}

/// Each family of the exposition text, by its `# TYPE` line, with its type.
fn families(body: &str) -> BTreeMap<String, String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter(|l| l.starts_with(PREFIX))
        .map(|l| {
            let (name, kind) = l.split_once(' ').unwrap_or_else(|| panic!("a TYPE line without a type: {l}"));
            (name.to_string(), kind.to_string())
        })
        .collect()
}

/// The series names a query can select, each with its family: a
/// histogram has no series of its bare name, only its three suffixed ones.
fn series_names(families: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let mut names = BTreeMap::new();
    for (family, kind) in families {
        if kind == "histogram" {
            for suffix in ["_bucket", "_sum", "_count"] {
                names.insert(format!("{family}{suffix}"), family.clone());
            }
        } else {
            names.insert(family.clone(), family.clone());
        }
    }
    names
}

fn dashboard() -> Value {
    serde_json::from_str(DASHBOARD).expect("the dashboard is JSON")
}

/// Every panel, those inside rows (collapsed rows keep theirs) included.
fn panels(dashboard: &Value) -> Vec<&Value> {
    fn walk<'a>(list: &'a Value, out: &mut Vec<&'a Value>) {
        for panel in list.as_array().into_iter().flatten() {
            out.push(panel);
            walk(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// Every `expr` anywhere in `value`, whatever holds it.
fn exprs(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("expr", Value::String(expr)) => out.push(expr.clone()),
                    _ => exprs(v, out),
                }
            }
        }
        Value::Array(list) => list.iter().for_each(|v| exprs(v, out)),
        _ => {}
    }
}

fn all_exprs() -> Vec<String> {
    let mut out = Vec::new();
    exprs(&dashboard(), &mut out);
    out
}

/// Each `xfrmsync_sync_[a-z0-9_]+` metric name of `expr`, with the text
/// that follows it.
fn metric_names(expr: &str) -> Vec<(&str, &str)> {
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    expr.match_indices(PREFIX)
        // Part of a longer name is not this metric.
        .filter(|(at, _)| !expr[..*at].ends_with(ident))
        .map(|(at, _)| {
            let rest = &expr[at..];
            let end =
                rest.find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')).unwrap_or(rest.len());
            (&rest[..end], &rest[end..])
        })
        .collect()
}

#[test]
fn the_dashboard_queries_exactly_the_metrics_the_daemon_serves() {
    private_netns();
    let mut daemon = Daemon::start();
    let served = families(&daemon.scrape());
    assert!(served.contains_key("xfrmsync_sync_role"), "not a whole scrape: {served:?}\n{}", daemon.log());
    let series = series_names(&served);

    let exprs = all_exprs();
    let mut unknown = BTreeSet::new();
    let mut covered = BTreeSet::new();
    for expr in &exprs {
        for (name, _) in metric_names(expr) {
            match series.get(name) {
                Some(family) => {
                    covered.insert(family.clone());
                }
                None => {
                    unknown.insert(name.to_string());
                }
            }
        }
    }
    let missing: Vec<&String> = served.keys().filter(|f| !covered.contains(*f)).collect();
    // Both lists at once: a renamed metric shows in each.
    assert!(
        unknown.is_empty() && missing.is_empty(),
        "series the dashboard queries and the daemon does not serve: {unknown:#?}\n\
         families the daemon serves and no panel shows: {missing:#?}"
    );
}

#[test]
fn every_query_of_every_panel_is_filtered_by_the_instance_variable() {
    let dashboard = dashboard();
    for panel in panels(&dashboard) {
        let Some(targets) = panel["targets"].as_array() else { continue };
        let title = &panel["title"];
        assert!(
            targets.iter().any(|t| t["expr"].as_str().is_some_and(|e| !e.trim().is_empty())),
            "panel {title} has targets and no expr"
        );
    }
    let exprs = all_exprs();
    assert!(!exprs.is_empty());
    for expr in &exprs {
        assert!(expr.contains(INSTANCE_FILTER), "not filtered by $instance: {expr}");
        // A query of several selectors needs the filter on each, or the
        // unfiltered one still joins every instance in.
        for (name, after) in metric_names(expr) {
            let selector = after.strip_prefix('{').and_then(|s| s.split_once('}')).map(|(labels, _)| labels);
            assert!(
                selector.is_some_and(|labels| labels.contains(INSTANCE_FILTER)),
                "{name} is not filtered by $instance in: {expr}"
            );
        }
    }
}

#[test]
fn the_dashboard_has_its_uid_and_panels_with_unique_ids_that_do_not_overlap() {
    let dashboard = dashboard();
    assert_eq!(dashboard["uid"], "xfrmsync-sync");
    assert_eq!(dashboard["title"], "xfrmsync sync");
    assert_eq!(dashboard["schemaVersion"], 39);
    let panels = panels(&dashboard);
    let mut ids = BTreeSet::new();
    for panel in &panels {
        let id = panel["id"].as_u64().unwrap_or_else(|| panic!("no numeric id: {}", panel["title"]));
        assert!(ids.insert(id), "panel id {id} twice");
    }
    // Grafana packs a collapsed row's panels back in when it opens, so
    // every panel, collapsed or not, gets a place of its own.
    let rect = |panel: &Value| {
        let g = &panel["gridPos"];
        let field = |k: &str| g[k].as_u64().unwrap_or_else(|| panic!("gridPos without {k}: {}", panel["title"]));
        (field("x"), field("y"), field("w"), field("h"))
    };
    for (i, a) in panels.iter().enumerate() {
        let (ax, ay, aw, ah) = rect(a);
        assert!(ax + aw <= 24 && aw > 0 && ah > 0, "panel {} outside the 24 columns", a["id"]);
        for b in &panels[i + 1..] {
            let (bx, by, bw, bh) = rect(b);
            let overlap = ax < bx + bw && bx < ax + aw && ay < by + bh && by < ay + ah;
            assert!(!overlap, "panels {} and {} overlap", a["id"], b["id"]);
        }
    }
}
