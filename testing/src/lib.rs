//! What the workspace's tests share: the outside tools a test needs.
//!
//! A test that runs a program or a Python module from a Debian package says so in its first line:
//!
//! ```no_run
//! use nbdfault_testing::{NBDCOPY, QEMU_IMG, require};
//!
//! // #[test]
//! fn nbdcopy_copies_an_image_both_ways() {
//!     require!(NBDCOPY, QEMU_IMG);
//!     let mut nbdcopy = NBDCOPY.command();
//!     // ...
//! }
//! ```
//!
//! When every tool is there, the test runs. When one is missing, the test is skipped: it prints
//! one line, `SKIP <test>: needs nbdcopy (Debian package libnbd-bin)`, and passes, so `cargo test`
//! works on a machine with only Rust. With `NBDFAULT_REQUIRE_TOOLS=1` in the environment (set
//! by scripts/test.sh, and so in CI) a missing tool fails the test instead, naming the package.
//!
//! Every package named here must be in the lists of scripts/lib/packages.sh (a test below checks
//! it), so the clean root that CI runs the tests in installs it.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::sync::{Mutex, OnceLock};

/// The environment variable that turns a missing tool from a skip into a failure.
pub const REQUIRE_TOOLS: &str = "NBDFAULT_REQUIRE_TOOLS";

/// Debian's Python, which has the Debian packages' modules (a pyenv `python3` earlier on PATH
/// does not).
pub const PYTHON: &str = "/usr/bin/python3";

/// A program on PATH, or a module of Debian's Python, and the Debian package that installs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Tool {
    /// The program's name, or the module's name for `import`.
    pub name: &'static str,
    /// The Debian package to install.
    pub package: &'static str,
    kind: Kind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Program,
    PythonModule,
}

// The tools the workspace's tests run. A test names what it needs with `require!`.
pub const NBDINFO: Tool = Tool::program("nbdinfo", "libnbd-bin");
pub const NBDCOPY: Tool = Tool::program("nbdcopy", "libnbd-bin");
pub const QEMU_IO: Tool = Tool::program("qemu-io", "qemu-utils");
pub const QEMU_IMG: Tool = Tool::program("qemu-img", "qemu-utils");
pub const QEMU_NBD: Tool = Tool::program("qemu-nbd", "qemu-utils");
pub const NBD_CLIENT: Tool = Tool::program("nbd-client", "nbd-client");
pub const FIO: Tool = Tool::program("fio", "fio");
pub const IP: Tool = Tool::program("ip", "iproute2");
pub const UNSHARE: Tool = Tool::program("unshare", "util-linux");
pub const NSENTER: Tool = Tool::program("nsenter", "util-linux");
pub const PRLIMIT: Tool = Tool::program("prlimit", "util-linux");
pub const CHATTR: Tool = Tool::program("chattr", "e2fsprogs");
pub const CURL: Tool = Tool::program("curl", "curl");
pub const MKFS_XFS: Tool = Tool::program("mkfs.xfs", "xfsprogs");
pub const XFS_DB: Tool = Tool::program("xfs_db", "xfsprogs");
pub const MKFS_EXT4: Tool = Tool::program("mkfs.ext4", "e2fsprogs");
pub const MKFS_BTRFS: Tool = Tool::program("mkfs.btrfs", "btrfs-progs");
pub const OPENSSL: Tool = Tool::program("openssl", "openssl");
pub const DEBUGFS: Tool = Tool::program("debugfs", "e2fsprogs");
pub const CPIO: Tool = Tool::program("cpio", "cpio");
pub const BUSYBOX: Tool = Tool::program("busybox", "busybox-static");
/// libnbd's Python binding, which server/tests/python/*_probe.py drive the server with.
pub const PYTHON_NBD: Tool = Tool::python_module("nbd", "python3-libnbd");
pub const PYTHON_JSONSCHEMA: Tool = Tool::python_module("jsonschema", "python3-jsonschema");
pub const PYTHON_YAML: Tool = Tool::python_module("yaml", "python3-yaml");
/// The Prometheus project's own exposition parsers, which read `/metrics` in the tests.
pub const PYTHON_PROMETHEUS: Tool = Tool::python_module("prometheus_client", "python3-prometheus-client");
/// A real browser for the live page's test, driven through WebDriver by Selenium.
pub const CHROMIUM: Tool = Tool::program("chromium", "chromium");
pub const CHROMEDRIVER: Tool = Tool::program("chromedriver", "chromium-driver");
pub const PYTHON_SELENIUM: Tool = Tool::python_module("selenium", "python3-selenium");

