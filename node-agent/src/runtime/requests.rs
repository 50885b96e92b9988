//! Deliveries and the request handlers: each request is answered exactly once and its delivery
//! acknowledged only after the work and the response are done.

use super::*;

impl Agent {
    pub(super) async fn on_delivery(&mut self, mut d: Delivery) {
        let digest = sha256_hex(&d.body);
        if let Some((response, published)) = self.answered.get(&digest) {
            if !d.redelivered {
                // The broker did not redeliver it: someone published the same bytes again.
                self.metrics.reject(Rejection::Replayed.reason());
                self.rejections.note(
                    Rejection::Replayed,
                    d.message_id.as_deref(),
                    d.body.len(),
                    Instant::now(),
                );
                d.acker.ack().await;
                return;
            }
            if published {
                debug!(request = %response.request_id, "redelivered request already answered; acknowledging");
                d.acker.ack().await;
                return;
            }
            let response = response.clone();
            self.respond_and_ack(&digest, response, d).await;
            return;
        }
        let opened = match self.opener.open(&d.body, unix_now()) {
            Ok(o) => {
                d.body = Vec::new();
                o
            }
            Err(rej @ (Rejection::StaleRevision | Rejection::Replayed)) if d.redelivered => {
                // Handled before a reconnect or restart whose ack did not reach the broker.
                info!(
                    reason = rej.reason(),
                    message_id = d.message_id.as_deref().unwrap_or("-"),
                    "redelivered request was already handled; acknowledging"
                );
                d.acker.ack().await;
                return;
            }
            Err(rej) => {
                self.metrics.reject(rej.reason());
                self.rejections
                    .note(rej, d.message_id.as_deref(), d.body.len(), Instant::now());
                d.acker.ack().await;
                return;
            }
        };
        self.replay
            .floor
            .note(opened.header.issued_at, opened.header.id);
        // The sealed body and the JSON payload can be megabytes (a large set): the body is freed
        // before the payload is parsed, the payload before the work starts.
        let id = opened.header.id;
        let parsed = opened.operator_message();
        let sender = opened.header.sender.clone();
        drop(opened);
        let response = match parsed {
            Err(e) => {
                self.metrics.reject("malformed");
                warn!(request = %id, sender = %sender, error = %e, "request payload refused");
                Response::error(id, ErrorKind::Malformed, e.to_string())
            }
            Ok(OperatorMessage::Request(req)) => self.handle(req).await,
        };
        // once per message, with a shared set's new version: done work is not done again
        self.save_replay();
        self.answered.insert(digest.clone(), response.clone());
        self.respond_and_ack(&digest, response, d).await;
    }

    pub(super) async fn respond_and_ack(&mut self, digest: &str, response: Response, d: Delivery) {
        let id = response.request_id;
        if self
            .publish(&AgentMessage::Response(response), "response")
            .await
        {
            self.answered.mark_published(digest);
            d.acker.ack().await;
        } else {
            // Requeue: the redelivery finds the answer in the cache and sends it then.
            warn!(request = %id, "response not confirmed; requeueing the request to answer it later");
            d.acker.reject(true).await;
        }
    }

    pub(super) async fn handle(&mut self, req: Request) -> Response {
        let id = req.id;
        let kind = request_kind_name(&req.request);
        let started = Instant::now();
        let response = match req.request {
            RequestKind::Apply {
                revision,
                firewall,
                kept_sets,
            } => match self.with_kept_sets(Firewall::from(firewall), &kept_sets) {
                Ok(firewall) => {
                    self.pending = None;
                    self.apply_desired(id, revision, firewall).await
                }
                Err(why) => Response::error(id, ErrorKind::BaseMismatch, why),
            },
            RequestKind::ApplySetDeltas {
                base_revision,
                revision,
                deltas,
            } => self.apply_deltas(id, base_revision, revision, deltas).await,
            RequestKind::SharedSet { set, version } => self.shared_set(id, set, version).await,
            RequestKind::SharedSetDelta(change) => self.shared_set_delta(id, change).await,
            RequestKind::Status => self.status(id).await,
            RequestKind::DumpRules => self.dump(id).await,
            RequestKind::Reapply => self.reapply(id).await,
            RequestKind::BrokerUser { username, password } => {
                self.take_broker_user(id, username, password.0)
            }
            RequestKind::Unknown => Response::error(
                id,
                ErrorKind::UnknownRequest,
                format!(
                    "this agent ({}) does not know the request kind",
                    env!("CARGO_PKG_VERSION")
                ),
            ),
        };
        let outcome = match &response.result {
            Outcome::Ok { .. } => "ok",
            Outcome::Error { kind, .. } => error_kind_name(*kind),
        };
        self.metrics
            .requests
            .with_label_values(&[kind, outcome])
            .inc();
        info!(
            request = %id,
            kind,
            outcome,
            ms = started.elapsed().as_millis() as u64,
            "answered request"
        );
        response
    }

