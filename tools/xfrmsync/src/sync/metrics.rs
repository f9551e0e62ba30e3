//! `xfrmsync sync --metrics ADDR:PORT` (or the config's `metrics` key): the
//! daemon's counters for Prometheus, in its text exposition format 0.0.4,
//! on `GET /metrics`. Off by default.
//!
//! Served from the daemon's own poll loop, no thread: the listener and up
//! to [`CLIENTS`] connections waiting for their request are fds of that
//! loop, all non-blocking. A client has 1 s to send its request (at most
//! [`MAX_REQUEST`] bytes); one that sends nothing is closed then, and one
//! more client than there is room for closes the oldest waiting. The answer
//! is written at once (`HTTP/1.0`, `Content-Length`, then close): it is a
//! few KB, which the socket's buffer takes whole. `GET /metrics` (any query
//! string) is answered with the metrics, another path with 404, another
//! method with 405. Bind it to a loopback or management address: it has no
//! authentication (it shows counters only, no key and no SA).
//!
//! The metrics, every name prefixed `xfrmsync_sync_`:
//!
//! | name | type | what |
//! | --- | --- | --- |
//! | `records_sent_total` | counter | records sent to the peer (while active) |
//! | `records_received_total` | counter | records received from the peer |
//! | `records_rejected_total{reason}` | counter | received and not held: `older` than one held, of a `lower_epoch`, `malformed` |
//! | `departures_sent_total` | counter | departures (an SA gone) sent |
//! | `resyncs_total{kind}` | counter | snapshots `asked` of the peer, `served` to it, `completed` (received whole) |
//! | `commits_total` | counter | takeovers done here |
//! | `last_commit_sas{outcome}` | gauge | the last commit's SAs: `written`, `needs_rekey`, `mismatch`, `failed` (0 before any) |
//! | `last_commit_margin_min_packets`, `..._max_packets` | gauge | the least and greatest margin the last commit added; absent before a commit with a margin |
//! | `epoch` | gauge | the highest epoch the node knows |
//! | `epoch_changes_total` | counter | times that epoch rose (a commit here, or a higher one learnt) |
//! | `role{role}` | gauge | 1 for the node's role (`active`, `standby`, `replaced`), 0 for the others |
//! | `records_held` | gauge | records held now (0 while active) |
//! | `last_record_age_seconds` | gauge | since the newest record from the peer arrived, by this node's clock; absent before any |
//! | `peer_heartbeat_age_seconds` | gauge | since the newest heartbeat of any peer; absent before any |
//! | `peer_record_age_seconds{peer}` | gauge | per peer that sent records (the UDP peer's address, a CPG member as `node N pid P`; members that left are forgotten): since its newest record arrived |
//! | `peers_heard` | gauge | peers whose last heartbeat the node holds (one at most on the UDP link; CPG members that left are forgotten) |
//! | `events_lost_total` | counter | times the active side's event socket overran (each followed by a listing); summed over every time the node was active |
//! | `link_packets_sent_total`, `..._received_total`, `..._retransmitted_total`, `..._given_up_total` | counter | the sync link's messages (CPG: taken by corosync, delivered from other members, 0, never handed to corosync) |
//! | `link_packets_dropped_total{reason}` | counter | datagrams refused: `not_from_peer`, `auth_failed`, `malformed`, `replayed`, `too_old`, `from_future`, `old_session`; on the CPG link only `malformed` |
//! | `link_try_again_total` | counter | CPG: `CS_ERR_TRY_AGAIN` answers (corosync's flow control); absent on the UDP link |
//! | `link_queue_wait_longest_seconds` | gauge | CPG: the longest a message waited in the queue for corosync to take it, the one waiting now included (the ring blocks during failure detection); absent on the UDP link |
//! | `link_ring_wait_longest_seconds` | gauge | CPG: the longest from corosync taking a message of this node's to delivering it back, the one in flight now included: the ring's own delay, which shows its block during failure detection even when nothing waits in the queue; absent on the UDP link |
//! | `link_queued_messages` | gauge | CPG: messages waiting for corosync now; absent on the UDP link |
//! | `link_group_members` | gauge | CPG: the group's other members, as corosync says; absent on the UDP link |
//! | `link_connected` | gauge | CPG: 1 while the daemon is joined, 0 while corosync is lost; absent on the UDP link |
//! | `replication_samples_sent_total` | counter | SAs whose kernel state the active node sampled and sent (`[active] lag_sample_sas`) |
//! | `replication_lag_packets` | histogram | standby: per sample, how many packets the record held was behind the active node's kernel (buckets 0, 1, 4 ... 65536) |
//! | `replication_lag_not_held_total` | counter | standby: samples of SAs no record was held of |
//! | `replication_lag_over_margin_total` | counter | standby: samples whose lag was above the margin a takeover then would add: a takeover then would have reused sequence numbers |
//! | `replication_lag_last_max_packets` | gauge | standby: the greatest lag in the last message of samples; absent before any |
//! | `replication_lag_last_max_margin_ratio` | gauge | standby: the greatest lag over its SA's margin in that message (alert well below 1); absent before any |
//! | `replication_lag_last_sample_age_seconds` | gauge | standby: since that message; absent before any |
//! | `metrics_per_sa_limit` | gauge | `metrics_per_sa`: the most SAs given series of their own (0: off) |
//! | `sa_series_omitted` | gauge | SAs the node knows beyond that limit, left without series; absent while it is 0 |
//! | `sa_record_age_seconds{sa,direction}` | gauge | per SA (opt-in): the age of the record held |
//! | `sa_replication_lag_packets{sa,direction}`, `sa_replication_margin_packets{sa,direction}` | gauge | per SA (opt-in): the last sample's lag, and the margin a takeover then would add |
//! | `sa_last_commit_margin_packets{sa,direction}` | gauge | per SA (opt-in): the margin the last commit added |
//! | `sa_needs_rekey{sa,direction}` | gauge | per SA (opt-in): 1 if the last commit left it to be rekeyed, else 0 |
//!
//! "Absent" means the family's `# HELP` and `# TYPE` lines with no sample,
//! rather than NaN: an alert on `absent(...)` or on a threshold then does
//! not fire on a made-up value.
//!
//! Only the opt-in `sa_` families name an SA (`sa="esp dst 10.0.0.2 spi
//! 0x0000c001"`, `direction="out"`, `"in"` or `"unknown"`), for at most
//! `metrics_per_sa` SAs, the first by address and SPI: every other family
//! has a fixed number of series whatever the number of SAs, and a
//! Prometheus server keeps every series it ever saw, for each SA a
//! concentrator rekeys. `xfrmsync sync status --json` has every SA.
//!
//! The replication lag is the standby's measure: it does not see the
//! active node's kernel, so the active node reads a few SAs' state at a
//! time and sends it (lag.rs); the standby compares each with its record.

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

