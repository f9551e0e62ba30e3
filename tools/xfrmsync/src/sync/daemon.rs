//! The `xfrmsync sync` daemon: the library's sync engine on one node, the
//! link to the other nodes (link.rs: UDP to one peer, or a CPG group), and
//! the control socket, in one poll loop.
//!
//! Roles, given from outside (the cluster manager, or the config at start):
//! - **standby**: holds the latest record of every SA (records of an epoch
//!   below the highest known are ignored), asks the active node for a
//!   snapshot when it starts and when the active node restarts;
//! - **active**: sends a record for every SA as its counters move, every
//!   SA again each refresh period, and a snapshot when a standby asks or a
//!   peer appears (the UDP peer restarted; a member joined the CPG group,
//!   which has no state transfer of its own);
//! - **replaced**: was active, and learned of a higher epoch (the standby
//!   committed): it sends nothing more, optionally deletes its outbound
//!   SAs, and keeps records like a standby, so that it can take over again.
//!
//! `commit` is the takeover: the epoch above every one known is kept in
//! the state file first (a node must never reuse an epoch, even after a
//! restart), then the records are written into the kernel, then the node
//! is active at that epoch and says so in its heartbeats, so that an old
//! active node that hears it stops.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use xfrmsync::registry::Direction;
use xfrmsync::sync::{
    moving_number, now_ms, Active, ActiveConfig, CommitOptions, Departure, Outcome, Outgoing, Received, Standby,
    SyncRecord,
};
use xfrmsync::{Error, Handle, SaId};

use super::config::{OnReplaced, Role, SyncConfig};
use super::control::{self, Reply, Request};
use super::lag::{LagTracker, SaLag};
use super::link::{Link, PeerId};
use super::metrics;
use super::transport::Kind;
use crate::sys;

/// What the node is now.
enum Node {
    Standby(Standby),
    Active(Box<Active>),
    /// Replaced by a node at epoch `by`: keeps records, sends none.
    Replaced {
        standby: Standby,
        by: u64,
    },
}

impl Node {
    fn name(&self) -> &'static str {
        match self {
            Node::Standby(_) => "standby",
            Node::Active(_) => "active",
            Node::Replaced { .. } => "replaced",
        }
    }

    fn wire(&self) -> u8 {
        match self {
            Node::Standby(_) => 0,
            Node::Active(_) => ACTIVE_WIRE,
            Node::Replaced { .. } => 2,
        }
    }
}

/// The last commit's outcome for one SA, for status.
#[derive(Debug, Clone)]
struct Committed {
    /// `written`, `needs_rekey`, `mismatch` or `failed`.
    kind: &'static str,
    direction: Option<Direction>,
    synced: Option<u64>,
    written: Option<u64>,
    margin: Option<u64>,
    record_age_ms: u64,
    rate_per_ks: u64,
    outcome: String,
}

/// Records taken, by what became of them.
#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    records_sent: u64,
    departures_sent: u64,
    records_received: u64,
    records_held: u64,
    rejected_older: u64,
    rejected_lower_epoch: u64,
    rejected_malformed: u64,
    ignored_while_active: u64,
    snapshots_asked: u64,
    snapshots_served: u64,
    snapshots_done: u64,
    commits: u64,
    samples_sent: u64,
}

/// One SA's records, for status.
#[derive(Debug, Default, Clone, Copy)]
struct PerSa {
    sent: u64,
    received: u64,
    held: u64,
    older: u64,
    lower_epoch: u64,
}

/// The most peers whose heartbeats are kept: CPG's most members of a
/// group. A member's entry goes when it leaves; beyond this, the one heard
/// least recently makes room.
const PEERS_KEPT: usize = super::cpg::CPG_MEMBERS_MAX;

/// What a peer's heartbeat said last.
#[derive(Debug, Clone, Copy)]
struct PeerHeard {
    role: u8,
    epoch: u64,
    at: Instant,
}

pub struct Daemon {
    config: SyncConfig,
    netns: Option<PathBuf>,
    rules: Vec<xfrmsync::Rule>,
    link: Link,
    control: UnixListener,
    /// For commits and reading SAs; the active side opens its own.
    handle: Handle,
    node: Node,
    /// The highest epoch this node knows of, kept in the state file.
    epoch: u64,
    counts: Counts,
    per_sa: HashMap<SaId, PerSa>,
    committed: HashMap<SaId, Committed>,
    /// Each peer's last heartbeat, by sender.
    peers: HashMap<PeerId, PeerHeard>,
    next_heartbeat: Instant,
    /// A snapshot is being sent; `SnapshotDone` follows its last record.
    serving_snapshot: bool,
    records_out: Vec<u8>,
    departures_out: Vec<u8>,
    /// `--metrics`: the Prometheus endpoint.
    metrics: Option<metrics::Endpoint>,
    /// Times `epoch` rose.
    epoch_changes: u64,
    /// Event-socket overruns of the active sides this node had before the one now.
    events_lost_before: u64,
    /// When the newest record from the peer arrived.
    last_record_at: Option<Instant>,
    /// When the newest record from each peer arrived; a peer that left the
    /// group goes, and at most [`PEERS_KEPT`] are kept, like heartbeats.
    record_from: HashMap<PeerId, Instant>,
    /// The standby's measure of how far behind its records are.
    lag: LagTracker,
    /// When the active side next samples its kernel for the standbys.
    next_sample: Instant,
}

