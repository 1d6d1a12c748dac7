//! The guest's initramfs: a cpio (newc) archive with busybox, nbd-client, mkfs.xfs and
//! mkfs.ext4 from the host with the shared libraries they load, the statically linked suite
//! binary, the kernel's modules in load order, and the init script.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::modules::Module;

/// Why the initramfs could not be built.
#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    #[error("cannot find `{0}` on this machine: install it (scripts/vm-deps.sh lists the packages) or pass its path")]
    MissingTool(String),
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot list the libraries of {path}: {message}")]
    Ldd { path: PathBuf, message: String },
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

/// A cpio archive in the "new ASCII" format the kernel unpacks.
#[derive(Default)]
pub struct Cpio {
    buf: Vec<u8>,
    ino: u32,
    dirs: BTreeSet<String>,
}

impl Cpio {
    fn entry(&mut self, path: &str, mode: u32, data: &[u8], rdev: (u32, u32)) {
        self.ino += 1;
        let name = path.trim_start_matches('/');
        let fields = [self.ino, mode, 0, 0, 1, 0, data.len() as u32, 0, 0, rdev.0, rdev.1, name.len() as u32 + 1, 0];
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08X}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while self.buf.len() % 4 != 0 {
            self.buf.push(0);
        }
    }

    /// Adds `path` and its parents as directories (once each).
    pub fn dir(&mut self, path: &str) {
        let mut so_far = String::new();
        for part in path.trim_matches('/').split('/').filter(|p| !p.is_empty()) {
            so_far.push('/');
            so_far.push_str(part);
            if self.dirs.insert(so_far.clone()) {
                let p = so_far.clone();
                self.entry(&p, S_IFDIR | 0o755, &[], (0, 0));
            }
        }
    }

    fn parent(&mut self, path: &str) {
        if let Some((parent, _)) = path.rsplit_once('/')
            && !parent.is_empty()
        {
            self.dir(parent);
        }
    }

    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) {
        self.parent(path);
        self.entry(path, S_IFREG | mode, data, (0, 0));
    }

    pub fn symlink(&mut self, path: &str, target: &str) {
        self.parent(path);
        self.entry(path, S_IFLNK | 0o777, target.as_bytes(), (0, 0));
    }

    pub fn char_device(&mut self, path: &str, major: u32, minor: u32) {
        self.parent(path);
        self.entry(path, S_IFCHR | 0o600, &[], (major, minor));
    }

    /// The archive with its trailer.
    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[], (0, 0));
        while self.buf.len() % 512 != 0 {
            self.buf.push(0);
        }
        self.buf
    }
}

/// Where a program lives: `name` itself if it is a path, else the first match in PATH and the
/// sbin directories (which a normal user's PATH may lack).
pub fn find_tool(name: &str) -> Result<PathBuf, InitramfsError> {
    let as_path = Path::new(name);
    if as_path.components().count() > 1 {
        return if as_path.is_file() {
            Ok(as_path.to_path_buf())
        } else {
            Err(InitramfsError::MissingTool(name.to_string()))
        };
    }
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"])
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| InitramfsError::MissingTool(name.to_string()))
}

/// The shared libraries (and the dynamic loader) `binary` needs, from `ldd`. Empty for static
/// binaries.
pub fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>, InitramfsError> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .map_err(|e| InitramfsError::Ldd { path: binary.to_path_buf(), message: e.to_string() })?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || text.contains("statically linked") {
        let err = String::from_utf8_lossy(&out.stderr);
        if text.contains("statically linked") || err.contains("not a dynamic executable") {
            return Ok(Vec::new());
        }
        return Err(InitramfsError::Ldd { path: binary.to_path_buf(), message: format!("{text}{err}") });
    }
    parse_ldd(&text).map_err(|message| InitramfsError::Ldd { path: binary.to_path_buf(), message })
}

/// Library paths from `ldd` output: `name => /path (addr)` and `/path (addr)` lines.
pub fn parse_ldd(text: &str) -> Result<Vec<PathBuf>, String> {
    let mut libs = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.contains("not found") {
            return Err(format!("missing library: {line}"));
        }
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    Ok(libs)
}

/// A copy of `binary` without debug information, in `dir`: a debug build of the suite is about
/// 55 MiB, mostly DWARF, and the guest kernel copies every byte of the initramfs under emulation
/// (about 6 s of boot per kernel). Falls back to `binary` itself when `objcopy` (binutils) is
/// missing or fails.
pub fn without_debug_info(binary: &Path, dir: &Path) -> PathBuf {
    let copy = dir.join("guest-binary");
    match Command::new("objcopy").arg("--strip-debug").arg(binary).arg(&copy).output() {
        Ok(out) if out.status.success() => copy,
        Ok(out) => {
            tracing::warn!(
                "objcopy --strip-debug failed, the guest gets the binary as built: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            binary.to_path_buf()
        }
        Err(e) => {
            tracing::warn!("no objcopy ({e}), the guest gets the binary as built");
            binary.to_path_buf()
        }
    }
}

/// What goes into the initramfs.
pub struct Contents<'a> {
    pub init_script: &'a str,
    pub guest_binary: &'a Path,
    pub modules: &'a [Module],
    /// Host programs copied as (path in the guest, path on the host): busybox, nbd-client, mkfs.
    pub programs: &'a [(&'a str, PathBuf)],
    /// Plain files copied as they are, such as /etc/mke2fs.conf.
    pub files: &'a [(&'a str, PathBuf)],
}

