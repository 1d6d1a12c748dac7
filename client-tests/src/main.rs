//! `nbdfault-client-tests`: the writeback-error oracle and its VM harness.

use std::fs::OpenOptions;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use nbdfault_client_tests::control::Control;
use nbdfault_client_tests::report::{REPORT_BEGIN, REPORT_END, Report};
use nbdfault_client_tests::suite::{self, SuiteConfig, fs};
use nbdfault_client_tests::{compare, matrix, os, vm};

/// What fsync, read() and mmap show after an NBD write fails, on real XFS and ext4.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the suite here, on a device you attached with nbd-client to an nbdfault server.
    ///
    /// Needs root: it makes filesystems on the device, mounts them, and drops caches. Everything
    /// on the device is destroyed.
    Run(RunArgs),
    /// Boot a Debian kernel in qemu and run the suite in it against a fresh nbdfault server.
    Vm(vm::VmArgs),
    /// Boot a Debian kernel in qemu and attach its nbd-client over TLS (client certificate) to
    /// `nbdfault serve --tls require`; a plain attach must be refused.
    VmTls(vm::tls::TlsArgs),
    /// Boot a Debian kernel in qemu, attach it with two connections (`nbd-client -C 2`), cut the
    /// export's power through the control API: both connections must drop, unflushed data go,
    /// clients be refused while off, and flushed data read back after power-on.
    VmPowerCut(vm::power_cut::PowerCutArgs),
    /// Fetch and unpack a Debian kernel into the cache, and print where it is.
    Kernel(vm::KernelArgs),
    /// List the Debian kernels `vm --kernel` can boot (version, package, suite), newest first.
    Kernels(vm::KernelsArgs),
    /// Write the results matrix (Markdown) from a directory of JSON reports.
    Matrix(MatrixArgs),
    /// Compare the verdicts of a run with the committed ones, cell by cell (kernel series,
    /// filesystem, check); timings and evidence do not count. Exits 1 naming each difference.
    Compare(CompareArgs),
    /// Print only the checks whose verdict differs between two runs, both evidences side by side.
    ///
    /// Each side is a JSON report (`vm` writes one per kernel and filesystem, such as
    /// 6.12.118-xfs.json) or a directory of them holding one kernel. Exits 0 when every verdict is
    /// the same, 1 when some differ. To boot two kernels and compare them in one go:
    /// `diff --kernel 6.12 --kernel 7.2` (the same as `vm --kernel 6.12 --kernel 7.2`).
    Diff(DiffArgs),
    /// List the scenarios and their checks.
    Scenarios,
}

#[derive(Args)]
struct RunArgs {
    /// The NBD device nbd-client attached (its contents are destroyed).
    #[arg(long)]
    device: PathBuf,
    /// The nbdfault control API, e.g. http://127.0.0.1:10810.
    #[arg(long)]
    control: String,
    /// The export the device is attached to ("" for the default export).
    #[arg(long, default_value = "")]
    export: String,
    /// Bearer token, when the server was started with --control-token.
    #[arg(long, env = "NBDFAULT_CONTROL_TOKEN")]
    token: Option<String>,
    /// xfs, ext4, btrfs, a comma-separated list of them, or all.
    #[arg(long, default_value = "all")]
    fs: String,
    /// Only these scenarios (comma-separated; see `scenarios`).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Where to mount the filesystems.
    #[arg(long, default_value = "/mnt/nbdfault-client-tests")]
    mountpoint: PathBuf,
    /// How long the server holds each error reply, in milliseconds (asynchronous failure).
    #[arg(long, default_value_t = 50)]
    delay_ms: u64,
    /// Write the JSON reports (an array, one per filesystem) to this file or serial port.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Debian package the kernel came from, recorded in the report.
    #[arg(long, hide = true)]
    kernel_package: Option<String>,
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("sides").required(true).args(["before", "kernel"])))]
struct DiffArgs {
    /// The earlier run (a report or a directory of reports).
    #[arg(requires = "after", conflicts_with = "kernel")]
    before: Option<PathBuf>,
    /// The later run.
    after: Option<PathBuf>,
    /// Instead of two reports: boot these two kernels one after the other (exactly `vm --kernel
    /// A --kernel B`, reports in nbdfault-results/) and compare them.
    #[arg(long)]
    kernel: Vec<String>,
    /// With --kernel: xfs, ext4, btrfs, a comma-separated list of them, or all (default).
    #[arg(long)]
    fs: Option<String>,
    /// With --kernel: only these scenarios (comma-separated; see `scenarios`).
    #[arg(long)]
    only: Option<String>,
}

