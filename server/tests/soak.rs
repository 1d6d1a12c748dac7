//! A soak with a shadow model: several connections send random reads, writes, write-zeroes,
//! trims and flushes to the real server while random seeded policies (errors, torn, dropped and
//! persisted-but-failed writes, delays, disconnects, power cuts, sticky errors, bad sectors,
//! corrupted reads) are swapped in through the control API. A model predicts, from the requests,
//! their replies and the fault log, which values every byte of storage may hold; every read the
//! server answers, and every byte of storage read through the control API (below the fault
//! layer), must be one of them.
//!
//! What the model can know: requests run in epochs. Within an epoch the connections' requests
//! race (their order is undetermined, also for overlapping writes), between epochs everything of
//! the previous epoch has been answered. Every write carries bytes that name it (a hash of its
//! cookie and the byte's offset), so a byte's possible values after an epoch are: the values of
//! the writes that certainly reached it (if any did; else its possible values before), plus the
//! values of those that may have (no reply, a dropped connection, a trim), plus, after a power cut,
//! every value it held since the last flush the model knows reached stable storage. Whether a
//! write reached storage, and how much of it (torn), comes from the fault log's `persisted`.
//!
//! `NBDFAULT_SOAK_SECONDS` (default 60) sets the length, `NBDFAULT_SOAK_SEED` the seed (printed at
//! start and in every failure). A seed reproduces the requests and the policies; how the
//! connections' requests interleave on the server is up to the scheduler.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::Server;
use common::control::Api;
use common::raw::{CMD_FLAG_FUA, CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES, RawClient};
use serde_json::Value;

const EXPORT: &str = "soak";
const SIZE: usize = 1 << 20;
const CONNECTIONS: usize = 4;
const MAX_REQUESTS: u64 = 10;
const MAX_LENGTH: u64 = 32 << 10;
/// Epochs between policy swaps, and between checks of the whole storage.
const POLICY_EVERY: u64 = 10;
const VERIFY_EVERY: u64 = 10;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// splitmix64: small, seedable, and good enough for a workload.
struct Rng(u64);

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.0)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }

    fn probability(&mut self, low: f64, high: f64) -> String {
        format!("{:.3}", low + (high - low) * ((self.next() >> 11) as f64 / (1u64 << 53) as f64))
    }
}

/// The byte a write with `cookie` carries at absolute `offset`: it names the write.
fn value(cookie: u64, offset: u64) -> u8 {
    mix(cookie.wrapping_mul(0x1000_0000_01b3) ^ offset).to_le_bytes()[0]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    Zero,
    Trim,
    Flush,
}

#[derive(Debug, Clone)]
struct Request {
    cookie: u64,
    kind: Kind,
    offset: u64,
    length: u64,
    fua: bool,
}

impl Request {
    fn command(&self) -> u16 {
        match self.kind {
            Kind::Read => CMD_READ,
            Kind::Write => CMD_WRITE,
            Kind::Zero => CMD_WRITE_ZEROES,
            Kind::Trim => CMD_TRIM,
            Kind::Flush => CMD_FLUSH,
        }
    }

    fn bytes(&self) -> Vec<u8> {
        let flags = if self.fua { CMD_FLAG_FUA } else { 0 };
        let mut bytes = RawClient::request(flags, self.command(), self.cookie, self.offset, self.length as u32);
        if self.kind == Kind::Write {
            bytes.extend((self.offset..self.offset + self.length).map(|at| value(self.cookie, at)));
        }
        bytes
    }
}

/// A request after its epoch: whether it went out, its reply's error, and a read's data.
#[derive(Debug)]
struct Done {
    request: Request,
    sent: bool,
    reply: Option<u32>,
    data: Option<Vec<u8>>,
}

fn random_request(rng: &mut Rng, cookie: u64) -> Request {
    let kind = match rng.below(100) {
        0..30 => Kind::Read,
        30..70 => Kind::Write,
        70..82 => Kind::Zero,
        82..92 => Kind::Trim,
        _ => Kind::Flush,
    };
    if kind == Kind::Flush {
        return Request { cookie, kind, offset: 0, length: 0, fua: false };
    }
    // Aligned and byte-granular requests both; they overlap often in 1 MiB.
    let (offset, length) = if rng.chance(0.5) {
        let length = (1 + rng.below(MAX_LENGTH / 4096)) * 4096;
        (rng.below((SIZE as u64 - length) / 4096 + 1) * 4096, length)
    } else {
        let length = 1 + rng.below(MAX_LENGTH);
        (rng.below(SIZE as u64 - length + 1), length)
    };
    Request { cookie, kind, offset, length, fua: kind != Kind::Read && rng.chance(0.2) }
}

