//! The config file of `xfrmsync sync`: TOML, a few keys at the top and the
//! tables `[link]` (required), `[active]` and `[standby]`. Every key is
//! shown and explained in tools/xfrmsync/sync.example.toml.
//!
//! `[link]`'s `transport` says which keys it takes: those of the UDP link
//! (`local`, `peer`, `key_file` required; the default), or those of a
//! Corosync CPG group (`group`, `max_message`). A key of the other
//! transport is an error at its line rather than ignored: a file that
//! names a key file or a peer the daemon would not use misleads its
//! reader about what protects the link.
//!
//! Problems are reported as the rules file reports them, `FILE:LINE:
//! reason`, all of them at once. The file is read as toml's document tree,
//! which keeps a span on every key and value (`toml::de::DeTable`), rather
//! than through serde: so an unknown key is one more problem in the list,
//! at its line, instead of the end of the reading. Only a syntax error
//! stops it.
//!
//! Nothing here opens a file: the key file and the rules file are only
//! named, and the daemon reads them, with their own checks, when it starts.

use std::net::SocketAddr;
use std::ops::{Range, RangeInclusive};
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::de::{DeTable, DeValue};
use toml::Spanned;
use xfrmsync::sync::{InboundPolicy, MarginPolicy, MAX_RECORD_LEN};
use xfrmsync::Thresholds;

use crate::parse::{self, FileErrors, LineIndex, Problem};
use crate::rules_file::MAX_TIMER_MS;
use crate::sys;

pub const DEFAULT_CONTROL_SOCKET: &str = "/run/xfrmsync/sync.sock";
pub const DEFAULT_STATE_FILE: &str = "/var/lib/xfrmsync/sync.state";

/// The least `link.max_packet`: a record is never split over packets, so
/// the longest one (an ESN state with a 4096-bit window) must fit in one
/// with the transport's header and tag.
pub const MAX_PACKET_LEAST: usize = 1024;
/// The most: UDP over IPv4 carries at most 65,507 bytes.
pub const MAX_PACKET_MOST: usize = 65_000;
/// The transport's header and tag must fit in what is left beside the
/// longest record: 368 bytes while that is 656.
pub const PACKET_OVERHEAD_ROOM: usize = MAX_PACKET_LEAST - MAX_RECORD_LEN;
// Room for any AEAD's nonce and tag and a header, kept so should the
// longest record grow.
const _: () = assert!(PACKET_OVERHEAD_ROOM >= 256);

/// `sun_path` holds 108 bytes, the terminating NUL included.
const SOCKET_PATH_MOST: usize = 107;

/// The daemon's configuration, every default filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct SyncConfig {
    /// The namespace whose SAs are synced; `None` is the daemon's own.
    pub netns: Option<PathBuf>,
    /// Where `xfrmsync sync role|commit|resync|status` reach the daemon.
    pub control_socket: PathBuf,
    /// Keeps the node's epoch across restarts: a node that came back with
    /// an older epoch would have its records ignored, or worse, its
    /// commits outranked by a node it replaced.
    pub state_file: PathBuf,
    /// The role at start, until the cluster manager gives one.
    pub role: Role,
    /// Where Prometheus metrics are served (`--metrics` overrides); `None`, the default: nowhere.
    pub metrics: Option<SocketAddr>,
    /// Per-SA series in the metrics for at most this many SAs; 0, the
    /// default: none, so that the number of series does not grow with the
    /// SAs.
    pub metrics_per_sa: usize,
    pub link: LinkSettings,
    pub active: ActiveSettings,
    pub standby: StandbySettings,
}

/// The sync link between the nodes.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkSettings {
    pub transport: LinkTransport,
    pub heartbeat: Duration,
}

/// What carries the link, with its own settings.
#[derive(Debug, Clone, PartialEq)]
pub enum LinkTransport {
    Udp(UdpSettings),
    Cpg(CpgSettings),
}

/// The UDP link between two nodes.
#[derive(Debug, Clone, PartialEq)]
pub struct UdpSettings {
    pub local: SocketAddr,
    /// Packets from any other address and port are dropped.
    pub peer: SocketAddr,
    /// The shared key (`xfrmsync sync keygen`); read by the daemon, which
    /// checks its permissions.
    pub key_file: PathBuf,
    /// UDP payload bytes, [`MAX_PACKET_LEAST`]..=[`MAX_PACKET_MOST`].
    pub max_packet: usize,
    pub retransmit: Duration,
    /// How many times an unanswered packet is sent again.
    pub max_retransmits: u32,
    /// Packets older than this by the sender's clock are refused, which
    /// bounds how long a captured packet can be replayed.
    pub max_age: Duration,
}

/// A Corosync CPG group of any number of nodes.
#[derive(Debug, Clone, PartialEq)]
pub struct CpgSettings {
    /// Every daemon of the cluster joins this group.
    pub group: String,
    /// The longest message, [`MAX_MESSAGE_LEAST`]..=[`MAX_MESSAGE_MOST`] bytes.
    pub max_message: usize,
}

/// What the node does while it is active.
#[derive(Debug, Clone, PartialEq)]
pub struct ActiveSettings {
    /// Each SA's record is sent again at least this often, so a standby
    /// that lost one, or restarted, catches up without asking.
    pub refresh: Duration,
    /// Given to synced SAs that no rule of `rules_file` gives thresholds:
    /// an SA without them sends no aevents, and the standby's copy of it
    /// would go stale without bound.
    pub thresholds: Thresholds,
    /// Rules in the format of `xfrmsync apply`; read by the daemon.
    pub rules_file: Option<PathBuf>,
    /// Every `lag_sample` the kernel's state of the next `lag_sample_sas`
    /// SAs is read and sent, for the standby to measure how far behind its
    /// records are (0 SAs: never).
    pub lag_sample: Duration,
    pub lag_sample_sas: usize,
}

/// What the node does while it is standby, and at its takeover.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StandbySettings {
    pub margin: MarginPolicy,
    pub inbound: InboundPolicy,
    pub on_replaced: OnReplaced,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Role {
    Active,
    /// The default: a node that starts active by mistake could send with
    /// numbers the real active node uses.
    #[default]
    Standby,
}

/// What a node does besides stopping when it learns it was replaced: the
/// peer has committed with a higher epoch, so it is not the active node
/// any more, whatever it believed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnReplaced {
    #[default]
    Stop,
    /// Also delete its outbound SAs, so that it cannot go on sending with
    /// numbers the new active node sends too (a split brain).
    DeleteOutbound,
}

impl Default for ActiveSettings {
    fn default() -> ActiveSettings {
        ActiveSettings {
            refresh: Duration::from_secs(10),
            thresholds: Thresholds { replay_packets: 256, timer_ms: 1000 },
            rules_file: None,
            lag_sample: Duration::from_secs(10),
            lag_sample_sas: 64,
        }
    }
}

