//! Process metrics read from `/proc/self` at scrape time (Linux; nothing elsewhere).

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Unit,
};

#[derive(Debug)]
pub struct ProcessCollector;

/// Clock ticks per second of `/proc` CPU times (USER_HZ; 100 on every Linux this runs on).
const TICKS_PER_SECOND: f64 = 100.0;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(stat) = read_stat() else { return Ok(()) };
        let cpu = encoder.encode_descriptor(
            "process_cpu",
            "CPU time used, user and system",
            Some(&Unit::Seconds),
            MetricType::Counter,
        )?;
        ConstCounter::new(stat.cpu_ticks as f64 / TICKS_PER_SECOND).encode(cpu)?;
        let start = encoder.encode_descriptor(
            "process_start_time",
            "Start time, since the Unix epoch",
            Some(&Unit::Seconds),
            MetricType::Gauge,
        )?;
        ConstGauge::new(boot_time().unwrap_or(0.0) + stat.start_ticks as f64 / TICKS_PER_SECOND).encode(start)?;
        if let Some(rss) = resident_bytes() {
            let memory = encoder.encode_descriptor(
                "process_resident_memory",
                "Resident memory",
                Some(&Unit::Bytes),
                MetricType::Gauge,
            )?;
            ConstGauge::new(rss as i64).encode(memory)?;
        }
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            let open =
                encoder.encode_descriptor("process_open_fds", "Open file descriptors", None, MetricType::Gauge)?;
            ConstGauge::new(fds.count() as i64).encode(open)?;
        }
        if let Some(max) = max_fds() {
            let limit = encoder.encode_descriptor(
                "process_max_fds",
                "Limit of open file descriptors",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(max).encode(limit)?;
        }
        Ok(())
    }
}

struct Stat {
    cpu_ticks: u64,
    start_ticks: u64,
}

fn read_stat() -> Option<Stat> {
    let text = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let fields: Vec<&str> = text.rsplit_once(')')?.1.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    Some(Stat { cpu_ticks: field(14)? + field(15)?, start_ticks: field(22)? })
}

fn boot_time() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    text.lines().find_map(|l| l.strip_prefix("btime ")).and_then(|v| v.trim().parse().ok())
}

fn resident_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: u64 =
        text.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib * 1024)
}

fn max_fds() -> Option<i64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}