/// A random policy of the faults the model understands, ending with a rule that logs every
/// other request, so that every request the server decides is in the fault log.
fn random_policy(rng: &mut Rng) -> String {
    let mut yaml = format!("seed: {}\nrules:\n", rng.below(1 << 32));
    let rule = |yaml: &mut String, name: &str, when: String, then: &str| {
        yaml.push_str(&format!("  - name: {name}\n    when: {{ {when} }}\n    then: {{ {then} }}\n"));
    };
    let range = |rng: &mut Rng, length: u64| format!("{}..+{length}", rng.below(SIZE as u64 - length));
    if rng.chance(0.6) {
        let p = rng.probability(0.01, 0.1);
        rule(&mut yaml, "write-errors", format!("op: [write, write_zeroes], probability: {p}"), "error: EIO");
    }
    if rng.chance(0.5) {
        let p = rng.probability(0.01, 0.1);
        let error = if rng.chance(0.5) { ", error: EIO" } else { "" };
        let then = format!("torn: {{ persist: 0..16KiB, align: 512 }}{error}");
        rule(&mut yaml, "torn", format!("op: [write, write_zeroes], probability: {p}"), &then);
    }
    if rng.chance(0.4) {
        let p = rng.probability(0.01, 0.1);
        rule(
            &mut yaml,
            "persisted-errors",
            format!("op: [write, trim], probability: {p}"),
            "error: EIO, persist: true",
        );
    }
    if rng.chance(0.4) {
        let p = rng.probability(0.01, 0.1);
        rule(
            &mut yaml,
            "silent-loss",
            format!("op: [write, write_zeroes, trim, flush], probability: {p}"),
            "drop: true",
        );
    }
    if rng.chance(0.3) {
        let p = rng.probability(0.002, 0.02);
        let then = if rng.chance(0.5) { "disconnect: true, persist: true" } else { "disconnect: true" };
        rule(&mut yaml, "disconnects", format!("op: write, probability: {p}"), then);
    }
    if rng.chance(0.3) {
        let p = rng.probability(0.002, 0.02);
        rule(&mut yaml, "power-cuts", format!("op: [write, flush, read], probability: {p}"), "power_cut: true");
    }
    if rng.chance(0.3) {
        let where_ = range(rng, 16 << 10);
        rule(&mut yaml, "sticky", format!("op: write, range: {where_}, probability: 0.3"), "error: EIO, sticky: true");
    }
    if rng.chance(0.3) {
        let p = rng.probability(0.01, 0.1);
        rule(&mut yaml, "corrupt-reads", format!("op: read, probability: {p}"), "corrupt: 4");
    }
    if rng.chance(0.3) {
        let p = rng.probability(0.01, 0.1);
        rule(&mut yaml, "read-errors", format!("op: read, probability: {p}"), "error: EIO");
    }
    if rng.chance(0.3) {
        let p = rng.probability(0.05, 0.3);
        rule(&mut yaml, "flush-errors", format!("op: flush, probability: {p}"), "error: EIO");
    }
    if rng.chance(0.4) {
        let p = rng.probability(0.05, 0.3);
        rule(&mut yaml, "delays", format!("probability: {p}"), "delay: 1ms..4ms");
    }
    yaml.push_str("  - name: every-request\n    then: {}\n");
    if rng.chance(0.3) {
        yaml.push_str(&format!("bad_sectors:\n  - {}\n", range(rng, 4096)));
    }
    yaml
}

/// One connection's part of an epoch: send every request, then read replies until each has one
/// or the server closed the connection. A closed connection is dropped, to reconnect next epoch.
fn run_connection(server: std::net::SocketAddr, client: &mut Option<RawClient>, requests: Vec<Request>) -> Vec<Done> {
    let mut done: Vec<Done> =
        requests.into_iter().map(|request| Done { request, sent: false, reply: None, data: None }).collect();
    let connection = client.get_or_insert_with(|| RawClient::attach(server, EXPORT, false).0);
    let mut alive = true;
    for entry in &mut done {
        entry.sent = true;
        if connection.try_send(&entry.request.bytes()).is_err() {
            alive = false;
            break;
        }
    }
    let index: HashMap<u64, usize> = done.iter().enumerate().map(|(i, d)| (d.request.cookie, i)).collect();
    let mut waiting = if alive { done.len() } else { 0 };
    while waiting > 0 {
        let Ok(header) = connection.try_read_exact(16) else {
            alive = false;
            break;
        };
        let magic = u32::from_be_bytes(header[0..4].try_into().unwrap());
        assert_eq!(magic, SIMPLE_REPLY_MAGIC, "simple reply magic in {header:02x?}");
        let error = u32::from_be_bytes(header[4..8].try_into().unwrap());
        let cookie = u64::from_be_bytes(header[8..16].try_into().unwrap());
        let at = *index.get(&cookie).unwrap_or_else(|| panic!("a reply for cookie {cookie}, which was not sent"));
        let entry = &mut done[at];
        assert!(entry.reply.is_none(), "two replies for cookie {cookie}");
        entry.reply = Some(error);
        waiting -= 1;
        if entry.request.kind == Kind::Read && error == 0 {
            match connection.try_read_exact(entry.request.length as usize) {
                Ok(data) => entry.data = Some(data),
                Err(_) => {
                    alive = false;
                    break;
                }
            }
        }
    }
    if !alive {
        *client = None;
    }
    done
}

