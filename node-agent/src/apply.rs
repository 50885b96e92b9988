//! Applying a [`HostFirewall`] to the kernel: sets first, then dog's chains per family
//! atomically, then unreferenced sets are destroyed, then everything touched is read back and
//! compared by hash. Also observe-mode planning, drift verification/repair, set deltas and
//! explicit removal.

use crate::drift::{compute_drift, DriftReport};
use crate::firewall::Firewall;
use crate::ipset::{
    apply_delta, plan_sets, render_delta, temp_name, write_fill, LiveSet, SaveReader, SetDelta,
    SetPlan, SetPlanError,
};
use crate::iptables::{
    plan_rules, render_remove_all, render_rollback, validate_document, DocumentError, FilterState,
    RulesPlan,
};
use crate::kernel::{Kernel, KernelError};
use crate::live::LiveState;
use crate::members::SetContent;
use dog_protocol::ruleset::{FailsafeError, Family, FirewallHashes, HostFirewall, SET_PREFIX};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Instant;
use tracing::{info, info_span, warn};

/// Why an apply did not happen or did not complete.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("refused: {0}")]
    Failsafe(#[from] FailsafeError),
    #[error("refused: {0}")]
    Document(#[from] DocumentError),
    #[error("refused: {0}")]
    Set(#[from] SetPlanError),
    #[error("refused: set delta names set {0}, which the base firewall does not have")]
    UnknownSet(String),
    #[error("{step}: {source}")]
    Tool {
        step: &'static str,
        #[source]
        source: KernelError,
    },
    #[error("read-back differs from the applied firewall: {}", differences.join("; "))]
    Readback { differences: Vec<String> },
}

impl ApplyError {
    /// True when the kernel was not touched because the firewall was refused.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            ApplyError::Failsafe(_)
                | ApplyError::Document(_)
                | ApplyError::Set(_)
                | ApplyError::UnknownSet(_)
        )
    }

    /// The failing tool's error text, if a tool failed.
    pub fn tool_stderr(&self) -> Option<&str> {
        match self {
            ApplyError::Tool { source, .. } => Some(source.stderr()),
            _ => None,
        }
    }
}

fn tool(step: &'static str) -> impl FnOnce(KernelError) -> ApplyError {
    move |source| ApplyError::Tool { step, source }
}

/// What an apply would change (observe mode) or changed.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct Plan {
    pub sets: SetPlan,
    pub ipv4: RulesPlan,
    pub ipv6: RulesPlan,
    /// Hashes of the kernel state the plan was made against (read for it), so a caller that
    /// reports live hashes with the plan does not read the kernel a second time.
    pub live: FirewallHashes,
}

impl Plan {
    /// How many changes applying the plan would make: sets created, replaced or destroyed,
    /// members added or deleted, and rule lines restored (what observe mode reports).
    pub fn change_count(&self) -> u64 {
        let s = &self.sets;
        let sets = s.create.len() + s.swap.len() + s.destroy.len();
        let members: usize = s.delta.iter().map(|d| d.add.len() + d.del.len()).sum();
        let rules: usize = [&self.ipv4, &self.ipv6]
            .iter()
            .filter_map(|r| r.restore.as_deref())
            .map(|t| t.lines().filter(|l| l.starts_with("-A ")).count().max(1))
            .sum();
        (sets + members + rules) as u64
    }

    pub fn changes_anything(&self) -> bool {
        self.sets.changes_anything() || self.ipv4.restore.is_some() || self.ipv6.restore.is_some()
    }
    pub fn rules(&self, family: Family) -> &RulesPlan {
        match family {
            Family::V4 => &self.ipv4,
            Family::V6 => &self.ipv6,
        }
    }
}

/// Duration of one apply step.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct StepTime {
    pub step: String,
    pub ms: f64,
}

/// The result of a successful apply.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ApplyReport {
    /// What was done.
    pub plan: Plan,
    /// Live hashes after the apply (equal to the desired ones).
    pub hashes: FirewallHashes,
    pub steps: Vec<StepTime>,
    pub total_ms: f64,
}

