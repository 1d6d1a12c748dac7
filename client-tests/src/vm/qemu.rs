//! The guest: qemu with software emulation (TCG; KVM hangs on these hosts), user-mode networking
//! only, the console on the first serial port (piped to the host) and the report on the second
//! (a file).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How to boot.
#[derive(Debug, Clone)]
pub struct QemuConfig {
    pub qemu: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub append: String,
    pub memory_mib: u32,
    pub cpus: u32,
    /// The second serial port is written here.
    pub report: PathBuf,
    /// Everything the console printed.
    pub console_log: PathBuf,
    pub timeout: Duration,
}

/// How the guest ended.
#[derive(Debug)]
pub struct QemuOutcome {
    pub status: Option<ExitStatus>,
    pub timed_out: bool,
    pub elapsed: Duration,
}

/// The qemu arguments for `config`.
pub fn arguments(config: &QemuConfig) -> Vec<String> {
    let mut args: Vec<String> = [
        "-accel",
        "tcg,thread=multi",
        "-cpu",
        "max",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-monitor",
        "none",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(["-m".into(), config.memory_mib.to_string(), "-smp".into(), config.cpus.to_string()]);
    args.extend([
        "-kernel".into(),
        config.kernel.display().to_string(),
        "-initrd".into(),
        config.initrd.display().to_string(),
    ]);
    args.extend(["-append".into(), config.append.clone()]);
    args.extend(["-serial".into(), "stdio".into(), "-serial".into(), format!("file:{}", config.report.display())]);
    args.extend(["-nic".into(), "user,model=virtio-net-pci".into()]);
    args
}

/// Boots the guest and waits until it powers off or the timeout passes. Every console line goes
/// to the log and to `on_line`.
pub fn run(config: &QemuConfig, on_line: &mut dyn FnMut(&str)) -> std::io::Result<QemuOutcome> {
    let mut log = std::fs::File::create(&config.console_log)?;
    let mut child = Command::new(&config.qemu)
        .args(arguments(config))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let stderr = child.stderr.take().expect("stderr is piped");
    let (tx, rx) = mpsc::channel::<String>();
    let tx_err = tx.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).split(b'\n').map_while(Result::ok) {
            let _ = tx.send(String::from_utf8_lossy(&line).into_owned());
        }
    });
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx_err.send(format!("qemu: {line}"));
        }
    });
    let start = Instant::now();
    let mut timed_out = false;
    let status = loop {
        while let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            let _ = writeln!(log, "{}", line.trim_end_matches('\r'));
            on_line(&line);
        }
        if let Some(status) = child.try_wait()? {
            while let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
                let _ = writeln!(log, "{}", line.trim_end_matches('\r'));
                on_line(&line);
            }
            break Some(status);
        }
        if start.elapsed() > config.timeout {
            timed_out = true;
            let _ = child.kill();
            break child.wait().ok();
        }
    };
    Ok(QemuOutcome { status, timed_out, elapsed: start.elapsed() })
}

/// Fails early, with what to install, when qemu is missing.
pub fn check_available(qemu: &Path) -> Result<(), String> {
    match Command::new(qemu).arg("--version").output() {
        Ok(out) if out.status.success() => Ok(()),
        _ => Err(format!("cannot run {}: install qemu-system-x86 (apt-get install qemu-system-x86)", qemu.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_use_tcg_user_networking_and_two_serial_ports() {
        let config = QemuConfig {
            qemu: "qemu-system-x86_64".into(),
            kernel: "/k".into(),
            initrd: "/i".into(),
            append: "console=ttyS0".into(),
            memory_mib: 1024,
            cpus: 2,
            report: "/tmp/report".into(),
            console_log: "/tmp/console".into(),
            timeout: Duration::from_secs(1),
        };
        let args = arguments(&config).join(" ");
        assert!(args.contains("-accel tcg"));
        assert!(!args.contains("kvm"));
        assert!(args.contains("-serial stdio -serial file:/tmp/report"));
        assert!(args.contains("-nic user,model=virtio-net-pci"));
        assert!(args.contains("-append console=ttyS0"));
        assert!(args.contains("-nodefaults"));
    }

    #[test]
    fn a_missing_qemu_names_the_package() {
        let err = check_available(Path::new("/nonexistent/qemu")).unwrap_err();
        assert!(err.contains("qemu-system-x86"));
    }
}
