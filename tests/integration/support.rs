//! Test support: real `nats-server` processes on free ports with their own stores, the real
//! binaries, real folders. Nothing is mocked.
//!
//! Every wait here polls a condition under a deadline and fails with what it was waiting for;
//! none sleeps for a fixed time and hopes. A failure panics, as a test should.
//!
//! The benchmark (`benches/worker.rs`) includes this file too, for its servers, supervisors,
//! job folders and controller: nothing here may depend on libtest or `cfg(test)`.

#![allow(unsafe_code)] // pre_exec for PR_SET_PDEATHSIG, see `die_with_test`.
#![allow(dead_code)] // Each test module, and the benchmark, uses its own part of this.

use std::collections::BTreeMap;
use std::fs;
use std::future::Future;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures_util::StreamExt;
use nats_fs::manifest::Manifest;
use nats_fs::ResultMessage;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use tempfile::TempDir;

/// The deadline for anything that should happen "soon".
pub const SOON: Duration = Duration::from_secs(20);

/// Whether the tests run as root (CI does); privilege-drop tests need it.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Says a test was skipped, and why, where `cargo test` shows it.
pub fn skip(why: &str) {
    eprintln!("SKIPPED: {why}");
}

/// Kills the spawned process when the thread that started it ends (the test's; the benchmark's
/// main thread), even if the program is killed.
fn die_with_test(command: &mut Command) {
    // SAFETY: prctl is a plain system call, async-signal-safe, and touches no memory of ours.
    unsafe {
        command.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
            Ok(())
        });
    }
}

/// Where this workspace's binaries are built for the running program's profile:
/// `target/<profile>/`, above the program itself (`target/<profile>/deps/`). The tests run the
/// debug binaries, the benchmark the release ones.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("this program's path");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps")
        .to_owned()
}

/// Whether the built binary `path` (`target/<profile>/nats-fs-…`) is at least as new as its
/// sources; an error if it is not built. `cargo test` and `cargo bench` do not rebuild another
/// package's binaries.
pub fn is_fresh(path: &Path) -> std::io::Result<bool> {
    let built = fs::metadata(path)?.modified()?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let crate_dir = name.strip_prefix("nats-fs-").unwrap_or(name);
    let newest = [root.join("src"), root.join(crate_dir).join("src")]
        .iter()
        .filter_map(|dir| fs::read_dir(dir).ok())
        .flat_map(Iterator::flatten)
        .filter_map(|entry| entry.metadata().and_then(|m| m.modified()).ok())
        .max();
    Ok(newest.is_none_or(|newest| newest <= built))
}

/// A built binary of this workspace, found next to the test binary (`target/<profile>/`).
pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    let fresh = is_fresh(&path).unwrap_or_else(|_| {
        panic!(
            "{} is not built: run `cargo build --workspace` before the tests (scripts/test does)",
            path.display()
        )
    });
    // Refuse to test a stale one.
    assert!(
        fresh,
        "{} is older than its sources: run `cargo build --workspace` first (scripts/test does)",
        path.display()
    );
    path
}

/// Polls `check` every 20 ms until it returns `Some`, failing after `timeout`.
pub async fn eventually<T>(
    timeout: Duration,
    what: &str,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Awaits `future`, failing after `timeout` with what it was waiting for.
pub async fn within<T>(timeout: Duration, what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(timeout, future)
        .await
        .unwrap_or_else(|_| panic!("timed out after {timeout:?} waiting for {what}"))
}

/// A folder readable (and, with `writable`, writable) by the unprivileged runner user:
/// `tempfile` makes 0700 folders, which `nobody` cannot enter.
pub fn open_dir(writable: bool) -> TempDir {
    let dir = tempfile::Builder::new()
        .prefix("nats-fs-test.")
        .tempdir()
        .expect("temp dir");
    let mode = if writable { 0o777 } else { 0o755 };
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(mode)).expect("chmod");
    dir
}

/// Pids of live processes whose command line contains `token`.
pub fn processes_with(token: &str) -> Vec<i32> {
    pids()
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| {
                alive(*pid)
                    && String::from_utf8_lossy(&cmdline)
                        .replace('\0', " ")
                        .contains(token)
            })
        })
        .collect()
}

