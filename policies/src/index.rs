//! Finding the rules a request can concern without looking at the others: per operation, the
//! rules without a range, an interval index of the rules with one, and a table of the rules that
//! name request indices. The cost of a lookup grows with the logarithm of the rule count plus the
//! number of rules that overlap the request, not with the size of the policy.

use std::collections::HashMap;

use crate::request::Op;

/// Half-open intervals `[start, end)` with a value each, answering "which intervals overlap
/// `[start, end)`" in O(log n + hits).
///
/// This is Heng Li's implicit interval tree (cgranges / iitree): the intervals sorted by start
/// form an implicit binary search tree over array positions (node `i` is at level = number of
/// trailing one bits of `i`), each node augmented with the largest end in its subtree.
#[derive(Debug, Clone, Default)]
pub(crate) struct IntervalIndex {
    starts: Vec<u64>,
    ends: Vec<u64>,
    values: Vec<u32>,
    max_ends: Vec<u64>,
    root_level: u32,
}

impl IntervalIndex {
    pub(crate) fn new(mut intervals: Vec<(u64, u64, u32)>) -> Self {
        intervals.sort_unstable();
        let n = intervals.len();
        let starts: Vec<u64> = intervals.iter().map(|interval| interval.0).collect();
        let ends: Vec<u64> = intervals.iter().map(|interval| interval.1).collect();
        let values: Vec<u32> = intervals.iter().map(|interval| interval.2).collect();
        let mut max_ends = ends.clone();
        let mut root_level = 0;
        if n > 0 {
            // Leaves (level 0) are the even positions; their maximum is their own end.
            let mut last_i = (n - 1) & !1;
            let mut last = ends[last_i];
            let mut k = 1u32;
            while (1usize << k) <= n {
                let x = 1usize << (k - 1);
                let step = x << 2;
                let mut i = (x << 1) - 1;
                while i < n {
                    let left = max_ends[i - x];
                    let right = if i + x < n { max_ends[i + x] } else { last };
                    max_ends[i] = ends[i].max(left).max(right);
                    i += step;
                }
                // Move `last_i` to its parent, which may lie beyond the array.
                last_i = if (last_i >> k) & 1 == 1 { last_i - x } else { last_i + x };
                if last_i < n && max_ends[last_i] > last {
                    last = max_ends[last_i];
                }
                k += 1;
            }
            root_level = k - 1;
        }
        IntervalIndex { starts, ends, values, max_ends, root_level }
    }

    pub(crate) fn len(&self) -> usize {
        self.starts.len()
    }

    /// Appends the value of every interval overlapping `[start, end)` to `out`. `stack` is
    /// scratch space, passed in so that a lookup allocates nothing once it has grown.
    pub(crate) fn overlapping(&self, start: u64, end: u64, out: &mut Vec<u32>, stack: &mut Vec<(u32, usize, bool)>) {
        let n = self.starts.len();
        if n == 0 {
            return;
        }
        // (level, node, left child done): an explicit stack for the top-down walk.
        stack.clear();
        stack.push((self.root_level, (1usize << self.root_level) - 1, false));
        while let Some((k, x, left_done)) = stack.pop() {
            if k <= 3 {
                // A small subtree: scan its positions in order.
                let first = x >> k << k;
                let last = (first + (1usize << (k + 1)) - 1).min(n);
                for i in first..last {
                    if self.starts[i] >= end {
                        break;
                    }
                    if start < self.ends[i] {
                        out.push(self.values[i]);
                    }
                }
            } else if !left_done {
                let left = x - (1usize << (k - 1));
                stack.push((k, x, true));
                // A left child beyond the array still has a subtree inside it; otherwise skip it
                // when nothing under it reaches the query.
                if left >= n || self.max_ends[left] > start {
                    stack.push((k - 1, left, false));
                }
            } else if x < n && self.starts[x] < end {
                if start < self.ends[x] {
                    out.push(self.values[x]);
                }
                stack.push((k - 1, x + (1usize << (k - 1)), false));
            }
        }
    }
}

/// Intervals split into a chain of disjoint ones, found by binary search, and the rest, in an
/// [`IntervalIndex`]. Real policies mostly target disjoint extents, so the chain answers nearly
/// every lookup with one binary search and a step or two; overlapping leftovers keep the
/// logarithmic bound of the tree.
#[derive(Debug, Clone, Default)]
pub(crate) struct RangeIndex {
    /// Disjoint, so sorted by start and by end at once.
    chain_starts: Vec<u64>,
    chain_ends: Vec<u64>,
    chain_values: Vec<u32>,
    rest: IntervalIndex,
}

