//! Host lifecycle from keepalives (docs/design.md, Resources and Operator): `New → Active → Inactive → Retired`, and
//! back to `Active` whenever a fresh keepalive arrives.
//!
//! Pure: the caller passes the current state, the last keepalive time and "now"; nothing here
//! reads a clock. Ages are measured from the last keepalive:
//!
//! - age ≤ `inactive_after` (default 3 × keepalive interval) → `Active`
//! - `inactive_after` < age ≤ `retired_after` (default 24 h) → `Inactive`
//! - age > `retired_after` → `Retired`
//!
//! A host never heard from stays `New`. A keepalive stamped in the future (clock skew between
//! agent and operator) counts as age zero.
//!
//! **Safety valve.** When no agent at all has been heard for `freeze_after` (default 3
//! intervals), the likelier fault is the operator's own network, so [`evaluate`] returns
//! [`Evaluation::Frozen`] and no host changes state. The caller logs the freeze once (see
//! [`SafetyValve`]) and exposes it as a metric.

use crate::crd::HostState;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use std::time::Duration;

/// Timing knobs; all configurable on the command line by the lead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LifecycleConfig {
    /// How often agents send keepalives.
    pub keepalive_interval: Duration,
    /// A host whose last keepalive is older than this becomes `Inactive`.
    pub inactive_after: Duration,
    /// A host whose last keepalive is older than this becomes `Retired`.
    pub retired_after: Duration,
    /// When no agent at all has been heard for this long, all transitions freeze.
    pub freeze_after: Duration,
}

impl LifecycleConfig {
    /// Defaults derived from a keepalive interval: inactive after 3 intervals, retired after
    /// 24 h, frozen when the whole fleet is silent for 3 intervals.
    pub fn from_interval(keepalive_interval: Duration) -> Self {
        Self {
            keepalive_interval,
            inactive_after: keepalive_interval.saturating_mul(3),
            retired_after: Duration::from_secs(24 * 3600),
            freeze_after: keepalive_interval.saturating_mul(3),
        }
    }
}

impl Default for LifecycleConfig {
    /// 30 s keepalive interval.
    fn default() -> Self {
        Self::from_interval(Duration::from_secs(30))
    }
}

/// Age of a keepalive at `now`; a keepalive from the future counts as age zero.
pub fn age(last: Timestamp, now: Timestamp) -> Duration {
    let d: SignedDuration = now.duration_since(last);
    if d.is_negative() {
        Duration::ZERO
    } else {
        d.unsigned_abs()
    }
}

/// The state a host should be in, ignoring the safety valve.
pub fn next_state(
    current: HostState,
    last_keepalive: Option<Timestamp>,
    now: Timestamp,
    cfg: &LifecycleConfig,
) -> HostState {
    let Some(last) = last_keepalive else {
        // Never heard (or the keepalive time was lost): nothing to judge by, keep the state.
        return current;
    };
    let a = age(last, now);
    if a <= cfg.inactive_after {
        HostState::Active
    } else if a <= cfg.retired_after {
        match current {
            // A retired host only comes back with a fresh keepalive, never via an old one.
            HostState::Retired => HostState::Retired,
            _ => HostState::Inactive,
        }
    } else {
        HostState::Retired
    }
}

/// When the host was last heard at the latest, given the `status.lastKeepalive` that was
/// written: the stamp is refreshed only every `write_every` while the host stays live, so
/// the real keepalive may be that much newer (never later than `now`).
pub fn latest_keepalive(
    written: Option<Timestamp>,
    write_every: Duration,
    now: Timestamp,
) -> Option<Timestamp> {
    let written = written?;
    let span = SignedDuration::try_from(write_every).unwrap_or(SignedDuration::ZERO);
    Some(written.checked_add(span).unwrap_or(written).min(now))
}

/// Whether a Retired host is due for garbage collection: nothing was heard from it (or, never
/// heard, it exists) for longer than `retention`.
pub fn collectable(
    state: HostState,
    last_heard: Option<Timestamp>,
    created: Option<Timestamp>,
    now: Timestamp,
    retention: Duration,
) -> bool {
    state == HostState::Retired
        && last_heard
            .or(created)
            .is_some_and(|since| age(since, now) > retention)
}

