//! `xfrmsync`: watch, query and set the XFRM aevent counters and thresholds
//! of IPsec SAs, and give SAs thresholds from a rules file, with
//! `libxfrmsync` (the library this workspace builds).
//!
//! Exit status: 0 done, 1 failed (the message names the SA and the reason),
//! 2 bad usage.

mod apply;
mod defaults;
mod get;
mod monitor;
mod output;
mod parse;
mod rules_file;
mod set;
mod sync;
mod sys;

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{ArgAction, Args, Parser, Subcommand};
use xfrmsync::{Handle, Mark, SaId};

/// Watch, query and set the replay and lifetime counters and the aevent
/// thresholds of IPsec SAs (Linux XFRM), and give SAs thresholds from a
/// rules file.
#[derive(Parser)]
#[command(name = "xfrmsync", version, propagate_version = true, max_term_width = 100)]
#[command(after_help = "SAs are named as `ip xfrm state` names them: destination address, SPI (0x1001 \
                        or decimal), protocol (esp by default) and mark.\n\
                        Exit status: 0 done, 1 failed (the message names the SA and the reason), 2 bad usage.")]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

/// Options every subcommand takes.
#[derive(Args)]
pub struct Global {
    /// Work in this network namespace: NAME (/run/netns/NAME, as `ip netns`
    /// names it) or a path (/proc/PID/ns/net)
    #[arg(long, global = true, value_name = "NAME|PATH", help_heading = "Global options")]
    netns: Option<String>,
    /// The kernel's CONFIG_HZ, which timer thresholds need. Without it the
    /// library reads CONFIG_HZ from the kernel's config, else measures HZ on
    /// a throw-away SA in a private namespace, and only if both fail on the
    /// SA being set (its timer is restored; listeners see two update events)
    #[arg(long, global = true, value_name = "HZ", help_heading = "Global options")]
    kernel_hz: Option<u32>,
    /// Also print the library's log messages of level info (-v) or debug (-vv)
    #[arg(short, long, global = true, action = ArgAction::Count, help_heading = "Global options")]
    verbose: u8,
}

impl Global {
    pub fn netns_path(&self) -> Option<PathBuf> {
        self.netns.as_deref().map(sys::netns_path)
    }

    /// The namespace in words, for messages.
    pub fn where_(&self) -> String {
        match &self.netns {
            Some(ns) => format!("netns {ns}"),
            None => "this netns".into(),
        }
    }

    /// A handle in the namespace asked for. `events`: join the aevent group
    /// (the kernel only generates aevents while somebody listens).
    pub fn open(&self, events: bool) -> Result<Handle, Failure> {
        self.open_listening(events, &Listening::default())
    }

    /// A handle that also reads notifications (`monitor`, `apply`).
    pub fn open_listening(&self, events: bool, listening: &Listening) -> Result<Handle, Failure> {
        let mut builder = Handle::builder().events(events);
        if let Some(bytes) = listening.receive_buffer {
            builder = builder.receive_buffer(bytes);
        }
        if let Some(path) = self.netns_path() {
            builder = builder.netns_path(path);
        }
        builder.open().map_err(|e| Failure::new(format!("{}: opening XFRM netlink: {e}", self.where_())))
    }
}

/// Options of the subcommands that keep reading the kernel's notifications.
#[derive(Args, Default)]
pub struct Listening {
    /// The notification socket's receive buffer (e.g. 4M; as root beyond
    /// net.core.rmem_max). When a burst overflows it the kernel drops
    /// notifications: `monitor` says so, `apply` lists every SA again
    #[arg(long, value_name = "BYTES", value_parser = parse::bytes)]
    pub receive_buffer: Option<usize>,
}