fn read(path: &Path) -> Result<Vec<u8>, InitramfsError> {
    std::fs::read(path).map_err(|source| InitramfsError::Read { path: path.to_path_buf(), source })
}

/// Builds the archive.
pub fn build(contents: &Contents) -> Result<Vec<u8>, InitramfsError> {
    let mut cpio = Cpio::default();
    for d in [
        "/bin",
        "/sbin",
        "/usr/bin",
        "/usr/sbin",
        "/proc",
        "/sys",
        "/dev",
        "/mnt",
        "/tmp",
        "/run",
        "/etc",
        "/lib/modules",
    ] {
        cpio.dir(d);
    }
    cpio.char_device("/dev/console", 5, 1);
    cpio.file("/init", 0o755, contents.init_script.as_bytes());
    cpio.file("/bin/nbdfault-client-tests", 0o755, &read(contents.guest_binary)?);
    for (i, m) in contents.modules.iter().enumerate() {
        cpio.file(&format!("/lib/modules/{i:03}-{}.ko", m.name), 0o644, &m.data);
    }
    let mut libraries = BTreeSet::new();
    for (guest_path, host_path) in contents.programs {
        cpio.file(guest_path, 0o755, &read(host_path)?);
        libraries.extend(shared_libraries(host_path)?);
    }
    for lib in libraries {
        let data = read(&lib)?;
        cpio.file(&lib.to_string_lossy(), 0o755, &data);
    }
    for (guest_path, host_path) in contents.files {
        cpio.file(guest_path, 0o644, &read(host_path)?);
    }
    Ok(cpio.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lists an archive with the system's cpio, as the kernel would see it.
    fn list(archive: &[u8]) -> String {
        use std::io::Write;
        let mut child = Command::new("cpio")
            .args(["-t", "-v", "--quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("cpio (install the cpio package)");
        child.stdin.take().unwrap().write_all(archive).unwrap();
        String::from_utf8(child.wait_with_output().unwrap().stdout).unwrap()
    }

    #[test]
    fn cpio_archive_lists_files_dirs_links_and_devices() {
        nbdfault_testing::require!(nbdfault_testing::CPIO);
        let mut cpio = Cpio::default();
        cpio.file("/bin/tool", 0o755, b"#!/bin/sh\n");
        cpio.symlink("/bin/sh", "busybox");
        cpio.char_device("/dev/console", 5, 1);
        let listing = list(&cpio.finish());
        assert!(listing.lines().any(|l| l.starts_with("drwxr-xr-x") && l.ends_with(" bin")), "{listing}");
        assert!(
            listing.lines().any(|l| l.starts_with("-rwxr-xr-x") && l.contains(" 10 ") && l.ends_with("bin/tool")),
            "{listing}"
        );
        assert!(listing.lines().any(|l| l.starts_with("lrwxrwxrwx") && l.ends_with("bin/sh -> busybox")), "{listing}");
        assert!(listing.lines().any(|l| l.starts_with("crw-------") && l.ends_with("dev/console")), "{listing}");
    }

    #[test]
    fn ldd_output_yields_library_and_loader_paths() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibuuid.so.1 => /lib/x86_64-linux-gnu/libuuid.so.1 (0x00007f)\n\t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            parse_ldd(text).unwrap(),
            vec![PathBuf::from("/lib/x86_64-linux-gnu/libuuid.so.1"), PathBuf::from("/lib64/ld-linux-x86-64.so.2")]
        );
        assert!(parse_ldd("\tlibfoo.so.1 => not found\n").unwrap_err().contains("libfoo"));
    }

    #[test]
    fn a_dynamic_host_program_brings_its_loader() {
        let libs = shared_libraries(&find_tool("ls").unwrap()).unwrap();
        assert!(libs.iter().any(|l| l.to_string_lossy().contains("ld-linux")), "{libs:?}");
    }

    #[test]
    fn the_guest_binary_copy_has_no_debug_info_and_still_runs() {
        let dir = std::env::temp_dir().join(format!("nbdfault-strip-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let exe = std::env::current_exe().unwrap();
        let copy = without_debug_info(&exe, &dir);
        assert_ne!(copy, exe, "objcopy (binutils) strips a copy");
        assert!(std::fs::metadata(&copy).unwrap().len() < std::fs::metadata(&exe).unwrap().len());
        let out = Command::new(&copy).arg("--list").output().unwrap();
        assert!(out.status.success(), "the stripped test binary still lists its tests");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn missing_tools_say_what_to_install() {
        let err = find_tool("no-such-tool-nbdfault").unwrap_err().to_string();
        assert!(err.contains("no-such-tool-nbdfault") && err.contains("install"), "{err}");
    }
}