/// Parses `status.lastKeepalive` (RFC 3339). Unparseable text counts as "never heard".
pub fn parse_keepalive(text: Option<&str>) -> Option<Timestamp> {
    text.and_then(|t| t.parse::<Timestamp>().ok())
}

/// Whether the fleet as a whole is being heard from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FleetVerdict {
    /// Some agent was heard recently enough (or no agent was ever heard: nothing to protect).
    Live,
    /// No agent heard for `silent_for` (> `freeze_after`): freeze all transitions.
    Frozen { silent_for: Duration },
}

/// Safety-valve check from the most recent keepalive of any agent.
pub fn fleet_verdict(
    last_heard_any: Option<Timestamp>,
    now: Timestamp,
    cfg: &LifecycleConfig,
) -> FleetVerdict {
    match last_heard_any {
        None => FleetVerdict::Live,
        Some(last) => {
            let silent_for = age(last, now);
            if silent_for > cfg.freeze_after {
                FleetVerdict::Frozen { silent_for }
            } else {
                FleetVerdict::Live
            }
        }
    }
}

/// One host's input to [`evaluate`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostClock {
    pub name: String,
    pub state: HostState,
    pub last_keepalive: Option<Timestamp>,
}

/// A state change [`evaluate`] decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    pub name: String,
    pub from: HostState,
    pub to: HostState,
}

/// The result of one lifecycle pass over all hosts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Evaluation {
    /// Safety valve engaged: no transitions at all.
    Frozen { silent_for: Duration },
    /// Hosts whose state changes (hosts that keep their state are not listed).
    Transitions(Vec<Transition>),
}

/// One lifecycle pass: the safety valve first (from the freshest keepalive among `hosts`,
/// or `last_heard_any` when the caller knows a fresher one, e.g. a heartbeat not yet in
/// status), then [`next_state`] per host.
pub fn evaluate(
    hosts: &[HostClock],
    last_heard_any: Option<Timestamp>,
    now: Timestamp,
    cfg: &LifecycleConfig,
) -> Evaluation {
    let freshest = hosts
        .iter()
        .filter_map(|h| h.last_keepalive)
        .chain(last_heard_any)
        .max();
    if let FleetVerdict::Frozen { silent_for } = fleet_verdict(freshest, now, cfg) {
        return Evaluation::Frozen { silent_for };
    }
    Evaluation::Transitions(
        hosts
            .iter()
            .filter_map(|h| {
                let to = next_state(h.state, h.last_keepalive, now, cfg);
                (to != h.state).then(|| Transition {
                    name: h.name.clone(),
                    from: h.state,
                    to,
                })
            })
            .collect(),
    )
}

/// Edge detector for the safety valve, so the caller logs a freeze once and its end once.
#[derive(Debug, Default)]
pub struct SafetyValve {
    frozen: bool,
}

/// A change of the safety valve's position.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValveChange {
    Engaged,
    Released,
}

impl SafetyValve {
    /// Feed each evaluation; returns `Some` only when the valve changes position.
    pub fn observe(&mut self, evaluation: &Evaluation) -> Option<ValveChange> {
        let frozen = matches!(evaluation, Evaluation::Frozen { .. });
        let change = match (self.frozen, frozen) {
            (false, true) => Some(ValveChange::Engaged),
            (true, false) => Some(ValveChange::Released),
            _ => None,
        };
        self.frozen = frozen;
        change
    }

