//! Agent messages: intake limits, opening, admission of first heartbeats (through
//! `crate::core::admission` and the identity authority), pinning, node broker users, keepalives and
//! responses.

use super::*;

impl Runtime {
    /// Whether a line about `reason` is due: the first one in a minute.
    pub(super) fn first_in_minute(&mut self, reason: &'static str) -> bool {
        let now = Instant::now();
        let due = match self.logged_rejections.get(reason) {
            Some(at) => now.duration_since(*at) > Duration::from_secs(60),
            None => true,
        };
        if due {
            self.logged_rejections.insert(reason, now);
        }
        due
    }

    pub(super) fn reject(&mut self, reason: &'static str, detail: &str, sender: Option<&str>) {
        self.metrics.rejected.with_label_values(&[reason]).inc();
        if self.first_in_minute(reason) {
            warn!(reason, sender = sender.unwrap_or("unknown"), detail, "rejected agent message (further ones with this reason are counted, not logged, for a minute)");
        }
    }

    /// Handles one agent message; the caller acknowledges it (see [`Runtime::run`]).
    pub(super) async fn on_delivery(&mut self, d: &Delivery) {
        let now = unix_now();
        // each pinned key has its own budget, checked before anything is spent on the message
        if let Some(key) = dog_protocol::envelope::claimed_signing_key(&d.body) {
            let fp = key.fingerprint();
            let pinned = matches!(self.opener.trust(), dog_protocol::envelope::Trust::Agents(p) if p.knows_signing(&fp));
            let now_ms = self.started.elapsed().as_millis() as u64;
            if pinned && !self.intake.admit(&fp, now_ms) {
                self.reject(
                    "rate_limited",
                    &format!("more messages under key {fp} than --sender-burst/--sender-messages-per-minute allow; dropped"),
                    None,
                );
                return;
            }
        }
        match self.opener.open(&d.body, now) {
            Err(r) => {
                let id = d.message_id.clone().unwrap_or_default();
                // who it claims to be, when its signature (by the key it carries) verified
                let claimed = self.opener.last_sender().map(str::to_string);
                self.reject(
                    r.reason(),
                    &format!("{r} (message id {id})"),
                    claimed.as_deref(),
                );
            }
            Ok(opened) => match opened.agent_message() {
                Err(e) => {
                    let sender = opened.header.sender.clone();
                    self.reject("malformed", &e.to_string(), Some(&sender));
                }
                Ok(msg) => self.on_message(opened, msg, d.user_id.as_deref()).await,
            },
        }
    }

    /// `user_id`: the broker user that published the message, as the broker checked it.
    pub(super) async fn on_message(
        &mut self,
        opened: Opened,
        msg: AgentMessage,
        user_id: Option<&str>,
    ) {
        let host = opened.header.sender.clone();
        let now = Timestamp::now();
        // a node's own broker user speaks for that node only, whatever key signed
        let user_host = user_id.and_then(|u| self.link.topology().host_of_node_user(u));
        if let Some(of) = user_host.filter(|of| *of != host) {
            let refusal = Refusal::WrongBrokerUser {
                host: host.clone(),
                user_host: of.to_string(),
            };
            self.reject(refusal.reason(), &refusal.to_string(), Some(&host));
            return;
        }
        self.last_heard_any = Some(now);
        let kind = match msg {
            AgentMessage::Heartbeat(_) => "heartbeat",
            AgentMessage::Keepalive(_) => "keepalive",
            AgentMessage::Response(_) => "response",
        };
        self.metrics.agent_messages.with_label_values(&[kind]).inc();
        match msg {
            AgentMessage::Heartbeat(hb) => {
                let by_own_user = user_host.is_some();
                self.on_heartbeat(&opened, hb, now, by_own_user).await
            }
            AgentMessage::Keepalive(ka) => self.on_keepalive(&host, ka, now),
            AgentMessage::Response(r) => self.on_response(&host, r, now),
        }
    }

