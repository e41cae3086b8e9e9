//! Counters and histograms for `GET /metrics` (prometheus-client, OpenMetrics text format).
//!
//! The loop updates them as it works; connection gauges are computed at scrape time from the
//! connection table, so no state change has to remember to move a gauge.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;

pub struct Metrics {
    registry: Registry,
    connections: Family<Labels, Gauge>,
    pub logins: Counter,
    pub messages_in: Counter,
    pub messages_out: Counter,
    pub delivery_latency: Histogram,
    pub commit_latency: Histogram,
    pub commits_refused: Counter,
    pub bytes_in: Counter,
    pub bytes_out: Counter,
    closes: Family<Labels, Counter>,
    pub slow_consumer_kills: Counter,
    pub loop_turns: Counter,
}

fn histogram() -> Histogram {
    // 100 µs to ~100 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 21))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("imgate");
        let m = Metrics {
            connections: Family::default(),
            logins: Counter::default(),
            messages_in: Counter::default(),
            messages_out: Counter::default(),
            delivery_latency: histogram(),
            commit_latency: histogram(),
            commits_refused: Counter::default(),
            bytes_in: Counter::default(),
            bytes_out: Counter::default(),
            closes: Family::default(),
            slow_consumer_kills: Counter::default(),
            loop_turns: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "connections",
            "Connections by state (handshaking, open, closing) and transport",
            m.connections.clone(),
        );
        registry.register("logins", "Successful logins", m.logins.clone());
        registry.register(
            "messages_in",
            "Messages accepted from senders (not counting duplicates)",
            m.messages_in.clone(),
        );
        registry.register(
            "messages_out",
            "Message frames delivered to devices",
            m.messages_out.clone(),
        );
        registry.register(
            "delivery_latency_seconds",
            "From a message's acceptance to its delivery to a device",
            m.delivery_latency.clone(),
        );
        registry.register(
            "store_commit_latency_seconds",
            "Duration of one store commit (one group of batches)",
            m.commit_latency.clone(),
        );
        registry.register(
            "store_commits_refused",
            "Batches the store did not confirm in time (Redis away): their sends got UNAVAILABLE",
            m.commits_refused.clone(),
        );
        registry.register("bytes_in", "Bytes read from clients", m.bytes_in.clone());
        registry.register("bytes_out", "Bytes written to clients", m.bytes_out.clone());
        registry.register(
            "closes",
            "Connections closed, by close code and by who closed",
            m.closes.clone(),
        );
        registry.register(
            "slow_consumer_kills",
            "Connections closed because their unsent output passed --max-outbound-bytes",
            m.slow_consumer_kills.clone(),
        );
        registry.register(
            "loop_turns",
            "Wake-ups of the network loop: it sleeps in its poll while there is nothing to do, \
             so a rate far above the traffic's means it spins",
            m.loop_turns.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Counts a close: `by` is "server" or "peer".
    pub fn close(&self, code: u16, by: &'static str) {
        self.closes
            .get_or_create(&vec![("code", code.to_string()), ("by", by.to_owned())])
            .inc();
    }

    /// Renders the registry; `connections` is (state, transport, count) as of now.
    pub fn render(&self, connections: &[(&'static str, &'static str, i64)]) -> String {
        self.connections.clear();
        for (state, transport, n) in connections {
            self.connections
                .get_or_create(&vec![
                    ("state", (*state).to_owned()),
                    ("transport", (*transport).to_owned()),
                ])
                .set(*n);
        }
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_histograms_and_labels() {
        let m = Metrics::new();
        m.logins.inc();
        m.messages_out.inc_by(3);
        m.delivery_latency.observe(0.002);
        m.close(1008, "server");
        let text = m.render(&[("open", "ws", 2)]);
        assert!(text.contains("imgate_logins_total 1"), "{text}");
        assert!(text.contains("imgate_messages_out_total 3"), "{text}");
        assert!(
            text.contains("imgate_delivery_latency_seconds_count 1"),
            "{text}"
        );
        assert!(
            text.contains("imgate_closes_total{code=\"1008\",by=\"server\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("imgate_connections{state=\"open\",transport=\"ws\"} 2"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
    }
}