    /// The operator sent this node's own broker user: kept, and logged in with once the
    /// request is answered (over the bootstrap link it came on).
    pub(super) fn take_broker_user(
        &mut self,
        id: Uuid,
        username: String,
        password: String,
    ) -> Response {
        if !self.cfg.broker_bootstrap {
            return Response::error(
                id,
                ErrorKind::Refused,
                "this agent logs in as its configured broker user (no --broker-bootstrap)",
            );
        }
        let user = BrokerUser { username, password };
        if let Err(e) = self.store.save_broker_user(&user) {
            error!(error = %e, "cannot keep the node's broker user; staying on the bootstrap user");
            return Response::error(id, ErrorKind::Internal, e.to_string());
        }
        info!(user = %user.username, "received this node's own broker user");
        let detail = format!("broker user {} kept", user.username);
        self.next_login = Some(Login::Own(user));
        text_ok(id, self.applied_revision(), None, detail)
    }

    /// Closes the link and opens one logged in as `login`; the new link's deliveries, or
    /// `None` when it cannot start (the old link then stays).
    pub(super) async fn relogin(&mut self, login: Login) -> Option<Deliveries> {
        let config = self
            .cfg
            .broker
            .config(format!("dog-agent/{}", self.hostname));
        let (link, deliveries) = match login.start(config, &self.hostname) {
            Ok(started) => started,
            Err(e) => {
                error!(error = %e, "cannot start a broker link as {}", login.label());
                return None;
            }
        };
        let sets = self.link.shared_sets();
        self.link.close();
        self.link = link;
        self.metrics
            .broker_bootstrap
            .set(i64::from(login == Login::Bootstrap));
        self.login = login;
        // the new link connects from zero: a heartbeat goes out once it is up
        self.heartbeat_for = 0;
        self.failures_at_connect = 0;
        self.sync_bindings(&[], &sets).await;
        Some(deliveries)
    }

    /// The firewall the agent is working towards: the pending retry, else the applied one.
    /// `firewall` completed with the sets the operator says this host holds (name → hash),
    /// taken from the state it holds; an error names a set it does not hold as said.
    pub(super) fn with_kept_sets(
        &self,
        mut firewall: Firewall,
        kept: &BTreeMap<String, String>,
    ) -> Result<Firewall, String> {
        if kept.is_empty() {
            return Ok(firewall);
        }
        let held = self.current().map(|(_, fw)| fw);
        for (name, hash) in kept {
            match held.and_then(|fw| fw.sets.get(name)) {
                Some(set) if set.hash() == hash => {
                    firewall.sets.insert(name.clone(), set.clone());
                }
                Some(set) => {
                    return Err(format!(
                        "set {name} here has hash {}, the request keeps {hash}",
                        set.hash()
                    ))
                }
                None => {
                    return Err(format!(
                        "the request keeps set {name}, which this host does not hold"
                    ))
                }
            }
        }
        Ok(firewall)
    }

    pub(super) fn current(&self) -> Option<(u64, &Firewall)> {
        match (&self.pending, &self.applied) {
            (Some(p), _) => Some((p.revision, &p.firewall)),
            (None, Some(a)) => Some((a.revision, &a.firewall)),
            (None, None) => None,
        }
    }

