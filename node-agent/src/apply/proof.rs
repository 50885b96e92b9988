//! The proof that the kernel holds what was sent, at the cost of what changed (the written
//! sets' member counts, the restored rules' read-back), and the whole-state drift check.

use super::*;

impl Applier {
    /// The kernel state after an apply of `plan` on `live`, as checked (see the module docs):
    /// an error when something differs from what was sent.
    pub(super) fn verified(
        &self,
        fw: &Firewall,
        plan: &Plan,
        live: LiveState,
        restored: &[Family],
    ) -> Result<Result<LiveState, ApplyError>, KernelError> {
        let t = &*self.tools;
        let mut after = live;
        // The families' saves run in parallel with the set checks.
        let (saves, sets) = std::thread::scope(|sc| {
            let handles: Vec<_> = restored
                .iter()
                .map(|f| (*f, sc.spawn(move || t.save_rules(*f))))
                .collect();
            let sets = self.verified_sets(fw, &plan.sets, &mut after.sets);
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
            (saves, sets)
        });
        let mut differences = sets?;
        for (f, text) in saves {
            after.set_rules(f, text?);
        }
        let hashes = after.hashes();
        let desired = fw.hashes();
        if hashes != desired && differences.is_empty() {
            differences = compute_drift(fw, &after).lines();
            if differences.is_empty() {
                differences.push(format!(
                    "hashes differ: live {hashes:?}, desired {desired:?}"
                ));
            }
        }
        Ok(if differences.is_empty() {
            Ok(after)
        } else {
            Err(ApplyError::Readback { differences })
        })
    }

    /// Checks the sets an apply wrote by their member counts and records them in `sets`;
    /// returns what differs. Sets dog destroyed must be gone.
    pub(super) fn verified_sets(
        &self,
        fw: &Firewall,
        plan: &SetPlan,
        sets: &mut BTreeMap<String, LiveSet>,
    ) -> Result<Vec<String>, KernelError> {
        let mut differences = Vec::new();
        for gone in plan.destroy.iter().chain(&plan.stale_temps) {
            sets.remove(gone);
        }
        if !plan.destroy.is_empty() || !plan.stale_temps.is_empty() {
            // listing names is only needed then (a pure member change checks just its sets)
            let names: BTreeSet<String> = self.dog_sets()?.into_iter().collect();
            for n in plan.destroy.iter().chain(&plan.stale_temps) {
                if names.contains(n) {
                    differences.push(format!("set {n} still exists"));
                }
            }
        }
        let written = plan
            .create
            .iter()
            .chain(&plan.swap)
            .chain(plan.delta.iter().map(|d| &d.name));
        for name in written {
            let want = &fw.sets[name];
            match self.tools.set_count(name)? {
                Some(n) if n == want.members.len() => {
                    let maxelem = match sets.get(name) {
                        Some(old) if plan.delta.iter().any(|d| d.name == *name) => old.maxelem,
                        _ => want.maxelem(),
                    };
                    sets.insert(
                        name.clone(),
                        LiveSet {
                            content: want.clone(),
                            kind: "hash:net".into(),
                            maxelem,
                        },
                    );
                }
                Some(n) => differences.push(format!(
                    "set {name} holds {n} members, {} were sent",
                    want.members.len()
                )),
                None => differences.push(format!("set {name} missing")),
            }
        }
        Ok(differences)
    }

    /// Reads the kernel fresh and reports how it differs from `expected`.
    pub fn verify(&self, expected: &HostFirewall) -> Result<DriftReport, KernelError> {
        self.verify_firewall(&Firewall::from(expected))
    }

    /// [`Applier::verify`] of the agent's form of a firewall.
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

    /// Hashes of dog's live state, with the protocol's hash functions.
    pub fn live_hashes(&self) -> Result<FirewallHashes, KernelError> {
        Ok(self.snapshot()?.hashes())
    }
}
