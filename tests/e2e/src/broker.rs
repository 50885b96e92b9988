//! The fleet's broker users, connections and host queues, through the broker's management tool.

use super::*;

impl Fleet {
    /// Creates a broker user of this fleet (deleted with it) with these permissions in vhost `/`,
    /// and returns the AMQP URL that logs in as it.
    pub fn add_broker_user(
        &self,
        name: &str,
        password: &str,
        p: &dog_protocol::broker::Permissions,
    ) -> String {
        assert!(
            name.starts_with(&self.prefix),
            "fleet broker users start with the fleet prefix"
        );
        must(&["rabbitmqctl", "add_user", name, password]);
        must(&[
            "rabbitmqctl",
            "set_permissions",
            "-p",
            "/",
            name,
            &p.configure,
            &p.write,
            &p.read,
        ]);
        format!("amqp://{name}:{password}@127.0.0.1:5672/%2f")
    }

    /// The broker users of the open connections named `connection_name`, as the broker knows
    /// them.
    pub fn connection_users(&self, connection_name: &str) -> Vec<String> {
        let out = sh(&[
            "rabbitmqctl",
            "list_connections",
            "-q",
            "--formatter",
            "json",
            "user",
            "client_properties",
        ]);
        let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
        rows.iter()
            .filter(|row| {
                row["client_properties"].as_array().is_some_and(|props| {
                    props.iter().any(|p| {
                        p[0] == "connection_name" && p[2].as_str() == Some(connection_name)
                    })
                })
            })
            .filter_map(|row| row["user"].as_str().map(str::to_string))
            .collect()
    }

    /// The broker queue of `node`'s host.
    pub fn host_queue(&self, node: &str) -> String {
        format!("{}.host.{}", self.prefix, self.host(node))
    }

    /// Messages ready in `node`'s host queue (`None` while the broker does not list it).
    pub fn host_queue_ready(&self, node: &str) -> Option<u64> {
        queue_count(&self.host_queue(node), "messages_ready")
    }

    /// Agent messages the operator took from its inbox and has not acknowledged (`None` while
    /// the broker does not list the inbox).
    pub fn inbox_unacked(&self) -> Option<u64> {
        let inbox = format!("{}.operator.inbox", self.prefix);
        queue_count(&inbox, "messages_unacknowledged")
    }

    /// What the broker says of the operator's inbox and of every channel with messages
    /// unacknowledged: for a test that waited in vain for the inbox to be acknowledged.
    pub fn inbox_report(&self) -> String {
        let inbox = format!("{}.operator.inbox", self.prefix);
        let queues = sh(&[
            "rabbitmqctl",
            "list_queues",
            "-q",
            "name",
            "messages_ready",
            "messages_unacknowledged",
            "consumers",
        ]);
        let channels = sh(&[
            "rabbitmqctl",
            "list_channels",
            "-q",
            "name",
            "consumer_count",
            "messages_unacknowledged",
            "prefetch_count",
        ]);
        let queue = String::from_utf8_lossy(&queues.stdout)
            .lines()
            .filter(|l| l.starts_with(&inbox))
            .collect::<Vec<_>>()
            .join("\n");
        let busy = String::from_utf8_lossy(&channels.stdout)
            .lines()
            .filter(|l| l.split_whitespace().nth_back(1).is_some_and(|n| n != "0"))
            .collect::<Vec<_>>()
            .join("\n");
        format!("inbox (ready, unacknowledged, consumers): {queue}\nchannels with unacknowledged messages:\n{busy}")
    }

    /// Drops every message waiting in `node`'s host queue, as a broker restart drops
    /// transient ones.
    pub fn purge_host_queue(&self, node: &str) {
        must(&["rabbitmqctl", "purge_queue", &self.host_queue(node)]);
    }

    /// Closes (server side) the broker connections whose name contains `needle`.
    pub fn kill_broker_connections(&self, needle: &str) -> usize {
        let expr = format!(
            "Ps = [P || P <- rabbit_networking:connections(), \
               [{{client_properties, Props}}] <- [rabbit_networking:connection_info(P, [client_properties])], \
               {{<<\"connection_name\">>, longstr, N}} <- Props, \
               binary:match(N, <<\"{needle}\">>) =/= nomatch], \
             [rabbit_networking:close_connection(P, \"dog e2e\") || P <- Ps], length(Ps)."
        );
        let out = sh(&["rabbitmqctl", "eval", &expr]);
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0)
    }
}

/// One of `rabbitmqctl list_queues`'s counts (`column`) for `queue`.
fn queue_count(queue: &str, column: &str) -> Option<u64> {
    let out = sh(&["rabbitmqctl", "list_queues", "-q", "name", column]);
    String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
        let mut cols = l.split_whitespace();
        (cols.next() == Some(queue)).then(|| cols.next()?.parse().ok())?
    })
}
