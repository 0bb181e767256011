//! Benchmarks of nats-fs-worker, run against the release binaries in
//! `target/release/`, a real `nats-server` on loopback and real folders. `scripts/bench` builds
//! the binaries and runs this (`cargo bench --bench worker`); it prints a table and writes
//! `target/bench/<benchmark>.json`, `target/bench/summary.json` and
//! `target/bench/README-performance.md`.
//!
//! Every figure is the median of repeated runs, and every comparison is measured in the same
//! run, interleaved with what it is compared with. A missed target is reported (`MISSED`), not
//! failed: this is a benchmark, not a test.
//!
//! Select benchmarks with `BENCH_ONLY=dispatch,memory` (or `cargo bench --bench worker --
//! dispatch memory`); repetition counts come from `BENCH_*` variables, see [`Config`].
//!
//! The servers, supervisors, job folders and the controller's connection come from the
//! integration tests' harness, `tests/integration/support.rs`; as in the tests, `NATS_SERVER`
//! names the nats-server binary (default: `nats-server` from `PATH`).

#![allow(clippy::cast_precision_loss)] // Statistics on counts and sizes far below 2^52.

// The harness is written for the test binary: its items are `pub` for the test modules (here,
// too, nothing escapes the program), an unwrap in it is a failure as any other, and it fails
// by panicking, which fails one benchmark (see `run_one`). The part of it the bench does not
// use is allowed in the file itself (`dead_code`), as each test module uses a part too.
#[allow(unreachable_pub, clippy::unwrap_used)]
#[path = "../tests/integration/support.rs"]
mod support;

// The shares the tests mount a jobs folder on; here, sshfs.
#[allow(dead_code, unreachable_pub, clippy::unwrap_used)]
#[path = "../tests/integration/mounts.rs"]
mod mounts;

use std::collections::HashSet;
use std::fmt::Write as _;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write as _};
use std::os::unix::fs::PermissionsExt;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, ensure, Context, Result};
use futures_util::StreamExt;
use serde_json::{json, Value};
use tempfile::TempDir;

use support::{Jobs, Nats, Server, Supervisor};

/// The benchmarks, in the order they run.
const BENCHMARKS: [&str; 7] = [
    "dispatch",
    "throughput",
    "memory",
    "log-latency",
    "staging",
    "sync-scaling",
    "share",
];

/// How long anything that should happen "soon" may take before the benchmark gives up (the
/// harness has its own, shorter, for a server to start and a supervisor to be ready).
const SOON: Duration = Duration::from_secs(60);

fn main() -> ExitCode {
    // `cargo bench` passes `--bench`; `cargo test --benches` does not, and must not run this.
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.iter().any(|a| a == "--bench") {
        println!("nats-fs-worker benchmarks: run them with scripts/bench");
        return ExitCode::SUCCESS;
    }
    let filter: Vec<String> = args.into_iter().filter(|a| !a.starts_with("--")).collect();
    match run(&filter) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Repetition counts and sizes, from `BENCH_*` environment variables.
#[derive(Debug)]
struct Config {
    only: Vec<String>,
    /// Sequential trivial jobs for the dispatch latency (and as many shell spawns and NATS
    /// round trips for the floor).
    dispatch_jobs: usize,
    /// Jobs in one burst for the throughput.
    throughput_jobs: usize,
    /// Bursts per concurrency (each with a fresh server and supervisor).
    throughput_reps: usize,
    /// Jobs run by the supervisor before its memory is read the second time.
    memory_jobs: usize,
    /// Runs of the 300 MB step (and of the quiet baseline step).
    runner_memory_reps: usize,
    /// Bytes the loud step prints.
    runner_memory_bytes: u64,
    /// Lines per log latency job, and how many such jobs.
    log_lines: usize,
    log_reps: usize,
    /// Staging: small files, their size, the big file's size, repetitions.
    stage_files: usize,
    stage_file_bytes: usize,
    stage_big_mib: usize,
    stage_reps: usize,
    /// Sync scaling: files, folders, repetitions.
    scale_files: usize,
    scale_dirs: usize,
    scale_reps: usize,
    /// MiB of memory touched and freed right before each timed copy, see [`warm_memory`].
    warm_mib: usize,
    /// The job on a share (sshfs): small files, the big file's size, repetitions.
    share_files: usize,
    share_big_mib: usize,
    share_reps: usize,
}

impl Config {
    fn from_env(filter: &[String]) -> Self {
        let mut only: Vec<String> = std::env::var("BENCH_ONLY")
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(ToOwned::to_owned)
            .collect();
        only.extend(filter.iter().cloned());
        Self {
            only,
            dispatch_jobs: env_usize("BENCH_DISPATCH_JOBS", 200),
            throughput_jobs: env_usize("BENCH_THROUGHPUT_JOBS", 1000),
            throughput_reps: env_usize("BENCH_THROUGHPUT_REPS", 3),
            memory_jobs: env_usize("BENCH_MEMORY_JOBS", 1000),
            runner_memory_reps: env_usize("BENCH_RUNNER_MEMORY_REPS", 3),
            runner_memory_bytes: 300_000_000,
            log_lines: env_usize("BENCH_LOG_LINES", 100),
            log_reps: env_usize("BENCH_LOG_REPS", 2),
            stage_files: env_usize("BENCH_STAGE_FILES", 2000),
            stage_file_bytes: 4096,
            stage_big_mib: env_usize("BENCH_STAGE_BIG_MIB", 200),
            stage_reps: env_usize("BENCH_STAGE_REPS", 7),
            scale_files: env_usize("BENCH_SCALE_FILES", 100_000),
            scale_dirs: env_usize("BENCH_SCALE_DIRS", 400),
            scale_reps: env_usize("BENCH_SCALE_REPS", 5),
            warm_mib: env_usize("BENCH_WARM_MIB", 768),
            share_files: env_usize("BENCH_SHARE_FILES", 2000),
            share_big_mib: env_usize("BENCH_SHARE_BIG_MIB", 20),
            share_reps: env_usize("BENCH_SHARE_REPS", 5),
        }
    }

    fn selected(&self, name: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|o| o == name)
    }

    fn to_json(&self) -> Value {
        json!({
            "dispatchJobs": self.dispatch_jobs,
            "throughputJobs": self.throughput_jobs,
            "throughputReps": self.throughput_reps,
            "memoryJobs": self.memory_jobs,
            "runnerMemoryReps": self.runner_memory_reps,
            "runnerMemoryBytes": self.runner_memory_bytes,
            "logLines": self.log_lines,
            "logReps": self.log_reps,
            "stageFiles": self.stage_files,
            "stageFileBytes": self.stage_file_bytes,
            "stageBigMiB": self.stage_big_mib,
            "stageReps": self.stage_reps,
            "scaleFiles": self.scale_files,
            "scaleDirs": self.scale_dirs,
            "scaleReps": self.scale_reps,
            "warmMiB": self.warm_mib,
            "shareFiles": self.share_files,
            "shareBigMiB": self.share_big_mib,
            "shareReps": self.share_reps,
        })
    }
}

fn env_usize(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(value) if !value.trim().is_empty() => value.trim().parse().unwrap_or_else(|_| {
            eprintln!("bench: {name}={value:?} is not a count; using {default}");
            default
        }),
        _ => default,
    }
}

/// Where things are: the binaries, the output folder, and a scratch folder for this run.
#[derive(Debug)]
struct Env {
    bin_dir: PathBuf,
    out_dir: PathBuf,
    work: TempDir,
}

impl Env {
    fn new() -> Result<Self> {
        // This program is target/release/deps/worker-<hash>: the release binaries.
        let bin_dir = support::bin_dir();
        let target = bin_dir
            .parent()
            .context("the bench binary is not in target/<profile>/deps")?;
        for name in ["nats-fs-supervisor", "nats-fs-runner"] {
            check_fresh(&bin_dir.join(name))?;
        }
        let out_dir = target.join("bench");
        fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
        let base = std::env::var_os("BENCH_TMPDIR").map_or_else(std::env::temp_dir, PathBuf::from);
        let work = tempfile::Builder::new()
            .prefix("nats-fs-bench.")
            .tempdir_in(&base)
            .with_context(|| format!("creating a scratch folder in {}", base.display()))?;
        // As root the supervisor runs the runners as uids of a pool, which must reach the job
        // folders.
        chmod(work.path(), 0o755)?;
        // Every folder made in it lands in block groups of its own: see `spread_out`.
        if !spread_out(work.path()) {
            eprintln!("bench: chattr +T failed: disk figures may pay for earlier deletions");
        }
        Ok(Self {
            bin_dir,
            out_dir,
            work,
        })
    }

    fn bin(&self, name: &str) -> PathBuf {
        self.bin_dir.join(name)
    }

    /// A fresh folder `{name}.<random>` under the scratch folder, reachable by the runner
    /// user. Random, because ext4 places a new folder under a `chattr +T` one by a hash of its
    /// name: a fixed name would land where the same name was just deleted (see `spread_out`).
    /// Dropping it does not delete it: nothing in the scratch folder is deleted before the end
    /// of the run unless a benchmark says so, since deletions slow down the disk benchmarks
    /// (see `spread_out`), and `BENCH_KEEP` keeps it all.
    fn dir(&self, name: &str) -> Result<TempDir> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("{name}."))
            .disable_cleanup(true)
            .tempdir_in(self.work.path())
            .with_context(|| format!("creating a folder for {name}"))?;
        chmod(dir.path(), 0o755)?;
        Ok(dir)
    }
}