/// Connections kept waiting for their request at once.
pub const CLIENTS: usize = 4;
/// The most of a request read; a longer one is refused.
pub const MAX_REQUEST: usize = 4096;
/// How long a client has to send its request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);
/// How long writing the answer may wait on a client that does not read.
const WRITE_TIMEOUT: Duration = Duration::from_millis(200);

pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What the metrics show, gathered by the daemon at each scrape.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Values {
    /// `active`, `standby` or `replaced`.
    pub role: &'static str,
    pub epoch: u64,
    pub epoch_changes: u64,
    pub records_sent: u64,
    pub records_received: u64,
    pub rejected_older: u64,
    pub rejected_lower_epoch: u64,
    pub rejected_malformed: u64,
    pub departures_sent: u64,
    pub resyncs_asked: u64,
    pub resyncs_served: u64,
    pub resyncs_completed: u64,
    pub commits: u64,
    /// The last commit's SAs by outcome: written, needs_rekey, mismatch, failed.
    pub last_commit: [u64; 4],
    pub last_commit_margin_min: Option<u64>,
    pub last_commit_margin_max: Option<u64>,
    pub records_held: u64,
    pub last_record_age: Option<Duration>,
    /// Per peer that sent records, by its name.
    pub peer_record_ages: Vec<(String, Duration)>,
    pub peer_heartbeat_age: Option<Duration>,
    pub peers_heard: u64,
    pub events_lost: u64,
    pub link_sent: u64,
    pub link_received: u64,
    pub link_retransmitted: u64,
    pub link_given_up: u64,
    /// By reason, each reason always listed.
    pub link_dropped: Vec<(&'static str, u64)>,
    /// The CPG link's own; `None` on the UDP link.
    pub cpg: Option<CpgValues>,
    pub samples_sent: u64,
    pub lag: LagValues,
    /// `metrics_per_sa`'s limit, and the series under it.
    pub per_sa_limit: u64,
    pub per_sa: Vec<SaSeries>,
    /// SAs beyond the limit.
    pub per_sa_omitted: u64,
}

/// The replication lag a standby measured (lag.rs).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LagValues {
    /// Cumulative, one per bound of `lag::BUCKETS`, then `+Inf` (the count).
    pub cumulative: [u64; super::lag::BUCKETS.len() + 1],
    pub sum: u64,
    pub not_held: u64,
    pub over_margin: u64,
    pub last_max_packets: Option<u64>,
    pub last_max_margin_ratio: Option<f64>,
    pub last_sample_age: Option<Duration>,
}