    /// Applies (enforce) or plans (observe) `firewall` as `revision` and answers.
    pub(super) async fn apply_desired(
        &mut self,
        id: Uuid,
        revision: u64,
        firewall: Firewall,
    ) -> Response {
        if firewall.host != self.hostname {
            return Response::error(
                id,
                ErrorKind::Refused,
                format!(
                    "firewall.host is {:?} but this agent is {:?}",
                    firewall.host, self.hostname
                ),
            );
        }
        if self.cfg.mode == Mode::Observe {
            return self.observe(id, revision, firewall).await;
        }
        match self.kernel_apply(&firewall).await {
            Ok(report) => {
                self.commit(revision, firewall, &report).await;
                ok_applied(id, revision, &report)
            }
            Err(e) if e.is_refusal() => {
                warn!(revision, error = %e, "refused the firewall; the previous one stays in force");
                Response::error(id, ErrorKind::Refused, e.to_string())
            }
            Err(e) => {
                warn!(revision, error = %e, "apply failed; the previous firewall stays in force; retrying with backoff");
                let message = e.to_string();
                self.schedule_retry(revision, firewall, 0);
                Response::error(id, ErrorKind::ApplyFailed, message)
            }
        }
    }

    pub(super) async fn observe(
        &mut self,
        id: Uuid,
        revision: u64,
        firewall: Firewall,
    ) -> Response {
        let k = self.kernel.clone();
        let fw = firewall.clone();
        match blocking(move || k.plan_firewall(&fw)).await {
            Ok(plan) => {
                let text = plan_summary(&plan);
                self.would_change = Some(plan.change_count());
                self.verified = Some(plan.live.clone());
                info!(revision, summary = %text, "observe mode: not applying");
                let old = self.applied_set_names();
                let new: Vec<String> = firewall.sets.keys().cloned().collect();
                self.applied = Some(AppliedState { revision, firewall });
                self.opener.set_applied_revision(Some(revision));
                self.sync_bindings(&old, &new).await;
                let mut answer = text_ok(id, None, Some(plan.live), text);
                if let Outcome::Ok { would_change, .. } = &mut answer.result {
                    *would_change = self.would_change;
                }
                answer
            }
            Err(e) if e.is_refusal() => Response::error(id, ErrorKind::Refused, e.to_string()),
            Err(e) => Response::error(id, ErrorKind::Internal, e.to_string()),
        }
    }

    pub(super) async fn kernel_apply(&mut self, fw: &Firewall) -> Result<ApplyReport, ApplyError> {
        let k = self.kernel.clone();
        let fw = fw.clone();
        let started = Instant::now();
        let r = blocking(move || k.apply_firewall(&fw)).await;
        self.metrics
            .apply_duration
            .observe(started.elapsed().as_secs_f64());
        let label = if r.is_ok() { "applied" } else { "failed" };
        self.metrics.applies.with_label_values(&[label]).inc();
        if r.as_ref().is_err_and(|e| !e.is_refusal()) {
            // rolled back, or not: the next report reads what the kernel holds
            self.verified = None;
        }
        r
    }

