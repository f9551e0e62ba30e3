//! `xfrmsync sync`: the HA sync daemon (issue 13), a client of the
//! library's engine (`xfrmsync::sync`) with a link of its own (its UDP
//! transport, or a Corosync CPG group), and the commands that steer a
//! running daemon.

pub mod config;
pub mod control;
pub mod cpg;
pub mod cpg_link;
pub mod daemon;
pub mod key;
pub mod lag;
pub mod link;
pub mod metrics;
pub mod transport;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Subcommand, ValueEnum};

use crate::{output, rules_file, sys, Failure, Global, Outcome};
use config::{LinkTransport, Role};
use control::Request;

/// Where the daemon looks for its config when none is named.
pub const DEFAULT_CONFIG: &str = "/etc/xfrmsync/sync.toml";

#[derive(clap::Args)]
pub struct Args {
    /// The daemon's config file (format: tools/xfrmsync/sync.example.toml)
    #[arg(long, global = true, value_name = "FILE", default_value = DEFAULT_CONFIG)]
    config: PathBuf,
    /// Reach the daemon at this control socket rather than the config's
    #[arg(long, global = true, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Serve Prometheus metrics on http://ADDR:PORT/metrics (the daemon;
    /// overrides the config's `metrics`)
    #[arg(long, value_name = "ADDR:PORT", value_parser = config::parse_metrics_addr)]
    metrics: Option<std::net::SocketAddr>,
    /// Give at most this many SAs series of their own in the metrics (the
    /// daemon; overrides the config's `metrics_per_sa`; 0: none)
    #[arg(long, value_name = "SAS", value_parser = clap::value_parser!(u32).range(0..=config::METRICS_PER_SA_MOST as i64))]
    metrics_per_sa: Option<u32>,
    #[command(subcommand)]
    action: Option<Action>,
}

#[derive(Subcommand)]
enum Action {
    /// Tell the running daemon its role (the cluster manager's word)
    Role {
        #[arg(value_enum)]
        role: RoleArg,
    },
    /// Take over: write every record held into this node's SAs, then act
    /// as the active node at a higher epoch; prints per SA what it wrote
    Commit,
    /// Ask the active node for every SA's record again (or, on the active
    /// node, send them)
    Resync,
    /// Show the role, epochs, counters and, per SA, the last record's age,
    /// the last commit's margin and any SA that needs a rekey
    Status {
        /// One JSON object
        #[arg(long)]
        json: bool,
    },
    /// Write a new key file for the sync link (mode 0600); copy it to the
    /// other node over a channel you trust
    Keygen {
        file: PathBuf,
        /// Replace an existing file
        #[arg(long)]
        force: bool,
    },
    /// Check the config file and print what it says, then exit
    Check,
}

#[derive(Clone, Copy, ValueEnum)]
enum RoleArg {
    Active,
    Standby,
}

pub fn run(global: &Global, args: &Args) -> Outcome {
    let request = match &args.action {
        None => return run_daemon(global, args),
        Some(Action::Keygen { file, force }) => {
            let key = key::Key::generate().map_err(Failure::new)?;
            key.write_new(file, *force).map_err(Failure::new)?;
            output::line(&format!("xfrmsync sync: a new key in {} (mode 0600)", file.display()));
            return Ok(());
        }
        Some(Action::Check) => {
            let config = config::load(&args.config).map_err(Failure::new)?;
            output::line(&format!("{}: ok\n{config:#?}", args.config.display()));
            return Ok(());
        }
        Some(Action::Role { role: RoleArg::Active }) => Request::Role(Role::Active),
        Some(Action::Role { role: RoleArg::Standby }) => Request::Role(Role::Standby),
        Some(Action::Commit) => Request::Commit,
        Some(Action::Resync) => Request::Resync,
        Some(Action::Status { json }) => Request::Status { json: *json },
    };
    let socket = match &args.socket {
        Some(path) => path.clone(),
        None => config::load(&args.config).map_err(Failure::new)?.control_socket,
    };
    let reply = control::ask(&socket, &request, Duration::from_secs(60))
        .map_err(|e| Failure::new(format!("{}: reaching the daemon: {e}", socket.display())))?;
    if !reply.text.is_empty() {
        output::line(&reply.text);
    }
    match reply.status {
        0 => Ok(()),
        _ => Err(Failure::new(format!("xfrmsync sync {}: failed (see above)", request.line()))),
    }
}

fn run_daemon(global: &Global, args: &Args) -> Outcome {
    // Before any thread starts (the handle's netns helper is one).
    let signals = sys::Signals::take(&[libc::SIGHUP, libc::SIGTERM, libc::SIGINT])
        .map_err(|e| Failure::new(format!("taking signals: {e}")))?;
    let mut config = config::load(&args.config).map_err(Failure::new)?;
    if let Some(addr) = args.metrics {
        config.metrics = Some(addr);
    }
    if let Some(sas) = args.metrics_per_sa {
        config.metrics_per_sa = sas as usize;
    }
    if let Err(e) = xfrmsync::hz::kernel_hz_without_sa() {
        log::info!("kernel HZ not learnt before starting: {e}");
    }
    let hz = xfrmsync::timer::kernel_hz();
    if let Some(hz) = hz {
        xfrmsync::timer::ms_to_jiffies(config.active.thresholds.timer_ms, hz)
            .map_err(|e| Failure::new(format!("{}: [active] timer_ms: {e}", args.config.display())))?;
    }
    let rules = match &config.active.rules_file {
        Some(path) => rules_file::load(path, hz).map_err(Failure::new)?,
        None => Vec::new(),
    };
    let netns = config.netns.clone().or_else(|| global.netns_path());
    let link = open_link(&config.link.transport)?;
    let mut daemon = daemon::Daemon::start(config, netns, rules, link).map_err(Failure::new)?;
    daemon.run(&signals).map_err(Failure::new)
}

fn open_link(settings: &LinkTransport) -> Result<link::Link, Failure> {
    match settings {
        LinkTransport::Udp(udp) => {
            let key = key::Key::load(&udp.key_file).map_err(Failure::new)?;
            let mut config = transport::TransportConfig::new(udp.local, udp.peer, key);
            config.max_packet = udp.max_packet;
            config.retransmit_after = udp.retransmit;
            config.max_retransmits = udp.max_retransmits;
            config.max_age = udp.max_age;
            let transport = transport::Transport::bind(config)
                .map_err(|e| Failure::new(format!("sync link {}: {e}", udp.local)))?;
            Ok(link::Link::Udp(link::UdpLink::new(transport, udp.local, udp.peer)))
        }
        LinkTransport::Cpg(cpg) => {
            let config = cpg_link::CpgConfig::new(&cpg.group, cpg.max_message);
            let joined = cpg_link::CpgLink::join(config)
                .map_err(|e| Failure::new(format!("sync link: CPG group '{}': {e}", cpg.group)))?;
            Ok(link::Link::Cpg(joined))
        }
    }
}