const DEFAULT_MAX_PACKET: usize = 1400;
/// The most SAs `metrics_per_sa` takes: a scrape of more would be tens of MB.
pub const METRICS_PER_SA_MOST: usize = 100_000;
const DEFAULT_RETRANSMIT_MS: u64 = 200;
const DEFAULT_MAX_RETRANSMITS: u32 = 8;
const DEFAULT_MAX_AGE_S: u64 = 60;
const DEFAULT_HEARTBEAT_MS: u64 = 1000;
pub const DEFAULT_GROUP: &str = "xfrmsync";
const DEFAULT_MAX_MESSAGE: usize = 8192;
/// As `max_packet`'s least: the longest record must fit one message.
pub const MAX_MESSAGE_LEAST: usize = 1024;
/// About what corosync 3 sends whole (1 MiB less 1 KiB; the link cuts
/// messages to that); the daemon batches records into a few KB anyway.
pub const MAX_MESSAGE_MOST: usize = 1 << 20;
/// `struct cpg_name` holds 128 bytes; one is kept for the NUL that
/// corosync's tools print names with.
const GROUP_MOST: usize = 127;

/// Names a config file in `FileErrors`' Display.
const KIND: &str = "config file";

/// Reads and parses `path`; the error is the full report, file name and
/// lines included.
pub fn load(path: &Path) -> Result<SyncConfig, String> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| format!("{file}: cannot read: {}", parse::io_reason(&e)))?;
    parse(&text).map_err(|e| e.report(&file))
}

/// Parses a config file.
pub fn parse(text: &str) -> Result<SyncConfig, FileErrors> {
    let lines = LineIndex::new(text);
    let doc = DeTable::parse(text).map_err(|e| FileErrors {
        kind: KIND,
        problems: vec![Problem { line: e.span().map(|s| lines.line(s.start)), reason: e.message().trim_end().into() }],
    })?;
    let mut c = Checker { lines: &lines, problems: Vec::new() };
    let mut top = Section { name: None, table: Some(doc.get_ref()), line: None, keys: Vec::new(), tables: Vec::new() };

    let netns = c.get(&mut top, "netns", netns_path);
    let control_socket = c.get(&mut top, "control_socket", socket_path);
    let state_file = c.get(&mut top, "state_file", absolute_path);
    let role = c.get(&mut top, "role", |v| choice(v, &[("standby", Role::Standby), ("active", Role::Active)]));
    let metrics = c.get(&mut top, "metrics", metrics_addr);
    let metrics_per_sa =
        c.get(&mut top, "metrics_per_sa", |v| whole(v, 0..=METRICS_PER_SA_MOST as u64, "SAs").map(|n| n as usize));

    let mut link = c.section(&mut top, "link");
    // The transport says which keys the table takes, so it is read first;
    // a wrong one is said in its turn below, and then every key is only
    // checked for its value.
    let kind = match link.table.and_then(|t| t.get("transport")) {
        None => Some(Kind::Udp),
        Some(v) => choice(v.get_ref(), TRANSPORTS).ok(),
    };
    let udp_key = match kind {
        Some(Kind::Cpg) => Err(NOT_WITH_CPG),
        _ => Ok(()),
    };
    let cpg_key = match kind {
        Some(Kind::Udp) => Err(ONLY_WITH_CPG),
        _ => Ok(()),
    };
    let local = c.get_if(&mut link, "local", udp_key, socket_addr);
    let peer = c.get_if(&mut link, "peer", udp_key, |v| {
        let a = socket_addr(v)?;
        if a.ip().is_unspecified() {
            return Err(format!("'{a}' is no node's address"));
        }
        Ok(a)
    });
    let key_file = c.get_if(&mut link, "key_file", udp_key, absolute_path);
    let max_packet = c.get_if(&mut link, "max_packet", udp_key, |v| {
        whole(v, MAX_PACKET_LEAST as u64..=MAX_PACKET_MOST as u64, "bytes").map(|n| n as usize)
    });
    let retransmit = c.get_if(&mut link, "retransmit_ms", udp_key, |v| milliseconds(v, 10..=60_000));
    let max_retransmits =
        c.get_if(&mut link, "max_retransmits", udp_key, |v| whole(v, 0..=100, "retransmissions").map(|n| n as u32));
    let max_age = c.get_if(&mut link, "max_age_s", udp_key, |v| seconds(v, 1..=3600));
    let heartbeat = c.get(&mut link, "heartbeat_ms", |v| milliseconds(v, 10..=60_000));
    c.get(&mut link, "transport", |v| choice(v, TRANSPORTS));
    let group = c.get_if(&mut link, "group", cpg_key, group_name);
    let max_message = c.get_if(&mut link, "max_message", cpg_key, |v| {
        whole(v, MAX_MESSAGE_LEAST as u64..=MAX_MESSAGE_MOST as u64, "bytes").map(|n| n as usize)
    });
    if kind == Some(Kind::Udp) {
        c.required(&link, &["local", "peer", "key_file"]);
    }
    if let (Some(l), Some(p)) = (&local, &peer) {
        let (l, p, at) = (l.get_ref(), p.get_ref(), p.span());
        if l.ip() == p.ip() && l.port() == p.port() {
            c.problem(at, "link.peer: the same as link.local; the peer is the other node".into());
        } else if l.is_ipv4() != p.is_ipv4() {
            c.problem(
                at,
                format!("link.peer: {p} is not of the family of link.local {l}; one socket reaches one family"),
            );
        }
    }

    let mut active = c.section(&mut top, "active");
    let refresh = c.get(&mut active, "refresh_s", |v| seconds(v, 1..=3600));
    let replay_packets =
        c.get(&mut active, "replay_packets", |v| whole(v, 1..=u64::from(u32::MAX), "packets").map(|n| n as u32));
    let timer_ms =
        c.get(&mut active, "timer_ms", |v| whole(v, 1..=u64::from(MAX_TIMER_MS), "milliseconds").map(|n| n as u32));
    let rules_file = c.get(&mut active, "rules_file", absolute_path);
    let lag_sample = c.get(&mut active, "lag_sample_ms", |v| milliseconds(v, 100..=3_600_000));
    let lag_sample_sas = c.get(&mut active, "lag_sample_sas", |v| whole(v, 0..=100_000, "SAs").map(|n| n as usize));

    let mut standby = c.section(&mut top, "standby");
    let detection_ms = c.get(&mut standby, "detection_ms", |v| whole(v, 0..=3_600_000, "milliseconds"));
    let safety_factor = c.get(&mut standby, "safety_factor", factor);
    let floor = c.get(&mut standby, "margin_floor", |v| whole(v, 0..=u64::MAX, "packets"));
    // A margin of 0 would have the new active node send numbers the old
    // one may have sent already.
    let ceiling = c.get(&mut standby, "margin_ceiling", |v| whole(v, 1..=u64::MAX, "packets"));
    let inbound = c.get(&mut standby, "inbound", |v| {
        choice(v, &[("accept", InboundPolicy::Accept), ("strict", InboundPolicy::Strict)])
    });
    let on_replaced = c.get(&mut standby, "on_replaced", |v| {
        choice(v, &[("stop", OnReplaced::Stop), ("delete-outbound", OnReplaced::DeleteOutbound)])
    });
    let defaults = MarginPolicy::default();
    let margin = MarginPolicy {
        detection_ms: value(detection_ms, defaults.detection_ms),
        safety_factor: value(safety_factor, defaults.safety_factor),
        floor: value(floor.clone(), defaults.floor),
        ceiling: value(ceiling.clone(), defaults.ceiling),
    };
    // Against a wrong value, which is already said, it would mislead.
    let both_right =
        floor.is_some() == standby.has("margin_floor") && ceiling.is_some() == standby.has("margin_ceiling");
    if both_right && margin.floor > margin.ceiling {
        let by_default = if floor.is_some() { "" } else { " by default" };
        match (ceiling, floor) {
            (Some(at), _) => c.problem(
                at.span(),
                format!(
                    "standby.margin_ceiling: {} is less than standby.margin_floor, {}{by_default}",
                    margin.ceiling, margin.floor
                ),
            ),
            (None, Some(at)) => c.problem(
                at.span(),
                format!(
                    "standby.margin_floor: {} is more than standby.margin_ceiling, {} by default",
                    margin.floor, margin.ceiling
                ),
            ),
            (None, None) => {}
        }
    }

    // Last, when every table has said which keys it takes.
    for section in [&top, &link, &active, &standby] {
        c.unknown_keys(section, &[&top, &link, &active, &standby]);
    }
    if !c.problems.is_empty() {
        // Stable: problems of one line stay in the order they were found.
        c.problems.sort_by_key(|p| p.line.unwrap_or(0));
        return Err(FileErrors { kind: KIND, problems: c.problems });
    }
    let active_defaults = ActiveSettings::default();
    // A required key that is absent is a problem (Checker::required).
    let missing = "a required key";
    Ok(SyncConfig {
        netns: netns.map(Spanned::into_inner),
        control_socket: value(control_socket, DEFAULT_CONTROL_SOCKET.into()),
        state_file: value(state_file, DEFAULT_STATE_FILE.into()),
        role: value(role, Role::default()),
        metrics: metrics.map(Spanned::into_inner),
        metrics_per_sa: value(metrics_per_sa, 0),
        link: LinkSettings {
            transport: match kind.expect("a wrong transport is a problem") {
                Kind::Udp => LinkTransport::Udp(UdpSettings {
                    local: local.expect(missing).into_inner(),
                    peer: peer.expect(missing).into_inner(),
                    key_file: key_file.expect(missing).into_inner(),
                    max_packet: value(max_packet, DEFAULT_MAX_PACKET),
                    retransmit: value(retransmit, Duration::from_millis(DEFAULT_RETRANSMIT_MS)),
                    max_retransmits: value(max_retransmits, DEFAULT_MAX_RETRANSMITS),
                    max_age: value(max_age, Duration::from_secs(DEFAULT_MAX_AGE_S)),
                }),
                Kind::Cpg => LinkTransport::Cpg(CpgSettings {
                    group: value(group, DEFAULT_GROUP.into()),
                    max_message: value(max_message, DEFAULT_MAX_MESSAGE),
                }),
            },
            heartbeat: value(heartbeat, Duration::from_millis(DEFAULT_HEARTBEAT_MS)),
        },
        active: ActiveSettings {
            refresh: value(refresh, active_defaults.refresh),
            thresholds: Thresholds {
                replay_packets: value(replay_packets, active_defaults.thresholds.replay_packets),
                timer_ms: value(timer_ms, active_defaults.thresholds.timer_ms),
            },
            rules_file: rules_file.map(Spanned::into_inner),
            lag_sample: value(lag_sample, active_defaults.lag_sample),
            lag_sample_sas: value(lag_sample_sas, active_defaults.lag_sample_sas),
        },
        standby: StandbySettings {
            margin,
            inbound: value(inbound, InboundPolicy::default()),
            on_replaced: value(on_replaced, OnReplaced::default()),
        },
    })
}