impl RangeIndex {
    pub(crate) fn new(mut intervals: Vec<(u64, u64, u32)>) -> Self {
        // Interval scheduling: taking the earliest-ending interval that starts after the last one
        // taken gives the largest disjoint chain.
        intervals.sort_unstable_by_key(|&(start, end, value)| (end, start, value));
        let mut index = RangeIndex::default();
        let mut rest = Vec::new();
        for (start, end, value) in intervals {
            if index.chain_ends.last().is_none_or(|&last| start >= last) {
                index.chain_starts.push(start);
                index.chain_ends.push(end);
                index.chain_values.push(value);
            } else {
                rest.push((start, end, value));
            }
        }
        index.rest = IntervalIndex::new(rest);
        index
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.chain_starts.is_empty() && self.rest.len() == 0
    }

    /// Appends the value of every interval overlapping `[start, end)` to `out`.
    pub(crate) fn overlapping(&self, start: u64, end: u64, out: &mut Vec<u32>, stack: &mut Vec<(u32, usize, bool)>) {
        let below_end = self.chain_starts.partition_point(|&chain_start| chain_start < end);
        for i in (0..below_end).rev() {
            if self.chain_ends[i] <= start {
                break;
            }
            out.push(self.chain_values[i]);
        }
        self.rest.overlapping(start, end, out, stack);
    }
}

/// The rules of one operation.
#[derive(Debug, Clone, Default)]
struct OpIndex {
    /// Rules with no range, in policy order.
    everywhere: Vec<u32>,
    /// One interval per range of every ranged rule.
    ranged: RangeIndex,
}

/// Which rules can concern a request, by operation, range and request index.
#[derive(Debug, Clone, Default)]
pub(crate) struct RuleIndex {
    by_op: [OpIndex; 7],
    by_request: HashMap<u64, Vec<u32>>,
}

/// Buffers reused from one lookup to the next.
#[derive(Debug, Default)]
pub(crate) struct Scratch {
    /// The candidates of the last lookup, sorted and without duplicates.
    pub candidates: Vec<u32>,
    stack: Vec<(u32, usize, bool)>,
}

/// What the index needs to know about one rule.
pub(crate) struct IndexEntry<'a> {
    pub ops: u8,
    /// Half-open `(start, end)` pairs; empty means every offset.
    pub ranges: &'a [(u64, u64)],
    /// Request indices the rule is limited to, if any.
    pub requests: Option<&'a [u64]>,
}

