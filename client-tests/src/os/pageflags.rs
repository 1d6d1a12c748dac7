//! The state of the page behind a mapped address, from `/proc/self/pagemap` and `/proc/kpageflags`
//! (root only): is it mapped here, Uptodate, dirty, under writeback, marked in error?
//!
//! The thread's bug state is exactly "mapped here and not Uptodate", which no syscall shows.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};

use serde::Serialize;

const KPF_ERROR: u32 = 1;
const KPF_UPTODATE: u32 = 3;
const KPF_DIRTY: u32 = 4;
const KPF_WRITEBACK: u32 = 8;
const KPF_MMAP: u32 = 11;
const KPF_COMPOUND_HEAD: u32 = 15;
const KPF_COMPOUND_TAIL: u32 = 16;

/// What the kernel says about one mapped page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PageState {
    /// A page-table entry of this process maps the address.
    pub present: bool,
    /// Flags of the page (of its folio's head for large folios), when the PFN was visible.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uptodate: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dirty: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub writeback: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<bool>,
    /// The page heads a large folio (a compound page) / is one of its tail pages.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub folio_head: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub folio_tail: Option<bool>,
}

impl PageState {
    /// Decodes a pagemap entry and, when present, the kpageflags words of the page and its head.
    pub fn decode(pagemap: u64, flags: Option<u64>) -> Self {
        let present = pagemap >> 63 & 1 == 1;
        let bit = |b: u32| flags.map(|f| f >> b & 1 == 1);
        PageState {
            present,
            uptodate: bit(KPF_UPTODATE),
            dirty: bit(KPF_DIRTY),
            writeback: bit(KPF_WRITEBACK),
            error: bit(KPF_ERROR),
            folio_head: bit(KPF_COMPOUND_HEAD),
            folio_tail: bit(KPF_COMPOUND_TAIL),
        }
    }

    /// True when the page belongs to a folio larger than one page.
    pub fn in_large_folio(&self) -> Option<bool> {
        Some(self.folio_head? || self.folio_tail?)
    }

    /// True for the thread's bug state: mapped in this process, yet not Uptodate.
    pub fn mapped_but_not_uptodate(&self) -> Option<bool> {
        self.uptodate.map(|u| self.present && !u)
    }
}

fn read_u64(file: &mut File, index: u64) -> io::Result<u64> {
    let mut word = [0u8; 8];
    file.seek(SeekFrom::Start(index * 8))?;
    file.read_exact(&mut word)?;
    Ok(u64::from_ne_bytes(word))
}

/// The state of the page mapped at `address` in this process.
pub fn page_state(address: usize) -> io::Result<PageState> {
    let page = super::page_size() as u64;
    let mut pagemap = File::open("/proc/self/pagemap")?;
    let entry = read_u64(&mut pagemap, address as u64 / page)?;
    let pfn = entry & ((1 << 55) - 1);
    if entry >> 63 & 1 == 0 || pfn == 0 {
        return Ok(PageState::decode(entry, None));
    }
    let mut kpageflags = match File::open("/proc/kpageflags") {
        Ok(f) => f,
        Err(_) => return Ok(PageState::decode(entry, None)),
    };
    let mut flags = read_u64(&mut kpageflags, pfn)?;
    let own = flags;
    // Older kernels report a tail page's own (empty) flags: use the head's, found by walking back.
    if flags >> KPF_COMPOUND_TAIL & 1 == 1 {
        for back in 1..=pfn.min(1 << 18) {
            let candidate = read_u64(&mut kpageflags, pfn - back)?;
            if candidate >> KPF_COMPOUND_HEAD & 1 == 1 {
                flags = candidate;
                break;
            }
        }
    }
    // MMAP and the head/tail bits are per page; keep the page's own.
    let per_page = 1 << KPF_MMAP | 1 << KPF_COMPOUND_HEAD | 1 << KPF_COMPOUND_TAIL;
    flags = (flags & !per_page) | (own & per_page);
    Ok(PageState::decode(entry, Some(flags)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_reads_present_and_flag_bits() {
        let state = PageState::decode(1 << 63 | 1234, Some(1 << KPF_DIRTY | 1 << KPF_ERROR));
        assert!(state.present);
        assert_eq!(state.uptodate, Some(false));
        assert_eq!(state.dirty, Some(true));
        assert_eq!(state.error, Some(true));
        assert_eq!(state.mapped_but_not_uptodate(), Some(true));
        assert_eq!(state.in_large_folio(), Some(false));
        assert_eq!(PageState::decode(1 << 63, Some(1 << KPF_COMPOUND_TAIL)).in_large_folio(), Some(true));
    }

    #[test]
    fn without_flags_the_bug_state_is_unknown() {
        let state = PageState::decode(1 << 63, None);
        assert_eq!(state.mapped_but_not_uptodate(), None);
        assert!(!PageState::decode(0, Some(0)).mapped_but_not_uptodate().unwrap());
    }
}