/// Refuses a missing binary, and warns about one older than its sources.
fn check_fresh(path: &Path) -> Result<()> {
    let fresh = support::is_fresh(path).with_context(|| {
        format!(
            "{} is not built: run `cargo build --release --workspace` first (scripts/bench does)",
            path.display()
        )
    })?;
    if !fresh {
        eprintln!(
            "bench: WARNING: {} is older than its sources; run `cargo build --release --workspace`",
            path.display()
        );
    }
    Ok(())
}

fn chmod(path: &Path, mode: u32) -> Result<()> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", path.display()))
}

// ---------------------------------------------------------------------------------------------
// Results: rows with targets, the table, the JSON files.

#[derive(Debug, Clone, Copy, PartialEq)]
enum Cmp {
    AtMost,
    AtLeast,
}

#[derive(Debug, Clone, Copy)]
struct Target {
    cmp: Cmp,
    limit: f64,
    text: &'static str,
}

const fn at_most(limit: f64, text: &'static str) -> Target {
    Target {
        cmp: Cmp::AtMost,
        limit,
        text,
    }
}

const fn at_least(limit: f64, text: &'static str) -> Target {
    Target {
        cmp: Cmp::AtLeast,
        limit,
        text,
    }
}

/// One line of the table.
#[derive(Debug, Clone)]
struct Row {
    bench: &'static str,
    metric: String,
    value: f64,
    unit: &'static str,
    shown: String,
    target: Option<Target>,
    /// The samples behind it were disturbed (see [`disturbed`]): take the verdict with salt.
    noisy: bool,
}

impl Row {
    fn new(
        bench: &'static str,
        metric: impl Into<String>,
        value: f64,
        unit: &'static str,
        decimals: usize,
        target: Option<Target>,
    ) -> Self {
        let shown = if unit.is_empty() {
            format!("{value:.decimals$}")
        } else {
            format!("{value:.decimals$} {unit}")
        };
        Self {
            bench,
            metric: metric.into(),
            value,
            unit,
            shown,
            target,
            noisy: false,
        }
    }

    /// Marks the row as measured on a disturbed disk.
    fn noisy(mut self, noisy: bool) -> Self {
        self.noisy = noisy;
        self
    }

    fn met(&self) -> Option<bool> {
        self.target.map(|t| match t.cmp {
            Cmp::AtMost => self.value <= t.limit,
            Cmp::AtLeast => self.value >= t.limit,
        })
    }

    fn verdict(&self) -> &'static str {
        match (self.met(), self.noisy) {
            (None, _) => "",
            (Some(true), false) => "met",
            (Some(false), false) => "MISSED",
            (Some(true), true) => "met, noisy",
            (Some(false), true) => "MISSED, noisy",
        }
    }

    fn to_json(&self) -> Value {
        json!({
            "benchmark": self.bench,
            "metric": self.metric,
            "value": self.value,
            "unit": self.unit,
            "shown": self.shown,
            "target": self.target.map(|t| t.text),
            "met": self.met(),
            "noisy": self.noisy,
        })
    }
}

/// What one benchmark measured.
#[derive(Debug)]
struct Report {
    rows: Vec<Row>,
    /// Everything else worth keeping: samples, per-run figures.
    data: Value,
}

fn run(filter: &[String]) -> Result<()> {
    let cfg = Config::from_env(filter);
    if let Some(unknown) = cfg.only.iter().find(|o| !BENCHMARKS.contains(&o.as_str())) {
        bail!(
            "no benchmark {unknown:?}; there are: {}",
            BENCHMARKS.join(", ")
        );
    }
    let env = Env::new()?;
    let machine = machine();
    eprintln!(
        "bench: {}; binaries in {}; scratch in {}",
        machine["summary"].as_str().unwrap_or_default(),
        env.bin_dir.display(),
        env.work.path().display()
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let started = Instant::now();
    let mut rows = Vec::new();
    let mut errors = Vec::new();
    let mut written = Vec::new();
    for name in BENCHMARKS.into_iter().filter(|n| cfg.selected(n)) {
        eprintln!("==> {name}");
        let clock = Instant::now();
        let outcome = run_one(&runtime, name, &cfg, &env);
        let seconds = clock.elapsed().as_secs_f64();
        let file = env.out_dir.join(format!("{name}.json"));
        let json = match outcome {
            Ok(report) => {
                for row in &report.rows {
                    eprintln!(
                        "    {:<58} {:>14}  {}",
                        row.metric,
                        row.shown,
                        row.verdict()
                    );
                }
                let json = json!({
                    "benchmark": name,
                    "machine": machine,
                    "config": cfg.to_json(),
                    "elapsedSeconds": seconds,
                    "rows": report.rows.iter().map(Row::to_json).collect::<Vec<_>>(),
                    "data": report.data,
                });
                rows.extend(report.rows);
                json
            }
            Err(e) => {
                eprintln!("    ERROR: {e:#}");
                errors.push(format!("{name}: {e:#}"));
                json!({ "benchmark": name, "machine": machine, "error": format!("{e:#}") })
            }
        };
        write_json(&file, &json)?;
        written.push(file);
        eprintln!("    ({seconds:.1} s)");
    }
    let total = started.elapsed().as_secs_f64();
    if std::env::var_os("BENCH_KEEP").is_some_and(|v| !v.is_empty()) {
        let kept = env.work.keep();
        eprintln!("bench: kept the scratch folder {}", kept.display());
    } else {
        eprintln!("bench: removing the scratch folder");
        let _ = env.work.close();
        // Clean inode tables: ext4 then forgets the freed inodes after 60 s, not 360 s.
        settle_disk();
        let _ = fs::write(env.out_dir.join(CLEANUP_STAMP), unix_seconds().to_string());
    }
    let table = table(&rows, &errors);
    println!();
    println!("{}", machine["summary"].as_str().unwrap_or_default());
    println!("{table}");
    println!("{NOISE_NOTE}");
    println!("Benchmarks took {total:.0} s.");
    let summary = env.out_dir.join("summary.json");
    write_json(
        &summary,
        &json!({
            "machine": machine,
            "config": cfg.to_json(),
            "elapsedSeconds": total,
            "rows": rows.iter().map(Row::to_json).collect::<Vec<_>>(),
            "errors": errors,
            "missed": rows.iter().filter(|r| r.met() == Some(false)).map(|r| r.metric.clone()).collect::<Vec<_>>(),
            "notes": [NOISE_NOTE],
        }),
    )?;
    written.push(summary);
    let readme = env.out_dir.join("README-performance.md");
    fs::write(&readme, performance_section(&machine, &rows, &errors, &cfg))
        .with_context(|| format!("writing {}", readme.display()))?;
    written.push(readme);
    for file in written {
        println!("wrote {}", file.display());
    }
    Ok(())
}

const NOISE_NOTE: &str = "Disk figures (staging, sync-scaling) are noisy on this shared virtual \
disk (single copies of one tree ranged 109-1,252 ms in probes); caches cannot be dropped. Each \
comparison is made in one run (staging interleaved ABBA; sync-scaling with every cp -a before \
the runner, whose workspace deletions would slow later copies), each timed copy starts after \
sync(2) with warm \
free memory (this VM hands freed memory back to the host after ~2 s; a 200 MiB copy into such \
pages took 440 ms instead of 63 ms), in a folder of its own made before anything was deleted \
(this ext4 has no journal, and then skips inodes freed in the last 60 s on every allocation: a \
100,000-file copy where another had just been deleted took 22-28 s instead of 2-3 s). Large \
deletions in the 6 minutes before a run slow down either side at random; such a comparison is \
marked noisy. The bench waits 6 minutes after its own previous run's cleanup.";

/// Where the end of the last run's cleanup is recorded (Unix seconds), in `target/bench/`.
const CLEANUP_STAMP: &str = ".last-cleanup";
/// How long after that cleanup the disk benchmarks wait (`BENCH_SETTLE_SECS` overrides it):
/// ext4 without a journal slows down allocations near inodes freed in the last 60 s, and
/// 360 s while their inode table block is dirty — which allocating next to them makes it
/// (see [`spread_out`]). Two runs in a row were disturbed with 90 s.
const AFTER_CLEANUP: u64 = 360;

/// Whether a comparison's samples were disturbed: on a quiet disk, the repetitions of either
/// side stay within 10 % of each other here; the inode and memory effects described at
/// [`spread_out`] and [`warm_memory`] made single ones 1.5–5× slower. One slow repetition does
/// not move a median; more than a quarter of them do.
fn disturbed(samples: &[f64]) -> bool {
    let fastest = min(samples);
    let slow = samples.iter().filter(|&&v| v > fastest * 1.5).count();
    fastest > 0.0 && slow * 4 > samples.len()
}

fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Waits until the previous run's cleanup is [`AFTER_CLEANUP`] seconds old.
fn wait_after_last_cleanup(env: &Env) {
    let Some(done) = fs::read_to_string(env.out_dir.join(CLEANUP_STAMP))
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
    else {
        return;
    };
    let settle = std::env::var("BENCH_SETTLE_SECS")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(AFTER_CLEANUP);
    let left = (done + settle).saturating_sub(unix_seconds());
    if left > 0 {
        eprintln!(
            "    waiting {left} s: the last run deleted its trees {} s ago, and this ext4 \
             slows down allocations near inodes freed in the last 6 minutes \
             (BENCH_SETTLE_SECS=0 skips the wait)",
            unix_seconds().saturating_sub(done)
        );
        std::thread::sleep(Duration::from_secs(left));
    }
}

/// Runs one benchmark. The harness fails by panicking, as a test should; such a panic fails
/// this benchmark as an error does (after the default hook has printed it), and the others
/// still run.
fn run_one(
    runtime: &tokio::runtime::Runtime,
    name: &str,
    cfg: &Config,
    env: &Env,
) -> Result<Report> {
    std::panic::catch_unwind(AssertUnwindSafe(|| {
        runtime.block_on(run_benchmark(name, cfg, env))
    }))
    .unwrap_or_else(|panic| {
        let message = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("a panic without a message");
        Err(anyhow!("panicked: {message}"))
    })
}

async fn run_benchmark(name: &str, cfg: &Config, env: &Env) -> Result<Report> {
    match name {
        "dispatch" => dispatch(cfg, env).await,
        "throughput" => throughput(cfg, env).await,
        "memory" => memory(cfg, env).await,
        "log-latency" => log_latency(cfg, env).await,
        "staging" => staging(cfg, env),
        "sync-scaling" => sync_scaling(cfg, env),
        "share" => share(cfg, env).await,
        _ => bail!("no benchmark {name}"),
    }
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value).context("encoding JSON")?;
    text.push('\n');
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// The plain-text table printed at the end.
fn table(rows: &[Row], errors: &[String]) -> String {
    let header = ["benchmark", "measurement", "measured", "target", "result"];
    let cells: Vec<[String; 5]> = rows
        .iter()
        .map(|r| {
            [
                r.bench.to_owned(),
                r.metric.clone(),
                r.shown.clone(),
                r.target.map(|t| t.text.to_owned()).unwrap_or_default(),
                r.verdict().to_owned(),
            ]
        })
        .collect();
    let mut widths = header.map(|h| h.chars().count());
    for row in &cells {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let mut out = String::new();
        for (i, (cell, width)) in cells.iter().zip(widths).enumerate() {
            let pad = width - cell.chars().count();
            // Numbers right-aligned, words left-aligned.
            if i == 2 {
                let _ = write!(out, "{}{cell}  ", " ".repeat(pad));
            } else {
                let _ = write!(out, "{cell}{}  ", " ".repeat(pad));
            }
        }
        out.trim_end().to_owned()
    };
    let mut out = String::new();
    let _ = writeln!(out, "{}", line(&header.map(ToOwned::to_owned)));
    let _ = writeln!(
        out,
        "{}",
        widths.map(|w| "-".repeat(w)).join("  ").trim_end()
    );
    for row in &cells {
        let _ = writeln!(out, "{}", line(row));
    }
    for error in errors {
        let _ = writeln!(out, "ERROR {error}");
    }
    out
}

/// The ready-to-paste "Performance" section of the README.
fn performance_section(machine: &Value, rows: &[Row], errors: &[String], cfg: &Config) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "## Performance\n");
    let _ = writeln!(
        out,
        "Measured with `scripts/bench` on {} (release build, nats-server {} on loopback, as root, \
         so runners drop to a uid of their own). Each figure is a median over repeated runs (unless it \
         says fastest or p90/p99); each comparison is measured in the same run.\n",
        machine["summary"].as_str().unwrap_or_default(),
        machine["natsServer"].as_str().unwrap_or("?"),
    );
    let _ = writeln!(out, "| benchmark | measurement | measured | target | |");
    let _ = writeln!(out, "|---|---|---:|---|---|");
    for r in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} |",
            r.bench,
            r.metric,
            r.shown,
            r.target.map(|t| t.text).unwrap_or_default(),
            r.verdict()
        );
    }
    for error in errors {
        let _ = writeln!(out, "| error | {error} | | | |");
    }
    let _ = write!(
        out,
        "
What the rows mean:

- **dispatch**: a controller publishes `{{\"id\"}}` on `jobs.pending` (JetStream, waiting for the
  stream's ack) and waits for `jobs.results.{{id}}`; one trivial job (`true`) at a time,
  {dispatch} jobs, `--concurrency 1`. The *floor* is what any design must pay: one
  `/bin/sh -c true` spawn plus one NATS request/reply round trip on loopback, each measured
  {dispatch} times interleaved with the jobs. *Overhead* = median latency − floor.
- **throughput**: {burst} trivial jobs published at once; jobs/s from the first publish to
  the last result; a fresh server and supervisor for each burst, {reps} bursts per concurrency,
  alternating.
- **memory**: the supervisor's `VmRSS` from `/proc/PID/status` when idle after start, after 100
  and after {mem} jobs (bursts at `--concurrency 2`, read once idle again), how much of that
  last figure is heap and stacks (`RssAnon`; the rest is code and libraries), its `VmHWM`, and the
  growth per job between 100 and {mem} jobs. The runner's peak (`VmHWM`, read by a second step
  with `grep VmHWM /proc/$PPID/status`) after a step printing 300 MB to its log, against a
  step printing one line.
- **log-latency**: a step prints `date +%s%N` every 20 ms; the bench polls
  `results/step_0.log` every millisecond and records arrival − written time per line.
- **staging**: a job folder of {files} × 4 KiB files plus one {big} MiB file and the step
  `true`, run with `nats-fs-runner --job DIR --workspaces-dir W`; its staging + sync time from
  `results/result.json` (`timing.stageMs + timing.syncMs`) against `cp -a` of the same tree to
  a fresh folder on the same filesystem, {stage_reps} times each, interleaved (ABBA). The
  runner's end-to-end wall time (process start to exit, including removing the workspace) is
  shown too, and the ratio of the fastest run of each.
- **sync-scaling**: a {scale}-file job folder ({scale_dirs} folders) whose step modifies 10
  files: the runner's `timing.syncMs` (finding the 10 among {scale} and copying them to
  `results/`) against `cp -a` of the whole job folder, {scale_reps} times each in the same run,
  every `cp -a` first (the runner deletes a {scale}-file workspace after each run, which
  would slow down the copies after it, see below; the sync itself creates only 10 files);
  also against the fastest `cp -a`, which is the harder comparison.