/// Every tool above, for the check that the package lists name each package.
pub const ALL: &[Tool] = &[
    NBDINFO,
    NBDCOPY,
    QEMU_IO,
    QEMU_IMG,
    QEMU_NBD,
    NBD_CLIENT,
    FIO,
    IP,
    UNSHARE,
    NSENTER,
    PRLIMIT,
    CHATTR,
    CURL,
    MKFS_XFS,
    XFS_DB,
    MKFS_EXT4,
    MKFS_BTRFS,
    OPENSSL,
    DEBUGFS,
    CPIO,
    BUSYBOX,
    PYTHON_NBD,
    PYTHON_JSONSCHEMA,
    PYTHON_YAML,
    PYTHON_PROMETHEUS,
    CHROMIUM,
    CHROMEDRIVER,
    PYTHON_SELENIUM,
];

impl Tool {
    pub const fn program(name: &'static str, package: &'static str) -> Tool {
        Tool { name, package, kind: Kind::Program }
    }

    pub const fn python_module(name: &'static str, package: &'static str) -> Tool {
        Tool { name, package, kind: Kind::PythonModule }
    }

    /// Whether the program is on PATH, or Debian's Python imports the module. Looked up once per
    /// test process.
    pub fn is_available(&self) -> bool {
        static SEEN: OnceLock<Mutex<HashMap<Tool, bool>>> = OnceLock::new();
        let seen = SEEN.get_or_init(Default::default);
        if let Some(&found) = seen.lock().unwrap().get(self) {
            return found;
        }
        let found = match self.kind {
            Kind::Program => on_path(self.name),
            Kind::PythonModule => Command::new(PYTHON)
                .args(["-c", &format!("import {}", self.name)])
                .output()
                .is_ok_and(|o| o.status.success()),
        };
        seen.lock().unwrap().insert(*self, found);
        found
    }

    /// A command running the program. Fails the test, naming the package, when it is missing: a
    /// test that runs a tool says so first with [`require!`].
    #[track_caller]
    pub fn command(&self) -> Command {
        assert_eq!(self.kind, Kind::Program, "{} is a Python module, not a program", self.name);
        if !self.is_available() {
            panic!("{}", missing_message(&current_test(), &[*self], true));
        }
        Command::new(self.name)
    }

    fn shown(&self) -> String {
        match self.kind {
            Kind::Program => self.name.to_string(),
            Kind::PythonModule => format!("the Python module {} ({PYTHON})", self.name),
        }
    }
}

fn on_path(program: &str) -> bool {
    let is_executable = |path: &Path| {
        use std::os::unix::fs::PermissionsExt;
        path.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| is_executable(&dir.join(program))))
}

/// Skips the test (returns from it) unless every tool given is installed; under
/// `NBDFAULT_REQUIRE_TOOLS=1` fails it instead. See the crate's documentation.
#[macro_export]
macro_rules! require {
    ($($tool:expr),+ $(,)?) => {
        if !$crate::available(&[$($tool),+]) {
            return;
        }
    };
}