/// The heartbeat's payload: version, role, 6 bytes 0, the epoch.
const HEARTBEAT_LEN: usize = 16;
/// The heartbeat's role byte of an active node (`Node::wire`).
const ACTIVE_WIRE: u8 = 1;

impl Daemon {
    pub fn start(
        config: SyncConfig,
        netns: Option<PathBuf>,
        rules: Vec<xfrmsync::Rule>,
        link: Link,
    ) -> Result<Daemon, String> {
        let epoch = read_epoch(&config.state_file)?;
        let control = control::listen(&config.control_socket)
            .map_err(|e| format!("{}: control socket: {e}", config.control_socket.display()))?;
        let handle = open(netns.as_deref(), false)?;
        let metrics = match config.metrics {
            Some(addr) => Some(metrics::Endpoint::bind(addr).map_err(|e| format!("metrics {addr}: {e}"))?),
            None => None,
        };
        let mut daemon = Daemon {
            node: Node::Standby(Standby::new(epoch)),
            config,
            netns,
            rules,
            link,
            control,
            handle,
            epoch,
            counts: Counts::default(),
            per_sa: HashMap::new(),
            committed: HashMap::new(),
            peers: HashMap::new(),
            next_heartbeat: Instant::now(),
            serving_snapshot: false,
            records_out: Vec::new(),
            departures_out: Vec::new(),
            metrics,
            epoch_changes: 0,
            events_lost_before: 0,
            last_record_at: None,
            record_from: HashMap::new(),
            lag: LagTracker::default(),
            next_sample: Instant::now(),
        };
        match daemon.config.role {
            Role::Active => daemon.become_active()?,
            Role::Standby => daemon.ask_snapshot(),
        }
        Ok(daemon)
    }

    fn say(&self, text: &str) {
        crate::output::line(&format!("xfrmsync sync: {text}"));
    }

    /// Runs until SIGTERM or SIGINT.
    pub fn run(&mut self, signals: &sys::Signals) -> Result<(), String> {
        self.say(&format!(
            "ready: {} at epoch {}, {}, control {}",
            self.node.name(),
            self.epoch,
            self.link.describe(),
            self.config.control_socket.display()
        ));
        if let Some(Ok(addr)) = self.metrics.as_ref().map(metrics::Endpoint::local_addr) {
            self.say(&format!("metrics on http://{addr}/metrics"));
        }
        loop {
            let now = Instant::now();
            let mut until = self.next_heartbeat;
            if let Some(t) = self.link.next_deadline() {
                until = until.min(t);
            }
            let active_fd = match &self.node {
                Node::Active(active) if !self.link_busy() => {
                    until = until.min(active.next_due());
                    if self.config.active.lag_sample_sas > 0 {
                        until = until.min(self.next_sample);
                    }
                    active.registry().handle().as_raw_fd()
                }
                Node::Active(_) => {
                    // Waiting for acks before sending more.
                    until = until.min(now + Duration::from_millis(10));
                    -1
                }
                _ => -1,
            };
            let mut fds: [RawFd; 4 + 1 + metrics::CLIENTS] = [-1; 4 + 1 + metrics::CLIENTS];
            fds[..4].copy_from_slice(&[self.link.fd(), self.control.as_raw_fd(), signals.as_raw_fd(), active_fd]);
            if let Some(endpoint) = &self.metrics {
                fds[4..].copy_from_slice(&endpoint.fds());
                until = endpoint.next_deadline().map_or(until, |t| until.min(t));
            }
            let ready = sys::wait_readable(fds, Some(until)).map_err(|e| format!("poll: {e}"))?;
            let [link, control, signal, events] = [ready[0], ready[1], ready[2], ready[3]];
            if signal {
                while let Some(s) = signals.next().map_err(|e| format!("reading signals: {e}"))? {
                    if s != libc::SIGHUP {
                        self.say(&format!("{}: exiting", sys::signal_name(s)));
                        return Ok(());
                    }
                }
            }
            if link {
                self.receive();
            }
            if let Err(e) = self.link.on_timer(Instant::now()) {
                log::warn!("sync link: {e}");
            }
            // Losing corosync, found by a send or the timer, forgets its members.
            self.take_membership();
            let due = matches!(&self.node, Node::Active(a) if a.next_due() <= Instant::now());
            if (events || due) && !self.link_busy() {
                self.dispatch();
            }
            if self.sampling() && Instant::now() >= self.next_sample && !self.link_busy() {
                self.send_samples();
            }
            if Instant::now() >= self.next_heartbeat {
                self.heartbeat();
            }
            if control {
                self.serve_control();
            }
            if let Some(mut endpoint) = self.metrics.take() {
                endpoint.process(&ready[4..], Instant::now(), &mut || self.metrics_values());
                self.metrics = Some(endpoint);
            }
        }
    }