impl RuleIndex {
    pub(crate) fn new<'a>(entries: impl IntoIterator<Item = IndexEntry<'a>>) -> Self {
        let mut everywhere: [Vec<u32>; 7] = Default::default();
        let mut ranged: [Vec<(u64, u64, u32)>; 7] = Default::default();
        let mut by_request: HashMap<u64, Vec<u32>> = HashMap::new();
        for (id, entry) in entries.into_iter().enumerate() {
            let id = id as u32;
            if let Some(requests) = entry.requests {
                // Rules naming request indices are found through those indices alone; their other
                // conditions are checked afterwards.
                for &request in requests {
                    by_request.entry(request).or_default().push(id);
                }
                continue;
            }
            for op in Op::ALL {
                if entry.ops & op.bit() == 0 {
                    continue;
                }
                if entry.ranges.is_empty() {
                    everywhere[op.index()].push(id);
                } else {
                    ranged[op.index()].extend(entry.ranges.iter().map(|&(start, end)| (start, end, id)));
                }
            }
        }
        let mut by_op: [OpIndex; 7] = Default::default();
        for (slot, (everywhere, ranged)) in by_op.iter_mut().zip(everywhere.into_iter().zip(ranged)) {
            *slot = OpIndex { everywhere, ranged: RangeIndex::new(ranged) };
        }
        RuleIndex { by_op, by_request }
    }

    /// Writes into `scratch.candidates`, sorted and without duplicates, the rules that can
    /// concern a request of `op` over `[start, end)` at position `request_index` of the stream.
    /// `ranged` is false for requests without a byte range (flush), which never match a ranged
    /// rule.
    pub(crate) fn candidates(
        &self,
        op: Op,
        start: u64,
        end: u64,
        ranged: bool,
        request_index: u64,
        scratch: &mut Scratch,
    ) {
        let out = &mut scratch.candidates;
        out.clear();
        let index = &self.by_op[op.index()];
        out.extend_from_slice(&index.everywhere);
        let mut sorted = true;
        if ranged && !index.ranged.is_empty() {
            index.ranged.overlapping(start, end, out, &mut scratch.stack);
            sorted = false;
        }
        if !self.by_request.is_empty()
            && let Some(rules) = self.by_request.get(&request_index)
        {
            out.extend_from_slice(rules);
            sorted = false;
        }
        if !sorted {
            out.sort_unstable();
            out.dedup();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn brute_force(intervals: &[(u64, u64, u32)], start: u64, end: u64) -> Vec<u32> {
        let mut hits: Vec<u32> =
            intervals.iter().filter(|&&(s, e, _)| s < end && start < e).map(|&(_, _, value)| value).collect();
        hits.sort_unstable();
        hits
    }

    /// Checks one index against brute force on each query.
    fn assert_finds_exactly_the_overlaps(
        intervals: &[(u64, u64, u32)],
        queries: &[(u64, u64)],
        overlapping: impl Fn(u64, u64, &mut Vec<u32>),
    ) {
        for &(start, length) in queries {
            let mut found = Vec::new();
            overlapping(start, start + length, &mut found);
            found.sort_unstable();
            assert_eq!(found, brute_force(intervals, start, start + length), "query {start}+{length}");
        }
    }

    #[test]
    fn an_empty_index_finds_nothing() {
        let mut out = Vec::new();
        IntervalIndex::new(Vec::new()).overlapping(0, u64::MAX, &mut out, &mut Vec::new());
        assert!(out.is_empty());
    }

    #[test]
    fn touching_intervals_do_not_overlap() {
        let index = IntervalIndex::new(vec![(0, 10, 0), (10, 20, 1), (20, 30, 2)]);
        let mut out = Vec::new();
        index.overlapping(10, 20, &mut out, &mut Vec::new());
        assert_eq!(out, [1]);
        out.clear();
        index.overlapping(9, 21, &mut out, &mut Vec::new());
        out.sort_unstable();
        assert_eq!(out, [0, 1, 2]);
    }

    #[test]
    fn candidates_are_sorted_unique_and_include_request_rules() {
        let ranges = [(0u64, 100u64), (50, 150)];
        let index = RuleIndex::new([
            IndexEntry { ops: Op::Write.bit(), ranges: &[], requests: None },
            IndexEntry { ops: Op::Write.bit(), ranges: &ranges, requests: None },
            IndexEntry { ops: Op::Read.bit(), ranges: &[], requests: None },
            IndexEntry { ops: Op::Write.bit(), ranges: &[], requests: Some(&[7]) },
        ]);
        let mut scratch = Scratch::default();
        index.candidates(Op::Write, 60, 70, true, 7, &mut scratch);
        assert_eq!(scratch.candidates, [0, 1, 3]);
        index.candidates(Op::Write, 60, 70, true, 8, &mut scratch);
        assert_eq!(scratch.candidates, [0, 1]);
        index.candidates(Op::Write, 60, 70, false, 8, &mut scratch);
        assert_eq!(scratch.candidates, [0]);
        index.candidates(Op::Read, 60, 70, true, 8, &mut scratch);
        assert_eq!(scratch.candidates, [2]);
    }

    proptest! {
        #[test]
        fn the_interval_index_finds_exactly_the_overlapping_intervals(
            raw in prop::collection::vec((0u64..2000, 1u64..400), 0..300),
            queries in prop::collection::vec((0u64..2500, 1u64..300), 1..40),
        ) {
            let intervals: Vec<(u64, u64, u32)> =
                raw.iter().enumerate().map(|(i, &(start, length))| (start, start + length, i as u32)).collect();
            let index = IntervalIndex::new(intervals.clone());
            assert_finds_exactly_the_overlaps(&intervals, &queries, |start, end, out| {
                index.overlapping(start, end, out, &mut Vec::new())
            });
        }

        #[test]
        fn the_range_index_finds_exactly_the_overlapping_intervals(
            raw in prop::collection::vec((0u64..2000, 1u64..400), 0..300),
            disjoint in prop::collection::vec(1u64..50, 0..100),
            queries in prop::collection::vec((0u64..2500, 1u64..300), 1..40),
        ) {
            // A mix of disjoint runs (the chain) and random overlapping intervals (the tree).
            let mut intervals: Vec<(u64, u64, u32)> =
                raw.iter().enumerate().map(|(i, &(start, length))| (start, start + length, i as u32)).collect();
            let mut at = 0;
            for (i, &length) in disjoint.iter().enumerate() {
                intervals.push((at, at + length, (raw.len() + i) as u32));
                at += length + (i as u64 % 3);
            }
            let index = RangeIndex::new(intervals.clone());
            assert_finds_exactly_the_overlaps(&intervals, &queries, |start, end, out| {
                index.overlapping(start, end, out, &mut Vec::new())
            });
        }

        #[test]
        fn the_interval_index_handles_ranges_reaching_the_end_of_the_address_space(
            raw in prop::collection::vec((any::<u64>(), any::<bool>()), 0..64),
            queries in prop::collection::vec(any::<u64>(), 1..20),
        ) {
            let intervals: Vec<(u64, u64, u32)> = raw
                .iter()
                .enumerate()
                .map(|(i, &(start, open))| {
                    let start = start.min(u64::MAX - 1);
                    let end = if open { u64::MAX } else { start + 1 };
                    (start, end, i as u32)
                })
                .collect();
            let index = IntervalIndex::new(intervals.clone());
            for start in queries {
                let end = start.saturating_add(4096);
                let mut found = Vec::new();
                index.overlapping(start, end, &mut found, &mut Vec::new());
                found.sort_unstable();
                prop_assert_eq!(found, brute_force(&intervals, start, end));
            }
        }
    }
}
