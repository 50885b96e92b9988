//! The 1 s tick: lifecycle transitions, resync of hosts whose hashes stay wrong, retries of
//! refused identity reviews, and collecting Hosts retired past the retention.

use super::*;

impl Runtime {
    pub(super) fn on_tick(&mut self) {
        self.report_broker();
        let now = Timestamp::now();
        let clocks: Vec<HostClock> = self
            .fleet
            .iter()
            .filter(|(_, rt)| !rt.node_gone)
            .map(|(n, rt)| HostClock {
                name: n.clone(),
                state: rt.view.state,
                last_keepalive: rt.last_seen,
            })
            .collect();
        let evaluation = lifecycle::evaluate(&clocks, self.last_heard_any, now, &self.lifecycle);
        match self.valve.observe(&evaluation) {
            Some(ValveChange::Engaged) => {
                warn!("no agent at all was heard for {:?}: freezing lifecycle transitions (the operator's own connectivity is the likelier fault)", self.lifecycle.freeze_after);
                self.metrics.safety_valve_frozen.set(1);
            }
            Some(ValveChange::Released) => {
                info!("agents are heard again: lifecycle transitions resume");
                self.metrics.safety_valve_frozen.set(0);
            }
            None => {}
        }
        if let Evaluation::Transitions(ts) = evaluation {
            for t in ts {
                if let Some(rt) = self.fleet.get_mut(&t.name) {
                    info!(host = %t.name, from = ?t.from, to = ?t.to, "host lifecycle transition");
                    rt.view.state = t.to;
                    emit(
                        &self.events,
                        self.compiler.snapshot(),
                        DogEvent::host_state_changed(&t.name, t.from, t.to),
                    );
                    self.status_due(&t.name);
                    if t.to == HostState::Retired || t.from == HostState::Retired {
                        self.needs_compile = true;
                    }
                }
            }
        }
        // retries of failed publishes
        if self.publish_pending_retry() {
            self.needs_publish = true;
        }
    }

    /// Deletes the Hosts that stayed Retired and silent past the retention, and forgets them
    /// (pins, publish state, status cache), with an Event.
    pub(super) async fn collect_retired(&mut self) {
        let retention = self.args.retired_retention;
        if retention.is_zero() || !self.registrar.collects() {
            return;
        }
        let now = Timestamp::now();
        let snap = self.compiler.snapshot();
        let due: Vec<String> = self
            .fleet
            .iter()
            .filter(|(name, rt)| {
                let created = snap
                    .hosts
                    .get(*name)
                    .and_then(|h| h.metadata.creation_timestamp.as_ref())
                    .map(|t| t.0);
                lifecycle::collectable(rt.view.state, rt.last_seen, created, now, retention)
            })
            .map(|(n, _)| n.clone())
            .collect();
        for name in due {
            if let Err(e) = self.registrar.collect(&name).await {
                warn!(host = %name, error = %e, "could not delete the retired Host; will retry");
                continue;
            }
            let event = DogEvent::host_collected(&name, retention);
            emit(&self.events, self.compiler.snapshot(), event);
            info!(host = %name, retention_secs = retention.as_secs(), "deleted a Host retired past the retention");
            revoke_broker_user(&self.broker_users, &self.link, &name);
            self.fleet.remove(&name);
            self.registered.remove(&name);
            self.publish.forget(&name);
            self.pending.forget_host(&name);
            if let dog_protocol::envelope::Trust::Agents(pins) = self.opener.trust_mut() {
                pins.remove(&name);
            }
            self.status.forget("Host", &name);
            self.last_conditions.remove(&format!("Host/{name}"));
            self.needs_compile = true;
        }
    }
}