    /// What `--metrics` shows (metrics.rs says what each is).
    fn metrics_values(&self) -> metrics::Values {
        let c = &self.counts;
        let mut last_commit = [0u64; 4];
        for committed in self.committed.values() {
            if let Some(at) = metrics::OUTCOMES.iter().position(|o| *o == committed.kind) {
                last_commit[at] += 1;
            }
        }
        let margins = self.committed.values().filter_map(|c| c.margin);
        let (records_held, events_lost) = match &self.node {
            Node::Standby(standby) | Node::Replaced { standby, .. } => (standby.len() as u64, 0),
            Node::Active(active) => (0, active.stats().events_lost),
        };
        let mut values = metrics::Values {
            role: self.node.name(),
            epoch: self.epoch,
            epoch_changes: self.epoch_changes,
            records_sent: c.records_sent,
            records_received: c.records_received,
            rejected_older: c.rejected_older,
            rejected_lower_epoch: c.rejected_lower_epoch,
            rejected_malformed: c.rejected_malformed,
            departures_sent: c.departures_sent,
            resyncs_asked: c.snapshots_asked,
            resyncs_served: c.snapshots_served,
            resyncs_completed: c.snapshots_done,
            commits: c.commits,
            last_commit,
            last_commit_margin_min: margins.clone().min(),
            last_commit_margin_max: margins.max(),
            records_held,
            last_record_age: self.last_record_at.map(|t| t.elapsed()),
            peer_record_ages: by_id(&self.record_from)
                .into_iter()
                .map(|(id, at)| (id.to_string(), at.elapsed()))
                .collect(),
            peer_heartbeat_age: self.newest_peer().map(|(_, p)| p.at.elapsed()),
            peers_heard: self.peers.len() as u64,
            events_lost: self.events_lost_before + events_lost,
            samples_sent: c.samples_sent,
            lag: self.lag_values(),
            per_sa_limit: self.config.metrics_per_sa as u64,
            ..metrics::Values::default()
        };
        if self.config.metrics_per_sa > 0 {
            let rows = self.sa_rows();
            values.per_sa_omitted = rows.len().saturating_sub(self.config.metrics_per_sa) as u64;
            values.per_sa = rows.iter().take(self.config.metrics_per_sa).map(SaRow::series).collect();
        }
        self.link.metrics(&mut values);
        values
    }

    fn lag_values(&self) -> metrics::LagValues {
        let lag = &self.lag;
        metrics::LagValues {
            cumulative: lag.cumulative(),
            sum: lag.sum,
            not_held: lag.not_held,
            over_margin: lag.over_margin,
            last_max_packets: lag.last.map(|b| b.max_packets),
            last_max_margin_ratio: lag.last.map(|b| b.max_margin_ratio),
            last_sample_age: lag.last.map(|b| b.at.elapsed()),
        }
    }

    /// The node is `node` from now on; an active side's counts are kept.
    fn set_node(&mut self, node: Node) {
        if let Node::Active(active) = &self.node {
            self.events_lost_before += active.stats().events_lost;
        }
        if let Node::Active(_) = &node {
            self.lag.forget_every_sa();
            self.next_sample = Instant::now() + self.config.active.lag_sample;
        }
        self.node = node;
    }

    /// Whether this node samples its kernel for the standbys now.
    fn sampling(&self) -> bool {
        self.config.active.lag_sample_sas > 0 && matches!(self.node, Node::Active(_))
    }

    /// Reads the next SAs' kernel state and sends it to the standbys, in
    /// messages of the link's size; unreliably, since the next samples say
    /// more than a late one.
    fn send_samples(&mut self) {
        self.next_sample = Instant::now() + self.config.active.lag_sample;
        let Node::Active(active) = &mut self.node else { return };
        let samples = active.sample(self.config.active.lag_sample_sas);
        let max = self.link.max_payload();
        let mut messages = vec![Vec::new()];
        for sample in &samples {
            let last = messages.last_mut().expect("one at least");
            if !last.is_empty() && last.len() + sample.encoded_len() > max {
                messages.push(Vec::new());
            }
            if sample.encode(messages.last_mut().expect("one at least")).is_ok() {
                self.counts.samples_sent += 1;
            }
        }
        let now = Instant::now();
        for payload in messages.iter().filter(|m| !m.is_empty()) {
            if let Err(e) = self.link.send_unreliable(Kind::Samples, payload, now) {
                log::debug!("sync link: sending samples: {e}");
            }
        }
    }

    /// A standby compares the active node's samples with its records; an
    /// active node has none to compare.
    fn take_samples(&mut self, mut payload: &[u8]) {
        let mut samples = Vec::new();
        while !payload.is_empty() {
            let Ok((sample, used)) = SyncRecord::decode_prefix(payload) else {
                self.counts.rejected_malformed += 1;
                return;
            };
            payload = &payload[used..];
            samples.push(sample);
        }
        if let Node::Standby(standby) | Node::Replaced { standby, .. } = &self.node {
            self.lag.take(standby, &samples, &self.config.standby.margin, Instant::now());
        }
    }

    /// The link holds many unacknowledged messages: sending more would
    /// only see the oldest given up.
    fn link_busy(&self) -> bool {
        !self.link.ready()
    }

    fn heartbeat(&mut self) {
        let mut payload = [0u8; HEARTBEAT_LEN];
        payload[0] = 1;
        payload[1] = self.node.wire();
        payload[8..].copy_from_slice(&self.epoch.to_be_bytes());
        if let Err(e) = self.link.send_unreliable(Kind::Heartbeat, &payload, Instant::now()) {
            log::debug!("heartbeat: {e}");
        }
        self.next_heartbeat = Instant::now() + self.config.link.heartbeat;
    }

    fn receive(&mut self) {
        let mut messages: Vec<(PeerId, Kind, Vec<u8>)> = Vec::new();
        if let Err(e) = self.link.receive(|from, kind, payload| messages.push((from, kind, payload.to_vec()))) {
            log::warn!("sync link: {e}");
        }
        self.take_membership();
        for (from, kind, payload) in messages {
            match kind {
                Kind::Records => self.take_records(from, &payload),
                Kind::Gone => self.take_departures(&payload),
                Kind::SnapshotRequest => {
                    if let Err(e) = self.serve_snapshot() {
                        log::warn!("snapshot for the peer: {e}");
                    }
                }
                Kind::SnapshotDone => self.counts.snapshots_done += 1,
                Kind::Heartbeat => self.take_heartbeat(from, &payload),
                Kind::Samples => self.take_samples(&payload),
            }
        }
    }

