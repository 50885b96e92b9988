//! The broker link: readiness from its status, the heartbeat on every (re)connect, keepalives,
//! publishing to the operator, the interface scan, shared-set bindings and the move between
//! broker users.

use super::*;

impl Agent {
    pub(super) async fn watch_link(&mut self) {
        let st = self.link.status();
        self.metrics.broker_connected.set(i64::from(st.connected));
        if st.connected {
            self.failures_at_connect = st.failures;
        } else if matches!(self.login, Login::Own(_))
            && self.next_login.is_none()
            && own_user_refused(&st, self.failures_at_connect)
        {
            warn!(error = st.last_error.as_deref().unwrap_or(""), "the broker refuses this node's own user; forgetting it and asking the operator for a new one");
            if let Err(e) = self.store.remove_broker_user() {
                warn!(error = %e, "cannot remove the saved broker user");
            }
            self.next_login = Some(Login::Bootstrap);
        }
        dog_protocol::telemetry::count_up_to(&self.metrics.broker_failures, st.failures);
        if st.connected && st.connects != self.heartbeat_for && self.send_heartbeat().await {
            self.heartbeat_for = st.connects;
        }
        let ask_again = self.login == Login::Bootstrap
            && self.next_login.is_none()
            && self
                .last_heartbeat
                .is_some_and(|at| at.elapsed() >= BOOTSTRAP_ASK_EVERY);
        if st.connected && ask_again {
            info!("still on the bootstrap broker user; asking the operator again");
            self.send_heartbeat().await;
        }
        if !st.connected {
            self.health.set_not_ready(format!(
                "not connected to the broker{}",
                st.last_error.map(|e| format!(": {e}")).unwrap_or_default()
            ));
        } else if !self.startup_verified {
            self.health
                .set_not_ready("the saved firewall is not verified yet");
        } else if self.login == Login::Bootstrap {
            self.health.set_not_ready(
                "logged in as the bootstrap broker user: waiting for this node's own user from the operator",
            );
        } else {
            self.health.set_ready();
        }
    }

    /// The revision in force in the kernel: none in observe mode, which applies nothing.
    pub(super) fn applied_revision(&self) -> Option<u64> {
        if self.cfg.mode == Mode::Observe {
            return None;
        }
        self.applied.as_ref().map(|a| a.revision)
    }

    /// Reads dog's live state (and updates the installed gauges). Sets equal to the applied
    /// ones share their content and hash instead of being held and hashed a second time.
    pub(super) async fn live(&self) -> Result<LiveState, KernelError> {
        let k = self.kernel.clone();
        let known = self
            .applied
            .as_ref()
            .map(|a| a.firewall.sets.clone())
            .unwrap_or_default();
        let live = blocking(move || k.snapshot_against(&known)).await?;
        self.metrics.observe_live(&live);
        Ok(live)
    }

    /// What keepalives and heartbeats report: the last verification's hashes (see
    /// `verified`), reading the kernel only when there is none.
    pub(super) async fn reported_hashes(&mut self) -> Option<FirewallHashes> {
        if self.verified.is_none() {
            self.verified = self.live_hashes().await;
        }
        self.verified.clone()
    }

    pub(super) async fn live_hashes(&self) -> Option<FirewallHashes> {
        match self.live().await {
            Ok(l) => Some(l.hashes()),
            Err(e) => {
                warn!(error = %e, "cannot read the live firewall");
                None
            }
        }
    }

    /// Persists what was accepted once its work is done and before it is acknowledged: after
    /// a restart the same message is not accepted again. (A crash before this leaves the message
    /// unacknowledged; its redelivery is then handled as new, which is what its undone work
    /// needs.)
    pub(super) fn save_replay(&self) {
        if let Err(e) = self.store.save_replay(&self.replay) {
            warn!(error = %e, "cannot save the replay state");
        }
    }

    /// The identity token as the kubelet last wrote it; a missing or unreadable file is
    /// logged and the heartbeat goes without (the operator then decides by its pins).
    pub(super) fn identity_token(&self) -> Option<String> {
        let path = self.cfg.identity_token_file.as_ref()?;
        match std::fs::read_to_string(path) {
            Ok(t) if !t.trim().is_empty() => Some(t.trim().to_string()),
            Ok(_) => {
                warn!(file = %path.display(), "the identity token file is empty");
                None
            }
            Err(e) => {
                warn!(file = %path.display(), error = %e, "cannot read the identity token");
                None
            }
        }
    }