- **share**: the jobs folder on sshfs over loopback to a private `sshd` (every file system call
  an SFTP round trip, as on a network share): a job folder of {share_files} × 4 KiB files plus
  one {share_big} MiB file and the step `true`, published and waited for (publish → result,
  with `--share-parallelism` at its default and at 1), against `cp -a` of such a folder off the
  same share to a local folder, {share_reps} times each, interleaved, each run on a folder of
  its own (sshfs caches what it has listed). The workspaces and the copies are on a tmpfs:
  this disk slows down for minutes after deletions (see below), and every job's workspace is
  deleted after it; on a tmpfs the share's side is what is compared. And a step's lines (`date +%s%N` every 20 ms) from
  the moment they are written to the moment they are readable on the exported folder itself,
  as another host would read them. Needs root, `sshfs` and `sshd` (scripts/test installs them).

Disk figures are noisy on this shared virtual disk (single copies of the same tree ranged from
109 to 1,252 ms) and caches cannot be dropped, so each comparison is made in one run as
described above, the bench warns when the disk is busy (`/proc/pressure/io`), and every timed
copy (the runner's or `cp`'s) starts on the same footing:
- after `sync`, so that it does not pay for the previous copy's writeback;
- right after the bench touched and freed {warm} MiB of memory: this VM's balloon hands free
  memory back to the host about 2 s after it is freed (free page reporting), and the first touch
  of such a page faults in the host; a 200 MiB copy into those pages took 440 ms instead of
  63 ms, whichever program made it;
- into a folder of its own, made before anything was deleted, under a `chattr +T` folder, and
  `cp`'s copies are kept until the comparison ends: this ext4 has no journal, and without one
  ext4 skips, on every inode allocation, the inodes freed in the last 60 s — 360 s while
  their inode table block is dirty — (`recently_deleted()` in fs/ext4/ialloc.c), so a
  100,000-file copy made where another had just been deleted took 22–28 s instead of 2–3 s,
  whichever program made it. For the same reason the bench deletes its trees at the end, then
  `sync`s, and a run started less than {after} s after the last one's cleanup waits before its
  disk benchmarks (`BENCH_SETTLE_SECS=0` skips the wait). Other large deletions in the 6
  minutes before a run (a `cargo clean`, a test suite) slow down either side at random: when
  more than a quarter of either side's repetitions take over 1.5× its fastest (a quiet disk
  keeps them within 1.1×), the verdict says *noisy*; run again on a quiet machine.

Reproduce: `scripts/bench` (builds the release binaries, then `cargo bench --bench worker`);
it prints this table and writes `target/bench/*.json`. `BENCH_ONLY=dispatch,memory` runs a
subset; `BENCH_DISPATCH_JOBS`, `BENCH_THROUGHPUT_JOBS`, `BENCH_THROUGHPUT_REPS`,
`BENCH_MEMORY_JOBS`, `BENCH_STAGE_REPS`, `BENCH_SCALE_FILES`, `BENCH_SCALE_REPS`,
`BENCH_LOG_LINES`, `BENCH_WARM_MIB`, `BENCH_SETTLE_SECS`, … change the counts.
",
        dispatch = cfg.dispatch_jobs,
        burst = cfg.throughput_jobs,
        reps = cfg.throughput_reps,
        mem = cfg.memory_jobs,
        files = cfg.stage_files,
        big = cfg.stage_big_mib,
        stage_reps = cfg.stage_reps,
        scale = cfg.scale_files,
        scale_dirs = cfg.scale_dirs,
        scale_reps = cfg.scale_reps,
        warm = cfg.warm_mib,
        after = AFTER_CLEANUP,
        share_files = cfg.share_files,
        share_big = cfg.share_big_mib,
        share_reps = cfg.share_reps,
    );
    out
}