    pub(super) fn mark_seen(&mut self, host: &str, now: Timestamp) {
        let rt = self.fleet.entry(host.to_string()).or_default();
        rt.last_seen = Some(now);
        // the written stamp is refreshed only every liveness interval (or with a state change
        // below): a keepalive alone must not turn into a status write
        let stamp_due = lifecycle::parse_keepalive(rt.view.last_keepalive.as_deref())
            .is_none_or(|t| lifecycle::age(t, now) >= self.args.liveness_write_interval);
        if stamp_due {
            rt.view.last_keepalive = Some(now.to_string());
            self.status_dirty.insert(host.to_string());
            self.needs_status = true;
        }
        if rt.view.state != HostState::Active && !rt.node_gone && !self.valve.is_frozen() {
            let from = rt.view.state;
            rt.view.state = HostState::Active;
            info!(host, from = ?from, "host is active");
            emit(
                &self.events,
                self.compiler.snapshot(),
                DogEvent::host_state_changed(host, from, HostState::Active),
            );
            // a host coming back (or leaving Retired) changes group address sets
            self.needs_compile = true;
            rt.view.last_keepalive = Some(now.to_string());
            self.status_due(host);
        }
    }

    /// Whether the host of a first heartbeat (no pin) is admitted: the pure checks, then the
    /// authority on its identity token, then the decision (crate::core::admission).
    /// `by_own_user`: the broker says the host's own broker user published it.
    pub(super) async fn admit(
        &mut self,
        hb: &Heartbeat,
        by_own_user: bool,
    ) -> Result<Admitted, Refusal> {
        let host = &hb.hostname;
        let now_ms = self.started.elapsed().as_millis() as u64;
        self.admission.precheck(host, now_ms)?;
        let evidence = match (&hb.identity_token, &self.verifier) {
            _ if by_own_user => Evidence::BrokerUser(host.clone()),
            // bounded: an API server that does not answer must not stall the loop
            (Some(token), Some(verifier)) => {
                match tokio::time::timeout(VERIFY_TIMEOUT, verifier.node_of(token)).await {
                    Ok(Ok(node)) => Evidence::Node(node),
                    Ok(Err(why)) => Evidence::Refused(why),
                    Err(_) => Evidence::Refused(format!(
                        "the API server did not review the token within {VERIFY_TIMEOUT:?}"
                    )),
                }
            }
            _ => Evidence::None,
        };
        let known =
            self.compiler.snapshot().hosts.contains_key(host) || self.registered.contains_key(host);
        let hosts = self.compiler.snapshot().hosts.len() + self.registered.len();
        self.admission.decide(host, &evidence, known, hosts)
    }

    pub(super) async fn on_heartbeat(
        &mut self,
        opened: &Opened,
        hb: Heartbeat,
        now: Timestamp,
        by_own_user: bool,
    ) {
        let host = hb.hostname.clone();
        if opened.first_use {
            match self.admit(&hb, by_own_user).await {
                Ok(how) => {
                    self.metrics
                        .hosts_registered
                        .with_label_values(&[how.label()])
                        .inc();
                    info!(host = %host, fingerprint = %hb.signing_key.fingerprint(), admitted = how.label(), "pinned agent keys");
                }
                Err(refusal) => {
                    self.reject(refusal.reason(), &refusal.to_string(), Some(&host));
                    // a declared host says why its agent is not admitted, and its heartbeat
                    // is kept until an admin pins the keys (the agent sends no other); an
                    // invented name leaves no trace but the counter and the log line
                    if self.compiler.snapshot().hosts.contains_key(&host) {
                        let rt = self.fleet.entry(host.clone()).or_default();
                        rt.view.not_admitted = Some(refusal.to_string());
                        let kept = &mut rt.refused_heartbeats;
                        kept.retain(|(_, old)| old.signing_key != hb.signing_key);
                        if kept.len() >= REFUSED_KEPT {
                            kept.remove(0);
                        }
                        let token = hb.identity_token.is_some();
                        kept.push((opened.clone(), hb));
                        rt.review_retry = match (&refusal, rt.review_retry) {
                            (Refusal::IdentityRefused { .. }, prev) if token => {
                                let refused = prev.map_or(1, |(_, n)| n + 1);
                                (refused <= REVIEW_RETRIES).then(|| {
                                    let wait = REVIEW_BACKOFF.ceiling(refused - 1);
                                    (Instant::now() + wait, refused)
                                })
                            }
                            // many hosts retrying at once (after an API server outage) may
                            // meet the registration rate limit: try again later, not never
                            (Refusal::RateLimited { .. }, Some((_, refused))) => {
                                let wait = REVIEW_BACKOFF.ceiling(refused);
                                Some((Instant::now() + wait, refused))
                            }
                            _ => None,
                        };
                        self.status_due(&host);
                    }
                    return;
                }
            }
        }
        self.accept_heartbeat(opened, hb, now).await;
    }

