//! Shares to put a jobs folder on, mounted and unmounted by the test or benchmark that uses
//! them (root only): a local disk owned by a controller user, bindfs (`--chown-deny
//! --create-as-user`: owners kept, root may not chown; `--force-user`: one owner for all;
//! read-only), and sshfs over loopback to a private `sshd` with a key made here (with and
//! without `allow_other`). Used by `shares.rs` and by the benchmark of staging from a share.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::support::{
    bin, is_root, reserved_port, run_with_timeout, skip, Jobs, Server, Supervisor, SOON,
};

/// The user a controller writes job folders as, on every share here.
pub const CONTROLLER: &str = "nats-fs-test-ctl";

/// The kinds of share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Local,
    RootSquash,
    OneOwner,
    Sshfs,
    /// sshfs with `allow_other` and without `default_permissions`: every local user may use
    /// it, with the remote user's rights.
    SshfsAllowOther,
    /// bindfs read-only.
    ReadOnly,
}

/// The controller's uid and gid; the user is made once, as a system user with a home (for
/// sshd) whose password is locked but whose key logins work.
pub fn controller() -> (u32, u32) {
    static IDS: OnceLock<(u32, u32)> = OnceLock::new();
    *IDS.get_or_init(|| {
        let exists = |name: &str| {
            nix::unistd::User::from_name(name)
                .ok()
                .flatten()
                .map(|u| (u.uid.as_raw(), u.gid.as_raw()))
        };
        if exists(CONTROLLER).is_none() {
            let made = run_with_timeout(
                Command::new("useradd").args([
                    "--system",
                    "--user-group",
                    "--create-home",
                    "--home-dir",
                    "/var/lib/nats-fs-test-ctl",
                    "--shell",
                    "/bin/sh",
                    CONTROLLER,
                ]),
                SOON,
            );
            // Another test binary may have made it meanwhile.
            assert!(
                made.status.success() || exists(CONTROLLER).is_some(),
                "useradd: {}",
                String::from_utf8_lossy(&made.stderr)
            );
        }
        // A locked account ('!') refuses key logins too; '*' only has no password.
        run_with_timeout(Command::new("usermod").args(["-p", "*", CONTROLLER]), SOON);
        exists(CONTROLLER).expect("the controller user")
    })
}