/// One SA's series, when `metrics_per_sa` asks for them.
#[derive(Debug, Clone, PartialEq)]
pub struct SaSeries {
    /// As `xfrmsync` names SAs everywhere.
    pub sa: String,
    /// `out`, `in` or `unknown`.
    pub direction: &'static str,
    pub record_age: Option<Duration>,
    pub lag: Option<(u64, u64)>,
    pub commit_margin: Option<u64>,
    pub needs_rekey: Option<bool>,
}

/// What only the CPG link has.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CpgValues {
    pub try_again: u64,
    pub queued: u64,
    pub queue_wait_longest: Duration,
    pub ring_wait_longest: Duration,
    pub members: u64,
    pub connected: bool,
}

pub const ROLES: [&str; 3] = ["active", "standby", "replaced"];
pub const OUTCOMES: [&str; 4] = ["written", "needs_rekey", "mismatch", "failed"];

/// A sample's value: counts exactly, seconds and ratios as floats.
#[derive(Debug, Clone, Copy)]
enum Number {
    Count(u64),
    Seconds(Duration),
    Ratio(f64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Type {
    Counter,
    Gauge,
    Histogram,
}

/// The exposition text being written: one family at a time.
struct Text(String);

impl Text {
    /// A family: `# HELP`, `# TYPE`, then its samples, each with its
    /// labels. A counter's name ends in `_total`.
    fn family(&mut self, name: &str, kind: Type, help: &str, samples: &[(&[(&str, &str)], Number)]) {
        debug_assert!(kind != Type::Counter || name.ends_with("_total"), "{name}");
        self.head(name, kind, help);
        for (labels, value) in samples {
            self.sample(name, labels, *value);
        }
    }

    fn head(&mut self, name: &str, kind: Type, help: &str) {
        let kind_name = match kind {
            Type::Counter => "counter",
            Type::Gauge => "gauge",
            Type::Histogram => "histogram",
        };
        let _ = writeln!(self.0, "# HELP xfrmsync_sync_{name} {}", escape_help(help));
        let _ = writeln!(self.0, "# TYPE xfrmsync_sync_{name} {kind_name}");
    }

    /// One sample line; `name` may carry a histogram's suffix.
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: Number) {
        self.0.push_str("xfrmsync_sync_");
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (label, value)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{label}=\"{}\"", escape_label_value(value));
            }
            self.0.push('}');
        }
        let _ = match value {
            Number::Count(n) => writeln!(self.0, " {n}"),
            Number::Seconds(d) => writeln!(self.0, " {}", d.as_secs_f64()),
            Number::Ratio(r) => writeln!(self.0, " {r}"),
        };
    }

    /// A histogram: its buckets' cumulative counts (the last is `+Inf`,
    /// the count), then the sum and the count.
    fn histogram(&mut self, name: &str, help: &str, bounds: &[u64], cumulative: &[u64], sum: u64) {
        debug_assert_eq!(bounds.len() + 1, cumulative.len());
        self.head(name, Type::Histogram, help);
        let bucket = format!("{name}_bucket");
        for (bound, count) in bounds.iter().map(u64::to_string).chain(["+Inf".to_string()]).zip(cumulative) {
            self.sample(&bucket, &[("le", &bound)], Number::Count(*count));
        }
        let count = cumulative.last().copied().unwrap_or(0);
        self.sample(&format!("{name}_sum"), &[], Number::Count(sum));
        self.sample(&format!("{name}_count"), &[], Number::Count(count));
    }

    /// A per-SA family: a sample for each series `value` gives one of.
    fn per_sa(&mut self, name: &str, help: &str, rows: &[SaSeries], value: impl Fn(&SaSeries) -> Option<Number>) {
        self.head(name, Type::Gauge, help);
        for row in rows {
            if let Some(v) = value(row) {
                self.sample(name, &[("sa", &row.sa), ("direction", row.direction)], v);
            }
        }
    }

    fn one(&mut self, name: &str, kind: Type, help: &str, value: u64) {
        self.family(name, kind, help, &[(&[], Number::Count(value))]);
    }

    /// One sample per label value.
    fn by(&mut self, name: &str, kind: Type, help: &str, label: &str, values: &[(&str, u64)]) {
        let labels: Vec<[(&str, &str); 1]> = values.iter().map(|(v, _)| [(label, *v)]).collect();
        let samples: Vec<(&[(&str, &str)], Number)> =
            labels.iter().zip(values).map(|(l, (_, n))| (&l[..], Number::Count(*n))).collect();
        self.family(name, kind, help, &samples);
    }

    /// A sample, or none when there is no value yet.
    fn maybe(&mut self, name: &str, kind: Type, help: &str, value: Option<Number>) {
        let samples: Vec<(&[(&str, &str)], Number)> = value.into_iter().map(|v| (&[][..], v)).collect();
        self.family(name, kind, help, &samples);
    }
}