impl ApplyReport {
    pub fn changed(&self) -> bool {
        self.plan.changes_anything()
    }
}

/// What [`Kernel::remove_all`] removed.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct RemoveReport {
    pub chains_v4: Vec<String>,
    pub chains_v6: Vec<String>,
    pub sets: Vec<String>,
}

struct Steps {
    started: Instant,
    steps: Vec<StepTime>,
}

impl Steps {
    fn new() -> Self {
        Steps {
            started: Instant::now(),
            steps: Vec::new(),
        }
    }
    fn time<T>(&mut self, step: &str, f: impl FnOnce() -> T) -> T {
        let span = info_span!("apply_step", step);
        let _g = span.enter();
        let t = Instant::now();
        let out = f();
        let ms = t.elapsed().as_secs_f64() * 1e3;
        tracing::debug!(step, ms, "step done");
        self.steps.push(StepTime {
            step: step.to_string(),
            ms,
        });
        out
    }
}

impl Kernel {
    /// Reads dog's chains (both families) and dog's sets.
    pub fn snapshot(&self) -> Result<LiveState, KernelError> {
        self.snapshot_against(&BTreeMap::new())
    }

    /// [`Kernel::snapshot`]; sets whose members equal those in `known` share that content.
    pub fn snapshot_against(
        &self,
        known: &BTreeMap<String, Arc<SetContent>>,
    ) -> Result<LiveState, KernelError> {
        let mut st = LiveState::default();
        for f in Family::BOTH {
            st.set_rules(f, self.save_filter(f)?);
        }
        st.sets = self.read_sets(None, known)?;
        Ok(st)
    }

    /// dog's sets: all of them, or only the named ones (which must exist), read line by line.
    fn read_sets(
        &self,
        only: Option<&BTreeSet<String>>,
        known: &BTreeMap<String, Arc<SetContent>>,
    ) -> Result<BTreeMap<String, LiveSet>, KernelError> {
        let names: Vec<String> = match only {
            Some(o) => o.iter().cloned().collect(),
            None => self
                .ipset_names()?
                .into_iter()
                .filter(|n| n.starts_with(SET_PREFIX))
                .collect(),
        };
        let mut reader = SaveReader::default();
        self.ipset_save_lines(&names, &mut |l| reader.line(l))?;
        Ok(reader.finish(known))
    }

    /// Checks a firewall without touching anything: failsafe, document shape.
    pub fn check(&self, fw: &Firewall) -> Result<(), ApplyError> {
        for f in Family::BOTH {
            let doc = fw.document(f);
            if doc.family != f {
                return Err(ApplyError::Document(DocumentError::Shape {
                    family: f,
                    why: "document carries the other family",
                }));
            }
            validate_document(doc)?;
            fw.failsafe.check(doc, self.config.broker_port)?;
        }
        Ok(())
    }

    fn plan_against(&self, fw: &Firewall, live: &LiveState) -> Result<Plan, ApplyError> {
        let mut sets = plan_sets(&fw.sets, &live.sets)?;
        // A set still referenced by a desired document is never destroyed.
        let referenced: BTreeSet<String> = Family::BOTH
            .iter()
            .flat_map(|f| fw.document(*f).referenced_sets())
            .collect();
        sets.destroy.retain(|s| !referenced.contains(s));
        Ok(Plan {
            sets,
            ipv4: plan_rules(&fw.ipv4, live.filter(Family::V4)),
            ipv6: plan_rules(&fw.ipv6, live.filter(Family::V6)),
            live: live.hashes(),
        })
    }

    /// Observe mode: what [`Kernel::apply`] would change, reading the kernel only.
    pub fn plan(&self, fw: &HostFirewall) -> Result<Plan, ApplyError> {
        self.plan_firewall(&Firewall::from(fw))
    }