    /// Peers that appeared get everything (a standby that restarted or
    /// joined knows nothing); peers that left are forgotten.
    fn take_membership(&mut self) {
        let changes = self.link.take_changes();
        for peer in &changes.left {
            self.peers.remove(peer);
            self.record_from.remove(peer);
            self.say(&format!("{peer} left the group"));
        }
        if changes.joined.is_empty() {
            return;
        }
        for joined in &changes.joined {
            if joined.restarted {
                self.say("the peer restarted");
            } else if self.link.is_group() {
                self.say(&format!("{} appeared in the group", joined.peer));
            }
        }
        // One snapshot answers every peer that appeared at once.
        if let Err(e) = self.serve_snapshot() {
            log::warn!("snapshot for the peer: {e}");
        }
    }

    /// The peer heard most recently.
    fn newest_peer(&self) -> Option<(&PeerId, &PeerHeard)> {
        self.peers.iter().max_by_key(|(_, p)| p.at)
    }

    /// On the active node, sends every SA again, `SnapshotDone` after the
    /// last; elsewhere nothing.
    fn serve_snapshot(&mut self) -> Result<(), Error> {
        let Node::Active(active) = &mut self.node else { return Ok(()) };
        self.counts.snapshots_served += 1;
        self.serving_snapshot = true;
        active.snapshot()
    }

    fn take_heartbeat(&mut self, from: PeerId, payload: &[u8]) {
        if payload.len() != HEARTBEAT_LEN || payload[0] != 1 {
            self.counts.rejected_malformed += 1;
            return;
        }
        let epoch = u64::from_be_bytes(payload[8..].try_into().expect("8 bytes"));
        make_room(&mut self.peers, &from, |p| p.at);
        let role = payload[1];
        self.peers.insert(from, PeerHeard { role, epoch, at: Instant::now() });
        // Only an active node's higher epoch means it took over; a standby
        // that knows a higher one (from an earlier takeover this node's
        // state file missed, or one of its own before a restart) would
        // refuse this node's records: move above it instead.
        if role != ACTIVE_WIRE && epoch > self.epoch && matches!(self.node, Node::Active(_)) {
            self.outrank(epoch);
        } else {
            self.learn_epoch(epoch);
        }
    }

    /// The active node moves to the epoch above `epoch`, kept in the state
    /// file first like a commit's, and sends every SA again at it.
    fn outrank(&mut self, epoch: u64) {
        let Node::Active(active) = &mut self.node else { return };
        let above = epoch + 1;
        if let Err(e) = write_epoch(&self.config.state_file, above) {
            log::error!("not moving above a standby's epoch {epoch}: {e}");
            return;
        }
        if active.raise_epoch(above) {
            self.say(&format!("a standby knew epoch {epoch}, above this node's {}: now active at {above}", self.epoch));
            self.epoch = above;
            self.epoch_changes += 1;
            if let Err(e) = self.serve_snapshot() {
                log::warn!("snapshot at the new epoch: {e}");
            }
        }
    }

    /// Another node holds `epoch`: above this node's own while active, it
    /// took over, and this node was replaced.
    fn learn_epoch(&mut self, epoch: u64) {
        if epoch <= self.epoch {
            return;
        }
        self.epoch = epoch;
        self.epoch_changes += 1;
        if let Err(e) = write_epoch(&self.config.state_file, epoch) {
            log::error!("{e}");
        }
        match &mut self.node {
            Node::Active(active) => {
                active.learn_epoch(epoch);
                eprintln!(
                    "xfrmsync sync: REPLACED: the peer took over at epoch {epoch}; this node stops sending records. \
                     Two nodes sending on one SA reuse its sequence numbers (with GCM, its nonces): make sure this \
                     node's cluster manager has stopped its service."
                );
                if self.config.standby.on_replaced == OnReplaced::DeleteOutbound {
                    match active.delete_outbound() {
                        Ok(deleted) => {
                            let failed = deleted.iter().filter(|(_, r)| r.is_err()).count();
                            eprintln!(
                                "xfrmsync sync: REPLACED: deleted {} outbound SAs ({failed} failed)",
                                deleted.len() - failed
                            );
                        }
                        Err(e) => eprintln!("xfrmsync sync: REPLACED: listing the outbound SAs to delete: {e}"),
                    }
                }
                self.set_node(Node::Replaced { standby: Standby::new(epoch), by: epoch });
            }
            Node::Standby(standby) | Node::Replaced { standby, .. } => standby.learn_epoch(epoch),
        }
    }

