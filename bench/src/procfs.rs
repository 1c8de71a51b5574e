//! What the bench reads from `/proc`: CPU time and peak RSS of the workers, and who else used
//! the machine meanwhile (these shared machines are noisy, so the noise is reported too).

use std::collections::HashMap;
use std::time::Instant;

use crate::report::MachineCpu;

fn clock_ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no memory-safety concerns.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// Clock ticks (of `/proc/*/stat`) to seconds.
pub fn ticks_to_secs(t: u64) -> f64 {
    t as f64 / clock_ticks_per_sec()
}

/// utime + stime of a process (all its threads), in clock ticks.
pub fn process_ticks(pid: u32) -> std::io::Result<u64> {
    stat_ticks(&std::fs::read_to_string(format!("/proc/{pid}/stat"))?)
        .ok_or_else(|| std::io::Error::other("unexpected /proc/PID/stat"))
}

/// utime + stime of all of `pids` together, in clock ticks; `None` when there is none or one
/// cannot be read (a sum over some of them would pass for all of them).
pub fn total_ticks(pids: &[u32]) -> Option<u64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|&p| process_ticks(p).ok()).sum()
}

fn stat_ticks(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of proc(5); `after` starts at field 3.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// `VmHWM` (peak resident set) of a process, KiB.
pub fn peak_rss_kib(pid: u32) -> std::io::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| std::io::Error::other("no VmHWM"))
}

/// The largest `VmHWM` of `pids`, KiB: the peak of the biggest worker, since each is a process
/// of its own; `None` when none can be read.
pub fn largest_peak_rss_kib(pids: &[u32]) -> Option<u64> {
    pids.iter().filter_map(|&p| peak_rss_kib(p).ok()).max()
}

/// Resets `VmHWM` of each of `pids` to its current RSS (`clear_refs` 5), so an already running
/// worker's peak is the measured phase's. A fresh child needs none. Tries every pid; returns
/// the first error.
pub fn reset_peak_rss(pids: &[u32]) -> std::io::Result<()> {
    pids.iter()
        .map(|p| std::fs::write(format!("/proc/{p}/clear_refs"), "5"))
        .fold(Ok(()), Result::and)
}

/// The 1-minute load average, recorded with each run as a hint of how busy the machine was.
pub fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// CPU counters of the machine and its main actors at one moment; two of them give a
/// [`MachineCpu`].
pub struct CpuSample {
    at: Instant,
    busy: u64,
    cpus: usize,
    /// Ticks of all the workers together (`None` when none runs).
    worker: Option<u64>,
    /// pid → ticks of RabbitMQ and Postgres processes.
    broker: HashMap<u32, u64>,
    postgres: HashMap<u32, u64>,
    me: u64,
}

impl CpuSample {
    /// Now, for the running workers `workers` (summed), the broker, Postgres and this process.
    pub fn take(workers: &[u32]) -> Self {
        let (busy, cpus) = machine_busy();
        let (broker, postgres) = broker_and_postgres_ticks();
        Self {
            at: Instant::now(),
            busy,
            cpus,
            worker: total_ticks(workers),
            broker,
            postgres,
            me: process_ticks(std::process::id()).unwrap_or(0),
        }
    }

    /// A sample for workers that start after `before` was taken: their counters start at 0.
    pub fn take_for(workers: &[u32], mut before: Self) -> Self {
        if before.worker.is_none() && !workers.is_empty() {
            before.worker = Some(0);
        }
        before
    }

    /// Who used how much CPU between `self` and `after`.
    pub fn delta(&self, after: &Self, load_before: f64) -> MachineCpu {
        let group = |a: &HashMap<u32, u64>, b: &HashMap<u32, u64>| {
            ticks_to_secs(
                b.iter()
                    .map(|(pid, t)| t.saturating_sub(a.get(pid).copied().unwrap_or(0)))
                    .sum(),
            )
        };
        let worker_secs = match (self.worker, after.worker) {
            (Some(a), Some(b)) => ticks_to_secs(b.saturating_sub(a)),
            _ => 0.0,
        };
        let busy_secs = ticks_to_secs(after.busy.saturating_sub(self.busy));
        let broker_secs = group(&self.broker, &after.broker);
        let postgres_secs = group(&self.postgres, &after.postgres);
        let bench_secs = ticks_to_secs(after.me.saturating_sub(self.me));
        MachineCpu {
            wall_secs: after.at.saturating_duration_since(self.at).as_secs_f64(),
            busy_secs,
            cpus: after.cpus,
            worker_secs,
            broker_secs,
            postgres_secs,
            bench_secs,
            other_secs: (busy_secs - worker_secs - broker_secs - postgres_secs - bench_secs)
                .max(0.0),
            load_before,
        }
    }
}

/// pid → ticks of every RabbitMQ (`beam.smp`) and every Postgres process.
fn broker_and_postgres_ticks() -> (HashMap<u32, u64>, HashMap<u32, u64>) {
    let mut broker = HashMap::new();
    let mut postgres = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return (broker, postgres);
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(comm) = std::fs::read_to_string(format!("/proc/{pid}/comm")) else {
            continue;
        };
        let map = match comm.trim() {
            "beam.smp" => &mut broker,
            "postgres" => &mut postgres,
            _ => continue,
        };
        if let Ok(t) = process_ticks(pid) {
            map.insert(pid, t);
        }
    }
    (broker, postgres)
}

/// Busy ticks of all CPUs (everything but idle and iowait) and the number of CPUs.
fn machine_busy() -> (u64, usize) {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return (0, 0);
    };
    let cpus = stat
        .lines()
        .filter(|l| l.starts_with("cpu") && !l.starts_with("cpu "))
        .count();
    let busy = stat
        .lines()
        .next()
        .map(|l| {
            l.split_whitespace()
                .skip(1)
                .filter_map(|v| v.parse::<u64>().ok())
                .enumerate()
                .filter(|(i, _)| *i != 3 && *i != 4 && *i < 8)
                .map(|(_, v)| v)
                .sum()
        })
        .unwrap_or(0);
    (busy, cpus)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_proc_stat_ticks() {
        let stat = "1234 (tenant tokens) S 1 1234 1234 0 -1 4194560 1000 0 0 0 250 40 0 0 20 0 9 0";
        assert_eq!(stat_ticks(stat), Some(290));
        assert_eq!(stat_ticks("garbage"), None);
    }

    #[test]
    fn sums_ticks_only_when_every_process_is_there() {
        let me = std::process::id();
        assert_eq!(total_ticks(&[]), None);
        assert!(total_ticks(&[me, me]).is_some());
        assert_eq!(total_ticks(&[me, u32::MAX]), None);
        assert!(largest_peak_rss_kib(&[me, u32::MAX]).is_some_and(|k| k > 0));
        assert_eq!(largest_peak_rss_kib(&[]), None);
    }
}
