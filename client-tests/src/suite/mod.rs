//! The suite: for each filesystem, a series of scenarios, each on a fresh filesystem. A scenario
//! fails the writeback of chosen blocks through the control API and fills in the verdicts of the
//! checks it declares.

mod direct;
mod env;
mod errseq;
mod eviction;
mod folio;
pub mod fs;
mod fsnotify;
mod journal;
pub mod layout;
mod logfail;
mod pressure;
mod readfault;
mod recovery;
mod submission;
mod unwritten;
mod views;
mod xfsmeta;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value, json};

pub use env::Env;
pub use fs::Fs;

use crate::control::Control;
use crate::invariants::Class;
use crate::report::{CheckResult, KernelInfo, Report, Verdict};
use crate::version::{KernelVersion, RunningKernel};

/// The kernel and filesystem a check runs on, for the catalogue's expectations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    pub fs: Fs,
    pub kernel: Option<KernelVersion>,
}

/// What the catalogue (docs/invariants.md) predicts for a target, if anything.
pub type Expectation = fn(&Target) -> Option<Verdict>;

/// The catalogue expects a guaranteed invariant to hold everywhere.
pub fn always_holds(_: &Target) -> Option<Verdict> {
    Some(Verdict::Holds)
}

/// The catalogue makes no prediction.
pub fn unknown(_: &Target) -> Option<Verdict> {
    None
}

/// A check a scenario declares before it runs.
#[derive(Debug, Clone, Copy)]
pub struct CheckSpec {
    pub id: &'static str,
    pub invariant: u8,
    pub class: Class,
    pub title: &'static str,
    pub expect: Expectation,
    /// Only on this filesystem (the check is not reported on the other).
    pub only: Option<Fs>,
}

impl CheckSpec {
    pub const fn new(id: &'static str, invariant: u8, class: Class, title: &'static str, expect: Expectation) -> Self {
        CheckSpec { id, invariant, class, title, expect, only: None }
    }

    pub const fn only(mut self, fs: Fs) -> Self {
        self.only = Some(fs);
        self
    }
}

/// A step that went wrong, with what the scenario was doing.
#[derive(Debug, thiserror::Error)]
#[error("{step}: {message}")]
pub struct StepError {
    pub step: String,
    pub message: String,
}

impl StepError {
    pub fn new(step: impl Into<String>, message: impl ToString) -> Self {
        StepError { step: step.into(), message: message.to_string() }
    }
}

/// Adds the step to an error: `file.sync_all().step("fsync the seed data")?`.
pub trait Step<T> {
    fn step(self, step: &str) -> Result<T, StepError>;
}

impl<T, E: std::fmt::Display> Step<T> for Result<T, E> {
    fn step(self, step: &str) -> Result<T, StepError> {
        self.map_err(|e| StepError::new(step, e))
    }
}

/// A verdict with its reason and evidence.
type Found = (Verdict, Option<String>, Map<String, Value>);

/// The verdicts a scenario has reached so far, and evidence shared by all its checks.
#[derive(Debug, Default)]
pub struct Findings {
    verdicts: BTreeMap<String, Found>,
    shared: Map<String, Value>,
}

impl Findings {
    /// Records a verdict. `evidence` should be a JSON object; anything else is stored under `value`.
    pub fn set(&mut self, id: &str, verdict: Verdict, reason: Option<String>, evidence: Value) {
        let evidence = match evidence {
            Value::Object(map) => map,
            Value::Null => Map::new(),
            other => Map::from_iter([("value".to_string(), other)]),
        };
        self.verdicts.insert(id.to_string(), (verdict, reason, evidence));
    }

    /// Holds when `held`, else violated with `why`.
    pub fn judge(&mut self, id: &str, held: bool, why: impl Into<String>, evidence: Value) {
        if held {
            self.set(id, Verdict::Holds, None, evidence);
        } else {
            self.set(id, Verdict::Violated, Some(why.into()), evidence);
        }
    }