/// `[link]`'s `transport`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Udp,
    Cpg,
}

const TRANSPORTS: &[(&str, Kind)] = &[("udp", Kind::Udp), ("cpg", Kind::Cpg)];
const NOT_WITH_CPG: &str = "not with transport = \"cpg\": corosync's ring carries, authenticates and encrypts the \
                            messages (CPG takes group, max_message, heartbeat_ms)";
const ONLY_WITH_CPG: &str = "only with transport = \"cpg\" (this link is UDP, the default)";

fn value<T>(v: Option<Spanned<T>>, default: T) -> T {
    v.map_or(default, Spanned::into_inner)
}

/// A table of the file, and the keys asked of it so far: those are the
/// keys it takes, so that the list of known keys cannot drift from the
/// code that reads them.
struct Section<'t, 'i> {
    /// `None` for the top level.
    name: Option<&'static str>,
    /// `None` when the file has no such table (or a value that is not one).
    table: Option<&'t DeTable<'i>>,
    /// The line of its header, for what it lacks.
    line: Option<usize>,
    keys: Vec<&'static str>,
    tables: Vec<&'static str>,
}

impl Section<'_, '_> {
    fn label(&self, key: &str) -> String {
        match self.name {
            Some(name) => format!("{name}.{key}"),
            None => key.to_string(),
        }
    }

    fn has(&self, key: &str) -> bool {
        self.table.is_some_and(|t| t.get(key).is_some())
    }
}

struct Checker<'a> {
    lines: &'a LineIndex,
    problems: Vec<Problem>,
}

