//! The command line: `nbdfault serve`, `nbdfault policy ...`, `nbdfault ctl ...`, `nbdfault replay`.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use nbdfault_policies::units::{parse_duration, parse_size};

use crate::config::Overrides;
use crate::tls::TlsMode;

#[derive(Debug, Parser)]
#[command(
    name = "nbdfault",
    version,
    about = "An NBD server that fails requests asynchronously, on policies",
    long_about = "nbdfault is an NBD server for testing what filesystems and databases do when a write fails \
after the kernel handed it to the device. Attach the Linux kernel (nbd-client), qemu or libnbd tools to it, \
and fail, delay, tear or drop requests on YAML policies, at run time, with a fault log of every injected fault.\n\n\
Quick start:\n  nbdfault serve                                  # 1 GiB in memory, export \"\", on 127.0.0.1:10809\n  \
nbdinfo nbd://127.0.0.1:10809                   # look at it\n  \
nbdfault serve --export disk=/path/to/disk.img  # serve an existing image\n\n\
Logs go to stderr; RUST_LOG (e.g. RUST_LOG=nbdfault=debug) overrides -v and -q."
)]
pub struct Cli {
    /// More log output (-v debug, -vv trace).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Less log output (-q warnings only, -qq errors only).
    #[arg(short, long, global = true, action = clap::ArgAction::Count, conflicts_with = "verbose")]
    pub quiet: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve exports over NBD (and the control API) until SIGINT or SIGTERM.
    Serve(ServeArgs),
    /// Check policy files, or print the JSON Schema of the policy language.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Talk to a running server's control API: policies, triggers, power, the fault log, stored data.
    ///
    /// The API's answer goes to stdout (JSON); its warnings (a trigger no rule names, a rule that
    /// can never decide) and errors go to stderr. Exit status: 0 done, 1 done but warned (with
    /// --strict), 2 refused or unreachable.
    Ctl(CtlArgs),
    /// Turn a fault log into a policy that makes the same decisions again for the same requests.
    ///
    /// Power records (cuts and power-ons through the control API, power-ons by a trigger or a
    /// timeout) are input from outside, like triggers armed through the API: the policy lists
    /// them in a comment, with the request each came before, and does not reproduce them.
    Replay(ReplayArgs),
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate policy files; print a summary of each, or every error with its line, column and a fix.
    Check {
        /// Policy files (YAML).
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
    /// Print the policy language's JSON Schema, for editors (e.g. yaml-language-server).
    Schema,
}

#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// A fault log written by `nbdfault serve --fault-log` or fetched from the control API.
    #[arg(value_name = "LOG")]
    pub log: PathBuf,
    /// Keep only this export's records.
    #[arg(long, value_name = "NAME")]
    pub export: Option<String>,
    /// Write the policy here instead of stdout.
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct CtlArgs {
    /// Base URL of the control API. Default: from NBDFAULT_CONTROL (the address `nbdfault serve`
    /// uses, with 0.0.0.0 or :: read as loopback), else http://127.0.0.1:10810.
    #[arg(long, value_name = "URL", env = "NBDFAULT_CONTROL_URL")]
    pub url: Option<String>,
    /// Bearer token, when the server was started with --control-token.
    #[arg(long, value_name = "TOKEN", env = "NBDFAULT_CONTROL_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Read the bearer token from this file (its first line).
    #[arg(long, value_name = "FILE", env = "NBDFAULT_CONTROL_TOKEN_FILE", conflicts_with = "token")]
    pub token_file: Option<PathBuf>,
    /// For a server started with --tls: a directory with ca-cert.pem (the CA of the server's
    /// certificate) and, when the server verifies clients, client-cert.pem and client-key.pem.
    /// The default URL becomes https://.
    #[arg(long, value_name = "DIR", env = "NBDFAULT_CONTROL_TLS_CERTIFICATES")]
    pub tls_certificates: Option<PathBuf>,
    /// Exit with status 1 when the server warns (arming a trigger no rule names, a policy with a
    /// rule that can never decide). The change is made all the same; the warning is on stderr.
    #[arg(long)]
    pub strict: bool,
    #[command(subcommand)]
    pub command: CtlCommand,
}

/// Export names are as served; write `""` for the default export.
#[derive(Debug, Subcommand)]
pub enum CtlCommand {
    /// Is the server up?
    Health,
    /// Show every export, or one: size, flags, policy, triggers, bad sectors, counters.
    Exports {
        #[arg(value_name = "NAME")]
        name: Option<String>,
    },
    /// Replace an export's policy (validated first; a bad one changes nothing). FILE `-` is stdin.
    /// Errors and warnings name FILE, with line, column and a fix.
    SetPolicy {
        #[arg(value_name = "NAME")]
        name: String,
        #[arg(value_name = "FILE")]
        file: String,
    },
    /// Print an export's policy.
    ShowPolicy {
        #[arg(value_name = "NAME")]
        name: String,
    },
    /// Remove an export's policy: every request passes through.
    ClearPolicy {
        #[arg(value_name = "NAME")]
        name: String,
    },
    /// Arm a trigger (warns when no rule of the export's policy names it).
    Arm {
        #[arg(value_name = "NAME")]
        name: String,
        #[arg(value_name = "TRIGGER")]
        trigger: String,
    },
    /// Disarm a trigger (warns when no rule of the export's policy names it).
    Disarm {
        #[arg(value_name = "NAME")]
        name: String,
        #[arg(value_name = "TRIGGER")]
        trigger: String,
    },
    /// Print the fault log, one JSON object per line: requests a rule touched, and power cuts
    /// and power-ons no request decided (those have an `event`).
    Faults {
        #[arg(value_name = "NAME")]
        name: String,
        /// Only records after this sequence number.
        #[arg(long, default_value_t = 0)]
        since: u64,
        /// The decision log: records without run-specific fields, sorted by request.
        #[arg(long)]
        decisions: bool,
        /// Keep printing new records as they come, asking every 250 ms (also when the server says
        /// it is busy), until interrupted or the server goes away.
        #[arg(short, long, conflicts_with = "decisions")]
        follow: bool,
    },
    /// Print the export's live events as they happen: every request (sampled above --rate per
    /// second, the rest summed up per 100 ms), every fault, trigger change, policy swap and reset.
    /// Ends when the server ends the stream (it drops a subscriber that reads too slowly).
    Watch {
        #[arg(value_name = "NAME")]
        name: String,
        /// Request events per second shown one by one; the rest are summed up. 0: every request.
        #[arg(long, value_name = "N")]
        rate: Option<u32>,
        /// One JSON object per line ({"event", "id", "data"}) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Copy bytes as stored (below the fault layer) to stdout or a file.
    Data {
        #[arg(value_name = "NAME")]
        name: String,
        #[arg(long, value_parser = size)]
        offset: u64,
        #[arg(long, value_parser = size)]
        length: u64,
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Write a file's bytes to storage directly (below the fault layer). FILE `-` is stdin.
    Write {
        #[arg(value_name = "NAME")]
        name: String,
        #[arg(long, value_parser = size)]
        offset: u64,
        #[arg(value_name = "FILE")]
        file: String,
    },
    /// Return a memory or overlay export to its pristine contents.
    Reset {
        #[arg(value_name = "NAME")]
        name: String,
    },
    /// Cut the export's power now: every connection of it drops at once, without replies, and
    /// every write not yet flushed is undone (when its policy keeps the journal: `volatile_cache:
    /// true`, or a rule with `power_cut`). With --off, --until or --timeout new connections are
    /// refused at the handshake until then (or until `power-on`).
    PowerCut {
        #[arg(value_name = "NAME")]
        name: String,
        /// Stay off until `nbdfault ctl power-on`.
        #[arg(long)]
        off: bool,
        /// Stay off until this trigger is armed.
        #[arg(long, value_name = "TRIGGER")]
        until: Option<String>,
        /// Stay off this long (such as 5s).
        #[arg(long, value_name = "DURATION", value_parser = duration)]
        timeout: Option<Duration>,
    },
    /// Power an export on again after a power cut that left it off.
    PowerOn {
        #[arg(value_name = "NAME")]
        name: String,
    },
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Configuration file (YAML); flags given on the command line override it. See docs/configuration.md.
    #[arg(short, long, value_name = "FILE", env = "NBDFAULT_CONFIG")]
    pub config: Option<PathBuf>,

    /// Address to serve NBD on; repeat for several. Default 127.0.0.1:10809. Port 0 picks a free
    /// port (the ready line on stdout says which). Other interfaces are opt-in: the protocol has
    /// no authentication.
    #[arg(short, long, value_name = "IP:PORT", env = "NBDFAULT_LISTEN", value_delimiter = ',')]
    pub listen: Vec<String>,

    /// An export, as NAME=SPEC; repeat for several. SPEC is memory:SIZE (sparse, in RAM),
    /// file:PATH or PATH (an existing image or block device), or overlay:PATH (copy-on-write in
    /// RAM over a read-only base, reset through the control API). NAME may be empty (`=memory:1GiB`).
    /// Without any export: `""` of 1 GiB in memory.
    #[arg(short, long, value_name = "NAME=SPEC")]
    pub export: Vec<String>,

    /// Serve this export read-only; repeat for several.
    #[arg(long, value_name = "NAME")]
    pub read_only: Vec<String>,

    /// Attach a fault policy file to an export, as NAME=FILE.
    #[arg(short, long, value_name = "NAME=FILE")]
    pub policy: Vec<String>,

    /// Address of the HTTP control API. Default 127.0.0.1:10810.
    #[arg(long, value_name = "IP:PORT", env = "NBDFAULT_CONTROL")]
    pub control: Option<String>,

    /// Do not start the control API (wins over --control and NBDFAULT_CONTROL).
    #[arg(long)]
    pub no_control: bool,

    /// Require `Authorization: Bearer TOKEN` on every control API request.
    #[arg(long, value_name = "TOKEN", env = "NBDFAULT_CONTROL_TOKEN", hide_env_values = true)]
    pub control_token: Option<String>,

    /// Read the control token from this file (a Docker or compose secret, say): its first line.
    #[arg(long, value_name = "FILE", env = "NBDFAULT_CONTROL_TOKEN_FILE", conflicts_with = "control_token")]
    pub control_token_file: Option<PathBuf>,

    /// A host name the control API may be addressed as (`http://NAME:PORT/`): a container's
    /// service name, this machine's name. IP addresses and localhost always work; requests to
    /// other names are refused (403) against DNS rebinding. Repeat, or separate with commas.
    #[arg(long, value_name = "NAME", env = "NBDFAULT_CONTROL_ALLOW_HOST", value_delimiter = ',')]
    pub control_allow_host: Vec<String>,

    /// Append every injected fault to this file, one JSON object per line.
    #[arg(long, value_name = "FILE", env = "NBDFAULT_FAULT_LOG")]
    pub fault_log: Option<PathBuf>,

    /// Time a client has to finish the handshake. Default 30s.
    #[arg(long, value_name = "DURATION", value_parser = duration)]
    pub handshake_timeout: Option<Duration>,

    /// Connections past the handshake (in transmission) at once; more are closed when their
    /// handshake ends. Connections still in the handshake do not count. Default 256.
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,

    /// Connections still in the handshake at once; a new one over this closes the oldest, so idle
    /// sockets cannot lock clients out. Default 64.
    #[arg(long, value_name = "N")]
    pub max_handshakes: Option<usize>,

    /// Bytes of requests in flight per connection before the server stops reading more
    /// (backpressure). Default 64MiB; at least 33MiB.
    #[arg(long, value_name = "SIZE", value_parser = size)]
    pub max_in_flight: Option<u64>,

    /// Bytes in flight across the whole server: request payloads and read buffers of every
    /// connection, and control API `data` transfers. At the budget the server stops reading
    /// requests until replies free some. Default 256MiB; at least 33MiB.
    #[arg(long, value_name = "SIZE", value_parser = size)]
    pub memory_budget: Option<u64>,

    /// Time in-flight requests get to finish at shutdown before they are answered ESHUTDOWN. Default 5s.
    #[arg(long, value_name = "DURATION", value_parser = duration)]
    pub shutdown_grace: Option<Duration>,

    /// TLS for NBD (STARTTLS) and the control API (HTTPS). `on`: clients choose; `require`:
    /// every option before STARTTLS is refused (ERR_TLS_REQD), so plain clients cannot attach.
    /// Default off.
    #[arg(long, value_name = "MODE", env = "NBDFAULT_TLS")]
    pub tls: Option<TlsMode>,

    /// Directory with server-cert.pem, server-key.pem and ca-cert.pem (nbdkit's layout); read at
    /// start. See docs/security.md.
    #[arg(long, value_name = "DIR", env = "NBDFAULT_TLS_CERTIFICATES")]
    pub tls_certificates: Option<PathBuf>,

    /// Clients must present a certificate signed by ca-cert.pem (NBD and the control API).
    #[arg(long, env = "NBDFAULT_TLS_VERIFY_PEER")]
    pub tls_verify_peer: bool,
}

/// The control API URL for `nbdfault ctl`: `--url` or NBDFAULT_CONTROL_URL; otherwise where
/// NBDFAULT_CONTROL (the server's own setting) says it listens, an any-address read as loopback.
pub fn control_url(url: Option<&str>, control_env: Option<&str>, https: bool) -> String {
    if let Some(url) = url.filter(|url| !url.is_empty()) {
        return url.to_string();
    }
    let scheme = if https { "https" } else { "http" };
    let Some(address) = control_env.and_then(|text| text.trim().parse::<std::net::SocketAddr>().ok()) else {
        return format!("{scheme}://{}", crate::config::DEFAULT_CONTROL);
    };
    let address = match address.ip() {
        ip if ip.is_unspecified() && ip.is_ipv4() => std::net::SocketAddr::from(([127, 0, 0, 1], address.port())),
        ip if ip.is_unspecified() => std::net::SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, address.port())),
        _ => address,
    };
    format!("{scheme}://{address}")
}

fn duration(text: &str) -> Result<Duration, String> {
    parse_duration(text).map_err(|e| e.to_string())
}

fn size(text: &str) -> Result<u64, String> {
    parse_size(text).map_err(|e| e.to_string())
}

impl ServeArgs {
    pub fn overrides(&self) -> Overrides {
        Overrides {
            config: self.config.clone(),
            listen: self.listen.clone(),
            exports: self.export.clone(),
            read_only: self.read_only.clone(),
            policies: self.policy.clone(),
            control: self.control.clone(),
            no_control: self.no_control,
            control_token: self.control_token.clone(),
            control_token_file: self.control_token_file.clone(),
            control_allow_hosts: self.control_allow_host.clone(),
            fault_log: self.fault_log.clone(),
            handshake_timeout: self.handshake_timeout,
            max_connections: self.max_connections,
            max_handshakes: self.max_handshakes,
            max_in_flight: self.max_in_flight,
            memory_budget: self.memory_budget,
            shutdown_grace: self.shutdown_grace,
            tls: self.tls,
            tls_certificates: self.tls_certificates.clone(),
            tls_verify_peer: self.tls_verify_peer,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn serve_flags_parse_units() {
        let cli = Cli::parse_from([
            "nbdfault",
            "serve",
            "--handshake-timeout",
            "5s",
            "--max-in-flight",
            "128MiB",
            "-e",
            "d=memory:1GiB",
        ]);
        let Command::Serve(args) = cli.command else { panic!("not serve") };
        assert_eq!(args.handshake_timeout, Some(Duration::from_secs(5)));
        assert_eq!(args.max_in_flight, Some(128 << 20));
        assert_eq!(args.export, vec!["d=memory:1GiB"]);
    }

    #[test]
    fn ctl_takes_the_url_token_and_sizes() {
        let cli = Cli::parse_from([
            "nbdfault",
            "ctl",
            "--url",
            "http://127.0.0.1:1",
            "data",
            "disk",
            "--offset",
            "1MiB",
            "--length",
            "4KiB",
        ]);
        let Command::Ctl(args) = cli.command else { panic!("not ctl") };
        assert_eq!(args.url.as_deref(), Some("http://127.0.0.1:1"));
        let CtlCommand::Data { offset, length, .. } = args.command else { panic!("not data") };
        assert_eq!((offset, length), (1 << 20, 4096));
    }

    #[test]
    fn the_ctl_url_follows_the_servers_control_address() {
        assert_eq!(control_url(None, None, false), "http://127.0.0.1:10810");
        assert_eq!(control_url(None, Some("0.0.0.0:7000"), false), "http://127.0.0.1:7000");
        assert_eq!(control_url(None, Some("[::]:7000"), false), "http://[::1]:7000");
        assert_eq!(control_url(None, Some("10.1.2.3:7000"), false), "http://10.1.2.3:7000");
        assert_eq!(control_url(None, Some("off"), false), "http://127.0.0.1:10810");
        assert_eq!(control_url(Some("http://h:1/"), Some("0.0.0.0:7000"), false), "http://h:1/");
        assert_eq!(control_url(None, Some("0.0.0.0:7000"), true), "https://127.0.0.1:7000");
    }

    #[test]
    fn bad_units_are_refused_by_the_parser() {
        assert!(Cli::try_parse_from(["nbdfault", "serve", "--handshake-timeout", "5"]).is_err());
        assert!(Cli::try_parse_from(["nbdfault", "serve", "--max-in-flight", "64MB"]).is_err());
    }
}
