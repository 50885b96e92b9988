//! Drift: verifying the kernel against the applied firewall, repairing it (enforce mode) or
//! planning against it (observe mode).

use super::*;

impl Agent {
    /// Verifies the kernel against the applied firewall and (enforce) repairs it. Returns
    /// whether the kernel now matches (`None`: it could not be read or nothing is applied).
    pub(super) async fn drift_check(&mut self) -> Option<bool> {
        let applied = self.applied.clone()?;
        if self.cfg.mode == Mode::Observe {
            return self.observe_check(&applied.firewall).await;
        }
        let k = self.kernel.clone();
        let fw = applied.firewall.clone();
        let report = match blocking(move || k.verify_firewall(&fw)).await {
            Ok(r) => r,
            Err(e) => {
                self.metrics
                    .drift_checks
                    .with_label_values(&["error"])
                    .inc();
                warn!(error = %e, "drift check cannot read the kernel");
                return None;
            }
        };
        self.verified = Some(report.live.clone());
        if report.is_clean() {
            self.metrics
                .drift_checks
                .with_label_values(&["clean"])
                .inc();
            self.drift.drifted.clear();
            self.drift.since = None;
            return Some(true);
        }
        self.metrics
            .drift_checks
            .with_label_values(&["drift"])
            .inc();
        let parts = drift_parts(&report);
        let now = unix_now();
        let observe = self.cfg.mode == Mode::Observe;
        if observe && parts == self.drift.drifted {
            return Some(false);
        }
        warn!(
            revision = applied.revision,
            differences = %report.lines().join("; "),
            "drift: dog's chains or sets differ from the applied firewall"
        );
        let repaired = if observe {
            false
        } else {
            match self.kernel_apply_repair(&applied.firewall).await {
                Ok(r) => {
                    self.verified = Some(r.hashes);
                    self.metrics.drift_repairs.inc();
                    self.drift.repairs += 1;
                    info!(revision = applied.revision, parts = %parts.join(", "), "drift repaired");
                    true
                }
                Err(e) => {
                    error!(revision = applied.revision, error = %e, "drift repair failed");
                    self.verified = None;
                    false
                }
            }
        };
        for ev in drift_events(&report, &parts, repaired, now) {
            if self.drift_events.len() >= limits::DRIFT_ITEMS {
                self.drift_events.pop_front();
            }
            self.drift_events.push_back(ev);
        }
        if repaired {
            self.drift.drifted.clear();
            self.drift.since = None;
        } else {
            self.drift.since.get_or_insert(now);
            self.drift.drifted = parts;
        }
        Some(repaired)
    }

    /// Observe mode's drift check: nothing was applied, so nothing drifted; the kernel is
    /// planned against the desired firewall again and the count of changes is kept for the
    /// keepalives. Returns whether the kernel already matches.
    pub(super) async fn observe_check(&mut self, firewall: &Firewall) -> Option<bool> {
        let k = self.kernel.clone();
        let fw = firewall.clone();
        match blocking(move || k.plan_firewall(&fw)).await {
            Ok(plan) => {
                let n = plan.change_count();
                self.verified = Some(plan.live.clone());
                if self.would_change != Some(n) {
                    info!(would_change = n, summary = %plan_summary(&plan), "observe mode: the kernel changed");
                }
                self.would_change = Some(n);
                Some(n == 0)
            }
            Err(e) => {
                warn!(error = %e, "observe mode: cannot read the kernel");
                None
            }
        }
    }

    pub(super) async fn kernel_apply_repair(
        &self,
        fw: &Firewall,
    ) -> Result<ApplyReport, ApplyError> {
        let k = self.kernel.clone();
        let fw = fw.clone();
        blocking(move || k.repair_firewall(&fw)).await
    }
}