/// A set of byte values.
type Set = [u64; 4];

fn insert(set: &mut Set, value: u8) {
    set[value as usize / 64] |= 1 << (value % 64);
}

fn contains(set: &Set, value: u8) -> bool {
    set[value as usize / 64] & (1 << (value % 64)) != 0
}

fn join(a: &mut Set, b: &Set) {
    for (x, y) in a.iter_mut().zip(b) {
        *x |= y;
    }
}

fn members(set: &Set) -> Vec<u8> {
    (0..=255u8).filter(|v| contains(set, *v)).collect()
}

/// What one epoch did to one byte.
#[derive(Clone, Copy, Default)]
struct Effect {
    /// Values of requests that certainly reached the byte.
    must: Set,
    /// Values of requests that may have.
    may: Set,
    certain: bool,
    touched: bool,
}

/// The shadow model: for every byte, the values it may hold now, and every value it may have held
/// since the last flush known to have reached stable storage (what a power cut can bring back).
struct Model {
    current: Vec<Set>,
    since_flush: Vec<Set>,
    effects: Vec<Effect>,
    /// The requests of recent epochs, to explain a mismatch.
    recent: Vec<(u64, String)>,
}

fn record_of(records: &HashMap<u64, Value>, cookie: u64) -> Option<&Value> {
    records.get(&cookie)
}

impl Model {
    fn new() -> Model {
        let mut zero = Set::default();
        insert(&mut zero, 0);
        Model {
            current: vec![zero; SIZE],
            since_flush: vec![zero; SIZE],
            effects: vec![Effect::default(); SIZE],
            recent: Vec::new(),
        }
    }

    /// Takes in one epoch: checks every successful read against what the bytes could hold while
    /// it ran, then moves every byte's possible values forward. Returns the first read mismatch.
    fn apply(&mut self, epoch: u64, done: &[Done], records: &HashMap<u64, Value>) -> Result<(), String> {
        let power_cut =
            done.iter().any(|d| record_of(records, d.request.cookie).is_some_and(|r| r["power_cut"] == true));
        let mut touched = Vec::new();
        for d in done.iter().filter(|d| d.sent && matches!(d.request.kind, Kind::Write | Kind::Zero | Kind::Trim)) {
            let r = &d.request;
            let record = record_of(records, r.cookie);
            let (certain, reached) = match (record, d.reply) {
                // A trim may discard all, part or none of its range.
                _ if r.kind == Kind::Trim => {
                    let skipped = d.reply.is_some() && record.is_some_and(|rec| rec["persisted"] == 0);
                    (false, if skipped { 0 } else { r.length })
                }
                (Some(rec), Some(_)) => (true, rec["persisted"].as_u64().expect("persisted in the record")),
                (None, Some(0)) => (true, r.length),
                _ => (false, r.length),
            };
            for at in r.offset..r.offset + reached.min(r.length) {
                let v = if r.kind == Kind::Write { value(r.cookie, at) } else { 0 };
                let effect = &mut self.effects[at as usize];
                if !effect.touched {
                    effect.touched = true;
                    touched.push(at as usize);
                }
                if certain {
                    insert(&mut effect.must, v);
                    effect.certain = true;
                } else {
                    insert(&mut effect.may, v);
                }
            }
        }
        let mut mismatch = None;
        for d in done.iter().filter(|d| d.request.kind == Kind::Read && d.reply == Some(0)) {
            let corrupt = record_of(records, d.request.cookie).is_some_and(|r| r["outcome"] == "corrupt_read");
            let Some(data) = &d.data else { continue };
            if corrupt || mismatch.is_some() {
                continue;
            }
            for (i, &byte) in data.iter().enumerate() {
                let at = d.request.offset as usize + i;
                let mut allowed = self.current[at];
                let effect = &self.effects[at];
                join(&mut allowed, &effect.must);
                join(&mut allowed, &effect.may);
                if power_cut {
                    join(&mut allowed, &self.since_flush[at]);
                }
                if !contains(&allowed, byte) {
                    mismatch = Some(format!(
                        "epoch {epoch}: READ cookie {} of {}..+{} returned {byte:#04x} at offset {at}, which can hold only {:02x?}",
                        d.request.cookie,
                        d.request.offset,
                        d.request.length,
                        members(&allowed)
                    ));
                    break;
                }
            }
        }
        for &at in &touched {
            let effect = std::mem::take(&mut self.effects[at]);
            let mut next = if effect.certain { effect.must } else { self.current[at] };
            join(&mut next, &effect.may);
            self.current[at] = next;
            join(&mut self.since_flush[at], &next);
        }
        if power_cut {
            for (current, since) in self.current.iter_mut().zip(&self.since_flush) {
                join(current, since);
            }
        }
        for d in done {
            let record = record_of(records, d.request.cookie)
                .map(|r| format!("{} persisted {}", r["outcome"].as_str().unwrap_or("?"), r["persisted"]));
            self.recent.push((
                epoch,
                format!(
                    "{:?} cookie {} {}..+{}{} reply {:?} log {}",
                    d.request.kind,
                    d.request.cookie,
                    d.request.offset,
                    d.request.length,
                    if d.request.fua { " fua" } else { "" },
                    d.reply,
                    record.unwrap_or_else(|| "none".into())
                ),
            ));
        }
        let keep_from = epoch.saturating_sub(8);
        self.recent.retain(|(e, _)| *e >= keep_from);
        mismatch.map_or(Ok(()), Err)
    }