    /// Heartbeats of declared hosts that were refused for want of a pin, and whose keys an
    /// admin has pinned since: taken as if they arrived now.
    pub(super) async fn retry_refused_heartbeats(&mut self) {
        let now = Timestamp::now();
        let mut ready = Vec::new();
        for (name, rt) in &mut self.fleet {
            let Some(pinned) = self.admin_pins.get(name) else {
                continue;
            };
            if let Some(i) = rt
                .refused_heartbeats
                .iter()
                .position(|(_, hb)| hb.signing_key.to_base64() == pinned.signing)
            {
                ready.push((name.clone(), rt.refused_heartbeats.swap_remove(i)));
                rt.refused_heartbeats.clear();
            }
        }
        for (name, (opened, hb)) in ready {
            info!(host = %name, "taking the heartbeat its agent sent before it was pinned");
            self.accept_heartbeat(&opened, hb, now).await;
        }
    }

    /// Declared hosts whose agent's token review was refused and is due again: the newest
    /// refused heartbeat that carries a token is taken as if it arrived now.
    pub(super) async fn retry_token_reviews(&mut self) {
        let now = Instant::now();
        let mut due = Vec::new();
        for (name, rt) in &mut self.fleet {
            if rt.review_retry.is_none_or(|(at, _)| at > now) {
                continue;
            }
            match rt
                .refused_heartbeats
                .iter()
                .rposition(|(_, hb)| hb.identity_token.is_some())
            {
                Some(i) => due.push((name.clone(), rt.refused_heartbeats.remove(i))),
                None => rt.review_retry = None,
            }
        }
        for (name, (opened, hb)) in due {
            debug!(host = %name, "reviewing the identity token of a refused heartbeat again");
            self.on_heartbeat(&opened, hb, Timestamp::now(), false)
                .await;
        }
    }