/// What machine this ran on.
fn machine() -> Value {
    let nproc = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
                .map(|(_, model)| model.trim().to_owned())
        })
        .unwrap_or_default();
    let mem_gib = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map_or(0.0, |kib| kib as f64 / 1024.0 / 1024.0);
    let nats = Command::new(support::nats_server())
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .map(|v| v.trim_start_matches("nats-server: ").to_owned())
        .unwrap_or_default();
    let git = Command::new("git")
        .args(["describe", "--always", "--dirty"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let root = nix::unistd::geteuid().is_root();
    json!({
        "summary": format!("{nproc} CPUs ({cpu}), {mem_gib:.0} GiB, Linux {kernel}"),
        "nproc": nproc,
        "cpu": cpu,
        "memGiB": mem_gib,
        "kernel": kernel,
        "natsServer": nats,
        "git": git,
        "root": root,
    })
}

// ---------------------------------------------------------------------------------------------
// Statistics.

fn median(samples: &[f64]) -> f64 {
    let mut v = samples.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => f64::midpoint(v[n / 2 - 1], v[n / 2]),
    }
}

/// The nearest-rank percentile `pct` (0–100).
fn percentile(samples: &[f64], pct: usize) -> f64 {
    let mut v = samples.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let rank = (pct * v.len()).div_ceil(100).clamp(1, v.len());
    v[rank - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn round3(samples: &[f64]) -> Vec<f64> {
    samples
        .iter()
        .map(|v| (v * 1000.0).round() / 1000.0)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Processes: the supervisor, and a controller's connection (nats-server comes from the harness).

/// Starts a supervisor of the release build with `concurrency` slots, against `url` and `jobs`;
/// its log and workspaces go into a scratch folder `supervisor-{name}.<random>`.
fn start_supervisor(
    env: &Env,
    url: &str,
    jobs: &Jobs,
    concurrency: usize,
    name: &str,
) -> Result<Supervisor> {
    start_supervisor_with(env, url, jobs, concurrency, name, &[])
}

/// [`start_supervisor`] with `extra` options.
fn start_supervisor_with(
    env: &Env,
    url: &str,
    jobs: &Jobs,
    concurrency: usize,
    name: &str,
    extra: &[&str],
) -> Result<Supervisor> {
    let dir = env.dir(&format!("supervisor-{name}"))?;
    // Created by the supervisor.
    let workspaces = dir.path().join("workspaces");
    let log = dir.path().join("supervisor.log");
    let mut command = support::supervisor_command(
        &env.bin("nats-fs-supervisor"),
        url,
        jobs.path(),
        &workspaces,
    );
    command
        .args(["--id", "bench", "--concurrency"])
        .arg(concurrency.to_string())
        .args(["--ack-wait", "30s", "--kill-grace", "2s"])
        .args(["--drain-timeout", "10s", "--log-format", "text"])
        .args(extra)
        .env_remove("RUST_LOG");
    if let Ok(filter) = std::env::var("BENCH_SUPERVISOR_LOG") {
        command.env("RUST_LOG", filter);
    }
    if support::is_root() {
        // As a host is meant to run: one identity per slot, from a pool used by nothing
        // else (every process of a job's uid is killed when it ends).
        command.args(["--run-as", "3900000-3900015"]);
    }
    Ok(Supervisor::launch(command, dir, workspaces, log))
}

/// A controller's connection: publishes requests, receives results.
struct Controller {
    nats: Nats,
}

impl Controller {
    async fn connect(url: &str) -> Self {
        Self {
            nats: Nats::connect(url).await,
        }
    }

    /// Publishes `{"id": id}` on `jobs.pending` and waits for the stream's ack.
    async fn submit(&self, id: &str) {
        self.nats.submit_id(id).await;
    }

    /// The next result message: `(id, message)`.
    async fn next_result(&mut self, within: Duration) -> Result<(String, Value)> {
        let msg = tokio::time::timeout(within, self.nats.results.next())
            .await
            .with_context(|| format!("no result message within {within:?}"))?
            .context("the results subscription closed")?;
        let value: Value =
            serde_json::from_slice(&msg.payload).context("a result that is not JSON")?;
        let id = value["id"].as_str().unwrap_or_default().to_owned();
        Ok((id, value))
    }

    /// Waits for the result of `id`, skipping others.
    async fn result_of(&mut self, id: &str, within: Duration) -> Result<Value> {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let (got, value) = self
                .next_result(left)
                .await
                .with_context(|| format!("waiting for the result of {id}"))?;
            if got == id {
                return Ok(value);
            }
        }
    }

    /// Waits for results of `n` distinct jobs; returns how many were not `success`.
    async fn results(&mut self, n: usize, within: Duration) -> Result<usize> {
        Ok(self.timed_results(n, within).await?.0)
    }

    /// Waits for results of `n` distinct jobs; returns how many were not `success`, and when
    /// each arrived.
    async fn timed_results(&mut self, n: usize, within: Duration) -> Result<(usize, Vec<Instant>)> {
        let deadline = Instant::now() + within;
        let mut seen = HashSet::with_capacity(n);
        let mut arrivals = Vec::with_capacity(n);
        let mut failed = 0;
        while seen.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            let (id, value) = self
                .next_result(left)
                .await
                .with_context(|| format!("after {} of {n} results", seen.len()))?;
            if seen.insert(id) {
                arrivals.push(Instant::now());
                if value["status"] != "success" {
                    failed += 1;
                }
            }
        }
        Ok((failed, arrivals))
    }

    /// Publishes jobs `ids` all at once (every publish sent before any stream ack is awaited).
    async fn burst(&self, ids: &[String]) -> Result<()> {
        // In chunks: async-nats holds at most 5,000 unanswered publishes (its default), and
        // the 5,001st would wait forever for an answer nobody is collecting.
        for chunk in ids.chunks(1000) {
            let mut acks = Vec::with_capacity(chunk.len());
            for id in chunk {
                acks.push(
                    self.nats
                        .js
                        .publish("jobs.pending", json!({ "id": id }).to_string().into())
                        .await
                        .context("publishing a job")?,
                );
            }
            for ack in acks {
                ack.await.context("the stream did not store a job")?;
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Dispatch latency.

#[allow(clippy::too_many_lines)] // One benchmark, best read top to bottom.
async fn dispatch(cfg: &Config, env: &Env) -> Result<Report> {
    const WARMUP: usize = 5;
    let n = cfg.dispatch_jobs;
    let jobs = Jobs::in_dir(env.dir("dispatch-jobs")?);
    let ids: Vec<String> = (0..WARMUP + n).map(|i| format!("d-{i:04}")).collect();
    for id in &ids {
        jobs.add(id, &json!({ "steps": ["true"] }));
    }
    let server = Server::start_in(env.dir("dispatch-nats")?, &[]);
    let mut supervisor = start_supervisor(env, &server.url, &jobs, 1, "dispatch")?;
    supervisor.ready().await;
    let mut controller = Controller::connect(&server.url).await;

    // The floor's NATS half: a responder on a connection of its own.
    let responder = async_nats::connect(&server.url).await?;
    let mut echo = responder.subscribe("bench.echo").await?;
    responder.flush().await?;
    let echo_task = tokio::spawn(async move {
        while let Some(msg) = echo.next().await {
            if let Some(reply) = msg.reply {
                let _ = responder.publish(reply, msg.payload).await;
            }
        }
    });

    let (mut job_ms, mut spawn_ms, mut rtt_ms, mut runner_ms) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let mut failed = 0;
    for (i, id) in ids.iter().enumerate() {
        let clock = Instant::now();
        controller.submit(id).await;
        let result = controller.result_of(id, SOON).await?;
        let job = ms(clock.elapsed());

        let clock = Instant::now();
        let status = Command::new("/bin/sh")
            .args(["-c", "true"])
            .status()
            .context("spawning /bin/sh")?;
        let spawn = ms(clock.elapsed());
        ensure!(status.success(), "/bin/sh -c true failed");

        let clock = Instant::now();
        controller
            .nats
            .client
            .request("bench.echo", "ping".into())
            .await
            .context("NATS request")?;
        let rtt = ms(clock.elapsed());

        if i >= WARMUP {
            job_ms.push(job);
            spawn_ms.push(spawn);
            rtt_ms.push(rtt);
            runner_ms.push(result["durationMs"].as_f64().unwrap_or(f64::NAN));
            if result["status"] != "success" {
                failed += 1;
            }
        }
    }
    echo_task.abort();
    let (rss, hwm) = supervisor.memory();
    supervisor.stop();
    ensure!(failed == 0, "{failed} of {n} dispatch jobs did not succeed");

    let floor = median(&spawn_ms) + median(&rtt_ms);
    let latency = median(&job_ms);
    let b = "dispatch";
    let rows = vec![
        Row::new(
            b,
            "latency, median (publish → result)",
            latency,
            "ms",
            2,
            None,
        ),
        Row::new(b, "latency, p90", percentile(&job_ms, 90), "ms", 2, None),
        Row::new(
            b,
            "floor: /bin/sh -c true + NATS round trip",
            floor,
            "ms",
            2,
            None,
        ),
        Row::new(
            b,
            "overhead = median − floor",
            latency - floor,
            "ms",
            2,
            Some(at_most(5.0, "≤ 5 ms")),
        ),
        Row::new(
            b,
            "  of which the runner's own run (durationMs)",
            median(&runner_ms),
            "ms",
            1,
            None,
        ),
    ];
    Ok(Report {
        rows,
        data: json!({
            "jobs": n,
            "warmup": WARMUP,
            "medianMs": { "job": latency, "spawnSh": median(&spawn_ms), "natsRoundTrip": median(&rtt_ms),
                          "floor": floor, "runnerDurationMs": median(&runner_ms) },
            "p90Ms": { "job": percentile(&job_ms, 90), "spawnSh": percentile(&spawn_ms, 90),
                       "natsRoundTrip": percentile(&rtt_ms, 90) },
            "supervisorKiB": { "rss": rss, "hwm": hwm },
            "samplesMs": { "job": round3(&job_ms), "spawnSh": round3(&spawn_ms),
                           "natsRoundTrip": round3(&rtt_ms), "runnerDuration": runner_ms },
        }),
    })
}

// ---------------------------------------------------------------------------------------------
// 2. Throughput.

/// A fresh jobs folder with `n` trivial job folders `b-0000`… (fresh for each burst: each
/// burst runs against a fresh server, whose stream sequences start at 1 again, and a
/// `result.json` recording the same sequence would make the supervisor republish it instead of
/// running the job, as it does for a redelivery after a lost ack).
fn burst_jobs(env: &Env, n: usize) -> Result<(Jobs, Vec<String>)> {
    let jobs = Jobs::in_dir(env.dir("burst-jobs")?);
    let ids: Vec<String> = (0..n).map(|i| format!("b-{i:04}")).collect();
    for id in &ids {
        jobs.add(id, &json!({ "steps": ["true"] }));
    }
    Ok((jobs, ids))
}

async fn throughput(cfg: &Config, env: &Env) -> Result<Report> {
    let n = cfg.throughput_jobs;
    let concurrencies = [2usize, 8];
    let mut runs = Vec::new();
    let mut rates: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for rep in 0..cfg.throughput_reps {
        for (slot, &concurrency) in concurrencies.iter().enumerate() {
            let name = format!("throughput-c{concurrency}-{rep}");
            let (jobs, ids) = burst_jobs(env, n)?;
            let server = Server::start_in(env.dir(&format!("{name}-nats"))?, &[]);
            let mut supervisor = start_supervisor(env, &server.url, &jobs, concurrency, &name)?;
            supervisor.ready().await;
            let mut controller = Controller::connect(&server.url).await;
            let clock = Instant::now();
            controller.burst(&ids).await?;
            let published = ms(clock.elapsed());
            let (failed, arrivals) = controller
                .timed_results(n, SOON * 5)
                .await
                .with_context(|| format!("concurrency {concurrency}"))?;
            let elapsed = clock.elapsed().as_secs_f64();
            // Jobs/s over the first and the last fifth of the results: does it slow down?
            let fifth = (n / 5).max(1);
            let since = |a: usize, b: usize| arrivals[b].duration_since(arrivals[a]).as_secs_f64();
            let first_fifth =
                fifth as f64 / arrivals[fifth - 1].duration_since(clock).as_secs_f64();
            let last_fifth = (fifth - 1) as f64 / since(n - fifth, n - 1);
            let (rss, hwm) = supervisor.memory();
            supervisor.stop();
            drop(server);
            ensure!(failed == 0, "{failed} of {n} jobs did not succeed");
            ensure!(
                !supervisor.log().contains("already finished"),
                "the supervisor republished old results instead of running the jobs"
            );
            let rate = n as f64 / elapsed;
            eprintln!(
                "    concurrency {concurrency}, burst {rep}: {rate:.1} jobs/s \
                 (first fifth {first_fifth:.0}/s, last fifth {last_fifth:.0}/s)"
            );
            rates[slot].push(rate);
            runs.push(json!({
                "concurrency": concurrency, "rep": rep, "jobsPerSecond": rate, "seconds": elapsed,
                "jobsPerSecondFirstFifth": first_fifth, "jobsPerSecondLastFifth": last_fifth,
                "publishMs": published, "supervisorKiB": { "rss": rss, "hwm": hwm },
            }));
        }
    }
    let b = "throughput";
    let rows = vec![
        Row::new(
            b,
            format!("{n} jobs at --concurrency 2"),
            median(&rates[0]),
            "jobs/s",
            1,
            Some(at_least(200.0, "≥ 200 jobs/s")),
        ),
        Row::new(
            b,
            format!("{n} jobs at --concurrency 8"),
            median(&rates[1]),
            "jobs/s",
            1,
            None,
        ),
    ];
    Ok(Report {
        rows,
        data: json!({ "jobs": n, "runs": runs,
                      "medianJobsPerSecond": { "2": median(&rates[0]), "8": median(&rates[1]) } }),
    })
}

// ---------------------------------------------------------------------------------------------
// 5. Memory.

async fn memory(cfg: &Config, env: &Env) -> Result<Report> {
    let n = cfg.memory_jobs.max(101);
    let (jobs, ids) = burst_jobs(env, n)?;
    let server = Server::start_in(env.dir("memory-nats")?, &[]);
    let mut supervisor = start_supervisor(env, &server.url, &jobs, 2, "memory")?;
    supervisor.ready().await;
    let mut controller = Controller::connect(&server.url).await;
    // Idle: connected, consumer set up, pulling, nothing run yet.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (idle, _) = supervisor.memory();
    let settle = Duration::from_millis(500);

    controller.burst(&ids[..100]).await?;
    let mut failed = controller.results(100, SOON * 2).await?;
    tokio::time::sleep(settle).await;
    let (after_100, _) = supervisor.memory();
    controller.burst(&ids[100..]).await?;
    failed += controller.results(n - 100, SOON * 5).await?;
    tokio::time::sleep(settle).await;
    let (after_n, hwm) = supervisor.memory();
    let anonymous = supervisor.anonymous_kib();
    ensure!(failed == 0, "{failed} of {n} jobs did not succeed");
    let growth = (after_n as f64 - after_100 as f64) / (n - 100) as f64;

    let (quiet_kib, loud_kib) = runner_peaks(cfg, &jobs, &mut controller).await?;
    supervisor.stop();

    let mib = |kib: u64| kib as f64 / 1024.0;
    let b = "memory";
    let rows = vec![
        Row::new(
            b,
            "supervisor RSS, idle after start",
            mib(idle),
            "MiB",
            1,
            None,
        ),
        Row::new(
            b,
            "supervisor RSS after 100 jobs",
            mib(after_100),
            "MiB",
            1,
            None,
        ),
        Row::new(
            b,
            format!("supervisor RSS after {n} jobs"),
            mib(after_n),
            "MiB",
            1,
            Some(at_most(16.0, "≤ 16 MiB")),
        ),
        Row::new(
            b,
            "  of which heap and stacks (RssAnon)",
            mib(anonymous),
            "MiB",
            1,
            None,
        ),
        Row::new(
            b,
            format!("supervisor RSS growth per job (100 → {n})"),
            growth,
            "KiB",
            2,
            Some(at_most(1.0, "none (≤ 1 KiB)")),
        ),
        Row::new(b, "supervisor peak (VmHWM)", mib(hwm), "MiB", 1, None),
        Row::new(
            b,
            "runner peak (VmHWM), step printing one line",
            median(&quiet_kib) / 1024.0,
            "MiB",
            1,
            None,
        ),
        Row::new(
            b,
            format!(
                "runner peak (VmHWM), step printing {} MB",
                cfg.runner_memory_bytes / 1_000_000
            ),
            median(&loud_kib) / 1024.0,
            "MiB",
            1,
            Some(at_most(8.0, "≤ 8 MiB")),
        ),
    ];
    Ok(Report {
        rows,
        data: json!({
            "supervisorKiB": { "idle": idle, "after100": after_100, "afterAll": after_n, "anonymousAfterAll": anonymous, "hwm": hwm,
                               "jobs": n, "growthKiBPerJob": growth },
            "runnerPeakKiB": { "quiet": quiet_kib, "loud": loud_kib },
        }),
    })
}

/// The runner's peak memory (`VmHWM`, read by a second step from its parent's status) after a
/// quiet step and after a loud one, `runner_memory_reps` times each, interleaved: `(quiet, loud)`
/// in KiB.
async fn runner_peaks(
    cfg: &Config,
    jobs: &Jobs,
    controller: &mut Controller,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let loud = format!(
        "head -c {} /dev/zero | tr '\\0' 'x'",
        cfg.runner_memory_bytes
    );
    let mut quiet_kib = Vec::new();
    let mut loud_kib = Vec::new();
    for rep in 0..cfg.runner_memory_reps {
        for (label, step) in [("quiet", "echo small"), ("loud", loud.as_str())] {
            let id = format!("rss-{label}-{rep}");
            let dir = jobs.add(
                &id,
                &json!({ "steps": [step, "grep VmHWM /proc/$PPID/status"] }),
            );
            let clock = Instant::now();
            controller.submit(&id).await;
            let result = controller.result_of(&id, SOON * 2).await?;
            ensure!(result["status"] == "success", "{id}: {result}");
            let log = fs::read_to_string(dir.join("results/step_1.log")).unwrap_or_default();
            let kib = support::parse_kib(&log, "VmHWM")
                .with_context(|| format!("no VmHWM in {log:?}"))?;
            if label == "loud" {
                let printed = fs::metadata(dir.join("results/step_0.log")).map_or(0, |m| m.len());
                ensure!(
                    printed == cfg.runner_memory_bytes,
                    "the loud step's log has {printed} bytes"
                );
                eprintln!(
                    "    runner peak after {} MB: {kib} KiB ({:.1} s)",
                    cfg.runner_memory_bytes / 1_000_000,
                    clock.elapsed().as_secs_f64()
                );
                loud_kib.push(kib as f64);
            } else {
                quiet_kib.push(kib as f64);
            }
            fs::remove_dir_all(&dir).context("removing a job folder")?;
        }
    }
    Ok((quiet_kib, loud_kib))
}

// ---------------------------------------------------------------------------------------------
// 6. Log latency.

async fn log_latency(cfg: &Config, env: &Env) -> Result<Report> {
    let lines = cfg.log_lines;
    let jobs = Jobs::in_dir(env.dir("log-jobs")?);
    let server = Server::start_in(env.dir("log-nats")?, &[]);
    let mut supervisor = start_supervisor(env, &server.url, &jobs, 1, "log")?;
    supervisor.ready().await;
    let mut controller = Controller::connect(&server.url).await;
    let script =
        format!("i=0; while [ $i -lt {lines} ]; do date +%s%N; sleep 0.02; i=$((i+1)); done");
    let mut latencies = Vec::new();
    for rep in 0..cfg.log_reps {
        let id = format!("log-{rep}");
        let dir = jobs.add(&id, &json!({ "steps": [script] }));
        let log = dir.join("results/step_0.log");
        // Poll on a thread of its own, so nothing in this runtime delays a read.
        let poller = tokio::task::spawn_blocking(move || poll_log(&log, lines, SOON));
        controller.submit(&id).await;
        let result = controller.result_of(&id, SOON).await?;
        ensure!(result["status"] == "success", "{id}: {result}");
        let samples = poller.await.context("the log poller")??;
        latencies.extend(samples);
    }
    supervisor.stop();
    let b = "log-latency";
    let rows = vec![
        Row::new(
            b,
            "step writes a line → readable in step_N.log, median",
            median(&latencies),
            "ms",
            2,
            Some(at_most(50.0, "≤ 50 ms")),
        ),
        Row::new(
            b,
            "step writes a line → readable in step_N.log, p99",
            percentile(&latencies, 99),
            "ms",
            2,
            Some(at_most(50.0, "≤ 50 ms")),
        ),
    ];
    Ok(Report {
        rows,
        data: json!({ "lines": latencies.len(), "pollIntervalMs": 1,
                      "samplesMs": round3(&latencies) }),
    })
}

/// Reads `path` every millisecond until `lines` lines have arrived; returns, for each line,
/// when it was first seen minus the nanosecond timestamp it carries, in milliseconds.
fn poll_log(path: &Path, lines: usize, within: Duration) -> Result<Vec<f64>> {
    let deadline = Instant::now() + within;
    let mut latencies = Vec::with_capacity(lines);
    let mut offset = 0u64;
    let mut partial = String::new();
    let mut file: Option<fs::File> = None;
    while latencies.len() < lines {
        ensure!(
            Instant::now() < deadline,
            "only {} of {lines} lines arrived in {}",
            latencies.len(),
            path.display()
        );
        if file.is_none() {
            file = fs::File::open(path).ok();
        }
        if let Some(f) = file.as_mut() {
            let mut chunk = String::new();
            f.seek(SeekFrom::Start(offset)).context("seeking the log")?;
            let read = f.read_to_string(&mut chunk).context("reading the log")?;
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .context("the clock")?
                .as_nanos();
            offset += read as u64;
            partial.push_str(&chunk);
            while let Some(end) = partial.find('\n') {
                let line: String = partial.drain(..=end).collect();
                let written: u128 = line
                    .trim()
                    .parse()
                    .with_context(|| format!("not a timestamp: {line:?}"))?;
                let nanos = now.saturating_sub(written);
                latencies.push(nanos as f64 / 1e6);
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(latencies)
}

// ---------------------------------------------------------------------------------------------
// 3. Staging + sync, and 4. sync scaling: the runner standalone against `cp -a`.

/// Fills a file with `len` pseudo-random bytes.
fn write_data(path: &Path, len: usize, seed: &mut u64) -> Result<()> {
    let mut file =
        fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut buf = vec![0u8; len.min(1 << 20)];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len());
        for chunk in buf[..n].chunks_mut(8) {
            // xorshift64
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            let bytes = seed.to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
        file.write_all(&buf[..n])
            .with_context(|| format!("writing {}", path.display()))?;
        left -= n;
    }
    Ok(())
}

/// The share of the last 10 s in which some task waited for I/O (`/proc/pressure/io`), in %.
fn io_pressure() -> Option<f64> {
    let text = fs::read_to_string("/proc/pressure/io").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("some "))?
        .split_whitespace()
        .find_map(|f| f.strip_prefix("avg10="))?
        .parse()
        .ok()
}

/// Says how busy the disk is before a disk benchmark, and warns when it is busy.
fn report_io_pressure() -> Option<f64> {
    let pressure = io_pressure();
    if let Some(p) = pressure {
        if p > 10.0 {
            eprintln!(
                "    WARNING: the disk is busy (I/O pressure {p:.0} % over the last 10 s): \
                 these figures will be inflated; let the machine settle and run again"
            );
        }
    }
    pressure
}

/// Says so when either side of a comparison was disturbed; returns whether it was.
fn warn_if_disturbed(copies: &[f64], runner: &[f64]) -> bool {
    let spread = |v: &[f64]| v.iter().copied().fold(0.0, f64::max) / min(v);
    let noisy = disturbed(copies) || disturbed(runner);
    if noisy {
        eprintln!(
            "    WARNING: disturbed: more than a quarter of the repetitions took over 1.5× the \
             fastest (slowest: {:.1}× for cp -a, {:.1}× for the runner; a quiet disk keeps \
             both within 1.1×). Run again on a quiet machine (no large deletions in the last \
             6 minutes).",
            spread(copies),
            spread(runner)
        );
    }
    noisy
}

fn min(samples: &[f64]) -> f64 {
    samples.iter().copied().fold(f64::INFINITY, f64::min)
}

/// Flushes dirty pages, so that a timed copy does not pay for the previous one's writeback.
fn settle_disk() {
    nix::unistd::sync();
}

/// Touches `mib` MiB of memory and frees it, right before a timed copy, so that the copy finds
/// warm free pages. This VM's balloon has free page reporting (`page_reporting_order=11`): free
/// memory is handed back to the host about 2 s after it is freed, and the first touch of such a
/// page costs a fault in the host, billed to the guest as system time. A 200 MiB copy into
/// reported pages took 440 ms, into warm ones 63 ms, whatever program made it: without this, a
/// comparison measures which program came after the other had freed its memory.
fn warm_memory(mib: usize) {
    let mut buffer = vec![0u8; mib << 20];
    for page in buffer.chunks_mut(4096) {
        page[0] = 1;
    }
    std::hint::black_box(&buffer);
}

/// What precedes every timed copy: writeback done, free memory warm.
fn prepare_copy(warm_mib: usize) {
    settle_disk();
    warm_memory(warm_mib);
}

/// `cp -a src dst` into a fresh `dst`, timed. The copy stays until the comparison is over:
/// deleting a large tree slows down every file created in its block groups for the next 60 s
/// (see [`spread_out`]).
fn time_cp(src: &Path, dst: &Path, warm_mib: usize) -> Result<f64> {
    ensure!(!dst.exists(), "{} exists", dst.display());
    // The runner does not stage results/; neither should the copy it is compared with.
    let results = src.join("results");
    if results.exists() {
        fs::remove_dir_all(&results).context("removing results/")?;
    }
    prepare_copy(warm_mib);
    let clock = Instant::now();
    let status = Command::new("cp")
        .arg("-a")
        .arg(src)
        .arg(dst)
        .status()
        .context("running cp -a")?;
    let elapsed = ms(clock.elapsed());
    ensure!(status.success(), "cp -a failed");
    settle_disk();
    Ok(elapsed)
}

/// Marks `dir` as a top of a directory hierarchy for ext4's Orlov allocator (`chattr +T`): a
/// folder made in it goes to the block group with the fewest folders, searching from a hash of
/// its name, instead of next to its parent, and what is created in that folder follows it.
///
/// Why it matters here: on an ext4 *without a journal* (these machines), every inode
/// allocation skips over the inodes freed in the last 60 s, or 360 s while their inode table
/// block is dirty (`recently_deleted()` in fs/ext4/ialloc.c), so creating a large tree in
/// block groups where one was just deleted goes quadratic: a `cp -a` of 100,000 files took
/// 22–28 s of system time instead of 2–3 s. The runner deletes its workspace after every run;
/// next to it, the next repetition would pay for that. A group just emptied has no folders
/// either, so each repetition's folder is made up front, before anything is deleted (see
/// [`compare_with_cp`]). Best effort: returns whether the flag was set.
fn spread_out(dir: &Path) -> bool {
    Command::new("chattr")
        .arg("+T")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// One standalone runner run on `job`: wall time and the manifest.
#[derive(Debug)]
struct RunnerRun {
    wall_ms: f64,
    stage_ms: f64,
    sync_ms: f64,
    duration_ms: f64,
    artifacts: usize,
}

fn time_runner(env: &Env, job: &Path, workspaces: &Path, warm_mib: usize) -> Result<RunnerRun> {
    prepare_copy(warm_mib);
    let clock = Instant::now();
    let output = Command::new(env.bin("nats-fs-runner"))
        .arg("--job")
        .arg(job)
        .arg("--workspaces-dir")
        .arg(workspaces)
        .stdin(Stdio::null())
        .output()
        .context("running nats-fs-runner")?;
    let wall_ms = ms(clock.elapsed());
    settle_disk();
    ensure!(
        output.status.success(),
        "nats-fs-runner failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let manifest: Value = serde_json::from_slice(
        &fs::read(job.join("results/result.json")).context("reading result.json")?,
    )
    .context("parsing result.json")?;
    let field = |name: &str| manifest["timing"][name].as_f64().unwrap_or(f64::NAN);
    Ok(RunnerRun {
        wall_ms,
        stage_ms: field("stageMs"),
        sync_ms: field("syncMs"),
        duration_ms: field("durationMs"),
        artifacts: manifest["artifacts"].as_array().map_or(0, Vec::len),
    })
}

/// The runner and `cp -a` on one job folder, `reps` times each.
#[derive(Debug)]
struct Comparison {
    runs: Vec<RunnerRun>,
    copies: Vec<f64>,
    /// Whether the copies and workspaces went into `chattr +T` folders, see [`spread_out`].
    spread: bool,
}

/// Runs the runner and `cp -a` `reps` times each: interleaved ABBA, or with `cp_first`, every
/// `cp -a` before the first runner run, so that none of them follows the deletion of a runner's
/// workspace (for trees so large that it slows the next ones down, see [`spread_out`]).
///
/// Each run gets a destination folder of its own, all made before anything is deleted: ext4
/// places a new folder under a `chattr +T` one in the block group with the fewest folders,
/// which is the group a tree was just deleted from, where every allocation then pays for the
/// recently freed inodes (see [`spread_out`]). Made up front, the folders land in groups that
/// are clean, one apart from the other, and each copy fills its folder's group.
fn compare_with_cp(
    env: &Env,
    job: &Path,
    reps: usize,
    warm_mib: usize,
    cp_first: bool,
    label: &str,
) -> Result<Comparison> {
    let root = env.dir(&format!("{label}-copies"))?.keep();
    let spread = spread_out(&root);
    if !spread {
        eprintln!("    (chattr +T failed: copies may pay for earlier deletions)");
    }
    let mut places = Vec::with_capacity(reps);
    for rep in 0..reps {
        let pair = (
            root.join(format!("cp-{rep}")),
            root.join(format!("runner-{rep}")),
        );
        for dir in [&pair.0, &pair.1] {
            fs::create_dir(dir).with_context(|| format!("creating {}", dir.display()))?;
            chmod(dir, 0o755)?;
        }
        places.push(pair);
    }
    let mut runs = Vec::with_capacity(reps);
    let mut cp = Vec::with_capacity(reps);
    if cp_first {
        for (rep, (cp_dir, _)) in places.iter().enumerate() {
            cp.push(time_cp(job, &cp_dir.join("copy"), warm_mib)?);
            eprintln!("    cp -a {rep}: {:.0} ms", cp[rep]);
        }
    }
    for (rep, (cp_dir, workspaces)) in places.iter().enumerate() {
        let runner_first = cp_first || rep % 2 == 1;
        if runner_first {
            runs.push(time_runner(env, job, workspaces, warm_mib)?);
        }
        if !cp_first {
            cp.push(time_cp(job, &cp_dir.join("copy"), warm_mib)?);
        }
        if !runner_first {
            runs.push(time_runner(env, job, workspaces, warm_mib)?);
        }
        let run = &runs[rep];
        eprintln!(
            "    rep {rep}: cp -a {:.0} ms; runner stage {:.0} + sync {:.0} ms, wall {:.0} ms",
            cp[rep], run.stage_ms, run.sync_ms, run.wall_ms
        );
    }
    fs::remove_dir_all(&root).context("removing the copies")?;
    Ok(Comparison {
        runs,
        copies: cp,
        spread,
    })
}

/// The staging job folder: `stage_files` files of `stage_file_bytes` in folders of 100, one
/// big file, and the step `true`.
fn make_stage_tree(cfg: &Config, job: &Path) -> Result<()> {
    make_tree(
        job,
        cfg.stage_files,
        cfg.stage_file_bytes,
        cfg.stage_big_mib,
    )
}

/// A job folder of `files` files of `file_bytes` in folders of 100, one file of `big_mib`
/// MiB, and the step `true`.
fn make_tree(job: &Path, files: usize, file_bytes: usize, big_mib: usize) -> Result<()> {
    let mut seed = 0x9E37_79B9_7F4A_7C15_u64;
    let per_dir = 100;
    for i in 0..files {
        let dir = job.join(format!("data/d{:03}", i / per_dir));
        if i % per_dir == 0 {
            fs::create_dir_all(&dir).context("creating the tree")?;
        }
        write_data(
            &dir.join(format!("f{:03}.bin", i % per_dir)),
            file_bytes,
            &mut seed,
        )?;
    }
    write_data(&job.join("big.bin"), big_mib << 20, &mut seed)?;
    fs::write(
        job.join("job.json"),
        json!({ "steps": ["true"] }).to_string(),
    )?;
    Ok(())
}

fn staging(cfg: &Config, env: &Env) -> Result<Report> {
    wait_after_last_cleanup(env);
    let pressure = report_io_pressure();
    let job = env.dir("stage-src")?.keep();
    let clock = Instant::now();
    make_stage_tree(cfg, &job)?;
    settle_disk();
    eprintln!(
        "    made {} × {} B + {} MiB in {:.1} s",
        cfg.stage_files,
        cfg.stage_file_bytes,
        cfg.stage_big_mib,
        clock.elapsed().as_secs_f64()
    );
    let Comparison {
        runs,
        copies,
        spread,
    } = compare_with_cp(env, &job, cfg.stage_reps, cfg.warm_mib, false, "stage")?;
    fs::remove_dir_all(&job).context("removing the tree")?;

    let pick = |f: fn(&RunnerRun) -> f64| runs.iter().map(f).collect::<Vec<f64>>();
    let stage_sync = pick(|r| r.stage_ms + r.sync_ms);
    let wall = pick(|r| r.wall_ms);
    let cp = median(&copies);
    let noisy = warn_if_disturbed(&copies, &stage_sync);
    let b = "staging";
    let rows = vec![
        Row::new(b, "cp -a of the tree", cp, "ms", 0, None),
        Row::new(
            b,
            "runner stage + sync (stageMs + syncMs)",
            median(&stage_sync),
            "ms",
            0,
            None,
        ),
        Row::new(
            b,
            "ratio (stage + sync) / cp -a",
            median(&stage_sync) / cp,
            "×",
            2,
            Some(at_most(1.2, "≤ 1.2×")),
        )
        .noisy(noisy),
        Row::new(
            b,
            "ratio of the fastest runs",
            min(&stage_sync) / min(&copies),
            "×",
            2,
            Some(at_most(1.2, "≤ 1.2×")),
        )
        .noisy(noisy),
        Row::new(
            b,
            "runner end to end (nats-fs-runner --job), wall",
            median(&wall),
            "ms",
            0,
            None,
        ),
        Row::new(
            b,
            "ratio runner wall / cp -a",
            median(&wall) / cp,
            "×",
            2,
            None,
        ),
    ];
    Ok(Report {
        rows,
        data: json!({
            "files": cfg.stage_files + 1,
            "chattrT": spread,
            "ioPressureAvg10": pressure,
            "disturbed": noisy,
            "bytes": cfg.stage_files * cfg.stage_file_bytes + (cfg.stage_big_mib << 20),
            "cpMs": copies,
            "stageMs": pick(|r| r.stage_ms),
            "syncMs": pick(|r| r.sync_ms),
            "runnerWallMs": wall,
            "runnerDurationMs": pick(|r| r.duration_ms),
            "pairedRatios": stage_sync.iter().zip(&copies).map(|(s, c)| s / c).collect::<Vec<_>>(),
        }),
    })
}

// ---------------------------------------------------------------------------------------------
// 7. The jobs folder on a network share.

#[allow(clippy::too_many_lines)] // One benchmark, best read top to bottom.
async fn share(cfg: &Config, env: &Env) -> Result<Report> {
    let Some(share) = mounts::Share::mount(mounts::Kind::Sshfs) else {
        bail!("skipped: the share benchmark needs root, sshfs and sshd (apt-get install sshfs openssh-server)");
    };
    let reps = cfg.share_reps;
    // One folder per run, on the exported side, as the controller makes them: sshfs caches what
    // it has listed, and neither side may profit from the other's listing.
    let export = share.jobs.path().to_owned();
    let names: Vec<String> = (0..reps * 2 + 2).map(|i| format!("share-{i:02}")).collect();
    let clock = Instant::now();
    make_tree(
        &export.join(&names[0]),
        cfg.share_files,
        4096,
        cfg.share_big_mib,
    )?;
    for name in &names[1..] {
        let status = Command::new("cp")
            .arg("-a")
            .arg(export.join(&names[0]))
            .arg(export.join(name))
            .status()
            .context("copying the tree on the export")?;
        ensure!(status.success(), "cp -a on the export failed");
    }
    let owner = mounts::controller();
    let status = Command::new("chown")
        .arg("-R")
        .arg(format!("{}:{}", owner.0, owner.1))
        .arg(&export)
        .status()
        .context("giving the trees to the controller")?;
    ensure!(status.success(), "chown failed");
    settle_disk();
    eprintln!(
        "    made {} job folders of {} × 4 KiB + {} MiB on the export in {:.1} s",
        names.len(),
        cfg.share_files,
        cfg.share_big_mib,
        clock.elapsed().as_secs_f64()
    );
    let server = Server::start_in(env.dir("share-nats")?, &[]);
    let mut controller = Controller::connect(&server.url).await;
    // The local side of both, the copies and the workspaces, on a tmpfs: this VM's ext4 slows
    // down for minutes after deletions (see below), and each job's workspace is deleted after
    // it, each copy kept; on a tmpfs the share's side is what is compared.
    let local = support::Tmpfs::mount("4g").context("mounting a tmpfs for the local side")?;
    let copies = local.path().join("copies");
    let workspaces = local.path().join("workspaces");
    fs::create_dir(&copies)?;
    let on_tmpfs = |extra: &'static [&'static str]| -> Vec<String> {
        let mut args = vec![
            "--workspaces-dir".to_owned(),
            workspaces.display().to_string(),
        ];
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        args
    };
    let (mut cp_ms, mut job_ms) = (Vec::new(), Vec::new());
    {
        let supervisor = start_share_supervisor(env, &server, &share, "share", &on_tmpfs(&[]))?;
        supervisor.ready().await;
        for rep in 0..reps {
            let (cp_name, job_name) = (&names[2 * rep], &names[2 * rep + 1]);
            let cp = || {
                time_cp(
                    &share.mount.join(cp_name),
                    &copies.join(cp_name),
                    cfg.warm_mib,
                )
            };
            let job = publish_and_wait(&mut controller, job_name, cfg.warm_mib);
            // ABBA: which goes first alternates.
            if rep % 2 == 0 {
                cp_ms.push(cp()?);
                job_ms.push(job.await?);
            } else {
                job_ms.push(job.await?);
                cp_ms.push(cp()?);
            }
            eprintln!(
                "    rep {rep}: cp -a off the share {:.0} ms; publish → result {:.0} ms",
                cp_ms[rep], job_ms[rep]
            );
        }
    }
    // One at a time, for what the parallel calls are worth.
    let serial = {
        let supervisor = start_share_supervisor(
            env,
            &server,
            &share,
            "share-serial",
            &on_tmpfs(&["--share-parallelism", "1"]),
        )?;
        supervisor.ready().await;
        let ms = publish_and_wait(&mut controller, &names[reps * 2], cfg.warm_mib).await?;
        eprintln!("    one call at a time: publish → result {ms:.0} ms");
        ms
    };
    // Log latency, read on the exported folder.
    let latencies = {
        let supervisor = start_share_supervisor(env, &server, &share, "share-log", &on_tmpfs(&[]))?;
        supervisor.ready().await;
        let id = &names[reps * 2 + 1];
        let lines = cfg.log_lines;
        fs::write(
            export.join(id).join("job.json"),
            json!({"steps": [format!(
                "i=0; while [ $i -lt {lines} ]; do date +%s%N; sleep 0.02; i=$((i+1)); done"
            )]})
            .to_string(),
        )?;
        let log = export.join(id).join("results/step_0.log");
        let poller = tokio::task::spawn_blocking(move || poll_log(&log, lines, SOON));
        controller.submit(id).await;
        let result = controller.result_of(id, SOON).await?;
        ensure!(result["status"] == "success", "{id}: {result}");
        poller.await.context("the log poller")??
    };
    let b = "share";
    let cp = median(&cp_ms);
    let job = median(&job_ms);
    let rows = vec![
        Row::new(b, "cp -a of the job folder off sshfs", cp, "ms", 0, None),
        Row::new(b, "publish → result of that job", job, "ms", 0, None),
        Row::new(
            b,
            "ratio publish → result / cp -a",
            job / cp,
            "×",
            2,
            Some(at_most(0.4, "≤ 0.4×")),
        ),
        Row::new(
            b,
            "publish → result, --share-parallelism 1",
            serial,
            "ms",
            0,
            None,
        ),
        Row::new(
            b,
            "step writes a line → readable on the export, median",
            median(&latencies),
            "ms",
            2,
            Some(at_most(50.0, "≤ 50 ms")),
        ),
        Row::new(
            b,
            "step writes a line → readable on the export, p99",
            percentile(&latencies, 99),
            "ms",
            2,
            Some(at_most(50.0, "≤ 50 ms")),
        ),
    ];
    Ok(Report {
        rows,
        data: json!({
            "files": cfg.share_files + 2,
            "bytes": cfg.share_files * 4096 + (cfg.share_big_mib << 20),
            "cpMs": cp_ms,
            "publishToResultMs": job_ms,
            "oneAtATimeMs": serial,
            "logLatencyMs": round3(&latencies),
        }),
    })
}

/// A supervisor whose jobs folder is `share`'s mount.
fn start_share_supervisor(
    env: &Env,
    server: &Server,
    share: &mounts::Share,
    name: &str,
    extra: &[String],
) -> Result<Supervisor> {
    let jobs = Jobs::at(&share.mount, mounts::controller());
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    start_supervisor_with(env, &server.url, &jobs, 1, name, &extra)
}

/// Publishes `{"id": id}` and waits for its result; milliseconds from the publish.
async fn publish_and_wait(controller: &mut Controller, id: &str, warm_mib: usize) -> Result<f64> {
    prepare_copy(warm_mib);
    let clock = Instant::now();
    controller.submit(id).await;
    let result = controller.result_of(id, SOON).await?;
    let took = ms(clock.elapsed());
    ensure!(result["status"] == "success", "{id}: {result}");
    Ok(took)
}

/// The sync-scaling job folder: `scale_files` small files in `scale_dirs` folders, and a step
/// that modifies 10 of them. Returns how many files it made and which it modifies.
fn make_scale_tree(cfg: &Config, job: &Path) -> Result<(usize, Vec<String>)> {
    let dirs = cfg.scale_dirs.max(1);
    let per_dir = cfg.scale_files.div_ceil(dirs);
    let mut seed = 0x2545_F491_4F6C_DD1D_u64;
    let mut made = 0;
    'outer: for d in 0..dirs {
        let dir = job.join(format!("src/m{d:03}"));
        fs::create_dir_all(&dir).context("creating the tree")?;
        for f in 0..per_dir {
            if made == cfg.scale_files {
                break 'outer;
            }
            write_data(&dir.join(format!("f{f:04}.txt")), 512, &mut seed)?;
            made += 1;
        }
    }
    // Ten files spread over the tree.
    let touched: Vec<String> = (0..10)
        .map(|k| format!("src/m{:03}/f{:04}.txt", (k * dirs / 10) % dirs, k % per_dir))
        .collect();
    let step = format!(
        "for f in {}; do echo changed >> \"$f\"; done",
        touched.join(" ")
    );
    fs::write(job.join("job.json"), json!({ "steps": [step] }).to_string())?;
    Ok((made, touched))
}

fn sync_scaling(cfg: &Config, env: &Env) -> Result<Report> {
    wait_after_last_cleanup(env);
    let pressure = report_io_pressure();
    let job = env.dir("scale-src")?.keep();
    let clock = Instant::now();
    let (made, touched) = make_scale_tree(cfg, &job)?;
    settle_disk();
    eprintln!(
        "    made {made} files in {} folders in {:.1} s",
        cfg.scale_dirs.max(1),
        clock.elapsed().as_secs_f64()
    );
    let Comparison {
        runs,
        copies,
        spread,
    } = compare_with_cp(env, &job, cfg.scale_reps, cfg.warm_mib, true, "scale")?;
    fs::remove_dir_all(&job).context("removing the tree")?;
    if let Some(run) = runs.iter().find(|r| r.artifacts != 10) {
        bail!("the runner synced {} artifacts, not 10", run.artifacts);
    }

    let pick = |f: fn(&RunnerRun) -> f64| runs.iter().map(f).collect::<Vec<f64>>();
    let sync = pick(|r| r.sync_ms);
    let stage = pick(|r| r.stage_ms);
    let cp = median(&copies);
    let noisy = warn_if_disturbed(&copies, &sync);
    let b = "sync-scaling";
    let rows = vec![
        Row::new(
            b,
            format!("cp -a of the {made}-file job folder"),
            cp,
            "ms",
            0,
            None,
        ),
        Row::new(
            b,
            "runner sync, 10 of them modified (syncMs)",
            median(&sync),
            "ms",
            0,
            None,
        ),
        Row::new(
            b,
            "sync / cp -a",
            median(&sync) / cp * 100.0,
            "%",
            1,
            Some(at_most(10.0, "≤ 10 %")),
        )
        .noisy(noisy),
        Row::new(
            b,
            "sync / fastest cp -a (conservative)",
            median(&sync) / min(&copies) * 100.0,
            "%",
            1,
            Some(at_most(10.0, "≤ 10 %")),
        )
        .noisy(noisy),
        Row::new(
            b,
            format!("runner staging of the {made} files (stageMs)"),
            median(&stage),
            "ms",
            0,
            None,
        ),
        Row::new(
            b,
            "runner end to end, wall",
            median(&pick(|r| r.wall_ms)),
            "ms",
            0,
            None,
        ),
    ];
    Ok(Report {
        rows,
        data: json!({
            "files": made,
            "chattrT": spread,
            "ioPressureAvg10": pressure,
            "disturbed": noisy,
            "dirs": cfg.scale_dirs.max(1),
            "modified": touched,
            "cpMs": copies,
            "syncMs": sync,
            "stageMs": stage,
            "runnerWallMs": pick(|r| r.wall_ms),
            "runnerDurationMs": pick(|r| r.duration_ms),
        }),
    })
}