    /// The sets of the firewall applied (or, observing, last desired): the shared sets the
    /// link is bound to.
    fn applied_set_names(&self) -> Vec<String> {
        self.applied
            .as_ref()
            .map(|a| a.firewall.sets.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Records a successful apply: state file, opener revision, bindings, gauges.
    pub(super) async fn commit(&mut self, revision: u64, firewall: Firewall, report: &ApplyReport) {
        let old = self.applied_set_names();
        let new: Vec<String> = firewall.sets.keys().cloned().collect();
        let state = AppliedState { revision, firewall };
        let store = self.store.clone();
        let to_save = state.clone();
        if let Err(e) = blocking(move || store.save(&to_save)).await {
            error!(error = %e, "cannot save the applied state; a restart will wait for the operator");
        }
        self.metrics.last_applied_revision.set(revision as i64);
        self.metrics
            .rules_installed
            .with_label_values(&["ipv4"])
            .set(state.firewall.ipv4.rule_count() as i64);
        self.metrics
            .rules_installed
            .with_label_values(&["ipv6"])
            .set(state.firewall.ipv6.rule_count() as i64);
        self.metrics
            .set_entries_installed
            .set(state.firewall.set_entries() as i64);
        self.opener.set_applied_revision(Some(revision));
        self.applied = Some(state);
        self.pending = None;
        self.verified = Some(report.hashes.clone());
        self.startup_verified = true;
        self.drift.drifted.clear();
        self.drift.since = None;
        info!(
            revision,
            total_ms = report.total_ms,
            changed = report.changed(),
            "firewall in force"
        );
        self.sync_bindings(&old, &new).await;
        release_freed_memory();
    }

    pub(super) fn schedule_retry(&mut self, revision: u64, firewall: Firewall, failed_before: u32) {
        let delay = RETRY_BACKOFF.delay(failed_before);
        self.pending = Some(Pending {
            revision,
            firewall,
            attempts: failed_before + 1,
            next_try: tokio::time::Instant::now() + delay,
        });
    }

    pub(super) async fn retry_pending(&mut self) {
        let Some(p) = self.pending.take() else { return };
        info!(
            revision = p.revision,
            attempt = p.attempts,
            "retrying apply"
        );
        match self.kernel_apply(&p.firewall).await {
            Ok(report) => {
                info!(
                    revision = p.revision,
                    "retried apply succeeded; reporting in the next keepalive"
                );
                self.commit(p.revision, p.firewall, &report).await;
            }
            Err(e) if e.is_refusal() => {
                error!(revision = p.revision, error = %e, "retry refused; giving up on this revision");
            }
            Err(e) => {
                warn!(revision = p.revision, error = %e, "retry failed");
                self.schedule_retry(p.revision, p.firewall, p.attempts);
            }
        }
    }

    pub(super) async fn apply_deltas(
        &mut self,
        id: Uuid,
        base_revision: u64,
        revision: u64,
        deltas: Vec<SetDelta>,
    ) -> Response {
        let base = match &self.applied {
            Some(a) if a.revision == base_revision => a.firewall.clone(),
            other => {
                return Response::error(
                    id,
                    ErrorKind::BaseMismatch,
                    format!(
                        "deltas are against revision {base_revision}; this agent holds {}",
                        other
                            .as_ref()
                            .map(|a| a.revision.to_string())
                            .unwrap_or_else(|| "none".into())
                    ),
                )
            }
        };
        let next = match base.with_deltas(&deltas) {
            Ok(next) => next,
            Err(set) => {
                return Response::error(
                    id,
                    ErrorKind::Refused,
                    format!(
                        "deltas name set {set:?}, which revision {base_revision} does not have"
                    ),
                )
            }
        };
        self.pending = None;
        self.apply_desired(id, revision, next).await
    }

    pub(super) async fn status(&mut self, id: Uuid) -> Response {
        let text = format!(
            "mode={:?} applied_revision={:?} pending_retry={:?} drifted={:?} repairs={} backend={:?} sets={}",
            self.cfg.mode,
            self.applied_revision(),
            self.pending.as_ref().map(|p| p.revision),
            self.drift.drifted,
            self.drift.repairs,
            self.kernel.backend(),
            self.kernel.set_backend().word(),
        );
        text_ok(id, self.applied_revision(), self.live_hashes().await, text)
    }

    pub(super) async fn dump(&mut self, id: Uuid) -> Response {
        let k = self.kernel.clone();
        let r = blocking(move || -> Result<(LiveState, String), KernelError> {
            Ok((k.snapshot()?, k.dump_sets()?))
        })
        .await;
        match r {
            Ok((live, ipset_save)) => {
                let mut d = Detail::Dump {
                    ipv4_save: live.rules.v4.clone(),
                    ipv6_save: live.rules.v6.clone(),
                    ipset_save,
                };
                if let Detail::Dump {
                    ipv4_save,
                    ipv6_save,
                    ipset_save,
                } = &mut d
                {
                    for t in [ipv4_save, ipv6_save, ipset_save] {
                        dog_protocol::messages::truncate_utf8(t, limits::DOCUMENT_TEXT);
                    }
                }
                Response {
                    request_id: id,
                    result: Outcome::Ok {
                        applied_revision: self.applied_revision(),
                        hashes: Some(live.hashes()),
                        timings_ms: BTreeMap::new(),
                        detail: Some(d),
                        would_change: None,
                    },
                }
            }
            Err(e) => Response::error(id, ErrorKind::Internal, e.to_string()),
        }
    }

    pub(super) async fn reapply(&mut self, id: Uuid) -> Response {
        if self.applied.is_none() {
            return Response::error(id, ErrorKind::Refused, "no firewall has been applied yet");
        }
        let clean = self.drift_check().await;
        let text = match clean {
            Some(true) => "in sync".to_string(),
            Some(false) => format!("drift in {:?} could not be repaired", self.drift.drifted),
            None => "could not read the kernel".to_string(),
        };
        text_ok(id, self.applied_revision(), self.live_hashes().await, text)
    }
}