    /// A flush reached stable storage after everything before it: a power cut can no longer bring
    /// older values back.
    fn flushed(&mut self) {
        self.since_flush.clone_from(&self.current);
    }

    /// Every byte of storage must be one of its possible values.
    fn verify(&self, stored: &[u8]) -> Result<(), String> {
        for (at, (&byte, set)) in stored.iter().zip(&self.current).enumerate() {
            if !contains(set, byte) {
                let requests: Vec<&str> = self
                    .recent
                    .iter()
                    .filter(|(_, text)| touches(text, at as u64))
                    .map(|(_, text)| text.as_str())
                    .collect();
                return Err(format!(
                    "storage offset {at} holds {byte:#04x}, but the model allows only {:02x?}; recent requests over it:\n  {}",
                    members(set),
                    requests.join("\n  ")
                ));
            }
        }
        Ok(())
    }
}

/// Whether a request description (`KIND cookie C OFFSET..+LENGTH ...`) covers `at`.
fn touches(text: &str, at: u64) -> bool {
    let Some(range) = text.split(' ').nth(3) else { return false };
    let Some((start, length)) = range.split_once("..+") else { return false };
    match (start.parse::<u64>(), length.parse::<u64>()) {
        (Ok(start), Ok(length)) => (start..start + length).contains(&at),
        _ => false,
    }
}

/// The fault log's new records, by cookie; the largest `seq` seen is kept in `since`.
fn new_records(api: &Api, since: &mut u64, records: &mut HashMap<u64, Value>) {
    for record in api.faults(EXPORT, *since) {
        *since = (*since).max(record["seq"].as_u64().expect("seq"));
        records.insert(record["cookie"].as_u64().expect("cookie"), record);
    }
}

fn env_number(name: &str) -> Option<u64> {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .map(|v| v.parse().unwrap_or_else(|_| panic!("{name}={v}: not a number")))
}

