//! Kernel modules for the guest: find them in an unpacked kernel package, read their dependencies
//! from the `.modinfo` section, decompress them, and put them in load order.
//!
//! Debian ships no `modules.dep` in the package (depmod runs at install time) and module paths
//! and compression change between releases (`.ko` on 5.10 and 6.1, `.ko.xz` on 6.12), so nothing
//! here is hard-coded to one version: modules are found by name and ordered by their own
//! `depends=` and `softdep=pre:` fields.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};

/// Why the module set could not be worked out.
#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}: not a 64-bit little-endian ELF module")]
    NotElf(PathBuf),
    #[error("{0}: no .modinfo section")]
    NoModinfo(PathBuf),
    #[error("{path}: cannot decompress: {message}")]
    Decompress { path: PathBuf, message: String },
    #[error("the kernel has no module `{name}` and does not build it in (needed by {needed_by})")]
    Missing { name: String, needed_by: String },
    #[error("module dependency cycle through `{0}`")]
    Cycle(String),
}

/// A module ready to copy into the initramfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    pub name: String,
    /// Uncompressed ELF bytes.
    pub data: Vec<u8>,
}

/// The modules of one kernel: `lib/modules/RELEASE` of an unpacked package.
pub struct ModuleTree {
    by_name: HashMap<String, PathBuf>,
    builtin: HashSet<String>,
}

/// Module names use `_` and `-` interchangeably; `_` is canonical.
pub fn canonical(name: &str) -> String {
    name.replace('-', "_")
}

fn module_name(path: &Path) -> Option<String> {
    let file = path.file_name()?.to_str()?;
    let stem = [".ko", ".ko.xz", ".ko.zst"].iter().find_map(|ext| file.strip_suffix(ext))?;
    Some(canonical(stem))
}

impl ModuleTree {
    /// Indexes every module file under `dir` and reads `modules.builtin`.
    pub fn open(dir: &Path) -> Result<Self, ModuleError> {
        let mut by_name = HashMap::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            let entries = std::fs::read_dir(&d).map_err(|source| ModuleError::Io { path: d.clone(), source })?;
            for entry in entries.flatten() {
                let path = entry.path();
                if path.is_dir() {
                    stack.push(path);
                } else if let Some(name) = module_name(&path) {
                    by_name.insert(name, path);
                }
            }
        }
        let builtin = std::fs::read_to_string(dir.join("modules.builtin"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| module_name(Path::new(l)))
            .collect();
        Ok(ModuleTree { by_name, builtin })
    }

    pub fn is_builtin(&self, name: &str) -> bool {
        self.builtin.contains(&canonical(name))
    }

    /// The file of a module, trying the spellings a soft dependency may use: `crc32c`,
    /// `crypto-crc32c`, and the generic implementation `crc32c_generic`.
    fn find(&self, name: &str) -> Option<(String, &PathBuf)> {
        let name = canonical(name);
        let bare = name.strip_prefix("crypto_").unwrap_or(&name).to_string();
        [name.clone(), bare.clone(), format!("{bare}_generic")]
            .into_iter()
            .find_map(|n| self.by_name.get(&n).map(|p| (n.clone(), p)))
    }

    fn builtin_any(&self, name: &str) -> bool {
        let name = canonical(name);
        let bare = name.strip_prefix("crypto_").unwrap_or(&name).to_string();
        self.is_builtin(&name) || self.is_builtin(&bare) || self.is_builtin(&format!("{bare}_generic"))
    }

    /// `wanted` (which must exist, as modules or built in) and `optional` (loaded when present),
    /// with everything they depend on, dependencies first.
    pub fn resolve(&self, wanted: &[&str], optional: &[&str]) -> Result<Vec<Module>, ModuleError> {
        let mut order = Vec::new();
        let mut done = HashSet::new();
        let mut visiting = HashSet::new();
        for name in optional {
            if self.find(name).is_some() && !self.builtin_any(name) {
                self.visit(name, "the harness", false, &mut order, &mut done, &mut visiting)?;
            }
        }
        for name in wanted {
            self.visit(name, "the harness", true, &mut order, &mut done, &mut visiting)?;
        }
        Ok(order)
    }

