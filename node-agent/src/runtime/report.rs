//! The pure helpers of the agent process: the operator key file, heartbeat interfaces, drift
//! parts and events, observe summaries, metric labels, the answer cache and the rejection log
//! pace. No IO but reading the key file.

use super::*;

/// Reads the operator's public keys: one key per line, either `base64` or `key-id base64`
/// (what `dog-operator keygen` prints; the key id must then match). Blank lines and `#`
/// comments are ignored. Errors name the file and line.
pub fn load_operator_keys(path: &Path) -> anyhow::Result<TrustedKeys> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "cannot read the operator public keys file {} (--operator-public-keys)",
            path.display()
        )
    })?;
    parse_operator_keys(&text, &path.display().to_string())
}

/// See [`load_operator_keys`].
pub fn parse_operator_keys(text: &str, what: &str) -> anyhow::Result<TrustedKeys> {
    let keys = TrustedKeys::parse(text, what)?;
    if keys.is_empty() {
        anyhow::bail!("{what}: no operator public key in the file");
    }
    Ok(keys)
}

/// The heartbeat's interfaces (within the message limits).
pub fn to_protocol_interfaces(ifs: &[crate::addresses::Link]) -> Vec<Interface> {
    ifs.iter()
        .take(limits::INTERFACES)
        .map(|i| {
            let mut name = i.name.clone();
            dog_protocol::messages::truncate_utf8(&mut name, limits::INTERFACE_NAME);
            Interface {
                name,
                addresses: i
                    .addresses
                    .iter()
                    .take(limits::ADDRESSES_PER_INTERFACE)
                    .map(|a| a.net)
                    .collect(),
            }
        })
        .collect()
}

/// Drifted parts of a report: `ipv4_rules`, `ipv6_rules`, `set:<name>`.
pub fn drift_parts(r: &DriftReport) -> Vec<String> {
    let mut parts = Vec::new();
    for (f, d) in r.rules.iter() {
        if r.expected.rules(f) != r.live.rules(f) || !d.chains.is_empty() || !d.jumps.is_empty() {
            parts.push(format!("ipv{}_rules", f.digit()));
        }
    }
    for s in &r.sets {
        parts.push(format!("set:{}", s.name));
    }
    if parts.is_empty() && r.expected.sets != r.live.sets {
        parts.push("sets".into());
    }
    parts.truncate(limits::DRIFT_ITEMS);
    parts
}

/// One event per drifted part, with the expected and found hashes of that part's kind.
pub fn drift_events(r: &DriftReport, parts: &[String], repaired: bool, at: u64) -> Vec<DriftEvent> {
    parts
        .iter()
        .map(|p| {
            let (expected_hash, found_hash) = match p.as_str() {
                "ipv4_rules" => (r.expected.ipv4_rules.clone(), r.live.ipv4_rules.clone()),
                "ipv6_rules" => (r.expected.ipv6_rules.clone(), r.live.ipv6_rules.clone()),
                _ => (r.expected.sets.clone(), r.live.sets.clone()),
            };
            let mut part = p.clone();
            dog_protocol::messages::truncate_utf8(&mut part, limits::SHORT_TEXT);
            DriftEvent {
                at,
                part,
                expected_hash,
                found_hash,
                repaired,
            }
        })
        .collect()
}

/// Observe mode's answer: what an apply would change.
pub fn plan_summary(plan: &Plan) -> String {
    if !plan.changes_anything() {
        return "observe mode: nothing would change".into();
    }
    let mut out = vec!["observe mode: would change".to_string()];
    let s = &plan.sets;
    for (what, names) in [
        ("create sets", &s.create),
        ("replace sets", &s.swap),
        ("destroy sets", &s.destroy),
    ] {
        if !names.is_empty() {
            out.push(format!("{what} {}", names.join(", ")));
        }
    }
    if !s.delta.is_empty() {
        let d: Vec<String> = s
            .delta
            .iter()
            .map(|d| format!("{} (+{} -{})", d.name, d.add.len(), d.remove.len()))
            .collect();
        out.push(format!("change sets {}", d.join(", ")));
    }
    for (fam, r) in plan.rules.iter() {
        if let Some(text) = &r.restore {
            let lines = text.lines().filter(|l| l.starts_with("-A ")).count();
            out.push(format!("restore {fam} rules ({lines} rule lines)"));
        }
    }
    let mut text = out.join("; ");
    dog_protocol::messages::truncate_utf8(&mut text, limits::MESSAGE_TEXT);
    text
}

