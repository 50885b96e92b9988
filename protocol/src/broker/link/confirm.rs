//! The confirmed publish loop and topology operations that survive a reconnect: each waits
//! for a session, and a failure on it hands the session back to the supervisor.

use super::*;

/// Outcome of one publish attempt; short-lived, so its size does not matter.
#[allow(clippy::large_enum_variant)]
enum Attempt {
    Confirmed(Confirmation),
    SessionFailed(lapin::Error),
    ConfirmTimeout,
}

impl Inner {
    /// Wait for an established session of at least generation `min_generation`.
    pub(super) async fn wait_session(
        &self,
        min_generation: u64,
    ) -> Result<Arc<Session>, BrokerError> {
        let mut sessions = self.session.subscribe();
        let mut shutdown = self.shutdown.subscribe();
        if *shutdown.borrow() {
            return Err(BrokerError::Closed);
        }
        tokio::select! {
            found = sessions.wait_for(|s| s.as_ref().is_some_and(|s| s.generation >= min_generation)) => {
                match found {
                    Ok(guard) => guard.clone().ok_or(BrokerError::Closed),
                    Err(_) => Err(BrokerError::Closed),
                }
            }
            _ = shutdown.wait_for(|closed| *closed) => Err(BrokerError::Closed),
        }
    }

    /// Tell the supervisor the session is broken so it reconnects.
    pub(super) fn report_failure(&self, generation: u64, reason: String) {
        let _ = self.failures.send((generation, reason));
    }

    /// Publish with confirm; retries until confirmed (or unroutable too often, or closed).
    /// `host` names the host whose queue the message goes to (`publish_to_host` only): that
    /// queue is declared first if needed, and only such messages follow
    /// `transient_host_messages`.
    pub(super) async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        meta: &MessageMeta,
        host: Option<&str>,
        unroutable_retries: u32,
    ) -> Result<(), BrokerError> {
        let transient = host.is_some() && self.config.transient_host_messages;
        let mut properties = BasicProperties::default()
            .with_delivery_mode(if transient { 1 } else { 2 })
            .with_message_id(meta.message_id.clone().into())
            .with_type(meta.kind.clone().into());
        if let Some(user) = &self.user_id {
            properties = properties.with_user_id(user.as_str().into());
        }
        let mut min_generation = 0;
        let mut retries = 0u32;
        let mut unroutable = 0u32;
        loop {
            let session = self.wait_session(min_generation).await?;
            let attempt = async {
                if let Some(host) = host {
                    if let Err(e) = self.ensure_host_queue(&session, host).await {
                        return Attempt::SessionFailed(e);
                    }
                }
                let pending = match session
                    .publish
                    .basic_publish(
                        exchange.into(),
                        routing_key.into(),
                        BasicPublishOptions {
                            mandatory: true,
                            ..Default::default()
                        },
                        body,
                        properties.clone(),
                    )
                    .await
                {
                    Ok(pending) => pending,
                    Err(e) => return Attempt::SessionFailed(e),
                };
                match tokio::time::timeout(self.config.confirm_timeout, pending).await {
                    Ok(Ok(confirmation)) => Attempt::Confirmed(confirmation),
                    Ok(Err(e)) => Attempt::SessionFailed(e),
                    Err(_) => Attempt::ConfirmTimeout,
                }
            }
            .await;
            match attempt {
                Attempt::Confirmed(Confirmation::Ack(None)) => return Ok(()),
                Attempt::Confirmed(Confirmation::Ack(Some(returned))) => {
                    unroutable += 1;
                    warn!(
                        exchange,
                        routing_key,
                        message_id = %meta.message_id,
                        reply = %returned.reply_text,
                        attempt = unroutable,
                        "message returned as unroutable"
                    );
                    if let Some(host) = host {
                        self.forget_host(host);
                    }
                    if unroutable > unroutable_retries {
                        return Err(BrokerError::Unroutable {
                            exchange: exchange.to_string(),
                            routing_key: routing_key.to_string(),
                            message_id: meta.message_id.clone(),
                            attempts: unroutable,
                        });
                    }
                }
                Attempt::Confirmed(Confirmation::Nack(_)) => {
                    warn!(exchange, routing_key, message_id = %meta.message_id, "broker nacked the message; publishing again");
                }
                Attempt::Confirmed(Confirmation::NotRequested) => {
                    // Cannot happen on a confirm-mode channel; treat the session as broken.
                    self.report_failure(
                        session.generation,
                        "publish channel not in confirm mode".into(),
                    );
                    min_generation = session.generation + 1;
                    continue;
                }
                Attempt::ConfirmTimeout => {
                    warn!(exchange, routing_key, message_id = %meta.message_id, timeout_seconds = self.config.confirm_timeout.as_secs_f64(), "no publisher confirm in time; publishing again");
                }
                Attempt::SessionFailed(error) => {
                    debug!(exchange, routing_key, message_id = %meta.message_id, %error, "publish failed; waiting for a new connection");
                    self.report_failure(session.generation, format!("publish failed: {error}"));
                    min_generation = session.generation + 1;
                    // Back off here too: a publish that breaks every fresh connection (e.g.
                    // an exchange that does not exist yet) must not cause a reconnect storm.
                }
            }
            let delay = self.config.backoff.delay(retries);
            retries = retries.saturating_add(1);
            tokio::time::sleep(delay).await;
        }
    }

    /// Run `op` on the topology channel of a session, retrying on the next session if the
    /// current one fails.
    pub(super) async fn on_topology<F>(&self, what: &str, op: F) -> Result<(), BrokerError>
    where
        F: for<'a> Fn(
            &'a Inner,
            &'a Session,
        ) -> futures::future::BoxFuture<'a, Result<(), lapin::Error>>,
    {
        let mut min_generation = 0;
        loop {
            let session = self.wait_session(min_generation).await?;
            match op(self, &session).await {
                Ok(()) => return Ok(()),
                Err(error) => {
                    warn!(%error, "{what} failed; retrying after reconnect");
                    self.report_failure(session.generation, format!("{what} failed: {error}"));
                    min_generation = session.generation + 1;
                }
            }
        }
    }
}