    fn take_records(&mut self, from: PeerId, mut payload: &[u8]) {
        make_room(&mut self.record_from, &from, |at| *at);
        self.record_from.insert(from, Instant::now());
        while !payload.is_empty() {
            let (record, used) = match SyncRecord::decode_prefix(payload) {
                Ok(decoded) => decoded,
                Err(e) => {
                    log::warn!("sync link: a records message refused: {e}");
                    self.counts.rejected_malformed += 1;
                    return;
                }
            };
            payload = &payload[used..];
            self.counts.records_received += 1;
            self.last_record_at = Some(Instant::now());
            if record.epoch > self.epoch {
                self.learn_epoch(record.epoch);
            }
            let standby = match &mut self.node {
                Node::Standby(standby) | Node::Replaced { standby, .. } => standby,
                Node::Active(_) => {
                    self.counts.ignored_while_active += 1;
                    continue;
                }
            };
            let per_sa = self.per_sa.entry(record.sa).or_default();
            per_sa.received += 1;
            match standby.receive(record) {
                Err(e) => {
                    log::warn!("sync link: a record refused: {e}");
                    self.counts.rejected_malformed += 1;
                }
                Ok(Received::Held) => {
                    self.counts.records_held += 1;
                    per_sa.held += 1;
                }
                Ok(Received::Older) => {
                    self.counts.rejected_older += 1;
                    per_sa.older += 1;
                }
                Ok(Received::LowerEpoch) => {
                    self.counts.rejected_lower_epoch += 1;
                    per_sa.lower_epoch += 1;
                }
            }
        }
    }

    fn take_departures(&mut self, mut payload: &[u8]) {
        while !payload.is_empty() {
            let Ok((departure, used)) = Departure::decode_prefix(payload) else {
                self.counts.rejected_malformed += 1;
                return;
            };
            payload = &payload[used..];
            if let Node::Standby(standby) | Node::Replaced { standby, .. } = &mut self.node {
                match standby.depart(&departure) {
                    Received::LowerEpoch => self.counts.rejected_lower_epoch += 1,
                    _ => {
                        self.per_sa.remove(&departure.sa);
                        self.lag.forget(&departure.sa);
                    }
                }
            }
        }
    }

    fn dispatch(&mut self) {
        let Node::Active(active) = &mut self.node else { return };
        let epoch = active.epoch();
        let (records, departures, per_sa) = (&mut self.records_out, &mut self.departures_out, &mut self.per_sa);
        let mut sent = (0u64, 0u64);
        let mut flushes: Vec<(Kind, Vec<u8>)> = Vec::new();
        let max = self.link.max_payload();
        let result = active.dispatch(&mut |outgoing| match outgoing {
            Outgoing::Record(record) => {
                if records.len() + record.encoded_len() > max {
                    flushes.push((Kind::Records, std::mem::take(records)));
                }
                if record.encode(records).is_ok() {
                    sent.0 += 1;
                    per_sa.entry(record.sa).or_default().sent += 1;
                }
            }
            Outgoing::Gone(sa) => {
                if departures.len() + xfrmsync::sync::DEPARTURE_LEN > max {
                    flushes.push((Kind::Gone, std::mem::take(departures)));
                }
                Departure { sa: *sa, epoch }.encode(departures);
                per_sa.remove(sa);
                sent.1 += 1;
            }
        });
        let listing_done = active.registry().relist_due().is_none();
        match result {
            Ok(_) | Err(Error::EventsLost) => {}
            Err(e) => log::warn!("sync: {e}"),
        }
        if !self.records_out.is_empty() {
            flushes.push((Kind::Records, std::mem::take(&mut self.records_out)));
        }
        if !self.departures_out.is_empty() {
            flushes.push((Kind::Gone, std::mem::take(&mut self.departures_out)));
        }
        if self.serving_snapshot && listing_done {
            self.serving_snapshot = false;
            flushes.push((Kind::SnapshotDone, Vec::new()));
        }
        self.counts.records_sent += sent.0;
        self.counts.departures_sent += sent.1;
        let now = Instant::now();
        for (kind, payload) in flushes {
            if let Err(e) = self.link.send(kind, &payload, now) {
                log::warn!("sync link: sending {kind:?}: {e}");
            }
        }
    }

    fn ask_snapshot(&mut self) {
        self.counts.snapshots_asked += 1;
        if let Err(e) = self.link.send(Kind::SnapshotRequest, &[], Instant::now()) {
            log::warn!("sync link: asking for a snapshot: {e}");
        }
    }

    fn become_active(&mut self) -> Result<(), String> {
        let handle = open(self.netns.as_deref(), true)?;
        let config = ActiveConfig {
            rules: self.rules.clone(),
            default_thresholds: self.config.active.thresholds,
            refresh: self.config.active.refresh,
        };
        let active = Active::new(handle, self.epoch, config).map_err(|e| format!("the active side: {e}"))?;
        self.set_node(Node::Active(Box::new(active)));
        self.serving_snapshot = true;
        // Said at once, so that an old active node that hears it stops.
        self.heartbeat();
        Ok(())
    }