#[derive(Args)]
struct MatrixArgs {
    /// Directory holding the JSON reports (`*.json`).
    #[arg(long, default_value = "client-tests/results")]
    results: PathBuf,
    /// Write the Markdown here instead of standard output.
    #[arg(long)]
    output: Option<PathBuf>,
    /// The command that produced the reports, quoted in the document.
    #[arg(long, default_value = matrix::MADE_BY)]
    made_by: String,
}

#[derive(Args)]
struct CompareArgs {
    /// The committed JSON reports.
    #[arg(long, default_value = "client-tests/results")]
    committed: PathBuf,
    /// The JSON reports of the run to check.
    #[arg(long)]
    run: PathBuf,
    /// The run tested some kernels only on purpose: committed kernels it left out are not
    /// differences.
    #[arg(long)]
    partial: bool,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Vm(args) => vm::main(args),
        Command::VmTls(args) => vm::tls::main(args),
        Command::VmPowerCut(args) => vm::power_cut::main(args),
        Command::Kernel(args) => vm::kernel_main(args),
        Command::Kernels(args) => vm::kernels_main(args),
        Command::Matrix(args) => write_matrix(args),
        Command::Compare(args) => compare_results(args),
        Command::Diff(args) => diff(args),
        Command::Scenarios => {
            list_scenarios();
            Ok(ExitCode::SUCCESS)
        }
    };
    match result {
        Ok(code) => code,
        Err(message) => {
            eprintln!("nbdfault-client-tests: {message}");
            ExitCode::from(2)
        }
    }
}