impl Checker<'_> {
    fn problem(&mut self, span: Range<usize>, reason: String) {
        let line = Some(self.lines.line(span.start));
        self.problems.push(Problem { line, reason });
    }

    /// The top-level table `name`.
    fn section<'t, 'i>(&mut self, top: &mut Section<'t, 'i>, name: &'static str) -> Section<'t, 'i> {
        top.tables.push(name);
        let mut section = Section { name: Some(name), table: None, line: None, keys: Vec::new(), tables: Vec::new() };
        if let Some((key, v)) = top.table.and_then(|t| t.get_key_value(name)) {
            section.line = Some(self.lines.line(key.span().start));
            match v.get_ref() {
                DeValue::Table(t) => section.table = Some(t),
                other => {
                    self.problem(v.span(), format!("{name}: expected a table, [{name}], found {}", other.type_str()))
                }
            }
        }
        section
    }

    /// The value of `key`, converted by `convert`, with its span; `None`
    /// when it is absent, or wrong (then a problem is recorded at its line).
    fn get<T>(
        &mut self,
        section: &mut Section,
        key: &'static str,
        convert: impl FnOnce(&DeValue) -> Result<T, String>,
    ) -> Option<Spanned<T>> {
        section.keys.push(key);
        let v = section.table?.get(key)?;
        match convert(v.get_ref()) {
            Ok(t) => Some(Spanned::new(v.span(), t)),
            Err(why) => {
                self.problem(v.span(), format!("{}: {why}", section.label(key)));
                None
            }
        }
    }

    /// As [`Checker::get`] where the table takes `key` (`taken` is
    /// `Ok`); where it does not, the key is known but refused, at its line,
    /// for the reason `taken` gives, whatever its value.
    fn get_if<T>(
        &mut self,
        section: &mut Section,
        key: &'static str,
        taken: Result<(), &str>,
        convert: impl FnOnce(&DeValue) -> Result<T, String>,
    ) -> Option<Spanned<T>> {
        let Err(why) = taken else { return self.get(section, key, convert) };
        section.keys.push(key);
        if let Some((k, _)) = section.table.and_then(|t| t.get_key_value(key)) {
            self.problem(k.span(), format!("{}: {why}", section.label(key)));
        }
        None
    }

    /// One problem for all the required keys a table lacks, at its header.
    fn required(&mut self, section: &Section, keys: &[&str]) {
        let name = section.name.unwrap_or("top level");
        let missing: Vec<&str> = keys.iter().copied().filter(|k| !section.has(k)).collect();
        if missing.is_empty() {
            return;
        }
        match (section.table, section.line) {
            (Some(_), line) => {
                self.problems.push(Problem { line, reason: format!("[{name}] lacks {}", missing.join(", ")) })
            }
            // There, but not a table: already said.
            (None, Some(_)) => {}
            (None, None) => self
                .problems
                .push(Problem { line: None, reason: format!("no [{name}] table; it must give {}", keys.join(", ")) }),
        }
    }

    /// The keys of `section` that no code asked for, with a hint when the
    /// key belongs in another table: the usual mistake is a top-level key
    /// written after a table's header, which makes it that table's.
    fn unknown_keys(&mut self, section: &Section, all: &[&Section]) {
        let Some(table) = section.table else { return };
        for (key, v) in table.iter() {
            let key_name: &str = key.get_ref();
            if section.keys.contains(&key_name) || section.tables.contains(&key_name) {
                continue;
            }
            let is_table = matches!(v.get_ref(), DeValue::Table(_));
            let what = match (section.name, is_table) {
                (None, true) => format!("unknown table [{key_name}]"),
                _ => format!("unknown key `{}`", section.label(key_name)),
            };
            let takes: Vec<String> = section
                .keys
                .iter()
                .map(|k| k.to_string())
                .chain(section.tables.iter().map(|t| format!("[{t}]")))
                .collect();
            let place = section.name.map_or("the top level".to_string(), |n| format!("[{n}]"));
            let mut reason = format!("{what}; {place} takes {}", takes.join(", "));
            if let Some(home) = all.iter().find(|s| s.keys.contains(&key_name)) {
                match home.name {
                    Some(name) => reason.push_str(&format!(" (`{key_name}` belongs in [{name}])")),
                    None => reason
                        .push_str(&format!(" (`{key_name}` is a top-level key: write it before the first [table])")),
                }
            }
            self.problem(key.span(), reason);
        }
    }
}

fn string<'v>(v: &'v DeValue) -> Result<&'v str, String> {
    v.as_str().ok_or_else(|| format!("expected a string, found {}", v.type_str()))
}

/// The daemon runs from `/` under systemd, and from anywhere by hand: a
/// relative path would name different files.
fn absolute_path(v: &DeValue) -> Result<PathBuf, String> {
    let s = string(v)?;
    if !s.starts_with('/') {
        return Err(format!("absolute path required, found '{s}'"));
    }
    if s.contains('\0') {
        return Err("a path cannot hold a NUL character".into());
    }
    Ok(PathBuf::from(s))
}

fn socket_path(v: &DeValue) -> Result<PathBuf, String> {
    let path = absolute_path(v)?;
    let len = path.as_os_str().len();
    if len > SOCKET_PATH_MOST {
        return Err(format!("{len} bytes is longer than a socket's path can be (at most {SOCKET_PATH_MOST})"));
    }
    Ok(path)
}

/// NAME (`/run/netns/NAME`) or a path, as `--netns` takes them.
fn netns_path(v: &DeValue) -> Result<PathBuf, String> {
    let s = string(v)?;
    if s.contains('/') {
        absolute_path(v).map_err(|e| format!("{e} (or a name from /run/netns)"))
    } else if s.is_empty() || s == "." || s == ".." || s.contains('\0') {
        Err(format!("'{s}' is not a namespace's name"))
    } else {
        Ok(sys::netns_path(s))
    }
}

fn socket_addr(v: &DeValue) -> Result<SocketAddr, String> {
    let s = string(v)?;
    let a: SocketAddr =
        s.parse().map_err(|_| format!("'{s}' is not ADDRESS:PORT (10.99.0.1:7700, or [fd00:99::1]:7700 for IPv6)"))?;
    if a.port() == 0 {
        return Err(format!("'{s}' has port 0; each node must know the other's port"));
    }
    if a.ip().is_multicast() {
        return Err(format!("'{s}' is a multicast address; the link is between two nodes"));
    }
    Ok(a)
}

/// A CPG group's name: what `struct cpg_name` holds.
fn group_name(v: &DeValue) -> Result<String, String> {
    let s = string(v)?;
    if s.is_empty() || s.len() > GROUP_MOST {
        return Err(format!("expected 1 to {GROUP_MOST} bytes, found {}", s.len()));
    }
    if s.contains('\0') {
        return Err("a group name cannot hold a NUL character".into());
    }
    Ok(s.to_string())
}

/// Where `--metrics` listens: ADDRESS:PORT, a port of its own.
fn metrics_addr(v: &DeValue) -> Result<SocketAddr, String> {
    let s = string(v)?;
    parse_metrics_addr(s)
}

/// As [`metrics_addr`], from the command line too.
pub fn parse_metrics_addr(s: &str) -> Result<SocketAddr, String> {
    let a: SocketAddr =
        s.parse().map_err(|_| format!("'{s}' is not ADDRESS:PORT (127.0.0.1:9477, or [::1]:9477 for IPv6)"))?;
    if a.port() == 0 {
        return Err(format!("'{s}' has port 0; Prometheus must know the port to scrape"));
    }
    Ok(a)
}

/// One of `choices`, by its word.
fn choice<T: Copy>(v: &DeValue, choices: &[(&str, T)]) -> Result<T, String> {
    let words: Vec<String> = choices.iter().map(|(w, _)| format!("\"{w}\"")).collect();
    let words = match words.split_last() {
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    };
    let Some(s) = v.as_str() else { return Err(format!("expected {words}, found {}", v.type_str())) };
    choices.iter().find(|(w, _)| *w == s).map(|(_, t)| *t).ok_or_else(|| format!("expected {words}, found \"{s}\""))
}

/// A whole number in `range`, of `unit`s.
fn whole(v: &DeValue, range: RangeInclusive<u64>, unit: &str) -> Result<u64, String> {
    let (least, most) = (*range.start(), *range.end());
    let expected = format!("{least} to {most} {unit}");
    let DeValue::Integer(i) = v else {
        return Err(format!("expected a whole number, {expected}, found {}", v.type_str()));
    };
    match i128::from_str_radix(i.as_str(), i.radix()) {
        Ok(n) if (i128::from(least)..=i128::from(most)).contains(&n) => Ok(n as u64),
        Ok(n) => Err(format!("expected {expected}, found {n}")),
        Err(_) => Err(format!("expected {expected}, found {i}")),
    }
}