    fn serve_control(&mut self) {
        let stream = match self.control.accept() {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) => {
                log::warn!("control socket: {e}");
                return;
            }
        };
        let reply = match control::read_request(&stream) {
            Ok(Some(request)) => self.handle_request(request),
            Ok(None) => Reply { text: "unknown request".into(), status: 2 },
            Err(e) => {
                log::warn!("control socket: {e}");
                return;
            }
        };
        if let Err(e) = control::write_reply(&stream, &reply) {
            log::warn!("control socket: {e}");
        }
    }

    fn handle_request(&mut self, request: Request) -> Reply {
        match request {
            Request::Status { json } => Reply::ok(if json { self.status_json() } else { self.status_text() }),
            Request::Resync => match &self.node {
                Node::Active(_) => match self.serve_snapshot() {
                    Ok(()) => Reply::ok("sending every SA to the peer"),
                    Err(e) => Reply::failed(format!("snapshot: {e}")),
                },
                _ => {
                    self.ask_snapshot();
                    Reply::ok("asked the peer for every SA")
                }
            },
            Request::Role(Role::Active) => match &self.node {
                Node::Active(_) => Reply::ok(format!("already active at epoch {}", self.epoch)),
                _ => match self.become_active() {
                    Ok(()) => {
                        self.say(&format!("active at epoch {} (told so, without a commit)", self.epoch));
                        Reply::ok(format!("active at epoch {}", self.epoch))
                    }
                    Err(e) => Reply::failed(e),
                },
            },
            Request::Role(Role::Standby) => {
                self.set_node(Node::Standby(Standby::new(self.epoch)));
                self.ask_snapshot();
                self.say(&format!("standby at epoch {}", self.epoch));
                Reply::ok(format!("standby at epoch {}; asked the peer for every SA", self.epoch))
            }
            Request::Commit => self.commit(),
        }
    }

    /// The takeover (see the module's text).
    fn commit(&mut self) -> Reply {
        let standby = match &mut self.node {
            Node::Standby(standby) | Node::Replaced { standby, .. } => standby,
            Node::Active(_) => return Reply::failed(format!("already active at epoch {}", self.epoch)),
        };
        let epoch = standby.epoch().max(self.epoch) + 1;
        if let Err(e) = write_epoch(&self.config.state_file, epoch) {
            return Reply::failed(format!("not committed: {e}"));
        }
        standby.learn_epoch(epoch - 1);
        let options =
            CommitOptions { margin: self.config.standby.margin, inbound: self.config.standby.inbound, now_ms: None };
        let started = Instant::now();
        let commit = match standby.commit(&self.handle, &options) {
            Ok(commit) => commit,
            Err(e) => return Reply::failed(format!("not committed: {e}")),
        };
        let took = started.elapsed();
        if commit.epoch > self.epoch {
            self.epoch_changes += 1;
        }
        self.epoch = commit.epoch;
        self.counts.commits += 1;
        let mut text = String::new();
        let mut failed = 0;
        self.committed.clear();
        for sa in &commit.sas {
            let dir = direction_name(sa.direction);
            let (kind, line, synced, written, margin) = match &sa.outcome {
                Outcome::Written { synced, local, written, margin } => (
                    "written",
                    format!(
                        "written: synced {synced}, local {local}, now {written} (margin {margin}, record {} ms old)",
                        sa.record_age_ms
                    ),
                    Some(*synced),
                    Some(*written),
                    Some(*margin),
                ),
                Outcome::NeedsRekey { synced, next, margin } => (
                    "needs_rekey",
                    format!(
                        "NEEDS REKEY: synced {synced} + margin {margin} = {next} passes 2^32 - 1 without ESN; not \
                         written"
                    ),
                    Some(*synced),
                    None,
                    Some(*margin),
                ),
                Outcome::Mismatch(m) => {
                    failed += 1;
                    ("mismatch", format!("not written: the record does not fit the local SA ({m:?})"), None, None, None)
                }
                Outcome::Failed(e) => {
                    failed += 1;
                    ("failed", format!("FAILED: {e}"), None, None, None)
                }
            };
            let _ = writeln!(text, "{} {dir}: {line}", sa.sa);
            let committed = Committed {
                kind,
                direction: sa.direction,
                synced,
                written,
                margin,
                record_age_ms: sa.record_age_ms,
                rate_per_ks: sa.rate_per_ks,
                outcome: line,
            };
            self.committed.insert(sa.sa, committed);
        }
        for sa in &commit.missing_locally {
            let _ = writeln!(text, "{sa}: a record, but no such SA here; nothing written");
        }
        let _ = writeln!(
            text,
            "commit: {} of {} SAs written in {:.1} ms; epoch {}",
            commit.written(),
            commit.sas.len(),
            took.as_secs_f64() * 1000.0,
            commit.epoch
        );
        if let Err(e) = self.become_active() {
            let _ = writeln!(text, "committed, but the active side did not start: {e}");
            return Reply::failed(text);
        }
        self.say(&format!("committed {} SAs; active at epoch {}", commit.written(), self.epoch));
        if failed > 0 {
            Reply::failed(text)
        } else {
            Reply::ok(text)
        }
    }

    fn status_text(&self) -> String {
        let mut text = String::new();
        let _ = writeln!(text, "role: {} at epoch {}", self.node.name(), self.epoch);
        if let Node::Replaced { by, .. } = &self.node {
            let _ = writeln!(text, "REPLACED by a node at epoch {by}: sending nothing");
        }
        if self.link.is_group() {
            let _ = writeln!(text, "peers: {} heard", self.peers.len());
            for (id, p) in self.peer_rows() {
                let _ = writeln!(
                    text,
                    "peer {id}: {} at epoch {}, heard {} ms ago",
                    role_name(p.role),
                    p.epoch,
                    p.at.elapsed().as_millis()
                );
            }
        } else {
            match self.newest_peer() {
                Some((_, p)) => {
                    let _ = writeln!(
                        text,
                        "peer: {} at epoch {}, heard {} ms ago",
                        role_name(p.role),
                        p.epoch,
                        p.at.elapsed().as_millis()
                    );
                }
                None => {
                    let _ = writeln!(text, "peer: not heard");
                }
            }
        }
        let c = &self.counts;
        let _ = writeln!(
            text,
            "records: sent {}, received {}, held {}, rejected {} (older {}, lower epoch {}, malformed {}), \
             departures sent {}",
            c.records_sent,
            c.records_received,
            c.records_held,
            c.rejected_older + c.rejected_lower_epoch + c.rejected_malformed,
            c.rejected_older,
            c.rejected_lower_epoch,
            c.rejected_malformed,
            c.departures_sent
        );
        let _ = writeln!(
            text,
            "resyncs: asked {}, served {}, completed {}; commits {}",
            c.snapshots_asked, c.snapshots_served, c.snapshots_done, c.commits
        );
        let _ = writeln!(text, "{}", self.lag_status());
        let _ = writeln!(text, "{}", self.link.status_text());
        for sa in self.sa_rows() {
            let _ = writeln!(
                text,
                "{} {}: {}record {}{}; records sent {}, received {} (held {}, older {}, lower epoch {}); last commit: {}",
                sa.sa,
                direction_name(sa.direction),
                if sa.committed.as_ref().is_some_and(|c| c.kind == "needs_rekey") { "NEEDS REKEY, " } else { "" },
                sa.age_ms.map_or("none".into(), |age| format!("{age} ms old, number {}", sa.number)),
                sa.lag_text(),
                sa.counts.sent,
                sa.counts.received,
                sa.counts.held,
                sa.counts.older,
                sa.counts.lower_epoch,
                sa.committed.as_ref().map_or("none", |c| c.outcome.as_str())
            );
        }
        text
    }

    fn status_json(&self) -> String {
        let c = &self.counts;
        let sas: Vec<serde_json::Value> = self
            .sa_rows()
            .into_iter()
            .map(|sa| {
                serde_json::json!({
                    "sa": sa.sa.to_string(),
                    "direction": direction_name(sa.direction),
                    "record_age_ms": sa.age_ms,
                    "number": sa.age_ms.map(|_| sa.number),
                    "records": {
                        "sent": sa.counts.sent, "received": sa.counts.received, "held": sa.counts.held,
                        "rejected": { "older": sa.counts.older, "lower_epoch": sa.counts.lower_epoch },
                    },
                    "needs_rekey": sa.committed.as_ref().is_some_and(|c| c.kind == "needs_rekey"),
                    "lag": sa.lag.map(|l| serde_json::json!({
                        "packets": l.packets, "margin": l.margin, "sampled_ms_ago": l.at.elapsed().as_millis() as u64,
                    })),
                    "last_commit": sa.committed.as_ref().map(|c| serde_json::json!({
                        "outcome": c.kind, "synced": c.synced, "written": c.written, "margin": c.margin,
                        "record_age_ms": c.record_age_ms, "rate_per_ks": c.rate_per_ks, "text": c.outcome,
                    })),
                })
            })
            .collect();
        serde_json::json!({
            "role": self.node.name(),
            "epoch": self.epoch,
            "replaced_by": match &self.node { Node::Replaced { by, .. } => Some(*by), _ => None },
            "peer": self.newest_peer().map(|(_, p)| serde_json::json!({
                "role": role_name(p.role), "epoch": p.epoch, "heard_ms_ago": p.at.elapsed().as_millis() as u64,
            })),
            "peers": self.peer_rows().iter().map(|(id, p)| {
                let mut peer = serde_json::json!({
                    "id": id.to_string(), "role": role_name(p.role), "epoch": p.epoch,
                    "heard_ms_ago": p.at.elapsed().as_millis() as u64,
                    "last_record_ms_ago": self.record_from.get(id).map(|at| at.elapsed().as_millis() as u64),
                });
                if let PeerId::Cpg(member) = id {
                    peer["nodeid"] = member.nodeid.into();
                    peer["pid"] = member.pid.into();
                }
                peer
            }).collect::<Vec<_>>(),
            "records": {
                "sent": c.records_sent, "received": c.records_received, "held": c.records_held,
                "rejected": { "older": c.rejected_older, "lower_epoch": c.rejected_lower_epoch,
                              "malformed": c.rejected_malformed },
                "ignored_while_active": c.ignored_while_active, "departures_sent": c.departures_sent,
            },
            "resyncs": { "asked": c.snapshots_asked, "served": c.snapshots_served, "completed": c.snapshots_done },
            "commits": c.commits,
            "lag": {
                "samples_sent": c.samples_sent,
                "compared": self.lag.compared, "not_held": self.lag.not_held,
                "lower_epoch": self.lag.lower_epoch, "over_margin": self.lag.over_margin,
                "last": self.lag.last.map(|b| serde_json::json!({
                    "sampled_ms_ago": b.at.elapsed().as_millis() as u64, "sas": b.compared,
                    "max_packets": b.max_packets, "max_margin_ratio": b.max_margin_ratio,
                })),
            },
            "link": self.link.status_json(),
            "sas": sas,
        })
        .to_string()
    }

    /// The `lag:` line of status.
    fn lag_status(&self) -> String {
        let lag = &self.lag;
        if let Node::Active(_) = self.node {
            return match self.config.active.lag_sample_sas {
                0 => "lag: not sampled ([active] lag_sample_sas = 0)".into(),
                n => format!(
                    "lag: {} SA states sampled and sent, {n} every {} ms",
                    self.counts.samples_sent,
                    self.config.active.lag_sample.as_millis()
                ),
            };
        }
        let last = match lag.last {
            Some(b) => format!(
                "; last message {} ms ago: {} SAs, greatest {} packets, {:.0}% of its margin",
                b.at.elapsed().as_millis(),
                b.compared,
                b.max_packets,
                b.max_margin_ratio * 100.0
            ),
            None => "; no sample received yet".into(),
        };
        format!(
            "lag: {} samples compared, {} over the margin, {} of SAs not held, {} of a lower epoch{last}",
            lag.compared, lag.over_margin, lag.not_held, lag.lower_epoch
        )
    }

    /// Every peer heard, in the order of their ids.
    fn peer_rows(&self) -> Vec<(PeerId, PeerHeard)> {
        by_id(&self.peers)
    }

    /// One row per SA the node holds a record of or committed.
    fn sa_rows(&self) -> Vec<SaRow> {
        let now = now_ms();
        let mut rows: HashMap<SaId, SaRow> = HashMap::new();
        if let Node::Standby(standby) | Node::Replaced { standby, .. } = &self.node {
            for record in standby.records() {
                let number = moving_number(&record.replay, record.direction);
                rows.insert(
                    record.sa,
                    SaRow {
                        sa: record.sa,
                        direction: record.direction,
                        age_ms: Some(now.saturating_sub(record.sent_at_ms)),
                        number,
                        counts: PerSa::default(),
                        committed: None,
                        lag: self.lag.of(&record.sa),
                    },
                );
            }
        }
        for (sa, counts) in &self.per_sa {
            let row = rows.entry(*sa).or_insert(SaRow {
                sa: *sa,
                direction: None,
                age_ms: None,
                number: 0,
                counts: PerSa::default(),
                committed: None,
                lag: None,
            });
            row.counts = *counts;
        }
        for (sa, committed) in &self.committed {
            let row = rows.entry(*sa).or_insert(SaRow {
                sa: *sa,
                direction: committed.direction,
                age_ms: None,
                number: 0,
                counts: PerSa::default(),
                committed: None,
                lag: None,
            });
            row.committed = Some(committed.clone());
        }
        let mut rows: Vec<SaRow> = rows.into_values().collect();
        rows.sort_by_key(|r| (r.sa.daddr, r.sa.spi));
        rows
    }
}