/// Waits until no live process carries `token` in its command line.
pub async fn no_process_with(token: &str, timeout: Duration) {
    eventually(
        timeout,
        &format!("the processes marked {token} to be gone"),
        || processes_with(token).is_empty().then_some(()),
    )
    .await;
}

/// Whether `pid` is a live (not zombie) process.
pub fn alive(pid: i32) -> bool {
    proc_state(pid).is_some_and(|state| state != 'Z')
}

/// The state letter of `pid` (`R`, `S`, `T`, `Z`, …), if it exists.
pub fn proc_state(pid: i32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// The parent of `pid`.
pub fn parent(pid: i32) -> i32 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let (_, rest) = stat.rsplit_once(')').unwrap();
    rest.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Every pid in `/proc` but this process's.
fn pids() -> impl Iterator<Item = i32> {
    let me = std::process::id();
    fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .filter(move |pid| pid.unsigned_abs() != me)
}

/// The children of `pid`: `(pid, state)`.
pub fn children_of(pid: i32) -> Vec<(i32, char)> {
    pids()
        .filter_map(|child| {
            let stat = fs::read_to_string(format!("/proc/{child}/stat")).ok()?;
            let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
            let state = fields.next()?.chars().next()?;
            let parent = fields.next()?.parse::<i32>().ok()?;
            (parent == pid).then_some((child, state))
        })
        .collect()
}

/// Live processes whose real uid is in `first..first + count`.
pub fn processes_of_uids(first: u32, count: u32) -> Vec<i32> {
    pids()
        .filter(|pid| {
            nats_fs::reap::real_uid(*pid).is_some_and(|uid| (first..first + count).contains(&uid))
                && alive(*pid)
        })
        .collect()
}

/// A unique marker for process command lines and file names.
pub fn marker(what: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "nfs{what}{}x{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A `sleep 300` whose command line carries a unique token (GNU sleep takes any fraction), so
/// a test can find its processes even after a shell `exec`s it: `(token, command)`.
pub fn sleeper() -> (String, String) {
    let token = marker("").trim_start_matches("nfs").replace('x', "0");
    (token.clone(), format!("sleep 300.{token}"))
}

/// Stands in for runners that crash, or hang on a drive that stops answering. A step may not
/// signal its runner (the runner is root), so a step that needs its runner dead or stopped
/// runs [`RunnerSignaller::hand_over`]: it tries to signal the runner itself (which must fail:
/// [`RunnerSignaller::breached`]), leaves the runner's pid in this folder, and waits until the
/// test's task has sent the runner the signal.
pub struct RunnerSignaller {
    dir: TempDir,
    signal: Signal,
    task: tokio::task::JoinHandle<()>,
    signalled: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl RunnerSignaller {
    pub fn start(signal: Signal) -> Self {
        let dir = open_dir(true);
        let path = dir.path().to_owned();
        let signalled = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = signalled.clone();
        let task = tokio::spawn(async move {
            loop {
                for entry in fs::read_dir(&path).into_iter().flatten().flatten() {
                    let name = entry.path();
                    if name.extension().is_none_or(|e| e != "pid") {
                        continue;
                    }
                    let Some(pid) = fs::read_to_string(&name)
                        .ok()
                        .and_then(|s| s.trim().parse::<i32>().ok())
                    else {
                        continue;
                    };
                    let _ = kill(Pid::from_raw(pid), signal);
                    count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    fs::rename(&name, name.with_extension("done")).unwrap();
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        Self {
            dir,
            signal,
            task,
            signalled,
        }
    }

    /// Shell words for a step: try the signal, hand the runner over, wait until it is sent.
    pub fn hand_over(&self) -> String {
        let dir = self.dir.path().display();
        let name = self.signal.as_str().trim_start_matches("SIG");
        format!(
            "kill -{name} $PPID 2>/dev/null && touch {dir}/$$.breach; echo $PPID > {dir}/$$.tmp && \
             mv {dir}/$$.tmp {dir}/$$.pid; while [ ! -e {dir}/$$.done ]; do sleep 0.02; done"
        )
    }

    /// Whether a step managed to signal its runner itself.
    pub fn breached(&self) -> bool {
        fs::read_dir(self.dir.path())
            .unwrap()
            .flatten()
            .any(|e| e.path().extension().is_some_and(|x| x == "breach"))
    }

    /// How many runners were signalled.
    pub fn signalled(&self) -> usize {
        self.signalled.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for RunnerSignaller {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Runs a command to its end, killing it if it takes longer than `timeout`.
pub fn run_with_timeout(command: &mut Command, timeout: Duration) -> Output {
    die_with_test(command);
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning");
    let deadline = Instant::now() + timeout;
    // Read the pipes on threads so a chatty child cannot block on a full pipe.
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let out = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stdout.read_to_end(&mut buf);
        buf
    });
    let err = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf);
        buf
    });
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{command:?} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: out.join().expect("stdout thread"),
        stderr: err.join().expect("stderr thread"),
    }
}

/// A loopback port for a server that will be restarted or must stay reserved, from below the
/// kernel's ephemeral range (32768–60999 here) and handed out once per test process.
///
/// `-p -1` lets the kernel choose from the ephemeral range, and the kernel may give a port a
/// killed server just freed to the next server started by another test: a supervisor
/// reconnecting to "its" server would then reach a stranger's. Servers that are killed and
/// restarted therefore take their port from here, where nobody else allocates.
pub fn reserved_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // Spread concurrent test processes (nextest) apart.
    let base = 20_000 + (std::process::id() % 200) * 60;
    loop {
        let offset = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = u16::try_from(base + offset % 12_000).expect("a port number");
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A range of 16 uids no other supervisor of any test process uses, for `--run-as` (no passwd
/// entries needed): its first uid, and `first-last`.
pub fn uid_pool() -> (u32, String) {
    let first = uid_block();
    (first, format!("{first}-{}", first + 15))
}

/// The first of 16 uids of a fresh block.
pub fn uid_block() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    3_100_000 + (std::process::id() % 4096) * 1024 + NEXT.fetch_add(16, Ordering::Relaxed) % 1024
}

/// The nats-server binary the tests run: `$NATS_SERVER`, or `nats-server` from `PATH`
/// (`scripts/test` runs the suite once with each server it tests against).
pub fn nats_server() -> std::ffi::OsString {
    std::env::var_os("NATS_SERVER")
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "nats-server".into())
}

/// A `nats-server` with JetStream on a free loopback port and a store of its own.
pub struct Server {
    child: Option<Child>,
    pub port: u16,
    pub url: String,
    dir: TempDir,
    extra: Vec<String>,
}

impl Server {
    /// Starts a server on a port the kernel chooses (`-p -1`); `extra` are additional
    /// nats-server arguments (e.g. `--auth TOKEN`).
    pub fn start(extra: &[&str]) -> Self {
        Self::start_in(tempfile::tempdir().expect("temp dir"), extra)
    }

    /// As [`Server::start`], with its store and its log (`nats-server.log`) in `dir`, which
    /// goes when the server does unless its cleanup is disabled.
    pub fn start_in(dir: TempDir, extra: &[&str]) -> Self {
        Self::start_on(dir, None, extra)
    }

    /// Starts a server that the test will kill and restart, on a [`reserved_port`].
    pub fn start_restartable(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        Self::start_on(dir, Some(reserved_port()), extra)
    }

    fn start_on(dir: TempDir, port: Option<u16>, extra: &[&str]) -> Self {
        let mut server = Self {
            child: None,
            port: 0,
            url: String::new(),
            dir,
            extra: extra.iter().map(ToString::to_string).collect(),
        };
        server.launch(port);
        server
    }

    fn launch(&mut self, port: Option<u16>) {
        let ports_dir = self.dir.path().join("ports");
        let _ = fs::remove_dir_all(&ports_dir);
        fs::create_dir_all(&ports_dir).expect("ports dir");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("nats-server.log"))
            .expect("log");
        let mut command = Command::new(nats_server());
        command
            .args(["-a", "127.0.0.1", "-js", "-p"])
            .arg(port.map_or_else(|| "-1".to_owned(), |p| p.to_string()))
            .arg("-sd")
            .arg(self.dir.path().join("js"))
            .arg("--ports_file_dir")
            .arg(&ports_dir)
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::from(log));
        die_with_test(&mut command);
        let child = command
            .spawn()
            .expect("starting nats-server (is it installed? scripts/test installs it)");
        let pid = child.id();
        self.child = Some(child);
        let ports_file = ports_dir.join(format!("nats-server_{pid}.ports"));
        let deadline = Instant::now() + SOON;
        let url = loop {
            if let Ok(text) = fs::read_to_string(&ports_file) {
                if let Ok(ports) = serde_json::from_str::<Value>(&text) {
                    if let Some(url) = ports["nats"][0].as_str() {
                        break url.to_owned();
                    }
                }
            }
            assert!(
                self.child
                    .as_mut()
                    .is_some_and(|c| c.try_wait().ok().flatten().is_none()),
                "nats-server exited at start:\n{}",
                fs::read_to_string(self.dir.path().join("nats-server.log")).unwrap_or_default()
            );
            assert!(
                Instant::now() < deadline,
                "nats-server did not write {}",
                ports_file.display()
            );
            std::thread::sleep(Duration::from_millis(5));
        };
        self.port = url
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("port in URL");
        self.url = url;
    }

    /// Stops the server with SIGKILL (its store stays).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port with the same store (after [`Server::kill`], or
    /// killing it first). Only for servers made with [`Server::start_restartable`].
    pub fn restart(&mut self) {
        self.kill();
        let port = self.port;
        self.launch(Some(port));
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let log =
                fs::read_to_string(self.dir.path().join("nats-server.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            eprintln!("--- nats-server log (last lines) ---");
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// A three-node JetStream cluster on loopback.
pub struct Cluster {
    pub nodes: Vec<ClusterNode>,
    dir: TempDir,
}

/// One node of a [`Cluster`].
pub struct ClusterNode {
    child: Option<Child>,
    pub name: String,
    pub url: String,
    pub monitor_port: u16,
}

impl Cluster {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let ports: Vec<(u16, u16, u16)> = (0..3)
            .map(|_| (reserved_port(), reserved_port(), reserved_port()))
            .collect();
        let routes: Vec<String> = ports
            .iter()
            .map(|(_, cluster, _)| format!("nats://127.0.0.1:{cluster}"))
            .collect();
        let mut nodes = Vec::new();
        for (i, (client, cluster, monitor)) in ports.iter().enumerate() {
            let name = format!("n{i}");
            let mut command = Command::new(nats_server());
            command
                .args(["-a", "127.0.0.1", "-js", "--cluster_name", "nfstest"])
                .args(["-p", &client.to_string(), "-m", &monitor.to_string()])
                .args(["--server_name", &name])
                .arg("-sd")
                .arg(dir.path().join(&name))
                .args(["--cluster", &format!("nats://127.0.0.1:{cluster}")])
                .args(["--routes", &routes.join(",")])
                .stdout(Stdio::null())
                .stderr(Stdio::from(
                    fs::File::create(dir.path().join(format!("{name}.log"))).expect("log"),
                ));
            die_with_test(&mut command);
            nodes.push(ClusterNode {
                child: Some(command.spawn().expect("starting nats-server")),
                name,
                url: format!("nats://127.0.0.1:{client}"),
                monitor_port: *monitor,
            });
        }
        // Wait until every node accepts clients.
        let deadline = Instant::now() + SOON;
        for (client, _, _) in &ports {
            while TcpStream::connect(("127.0.0.1", *client)).is_err() {
                assert!(
                    Instant::now() < deadline,
                    "a cluster node did not start listening"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Self { nodes, dir }
    }

    /// All client URLs, comma-separated, as `--url` takes them.
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.url.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The node where a client connection named `name` is, from each node's `/connz`.
    pub fn node_with_client(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|node| {
            node.child.is_some()
                && http_get(node.monitor_port, "/connz?limit=1024")
                    .is_some_and(|body| body.contains(&format!("\"name\": \"{name}\"")))
        })
    }

    /// Stops node `i` with SIGKILL.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}

/// A plain HTTP GET on loopback (the monitoring port), without a client library.
fn http_get(port: u16, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut body = String::new();
    stream.read_to_string(&mut body).ok()?;
    Some(body)
}

/// A plain HTTP GET on loopback (`/metrics`, `/healthz`): `(status, body)`.
pub fn http_request(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n")?.1.to_owned();
    Some((status, body))
}

/// The value of a sample line `name{labels} value` in a Prometheus text body.
pub fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// A running `nats-fs-supervisor`, its output captured to a file the test can search.
pub struct Supervisor {
    child: Option<Child>,
    pub log_path: PathBuf,
    pub workspaces: PathBuf,
    dir: TempDir,
}

impl Supervisor {
    /// Starts the supervisor against `url` and `jobs`, with short test-friendly defaults that
    /// `args` may override (later flags win), and `env` added to its environment.
    pub fn start(url: &str, jobs: &Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        let dir = open_dir(false);
        let workspaces = dir.path().join("workspaces");
        let log_path = dir.path().join("supervisor.log");
        Self::start_in(dir, workspaces, log_path, url, jobs, args, env)
    }

    /// As [`Supervisor::start`], with `file` left open in the supervisor (at the same
    /// descriptor number), as a careless parent shell or service manager would leave it.
    pub fn start_inheriting(url: &str, jobs: &Path, args: &[&str], file: &fs::File) -> Self {
        use nix::fcntl::{fcntl, FcntlArg, FdFlag};
        // Other tests may start processes meanwhile and inherit it too; that does no harm.
        fcntl(file, FcntlArg::F_SETFD(FdFlag::empty())).expect("clearing FD_CLOEXEC");
        let started = Self::start(url, jobs, args, &[]);
        fcntl(file, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).expect("setting FD_CLOEXEC");
        started
    }

    /// Starts again with the same workspaces folder (to see what a restart sweeps).
    pub fn restart(mut self, url: &str, jobs: &Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        self.kill();
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("temp dir"));
        let workspaces = self.workspaces.clone();
        // A fresh log, so that waiting for `supervisor_ready` means the new process is ready.
        let log_path = self.log_path.with_extension("restarted.log");
        Self::start_in(dir, workspaces, log_path, url, jobs, args, env)
    }

    fn start_in(
        dir: TempDir,
        workspaces: PathBuf,
        log_path: PathBuf,
        url: &str,
        jobs: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let mut command = supervisor_command(&bin("nats-fs-supervisor"), url, jobs, &workspaces);
        if is_root() && !args.contains(&"--run-as") {
            // A pool of its own per supervisor: two supervisors sharing uids would kill each
            // other's jobs (every process of a finished job's uid is killed).
            command.arg("--run-as").arg(uid_pool().1);
        }
        command
            .args([
                "--ack-wait",
                "5s",
                "--kill-grace",
                "2s",
                "--drain-timeout",
                "30s",
            ])
            .args(args)
            .envs(env.iter().copied())
            // JSON lines: tests wait on the `event` field of the key lines, not on their wording
            // (a test that needs the text format passes `--log-format text`).
            .env("NATS_FS_LOG_FORMAT", "json");
        Self::launch(command, dir, workspaces, log_path)
    }

    /// Starts `command` (see [`supervisor_command`]; the caller adds the rest of the
    /// arguments and the environment), its output appended to `log_path`. `dir` lives as long
    /// as this does (it holds the log and the workspaces, unless they are elsewhere).
    pub fn launch(
        mut command: Command,
        dir: TempDir,
        workspaces: PathBuf,
        log_path: PathBuf,
    ) -> Self {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("log file");
        command
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log));
        die_with_test(&mut command);
        let child = command.spawn().expect("starting nats-fs-supervisor");
        Self {
            child: Some(child),
            log_path,
            workspaces,
            dir,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child
            .as_ref()
            .and_then(|c| i32::try_from(c.id()).ok())
            .expect("a running supervisor")
    }

    /// Everything it has logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The log lines whose `event` field is `event` (the supervisor's `logging::event`), as
    /// JSON. In the text format (`--log-format text`) only their number is right: each is an
    /// empty object.
    pub fn events(&self, event: &str) -> Vec<Value> {
        let text = format!("event={event:?}");
        self.log()
            .lines()
            .filter_map(|line| match serde_json::from_str::<Value>(line) {
                Ok(json) => (json["event"] == event).then_some(json),
                Err(_) => line
                    .contains(&text)
                    .then(|| Value::Object(serde_json::Map::default())),
            })
            .collect()
    }

    /// How many log lines have the `event` field `event`.
    pub fn count_event(&self, event: &str) -> usize {
        self.events(event).len()
    }

    /// Waits until the log has the `event` field `event` at least `times` times.
    pub async fn wait_event(&self, event: &str, times: usize) {
        eventually(
            SOON,
            &format!("{times}× event {event:?} in the supervisor log"),
            || (self.count_event(event) >= times).then_some(()),
        )
        .await;
    }

    /// Waits until it is connected and pulling; fails at once if it exits first.
    pub async fn ready(&self) {
        let pid = self.pid();
        let ready = || self.count_event("supervisor_ready") >= 1;
        eventually(SOON, "the supervisor to be ready", || {
            if ready() {
                return Some(());
            }
            // Checked after the log: it may have logged readiness and exited since.
            assert!(
                alive(pid) || ready(),
                "the supervisor exited before it was ready"
            );
            None
        })
        .await;
    }

    /// Its `VmRSS` and `VmHWM` (peak), in KiB.
    pub fn memory(&self) -> (u64, u64) {
        let pid = self.pid();
        let kib = |field| {
            proc_status_kib(pid, field)
                .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        };
        (kib("VmRSS"), kib("VmHWM"))
    }

    /// Its anonymous resident memory (`RssAnon`: heap, stacks, data), in KiB: the part of
    /// [`Self::memory`]'s RSS that is not its code and libraries.
    pub fn anonymous_kib(&self) -> u64 {
        let pid = self.pid();
        proc_status_kib(pid, "RssAnon")
            .unwrap_or_else(|| panic!("no RssAnon in /proc/{pid}/status"))
    }

    pub fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.pid()), signal).expect("signalling the supervisor");
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// Waits for it to exit.
    pub async fn exit(&mut self, timeout: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("a supervisor");
        eventually(timeout, "the supervisor to exit", || {
            child.try_wait().ok().flatten()
        })
        .await
    }

    /// SIGKILL, as a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM (a drain), then SIGKILL if it has not exited within 15 s.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(pid) = i32::try_from(child.id()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// A `nats-fs-supervisor` command, the binary at `bin` (the tests': [`bin`]), against `url` and
/// the jobs folder `jobs`, its workspaces in `workspaces`: for [`Supervisor::launch`].
pub fn supervisor_command(bin: &Path, url: &str, jobs: &Path, workspaces: &Path) -> Command {
    let mut command = Command::new(bin);
    command
        .arg("--url")
        .arg(url)
        .arg("--jobs-dir")
        .arg(jobs)
        .arg("--workspaces-dir")
        .arg(workspaces);
    command
}

/// A field of `/proc/PID/status` (`VmRSS`, `VmHWM`, …), in KiB.
pub fn proc_status_kib(pid: i32, field: &str) -> Option<u64> {
    parse_kib(
        &fs::read_to_string(format!("/proc/{pid}/status")).ok()?,
        field,
    )
}

/// The value of `field:   1234 kB` in a text such as `/proc/PID/status`.
pub fn parse_kib(text: &str, field: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        line.strip_prefix(field)?
            .strip_prefix(':')?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("--- supervisor log ---\n{}", self.log());
        }
    }
}

/// A server, a jobs folder, a ready supervisor and a client watching results.
pub struct Setup {
    pub server: Server,
    pub jobs: Jobs,
    pub supervisor: Supervisor,
    pub nats: Nats,
}

/// Starts a [`Setup`] whose supervisor gets `args` besides the harness's defaults.
pub async fn setup(args: &[&str]) -> Setup {
    let server = Server::start(&[]);
    let jobs = Jobs::new();
    let supervisor = Supervisor::start(&server.url, jobs.path(), args, &[]);
    supervisor.ready().await;
    let nats = Nats::connect(&server.url).await;
    Setup {
        server,
        jobs,
        supervisor,
        nats,
    }
}

/// A jobs folder as an operator sets one up: root's (the share user, by default its owner),
/// closed to the pool's identities (0700), so that steps cannot reach it; with helpers to add
/// jobs.
pub struct Jobs {
    path: PathBuf,
    _dir: Option<TempDir>,
    /// Who job folders are made as (the controller), when not as this process.
    owner: Option<(u32, u32)>,
}

impl Jobs {
    pub fn new() -> Self {
        Self::in_dir(
            tempfile::Builder::new()
                .prefix("nats-fs-test.")
                .tempdir()
                .expect("temp dir"),
        )
    }

    /// A jobs folder inside `parent` (a drive of the test's choosing, such as a small tmpfs).
    pub fn new_in(parent: &Path) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("nats-fs-test.")
            .tempdir_in(parent)
            .expect("temp dir");
        Self::in_dir(dir)
    }

    /// The jobs folder `dir`, closed to everyone but its owner; it goes when this does
    /// unless its cleanup is disabled.
    pub fn in_dir(dir: TempDir) -> Self {
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).expect("chmod");
        Self {
            path: dir.path().to_owned(),
            _dir: Some(dir),
            owner: None,
        }
    }

    /// The jobs folder at `path`, as a controller that is `owner` (uid, gid) sees it: job
    /// folders are made as that user. Not removed when this goes.
    pub fn at(path: &Path, owner: (u32, u32)) -> Self {
        Self {
            path: path.to_owned(),
            _dir: None,
            owner: Some(owner),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Creates `{jobs}/{id}/job.json` with `job` as its contents, as a controller does (a
    /// folder 0755, a file 0644); returns the job folder.
    pub fn add(&self, id: &str, job: &Value) -> PathBuf {
        let dir = self.path.join(id);
        fs::create_dir_all(&dir).expect("job dir");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod");
        fs::write(dir.join("job.json"), job.to_string()).expect("job.json");
        self.own(&dir);
        self.own(&dir.join("job.json"));
        dir
    }

    /// Gives `path` to the controller, when there is one.
    pub fn own(&self, path: &Path) {
        if let Some((uid, gid)) = self.owner {
            std::os::unix::fs::lchown(path, Some(uid), Some(gid)).expect("chown");
        }
    }

    pub fn results(&self, id: &str) -> PathBuf {
        self.path.join(id).join("results")
    }

    pub fn manifest(&self, id: &str) -> Manifest {
        Manifest::read(&self.results(id))
            .expect("reading result.json")
            .expect("a result.json")
    }

    pub fn log(&self, id: &str, step: usize) -> String {
        fs::read_to_string(self.results(id).join(nats_fs::manifest::step_log(step)))
            .unwrap_or_default()
    }
}

/// A test's NATS client: submits jobs like a controller and watches results.
pub struct Nats {
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    /// The subscription to `jobs.results.>`.
    pub results: async_nats::Subscriber,
}

/// A result message with its headers.
#[derive(Debug)]
pub struct Received {
    pub subject: String,
    pub result: ResultMessage,
    pub raw: Value,
    pub msg_id: Option<String>,
}

impl Nats {
    pub async fn connect(url: &str) -> Self {
        Self::connect_with(url, async_nats::ConnectOptions::new()).await
    }

    pub async fn connect_with(url: &str, options: async_nats::ConnectOptions) -> Self {
        let addrs: Vec<async_nats::ServerAddr> = url
            .split(',')
            .map(|u| u.parse().expect("a server URL"))
            .collect();
        let client = options
            .connect(addrs)
            .await
            .expect("connecting to the test server");

        let results = client
            .subscribe("jobs.results.>")
            .await
            .expect("subscribing");
        client.flush().await.expect("flush");
        Self {
            js: jetstream::new(client.clone()),
            client,
            results,
        }
    }

    /// Publishes a request on `jobs.pending` and returns its stream sequence.
    pub async fn submit(&self, payload: impl Into<bytes::Bytes>) -> u64 {
        let ack = self
            .js
            .publish("jobs.pending", payload.into())
            .await
            .expect("publishing")
            .await
            .expect("the stream to store the request");
        ack.sequence
    }

    /// Publishes `{"id": id}`.
    pub async fn submit_id(&self, id: &str) -> u64 {
        self.submit(serde_json::json!({ "id": id }).to_string())
            .await
    }

    /// The next result message.
    pub async fn result(&mut self) -> Received {
        self.result_within(SOON).await
    }

    pub async fn result_within(&mut self, timeout: Duration) -> Received {
        let msg = within(timeout, "a result message", self.results.next())
            .await
            .expect("the results subscription");
        let raw: Value = serde_json::from_slice(&msg.payload).expect("a JSON result");
        Received {
            subject: msg.subject.to_string(),
            result: serde_json::from_value(raw.clone()).expect("a result message"),
            raw,
            msg_id: msg
                .headers
                .as_ref()
                .and_then(|h| h.get("Nats-Msg-Id"))
                .map(ToString::to_string),
        }
    }

    /// Results for `n` distinct jobs, by id, failing on a duplicate.
    pub async fn results(&mut self, n: usize, timeout: Duration) -> BTreeMap<String, Received> {
        let deadline = Instant::now() + timeout;
        let mut seen = BTreeMap::new();
        while seen.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            let received = self.result_within(left).await;
            let id = received.result.id.clone();
            assert!(
                seen.insert(id.clone(), received).is_none(),
                "a second result for {id}"
            );
        }
        seen
    }

    /// Asserts that no further result arrives within `quiet`.
    pub async fn no_more_results(&mut self, quiet: Duration) {
        if let Ok(Some(msg)) = tokio::time::timeout(quiet, self.results.next()).await {
            panic!(
                "unexpected result on {}: {}",
                msg.subject,
                String::from_utf8_lossy(&msg.payload)
            );
        }
    }

    /// Keeps every result message in a stream `RESULTS` (as an operator may), so that a result
    /// published while this client is disconnected is not lost to the test.
    pub async fn keep_results(&self) {
        self.js
            .get_or_create_stream(jetstream::stream::Config {
                name: "RESULTS".into(),
                subjects: vec!["jobs.results.>".into()],
                ..Default::default()
            })
            .await
            .expect("creating the RESULTS stream");
    }

    /// The last result of job `id` kept by [`Nats::keep_results`], waiting for it (and for the
    /// server and this client to be back) for up to `timeout`.
    pub async fn stored_result(&self, id: &str, timeout: Duration) -> ResultMessage {
        let subject = format!("jobs.results.{id}");
        within(timeout, &format!("a stored result on {subject}"), async {
            loop {
                if let Ok(stream) = self.js.get_stream("RESULTS").await {
                    if let Ok(msg) = stream.get_last_raw_message_by_subject(&subject).await {
                        return serde_json::from_slice(&msg.payload).expect("a result message");
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await
    }

    /// The durable consumer's state.
    pub async fn consumer(&self, name: &str) -> jetstream::consumer::Info {
        let stream = self.js.get_stream("JOBS").await.expect("the JOBS stream");
        let mut consumer: jetstream::consumer::PullConsumer =
            stream.get_consumer(name).await.expect("the consumer");
        consumer.info().await.expect("consumer info").clone()
    }

    /// Waits until the consumer has nothing pending and nothing awaiting an ack.
    pub async fn drained(&self, name: &str) -> jetstream::consumer::Info {
        let deadline = Instant::now() + SOON;
        loop {
            let info = self.consumer(name).await;
            if info.num_pending == 0 && info.num_ack_pending == 0 {
                return info;
            }
            assert!(
                Instant::now() < deadline,
                "consumer {name} still has {} pending and {} unacked",
                info.num_pending,
                info.num_ack_pending
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Runs `nats-fs-runner --job` on `{jobs}/{id}` with `extra` arguments, in a workspaces folder
/// of its own that it must leave empty; its output and result message.
pub fn run_runner(jobs: &Jobs, id: &str, extra: &[&str]) -> (Output, Value) {
    let workspaces = tempfile::tempdir().expect("temp dir");
    let output = run_with_timeout(
        Command::new(bin("nats-fs-runner"))
            .arg("--job")
            .arg(jobs.path().join(id))
            .arg("--workspaces-dir")
            .arg(workspaces.path())
            .args(["--kill-grace", "1s"])
            .args(extra),
        Duration::from_secs(120),
    );
    let result: Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "the runner printed no result ({e}); stderr:\n{}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    assert_eq!(
        fs::read_dir(workspaces.path()).expect("workspaces").count(),
        0,
        "the workspace was not removed"
    );
    (output, result)
}

/// A small tmpfs (a drive that fills up), unmounted when dropped, even when the test fails.
pub struct Tmpfs {
    path: PathBuf,
    _dir: TempDir,
}

impl Tmpfs {
    /// Mounts one of `size` (`"4m"`); `None` where mounting is not allowed (not root).
    pub fn mount(size: &str) -> Option<Self> {
        let dir = open_dir(true);
        let path = dir.path().join("drive");
        fs::create_dir(&path).unwrap();
        let output = run_with_timeout(
            Command::new("mount")
                .args([
                    "-t",
                    "tmpfs",
                    "-o",
                    &format!("size={size},mode=0755"),
                    "tmpfs",
                ])
                .arg(&path),
            SOON,
        );
        output.status.success().then_some(Self { path, _dir: dir })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Fills what is left of it with a file of the test's own; returns the file.
    pub fn fill(&self) -> PathBuf {
        let filler = self.path.join("filler");
        // `head` stops at ENOSPC, which is the point.
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "head -c 64M /dev/zero > {} 2>/dev/null",
                filler.display()
            ))
            .status();
        filler
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}
