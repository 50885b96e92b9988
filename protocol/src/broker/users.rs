//! Broker users and what each may touch (pure): the per-node user the operator provisions for
//! an admitted host, the bootstrap user agents start with, and the operator's own user.
//!
//! RabbitMQ checks *configure* (declare, delete), *write* (publish to an exchange, bind a queue)
//! and *read* (consume a queue, bind from an exchange) against three regular expressions over
//! resource names. The functions here are the one place those expressions are written; the
//! operator sends them to the management API, `docs/broker.md` prints them, and the broker
//! tests hold the broker to them.

use super::topology::Topology;

/// One user's configure / write / read patterns in one vhost.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Permissions {
    pub configure: String,
    pub write: String,
    pub read: String,
}

/// Prefix of the queues the broker names for a client (`queue.declare` with an empty name).
pub const SERVER_NAMED_QUEUE_PREFIX: &str = "amq.gen-";

/// Escapes a name for use inside a RabbitMQ permission pattern (an Erlang regular expression).
fn escape(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    for c in name.chars() {
        if !c.is_ascii_alphanumeric() && c != '-' && c != '_' {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

impl Topology {
    /// The broker user of one host: `<prefix>.node.<host>`. A heartbeat published by this
    /// user (the broker checks the AMQP `user-id` property against the login) comes from
    /// `host`'s node and from nowhere else.
    pub fn node_user(&self, host: &str) -> String {
        format!("{}.node.{host}", self.prefix())
    }

    /// The host a node user belongs to, if `user` is one under this prefix.
    pub fn host_of_node_user<'a>(&self, user: &'a str) -> Option<&'a str> {
        user.strip_prefix(self.prefix())?
            .strip_prefix(".node.")
            .filter(|h| !h.is_empty())
    }

    /// What a node user may do: declare and consume its own queue, bind it to shared sets,
    /// publish to the operator. Nothing on another host's queue, on `<prefix>.hosts`, on the
    /// operator's inbox, or on the default exchange.
    pub fn node_permissions(&self, host: &str) -> Permissions {
        let own = escape(&self.host_queue(host));
        let operator = escape(&self.operator_exchange());
        let sets = escape(&self.sets_exchange());
        Permissions {
            configure: format!("^{own}$"),
            write: format!("^({own}|{operator})$"),
            read: format!("^({own}|{sets})$"),
        }
    }

    /// What the bootstrap user every agent starts with may do: declare and consume a queue
    /// the broker names for its own connection (exclusive: no other connection can touch
    /// it), and publish to the operator. No named queue, no binding, no other exchange.
    pub fn bootstrap_permissions(&self) -> Permissions {
        let generated = format!("{}.*", escape(SERVER_NAMED_QUEUE_PREFIX));
        Permissions {
            configure: format!("^{generated}$"),
            write: format!("^{}$", escape(&self.operator_exchange())),
            read: format!("^{generated}$"),
        }
    }

    /// What the operator's user may do: everything under the prefix, and publish to the
    /// default exchange (which routes a node user's credential to the asking agent's
    /// bootstrap queue by its name).
    pub fn operator_permissions(&self) -> Permissions {
        let all = format!("^{}\\..*", escape(self.prefix()));
        Permissions {
            configure: format!("{all}$"),
            write: format!("^({}\\..*|amq\\.default)$", escape(self.prefix())),
            read: format!("{all}$"),
        }
    }
}

/// Whether `name` is a queue name the broker generated (what a bootstrap agent may give as
/// the queue its credential goes to).
pub fn is_server_named_queue(name: &str) -> bool {
    name.len() <= 255
        && name
            .strip_prefix(SERVER_NAMED_QUEUE_PREFIX)
            .is_some_and(|rest| {
                !rest.is_empty()
                    && rest
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
            })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A match as RabbitMQ does it (anchored patterns, so a plain regex engine agrees).
    fn matches(pattern: &str, name: &str) -> bool {
        regex::Regex::new(pattern)
            .map(|r| r.is_match(name))
            .unwrap_or(false)
    }

    #[test]
    fn a_node_user_reaches_its_own_queue_and_the_operator_only() {
        let t = Topology::new("dog");
        let p = t.node_permissions("node-1.example");
        assert_eq!(p.configure, r"^dog\.host\.node-1\.example$");
        assert_eq!(p.write, r"^(dog\.host\.node-1\.example|dog\.operator)$");
        assert_eq!(p.read, r"^(dog\.host\.node-1\.example|dog\.sets)$");
        for pattern in [&p.configure, &p.write, &p.read] {
            assert!(matches(pattern, "dog.host.node-1.example"));
            // a dot is a dot: no look-alike host, no longer name
            assert!(!matches(pattern, "dog.host.node-1xexample"));
            assert!(!matches(pattern, "dog.host.node-1.example2"));
            assert!(!matches(pattern, "dog.host.node-2.example"));
            assert!(!matches(pattern, "dog.operator.inbox"));
            assert!(!matches(pattern, "dog.hosts"));
            assert!(!matches(pattern, "amq.default"));
        }
        assert!(matches(&p.write, "dog.operator"));
        assert!(!matches(&p.configure, "dog.operator"));
        assert!(matches(&p.read, "dog.sets"));
        assert!(!matches(&p.write, "dog.sets"));
    }

    #[test]
    fn the_bootstrap_user_reaches_generated_queues_and_the_operator_only() {
        let t = Topology::new("de1x2");
        let p = t.bootstrap_permissions();
        assert!(matches(&p.configure, "amq.gen-JzTY20BRgKO-HjmUJj0wLg"));
        assert!(matches(&p.read, "amq.gen-JzTY20BRgKO-HjmUJj0wLg"));
        assert!(matches(&p.write, "de1x2.operator"));
        for name in [
            "de1x2.host.alpha",
            "de1x2.hosts",
            "de1x2.sets",
            "de1x2.operator.inbox",
            "amq.default",
            "amqxgen-1",
        ] {
            assert!(!matches(&p.configure, name), "configure {name}");
            assert!(!matches(&p.read, name), "read {name}");
        }
        assert!(!matches(&p.write, "amq.gen-x"));
        assert!(!matches(&p.write, "de1x2.operator.inbox"));
    }

    #[test]
    fn the_operator_may_route_to_a_generated_queue_through_the_default_exchange() {
        let p = Topology::new("dog").operator_permissions();
        assert!(matches(&p.write, "amq.default"));
        assert!(matches(&p.write, "dog.hosts"));
        assert!(!matches(&p.write, "other.hosts"));
        assert!(matches(&p.configure, "dog.host.a"));
        assert!(!matches(&p.configure, "amq.default"));
        assert!(!matches(&p.configure, "doghost"));
    }

    #[test]
    fn node_users_name_their_host() {
        let t = Topology::new("dog");
        assert_eq!(t.node_user("a.example"), "dog.node.a.example");
        assert_eq!(t.host_of_node_user("dog.node.a.example"), Some("a.example"));
        assert_eq!(t.host_of_node_user("dog.node."), None);
        assert_eq!(t.host_of_node_user("dogx.node.a"), None);
        assert_eq!(t.host_of_node_user("guest"), None);
        assert_eq!(Topology::new("do").host_of_node_user("dog.node.a"), None);
    }

    /// docs/broker.md prints the patterns these functions write, in its table and in the
    /// commands it gives; the broker tests then hold the broker to the same functions.
    #[test]
    fn docs_print_the_patterns_the_code_writes() {
        let doc = include_str!("../../../docs/broker.md");
        let t = Topology::new("dog");
        let table_cell = |p: &str| format!("`{}`", p.replace('|', "\\|"));
        let node = t.node_permissions("node-1.example");
        let boot = t.bootstrap_permissions();
        let op = t.operator_permissions();
        for p in [&node, &boot, &op] {
            for pattern in [&p.configure, &p.write, &p.read] {
                assert!(doc.contains(&table_cell(pattern)), "table lacks {pattern}");
            }
        }
        let command = |user: &str, p: &Permissions| {
            format!(
                "rabbitmqctl set_permissions -p dog {user} '{}' '{}' '{}'",
                p.configure, p.write, p.read
            )
        };
        assert!(doc.contains(&command("dog-bootstrap", &boot)));
        assert!(doc.contains(&command("dog-operator", &op)));
        let vm = t.node_permissions("vm-1.example");
        let vm_command = format!(
            "rabbitmqctl set_permissions -p dog {} \\\n  '{}' \\\n  '{}' \\\n  '{}'",
            t.node_user("vm-1.example"),
            vm.configure,
            vm.write,
            vm.read
        );
        assert!(doc.contains(&vm_command), "lacks {vm_command}");
    }

    #[test]
    fn only_broker_generated_names_are_reply_queues() {
        assert!(is_server_named_queue("amq.gen-JzTY20BRgKO-HjmUJj0wLg"));
        assert!(!is_server_named_queue("amq.gen-"));
        assert!(!is_server_named_queue("dog.host.bravo"));
        assert!(!is_server_named_queue("amq.gen-a.b"));
        assert!(!is_server_named_queue(&format!(
            "amq.gen-{}",
            "a".repeat(300)
        )));
    }
}