fn run(args: RunArgs) -> Result<ExitCode, String> {
    let control = Control::new(&args.control, &args.export, args.token.clone()).map_err(|e| e.to_string())?;
    let filesystems: Vec<fs::Fs> = fs::parse_list(&args.fs)?.into_iter().fold(Vec::new(), |mut all, f| {
        if !all.contains(&f) {
            all.push(f);
        }
        all
    });
    let config = SuiteConfig {
        device: args.device,
        control,
        filesystems,
        mountpoint: args.mountpoint,
        only: args.only,
        delay: Duration::from_millis(args.delay_ms),
        kernel_package: args.kernel_package,
    };
    let mut progress = |line: &str| eprintln!("nbdfault: {line}");
    let reports = suite::run_suite(&config, &mut progress).map_err(|e| format!("{e}"))?;
    if let Some(path) = &args.report {
        write_report(path, &reports).map_err(|e| format!("cannot write the report to {}: {e}", path.display()))?;
    }
    let mut failing = 0;
    for report in &reports {
        println!("{}", report.table());
        failing += report.failures().count();
    }
    if failing > 0 {
        eprintln!(
            "nbdfault: {failing} check(s) failed: a guaranteed invariant was violated or a check could not be carried out (marked !)"
        );
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

fn write_report(path: &Path, reports: &[Report]) -> std::io::Result<()> {
    let mut file = OpenOptions::new().write(true).create(true).truncate(!is_device(path)).open(path)?;
    os::make_raw_if_terminal(&file)?;
    let json = serde_json::to_string(reports).map_err(std::io::Error::other)?;
    write!(file, "\n{REPORT_BEGIN}\n{json}\n{REPORT_END}\n")?;
    file.flush()?;
    file.sync_all().or(Ok(()))
}

fn is_device(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path).map(|m| m.file_type().is_char_device()).unwrap_or(false)
}

fn write_matrix(args: MatrixArgs) -> Result<ExitCode, String> {
    let reports = matrix::load_reports(&args.results).map_err(|e| e.to_string())?;
    if reports.is_empty() {
        return Err(format!(
            "no JSON reports in {}: run `nbdfault-client-tests vm --out {}` first",
            args.results.display(),
            args.results.display()
        ));
    }
    let text = matrix::markdown(&reports, &args.made_by);
    match &args.output {
        Some(path) => std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?,
        None => print!("{text}"),
    }
    Ok(ExitCode::SUCCESS)
}

fn compare_results(args: CompareArgs) -> Result<ExitCode, String> {
    let committed = matrix::load_reports(&args.committed).map_err(|e| e.to_string())?;
    let run = matrix::load_reports(&args.run).map_err(|e| e.to_string())?;
    if run.is_empty() {
        return Err(format!("no JSON reports in {}: nothing to compare", args.run.display()));
    }
    let comparison = compare::compare(&committed, &run, args.partial)?;
    for note in &comparison.notes {
        println!("note: {note}");
    }
    if comparison.differences.is_empty() {
        println!(
            "the verdicts of {} match the committed results in {} ({} reports)",
            args.run.display(),
            args.committed.display(),
            run.len()
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{} difference(s) between the committed results ({}) and this run ({}):",
        comparison.differences.len(),
        args.committed.display(),
        args.run.display()
    );
    for difference in &comparison.differences {
        println!("  {difference}");
    }
    println!(
        "If the kernels really behave so now, refresh the committed matrix with \
         `bash scripts/client-tests-matrix.sh --refresh` and commit client-tests/results/ and docs/results.md."
    );
    Ok(ExitCode::from(1))
}

fn diff(args: DiffArgs) -> Result<ExitCode, String> {
    if !args.kernel.is_empty() {
        if args.kernel.len() != 2 {
            return Err(format!("diff --kernel takes two kernels, got {}: {:?}", args.kernel.len(), args.kernel));
        }
        let mut argv = vec!["nbdfault-client-tests".to_string(), "vm".to_string()];
        for k in &args.kernel {
            argv.extend(["--kernel".to_string(), k.clone()]);
        }
        argv.extend(["--fs".to_string(), args.fs.clone().unwrap_or_else(|| "all".into())]);
        argv.extend(["--only".to_string(), args.only.clone().unwrap_or_default()]);
        let Command::Vm(vm_args) = Cli::try_parse_from(argv).map_err(|e| e.to_string())?.command else {
            unreachable!("the arguments name the vm command")
        };
        return vm::main(vm_args);
    }
    let (Some(before), Some(after)) = (&args.before, &args.after) else {
        return Err("give two reports, or --kernel A --kernel B".into());
    };
    if args.fs.is_some() || args.only.is_some() {
        return Err("--fs and --only choose what --kernel runs; two reports are compared whole".into());
    }
    let before = nbdfault_client_tests::diff::load(before)?;
    let after = nbdfault_client_tests::diff::load(after)?;
    let changes = nbdfault_client_tests::diff::changes(&before, &after)?;
    print!(
        "{}",
        nbdfault_client_tests::diff::render(&before, &after, &changes, nbdfault_client_tests::diff::columns())
    );
    Ok(if changes.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

fn list_scenarios() {
    for scenario in suite::scenarios() {
        println!("{}: {}", scenario.name, scenario.about);
        for check in scenario.checks {
            let only = check.only.map(|f| format!(" ({f} only)")).unwrap_or_default();
            println!("    {:<45} #{:<2} {:<5} {}{only}", check.id, check.invariant, check.class.short(), check.title);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_accepts_the_documented_invocation() {
        let cli = Cli::try_parse_from([
            "nbdfault-client-tests",
            "run",
            "--device",
            "/dev/nbd0",
            "--control",
            "http://10.0.2.2:1",
            "--export",
            "disk",
            "--fs",
            "xfs,ext4",
            "--only",
            "views,recovery",
        ])
        .unwrap();
        let Command::Run(args) = cli.command else { panic!("not run") };
        assert_eq!(fs::parse_list(&args.fs).unwrap(), vec![fs::Fs::Xfs, fs::Fs::Ext4]);
        assert_eq!(args.only, vec!["views", "recovery"]);
    }

    #[test]
    fn vm_needs_a_kernel_or_an_image() {
        assert!(Cli::try_parse_from(["nbdfault-client-tests", "vm"]).is_err());
        assert!(Cli::try_parse_from(["nbdfault-client-tests", "vm", "--kernel", "6.1", "--fs", "all"]).is_ok());
        assert!(Cli::try_parse_from(["nbdfault-client-tests", "vm", "--vmlinuz", "/boot/vmlinuz"]).is_ok());
        let cli = Cli::try_parse_from(["nbdfault-client-tests", "vm", "--kernel", "6.12", "--kernel", "7.2"]).unwrap();
        let Command::Vm(args) = cli.command else { panic!("not vm") };
        assert_eq!(args.kernel, ["6.12", "7.2"]);
        assert!(
            Cli::try_parse_from(["nbdfault-client-tests", "vm", "--kernel", "6.12", "--vmlinuz", "/boot/vmlinuz"])
                .is_err()
        );
    }

    #[test]
    fn diff_takes_two_reports() {
        assert!(Cli::try_parse_from(["nbdfault-client-tests", "diff", "a.json", "b.json"]).is_ok());
        assert!(Cli::try_parse_from(["nbdfault-client-tests", "diff", "a.json"]).is_err());
        assert!(Cli::try_parse_from(["nbdfault-client-tests", "diff"]).is_err());
        let cli = Cli::try_parse_from([
            "nbdfault-client-tests",
            "diff",
            "--kernel",
            "6.12",
            "--kernel",
            "7.2",
            "--fs",
            "xfs",
        ])
        .unwrap();
        let Command::Diff(args) = cli.command else { panic!("not diff") };
        assert_eq!(args.kernel, ["6.12", "7.2"]);
        assert!(
            Cli::try_parse_from(["nbdfault-client-tests", "diff", "a.json", "b.json", "--kernel", "6.12"]).is_err()
        );
    }
}