    /// Evidence attached to every check of the scenario.
    pub fn share(&mut self, key: &str, value: Value) {
        self.shared.insert(key.to_string(), value);
    }

    pub fn verdict(&self, id: &str) -> Option<Verdict> {
        self.verdicts.get(id).map(|v| v.0)
    }
}

/// A scenario: fresh filesystem, one failure, the checks it answers.
pub struct Scenario {
    pub name: &'static str,
    pub about: &'static str,
    pub checks: &'static [CheckSpec],
    pub run: fn(&mut Env, &mut Findings) -> Result<(), StepError>,
}

/// Every scenario, in the order they run.
pub fn scenarios() -> Vec<&'static Scenario> {
    let mut all: Vec<&'static Scenario> = vec![&views::SCENARIO];
    all.extend(errseq::SCENARIOS.iter());
    all.extend([
        &recovery::TWO_ERRORS,
        &recovery::SCENARIO,
        &unwritten::SCENARIO,
        &unwritten::APPEND,
        &readfault::SCENARIO,
        &submission::SCENARIO,
        &logfail::SCENARIO,
        &eviction::SCENARIO,
        &fsnotify::SCENARIO,
        &direct::SCENARIO,
        &pressure::SCENARIO,
        &folio::SCENARIO,
        &journal::FLUSH,
        &journal::FUA,
        &xfsmeta::RETRY_FOREVER,
        &xfsmeta::MAX_RETRIES,
        &xfsmeta::RETRY_TIMEOUT,
    ]);
    all
}

/// How to run the suite.
pub struct SuiteConfig {
    pub device: PathBuf,
    pub control: Control,
    pub filesystems: Vec<Fs>,
    pub mountpoint: PathBuf,
    /// Scenario names to run (all when empty).
    pub only: Vec<String>,
    /// How long the server holds each error reply.
    pub delay: Duration,
    /// Debian package name, when the VM harness knows it.
    pub kernel_package: Option<String>,
}

/// Why the suite could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum SuiteError {
    #[error("{0} is not a block device: attach it with nbd-client first")]
    NotBlockDevice(PathBuf),
    #[error("cannot read the running kernel's version: {0}")]
    Kernel(std::io::Error),
    #[error("the control API does not answer: {0}")]
    Control(#[from] crate::control::ControlError),
    #[error("no scenario is called {0}; known: {1}")]
    UnknownScenario(String, String),
    #[error("cannot prepare the machine: {0}")]
    Setup(String),
}

/// Runs the chosen scenarios on each filesystem. `progress` receives one line per event.
pub fn run_suite(config: &SuiteConfig, progress: &mut dyn FnMut(&str)) -> Result<Vec<Report>, SuiteError> {
    use std::os::unix::fs::FileTypeExt;
    let meta = std::fs::metadata(&config.device).map_err(|_| SuiteError::NotBlockDevice(config.device.clone()))?;
    if !meta.file_type().is_block_device() {
        return Err(SuiteError::NotBlockDevice(config.device.clone()));
    }
    let all = scenarios();
    for name in &config.only {
        if !all.iter().any(|s| s.name == name) {
            let known = all.iter().map(|s| s.name).collect::<Vec<_>>().join(", ");
            return Err(SuiteError::UnknownScenario(name.clone(), known));
        }
    }
    let running = RunningKernel::detect().map_err(SuiteError::Kernel)?;
    config.control.health()?;
    let _quiet = env::quiet_background_writeback()
        .map_err(|e| SuiteError::Setup(format!("cannot turn off periodic writeback: {e}")))?;
    std::fs::create_dir_all(&config.mountpoint)
        .map_err(|e| SuiteError::Setup(format!("{}: {e}", config.mountpoint.display())))?;
    let chosen: Vec<&Scenario> =
        all.into_iter().filter(|s| config.only.is_empty() || config.only.iter().any(|o| o == s.name)).collect();

    let mut reports = Vec::new();
    for &fs in &config.filesystems {
        let started = Instant::now();
        let started_unix = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let target = Target { fs, kernel: running.version };
        let mut checks = Vec::new();
        for scenario in &chosen {
            if scenario.checks.iter().all(|c| c.only.is_some_and(|only| only != fs)) {
                continue;
            }
            progress(&format!("{fs}: {} ({})", scenario.name, scenario.about));
            let t0 = Instant::now();
            let results = run_scenario(config, scenario, target);
            let failing = results.iter().filter(|c| crate::report::fails_run_on(c, fs.name())).count();
            let summary: Vec<String> = results.iter().map(|c| format!("{} {}", c.id, c.verdict.word())).collect();
            progress(&format!(
                "{fs}: {} done in {:.1} s{}: {}",
                scenario.name,
                t0.elapsed().as_secs_f64(),
                if failing > 0 { format!(", {failing} FAILING") } else { String::new() },
                summary.join(", ")
            ));
            checks.extend(results);
        }
        reports.push(Report {
            tool: env!("CARGO_PKG_NAME").to_string(),
            tool_version: env!("CARGO_PKG_VERSION").to_string(),
            kernel: KernelInfo {
                release: running.release.clone(),
                version: running.version,
                package: config.kernel_package.clone(),
            },
            fs: fs.to_string(),
            started_unix,
            duration_secs: started.elapsed().as_secs_f64(),
            checks,
        });
    }
    Ok(reports)
}