#[test]
fn storage_is_always_what_the_requests_replies_and_fault_log_explain() {
    let seconds = env_number("NBDFAULT_SOAK_SECONDS").unwrap_or(60);
    let seed = env_number("NBDFAULT_SOAK_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
    });
    eprintln!("soak: seed {seed}, {seconds} s (NBDFAULT_SOAK_SEED={seed} NBDFAULT_SOAK_SECONDS={seconds} repeats it)");
    let fail = |what: String| -> ! {
        panic!("soak seed {seed}: {what}\n(NBDFAULT_SOAK_SEED={seed} repeats the workload and policies)")
    };

    let server = Server::builder().export(EXPORT, format!("memory:{SIZE}")).with_control().start();
    let api = Api::new(&server);
    let mut rng = Rng(seed);
    let mut model = Model::new();
    let mut clients: Vec<Option<RawClient>> = (0..CONNECTIONS).map(|_| None).collect();
    let mut since = 0;
    let mut records = HashMap::new();
    let mut next_cookie = 1u64;
    let mut policy = false;
    let started = Instant::now();
    let mut stats: HashMap<String, u64> = HashMap::new();
    let mut epoch = 0;
    while started.elapsed() < Duration::from_secs(seconds) {
        if epoch % POLICY_EVERY == 0 {
            if rng.chance(0.15) {
                api.clear_policy(EXPORT);
                policy = false;
            } else {
                let yaml = random_policy(&mut rng);
                let answer = api.put(&format!("/v1/exports/{EXPORT}/policy"), yaml.as_bytes());
                if answer.status != 200 {
                    fail(format!("the server refused a generated policy ({}):\n{yaml}", answer.text()));
                }
                policy = true;
            }
        }
        let plans: Vec<Vec<Request>> = (0..CONNECTIONS)
            .map(|_| {
                (0..1 + rng.below(MAX_REQUESTS))
                    .map(|_| {
                        next_cookie += 1;
                        random_request(&mut rng, next_cookie)
                    })
                    .collect()
            })
            .collect();
        let mut done: Vec<Done> = std::thread::scope(|scope| {
            let handles: Vec<_> = clients
                .iter_mut()
                .zip(plans)
                .map(|(client, plan)| scope.spawn(move || run_connection(server.nbd, client, plan)))
                .collect();
            handles.into_iter().flat_map(|handle| handle.join().expect("a connection thread panicked")).collect()
        });
        if done.iter().any(|d| d.sent && d.reply.is_none()) {
            // A dropped connection may leave requests running in the server for a moment after
            // the client saw it close: let them end (policies delay at most 4 ms; the margin is
            // for a loaded machine) before the model moves on.
            std::thread::sleep(Duration::from_millis(500));
        }
        // A flush after the epoch, alone: when the server really did it, a power cut can bring
        // nothing older back.
        let barrier = rng.chance(0.3);
        if barrier {
            next_cookie += 1;
            let flush = Request { cookie: next_cookie, kind: Kind::Flush, offset: 0, length: 0, fua: false };
            let client = clients.iter_mut().next().expect("a connection");
            done.extend(run_connection(server.nbd, client, vec![flush]));
        }
        // Every request the server decided is logged (the policies end with a rule for every
        // request); wait for the records of the replied ones.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            new_records(&api, &mut since, &mut records);
            let missing =
                done.iter().filter(|d| policy && d.reply.is_some() && !records.contains_key(&d.request.cookie)).count();
            if missing == 0 {
                break;
            }
            if Instant::now() > deadline {
                fail(format!("epoch {epoch}: {missing} answered requests are not in the fault log"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let (main, flush) = if barrier { done.split_at(done.len() - 1) } else { (&done[..], &[][..]) };
        if let Err(error) = model.apply(epoch, main, &records) {
            fail(error);
        }
        if let Some(f) = flush.first() {
            if let Err(error) = model.apply(epoch, flush, &records) {
                fail(error);
            }
            let record = records.get(&f.request.cookie);
            if f.reply == Some(0) && record.is_none_or(|r| r["action"] == "perform") {
                model.flushed();
            }
        }
        for d in &done {
            let outcome = match (d.reply, records.get(&d.request.cookie)) {
                (_, Some(r)) => r["outcome"].as_str().unwrap_or("?").to_string(),
                (Some(0), None) => "ok".into(),
                (Some(_), None) => "error".into(),
                (None, None) => "no reply".into(),
            };
            *stats.entry(outcome).or_default() += 1;
        }
        for d in &done {
            records.remove(&d.request.cookie);
        }
        if epoch % VERIFY_EVERY == VERIFY_EVERY - 1 {
            let stored = api.data(EXPORT, 0, SIZE as u64);
            if let Err(error) = model.verify(&stored) {
                fail(format!("after epoch {epoch}: {error}"));
            }
        }
        epoch += 1;
    }
    let stored = api.data(EXPORT, 0, SIZE as u64);
    if let Err(error) = model.verify(&stored) {
        fail(format!("at the end: {error}"));
    }
    let mut stats: Vec<_> = stats.into_iter().collect();
    stats.sort();
    eprintln!(
        "soak: seed {seed}: {epoch} epochs in {:.0?}, every byte explained; outcomes: {stats:?}",
        started.elapsed()
    );
    assert!(epoch >= 10, "only {epoch} epochs ran");
}