/// `\` and newline escaped, as the format wants in `# HELP`.
fn escape_help(text: &str) -> String {
    text.replace('\\', "\\\\").replace('\n', "\\n")
}

/// `\`, `"` and newline escaped, as the format wants in a label value.
fn escape_label_value(text: &str) -> String {
    text.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// The exposition text of `v`.
pub fn render(v: &Values) -> String {
    use Type::{Counter, Gauge};
    let mut t = Text(String::with_capacity(8192));
    t.one("records_sent_total", Counter, "Records sent to the peer.", v.records_sent);
    t.one("records_received_total", Counter, "Records received from the peer.", v.records_received);
    t.by(
        "records_rejected_total",
        Counter,
        "Records received and not held, by reason.",
        "reason",
        &[("older", v.rejected_older), ("lower_epoch", v.rejected_lower_epoch), ("malformed", v.rejected_malformed)],
    );
    t.one("departures_sent_total", Counter, "Departures (an SA gone) sent to the peer.", v.departures_sent);
    t.by(
        "resyncs_total",
        Counter,
        "Snapshots asked of the peer, served to it, and completed.",
        "kind",
        &[("asked", v.resyncs_asked), ("served", v.resyncs_served), ("completed", v.resyncs_completed)],
    );
    t.one("commits_total", Counter, "Takeovers (commits) done by this node.", v.commits);
    let outcomes: Vec<(&str, u64)> = OUTCOMES.iter().copied().zip(v.last_commit).collect();
    t.by("last_commit_sas", Gauge, "The last commit's SAs, by outcome.", "outcome", &outcomes);
    t.maybe(
        "last_commit_margin_min_packets",
        Gauge,
        "The least margin the last commit added to an SA, in packets.",
        v.last_commit_margin_min.map(Number::Count),
    );
    t.maybe(
        "last_commit_margin_max_packets",
        Gauge,
        "The greatest margin the last commit added to an SA, in packets.",
        v.last_commit_margin_max.map(Number::Count),
    );
    t.one("epoch", Gauge, "The highest epoch this node knows.", v.epoch);
    t.one("epoch_changes_total", Counter, "Times this node's epoch rose.", v.epoch_changes);
    let roles: Vec<(&str, u64)> = ROLES.iter().map(|r| (*r, u64::from(*r == v.role))).collect();
    t.by("role", Gauge, "1 for the node's role, 0 for the others.", "role", &roles);
    t.one("records_held", Gauge, "Records held now, one per SA.", v.records_held);
    t.maybe(
        "last_record_age_seconds",
        Gauge,
        "Seconds since the newest record from the peer arrived; absent before any.",
        v.last_record_age.map(Number::Seconds),
    );
    t.maybe(
        "peer_heartbeat_age_seconds",
        Gauge,
        "Seconds since the newest heartbeat of any peer; absent before any.",
        v.peer_heartbeat_age.map(Number::Seconds),
    );
    let ages: Vec<[(&str, &str); 1]> = v.peer_record_ages.iter().map(|(peer, _)| [("peer", peer.as_str())]).collect();
    let samples: Vec<(&[(&str, &str)], Number)> =
        ages.iter().zip(&v.peer_record_ages).map(|(l, (_, age))| (&l[..], Number::Seconds(*age))).collect();
    t.family(
        "peer_record_age_seconds",
        Gauge,
        "Seconds since the newest record from each peer arrived (peers that sent none are absent).",
        &samples,
    );
    t.one("peers_heard", Gauge, "Peers whose last heartbeat this node holds.", v.peers_heard);
    t.one("events_lost_total", Counter, "Times the active side's event socket overran.", v.events_lost);
    t.one("link_packets_sent_total", Counter, "Messages sent on the sync link.", v.link_sent);
    t.one("link_packets_received_total", Counter, "Messages received on the sync link.", v.link_received);
    t.one("link_packets_retransmitted_total", Counter, "Messages sent again on the sync link.", v.link_retransmitted);
    t.one("link_packets_given_up_total", Counter, "Reliable messages never acknowledged by the peer.", v.link_given_up);
    t.by(
        "link_packets_dropped_total",
        Counter,
        "Datagrams refused on the sync link, by reason.",
        "reason",
        &v.link_dropped,
    );
    let cpg = v.cpg.as_ref();
    t.maybe(
        "link_try_again_total",
        Counter,
        "CPG: times corosync answered CS_ERR_TRY_AGAIN (flow control); absent on the UDP link.",
        cpg.map(|c| Number::Count(c.try_again)),
    );
    t.maybe(
        "link_queue_wait_longest_seconds",
        Gauge,
        "CPG: the longest a message waited for corosync to take it, the one waiting now included.",
        cpg.map(|c| Number::Seconds(c.queue_wait_longest)),
    );
    t.maybe(
        "link_ring_wait_longest_seconds",
        Gauge,
        "CPG: the longest from corosync taking a message of ours to delivering it back, the one in flight included.",
        cpg.map(|c| Number::Seconds(c.ring_wait_longest)),
    );
    t.maybe(
        "link_queued_messages",
        Gauge,
        "CPG: messages waiting for corosync to take them.",
        cpg.map(|c| Number::Count(c.queued)),
    );
    t.maybe(
        "link_group_members",
        Gauge,
        "CPG: the group's other members, as corosync says.",
        cpg.map(|c| Number::Count(c.members)),
    );
    t.maybe(
        "link_connected",
        Gauge,
        "CPG: 1 while joined to the group, 0 while corosync is lost.",
        cpg.map(|c| Number::Count(u64::from(c.connected))),
    );
    t.one(
        "replication_samples_sent_total",
        Counter,
        "SAs whose kernel state this node sampled and sent, for the standbys to measure their lag.",
        v.samples_sent,
    );
    let lag = &v.lag;
    t.histogram(
        "replication_lag_packets",
        "Per sample of the active node's kernel: packets the record held was behind it.",
        &super::lag::BUCKETS,
        &lag.cumulative,
        lag.sum,
    );
    t.one("replication_lag_not_held_total", Counter, "Samples of SAs this node held no record of.", lag.not_held);
    t.one(
        "replication_lag_over_margin_total",
        Counter,
        "Samples whose lag was above the margin a takeover then would add (it would have reused sequence numbers).",
        lag.over_margin,
    );
    t.maybe(
        "replication_lag_last_max_packets",
        Gauge,
        "The greatest lag in the last message of samples, packets; absent before any.",
        lag.last_max_packets.map(Number::Count),
    );
    t.maybe(
        "replication_lag_last_max_margin_ratio",
        Gauge,
        "The greatest lag over its SA's takeover margin in the last message of samples; absent before any.",
        lag.last_max_margin_ratio.map(Number::Ratio),
    );
    t.maybe(
        "replication_lag_last_sample_age_seconds",
        Gauge,
        "Seconds since the last message of samples arrived; absent before any.",
        lag.last_sample_age.map(Number::Seconds),
    );
    t.one("metrics_per_sa_limit", Gauge, "The most SAs given series of their own (0: none).", v.per_sa_limit);
    t.maybe(
        "sa_series_omitted",
        Gauge,
        "SAs beyond metrics_per_sa, left without series of their own; absent while none is.",
        (v.per_sa_omitted > 0).then_some(Number::Count(v.per_sa_omitted)),
    );
    let rows = &v.per_sa;
    t.per_sa("sa_record_age_seconds", "The age of the record held of the SA.", rows, |r| {
        r.record_age.map(Number::Seconds)
    });
    t.per_sa(
        "sa_replication_lag_packets",
        "The SA's last sample: packets the record held was behind the active node's kernel.",
        rows,
        |r| r.lag.map(|(packets, _)| Number::Count(packets)),
    );
    t.per_sa(
        "sa_replication_margin_packets",
        "The SA's last sample: the margin a takeover then would add.",
        rows,
        |r| r.lag.map(|(_, margin)| Number::Count(margin)),
    );
    t.per_sa("sa_last_commit_margin_packets", "The margin the last commit added to the SA.", rows, |r| {
        r.commit_margin.map(Number::Count)
    });
    t.per_sa("sa_needs_rekey", "1 if the last commit left the SA to be rekeyed, else 0.", rows, |r| {
        r.needs_rekey.map(|n| Number::Count(u64::from(n)))
    });
    t.0
}

/// A connection waiting for its request.
struct Client {
    stream: TcpStream,
    request: Vec<u8>,
    deadline: Instant,
}

/// The listener and the connections waiting for their request.
pub struct Endpoint {
    listener: TcpListener,
    clients: [Option<Client>; CLIENTS],
}

/// What a request asked for.
#[derive(Debug, PartialEq, Eq)]
enum Asked {
    Metrics,
    NotFound,
    BadMethod,
    Bad,
}

impl Endpoint {
    pub fn bind(addr: SocketAddr) -> io::Result<Endpoint> {
        let listener = TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        Ok(Endpoint { listener, clients: Default::default() })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The fds to wait on: the listener, then each waiting client (-1 for
    /// none, which poll skips).
    pub fn fds(&self) -> [RawFd; 1 + CLIENTS] {
        let mut fds = [-1; 1 + CLIENTS];
        fds[0] = self.listener.as_raw_fd();
        for (fd, client) in fds[1..].iter_mut().zip(&self.clients) {
            if let Some(c) = client {
                *fd = c.stream.as_raw_fd();
            }
        }
        fds
    }

    /// When the first waiting client runs out of time.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.clients.iter().flatten().map(|c| c.deadline).min()
    }

    /// Accepts, reads and answers what is ready (`ready` as for
    /// [`Endpoint::fds`]), and closes clients out of time. `values` is
    /// called for each scrape answered.
    pub fn process(&mut self, ready: &[bool], now: Instant, values: &mut dyn FnMut() -> Values) {
        for (slot, ready) in ready[1..].iter().enumerate() {
            if *ready {
                self.read(slot, values);
            }
        }
        if ready[0] {
            self.accept(now, values);
        }
        for client in &mut self.clients {
            if client.as_ref().is_some_and(|c| c.deadline <= now) {
                log::debug!("metrics: a client sent no request within {REQUEST_TIMEOUT:?}");
                *client = None;
            }
        }
    }

    fn accept(&mut self, now: Instant, values: &mut dyn FnMut() -> Values) {
        loop {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    log::warn!("metrics: accepting: {e}");
                    return;
                }
            };
            if let Err(e) = stream.set_nonblocking(true) {
                log::warn!("metrics: {e}");
                continue;
            }
            // The free slot, or the one waiting longest.
            let slot = match self.clients.iter().position(Option::is_none) {
                Some(free) => free,
                None => {
                    let (oldest, _) = self
                        .clients
                        .iter()
                        .enumerate()
                        .min_by_key(|(_, c)| c.as_ref().map(|c| c.deadline))
                        .expect("CLIENTS > 0");
                    log::debug!("metrics: more clients than {CLIENTS} waiting; the oldest closed");
                    oldest
                }
            };
            let client = Client { stream, request: Vec::new(), deadline: now + REQUEST_TIMEOUT };
            self.clients[slot] = Some(client);
            // A scraper sends its request with the connection: often here already.
            self.read(slot, values);
        }
    }

    /// Reads what `slot`'s client sent; answers once its request is whole.
    fn read(&mut self, slot: usize, values: &mut dyn FnMut() -> Values) {
        let Some(client) = &mut self.clients[slot] else { return };
        let mut buf = [0u8; 1024];
        let asked = loop {
            match client.stream.read(&mut buf) {
                Ok(0) => {
                    self.clients[slot] = None;
                    return;
                }
                Ok(n) => {
                    client.request.extend_from_slice(&buf[..n]);
                    if let Some(asked) = request(&client.request) {
                        break asked;
                    }
                    if client.request.len() > MAX_REQUEST {
                        break Asked::Bad;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::debug!("metrics: reading a request: {e}");
                    self.clients[slot] = None;
                    return;
                }
            }
        };
        let client = self.clients[slot].take().expect("read above");
        let (status, body, extra) = match asked {
            Asked::Metrics => ("200 OK", render(&values()), ""),
            Asked::NotFound => ("404 Not Found", "Not found: the metrics are at /metrics\n".into(), ""),
            Asked::BadMethod => ("405 Method Not Allowed", "Only GET\n".into(), "Allow: GET\r\n"),
            Asked::Bad => ("400 Bad Request", "Bad request\n".into(), ""),
        };
        let answer = format!(
            "HTTP/1.0 {status}\r\nContent-Type: {CONTENT_TYPE}\r\nContent-Length: {}\r\n{extra}Connection: \
             close\r\n\r\n{body}",
            body.len()
        );
        if let Err(e) = write_answer(&client.stream, answer.as_bytes()) {
            log::debug!("metrics: writing an answer: {e}");
        }
    }
}

fn write_answer(mut stream: &TcpStream, answer: &[u8]) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    stream.write_all(answer)?;
    stream.shutdown(std::net::Shutdown::Write)
}