    /// For the `dog_operator_lifecycle_frozen` gauge.
    pub fn is_frozen(&self) -> bool {
        self.frozen
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use HostState::*;

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + secs).unwrap()
    }
    fn cfg() -> LifecycleConfig {
        LifecycleConfig::from_interval(Duration::from_secs(10))
    }

    #[test]
    fn only_retired_hosts_silent_past_the_retention_are_collected() {
        let keep = Duration::from_secs(3600);
        assert!(collectable(Retired, Some(t(0)), None, t(3601), keep));
        assert!(!collectable(Retired, Some(t(0)), None, t(3600), keep));
        // a retired host whose agent still talks (its Node was deleted) stays
        assert!(!collectable(
            Retired,
            Some(t(3500)),
            Some(t(0)),
            t(3601),
            keep
        ));
        // never heard: judged by its age
        assert!(collectable(Retired, None, Some(t(0)), t(3601), keep));
        assert!(!collectable(Retired, None, None, t(99_999), keep));
        for s in [New, Active, Inactive] {
            assert!(!collectable(s, Some(t(0)), Some(t(0)), t(99_999), keep));
        }
    }

    #[test]
    fn a_coarse_keepalive_stamp_is_read_as_its_latest_possible_time() {
        let every = Duration::from_secs(300);
        assert_eq!(latest_keepalive(None, every, t(1000)), None);
        // written 100 s ago: the host may have been heard until now
        assert_eq!(
            latest_keepalive(Some(t(900)), every, t(1000)),
            Some(t(1000))
        );
        // written an hour ago: at most 300 s later than that
        assert_eq!(latest_keepalive(Some(t(0)), every, t(3600)), Some(t(300)));
    }

    #[test]
    fn defaults_follow_the_interval() {
        let c = cfg();
        assert_eq!(c.inactive_after, Duration::from_secs(30));
        assert_eq!(c.retired_after, Duration::from_secs(86_400));
        assert_eq!(c.freeze_after, Duration::from_secs(30));
        assert_eq!(
            LifecycleConfig::default().inactive_after,
            Duration::from_secs(90)
        );
    }

    #[test]
    fn new_host_stays_new_until_first_keepalive() {
        assert_eq!(next_state(New, None, t(1_000_000), &cfg()), New);
    }

    #[test]
    fn first_keepalive_makes_new_active() {
        assert_eq!(next_state(New, Some(t(0)), t(5), &cfg()), Active);
    }

    #[test]
    fn stale_first_keepalive_goes_straight_to_inactive_or_retired() {
        assert_eq!(next_state(New, Some(t(0)), t(31), &cfg()), Inactive);
        assert_eq!(next_state(New, Some(t(0)), t(86_401), &cfg()), Retired);
    }

    #[test]
    fn active_becomes_inactive_strictly_after_the_timeout() {
        assert_eq!(next_state(Active, Some(t(0)), t(30), &cfg()), Active);
        assert_eq!(next_state(Active, Some(t(0)), t(31), &cfg()), Inactive);
    }

    #[test]
    fn sub_second_boundary_is_strict() {
        let last = t(0);
        let exactly = last.checked_add(SignedDuration::from_secs(30)).unwrap();
        let just_after = exactly.checked_add(SignedDuration::from_nanos(1)).unwrap();
        assert_eq!(next_state(Active, Some(last), exactly, &cfg()), Active);
        assert_eq!(next_state(Active, Some(last), just_after, &cfg()), Inactive);
    }

    #[test]
    fn inactive_becomes_retired_strictly_after_retired_after() {
        assert_eq!(
            next_state(Inactive, Some(t(0)), t(86_400), &cfg()),
            Inactive
        );
        assert_eq!(next_state(Inactive, Some(t(0)), t(86_401), &cfg()), Retired);
    }

    #[test]
    fn active_host_unseen_for_days_retires_directly() {
        // e.g. the operator itself was down for two days
        assert_eq!(
            next_state(Active, Some(t(0)), t(2 * 86_400), &cfg()),
            Retired
        );
    }

    #[test]
    fn return_of_a_host_makes_it_active_again() {
        assert_eq!(next_state(Inactive, Some(t(100)), t(101), &cfg()), Active);
        assert_eq!(next_state(Retired, Some(t(100)), t(101), &cfg()), Active);
    }

    #[test]
    fn retired_host_does_not_become_inactive_again() {
        // Retired (e.g. its Node was deleted) with a keepalive that is old but not 24 h old.
        assert_eq!(next_state(Retired, Some(t(0)), t(60), &cfg()), Retired);
    }

    #[test]
    fn keepalive_from_the_future_counts_as_fresh() {
        assert_eq!(next_state(Inactive, Some(t(500)), t(0), &cfg()), Active);
        assert_eq!(
            fleet_verdict(Some(t(500)), t(0), &cfg()),
            FleetVerdict::Live
        );
    }

    #[test]
    fn host_without_keepalive_keeps_its_state() {
        for s in [New, Active, Inactive, Retired] {
            assert_eq!(next_state(s, None, t(0), &cfg()), s);
        }
    }

    #[test]
    fn custom_timings_are_honoured() {
        let c = LifecycleConfig {
            keepalive_interval: Duration::from_secs(5),
            inactive_after: Duration::from_secs(60),
            retired_after: Duration::from_secs(120),
            freeze_after: Duration::from_secs(600),
        };
        assert_eq!(next_state(Active, Some(t(0)), t(60), &c), Active);
        assert_eq!(next_state(Active, Some(t(0)), t(61), &c), Inactive);
        assert_eq!(next_state(Active, Some(t(0)), t(121), &c), Retired);
    }

    #[test]
    fn keepalive_parsing() {
        assert_eq!(parse_keepalive(Some("2023-11-14T22:13:20Z")), Some(t(0)));
        assert_eq!(parse_keepalive(Some("yesterday")), None);
        assert_eq!(parse_keepalive(None), None);
    }

    fn clock(name: &str, state: HostState, last: Option<i64>) -> HostClock {
        HostClock {
            name: name.into(),
            state,
            last_keepalive: last.map(t),
        }
    }

    #[test]
    fn evaluate_lists_only_changes() {
        let hosts = vec![
            clock("fresh", Active, Some(95)),
            clock("stale", Active, Some(0)),
            clock("back", Inactive, Some(99)),
            clock("never", New, None),
            clock("first", New, Some(100)),
        ];
        let Evaluation::Transitions(ts) = evaluate(&hosts, None, t(100), &cfg()) else {
            panic!("not frozen")
        };
        assert_eq!(
            ts,
            vec![
                Transition {
                    name: "stale".into(),
                    from: Active,
                    to: Inactive
                },
                Transition {
                    name: "back".into(),
                    from: Inactive,
                    to: Active
                },
                Transition {
                    name: "first".into(),
                    from: New,
                    to: Active
                },
            ]
        );
    }

    #[test]
    fn whole_fleet_silent_freezes_every_transition() {
        let hosts = vec![clock("a", Active, Some(0)), clock("b", Active, Some(5))];
        // freshest keepalive 5, now 36 → silent 31 s > 30 s
        assert_eq!(
            evaluate(&hosts, None, t(36), &cfg()),
            Evaluation::Frozen {
                silent_for: Duration::from_secs(31)
            }
        );
        // at exactly the boundary the valve is not engaged and "a" goes inactive
        assert_eq!(
            evaluate(&hosts, None, t(35), &cfg()),
            Evaluation::Transitions(vec![Transition {
                name: "a".into(),
                from: Active,
                to: Inactive
            }])
        );
    }

    #[test]
    fn a_heartbeat_known_to_the_caller_keeps_the_valve_open() {
        let hosts = vec![clock("a", Active, Some(0))];
        let e = evaluate(&hosts, Some(t(100)), t(101), &cfg());
        assert_eq!(
            e,
            Evaluation::Transitions(vec![Transition {
                name: "a".into(),
                from: Active,
                to: Inactive
            }])
        );
    }

    #[test]
    fn empty_or_never_heard_fleet_is_not_frozen() {
        assert_eq!(
            evaluate(&[], None, t(0), &cfg()),
            Evaluation::Transitions(vec![])
        );
        let hosts = vec![clock("n", New, None)];
        assert_eq!(
            evaluate(&hosts, None, t(1_000_000), &cfg()),
            Evaluation::Transitions(vec![])
        );
    }

    #[test]
    fn safety_valve_reports_edges_once() {
        let mut v = SafetyValve::default();
        let frozen = Evaluation::Frozen {
            silent_for: Duration::from_secs(40),
        };
        let live = Evaluation::Transitions(vec![]);
        assert_eq!(v.observe(&live), None);
        assert_eq!(v.observe(&frozen), Some(ValveChange::Engaged));
        assert!(v.is_frozen());
        assert_eq!(v.observe(&frozen), None);
        assert_eq!(v.observe(&live), Some(ValveChange::Released));
        assert_eq!(v.observe(&live), None);
        assert!(!v.is_frozen());
    }
}