struct SaRow {
    sa: SaId,
    direction: Option<Direction>,
    age_ms: Option<u64>,
    number: u64,
    counts: PerSa,
    committed: Option<Committed>,
    lag: Option<SaLag>,
}

impl SaRow {
    fn series(&self) -> metrics::SaSeries {
        metrics::SaSeries {
            sa: self.sa.to_string(),
            direction: self.direction.map_or("unknown", |d| d.name()),
            record_age: self.age_ms.map(Duration::from_millis),
            lag: self.lag.map(|l| (l.packets, l.margin)),
            commit_margin: self.committed.as_ref().and_then(|c| c.margin),
            needs_rekey: self.committed.as_ref().map(|c| c.kind == "needs_rekey"),
        }
    }

    /// The last sample's lag, for status.
    fn lag_text(&self) -> String {
        match self.lag {
            Some(l) => format!("; lag {} of margin {} ({} ms ago)", l.packets, l.margin, l.at.elapsed().as_millis()),
            None => String::new(),
        }
    }
}

/// A per-peer table's entries, in the order of the peers' ids.
fn by_id<V: Copy>(table: &HashMap<PeerId, V>) -> Vec<(PeerId, V)> {
    let mut rows: Vec<(PeerId, V)> = table.iter().map(|(id, v)| (*id, *v)).collect();
    rows.sort_by_key(|(id, _)| *id);
    rows
}