    /// [`Kernel::plan`] of the agent's form of a firewall.
    pub fn plan_firewall(&self, fw: &Firewall) -> Result<Plan, ApplyError> {
        self.check(fw)?;
        let live = self
            .snapshot_against(&fw.sets)
            .map_err(tool("read live state"))?;
        self.plan_against(fw, &live)
    }

    /// Applies `fw` (packing and hashing its sets first; the agent itself holds
    /// [`Firewall`]s and calls [`Kernel::apply_firewall`]).
    pub fn apply(&self, fw: &HostFirewall) -> Result<ApplyReport, ApplyError> {
        self.apply_firewall(&Firewall::from(fw))
    }

    /// Applies `fw`. On error the previous rules stay in force (see module docs).
    pub fn apply_firewall(&self, fw: &Firewall) -> Result<ApplyReport, ApplyError> {
        let span = info_span!("apply", host = %fw.host);
        let _g = span.enter();
        let result = self.apply_inner(fw);
        match &result {
            Ok(r) => info!(
                changed = r.changed(),
                total_ms = r.total_ms,
                "applied firewall"
            ),
            Err(e) => {
                self.cache.put(None);
                warn!(error = %e, "apply failed");
            }
        }
        result
    }

    fn apply_inner(&self, fw: &Firewall) -> Result<ApplyReport, ApplyError> {
        let mut steps = Steps::new();
        steps.time("check", || self.check(fw))?;
        let mut live = match self.cache.take() {
            Some(c) => c,
            None => steps
                .time("read", || self.snapshot_against(&fw.sets))
                .map_err(tool("read live state"))?,
        };
        let plan = steps.time("plan", || self.plan_against(fw, &live))?;

        // 1. sets: leftover temporaries, new sets, swaps, deltas
        let mut touched: BTreeSet<String> = BTreeSet::new();
        if !plan.sets.stale_temps.is_empty() {
            let script: String = plan
                .sets
                .stale_temps
                .iter()
                .map(|t| format!("destroy {t}\n"))
                .collect();
            steps
                .time("sets.stale", || self.ipset_restore(&script, false))
                .map_err(tool("destroy leftover temporary sets"))?;
            for t in &plan.sets.stale_temps {
                live.sets.remove(t);
            }
        }
        if !plan.sets.create.is_empty() || !plan.sets.swap.is_empty() {
            // The script is written into `ipset restore` while it reads (a 1,000,000-entry set
            // is about 30 MB of text, never held whole).
            let mut feed = |w: &mut dyn std::io::Write| -> std::io::Result<()> {
                let mut w = w;
                for name in &plan.sets.create {
                    write_fill(&mut w, &fw.sets[name], name)?;
                }
                for name in &plan.sets.swap {
                    let tmp = temp_name(name);
                    write_fill(&mut w, &fw.sets[name], &tmp)?;
                    writeln!(w, "swap {tmp} {name}\ndestroy {tmp}")?;
                }
                Ok(())
            };
            let r = steps.time("sets.fill", || self.ipset_restore_with(false, &mut feed));
            if let Err(e) = r {
                let mut undo: Vec<String> = plan.sets.create.clone();
                undo.extend(plan.sets.swap.iter().map(|n| temp_name(n)));
                self.destroy_if_present(&undo);
                return Err(tool("create and fill sets")(e));
            }
            touched.extend(plan.sets.create.iter().cloned());
            touched.extend(plan.sets.swap.iter().cloned());
        }
        if !plan.sets.delta.is_empty() {
            let mut script = String::new();
            for d in &plan.sets.delta {
                render_delta(&mut script, d);
            }
            let r = steps.time("sets.delta", || self.ipset_restore(&script, true));
            if let Err(e) = r {
                self.destroy_if_present(&plan.sets.create);
                return Err(tool("change sets")(e));
            }
            touched.extend(plan.sets.delta.iter().map(|d| d.name.clone()));
        }

        // 2. rules, one atomic restore per family; roll IPv4 back if IPv6 fails
        let mut restored: Vec<Family> = Vec::new();
        for f in Family::BOTH {
            let Some(text) = &plan.rules(f).restore else {
                continue;
            };
            let step = match f {
                Family::V4 => "rules.v4",
                Family::V6 => "rules.v6",
            };
            if let Err(e) = steps.time(step, || self.restore_noflush(f, text)) {
                for done in &restored {
                    let back = render_rollback(live.filter(*done), fw.document(*done));
                    if let Err(re) = self.restore_noflush(*done, &back) {
                        warn!(family = %done, error = %re, "rollback of rules failed");
                    }
                }
                self.destroy_if_present(&plan.sets.create);
                return Err(tool(match f {
                    Family::V4 => "restore IPv4 rules",
                    Family::V6 => "restore IPv6 rules",
                })(e));
            }
            restored.push(f);
        }

        // 3. sets nothing references any more
        if !plan.sets.destroy.is_empty() {
            let script: String = plan
                .sets
                .destroy
                .iter()
                .map(|s| format!("destroy {s}\n"))
                .collect();
            steps
                .time("sets.destroy", || self.ipset_restore(&script, false))
                .map_err(tool("destroy unreferenced sets"))?;
        }

        // 4. read back what was touched and compare
        let readback = steps.time("readback", || -> Result<LiveState, KernelError> {
            let mut after = live.clone();
            // The families' saves run in parallel with the set reads below.
            let saves = std::thread::scope(|sc| {
                let handles: Vec<_> = restored
                    .iter()
                    .map(|f| (*f, sc.spawn(move || self.save_filter(*f))))
                    .collect();
                let sets = self.read_back_sets(&plan.sets, &touched, &fw.sets, &mut after);
                let saves: Vec<(Family, Result<String, KernelError>)> = handles
                    .into_iter()
                    .map(|(f, h)| {
                        let r = h.join().unwrap_or_else(|_| {
                            Err(KernelError::Spawn {
                                command: "iptables-save".into(),
                                source: std::io::Error::other("reader thread panicked"),
                            })
                        });
                        (f, r)
                    })
                    .collect();
                sets.map(|()| saves)
            })?;
            for (f, text) in saves {
                after.set_rules(f, text?);
            }
            Ok(after)
        });
        let after = readback.map_err(tool("read back"))?;
        let hashes = after.hashes();
        let desired = fw.hashes();
        if hashes != desired {
            let drift = compute_drift(fw, &after);
            let mut differences = drift.lines();
            if differences.is_empty() {
                differences.push(format!(
                    "hashes differ: live {hashes:?}, desired {desired:?}"
                ));
            }
            return Err(ApplyError::Readback { differences });
        }
        self.cache.put(Some(after));
        Ok(ApplyReport {
            plan,
            hashes,
            steps: steps.steps,
            total_ms: steps.started.elapsed().as_secs_f64() * 1e3,
        })
    }

