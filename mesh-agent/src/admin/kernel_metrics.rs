//! The datapath's own counters on `/metrics`, read from the kernel at each scrape, beside the
//! proxy's metrics: what `mesh-agent counters` shows, for monitoring.
//!
//! - `mesh_datapath_events_total{event}`: every counter of the kernel programs by its stable
//!   name (`connect4_redirected`, `sk_lookup_no_listener`, ...), summed over CPUs.
//! - `mesh_datapath_fail_open_total`: the sum of the counters of connections the datapath let
//!   through uncaptured or unsteered because it could not do its part (full maps, a failed
//!   socket assignment); anything above zero deserves an alert.
//! - `mesh_datapath_counters_readable`: 1 when the counters could be read at this scrape, 0
//!   when not (the datapath's pins are gone); the two families above are then absent.
use std::path::PathBuf;

use mesh_common::Counter;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge},
};

type Read = dyn Fn() -> anyhow::Result<Vec<(Counter, u64)>> + Send + Sync;

/// A collector of the kernel counters of one datapath instance.
pub struct KernelCounters {
    read: Box<Read>,
}

impl std::fmt::Debug for KernelCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelCounters").finish_non_exhaustive()
    }
}

impl KernelCounters {
    /// Reads the counters of the instance pinned at `pin_dir` at each scrape.
    pub fn pinned(pin_dir: PathBuf) -> KernelCounters {
        KernelCounters::from_fn(move || Ok(mesh_datapath::ebpf::Maps::open(&pin_dir)?.counters()?))
    }

    /// Reads the counters with `read` at each scrape.
    pub fn from_fn(
        read: impl Fn() -> anyhow::Result<Vec<(Counter, u64)>> + Send + Sync + 'static,
    ) -> KernelCounters {
        KernelCounters {
            read: Box::new(read),
        }
    }
}

impl Collector for KernelCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let counters = match (self.read)() {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::debug!(error = %format!("{e:#}"), "kernel counters unreadable");
                None
            }
        };
        let readable = ConstGauge::new(i64::from(counters.is_some()));
        readable.encode(encoder.encode_descriptor(
            "mesh_datapath_counters_readable",
            "1 when the datapath's counters could be read at this scrape",
            None,
            readable.metric_type(),
        )?)?;
        let Some(counters) = counters else {
            return Ok(());
        };
        let events = ConstCounter::new(0u64);
        let mut family = encoder.encode_descriptor(
            "mesh_datapath_events",
            "Events of the datapath's kernel programs, by their stable name",
            None,
            events.metric_type(),
        )?;
        for (counter, value) in &counters {
            let labels = [("event", counter.name())];
            ConstCounter::new(*value).encode(family.encode_family(&labels)?)?;
        }
        let fail_open: u64 = counters
            .iter()
            .filter(|(c, _)| c.fails_open())
            .map(|(_, v)| v)
            .sum();
        let fail_open = ConstCounter::new(fail_open);
        fail_open.encode(encoder.encode_descriptor(
            "mesh_datapath_fail_open",
            "Connections the datapath let through uncaptured or unsteered because it could not \
             do its part (full maps, a failed socket assignment)",
            None,
            fail_open.metric_type(),
        )?)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::{encoding::text::encode, registry::Registry};

    use super::*;

    fn scrape(collector: KernelCounters) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(collector));
        let mut text = String::new();
        encode(&mut text, &registry).expect("encode");
        text
    }

    #[test]
    fn every_counter_is_exported_by_name_and_fail_open_ones_are_summed() {
        let text = scrape(KernelCounters::from_fn(|| {
            Ok(Counter::ALL.iter().map(|c| (*c, *c as u64 + 1)).collect())
        }));
        for c in Counter::ALL {
            let line = format!(
                "mesh_datapath_events_total{{event=\"{}\"}} {}",
                c.name(),
                c as u64 + 1
            );
            assert!(text.contains(&line), "{line} missing in:\n{text}");
        }
        let fail_open: u64 = [
            Counter::Connect4MapFull,
            Counter::Connect6MapFull,
            Counter::SkLookupNoListener,
            Counter::SkLookupAssignError,
        ]
        .iter()
        .map(|c| *c as u64 + 1)
        .sum();
        assert!(
            text.contains(&format!("mesh_datapath_fail_open_total {fail_open}")),
            "{text}"
        );
        assert!(text.contains("mesh_datapath_counters_readable 1"), "{text}");
    }

    #[test]
    fn unreadable_counters_say_so_and_export_nothing_else() {
        let text = scrape(KernelCounters::from_fn(|| Err(anyhow::anyhow!("no pins"))));
        assert!(text.contains("mesh_datapath_counters_readable 0"), "{text}");
        assert!(!text.contains("mesh_datapath_events_total"), "{text}");
        assert!(!text.contains("mesh_datapath_fail_open_total"), "{text}");
    }
}