/// Whether the tools for `kind` are here.
pub fn tools_for(kind: Kind) -> Option<&'static str> {
    let needed: &[&str] = match kind {
        Kind::Local => &[],
        Kind::RootSquash | Kind::OneOwner | Kind::ReadOnly => &["bindfs"],
        Kind::Sshfs | Kind::SshfsAllowOther => &["sshfs", "ssh-keygen", "/usr/sbin/sshd"],
    };
    needed.iter().copied().find(|tool| {
        !Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {tool}"))
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// A jobs folder on a share of one kind: the controller's side (`jobs`, where job folders are
/// written and results read) and the worker's (`mount`, its `--jobs-dir`).
pub struct Share {
    pub kind: Kind,
    pub jobs: Jobs,
    pub mount: PathBuf,
    pub base: TempDir,
    sshd: Option<Child>,
    mounted: bool,
}

impl Share {
    /// Mounts one; `None` (and SKIPPED said) where it cannot be.
    pub fn mount(kind: Kind) -> Option<Self> {
        let mut share = Self::new(kind)?;
        share.attach();
        Some(share)
    }

    /// Makes one ready to mount: the export, owned as its kind wants, and the mount point.
    pub fn new(kind: Kind) -> Option<Self> {
        if !is_root() {
            skip("mounting shares and running jobs as other users needs root");
            return None;
        }
        if let Some(tool) = tools_for(kind) {
            skip(&format!(
                "{tool} is missing (apt-get install bindfs sshfs openssh-server)"
            ));
            return None;
        }
        let (uid, gid) = controller();
        let base = tempfile::Builder::new()
            .prefix("nats-fs-share.")
            .tempdir()
            .unwrap();
        fs::set_permissions(base.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let export = base.path().join("export");
        fs::create_dir(&export).unwrap();
        // The jobs folder, closed to everyone but its owner: the controller's, except where
        // the share shows one owner for everything whatever the files' real owner is.
        fs::set_permissions(&export, fs::Permissions::from_mode(0o700)).unwrap();
        if kind != Kind::OneOwner {
            std::os::unix::fs::chown(&export, Some(uid), Some(gid)).unwrap();
        }
        let mount = base.path().join("mnt");
        fs::create_dir(&mount).unwrap();
        Some(Self {
            kind,
            jobs: Jobs::at(&export, (uid, gid)),
            mount: if kind == Kind::Local { export } else { mount },
            base,
            sshd: None,
            mounted: false,
        })
    }

    /// Moves the mount point into a folder only the controller may enter (before `attach`).
    pub fn guard(&mut self) {
        let (uid, gid) = controller();
        let guard = self.base.path().join("guard");
        fs::create_dir(&guard).unwrap();
        std::os::unix::fs::chown(&guard, Some(uid), Some(gid)).unwrap();
        fs::set_permissions(&guard, fs::Permissions::from_mode(0o700)).unwrap();
        let mount = guard.join("mnt");
        fs::create_dir(&mount).unwrap();
        self.mount = mount;
    }

    /// Mounts it.
    pub fn attach(&mut self) {
        let kind = self.kind;
        let export = self.base.path().join("export").display().to_string();
        let mount = self.mount.display().to_string();
        let command = match kind {
            Kind::Local => return,
            Kind::RootSquash => vec![
                "bindfs",
                "-o",
                "allow_other",
                "--chown-deny",
                "--create-as-user",
                &export,
                &mount,
            ]
            .into_iter()
            .map(str::to_owned)
            .collect::<Vec<_>>(),
            Kind::ReadOnly => ["bindfs", "-o", "allow_other,ro", &export, &mount]
                .map(str::to_owned)
                .to_vec(),
            Kind::OneOwner => [
                "bindfs",
                "-o",
                "allow_other",
                &format!("--force-user={CONTROLLER}"),
                &format!("--force-group={CONTROLLER}"),
                &export,
                &mount,
            ]
            .map(str::to_owned)
            .to_vec(),
            Kind::Sshfs | Kind::SshfsAllowOther => self.sshfs_command(&export, &mount),
        };
        let out = run_with_timeout(Command::new(&command[0]).args(&command[1..]), SOON);
        assert!(
            out.status.success(),
            "{command:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.mounted = true;
    }

    /// Starts a private sshd on loopback that lets the controller in with a key made here;
    /// returns the sshfs command line that mounts `export` at `mount` through it.
    fn sshfs_command(&mut self, export: &str, mount: &str) -> Vec<String> {
        let dir = self.base.path().join("ssh");
        fs::create_dir(&dir).unwrap();
        let keygen = |name: &str| {
            let out = run_with_timeout(
                Command::new("ssh-keygen")
                    .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                    .arg(dir.join(name)),
                SOON,
            );
            assert!(out.status.success(), "ssh-keygen failed");
        };
        keygen("host");
        keygen("client");
        fs::copy(dir.join("client.pub"), dir.join("authorized_keys")).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        fs::set_permissions(
            dir.join("authorized_keys"),
            fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        let port = reserved_port();
        let config = dir.join("sshd_config");
        fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {host}\nUsePAM no\n\
                 AuthorizedKeysFile {keys}\nStrictModes no\nPasswordAuthentication no\n\
                 PidFile none\nSubsystem sftp internal-sftp\nAllowUsers {CONTROLLER}\n",
                host = dir.join("host").display(),
                keys = dir.join("authorized_keys").display()
            ),
        )
        .unwrap();
        // sshd's privilege separation folder.
        fs::create_dir_all("/run/sshd").unwrap();
        let log = fs::File::create(dir.join("sshd.log")).unwrap();
        let sshd = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(&config)
            .stderr(log)
            .spawn()
            .expect("starting sshd");
        self.sshd = Some(sshd);
        let deadline = Instant::now() + SOON;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "sshd did not listen on {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut options = format!(
            "IdentityFile={},StrictHostKeyChecking=no,UserKnownHostsFile=/dev/null,BatchMode=yes",
            dir.join("client").display()
        );
        if self.kind == Kind::SshfsAllowOther {
            options.push_str(",allow_other");
        }
        [
            "sshfs",
            "-p",
            &port.to_string(),
            "-o",
            &options,
            &format!("{CONTROLLER}@127.0.0.1:{export}"),
            mount,
        ]
        .map(str::to_owned)
        .to_vec()
    }

    /// Starts a supervisor with the jobs folder on this share.
    pub fn supervisor(&self, server: &Server, args: &[&str]) -> Supervisor {
        Supervisor::start(&server.url, &self.mount, args, &[])
    }

    /// Runs `nats-fs-supervisor --check-jobs-dir` on the share (no NATS): its exit status and
    /// the report it printed.
    pub fn check(&self) -> (Option<i32>, String) {
        let output = run_with_timeout(
            Command::new(bin("nats-fs-supervisor"))
                .arg("--check-jobs-dir")
                .arg("--jobs-dir")
                .arg(&self.mount)
                .arg("--workspaces-dir")
                .arg(self.base.path().join("check-ws"))
                .args(["--run-as", "3999990-3999991"]),
            SOON,
        );
        let report = String::from_utf8_lossy(&output.stdout).into_owned();
        (output.status.code(), report)
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        if self.mounted {
            let mount = &self.mount;
            let unmounted = Command::new("fusermount")
                .arg("-u")
                .arg(mount)
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !unmounted {
                let _ = Command::new("umount").arg("-l").arg(mount).status();
            }
        }
        if let Some(mut sshd) = self.sshd.take() {
            let _ = sshd.kill();
            let _ = sshd.wait();
        }
    }
}