/// Before `peer` enters a per-peer table that holds [`PEERS_KEPT`] already,
/// the entry of the peer heard least recently (by `at`) makes room.
fn make_room<V>(table: &mut HashMap<PeerId, V>, peer: &PeerId, at: impl Fn(&V) -> Instant) {
    if table.contains_key(peer) || table.len() < PEERS_KEPT {
        return;
    }
    if let Some(stalest) = table.iter().min_by_key(|(_, v)| at(v)).map(|(id, _)| *id) {
        table.remove(&stalest);
    }
}

fn direction_name(direction: Option<Direction>) -> &'static str {
    direction.map_or("dir?", |d| d.name())
}

fn role_name(role: u8) -> &'static str {
    match role {
        0 => "standby",
        1 => "active",
        2 => "replaced",
        _ => "unknown",
    }
}

fn open(netns: Option<&Path>, events: bool) -> Result<Handle, String> {
    let mut builder = Handle::builder().events(events);
    if let Some(path) = netns {
        builder = builder.netns_path(path);
    }
    builder.open().map_err(|e| format!("opening XFRM netlink: {e}"))
}

/// The epoch kept in the state file; 0 when there is none yet.
pub fn read_epoch(path: &Path) -> Result<u64, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            text.lines().find_map(|l| l.strip_prefix("epoch ")).and_then(|n| n.trim().parse().ok()).ok_or_else(|| {
                format!("{}: no 'epoch N' line; remove the file only if this node never committed", path.display())
            })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// Keeps `epoch` in the state file, durably (written aside, synced, then
/// renamed over), before the node acts on it.
pub fn write_epoch(path: &Path, epoch: u64) -> Result<(), String> {
    use std::io::Write;
    let fail = |e: io::Error| format!("{}: keeping epoch {epoch}: {e}", path.display());
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(fail)?;
    }
    let aside = path.with_extension("new");
    let mut file = std::fs::File::create(&aside).map_err(fail)?;
    file.write_all(format!("epoch {epoch}\n").as_bytes()).map_err(fail)?;
    file.sync_all().map_err(fail)?;
    std::fs::rename(&aside, path).map_err(fail)?;
    if let Some(dir) = path.parent() {
        if let Ok(dir) = std::fs::File::open(dir) {
            let _ = dir.sync_all();
        }
    }
    Ok(())
}