    /// Reads back the sets an apply changed into `after` (see step 4 of `apply_inner`).
    fn read_back_sets(
        &self,
        plan: &SetPlan,
        touched: &BTreeSet<String>,
        desired: &BTreeMap<String, Arc<SetContent>>,
        after: &mut LiveState,
    ) -> Result<(), KernelError> {
        // Sets dog destroyed must be gone; listing names is only needed then (a pure
        // delta apply reads back just the sets it changed: one call).
        for gone in plan.destroy.iter().chain(&plan.stale_temps) {
            after.sets.remove(gone);
        }
        let mut missing: BTreeSet<String> = BTreeSet::new();
        if !plan.destroy.is_empty() || !plan.stale_temps.is_empty() {
            let names: BTreeSet<String> = self
                .ipset_names()?
                .into_iter()
                .filter(|n| n.starts_with(SET_PREFIX))
                .collect();
            after.sets.retain(|n, _| names.contains(n));
            missing = names
                .iter()
                .filter(|n| !after.sets.contains_key(*n))
                .cloned()
                .collect();
        }
        let reread: BTreeSet<String> = touched.union(&missing).cloned().collect();
        if !reread.is_empty() {
            after.sets.extend(self.read_sets(Some(&reread), desired)?);
        }
        Ok(())
    }