pub(super) fn request_kind_name(k: &RequestKind) -> &'static str {
    match k {
        RequestKind::Apply { .. } => "apply",
        RequestKind::ApplySetDeltas { .. } => "apply_set_deltas",
        RequestKind::SharedSet { .. } => "shared_set",
        RequestKind::SharedSetDelta { .. } => "shared_set_delta",
        RequestKind::Status => "status",
        RequestKind::DumpRules => "dump_rules",
        RequestKind::Reapply => "reapply",
        RequestKind::BrokerUser { .. } => "broker_user",
        RequestKind::Unknown => "unknown",
    }
}

pub(super) fn error_kind_name(k: ErrorKind) -> &'static str {
    match k {
        ErrorKind::ApplyFailed => "apply_failed",
        ErrorKind::Refused => "refused",
        ErrorKind::StaleRevision => "stale_revision",
        ErrorKind::BaseMismatch => "base_mismatch",
        ErrorKind::UnknownRequest => "unknown_request",
        ErrorKind::Malformed => "malformed",
        ErrorKind::Internal => "internal",
        ErrorKind::Other => "other",
    }
}

/// Answers by digest of the delivery body, bounded (oldest forgotten first). A redelivered
/// request finds its answer here: acknowledged without a second response when the first was
/// confirmed, otherwise the same response is sent again.
pub struct AnswerCache {
    cap: usize,
    order: VecDeque<String>,
    map: HashMap<String, (Response, bool)>,
}