/// What a request asks for, once its head is whole (`None` before).
fn request(bytes: &[u8]) -> Option<Asked> {
    let end =
        bytes.windows(4).position(|w| w == b"\r\n\r\n").or_else(|| bytes.windows(2).position(|w| w == b"\n\n"))?;
    let Ok(head) = std::str::from_utf8(&bytes[..end]) else { return Some(Asked::Bad) };
    let line = head.lines().next().unwrap_or("");
    let mut words = line.split_ascii_whitespace();
    let (Some(method), Some(target), Some(version)) = (words.next(), words.next(), words.next()) else {
        return Some(Asked::Bad);
    };
    if words.next().is_some() || !version.starts_with("HTTP/1.") {
        return Some(Asked::Bad);
    }
    if method != "GET" {
        return Some(Asked::BadMethod);
    }
    let path = target.split_once('?').map_or(target, |(path, _)| path);
    Some(if path == "/metrics" { Asked::Metrics } else { Asked::NotFound })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn help_and_label_values_are_escaped_as_the_format_says() {
        assert_eq!(escape_help("a\\b\nc \"q\""), "a\\\\b\\nc \"q\"");
        assert_eq!(escape_label_value("a\\b\nc \"q\""), "a\\\\b\\nc \\\"q\\\"");
        let mut t = Text(String::new());
        t.family(
            "x_total",
            Type::Counter,
            "Line one\nback\\slash",
            &[(&[("k", "v\"1\""), ("j", "\\")], Number::Count(3))],
        );
        assert_eq!(
            t.0,
            "# HELP xfrmsync_sync_x_total Line one\\nback\\\\slash\n# TYPE xfrmsync_sync_x_total counter\n\
             xfrmsync_sync_x_total{k=\"v\\\"1\\\"\",j=\"\\\\\"} 3\n"
        );
    }

    #[test]
    fn every_family_has_help_and_type_and_counters_end_in_total() {
        let v = Values {
            role: "standby",
            link_dropped: vec![("auth_failed", 2), ("old_session", 0)],
            last_record_age: Some(Duration::from_millis(1500)),
            peer_record_ages: vec![("node 2 pid 7".into(), Duration::from_millis(250))],
            ..Values::default()
        };
        let text = render(&v);
        let mut families: Vec<(&str, &str)> = Vec::new();
        let mut helped: Vec<&str> = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                helped.push(rest.split(' ').next().unwrap());
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert_eq!(helped.last(), Some(&name), "HELP before TYPE: {name}");
                assert!(!families.iter().any(|(n, _)| *n == name), "{name} twice");
                assert_eq!(kind == "counter", name.ends_with("_total"), "{name} {kind}");
                families.push((name, kind));
            } else {
                let name = line.split(['{', ' ']).next().unwrap();
                let (family, kind) = families.last().copied().unwrap();
                let own = match kind {
                    "histogram" => ["_bucket", "_sum", "_count"].iter().any(|s| name == format!("{family}{s}")),
                    _ => name == family,
                };
                assert!(own, "a sample out of its family {family}: {line}");
                let value = line.rsplit(' ').next().unwrap();
                assert!(value.parse::<f64>().is_ok(), "{line}");
            }
        }
        assert!(text.contains("xfrmsync_sync_role{role=\"standby\"} 1\nxfrmsync_sync_role{role=\"replaced\"} 0\n"));
        assert!(text.contains("xfrmsync_sync_role{role=\"active\"} 0\n"));
        assert!(text.contains("xfrmsync_sync_link_packets_dropped_total{reason=\"auth_failed\"} 2\n"));
        assert!(text.contains("xfrmsync_sync_last_record_age_seconds 1.5\n"));
        assert!(text.contains("xfrmsync_sync_peer_record_age_seconds{peer=\"node 2 pid 7\"} 0.25\n"));
        // Absent before any: the family's lines, no sample.
        assert!(text.contains("# TYPE xfrmsync_sync_peer_heartbeat_age_seconds gauge\n# HELP"));
        assert!(text.contains("xfrmsync_sync_last_commit_sas{outcome=\"needs_rekey\"} 0\n"));
    }

    #[test]
    fn the_cpg_families_are_absent_on_the_udp_link() {
        let udp = render(&Values { role: "standby", ..Values::default() });
        for name in [
            "link_try_again_total",
            "link_queue_wait_longest_seconds",
            "link_ring_wait_longest_seconds",
            "link_queued_messages",
        ] {
            assert!(udp.contains(&format!("# TYPE xfrmsync_sync_{name} ")), "{name}");
            assert!(!udp.contains(&format!("\nxfrmsync_sync_{name} ")), "{name} has a sample:\n{udp}");
        }
        let cpg = render(&Values {
            role: "active",
            peers_heard: 2,
            cpg: Some(CpgValues {
                try_again: 7,
                queued: 3,
                queue_wait_longest: Duration::from_millis(2500),
                ring_wait_longest: Duration::from_millis(3400),
                members: 2,
                connected: true,
            }),
            ..Values::default()
        });
        for line in [
            "xfrmsync_sync_link_try_again_total 7\n",
            "xfrmsync_sync_link_queue_wait_longest_seconds 2.5\n",
            "xfrmsync_sync_link_queued_messages 3\n",
            "xfrmsync_sync_link_ring_wait_longest_seconds 3.4\n",
            "xfrmsync_sync_link_group_members 2\n",
            "xfrmsync_sync_link_connected 1\n",
            "xfrmsync_sync_peers_heard 2\n",
        ] {
            assert!(cpg.contains(line), "{line}in:\n{cpg}");
        }
    }

    #[test]
    fn the_lag_is_a_histogram_and_per_sa_series_carry_the_sa_and_its_direction() {
        let row = |sa: &str, lag| SaSeries {
            sa: sa.into(),
            direction: "out",
            record_age: Some(Duration::from_millis(250)),
            lag,
            commit_margin: None,
            needs_rekey: None,
        };
        let text = render(&Values {
            role: "standby",
            lag: LagValues {
                cumulative: [1, 1, 2, 2, 3, 3, 3, 3, 3, 3, 4],
                sum: 100_044,
                over_margin: 1,
                last_max_packets: Some(40),
                last_max_margin_ratio: Some(1.25),
                last_sample_age: Some(Duration::from_secs(2)),
                ..LagValues::default()
            },
            per_sa_limit: 2,
            per_sa: vec![row("esp dst 10.0.0.2 spi 0x0000c001", Some((40, 32))), row("esp dst \"x\"", None)],
            per_sa_omitted: 5,
            ..Values::default()
        });
        for line in [
            "# TYPE xfrmsync_sync_replication_lag_packets histogram\n\
             xfrmsync_sync_replication_lag_packets_bucket{le=\"0\"} 1\n",
            "xfrmsync_sync_replication_lag_packets_bucket{le=\"65536\"} 3\n\
             xfrmsync_sync_replication_lag_packets_bucket{le=\"+Inf\"} 4\n\
             xfrmsync_sync_replication_lag_packets_sum 100044\nxfrmsync_sync_replication_lag_packets_count 4\n",
            "xfrmsync_sync_replication_lag_over_margin_total 1\n",
            "xfrmsync_sync_replication_lag_last_max_margin_ratio 1.25\n",
            "xfrmsync_sync_metrics_per_sa_limit 2\n",
            "xfrmsync_sync_sa_series_omitted 5\n",
            "xfrmsync_sync_sa_replication_lag_packets{sa=\"esp dst 10.0.0.2 spi 0x0000c001\",direction=\"out\"} 40\n",
            "xfrmsync_sync_sa_replication_margin_packets{sa=\"esp dst 10.0.0.2 spi 0x0000c001\",direction=\"out\"} 32\n",
            "xfrmsync_sync_sa_record_age_seconds{sa=\"esp dst \\\"x\\\"\",direction=\"out\"} 0.25\n",
        ] {
            assert!(text.contains(line), "{line}in:\n{text}");
        }
        assert!(
            !text.contains("xfrmsync_sync_sa_replication_lag_packets{sa=\"esp dst \\\"x"),
            "a series without a sample"
        );
        assert!(!text.contains("\nxfrmsync_sync_sa_needs_rekey{"), "no commit, no series");
    }

    #[test]
    fn requests_are_read_as_http() {
        assert_eq!(request(b"GET /metrics HTTP/1.1\r\nHost: x\r\n"), None);
        assert_eq!(request(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"), Some(Asked::Metrics));
        assert_eq!(request(b"GET /metrics?x=1 HTTP/1.0\n\n"), Some(Asked::Metrics));
        assert_eq!(request(b"GET / HTTP/1.1\r\n\r\n"), Some(Asked::NotFound));
        assert_eq!(request(b"POST /metrics HTTP/1.1\r\n\r\n"), Some(Asked::BadMethod));
        assert_eq!(request(b"GET /metrics\r\n\r\n"), Some(Asked::Bad));
        assert_eq!(request(b"\xff\xfe\r\n\r\n"), Some(Asked::Bad));
    }
}
