//! Exports: a name, a device the protocol talks to, and the storage under it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use nbdfault_policies::Engine;
use serde::Serialize;

use crate::fault::log::FaultLog;
use crate::fault::{Clock, FaultLayer};
use crate::storage::BlockDevice;
use crate::wire::transmission_flags as flags;

/// Whether `name` can name an export: the one check for the configuration file, the flags and
/// the control API. Names starting with `@` are the control API's (`@default` is the export
/// `""`), so no export may take one; the protocol limits a name to 4096 bytes without NUL.
pub fn check_export_name(name: &str) -> Result<(), String> {
    if name.starts_with('@') {
        return Err(format!(
            "export name {name:?} starts with @, which the control API keeps for itself (it writes the export \"\" \
             as {}): choose a name that does not start with @",
            nbdfault_control_client::DEFAULT_EXPORT
        ));
    }
    if name.len() > 4096 || name.contains('\0') {
        return Err(format!("export name {name:?} is too long (over 4096 bytes) or has a NUL byte"));
    }
    Ok(())
}

/// One export as clients see it.
pub struct Export {
    pub name: String,
    pub description: String,
    /// How the storage was given (`memory:1GiB`, `file:/images/disk.img`, ...), for humans.
    pub storage_spec: String,
    /// What the protocol reads and writes: the fault layer, over `storage`.
    pub device: Arc<dyn BlockDevice>,
    /// The fault layer itself, for the control API: its engine, journal and reset.
    pub faults: Arc<FaultLayer>,
    /// The storage below the fault layer: what reached the disk.
    pub storage: Arc<dyn BlockDevice>,
    pub read_only: bool,
    pub counters: Counters,
}

/// What an export is made of.
pub struct ExportParts {
    pub name: String,
    pub description: String,
    pub storage_spec: String,
    pub storage: Arc<dyn BlockDevice>,
    pub read_only: bool,
    pub engine: Arc<Engine>,
    pub log: Arc<FaultLog>,
    pub clock: Clock,
}

impl Export {
    /// Puts the fault layer over the storage. Every export has one, so a policy can be attached
    /// at run time; without a policy it passes every request through.
    pub fn new(parts: ExportParts) -> Export {
        let ExportParts { name, description, storage_spec, storage, read_only, engine, log, clock } = parts;
        let faults = Arc::new(FaultLayer::new(&name, Arc::clone(&storage), engine, log, clock));
        let read_only = read_only || storage.features().read_only;
        Export {
            name,
            description,
            storage_spec,
            device: Arc::clone(&faults) as Arc<dyn BlockDevice>,
            faults,
            storage,
            read_only,
            counters: Counters::default(),
        }
    }

    pub fn engine(&self) -> &Arc<Engine> {
        self.faults.engine()
    }

    /// Metrics and live events of the export's requests.
    pub fn activity(&self) -> &crate::activity::Activity {
        self.faults.activity()
    }

    /// The device's power: on, or off after a power cut; every connection attaches through it.
    pub fn power(&self) -> &Arc<crate::fault::power::Power> {
        self.faults.power()
    }

    pub fn size(&self) -> u64 {
        self.device.size()
    }

    /// The transmission flags for a client; each is set only when it is true for this export.
    /// SEND_DF only makes sense, and is only allowed, with structured replies.
    pub fn transmission_flags(&self, structured_replies: bool) -> u16 {
        let features = self.device.features();
        let writable = !self.read_only;
        let mut value = flags::HAS_FLAGS;
        let mut set = |condition: bool, flag: u16| {
            if condition {
                value |= flag;
            }
        };
        set(!writable, flags::READ_ONLY);
        set(writable, flags::SEND_FLUSH);
        set(writable, flags::SEND_FUA);
        set(writable && features.trim, flags::SEND_TRIM);
        set(writable && features.write_zeroes, flags::SEND_WRITE_ZEROES);
        set(writable && features.write_zeroes && features.fast_zero, flags::SEND_FAST_ZERO);
        set(features.cache, flags::SEND_CACHE);
        set(features.multi_conn, flags::CAN_MULTI_CONN);
        set(structured_replies, flags::SEND_DF);
        value
    }
}