    /// A heartbeat from an admitted or pinned sender.
    pub(super) async fn accept_heartbeat(
        &mut self,
        opened: &Opened,
        hb: Heartbeat,
        now: Timestamp,
    ) {
        let host = hb.hostname.clone();
        match self.opener.pin_heartbeat(opened, &hb) {
            Ok(_) => {}
            Err(e) => {
                let rt = self.fleet.entry(host.clone()).or_default();
                if rt.view.key_conflict.is_none() {
                    warn!(host = %host, error = %e, "refusing heartbeat with changed keys");
                    emit(
                        &self.events,
                        self.compiler.snapshot(),
                        DogEvent::apply_failed(&host, 0, &e.to_string()),
                    );
                }
                rt.view.key_conflict = Some(e.to_string());
                self.metrics
                    .rejected
                    .with_label_values(&["key_changed"])
                    .inc();
                self.status_due(&host);
                return;
            }
        }
        let keys = AgentPublicKeys {
            signing: hb.signing_key.to_base64(),
            encryption: hb.encryption_key.to_base64(),
        };
        let interfaces = to_crd_interfaces(&hb.interfaces);
        let known = self.compiler.snapshot().hosts.contains_key(&host)
            || self.registered.contains_key(&host);
        if !known {
            info!(host = %host, "registering a host for a new agent");
            if let Err(e) = self.registrar.register(&host, &keys, &interfaces).await {
                warn!(host = %host, error = %e, "could not create the Host; will retry on the next heartbeat");
            }
            let mut h = Host::new(&host, HostSpec::default());
            h.status = Some(HostStatus {
                interfaces: interfaces.clone(),
                pinned_keys: Some(keys.clone()),
                ..Default::default()
            });
            self.registered.insert(host.clone(), h);
            self.needs_compile = true;
        }
        let rt = self.fleet.entry(host.clone()).or_default();
        if rt.view.interfaces != interfaces {
            rt.view.interfaces = interfaces;
            self.needs_compile = true;
        }
        rt.encryption_key = Some(hb.encryption_key);
        rt.session_envelopes = hb.session_envelopes;
        rt.view.key_fingerprint = Some(hb.signing_key.fingerprint());
        rt.view.pinned_keys = Some(keys);
        rt.view.key_conflict = None;
        rt.view.not_admitted = None;
        rt.review_retry = None;
        rt.refused_heartbeats.clear();
        rt.view.agent_version = Some(hb.agent_version.clone());
        rt.view.observe = hb.mode == dog_protocol::messages::Mode::Observe;
        rt.view.applied_revision = hb.applied_revision;
        rt.view.reported = hb.live_hashes.clone();
        if !hb.drift.drifted.is_empty() {
            rt.view.drift = Some(format!(
                "drift in {} repaired ({} repairs)",
                hb.drift.drifted.join(", "),
                hb.drift.repairs
            ));
        }
        self.status_due(&host);
        self.mark_seen(&host, now);
        if let Some(reply_to) = &hb.broker_reply_to {
            self.hand_out_broker_user(&host, &hb.encryption_key, reply_to)
                .await;
        }
        // An agent that (re)connects gets its full desired state at once, unless it already
        // reported exactly that.
        let expected = report::expected_hashes(self.compiler.compiled(), &host);
        let matches = expected.is_some() && expected == hb.live_hashes;
        match (
            matches,
            hb.applied_revision,
            self.compiler.compiled().hosts.get(&host),
        ) {
            (true, Some(rev), Some(HostOutcome::Firewall { firewall, .. })) => {
                let compiled = self.compiler.compiled();
                self.publish.seed(&host, rev, firewall, compiled);
            }
            _ => self.publish.forget(&host),
        }
        self.needs_publish = true;
    }

    /// An admitted agent on the bootstrap user asks for its own broker user.
    pub(super) async fn hand_out_broker_user(
        &mut self,
        host: &str,
        key: &EncryptionPublicKey,
        reply_to: &str,
    ) {
        let Some(users) = self.broker_users.clone() else {
            self.metrics
                .broker_users
                .with_label_values(&["not_configured"])
                .inc();
            if self.first_in_minute("broker_user_not_configured") {
                warn!(host, "an agent asks for its own broker user, but the operator has no --broker-management-url; it stays on the bootstrap user (further ones are counted, not logged, for a minute)");
            }
            return;
        };
        let sent = crate::runtime::broker_users::hand_out(
            users.as_ref(),
            &self.link,
            &self.sealer,
            host,
            key,
            reply_to,
            unix_now(),
        )
        .await;
        match sent {
            Ok(id) => {
                self.metrics.broker_users.with_label_values(&["ok"]).inc();
                info!(host, user = %self.link.topology().node_user(host), request = %id, "sent the host its own broker user");
                self.broker_user_requests.insert(id);
            }
            Err(e) => {
                self.metrics
                    .broker_users
                    .with_label_values(&[e.result])
                    .inc();
                warn!(host, error = %e.reason, "could not give the host its own broker user; it asks again when it reconnects");
            }
        }
    }