fn run_scenario(config: &SuiteConfig, scenario: &Scenario, target: Target) -> Vec<CheckResult> {
    let specs: Vec<&CheckSpec> = scenario.checks.iter().filter(|c| c.only.is_none_or(|fs| fs == target.fs)).collect();
    let mut findings = Findings::default();
    let outcome = match Env::prepare(config, target) {
        Ok(mut env) => {
            let result = (scenario.run)(&mut env, &mut findings);
            let log = env.finish();
            findings.share("kernel_log", json!(log));
            result
        }
        Err(e) => Err(e),
    };
    specs
        .into_iter()
        .map(|spec| {
            let (verdict, reason, mut evidence) = match findings.verdicts.remove(spec.id) {
                Some(found) => found,
                None => {
                    let reason = match &outcome {
                        Err(e) => format!("the scenario stopped before this check: {e}"),
                        Ok(()) => "the scenario finished without reaching this check".to_string(),
                    };
                    (Verdict::Error, Some(reason), Map::new())
                }
            };
            for (k, v) in &findings.shared {
                evidence.entry(k.clone()).or_insert_with(|| v.clone());
            }
            CheckResult {
                id: spec.id.to_string(),
                title: spec.title.to_string(),
                invariant: spec.invariant,
                class: spec.class,
                verdict,
                reason,
                expected: (spec.expect)(&target),
                evidence,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_check_id_is_unique_and_names_a_known_invariant() {
        let mut seen = std::collections::HashSet::new();
        for scenario in scenarios() {
            for check in scenario.checks {
                assert!(seen.insert(check.id), "duplicate check id {}", check.id);
                assert!(
                    crate::invariants::invariant(check.invariant).is_some(),
                    "{} names unknown invariant {}",
                    check.id,
                    check.invariant
                );
                assert!(check.id.contains('.'), "{} must be scenario.check", check.id);
            }
        }
    }

    #[test]
    fn scenario_names_are_unique() {
        let names: Vec<&str> = scenarios().iter().map(|s| s.name).collect();
        let mut unique = names.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(names.len(), unique.len());
    }

    #[test]
    fn findings_judge_records_holds_or_violated_with_reason() {
        let mut f = Findings::default();
        f.judge("a.b", true, "unused", json!({"x": 1}));
        f.judge("a.c", false, "because", Value::Null);
        assert_eq!(f.verdict("a.b"), Some(Verdict::Holds));
        assert_eq!(f.verdicts["a.c"].1.as_deref(), Some("because"));
    }
}