/// True when every tool is installed. Otherwise prints one `SKIP` line and returns false, or,
/// with `NBDFAULT_REQUIRE_TOOLS=1`, fails the test naming the packages to install.
#[track_caller]
pub fn available(tools: &[Tool]) -> bool {
    match check(&current_test(), tools, tools_required()) {
        Check::Run => true,
        Check::Skip(line) => {
            report_skip(&line);
            false
        }
        Check::Fail(message) => panic!("{message}"),
    }
}

/// What becomes of a test that needs some tools.
#[derive(Debug, PartialEq, Eq)]
enum Check {
    Run,
    Skip(String),
    Fail(String),
}

fn check(test: &str, tools: &[Tool], required: bool) -> Check {
    let missing: Vec<Tool> = tools.iter().copied().filter(|tool| !tool.is_available()).collect();
    match (missing.is_empty(), required) {
        (true, _) => Check::Run,
        (false, true) => Check::Fail(format!(
            "{}; {REQUIRE_TOOLS} is set, so a missing tool fails the test instead of skipping it",
            missing_message(test, &missing, true)
        )),
        (false, false) => Check::Skip(missing_message(test, &missing, false)),
    }
}

/// Whether a missing tool fails the test (`NBDFAULT_REQUIRE_TOOLS` set, and not to 0).
pub fn tools_required() -> bool {
    std::env::var(REQUIRE_TOOLS).is_ok_and(|value| !value.is_empty() && value != "0")
}

/// The line printed for a skipped test, or the message of a failed one.
fn missing_message(test: &str, missing: &[Tool], fail: bool) -> String {
    let needs = missing.iter().map(|tool| format!("{} (Debian package {})", tool.shown(), tool.package));
    let needs = needs.collect::<Vec<_>>().join(", ");
    if fail {
        let mut packages: Vec<&str> = missing.iter().map(|tool| tool.package).collect();
        packages.dedup();
        format!("{test} needs {needs}: apt-get install {}", packages.join(" "))
    } else {
        format!("SKIP {test}: needs {needs}")
    }
}

/// The test's name: libtest runs each test on a thread named after it.
fn current_test() -> String {
    std::thread::current().name().filter(|name| *name != "main").unwrap_or("this test").to_string()
}

/// Prints a skip line where the person running the tests sees it. libtest does not capture a
/// direct write to stderr. nextest captures each test's output and shows it only on failure, so
/// under nextest the line goes to nextest's own stderr (the test's parent process): through a
/// duplicate of its descriptor, which shares its file offset (so a log file is appended to, not
/// overwritten), else by opening it again, else to the test's own stderr.
fn report_skip(line: &str) {
    let line = format!("{line}\n");
    if std::env::var_os("NEXTEST").is_some() {
        let parent = std::os::unix::process::parent_id();
        let nextest_stderr = duplicate_parent_stderr(parent)
            .or_else(|| std::fs::OpenOptions::new().append(true).open(format!("/proc/{parent}/fd/2")).ok());
        if let Some(mut stderr) = nextest_stderr {
            if stderr.write_all(line.as_bytes()).is_ok() {
                return;
            }
        }
    }
    let _ = std::io::stderr().write_all(line.as_bytes());
}

/// A duplicate of the parent's stderr descriptor (pidfd_getfd, Linux 5.6; needs the right to
/// ptrace the parent, which root has).
fn duplicate_parent_stderr(parent: u32) -> Option<std::fs::File> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, parent as libc::pid_t, 0) };
    if pidfd < 0 {
        return None;
    }
    // SAFETY: pidfd_getfd takes the pidfd just opened, a descriptor number in the parent and
    // flags; it returns a new descriptor of ours or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd as libc::c_int, 2, 0) };
    // SAFETY: pidfd is ours and not used after this.
    unsafe { libc::close(pidfd as libc::c_int) };
    // SAFETY: fd is a new descriptor that nothing else owns.
    (fd >= 0).then(|| unsafe { std::fs::File::from_raw_fd(fd as libc::c_int) })
}

#[cfg(test)]
mod tests {
    use super::*;