/// Request counters for the control API and logs.
#[derive(Default, Debug)]
pub struct Counters {
    pub connections: AtomicU64,
    pub requests: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub errors: AtomicU64,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct CounterValues {
    pub connections: u64,
    pub requests: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub errors: u64,
}

impl Counters {
    pub fn add(counter: &AtomicU64, value: u64) {
        counter.fetch_add(value, Ordering::Relaxed);
    }

    pub fn values(&self) -> CounterValues {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        CounterValues {
            connections: get(&self.connections),
            requests: get(&self.requests),
            bytes_read: get(&self.bytes_read),
            bytes_written: get(&self.bytes_written),
            errors: get(&self.errors),
        }
    }
}

/// Every export of the server, by name.
#[derive(Default)]
pub struct Exports {
    by_name: BTreeMap<String, Arc<Export>>,
}

impl Exports {
    pub fn new(exports: impl IntoIterator<Item = Export>) -> Exports {
        Exports { by_name: exports.into_iter().map(|export| (export.name.clone(), Arc::new(export))).collect() }
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Export>> {
        self.by_name.get(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Export>> {
        self.by_name.values()
    }

    /// The names, quoted, for error messages: `"" (default), "disk"`.
    pub fn names(&self) -> String {
        self.by_name
            .keys()
            .map(|name| if name.is_empty() { "\"\" (the default export)".to_string() } else { format!("{name:?}") })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[cfg(test)]
impl ExportParts {
    /// A memory export without a policy, for tests.
    pub fn memory(name: &str, size: u64, read_only: bool) -> ExportParts {
        ExportParts {
            name: name.to_string(),
            description: String::new(),
            storage_spec: format!("memory:{size}"),
            storage: Arc::new(crate::storage::MemoryDevice::new(size)),
            read_only,
            engine: Arc::new(Engine::new(None)),
            log: Arc::new(FaultLog::in_memory(16)),
            clock: Clock::start(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_names_starting_with_at_are_refused_saying_why() {
        assert_eq!(check_export_name(""), Ok(()));
        assert_eq!(check_export_name("disk @ home"), Ok(()));
        let error = check_export_name("@default").unwrap_err();
        assert!(error.contains("starts with @") && error.contains("control API"), "{error}");
        assert!(check_export_name("@x").is_err());
        assert!(check_export_name(&"x".repeat(4097)).unwrap_err().contains("4096"));
        assert!(check_export_name("a\0b").unwrap_err().contains("NUL"));
    }

    fn memory_export(read_only: bool) -> Export {
        Export::new(ExportParts::memory("disk", 1 << 20, read_only))
    }

    #[test]
    fn writable_memory_export_advertises_every_write_feature() {
        let value = memory_export(false).transmission_flags(false);
        for flag in [
            flags::HAS_FLAGS,
            flags::SEND_FLUSH,
            flags::SEND_FUA,
            flags::SEND_TRIM,
            flags::SEND_WRITE_ZEROES,
            flags::SEND_FAST_ZERO,
            flags::SEND_CACHE,
            flags::CAN_MULTI_CONN,
        ] {
            assert_ne!(value & flag, 0, "missing {:?}", flags::names(flag));
        }
        assert_eq!(value & (flags::READ_ONLY | flags::SEND_DF | flags::ROTATIONAL | flags::SEND_RESIZE), 0);
    }

    #[test]
    fn df_is_advertised_only_with_structured_replies() {
        let export = memory_export(false);
        assert_eq!(export.transmission_flags(false) & flags::SEND_DF, 0);
        assert_ne!(export.transmission_flags(true) & flags::SEND_DF, 0);
    }

    #[test]
    fn read_only_export_advertises_no_write_features() {
        let value = memory_export(true).transmission_flags(true);
        assert_ne!(value & flags::READ_ONLY, 0);
        for flag in
            [flags::SEND_FLUSH, flags::SEND_FUA, flags::SEND_TRIM, flags::SEND_WRITE_ZEROES, flags::SEND_FAST_ZERO]
        {
            assert_eq!(value & flag, 0);
        }
    }
}
