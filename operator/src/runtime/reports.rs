//! What users see: Host statuses and conditions written through the status sink, the broker
//! and inbox metrics, and readiness.

use super::*;
use crate::core::report::Views;

/// The fleet's views, as the status functions read them.
struct FleetViews<'a>(&'a BTreeMap<String, HostRt>);

impl Views for FleetViews<'_> {
    fn view(&self, host: &str) -> Option<&HostView> {
        self.0.get(host).map(|rt| &rt.view)
    }
}

impl Runtime {
    /// Writes the status of the hosts whose status is due (every host after a compile) and
    /// of every Group, Profile and Zone; the sinks skip writes of unchanged statuses.
    pub(super) async fn write_statuses(&mut self) -> bool {
        let compiled = self.compiler.compiled();
        let snap = self.compiler.snapshot();
        let views = FleetViews(&self.fleet);
        let mut ok = true;
        let hosts: Vec<String> = if std::mem::take(&mut self.status_all) {
            self.status_dirty.clear();
            let mut all: Vec<String> = snap.hosts.keys().cloned().collect();
            all.extend(
                self.fleet
                    .keys()
                    .filter(|h| !snap.hosts.contains_key(*h))
                    .cloned(),
            );
            all
        } else {
            std::mem::take(&mut self.status_dirty).into_iter().collect()
        };
        let default_view = HostView::default();
        let now = Timestamp::now().to_string();
        let mut failed = Vec::new();
        for h in &hosts {
            let view = views.view(h).unwrap_or(&default_view);
            let mut st = report::host_status(compiled, h, view);
            let generation = snap.hosts.get(h).and_then(|o| o.metadata.generation);
            stamp_cached(
                &mut self.last_conditions,
                format!("Host/{h}"),
                &mut st.conditions,
                snap.hosts
                    .get(h)
                    .and_then(|o| o.status.as_ref())
                    .map(|s| &s.conditions),
                &now,
                generation,
            );
            if let Err(e) = self.status.write_host(h, generation, st).await {
                ok = false;
                failed.push(h.clone());
                warn!(host = %h, error = %e, "status write failed");
            }
        }
        self.status_dirty.extend(failed);
        self.count_hosts();
        // Groups, Profiles and Zones: the same steps, each with its own status type and writer.
        macro_rules! write_objects {
            ($objects:expr, $kind:literal, $status:expr, $write:ident) => {
                for (name, obj) in $objects {
                    let mut st = $status(name);
                    stamp_cached(
                        &mut self.last_conditions,
                        format!("{}/{name}", $kind),
                        &mut st.conditions,
                        obj.status.as_ref().map(|s| &s.conditions),
                        &now,
                        obj.metadata.generation,
                    );
                    if let Err(e) = self.status.$write(name, obj.metadata.generation, st).await {
                        ok = false;
                        warn!(kind = $kind, name = %name, error = %e, "status write failed");
                    }
                }
            };
        }
        write_objects!(
            &snap.groups,
            "Group",
            |n| report::group_status(compiled, n, &views),
            write_group
        );
        write_objects!(
            &snap.profiles,
            "Profile",
            |n| report::profile_status(compiled, n, &views),
            write_profile
        );
        write_objects!(
            &snap.zones,
            "Zone",
            |n| report::zone_status(compiled, n),
            write_zone
        );
        if !ok {
            self.needs_status = true;
        }
        ok
    }

    /// The host gauges: hosts per state, and drifted hosts (an observing host applies nothing:
    /// its difference is not drift). One pass over the fleet's views, no status computed.
    fn count_hosts(&self) {
        let compiled = self.compiler.compiled();
        let mut by_state: BTreeMap<&'static str, i64> = BTreeMap::new();
        let mut drifted = 0;
        let hosts = self.compiler.snapshot().hosts.keys().chain(
            self.fleet
                .keys()
                .filter(|h| !self.compiler.snapshot().hosts.contains_key(*h)),
        );
        let default_view = HostView::default();
        for h in hosts {
            let view = self.fleet.get(h).map_or(&default_view, |rt| &rt.view);
            *by_state.entry(state_label(view.state)).or_default() += 1;
            if matches!(compiled.hosts.get(h), Some(HostOutcome::Firewall { .. }))
                && !view.observe
                && view.reported.is_some()
                && !report::realized(compiled, h, Some(view))
            {
                drifted += 1;
            }
        }
        for state in ["New", "Active", "Inactive", "Retired"] {
            self.metrics
                .hosts
                .with_label_values(&[state])
                .set(by_state.get(state).copied().unwrap_or(0));
        }
        self.metrics.hosts_drifted.set(drifted);
    }

    /// Every [`INBOX_EVERY`]: how many agent messages wait in the inbox (a metric; above
    /// [`BACKLOG_NOT_READY`] `/readyz` says so).
    pub(super) async fn check_inbox(&mut self) {
        if self
            .inbox_checked
            .is_some_and(|t| t.elapsed() < INBOX_EVERY)
            || !self.link.status().connected
        {
            return;
        }
        self.inbox_checked = Some(Instant::now());
        match tokio::time::timeout(Duration::from_secs(2), self.link.inbox_depth()).await {
            Ok(Ok(n)) => {
                self.metrics.inbox_messages.set(i64::from(n));
                self.inbox_backlog = n;
            }
            Ok(Err(e)) => debug!(error = %e, "cannot read the inbox depth"),
            Err(_) => debug!("reading the inbox depth timed out"),
        }
        self.report_broker();
    }

    /// `/readyz` and `dog_operator_broker_connected` follow the broker connection (an
    /// operator that cannot publish is not ready, whatever else works) and the inbox backlog.
    pub(super) fn report_broker(&mut self) {
        let st = self.link.status();
        self.metrics.broker_connected.set(st.connected as i64);
        dog_protocol::telemetry::count_up_to(&self.metrics.broker_failures, st.failures);
        if st.connected && self.inbox_backlog > BACKLOG_NOT_READY {
            self.health.set_not_ready(format!(
                "intake backlog: {} agent messages waiting in the inbox",
                self.inbox_backlog
            ));
        } else if st.connected {
            self.health.set_ready();
        } else {
            self.health.set_not_ready(format!(
                "broker disconnected: {}",
                st.last_error.as_deref().unwrap_or("connecting")
            ));
        }
    }
}
