//! The `nbdfault` binary: parses the command line and hands over to the library.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use nbdfault::cli::{Cli, Command, CtlArgs, CtlCommand, PolicyCommand, ReplayArgs, ServeArgs};
use nbdfault::config::Config;
use nbdfault::ctl::{self, Client, path_segment};
use nbdfault::server::{self, Server};
use nbdfault_policies::Policy;

/// Exit status for a configuration or usage error; 1 is kept for "checked, and found invalid".
const USAGE: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    nbdfault::logging::init(cli.verbose as i8 - cli.quiet as i8);
    match cli.command {
        Command::Serve(args) => serve(&args),
        Command::Policy(PolicyCommand::Check { files }) => check_policies(&files),
        Command::Policy(PolicyCommand::Schema) => {
            let schema = nbdfault_policies::json_schema();
            println!("{}", serde_json::to_string_pretty(&schema).expect("a JSON value always serializes"));
            ExitCode::SUCCESS
        }
        Command::Replay(args) => replay(&args),
        Command::Ctl(args) => ctl(&args),
    }
}

fn serve(args: &ServeArgs) -> ExitCode {
    let config = match Config::load(&args.overrides()) {
        Ok(config) => config,
        Err(error) => return fail(&error),
    };
    for warning in config.exposure_warnings() {
        tracing::warn!("WARNING: {warning}");
    }
    keep_freed_buffers();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => return fail(&format!("cannot start the async runtime: {error}")),
    };
    runtime.block_on(async {
        // Caught from now on: a SIGTERM just after the ready line must not kill the server.
        let terminated = server::termination_signal();
        let server = match Server::start(&config).await {
            Ok(server) => server,
            Err(error) => return fail(&error),
        };
        server.log_exports();
        server::announce_ready(&server.local_addresses(), server.control_address());
        server.run(terminated).await;
        ExitCode::SUCCESS
    })
}

/// Large buffers (READ replies, WRITE payloads up to a few MiB) are allocated and freed at the
/// request rate. glibc gives a freed chunk at the top of a heap back to the kernel once more than
/// about two of them are free, so the next buffer of the same size faults in fresh pages, each
/// zeroed by the kernel: about a tenth of the CPU of a 1 MiB read. Here freed memory is kept for
/// reuse up to 32 MiB per arena, and buffers up to 4 MiB come from the arenas (larger ones are
/// mapped and unmapped as before). Peak memory is unchanged; memory freed after a peak is kept.
fn keep_freed_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets glibc's malloc parameters; called before any other thread runs.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 32 << 20);
    }
}

fn check_policies(files: &[std::path::PathBuf]) -> ExitCode {
    let mut failed = false;
    for file in files {
        let shown = file.display().to_string();
        let text = match std::fs::read_to_string(file) {
            Ok(text) => text,
            Err(error) => {
                eprintln!("{shown}: cannot read: {error}");
                failed = true;
                continue;
            }
        };
        match Policy::from_yaml(&text, &shown) {
            Ok(policy) => {
                let rules = policy.rule_names().count();
                let triggers = policy.trigger_names();
                let triggers =
                    if triggers.is_empty() { String::new() } else { format!(", triggers: {}", triggers.join(", ")) };
                println!("{shown}: ok ({rules} rules, seed {}{triggers})", policy.seed());
                for warning in policy.warnings() {
                    eprintln!("{warning}");
                }
            }
            Err(error) => {
                eprintln!("{error}");
                failed = true;
            }
        }
    }
    if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}

fn replay(args: &ReplayArgs) -> ExitCode {
    let text = match std::fs::read_to_string(&args.log) {
        Ok(text) => text,
        Err(error) => return fail(&format!("cannot read the fault log {}: {error}", args.log.display())),
    };
    let mut records = match nbdfault_policies::parse_fault_log(&text) {
        Ok(records) => records,
        Err(error) => return fail(&format!("{}: {error} (is this a fault log?)", args.log.display())),
    };
    if let Some(export) = &args.export {
        records.retain(|record| record.export() == export);
    }
    let policy = match nbdfault_policies::replay_policy(&records) {
        Ok(policy) => policy,
        Err(error) => return fail(&format!("{}: {error}", args.log.display())),
    };
    let power = records.iter().filter(|record| record.power().is_some()).count();
    if power > 0 {
        eprintln!(
            "note: {power} power records (cuts and power-ons through the control API, power-ons by a trigger or a \
             timeout) are not replayed; the policy lists them in a comment at its top"
        );
    }
    let written = match &args.output {
        Some(path) => std::fs::write(path, &policy),
        None => std::io::stdout().write_all(policy.as_bytes()),
    };
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => fail(&format!("cannot write the policy: {error}")),
    }
}

/// Exit status of `ctl --strict` when the server did what was asked but warned about it.
const WARNED: u8 = 1;

/// Runs a `ctl` command: the API's answer on stdout, its warnings and any error on stderr.
fn ctl(args: &CtlArgs) -> ExitCode {
    match run_ctl(args) {
        Ok(warnings) => {
            for warning in &warnings {
                eprintln!("{warning}");
            }
            if args.strict && !warnings.is_empty() { ExitCode::from(WARNED) } else { ExitCode::SUCCESS }
        }
        // The policy's own errors start with the file name, as `policy check` prints them.
        Err(ctl::CtlError::PolicyRefused { export, errors }) => {
            eprintln!("{errors}");
            fail(&format!("the policy was refused; export {export:?} keeps the policy it had"))
        }
        Err(error) => fail(&error),
    }
}