    const IMAGINARY: Tool = Tool::program("nbd-imaginary-client", "nbd-imaginary-tools");
    const IMAGINARY_MODULE: Tool = Tool::python_module("nbd_imaginary_module", "python3-nbd-imaginary");

    #[test]
    fn a_missing_tool_is_named_with_its_debian_package() {
        assert!(!IMAGINARY.is_available());
        assert!(!IMAGINARY_MODULE.is_available());
        let skip = missing_message("clients::copies", &[IMAGINARY, IMAGINARY_MODULE], false);
        assert_eq!(
            skip,
            "SKIP clients::copies: needs nbd-imaginary-client (Debian package nbd-imaginary-tools), the Python \
             module nbd_imaginary_module (/usr/bin/python3) (Debian package python3-nbd-imaginary)"
        );
        assert_eq!(skip.lines().count(), 1, "one line per skipped test");
        let fail = missing_message("clients::copies", &[IMAGINARY], true);
        assert!(fail.starts_with("clients::copies needs nbd-imaginary-client"), "{fail}");
        assert!(fail.contains("apt-get install nbd-imaginary-tools"), "{fail}");
    }

    #[test]
    fn a_tool_on_path_is_found() {
        // sh is in every Debian installation (dash, essential).
        assert!(Tool::program("sh", "dash").is_available());
    }

    #[test]
    fn a_missing_tool_skips_the_test_or_fails_it_when_tools_are_required() {
        let sh = Tool::program("sh", "dash");
        assert_eq!(check("t", &[sh], false), Check::Run);
        assert_eq!(check("t", &[sh], true), Check::Run);
        let Check::Skip(line) = check("t", &[sh, IMAGINARY], false) else { panic!("a missing tool skips") };
        assert_eq!(line, "SKIP t: needs nbd-imaginary-client (Debian package nbd-imaginary-tools)");
        let Check::Fail(message) = check("t", &[IMAGINARY, sh], true) else { panic!("a required tool fails") };
        assert!(message.contains("apt-get install nbd-imaginary-tools"), "{message}");
        assert!(message.contains("NBDFAULT_REQUIRE_TOOLS is set"), "{message}");
    }

    #[test]
    fn require_returns_from_the_test_only_when_a_tool_is_missing() {
        fn runs_with(tool: Tool, ran: &mut bool) {
            require!(tool);
            *ran = true;
        }
        let mut ran = false;
        runs_with(Tool::program("sh", "dash"), &mut ran);
        assert!(ran, "a test whose tools are there runs");
    }

    #[test]
    fn a_command_for_a_missing_program_fails_naming_the_package() {
        let result = std::panic::catch_unwind(|| IMAGINARY.command());
        let message = *result.expect_err("the command cannot run").downcast::<String>().unwrap();
        assert!(message.contains("apt-get install nbd-imaginary-tools"), "{message}");
    }

    /// CI installs the lists of scripts/lib/packages.sh into a clean root: a package only named
    /// here would be missing there.
    #[test]
    fn every_package_named_here_is_in_the_package_lists() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/lib/packages.sh");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let mut listed = Vec::new();
        for list in ["BUILD_PACKAGES", "SERVER_TEST_PACKAGES", "CLIENT_UNIT_TEST_PACKAGES"] {
            let start = text.find(&format!("\n{list}=(")).unwrap_or_else(|| panic!("{list} is not in packages.sh"));
            let body = &text[start + list.len() + 3..];
            let body = &body[..body.find(')').expect("the list ends")];
            listed.extend(body.split_whitespace().map(str::to_string));
        }
        assert!(text.contains("TEST_PACKAGES=(\"${BUILD_PACKAGES[@]}\" \"${SERVER_TEST_PACKAGES[@]}\" \"${CLIENT_UNIT_TEST_PACKAGES[@]}\")"));
        for tool in ALL {
            assert!(
                listed.iter().any(|p| p == tool.package),
                "{} is in no test package list of packages.sh",
                tool.package
            );
        }
    }
}
