//! A bootable kernel for the guest: a Debian package fetched through [`super::debian`] (or a
//! `.deb` the user built) with the packages it is split into, unpacked once into the cache and
//! reduced to the kernel image and the modules the guest loads, in load order. A kernel built by hand is taken as `--vmlinuz` plus an
//! optional modules directory.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

use super::debian::{Apt, AptError, KernelPackage, companions, find_deb};
use super::modules::{Module, ModuleError, ModuleTree};

/// The modules the guest needs: the NBD driver, XFS and ext4, and the network card.
pub const WANTED_MODULES: &[&str] = &["nbd", "xfs", "ext4", "virtio_pci", "virtio_net"];
/// Loaded when the kernel has them: btrfs (a kernel without it runs the suite on XFS and ext4).
pub const OPTIONAL_MODULES: &[&str] = &["btrfs"];

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
    /// The packages unpacked, `NAME=VERSION` (several for the split 7.x packaging).
    #[serde(default)]
    parts: Vec<String>,
    /// The modules asked for when it was unpacked; a cache entry made for another list is
    /// unpacked again.
    #[serde(default)]
    asked: Vec<String>,
}

fn asked_modules() -> Vec<String> {
    WANTED_MODULES.iter().chain(OPTIONAL_MODULES).map(|m| m.to_string()).collect()
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

/// Fetches (or finds in the cache) the kernel `spec` names: a version prefix (`6.1`, `7`), a
/// Debian package name, or the path of a `.deb`.
pub fn prepare(
    cache: &Path,
    mirror: &str,
    spec: &str,
    refresh: bool,
    progress: &mut dyn FnMut(&str),
) -> Result<PreparedKernel, KernelError> {
    let apt = Apt::new(&cache.join("apt"), mirror);
    let package = identify(&apt, spec, refresh, progress)?;
    let dir = kernel_dir(cache, &package);
    if let Some(kernel) = load_cached(&dir, &package)? {
        progress("kernel found in the cache");
        return Ok(kernel);
    }
    let parts = fetch_parts(&apt, &package, spec, refresh, progress)?;
    progress(&format!("unpacking {}", parts.iter().map(|(p, _)| p.name.as_str()).collect::<Vec<_>>().join(", ")));
    unpack(&parts, &package, &dir)?;
    load_cached(&dir, &package)?
        .ok_or_else(|| KernelError::Package { path: dir, message: "unpacked, but the manifest is unreadable".into() })
}

/// The package `spec` stands for: the `.deb` itself, or what apt resolves the name or version to.
fn identify(
    apt: &Apt,
    spec: &str,
    refresh: bool,
    progress: &mut dyn FnMut(&str),
) -> Result<KernelPackage, KernelError> {
    if let Some(deb) = local_deb(spec) {
        return deb_identity(deb);
    }
    progress("reading Debian's package lists (private apt configuration)");
    if apt.update(refresh)? {
        progress("package lists downloaded");
    }
    let offer = apt.resolve(spec)?;
    progress(&format!(
        "kernel {spec} is {} {} ({})",
        offer.package.name,
        offer.package.version,
        offer.suites.join(", ")
    ));
    Ok(offer.package)
}

fn local_deb(spec: &str) -> Option<&Path> {
    let path = Path::new(spec);
    (spec.ends_with(".deb") && path.is_file()).then_some(path)
}

/// Every `.deb` that makes up the kernel: the package itself and, following [`companions`], the
/// image, modules and base packages its Depends pin to the same version (7.x splits them). A
/// companion of a local `.deb` is taken from the same directory when it is there, else from
/// Debian.
pub fn fetch_parts(
    apt: &Apt,
    package: &KernelPackage,
    spec: &str,
    refresh: bool,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<(KernelPackage, PathBuf)>, KernelError> {
    let local = local_deb(spec);
    let beside = local.and_then(Path::parent);
    let mut lists_read = local.is_none();
    let mut queue = vec![(package.clone(), local.map(Path::to_path_buf))];
    let mut parts: Vec<(KernelPackage, PathBuf)> = Vec::new();
    while let Some((part, deb)) = queue.pop() {
        if parts.iter().any(|(p, _)| *p == part) {
            continue;
        }
        if parts.len() >= 8 {
            return Err(KernelError::Package {
                path: PathBuf::from(&package.name),
                message: format!("more than 8 packages make up this kernel: {parts:?}"),
            });
        }
        let deb = match deb.or_else(|| beside.and_then(|d| find_deb(d, &part))) {
            Some(deb) => deb,
            None => {
                if !lists_read {
                    apt.update(refresh)?;
                    lists_read = true;
                }
                if !apt.has_downloaded(&part) {
                    progress(&format!("downloading {} {}", part.name, part.version));
                }
                apt.download(&part)?
            }
        };
        let depends = deb_field(&deb, "Depends")?;
        queue.extend(companions(&part, &depends).into_iter().map(|c| (c, None)));
        parts.push((part, deb));
    }
    Ok(parts)
}

/// Unpacks every part into `dest` as Debian would install them, and returns the kernel image and
/// the `lib/modules/RELEASE` directory: the tree a kernel developer has after `make
/// modules_install INSTALL_MOD_PATH=`, ready for `vm --vmlinuz --modules`.
pub fn extract(parts: &[(KernelPackage, PathBuf)], dest: &Path) -> Result<(PathBuf, PathBuf), KernelError> {
    std::fs::create_dir_all(dest)?;
    for (_, deb) in parts {
        let out = Command::new("dpkg-deb").arg("-x").arg(deb).arg(dest).output()?;
        if !out.status.success() {
            return Err(KernelError::Package {
                path: deb.clone(),
                message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
    }
    let names = || parts.iter().map(|(p, _)| p.name.as_str()).collect::<Vec<_>>().join(", ");
    let vmlinuz = find_vmlinuz(dest).ok_or_else(|| KernelError::Package {
        path: dest.to_path_buf(),
        message: format!("no kernel image (boot/vmlinuz-* or lib/modules/RELEASE/vmlinuz) in {}", names()),
    })?;
    let modules = modules_root(dest).ok_or_else(|| KernelError::Package {
        path: dest.to_path_buf(),
        message: format!("no lib/modules/RELEASE in {}", names()),
    })?;
    Ok((vmlinuz, modules))
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
            (release, tree.resolve(WANTED_MODULES, OPTIONAL_MODULES)?)
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
    if manifest.asked != asked_modules() {
        return Ok(None);
    }
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

/// One control field of a `.deb` (empty when the package has none).
fn deb_field(deb: &Path, field: &str) -> Result<String, KernelError> {
    let out = Command::new("dpkg-deb").arg("-f").arg(deb).arg(field).output()?;
    if !out.status.success() {
        return Err(KernelError::Package {
            path: deb.to_path_buf(),
            message: format!("not a Debian package: {}", String::from_utf8_lossy(&out.stderr).trim()),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).split_whitespace().collect::<Vec<_>>().join(" "))
}

fn deb_identity(deb: &Path) -> Result<KernelPackage, KernelError> {
    let name = deb_field(deb, "Package")?;
    let version = deb_field(deb, "Version")?;
    if name.is_empty() || version.is_empty() {
        return Err(KernelError::Package { path: deb.to_path_buf(), message: "no Package or Version field".into() });
    }
    Ok(KernelPackage { name, version })
}

/// Unpacks the parts into a scratch directory, keeps the kernel image and the needed modules
/// (decompressed, in load order) in `dir`, and removes the scratch directory.
fn unpack(parts: &[(KernelPackage, PathBuf)], package: &KernelPackage, dir: &Path) -> Result<(), KernelError> {
    let scratch = dir.with_extension(format!("unpack-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    let result = (|| {
        let (vmlinuz, modules_root) = extract(parts, &scratch)?;
        let release = modules_root.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let mods = ModuleTree::open(&modules_root)?.resolve(WANTED_MODULES, OPTIONAL_MODULES)?;
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
        let manifest = Manifest {
            package: package.name.clone(),
            version: package.version.clone(),
            release,
            modules: names,
            parts: parts.iter().map(|(p, _)| format!("{}={}", p.name, p.version)).collect(),
            asked: asked_modules(),
        };
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

/// The `lib/modules/RELEASE` (or `usr/lib/modules/RELEASE`) directory of an unpacked tree.
fn modules_root(tree: &Path) -> Option<PathBuf> {
    ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|p| tree.join(p))
        .filter(|p| p.is_dir())
        .find_map(|p| std::fs::read_dir(p).ok()?.flatten().map(|e| e.path()).find(|p| p.is_dir()))
}

/// The kernel image: `boot/vmlinuz-*` (up to 6.x) or `usr/lib/modules/RELEASE/vmlinuz` (7.x).
fn find_vmlinuz(tree: &Path) -> Option<PathBuf> {
    let in_boot = std::fs::read_dir(tree.join("boot")).ok().and_then(|entries| {
        entries
            .flatten()
            .map(|e| e.path())
            .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("vmlinuz")))
    });
    in_boot.or_else(|| modules_root(tree).map(|m| m.join("vmlinuz")).filter(|p| p.is_file()))
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
            parts: vec![],
            asked: asked_modules(),
        };
        std::fs::write(dir.join("kernel.json"), serde_json::to_string(&manifest).unwrap()).unwrap();
        let k = load_cached(&dir, &package).unwrap().unwrap();
        assert_eq!(k.release, "6.1.0-test");
        assert_eq!(k.modules, vec![Module { name: "nbd".into(), data: b"elf".to_vec() }]);
        assert!(dir.to_string_lossy().ends_with("linux-image-test_1_6.1.0-1"));
        std::fs::remove_dir_all(cache).unwrap();
    }
}