    fn visit(
        &self,
        name: &str,
        needed_by: &str,
        required: bool,
        order: &mut Vec<Module>,
        done: &mut HashSet<String>,
        visiting: &mut HashSet<String>,
    ) -> Result<(), ModuleError> {
        if self.builtin_any(name) {
            return Ok(());
        }
        let Some((found, path)) = self.find(name) else {
            if required {
                return Err(ModuleError::Missing { name: name.to_string(), needed_by: needed_by.to_string() });
            }
            return Ok(());
        };
        if done.contains(&found) {
            return Ok(());
        }
        if !visiting.insert(found.clone()) {
            return Err(ModuleError::Cycle(found));
        }
        let data = decompress(path)?;
        let info = modinfo(&data).ok_or_else(|| ModuleError::NoModinfo(path.clone()))?;
        for (key, value) in &info {
            match key.as_str() {
                "depends" => {
                    for dep in value.split(',').filter(|d| !d.is_empty()) {
                        self.visit(dep, &found, true, order, done, visiting)?;
                    }
                }
                "softdep" => {
                    for dep in soft_predeps(value) {
                        self.visit(dep, &found, false, order, done, visiting)?;
                    }
                }
                _ => {}
            }
        }
        visiting.remove(&found);
        done.insert(found.clone());
        order.push(Module { name: found, data });
        Ok(())
    }
}

/// The `pre:` names of a `softdep=` value such as `pre: crc32c post: foo`.
fn soft_predeps(value: &str) -> Vec<&str> {
    let mut pre = Vec::new();
    let mut in_pre = false;
    for word in value.split_whitespace() {
        match word {
            "pre:" => in_pre = true,
            "post:" => in_pre = false,
            w if in_pre => pre.push(w),
            _ => {}
        }
    }
    pre
}