    pub(super) async fn send_heartbeat(&mut self) -> bool {
        let hb = Heartbeat {
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            hostname: self.hostname.clone(),
            interfaces: self.interfaces.clone(),
            signing_key: self.signing_key,
            encryption_key: self.encryption_key,
            applied_revision: self.applied_revision(),
            live_hashes: self.reported_hashes().await,
            drift: self.drift.clone(),
            mode: self.cfg.mode,
            identity_token: self.identity_token(),
            broker_reply_to: self.link.reply_queue(),
            session_envelopes: true,
        };
        let ok = self
            .publish(&AgentMessage::Heartbeat(hb), "heartbeat")
            .await;
        if ok {
            self.last_heartbeat = Some(Instant::now());
            info!(revision = self.applied_revision(), "sent heartbeat");
        }
        ok
    }

    pub(super) async fn send_keepalive(&mut self) {
        if !self.link.status().connected {
            debug!("not connected; keepalive skipped (drift events kept for the next one)");
            return;
        }
        let drift: Vec<DriftEvent> = self.drift_events.iter().cloned().collect();
        let ka = Keepalive {
            interval_secs: self.cfg.keepalive_interval.as_secs_f64().ceil().max(1.0) as u64,
            applied_revision: self.applied_revision(),
            live_hashes: self.reported_hashes().await,
            drift,
            mode: self.cfg.mode,
            would_change: self.would_change,
        };
        let n = ka.drift.len();
        if self
            .publish(&AgentMessage::Keepalive(ka), "keepalive")
            .await
        {
            self.drift_events.drain(..n.min(self.drift_events.len()));
        }
    }

    /// Seals and publishes to the operator; false when it could not be confirmed in time.
    pub(super) async fn publish(&self, msg: &AgentMessage, kind: &'static str) -> bool {
        let bytes = match self.sealer.agent_message(
            &self.cfg.operator_name,
            msg,
            unix_now(),
            MESSAGE_TTL_SECS,
        ) {
            Ok(b) => b,
            Err(e) => {
                error!(kind, error = %e, "cannot seal a message to the operator");
                return false;
            }
        };
        let meta = MessageMeta::new(Uuid::new_v4().to_string(), kind);
        match tokio::time::timeout(
            PUBLISH_TIMEOUT,
            self.link.publish_to_operator(&bytes, &meta),
        )
        .await
        {
            Ok(Ok(())) => {
                self.metrics.sent.with_label_values(&[kind]).inc();
                true
            }
            Ok(Err(e)) => {
                warn!(kind, error = %e, "publish to the operator failed");
                false
            }
            Err(_) => {
                warn!(kind, "publish to the operator not confirmed in time");
                false
            }
        }
    }

    /// Scans interfaces; true when they changed since the last scan.
    pub(super) async fn scan_addresses(&mut self) -> bool {
        let k = self.kernel.clone();
        match tokio::task::spawn_blocking(move || k.interfaces()).await {
            Ok(Ok(ifs)) => {
                let now = to_protocol_interfaces(&ifs);
                let changed = now != self.interfaces;
                self.interfaces = now;
                changed
            }
            Ok(Err(e)) => {
                warn!(error = %e, "cannot list interfaces");
                false
            }
            Err(e) => {
                error!(error = %e, "interface scan panicked");
                false
            }
        }
    }

    pub(super) async fn sync_bindings(&self, old: &[String], new: &[String]) {
        let old: BTreeSet<&String> = old.iter().collect();
        let new: BTreeSet<&String> = new.iter().collect();
        for name in new.difference(&old) {
            match tokio::time::timeout(BIND_TIMEOUT, self.link.bind_shared_set(name)).await {
                Ok(Err(e)) => warn!(set = %name, error = %e, "cannot bind shared set"),
                Err(_) => debug!(set = %name, "binding shared set after reconnect"),
                Ok(Ok(())) => debug!(set = %name, "bound shared set"),
            }
        }
        for name in old.difference(&new) {
            match tokio::time::timeout(BIND_TIMEOUT, self.link.unbind_shared_set(name)).await {
                Ok(Err(e)) => warn!(set = %name, error = %e, "cannot unbind shared set"),
                Err(_) => debug!(set = %name, "unbinding shared set after reconnect"),
                Ok(Ok(())) => debug!(set = %name, "unbound shared set"),
            }
        }
    }
}
