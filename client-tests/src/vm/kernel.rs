//! A bootable kernel for the guest: a Debian package fetched through [`super::debian`] (or a
//! `.deb` the user built), unpacked once into the cache and reduced to the kernel image and the
//! modules the guest loads, in load order. A kernel built by hand is taken as `--vmlinuz` plus an
//! optional modules directory.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

use super::debian::{Apt, AptError, KernelPackage};
use super::modules::{Module, ModuleError, ModuleTree};

/// The modules the guest needs: the NBD driver, both filesystems, and the network card.
pub const WANTED_MODULES: &[&str] = &["nbd", "xfs", "ext4", "virtio_pci", "virtio_net"];

/// Why a kernel could not be made ready.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(transparent)]
    Apt(#[from] AptError),
    #[error(transparent)]
    Modules(#[from] ModuleError),
    #[error("{path}: {message}")]
    Package { path: PathBuf, message: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// What the cache keeps of one kernel package.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Manifest {
    package: String,
    version: String,
    release: String,
    /// Module file names in `modules/`, in load order.
    modules: Vec<String>,
}

/// A kernel ready to boot.
#[derive(Debug, Clone)]
pub struct PreparedKernel {
    pub vmlinuz: PathBuf,
    /// `uname -r` of the kernel.
    pub release: String,
    /// The Debian package and version, when it came from one.
    pub package: Option<KernelPackage>,
    pub modules: Vec<Module>,
}

impl PreparedKernel {
    /// A short label for file names and columns: the upstream version, else the release.
    pub fn label(&self) -> String {
        self.package
            .as_ref()
            .and_then(KernelPackage::upstream)
            .map(|v| v.to_string())
            .unwrap_or_else(|| self.release.clone())
    }
}

/// Fetches (or finds in the cache) the kernel `spec` names: a version prefix (`6.1`), a Debian
/// package name, or the path of a `.deb`.
pub fn prepare(
    cache: &Path,
    mirror: &str,
    spec: &str,
    refresh: bool,
    progress: &mut dyn FnMut(&str),
) -> Result<PreparedKernel, KernelError> {
    let (package, deb) = if spec.ends_with(".deb") && Path::new(spec).is_file() {
        let deb = PathBuf::from(spec);
        (deb_identity(&deb)?, deb)
    } else {
        let apt = Apt::new(&cache.join("apt"), mirror);
        progress("reading Debian's package lists (private apt configuration)");
        if apt.update(refresh)? {
            progress("package lists downloaded");
        }
        let package = apt.resolve(spec)?;
        progress(&format!("kernel {spec} is {} {}", package.name, package.version));
        let dir = kernel_dir(cache, &package);
        if let Some(kernel) = load_cached(&dir, &package)? {
            progress("kernel found in the cache");
            return Ok(kernel);
        }
        progress(&format!("downloading {}", package.name));
        let deb = apt.download(&package)?;
        (package, deb)
    };
    let dir = kernel_dir(cache, &package);
    if let Some(kernel) = load_cached(&dir, &package)? {
        return Ok(kernel);
    }
    progress(&format!("unpacking {}", deb.display()));
    unpack(&deb, &package, &dir)?;
    load_cached(&dir, &package)?
        .ok_or_else(|| KernelError::Package { path: dir, message: "unpacked, but the manifest is unreadable".into() })
}

/// A kernel built by hand: its image and, unless everything is built in, its
/// `lib/modules/RELEASE` directory.
pub fn custom(vmlinuz: &Path, modules_dir: Option<&Path>) -> Result<PreparedKernel, KernelError> {
    if !vmlinuz.is_file() {
        return Err(KernelError::Package { path: vmlinuz.to_path_buf(), message: "no such kernel image".into() });
    }
    let (release, modules) = match modules_dir {
        Some(dir) => {
            let tree = ModuleTree::open(dir)?;
            let release = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            (release, tree.resolve(WANTED_MODULES, &[])?)
        }
        None => ("custom".to_string(), Vec::new()),
    };
    Ok(PreparedKernel { vmlinuz: vmlinuz.to_path_buf(), release, package: None, modules })
}

fn kernel_dir(cache: &Path, package: &KernelPackage) -> PathBuf {
    cache.join("kernels").join(format!("{}_{}", package.name, package.version.replace([':', '/'], "_")))
}

fn load_cached(dir: &Path, package: &KernelPackage) -> Result<Option<PreparedKernel>, KernelError> {
    let Ok(text) = std::fs::read_to_string(dir.join("kernel.json")) else {
        return Ok(None);
    };
    let Ok(manifest) = serde_json::from_str::<Manifest>(&text) else {
        return Ok(None);
    };
    let mut mods = Vec::new();
    for name in &manifest.modules {
        mods.push(Module {
            name: name.trim_end_matches(".ko").to_string(),
            data: std::fs::read(dir.join("modules").join(name))?,
        });
    }
    Ok(Some(PreparedKernel {
        vmlinuz: dir.join("vmlinuz"),
        release: manifest.release,
        package: Some(package.clone()),
        modules: mods,
    }))
}

fn deb_identity(deb: &Path) -> Result<KernelPackage, KernelError> {
    let out = Command::new("dpkg-deb").args(["-f"]).arg(deb).args(["Package", "Version"]).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| text.lines().find_map(|l| l.strip_prefix(&format!("{name}: "))).map(str::to_string);
    match (out.status.success(), field("Package"), field("Version")) {
        (true, Some(name), Some(version)) => Ok(KernelPackage { name, version }),
        _ => Err(KernelError::Package {
            path: deb.to_path_buf(),
            message: format!("not a Debian package: {}", String::from_utf8_lossy(&out.stderr).trim()),
        }),
    }
}

/// Unpacks `deb` into a scratch directory, keeps the kernel image and the needed modules
/// (decompressed, in load order) in `dir`, and removes the scratch directory.
fn unpack(deb: &Path, package: &KernelPackage, dir: &Path) -> Result<(), KernelError> {
    let scratch = dir.with_extension(format!("unpack-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch)?;
    let result = (|| {
        let out = Command::new("dpkg-deb").arg("-x").arg(deb).arg(&scratch).output()?;
        if !out.status.success() {
            return Err(KernelError::Package {
                path: deb.to_path_buf(),
                message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        let vmlinuz = find_vmlinuz(&scratch.join("boot")).ok_or_else(|| KernelError::Package {
            path: deb.to_path_buf(),
            message: "no boot/vmlinuz-* inside".into(),
        })?;
        let modules_root = ["lib/modules", "usr/lib/modules"]
            .iter()
            .map(|p| scratch.join(p))
            .find(|p| p.is_dir())
            .and_then(|p| std::fs::read_dir(p).ok()?.flatten().map(|e| e.path()).find(|p| p.is_dir()))
            .ok_or_else(|| KernelError::Package {
                path: deb.to_path_buf(),
                message: "no lib/modules/RELEASE inside".into(),
            })?;
        let release = modules_root.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let mods = ModuleTree::open(&modules_root)?.resolve(WANTED_MODULES, &[])?;
        let staging = dir.with_extension(format!("staging-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::create_dir_all(staging.join("modules"))?;
        std::fs::copy(&vmlinuz, staging.join("vmlinuz"))?;
        let mut names = Vec::new();
        for m in &mods {
            let name = format!("{}.ko", m.name);
            std::fs::write(staging.join("modules").join(&name), &m.data)?;
            names.push(name);
        }
        let manifest =
            Manifest { package: package.name.clone(), version: package.version.clone(), release, modules: names };
        std::fs::write(
            staging.join("kernel.json"),
            serde_json::to_string_pretty(&manifest).map_err(std::io::Error::other)?,
        )?;
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir.parent().unwrap_or(dir))?;
        std::fs::rename(&staging, dir)?;
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

fn find_vmlinuz(boot: &Path) -> Option<PathBuf> {
    std::fs::read_dir(boot)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("vmlinuz")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_prefers_the_upstream_version() {
        let k = PreparedKernel {
            vmlinuz: PathBuf::from("/x"),
            release: "6.1.0-56-amd64".into(),
            package: Some(KernelPackage { name: "linux-image-6.1.0-56-amd64".into(), version: "6.1.192-2".into() }),
            modules: vec![],
        };
        assert_eq!(k.label(), "6.1.192");
        assert_eq!(PreparedKernel { package: None, ..k }.label(), "6.1.0-56-amd64");
    }

    #[test]
    fn a_custom_kernel_without_modules_needs_only_its_image() {
        let err = custom(Path::new("/nonexistent/vmlinuz"), None).unwrap_err().to_string();
        assert!(err.contains("no such kernel image"), "{err}");
    }

    #[test]
    fn cached_kernels_load_from_their_manifest() {
        let cache = std::env::temp_dir().join(format!("nbdfault-kcache-{}", std::process::id()));
        let package = KernelPackage { name: "linux-image-test".into(), version: "1:6.1.0-1".into() };
        let dir = kernel_dir(&cache, &package);
        assert!(load_cached(&dir, &package).unwrap().is_none());
        std::fs::create_dir_all(dir.join("modules")).unwrap();
        std::fs::write(dir.join("modules/nbd.ko"), b"elf").unwrap();
        let manifest = Manifest {
            package: package.name.clone(),
            version: package.version.clone(),
            release: "6.1.0-test".into(),
            modules: vec!["nbd.ko".into()],
        };
        std::fs::write(dir.join("kernel.json"), serde_json::to_string(&manifest).unwrap()).unwrap();
        let k = load_cached(&dir, &package).unwrap().unwrap();
        assert_eq!(k.release, "6.1.0-test");
        assert_eq!(k.modules, vec![Module { name: "nbd".into(), data: b"elf".to_vec() }]);
        assert!(dir.to_string_lossy().ends_with("linux-image-test_1_6.1.0-1"));
        std::fs::remove_dir_all(cache).unwrap();
    }
}