/// The `warnings` of an API answer: what was done, but is most likely not what was meant.
fn warnings_of(answer: &str) -> Vec<String> {
    let answer = serde_json::from_str::<serde_json::Value>(answer).unwrap_or_default();
    answer["warnings"].as_array().into_iter().flatten().filter_map(|w| w.as_str().map(str::to_string)).collect()
}

/// Prints an API answer (JSON, pretty-printed) on stdout and returns its warnings.
fn print_answer(answer: &str) -> Result<Vec<String>, ctl::CtlError> {
    let shown = match serde_json::from_str::<serde_json::Value>(answer) {
        Ok(value) => serde_json::to_string_pretty(&value).unwrap_or_else(|_| answer.to_string()),
        Err(_) => answer.to_string(),
    };
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{}", shown.trim_end())?;
    stdout.flush()?;
    Ok(warnings_of(answer))
}

fn run_ctl(args: &CtlArgs) -> Result<Vec<String>, ctl::CtlError> {
    let control_env = std::env::var("NBDFAULT_CONTROL").ok();
    let url = nbdfault::cli::control_url(args.url.as_deref(), control_env.as_deref(), args.tls_certificates.is_some());
    let tls = args.tls_certificates.as_deref().map(ctl::client_tls).transpose()?;
    let token = match &args.token_file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|error| {
                ctl::CtlError::Usage(format!("cannot read the token file {}: {error}", path.display()))
            })?;
            Some(text.lines().next().unwrap_or_default().trim().to_string())
        }
        None => args.token.clone(),
    };
    let client = Client::new(&url, token.filter(|token| !token.is_empty()), tls)?;
    let export_path = |name: &str| format!("/v1/exports/{}", path_segment(name));
    let trigger_path = |name: &str, trigger: &str| format!("{}/triggers/{}", export_path(name), path_segment(trigger));
    match &args.command {
        CtlCommand::Health => print_answer(&client.text("GET", "/v1/health", None)?),
        CtlCommand::Exports { name: None } => print_answer(&client.text("GET", "/v1/exports", None)?),
        CtlCommand::Exports { name: Some(name) } => print_answer(&client.text("GET", &export_path(name), None)?),
        CtlCommand::SetPolicy { name, file } => {
            let body = ctl::read_input(file)?;
            // Refused here rather than by the server, which answers 413 before reading the body.
            let max_bytes = nbdfault_policies::PolicyLimits::DEFAULT.max_bytes;
            if body.len() > max_bytes {
                return Err(ctl::CtlError::Usage(format!(
                    "{file}: the policy has {} bytes, over the limit of {max_bytes} bytes (max_bytes); split it",
                    body.len()
                )));
            }
            // Errors and warnings then name the file, not the URL.
            let origin = if file == "-" { "stdin" } else { file.as_str() };
            let path = format!("{}/policy?origin={}", export_path(name), ctl::query_value(origin));
            match client.text("PUT", &path, Some(body)) {
                Err(ctl::CtlError::Refused { status: 400, message, .. }) => {
                    Err(ctl::CtlError::PolicyRefused { export: name.clone(), errors: message })
                }
                answer => print_answer(&answer?),
            }
        }
        CtlCommand::ShowPolicy { name } => {
            let text = client.text("GET", &format!("{}/policy", export_path(name)), None)?;
            println!("{}", text.trim_end());
            Ok(Vec::new())
        }
        CtlCommand::ClearPolicy { name } => {
            print_answer(&client.text("DELETE", &format!("{}/policy", export_path(name)), None)?)
        }
        CtlCommand::Arm { name, trigger } => print_answer(&client.text("POST", &trigger_path(name, trigger), None)?),
        CtlCommand::Disarm { name, trigger } => {
            print_answer(&client.text("DELETE", &trigger_path(name, trigger), None)?)
        }
        CtlCommand::Faults { name, since, decisions, follow } => {
            let every = follow.then_some(Duration::from_millis(250));
            ctl::faults(&client, name, *since, *decisions, every, &mut std::io::stdout().lock())?;
            Ok(Vec::new())
        }
        CtlCommand::Watch { name, rate, json } => {
            ctl::watch(client.api(), name, *rate, *json, &mut std::io::stdout().lock())?;
            Ok(Vec::new())
        }
        CtlCommand::Data { name, offset, length, output } => {
            let path = format!("{}/data?offset={offset}&length={length}", export_path(name));
            match output {
                Some(file) => {
                    let mut out = std::fs::File::create(file)?;
                    client.copy_to(&path, &mut out)?;
                }
                None => {
                    client.copy_to(&path, &mut std::io::stdout().lock())?;
                }
            }
            Ok(Vec::new())
        }
        CtlCommand::Write { name, offset, file } => {
            let body = ctl::read_input(file)?;
            print_answer(&client.text("PUT", &format!("{}/data?offset={offset}", export_path(name)), Some(body))?)
        }
        CtlCommand::Reset { name } => {
            print_answer(&client.text("POST", &format!("{}/reset", export_path(name)), None)?)
        }
        CtlCommand::PowerCut { name, off, until, timeout } => {
            let mut query = Vec::new();
            if *off {
                query.push("off=true".to_string());
            }
            if let Some(trigger) = until {
                query.push(format!("until={}", ctl::query_value(trigger)));
            }
            if let Some(timeout) = timeout {
                query.push(format!("timeout={}ns", timeout.as_nanos()));
            }
            let query = if query.is_empty() { String::new() } else { format!("?{}", query.join("&")) };
            print_answer(&client.text("POST", &format!("{}/power-cut{query}", export_path(name)), None)?)
        }
        CtlCommand::PowerOn { name } => {
            print_answer(&client.text("POST", &format!("{}/power-on", export_path(name)), None)?)
        }
    }
}

fn fail(error: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("nbdfault: {error}");
    ExitCode::from(USAGE)
}