fn milliseconds(v: &DeValue, range: RangeInclusive<u64>) -> Result<Duration, String> {
    whole(v, range, "milliseconds").map(Duration::from_millis)
}

fn seconds(v: &DeValue, range: RangeInclusive<u64>) -> Result<Duration, String> {
    whole(v, range, "seconds").map(Duration::from_secs)
}

/// At least 1 (a factor below would shrink the estimate of what the old
/// active node sent), and finite. `2` is taken as well as `2.0`.
fn factor(v: &DeValue) -> Result<f64, String> {
    let f = match v {
        DeValue::Float(f) => f.as_str().parse::<f64>().map_err(|_| format!("'{f}' is not a number"))?,
        DeValue::Integer(i) => {
            i128::from_str_radix(i.as_str(), i.radix()).map_err(|_| format!("{i} is too large"))? as f64
        }
        other => return Err(format!("expected a number, 1.0 or more, found {}", other.type_str())),
    };
    if !f.is_finite() {
        return Err(format!("expected a finite number, 1.0 or more, found {f}"));
    }
    if f < 1.0 {
        return Err(format!("expected 1.0 or more, found {f}; a factor below 1 would shrink the margin"));
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"netns = "/run/netns/ha"
control_socket = "/run/xs/ctl.sock"
state_file = "/var/lib/xs/state"
role = "active"
metrics = "[::1]:9477"
metrics_per_sa = 500

[link]
local = "[fd00:99::1]:7701"
peer = "[fd00:99::2]:7702"
key_file = "/etc/xs/sync.key"
max_packet = 9000
retransmit_ms = 150
max_retransmits = 5
max_age_s = 30
heartbeat_ms = 500

[active]
refresh_s = 20
replay_packets = 64
timer_ms = 500
rules_file = "/etc/xs/rules.toml"
lag_sample_ms = 2500
lag_sample_sas = 16

[standby]
detection_ms = 1500
safety_factor = 3.5
margin_floor = 4096
margin_ceiling = 0x1000000
inbound = "strict"
on_replaced = "delete-outbound"
"#;

    const MINIMAL: &str = "[link]\nlocal = \"10.99.0.1:7700\"\npeer = \"10.99.0.2:7700\"\nkey_file = \"/k\"\n";

    const CPG: &str = "[link]\ntransport = \"cpg\"\n";

    fn udp(c: &SyncConfig) -> &UdpSettings {
        match &c.link.transport {
            LinkTransport::Udp(udp) => udp,
            other => panic!("not UDP: {other:?}"),
        }
    }

    /// The single problem of `text`: its line and reason.
    fn refused(text: &str) -> (Option<usize>, String) {
        let err = parse(text).expect_err("the file must be refused");
        assert_eq!(err.problems.len(), 1, "{err}");
        (err.problems[0].line, err.problems[0].reason.clone())
    }

    /// MINIMAL (lines 1-4) with `lines` after it, from line 5.
    fn with(lines: &str) -> String {
        format!("{MINIMAL}{lines}\n")
    }

    #[test]
    fn a_full_file() {
        let c = parse(FULL).unwrap();
        let expected = SyncConfig {
            netns: Some("/run/netns/ha".into()),
            control_socket: "/run/xs/ctl.sock".into(),
            state_file: "/var/lib/xs/state".into(),
            role: Role::Active,
            metrics: Some("[::1]:9477".parse().unwrap()),
            metrics_per_sa: 500,
            link: LinkSettings {
                transport: LinkTransport::Udp(UdpSettings {
                    local: "[fd00:99::1]:7701".parse().unwrap(),
                    peer: "[fd00:99::2]:7702".parse().unwrap(),
                    key_file: "/etc/xs/sync.key".into(),
                    max_packet: 9000,
                    retransmit: Duration::from_millis(150),
                    max_retransmits: 5,
                    max_age: Duration::from_secs(30),
                }),
                heartbeat: Duration::from_millis(500),
            },
            active: ActiveSettings {
                refresh: Duration::from_secs(20),
                thresholds: Thresholds { replay_packets: 64, timer_ms: 500 },
                rules_file: Some("/etc/xs/rules.toml".into()),
                lag_sample: Duration::from_millis(2500),
                lag_sample_sas: 16,
            },
            standby: StandbySettings {
                margin: MarginPolicy { detection_ms: 1500, safety_factor: 3.5, floor: 4096, ceiling: 1 << 24 },
                inbound: InboundPolicy::Strict,
                on_replaced: OnReplaced::DeleteOutbound,
            },
        };
        assert_eq!(c, expected);
    }

    #[test]
    fn a_minimal_file_gets_the_defaults() {
        let c = parse(MINIMAL).unwrap();
        let expected = SyncConfig {
            netns: None,
            control_socket: "/run/xfrmsync/sync.sock".into(),
            state_file: "/var/lib/xfrmsync/sync.state".into(),
            role: Role::Standby,
            metrics: None,
            metrics_per_sa: 0,
            link: LinkSettings {
                transport: LinkTransport::Udp(UdpSettings {
                    local: "10.99.0.1:7700".parse().unwrap(),
                    peer: "10.99.0.2:7700".parse().unwrap(),
                    key_file: "/k".into(),
                    max_packet: 1400,
                    retransmit: Duration::from_millis(200),
                    max_retransmits: 8,
                    max_age: Duration::from_secs(60),
                }),
                heartbeat: Duration::from_millis(1000),
            },
            active: ActiveSettings {
                refresh: Duration::from_secs(10),
                thresholds: Thresholds { replay_packets: 256, timer_ms: 1000 },
                rules_file: None,
                lag_sample: Duration::from_secs(10),
                lag_sample_sas: 64,
            },
            standby: StandbySettings {
                margin: MarginPolicy { detection_ms: 3000, safety_factor: 2.0, floor: 1024, ceiling: 1 << 30 },
                inbound: InboundPolicy::Accept,
                on_replaced: OnReplaced::Stop,
            },
        };
        assert_eq!(c, expected);
        // Empty tables are the same as none.
        assert_eq!(parse(&with("[active]\n[standby]")).unwrap(), expected);
    }

    /// The example shows every key at its default, and says so: it must
    /// parse to what a file without them gives.
    #[test]
    fn the_example_file_parses_to_the_defaults_it_states() {
        let example = include_str!("../../sync.example.toml");
        let c = parse(example).unwrap_or_else(|e| panic!("{}", e.report("sync.example.toml")));
        let mut minimal = parse(&format!(
            "[link]\nlocal = \"{}\"\npeer = \"{}\"\nkey_file = \"{}\"\n",
            udp(&c).local,
            udp(&c).peer,
            udp(&c).key_file.display()
        ))
        .unwrap();
        minimal.netns = c.netns.clone();
        minimal.active.rules_file = c.active.rules_file.clone();
        assert_eq!(c, minimal);
        // Its CPG keys, commented out, are the CPG defaults.
        let cpg_lines: Vec<&str> = example
            .lines()
            .filter_map(|l| l.strip_prefix('#'))
            .filter(|l| ["transport = ", "group = ", "max_message = "].iter().any(|k| l.starts_with(k)))
            .collect();
        assert_eq!(cpg_lines.len(), 3, "{cpg_lines:?}");
        let cpg = parse(&format!("[link]\n{}\n", cpg_lines.join("\n"))).unwrap();
        assert_eq!(cpg, parse(CPG).unwrap());
        assert_eq!(
            cpg.link.transport,
            LinkTransport::Cpg(CpgSettings { group: DEFAULT_GROUP.into(), max_message: DEFAULT_MAX_MESSAGE })
        );
    }

    #[test]
    fn a_syntax_error_names_its_line() {
        let (line, reason) = refused(&with("max_packet = = 1400"));
        assert_eq!(line, Some(5), "{reason}");
        let (line, reason) = refused(&with("[link]"));
        assert_eq!(line, Some(5), "{reason}");
        assert!(reason.contains("duplicate"), "{reason}");
    }

    #[test]
    fn an_unknown_key_names_its_line_and_the_keys_taken() {
        let (line, reason) = refused(&with("max_pakcet = 1400"));
        assert_eq!(line, Some(5));
        assert!(reason.starts_with("unknown key `link.max_pakcet`; [link] takes local, peer, key_file, max_packet,"));
        let (line, reason) = refused(&format!("rol = \"active\"\n{MINIMAL}"));
        assert_eq!(line, Some(1));
        assert!(reason.starts_with("unknown key `rol`; the top level takes netns,"), "{reason}");
        assert!(reason.contains("[link], [active], [standby]"), "{reason}");
        let (line, reason) = refused(&with("\n[standy]\ninbound = \"strict\""));
        assert_eq!(line, Some(6));
        assert!(reason.starts_with("unknown table [standy]"), "{reason}");
        // A sub-table is a key of its table.
        let (line, reason) = refused(&with("[active.extra]"));
        assert_eq!(line, Some(5));
        assert!(reason.starts_with("unknown key `active.extra`"), "{reason}");
    }

    #[test]
    fn a_key_in_the_wrong_table_is_told_where_it_belongs() {
        let (line, reason) = refused(&with("role = \"active\""));
        assert_eq!(line, Some(5));
        assert!(reason.contains("`role` is a top-level key: write it before the first [table]"), "{reason}");
        let (line, reason) = refused(&with("[active]\ninbound = \"strict\""));
        assert_eq!(line, Some(6));
        assert!(reason.contains("`inbound` belongs in [standby]"), "{reason}");
    }

    #[test]
    fn link_is_required_with_its_three_keys() {
        let (line, reason) = refused("role = \"standby\"\n");
        assert_eq!(line, None);
        assert_eq!(reason, "no [link] table; it must give local, peer, key_file");
        let (line, reason) = refused("\n[link]\nlocal = \"10.99.0.1:7700\"\n");
        assert_eq!(line, Some(2));
        assert_eq!(reason, "[link] lacks peer, key_file");
        let (line, reason) = refused("link = 5\n");
        assert_eq!(line, Some(1));
        assert_eq!(reason, "link: expected a table, [link], found integer");
        let (line, reason) = refused(&with("[[active]]"));
        assert_eq!(line, Some(5));
        assert!(reason.contains("found array"), "{reason}");
        // Written inline or dotted, it is the same table.
        let inline = "link = { local = \"10.99.0.1:7700\", peer = \"10.99.0.2:7700\", key_file = \"/k\" }\n";
        assert_eq!(parse(inline).unwrap(), parse(MINIMAL).unwrap());
        let dotted = "link.local = \"10.99.0.1:7700\"\nlink.peer = \"10.99.0.2:7700\"\nlink.key_file = \"/k\"\n";
        assert_eq!(parse(dotted).unwrap(), parse(MINIMAL).unwrap());
    }

    #[test]
    fn wrong_types_say_what_is_expected() {
        for (line, word) in [
            ("max_packet = \"1400\"", "link.max_packet: expected a whole number, 1024 to 65000 bytes, found string"),
            ("heartbeat_ms = 1.5", "link.heartbeat_ms: expected a whole number, 10 to 60000 milliseconds, found float"),
            (
                "[active]\ntimer_ms = 1979-05-27",
                "active.timer_ms: expected a whole number, 1 to 429496729 milliseconds, found datetime",
            ),
            ("[standby]\ninbound = true", "standby.inbound: expected \"accept\" or \"strict\", found boolean"),
            ("[standby]\nsafety_factor = \"2\"", "standby.safety_factor: expected a number, 1.0 or more, found string"),
            ("[active]\nrules_file = [\"/a\"]", "active.rules_file: expected a string, found array"),
        ] {
            let err = parse(&with(line)).unwrap_err();
            assert_eq!(err.problems.len(), 1, "{err}");
            assert_eq!(err.problems[0].reason, word);
            assert_eq!(err.problems[0].line, Some(4 + line.lines().count()), "{err}");
        }
        // A key given twice is toml's to refuse.
        assert!(parse(&with("local = \"10.99.0.3:7700\"")).is_err());
    }

    #[test]
    fn numbers_out_of_range() {
        for (line, reason) in [
            ("max_packet = 512", "link.max_packet: expected 1024 to 65000 bytes, found 512"),
            ("max_packet = 65001", "link.max_packet: expected 1024 to 65000 bytes, found 65001"),
            ("retransmit_ms = 0", "link.retransmit_ms: expected 10 to 60000 milliseconds, found 0"),
            ("max_retransmits = -1", "link.max_retransmits: expected 0 to 100 retransmissions, found -1"),
            ("max_age_s = 0x1000", "link.max_age_s: expected 1 to 3600 seconds, found 4096"),
            ("[active]\nrefresh_s = 0", "active.refresh_s: expected 1 to 3600 seconds, found 0"),
            ("[active]\nrefresh_s = 3601", "active.refresh_s: expected 1 to 3600 seconds, found 3601"),
            ("[active]\nreplay_packets = 0", "active.replay_packets: expected 1 to 4294967295 packets, found 0"),
            (
                "[active]\nreplay_packets = 4294967296",
                "active.replay_packets: expected 1 to 4294967295 packets, found 4294967296",
            ),
            (
                "[active]\ntimer_ms = 429496730",
                "active.timer_ms: expected 1 to 429496729 milliseconds, found 429496730",
            ),
            (
                "[standby]\nmargin_floor = 99999999999999999999",
                "standby.margin_floor: expected 0 to 18446744073709551615 packets, found 99999999999999999999",
            ),
            (
                "[standby]\nmargin_ceiling = 0",
                "standby.margin_ceiling: expected 1 to 18446744073709551615 packets, found 0",
            ),
        ] {
            let (at, got) = refused(&with(line));
            assert_eq!(got, reason);
            assert_eq!(at, Some(4 + line.lines().count()), "{line}");
        }
        // The bounds themselves are taken.
        let c = parse(&with("max_packet = 1024\n[active]\ntimer_ms = 429496729\nreplay_packets = 4294967295")).unwrap();
        assert_eq!(udp(&c).max_packet, 1024);
        assert_eq!(c.active.thresholds, Thresholds { replay_packets: u32::MAX, timer_ms: MAX_TIMER_MS });
    }

    #[test]
    fn bad_addresses() {
        let at_link = |local: &str, peer: &str| {
            refused(&format!("[link]\nlocal = \"{local}\"\npeer = \"{peer}\"\nkey_file = \"/k\"\n"))
        };
        let (line, reason) = at_link("10.99.0.1", "10.99.0.2:7700");
        assert_eq!(line, Some(2));
        assert!(reason.starts_with("link.local: '10.99.0.1' is not ADDRESS:PORT"), "{reason}");
        let (line, reason) = at_link("10.99.0.1:7700", "fd00::2:7700");
        assert_eq!(line, Some(3));
        assert!(reason.contains("[fd00:99::1]:7700"), "{reason}");
        let (line, reason) = at_link("10.99.0.1:0", "10.99.0.2:7700");
        assert_eq!(line, Some(2));
        assert!(reason.contains("port 0"), "{reason}");
        let (line, reason) = at_link("10.99.0.1:7700", "10.99.0.2:0");
        assert_eq!(line, Some(3));
        assert!(reason.contains("port 0"), "{reason}");
        let (line, reason) = at_link("10.99.0.1:7700", "10.99.0.1:7700");
        assert_eq!(line, Some(3));
        assert_eq!(reason, "link.peer: the same as link.local; the peer is the other node");
        let (line, reason) = at_link("10.99.0.1:7700", "[fd00:99::2]:7700");
        assert_eq!(line, Some(3));
        assert!(reason.contains("not of the family of link.local 10.99.0.1:7700"), "{reason}");
        let (line, reason) = at_link("10.99.0.1:7700", "0.0.0.0:7700");
        assert_eq!(line, Some(3));
        assert!(reason.contains("no node's address"), "{reason}");
        let (line, reason) = at_link("10.99.0.1:7700", "224.0.0.18:7700");
        assert_eq!(line, Some(3));
        assert!(reason.contains("multicast"), "{reason}");
        // Binding to any address is fine; one address and two ports too.
        assert!(parse("[link]\nlocal = \"0.0.0.0:7700\"\npeer = \"10.99.0.2:7700\"\nkey_file = \"/k\"\n").is_ok());
        assert!(parse("[link]\nlocal = \"[::1]:7700\"\npeer = \"[::1]:7701\"\nkey_file = \"/k\"\n").is_ok());
    }

    #[test]
    fn relative_paths_are_refused() {
        for (text, line, label) in [
            (format!("state_file = \"sync.state\"\n{MINIMAL}"), 1, "state_file"),
            (format!("control_socket = \"\"\n{MINIMAL}"), 1, "control_socket"),
            (MINIMAL.replace("/k", "etc/sync.key"), 4, "link.key_file"),
            (with("[active]\nrules_file = \"./rules.toml\""), 6, "active.rules_file"),
        ] {
            let (at, reason) = refused(&text);
            assert_eq!(at, Some(line), "{reason}");
            assert!(reason.starts_with(&format!("{label}: absolute path required, found '")), "{reason}");
        }
    }

    #[test]
    fn a_control_socket_path_must_fit_a_socket() {
        let long = format!("/run/{}", "x".repeat(102));
        assert!(parse(&format!("control_socket = \"{long}\"\n{MINIMAL}")).is_ok());
        let (line, reason) = refused(&format!("control_socket = \"{long}x\"\n{MINIMAL}"));
        assert_eq!(line, Some(1));
        assert!(reason.contains("108 bytes"), "{reason}");
    }

    #[test]
    fn netns_is_a_name_or_an_absolute_path() {
        let netns = |v: &str| parse(&format!("netns = \"{v}\"\n{MINIMAL}")).map(|c| c.netns);
        assert_eq!(netns("ha"), Ok(Some("/run/netns/ha".into())));
        assert_eq!(netns("/proc/1/ns/net"), Ok(Some("/proc/1/ns/net".into())));
        let err = netns("ns/ha").unwrap_err();
        assert!(err.problems[0].reason.contains("absolute path required"), "{err}");
        assert!(netns("..").is_err());
        assert!(netns("").is_err());
    }

    #[test]
    fn the_margin_floor_and_ceiling() {
        let (line, reason) = refused(&with("[standby]\nmargin_floor = 100\nmargin_ceiling = 99"));
        assert_eq!(line, Some(7));
        assert_eq!(reason, "standby.margin_ceiling: 99 is less than standby.margin_floor, 100");
        // Against the default ceiling, at the floor's line.
        let (line, reason) = refused(&with("[standby]\nmargin_floor = 0x80000000"));
        assert_eq!(line, Some(6));
        assert_eq!(
            reason,
            "standby.margin_floor: 2147483648 is more than standby.margin_ceiling, 1073741824 by default"
        );
        let (line, reason) = refused(&with("[standby]\nmargin_ceiling = 100"));
        assert_eq!(line, Some(6));
        assert_eq!(reason, "standby.margin_ceiling: 100 is less than standby.margin_floor, 1024 by default");
        // A wrong floor is said once, not compared.
        let (line, reason) = refused(&with("[standby]\nmargin_floor = -1\nmargin_ceiling = 100"));
        assert_eq!(line, Some(6), "{reason}");
        let c = parse(&with("[standby]\nmargin_floor = 0\nmargin_ceiling = 1")).unwrap();
        assert_eq!((c.standby.margin.floor, c.standby.margin.ceiling), (0, 1));
        let c = parse(&with("[standby]\nmargin_floor = 5\nmargin_ceiling = 5")).unwrap();
        assert_eq!((c.standby.margin.floor, c.standby.margin.ceiling), (5, 5));
    }

    #[test]
    fn the_safety_factor() {
        for bad in ["0.5", "-2.0", "nan", "inf", "-inf", "0"] {
            let (line, reason) = refused(&with(&format!("[standby]\nsafety_factor = {bad}")));
            assert_eq!(line, Some(6), "{bad}: {reason}");
            assert!(reason.starts_with("standby.safety_factor: expected "), "{bad}: {reason}");
        }
        let factor =
            |v: &str| parse(&with(&format!("[standby]\nsafety_factor = {v}"))).unwrap().standby.margin.safety_factor;
        assert_eq!(factor("1.0"), 1.0);
        assert_eq!(factor("2"), 2.0);
        assert_eq!(factor("1e1"), 10.0);
    }

    #[test]
    fn the_choices() {
        let c = parse(&format!("role = \"active\"\n{MINIMAL}")).unwrap();
        assert_eq!(c.role, Role::Active);
        let (line, reason) = refused(&format!("role = \"master\"\n{MINIMAL}"));
        assert_eq!(line, Some(1));
        assert_eq!(reason, "role: expected \"standby\" or \"active\", found \"master\"");
        let (line, reason) = refused(&with("[standby]\non_replaced = \"delete_outbound\""));
        assert_eq!(line, Some(6));
        assert_eq!(reason, "standby.on_replaced: expected \"stop\" or \"delete-outbound\", found \"delete_outbound\"");
    }

    #[test]
    fn every_problem_is_reported_each_at_its_line_in_order() {
        let text = r#"role = "master"
state_file = "state"

[standby]
margin_ceiling = 0
colour = "blue"

[link]
local = "10.99.0.1:7700"
peer = "10.99.0.1:7700"
max_packet = 512
"#;
        let err = parse(text).unwrap_err();
        let lines: Vec<_> = err.problems.iter().map(|p| p.line).collect();
        assert_eq!(lines, [Some(1), Some(2), Some(5), Some(6), Some(8), Some(10), Some(11)], "{err}");
        assert_eq!(
            err.report("/etc/xfrmsync/sync.toml"),
            "/etc/xfrmsync/sync.toml:1: role: expected \"standby\" or \"active\", found \"master\"\n\
             /etc/xfrmsync/sync.toml:2: state_file: absolute path required, found 'state'\n\
             /etc/xfrmsync/sync.toml:5: standby.margin_ceiling: expected 1 to 18446744073709551615 packets, found 0\n\
             /etc/xfrmsync/sync.toml:6: unknown key `standby.colour`; [standby] takes detection_ms, safety_factor, \
             margin_floor, margin_ceiling, inbound, on_replaced\n\
             /etc/xfrmsync/sync.toml:8: [link] lacks key_file\n\
             /etc/xfrmsync/sync.toml:10: link.peer: the same as link.local; the peer is the other node\n\
             /etc/xfrmsync/sync.toml:11: link.max_packet: expected 1024 to 65000 bytes, found 512"
        );
    }

    #[test]
    fn a_cpg_link_takes_its_own_keys_and_none_of_udp() {
        let c = parse(CPG).unwrap();
        assert_eq!(
            c.link,
            LinkSettings {
                transport: LinkTransport::Cpg(CpgSettings { group: "xfrmsync".into(), max_message: 8192 }),
                heartbeat: Duration::from_millis(1000),
            }
        );
        let c = parse(&format!("{CPG}group = \"ipsec-ha\"\nmax_message = 65536\nheartbeat_ms = 250\n")).unwrap();
        assert_eq!(
            c.link,
            LinkSettings {
                transport: LinkTransport::Cpg(CpgSettings { group: "ipsec-ha".into(), max_message: 65536 }),
                heartbeat: Duration::from_millis(250),
            }
        );
        // Written out, UDP is the default.
        assert_eq!(parse(&with("transport = \"udp\"")).unwrap(), parse(MINIMAL).unwrap());

        // Each UDP key, at its line.
        for (line, key) in [
            ("local = \"10.99.0.1:7700\"", "local"),
            ("peer = \"10.99.0.2:7700\"", "peer"),
            ("key_file = \"/k\"", "key_file"),
            ("max_packet = 1400", "max_packet"),
            ("retransmit_ms = 200", "retransmit_ms"),
            ("max_retransmits = 8", "max_retransmits"),
            ("max_age_s = 60", "max_age_s"),
        ] {
            let (at, reason) = refused(&format!("{CPG}group = \"g\"\n{line}\n"));
            assert_eq!(at, Some(4), "{line}");
            assert_eq!(
                reason,
                format!(
                    "link.{key}: not with transport = \"cpg\": corosync's ring carries, authenticates and encrypts \
                     the messages (CPG takes group, max_message, heartbeat_ms)"
                )
            );
        }
        // Whatever its value: the key is what is wrong.
        let (at, reason) = refused(&format!("{CPG}local = \"10.99.0.1\"\n"));
        assert_eq!(at, Some(3));
        assert!(reason.starts_with("link.local: not with transport = \"cpg\""), "{reason}");
        // And the CPG keys on a UDP link.
        let (at, reason) = refused(&with("group = \"xfrmsync\""));
        assert_eq!(at, Some(5));
        assert_eq!(reason, "link.group: only with transport = \"cpg\" (this link is UDP, the default)");
        let (at, reason) = refused(&with("max_message = 8192"));
        assert_eq!(at, Some(5));
        assert!(reason.starts_with("link.max_message: only with transport"), "{reason}");

        // Wrong values.
        for (line, reason) in [
            ("transport = \"tcp\"", "link.transport: expected \"udp\" or \"cpg\", found \"tcp\""),
            ("group = \"\"", "link.group: expected 1 to 127 bytes, found 0"),
            ("max_message = 1023", "link.max_message: expected 1024 to 1048576 bytes, found 1023"),
            ("max_message = 1048577", "link.max_message: expected 1024 to 1048576 bytes, found 1048577"),
            ("group = 5", "link.group: expected a string, found integer"),
        ] {
            let text = match line.starts_with("transport") {
                true => format!("[link]\n{line}\n"),
                false => format!("{CPG}{line}\n"),
            };
            let (at, got) = refused(&text);
            assert_eq!(got, reason);
            assert_eq!(at, Some(2 + usize::from(!line.starts_with("transport"))), "{line}");
        }
        let long = "g".repeat(127);
        assert!(parse(&format!("{CPG}group = \"{long}\"\n")).is_ok());
        let (_, reason) = refused(&format!("{CPG}group = \"{long}g\"\n"));
        assert_eq!(reason, "link.group: expected 1 to 127 bytes, found 128");
        // A wrong transport says so once, not what the keys would need.
        let (at, reason) = refused("[link]\ntransport = \"quic\"\ngroup = \"g\"\n");
        assert_eq!(at, Some(2), "{reason}");
        let (at, reason) = refused("[link]\ntransport = \"cpg\"\nmax_message = 1024\nkey_file = \"/k\"\n");
        assert_eq!((at, reason.starts_with("link.key_file: not with")), (Some(4), true));
        assert_eq!(
            parse(&format!("{CPG}max_message = 1048576\n")).map(|c| c.link.heartbeat),
            Ok(Duration::from_secs(1))
        );
    }

    #[test]
    fn load_names_the_file() {
        let dir = std::env::temp_dir().join(format!("xfrmsync-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("sync.toml");
        std::fs::write(&path, with("max_packet = 1")).unwrap();
        let err = load(&path).unwrap_err();
        assert_eq!(err, format!("{}:5: link.max_packet: expected 1024 to 65000 bytes, found 1", path.display()));
        std::fs::write(&path, MINIMAL).unwrap();
        assert_eq!(load(&path).unwrap(), parse(MINIMAL).unwrap());
        let missing = dir.join("absent.toml");
        assert_eq!(
            load(&missing).unwrap_err(),
            format!("{}: cannot read: No such file or directory", missing.display())
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