#[derive(Subcommand)]
enum Command {
    /// Print aevents as they come: human lines, or JSON lines
    #[command(after_help = "Human lines show the first 4 words of an ESN replay bitmap (a 4096-bit \
                            window has 128) with the count of words and of bits set; JSON lines \
                            carry every word. Stops on SIGINT or SIGTERM, exit status 0.")]
    Monitor(monitor::Args),
    /// Print one SA's counters and thresholds, or every SA's
    Get(get::Args),
    /// Set thresholds or values of one SA, all in one atomic request
    Set(set::Args),
    /// Give SAs thresholds from a rules file, then keep watching for new SAs
    #[command(after_help = "The file format is in tools/xfrmsync/README.md (example: \
                            tools/xfrmsync/rules.example.toml). Signals: SIGHUP reloads the file \
                            (a file with an error is refused with its line, and the rules in \
                            force stay), SIGTERM and SIGINT exit with status 0. A line starting \
                            `xfrmsync apply: ready` is printed once the rules are applied.")]
    Apply(apply::Args),
    /// HA sync: run the daemon that keeps a standby node's SAs ready to take
    /// over (--config FILE), or steer a running one
    #[command(after_help = "Without a subcommand, runs the daemon (SIGTERM and SIGINT end it). The \
                            config format is in tools/xfrmsync/sync.example.toml; the setup and \
                            the margin are explained in the README's HA section.")]
    Sync(sync::Args),
    /// Show or set the namespace's default thresholds (sysctls) for new SAs
    Defaults(defaults::Args),
}

/// An SA named on the command line: DST SPI plus options.
#[derive(Args, Clone)]
pub struct SaArgs {
    /// Destination address of the SA
    dst: IpAddr,
    /// SPI: 0x1001 (as `ip xfrm state` prints it) or decimal
    #[arg(value_parser = parse::u32_any)]
    spi: u32,
    #[command(flatten)]
    options: SaOptions,
}

impl SaArgs {
    pub fn sa(&self) -> SaId {
        self.options.sa(self.dst, self.spi)
    }
}

#[derive(Args, Clone, Default)]
pub struct SaOptions {
    /// Protocol: esp (default), ah, comp or a number
    #[arg(long, value_parser = parse::proto, value_name = "PROTO")]
    proto: Option<u8>,
    /// The SA's mark, VALUE/MASK (0x7/0xff) or VALUE: a marked SA is found
    /// only with its mark
    #[arg(long, value_parser = parse::mark, value_name = "VALUE/MASK")]
    mark: Option<Mark>,
}

impl SaOptions {
    pub fn sa(&self, dst: IpAddr, spi: u32) -> SaId {
        let mut sa = SaId::esp(dst, spi);
        if let Some(proto) = self.proto {
            sa.proto = proto;
        }
        if let Some(mark) = self.mark {
            sa.mark = mark;
        }
        sa
    }
}

/// Why a command failed; printed after "xfrmsync: ", exit status 1 (2
/// for usage the argument parser cannot check by itself).
#[derive(Debug)]
pub struct Failure {
    message: String,
    status: u8,
}

impl Failure {
    pub fn new(message: impl Into<String>) -> Failure {
        Failure { message: message.into(), status: 1 }
    }

    pub fn usage(message: impl Into<String>) -> Failure {
        Failure { message: message.into(), status: 2 }
    }
}

impl From<String> for Failure {
    fn from(message: String) -> Failure {
        Failure::new(message)
    }
}

pub type Outcome = Result<(), Failure>;

/// Library log messages on stderr; the library logs warnings (an SA that
/// could not be given its thresholds, local addresses not listed) and, with
/// -v, what it measured.
struct StderrLog;

impl log::Log for StderrLog {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            eprintln!("xfrmsync: {}: {}", record.level().as_str().to_lowercase(), record.args());
        }
    }

    fn flush(&self) {}
}

static LOGGER: StderrLog = StderrLog;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let level = match cli.global.verbose {
        0 => log::LevelFilter::Warn,
        1 => log::LevelFilter::Info,
        _ => log::LevelFilter::Debug,
    };
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(level);
    }
    if let Some(hz) = cli.global.kernel_hz {
        if let Err(e) = xfrmsync::timer::set_kernel_hz(hz) {
            eprintln!("xfrmsync: --kernel-hz: {}", parse::reason(&e));
            return ExitCode::from(2);
        }
    }
    let outcome = match &cli.command {
        Command::Monitor(args) => monitor::run(&cli.global, args),
        Command::Get(args) => get::run(&cli.global, args),
        Command::Set(args) => set::run(&cli.global, args),
        Command::Apply(args) => apply::run(&cli.global, args),
        Command::Sync(args) => sync::run(&cli.global, args),
        Command::Defaults(args) => defaults::run(&cli.global, args),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("xfrmsync: {}", failure.message);
            ExitCode::from(failure.status)
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