    pub(super) fn on_keepalive(&mut self, host: &str, ka: Keepalive, now: Timestamp) {
        let expected = report::expected_hashes(self.compiler.compiled(), host);
        let resync_after = self.args.resync_after;
        let rt = self.fleet.entry(host.to_string()).or_default();
        let before = rt.view.clone();
        rt.view.observe = ka.mode == dog_protocol::messages::Mode::Observe;
        rt.view.would_change = ka.would_change;
        rt.view.applied_revision = ka.applied_revision;
        rt.view.reported = ka.live_hashes.clone();
        if ka.drift.is_empty() || rt.view.observe {
            rt.view.drift = None;
        } else {
            let parts: Vec<String> = ka
                .drift
                .iter()
                .map(|d| format!("{}{}", d.part, if d.repaired { " (repaired)" } else { "" }))
                .collect();
            let detail = format!("drift detected in {}", parts.join(", "));
            warn!(host, %detail, "agent reported drift");
            rt.view.drift = Some(detail.clone());
            emit(
                &self.events,
                self.compiler.snapshot(),
                DogEvent::drift_repaired(host, &detail),
            );
        }
        let mismatch = expected.is_some() && expected != ka.live_hashes && !rt.view.observe;
        if mismatch {
            let since = *rt.mismatch_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= resync_after {
                info!(
                    host,
                    "reported hashes still differ from the expected ones; resending the full state"
                );
                rt.mismatch_since = Some(Instant::now());
                self.publish.forget(host);
                self.needs_publish = true;
            }
        } else {
            rt.mismatch_since = None;
        }
        // only what a user can see changing makes a status write
        if rt.view != before {
            self.status_due(host);
        }
        self.mark_seen(host, now);
    }

    pub(super) fn on_response(&mut self, host: &str, r: Response, now: Timestamp) {
        if self.broker_user_requests.remove(&r.request_id) {
            match &r.result {
                Outcome::Ok { .. } => {
                    info!(host, request = %r.request_id, "the agent took its broker user")
                }
                Outcome::Error { message, .. } => {
                    warn!(host, request = %r.request_id, %message, "the agent refused its broker user")
                }
            }
            self.mark_seen(host, now);
            return;
        }
        let pending = self.pending.settle(r.request_id, host);
        let rt = self.fleet.entry(host.to_string()).or_default();
        match r.result {
            Outcome::Ok {
                applied_revision,
                hashes,
                timings_ms,
                would_change,
                ..
            } => {
                if would_change.is_some() {
                    rt.view.would_change = would_change;
                }
                if applied_revision.is_some() {
                    rt.view.applied_revision = applied_revision;
                }
                if hashes.is_some() {
                    rt.view.reported = hashes;
                }
                rt.view.apply_error = None;
                info!(host, request = %r.request_id, revision = applied_revision, total_ms = timings_ms.get("total").copied(), "agent applied");
            }
            Outcome::Error {
                kind: dog_protocol::messages::ErrorKind::BaseMismatch,
                message,
            } => {
                // its copy was not what a change (set deltas) was computed against: it gets
                // its full state instead
                info!(host, request = %r.request_id, %message, "the agent holds another base; sending its full state");
                self.publish.forget(host);
                self.needs_publish = true;
            }
            Outcome::Error { kind, message } => {
                let revision = pending.and_then(|(_, rev)| rev).unwrap_or(0);
                warn!(host, request = %r.request_id, ?kind, %message, "agent could not apply; its previous rules stay in force");
                rt.view.apply_error = Some(format!("{kind:?}: {message}"));
                self.metrics.apply_failures.inc();
                emit(
                    &self.events,
                    self.compiler.snapshot(),
                    DogEvent::apply_failed(host, revision, &message),
                );
            }
        }
        self.status_due(host);
        self.mark_seen(host, now);
    }
}