impl AnswerCache {
    pub fn new(cap: usize) -> Self {
        AnswerCache {
            cap: cap.max(1),
            order: VecDeque::new(),
            map: HashMap::new(),
        }
    }
    /// The response and whether it was published.
    pub fn get(&self, digest: &str) -> Option<(&Response, bool)> {
        self.map.get(digest).map(|(r, p)| (r, *p))
    }
    pub fn insert(&mut self, digest: String, response: Response) {
        if self.map.contains_key(&digest) {
            return;
        }
        while self.order.len() >= self.cap {
            if let Some(old) = self.order.pop_front() {
                self.map.remove(&old);
            }
        }
        self.order.push_back(digest.clone());
        self.map.insert(digest, (response, false));
    }
    pub fn mark_published(&mut self, digest: &str) {
        if let Some(e) = self.map.get_mut(digest) {
            e.1 = true;
        }
    }
    pub fn len(&self) -> usize {
        self.map.len()
    }
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// Logs each rejection reason at most once per [`REJECTION_LOG_EVERY`], with how many were
/// suppressed since. Never logs message content.
#[derive(Default)]
pub struct RejectionLog {
    last: HashMap<&'static str, (Instant, u64)>,
}

impl RejectionLog {
    /// Returns whether this one was logged.
    pub fn note(
        &mut self,
        rej: Rejection,
        message_id: Option<&str>,
        bytes: usize,
        now: Instant,
    ) -> bool {
        let reason = rej.reason();
        if let Some((at, suppressed)) = self.last.get_mut(reason) {
            if now.duration_since(*at) < REJECTION_LOG_EVERY {
                *suppressed += 1;
                return false;
            }
        }
        let suppressed = self.last.get(reason).map_or(0, |e| e.1);
        warn!(
            reason,
            detail = %rej,
            message_id = message_id.unwrap_or("-"),
            bytes,
            suppressed_since_last_log = suppressed,
            "rejected a message before parsing it"
        );
        self.last.insert(reason, (now, 0));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dog_protocol::keys::SigningKey;

    #[test]
    fn operator_keys_accept_both_line_forms_and_name_the_file() {
        let (k, _) = SigningKey::generate().unwrap();
        let p = k.public();
        let text = format!(
            "# operator\n{} {}\n\n{}\n",
            p.fingerprint(),
            p.to_base64(),
            p.to_base64()
        );
        let keys = parse_operator_keys(&text, "/etc/dog/operator.pub").unwrap();
        assert!(keys.contains(&p));
        let bad = format!("0000 {}\n", p.to_base64());
        let e = parse_operator_keys(&bad, "/x/op.pub")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/x/op.pub line 1") && e.contains("does not match"),
            "{e}"
        );
        let e = parse_operator_keys("# nothing\n", "/x/op.pub")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no operator public key"), "{e}");
        let e = parse_operator_keys("notbase64!!\n", "/x/op.pub")
            .unwrap_err()
            .to_string();
        assert!(e.contains("/x/op.pub line 1"), "{e}");
        let e = load_operator_keys(Path::new("/nonexistent/op.pub"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/op.pub"), "{e}");
    }

    #[test]
    fn answer_cache_is_bounded_and_tracks_publication() {
        let mut c = AnswerCache::new(2);
        let r = |n: u128| Response::error(Uuid::from_u128(n), ErrorKind::Internal, "x");
        c.insert("a".into(), r(1));
        c.insert("b".into(), r(2));
        assert_eq!(c.get("a").map(|(_, p)| p), Some(false));
        c.mark_published("a");
        assert_eq!(c.get("a").map(|(_, p)| p), Some(true));
        c.insert("c".into(), r(3));
        assert!(c.get("a").is_none());
        assert_eq!(c.get("c").unwrap().0.request_id, Uuid::from_u128(3));
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn rejections_are_logged_once_per_reason_per_minute() {
        let mut l = RejectionLog::default();
        let t0 = Instant::now();
        assert!(l.note(Rejection::Replayed, None, 10, t0));
        assert!(!l.note(Rejection::Replayed, None, 10, t0 + Duration::from_secs(1)));
        assert!(l.note(
            Rejection::BadSignature,
            None,
            10,
            t0 + Duration::from_secs(1)
        ));
        assert!(!l.note(Rejection::Replayed, None, 10, t0 + Duration::from_secs(59)));
        assert!(l.note(Rejection::Replayed, None, 10, t0 + Duration::from_secs(61)));
    }

    #[test]
    fn drift_parts_and_events_name_the_parts_with_hashes() {
        let h = |a: &str, b: &str, c: &str| FirewallHashes {
            ipv4_rules: a.into(),
            ipv6_rules: b.into(),
            sets: c.into(),
        };
        let r = DriftReport {
            expected: h("e4", "e6", "es"),
            live: h("l4", "e6", "ls"),
            rules: Default::default(),
            sets: vec![crate::core::drift::SetDrift {
                name: "dogz4-web".into(),
                missing_set: false,
                extra_set: false,
                missing_members: vec!["10.0.0.1/32".parse().unwrap()],
                extra_members: vec![],
            }],
        };
        let parts = drift_parts(&r);
        assert_eq!(parts, vec!["ipv4_rules", "set:dogz4-web"]);
        let ev = drift_events(&r, &parts, true, 42);
        assert_eq!(ev[0].expected_hash, "e4");
        assert_eq!(ev[0].found_hash, "l4");
        assert_eq!(ev[1].part, "set:dogz4-web");
        assert_eq!(
            (ev[1].expected_hash.as_str(), ev[1].found_hash.as_str()),
            ("es", "ls")
        );
        assert!(ev.iter().all(|e| e.repaired && e.at == 42));
    }

    #[test]
    fn plan_summary_says_what_would_change() {
        assert_eq!(
            plan_summary(&Plan::default()),
            "observe mode: nothing would change"
        );
        let mut p = Plan::default();
        p.sets.create.push("dogz4-web".into());
        p.rules.v4.restore = Some("*filter\n-A DOG-INPUT -j DROP\nCOMMIT\n".into());
        let s = plan_summary(&p);
        assert!(s.contains("create sets dogz4-web"), "{s}");
        assert!(s.contains("restore IPv4 rules (1 rule lines)"), "{s}");
    }
}
