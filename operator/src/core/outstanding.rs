//! Requests sent to hosts and not yet answered, indexed by request id and by host.
//!
//! An answer settles its request and every older request to the same host: a host's queue is
//! delivered in order, so those were answered before, or dropped unanswered (an agent
//! acknowledges a stale or replayed request without answering it, and a request lost with a
//! purged queue is never answered), and would otherwise be kept for as long as the operator
//! runs. Settling looks only at the answering host's requests: a scan of every outstanding
//! request per answer was a quarter-million string comparisons per thousand hosts of a pass.

use std::collections::HashMap;
use uuid::Uuid;

/// Outstanding requests: id → (host, revision it carries, if any).
#[derive(Debug, Default)]
pub struct Outstanding {
    by_id: HashMap<Uuid, (String, Option<u64>)>,
    by_host: HashMap<String, Vec<Uuid>>,
}

impl Outstanding {
    /// Request `id` to `host` is outstanding (sent, or about to be).
    pub fn insert(&mut self, id: Uuid, host: &str, revision: Option<u64>) {
        if let Some((old, _)) = self.by_id.insert(id, (host.to_string(), revision)) {
            self.unlist(&old, id);
        }
        self.by_host.entry(host.to_string()).or_default().push(id);
    }

    /// Request `id` answered by `host`: taken out with every older request (a revision at or
    /// below its own) to the same host. `None` for an unknown request (another replica's, or
    /// already settled). A request answered by another host than it was sent to settles only
    /// itself.
    pub fn settle(&mut self, id: Uuid, host: &str) -> Option<(String, Option<u64>)> {
        let answered = self.remove(id)?;
        if let (true, Some(rev)) = (answered.0 == host, answered.1) {
            let by_id = &mut self.by_id;
            if let Some(ids) = self.by_host.get_mut(host) {
                ids.retain(|other| {
                    let older = by_id
                        .get(other)
                        .is_some_and(|(_, r)| r.is_some_and(|r| r <= rev));
                    if older {
                        by_id.remove(other);
                    }
                    !older
                });
                if ids.is_empty() {
                    self.by_host.remove(host);
                }
            }
        }
        Some(answered)
    }

    /// Request `id` is no longer outstanding (it was never sent); what it was.
    pub fn remove(&mut self, id: Uuid) -> Option<(String, Option<u64>)> {
        let removed = self.by_id.remove(&id)?;
        self.unlist(&removed.0, id);
        Some(removed)
    }

    /// Every request to `host` is dropped (the host is gone).
    pub fn forget_host(&mut self, host: &str) {
        for id in self.by_host.remove(host).unwrap_or_default() {
            self.by_id.remove(&id);
        }
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    fn unlist(&mut self, host: &str, id: Uuid) {
        if let Some(ids) = self.by_host.get_mut(host) {
            ids.retain(|other| *other != id);
            if ids.is_empty() {
                self.by_host.remove(host);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn ids_of(o: &Outstanding) -> BTreeSet<Uuid> {
        o.by_id.keys().copied().collect()
    }

    #[test]
    fn an_answer_settles_the_older_requests_of_its_host_only() {
        let ids: Vec<Uuid> = (0..5).map(|_| Uuid::new_v4()).collect();
        let mut o = Outstanding::default();
        o.insert(ids[0], "a", Some(1));
        o.insert(ids[1], "a", Some(2));
        o.insert(ids[2], "a", Some(3));
        o.insert(ids[3], "b", Some(1));
        assert_eq!(o.settle(ids[1], "a"), Some(("a".to_string(), Some(2))));
        // a's revision 1 went with it; a's newer request and b's stay
        assert_eq!(ids_of(&o), BTreeSet::from([ids[2], ids[3]]));
        // an unknown request (another replica's, or already settled) changes nothing
        assert_eq!(o.settle(ids[4], "a"), None);
        assert_eq!(o.len(), 2);
        // a request answered by another host than it was sent to settles only itself
        assert!(o.settle(ids[3], "a").is_some());
        assert_eq!(o.len(), 1);
        o.forget_host("a");
        assert!(o.is_empty() && o.by_host.is_empty());
    }

    /// One step of a random history: insert (host, revision), settle the n-th outstanding
    /// request as answered by a host, remove the n-th, or forget a host.
    #[derive(Debug, Clone)]
    enum Step {
        Insert(u8, Option<u64>),
        Settle(usize, u8),
        Remove(usize),
        Forget(u8),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (0u8..3, proptest::option::of(0u64..5)).prop_map(|(h, r)| Step::Insert(h, r)),
            (0usize..8, 0u8..3).prop_map(|(n, h)| Step::Settle(n, h)),
            (0usize..8).prop_map(Step::Remove),
            (0u8..3).prop_map(Step::Forget),
        ]
    }

    proptest! {
        /// The index agrees with the plain map it replaced (every outstanding request scanned
        /// on each answer), step by step.
        #[test]
        fn agrees_with_a_scan_of_every_request(steps in proptest::collection::vec(step(), 0..40)) {
            let host = |h: u8| format!("h{h}");
            let mut o = Outstanding::default();
            let mut model: HashMap<Uuid, (String, Option<u64>)> = HashMap::new();
            let mut order: Vec<Uuid> = Vec::new();
            for s in steps {
                match s {
                    Step::Insert(h, r) => {
                        let id = Uuid::new_v4();
                        o.insert(id, &host(h), r);
                        model.insert(id, (host(h), r));
                        order.push(id);
                    }
                    Step::Settle(n, h) => {
                        let id = order.get(n).copied().unwrap_or_else(Uuid::new_v4);
                        let expected = model.remove(&id);
                        if let Some((answered, Some(rev))) = &expected {
                            if *answered == host(h) {
                                model.retain(|_, (mh, r)| *mh != host(h) || r.is_none_or(|r| r > *rev));
                            }
                        }
                        prop_assert_eq!(o.settle(id, &host(h)), expected);
                    }
                    Step::Remove(n) => {
                        let id = order.get(n).copied().unwrap_or_else(Uuid::new_v4);
                        prop_assert_eq!(o.remove(id), model.remove(&id));
                    }
                    Step::Forget(h) => {
                        o.forget_host(&host(h));
                        model.retain(|_, (mh, _)| *mh != host(h));
                    }
                }
                prop_assert_eq!(ids_of(&o), model.keys().copied().collect::<BTreeSet<_>>());
                let listed: usize = o.by_host.values().map(Vec::len).sum();
                prop_assert_eq!(listed, o.len());
            }
        }
    }
}