    /// Best-effort clean-up of sets this apply created (never referenced by rules in force).
    fn destroy_if_present(&self, names: &[String]) {
        let Ok(live) = self.ipset_names() else { return };
        let script: String = names
            .iter()
            .filter(|n| live.contains(n))
            .map(|n| format!("destroy {n}\n"))
            .collect();
        if !script.is_empty() {
            if let Err(e) = self.ipset_restore(&script, false) {
                warn!(error = %e, "could not remove sets created by a failed apply");
            }
        }
    }

    /// Applies set deltas (the operator's small-change messages) on top of `base`, which must be
    /// the firewall currently applied. Returns the resulting firewall and the report.
    pub fn apply_set_deltas(
        &self,
        base: &HostFirewall,
        deltas: &[SetDelta],
    ) -> Result<(HostFirewall, ApplyReport), ApplyError> {
        let mut next = Firewall::from(base);
        for d in deltas {
            let set = next
                .sets
                .get(&d.name)
                .ok_or_else(|| ApplyError::UnknownSet(d.name.clone()))?;
            let changed = apply_delta(set, d);
            next.sets.insert(d.name.clone(), Arc::new(changed));
        }
        let report = self.apply_firewall(&next)?;
        Ok((next.to_host_firewall(), report))
    }

    /// Reads the kernel fresh and reports how it differs from `expected`.
    pub fn verify(&self, expected: &HostFirewall) -> Result<DriftReport, KernelError> {
        self.verify_firewall(&Firewall::from(expected))
    }

    /// [`Kernel::verify`] of the agent's form of a firewall.
    pub fn verify_firewall(&self, expected: &Firewall) -> Result<DriftReport, KernelError> {
        let live = self.snapshot_against(&expected.sets)?;
        let report = compute_drift(expected, &live);
        if report.is_clean() {
            self.cache.put(Some(live));
        } else {
            self.cache.put(None);
            warn!(differences = %report.lines().join("; "), "drift detected");
        }
        Ok(report)
    }

    /// Re-applies `expected` from a fresh read of the kernel.
    pub fn repair(&self, expected: &HostFirewall) -> Result<ApplyReport, ApplyError> {
        self.repair_firewall(&Firewall::from(expected))
    }

    /// [`Kernel::repair`] of the agent's form of a firewall.
    pub fn repair_firewall(&self, expected: &Firewall) -> Result<ApplyReport, ApplyError> {
        self.cache.put(None);
        self.apply_firewall(expected)
    }

    /// Hashes of dog's live state, with the protocol's hash functions.
    pub fn live_hashes(&self) -> Result<FirewallHashes, KernelError> {
        Ok(self.snapshot()?.hashes())
    }

    /// Explicit uninstall: removes the hook jumps, flushes and deletes dog's chains, destroys
    /// dog's sets. Never called on shutdown.
    pub fn remove_all(&self) -> Result<RemoveReport, ApplyError> {
        self.cache.put(None);
        let mut report = RemoveReport::default();
        for f in Family::BOTH {
            let live = FilterState::parse(&self.save_filter(f).map_err(tool("read rules"))?);
            let chains: Vec<String> = live.owned.keys().cloned().collect();
            if let Some(text) = render_remove_all(&live) {
                self.restore_noflush(f, &text)
                    .map_err(tool("remove dog's chains"))?;
            }
            match f {
                Family::V4 => report.chains_v4 = chains,
                Family::V6 => report.chains_v6 = chains,
            }
        }
        let sets: Vec<String> = self
            .ipset_names()
            .map_err(tool("list sets"))?
            .into_iter()
            .filter(|n| n.starts_with(SET_PREFIX))
            .collect();
        if !sets.is_empty() {
            let script: String = sets.iter().map(|s| format!("destroy {s}\n")).collect();
            self.ipset_restore(&script, false)
                .map_err(tool("destroy dog's sets"))?;
        }
        report.sets = sets;
        info!(?report, "removed dog's firewall");
        Ok(report)
    }
}