/// Reads a module file, decompressing `.ko.xz` and `.ko.zst`.
pub fn decompress(path: &Path) -> Result<Vec<u8>, ModuleError> {
    let raw = std::fs::read(path).map_err(|source| ModuleError::Io { path: path.to_path_buf(), source })?;
    let name = path.to_string_lossy();
    let fail = |message: String| ModuleError::Decompress { path: path.to_path_buf(), message };
    if name.ends_with(".xz") {
        let mut out = Vec::new();
        lzma_rs::xz_decompress(&mut std::io::BufReader::new(raw.as_slice()), &mut out)
            .map_err(|e| fail(format!("{e:?}")))?;
        Ok(out)
    } else if name.ends_with(".zst") {
        let mut out = Vec::new();
        let mut slice = raw.as_slice();
        let mut decoder = ruzstd::decoding::StreamingDecoder::new(&mut slice).map_err(|e| fail(e.to_string()))?;
        decoder.read_to_end(&mut out).map_err(|e| fail(e.to_string()))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// The `key=value` strings of an ELF module's `.modinfo` section, or `None` when the bytes are
/// not a 64-bit little-endian ELF file with that section.
pub fn modinfo(elf: &[u8]) -> Option<Vec<(String, String)>> {
    if elf.len() < 64 || &elf[0..4] != b"\x7fELF" || elf[4] != 2 || elf[5] != 1 {
        return None;
    }
    let u16_at =
        |at: usize| -> Option<usize> { Some(u16::from_le_bytes(elf.get(at..at + 2)?.try_into().ok()?) as usize) };
    let u32_at =
        |at: usize| -> Option<usize> { Some(u32::from_le_bytes(elf.get(at..at + 4)?.try_into().ok()?) as usize) };
    let u64_at = |at: usize| -> Option<usize> {
        usize::try_from(u64::from_le_bytes(elf.get(at..at + 8)?.try_into().ok()?)).ok()
    };
    let shoff = u64_at(0x28)?;
    let shentsize = u16_at(0x3A)?;
    let shnum = u16_at(0x3C)?;
    let shstrndx = u16_at(0x3E)?;
    let header = |i: usize| shoff.checked_add(i.checked_mul(shentsize)?);
    let strtab = header(shstrndx)?;
    let strtab_off = u64_at(strtab + 24)?;
    for i in 0..shnum {
        let h = header(i)?;
        let name_off = strtab_off.checked_add(u32_at(h)?)?;
        let name_end = elf.get(name_off..)?.iter().position(|b| *b == 0)? + name_off;
        if &elf[name_off..name_end] != b".modinfo" {
            continue;
        }
        let (off, size) = (u64_at(h + 24)?, u64_at(h + 32)?);
        let section = elf.get(off..off.checked_add(size)?)?;
        return Some(
            section
                .split(|b| *b == 0)
                .filter_map(|s| std::str::from_utf8(s).ok())
                .filter_map(|s| s.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
    }
    None
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal ELF64 file with a `.modinfo` section holding `fields`.
    pub(crate) fn fake_module(fields: &[&str]) -> Vec<u8> {
        let mut modinfo = Vec::new();
        for f in fields {
            modinfo.extend_from_slice(f.as_bytes());
            modinfo.push(0);
        }
        let shstrtab = b"\0.modinfo\0.shstrtab\0".to_vec();
        let modinfo_off = 64;
        let shstrtab_off = modinfo_off + modinfo.len();
        let shoff = shstrtab_off + shstrtab.len();
        let mut elf = vec![0u8; 64];
        elf[0..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        elf[5] = 1;
        elf[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        elf[0x3A..0x3C].copy_from_slice(&64u16.to_le_bytes());
        elf[0x3C..0x3E].copy_from_slice(&3u16.to_le_bytes());
        elf[0x3E..0x40].copy_from_slice(&2u16.to_le_bytes());
        elf.extend_from_slice(&modinfo);
        elf.extend_from_slice(&shstrtab);
        let section = |name: u32, off: usize, size: usize| {
            let mut h = vec![0u8; 64];
            h[0..4].copy_from_slice(&name.to_le_bytes());
            h[24..32].copy_from_slice(&(off as u64).to_le_bytes());
            h[32..40].copy_from_slice(&(size as u64).to_le_bytes());
            h
        };
        elf.extend(section(0, 0, 0));
        elf.extend(section(1, modinfo_off, modinfo.len()));
        elf.extend(section(10, shstrtab_off, shstrtab.len()));
        elf
    }

    fn tree(files: &[(&str, Vec<u8>)], builtin: &str) -> (PathBuf, ModuleTree) {
        let dir =
            std::env::temp_dir().join(format!("nbdfault-mods-{}-{}", std::process::id(), files.len() + builtin.len()));
        let _ = std::fs::remove_dir_all(&dir);
        for (path, data) in files {
            let p = dir.join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, data).unwrap();
        }
        std::fs::write(dir.join("modules.builtin"), builtin).unwrap();
        let tree = ModuleTree::open(&dir).unwrap();
        (dir, tree)
    }

    #[test]
    fn modinfo_reads_the_section_strings() {
        let elf = fake_module(&["license=GPL", "depends=libcrc32c,crc16", "softdep=pre: crc32c"]);
        let info = modinfo(&elf).unwrap();
        assert_eq!(info[1], ("depends".to_string(), "libcrc32c,crc16".to_string()));
        assert!(modinfo(b"not an elf file at all, long enough to pass the length check.......").is_none());
    }

    #[test]
    fn dependencies_and_soft_predeps_load_first_and_builtins_are_skipped() {
        let (dir, tree) = tree(
            &[
                ("kernel/fs/xfs/xfs.ko", fake_module(&["depends=libcrc32c"])),
                ("kernel/lib/libcrc32c.ko", fake_module(&["depends=", "softdep=pre: crc32c"])),
                ("kernel/crypto/crc32c_generic.ko", fake_module(&["depends="])),
                ("kernel/drivers/block/nbd.ko", fake_module(&["depends="])),
                ("kernel/drivers/net/virtio_net.ko", fake_module(&["depends=virtio,net_failover"])),
                ("kernel/drivers/net/net_failover.ko", fake_module(&["depends=failover"])),
                ("kernel/net/core/failover.ko", fake_module(&["depends="])),
            ],
            "kernel/drivers/virtio/virtio.ko\n",
        );
        let err = tree.resolve(&["xfs", "nbd", "virtio_net", "virtio_pci"], &[]).unwrap_err().to_string();
        assert!(err.contains("virtio_pci"), "virtio_pci is neither a module nor built in: {err}");
        std::fs::write(
            dir.join("modules.builtin"),
            "kernel/drivers/virtio/virtio.ko\nkernel/drivers/virtio/virtio_pci.ko\n",
        )
        .unwrap();
        let tree = ModuleTree::open(&dir).unwrap();
        let order: Vec<String> = tree
            .resolve(&["xfs", "nbd", "virtio_net", "virtio_pci"], &[])
            .unwrap()
            .into_iter()
            .map(|m| m.name)
            .collect();
        assert_eq!(order, ["crc32c_generic", "libcrc32c", "xfs", "nbd", "failover", "net_failover", "virtio_net"]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_missing_required_module_names_who_needs_it() {
        let (dir, tree) = tree(&[("kernel/fs/ext4/ext4.ko", fake_module(&["depends=jbd2"]))], "");
        let err = tree.resolve(&["ext4"], &[]).unwrap_err().to_string();
        assert!(err.contains("`jbd2`") && err.contains("ext4"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn xz_and_zstd_modules_are_decompressed() {
        let elf = fake_module(&["depends="]);
        let mut xz = Vec::new();
        lzma_rs::xz_compress(&mut std::io::BufReader::new(elf.as_slice()), &mut xz).unwrap();
        let zst = ruzstd::encoding::compress_to_vec(elf.as_slice(), ruzstd::encoding::CompressionLevel::Fastest);
        let (dir, tree) = tree(&[("kernel/a.ko.xz", xz), ("kernel/b.ko.zst", zst)], "");
        let mods = tree.resolve(&["a", "b"], &[]).unwrap();
        assert!(mods.iter().all(|m| m.data == elf));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn soft_predeps_ignore_post_entries() {
        assert_eq!(soft_predeps("pre: crc32c crypto-foo post: bar"), vec!["crc32c", "crypto-foo"]);
    }
}
