//! The jobs folder as the worker meets it: who the worker is there (the share user), what the
//! drive allows (the probe), and whether the worker may run jobs there at all (the verdict).
//!
//! **The share user** (`--share-user`, by default the owner of the jobs folder) is whose
//! rights the runner and the supervisor use for every file system call on the jobs folder
//! ([`nats_fs::share::FsIds`]); the supervisor takes its supplementary groups as its own (and
//! so do its runners: root's own calls do not look at them), so that a job folder the
//! controller shares through a group is reachable too.
//!
//! **The probe** makes a folder in the jobs folder as a controller makes a job folder (0755,
//! a file 0644 in it) with the share user's rights and finds out, by trying: whether the share
//! user can create there, who owns what it creates (owners kept, or squashed to another uid),
//! whether modes are kept, whether a rename replaces, whether `fsync` works, whether root's own
//! rights can create and chown there, and what an identity of the pool could do to that folder
//! (a real process of that identity: `nats-fs-runner --reach`). It removes its folder again.
//!
//! **The verdict** says in one line what holds on the drive and why, and refuses a set-up that
//! would lose data or, with `--share-isolation required`, let a step read or change a job
//! folder: the supervisor then exits at start (status 2), or, when the jobs folder is mounted
//! anew while it runs ([`Drive::for_job`] notices), hands jobs back until it is fixed.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use nats_fs::share::{DriveKind, FsIds, Mount, Reach};
use nix::unistd::{Gid, Group, Uid, User};

use crate::config::{Settings, ShareIsolation};
use crate::identity::Identity;
use crate::reaper::Reaper;

/// The jobs folder was refused at start (see [`Verdict::refusal`]): the supervisor exits with
/// status 2, as for any other configuration error, and is not restarted.
/// (`--check-jobs-dir` exits 2 for a refusal, 1 for a jobs folder where jobs cannot run yet.)
#[derive(Debug, thiserror::Error)]
#[error("refusing the jobs folder: {0}")]
pub struct Refused(pub String);

/// How often a growing log is pushed out to a drive that holds writes back (NFS): often enough
/// that another host reads a line within the 50 ms the contract promises.
const PUSH_LOGS_EVERY: Duration = Duration::from_millis(20);
/// How long the reach check may take (it runs a process on the share).
const REACH_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a jobs folder that can be used is probed again (when a job starts), so that a
/// change made in place (a `chmod`, a remount on the same device) is seen.
const REPROBE_USABLE: Duration = Duration::from_secs(60);
/// How often one that cannot be used is probed again, so that a fix is seen soon.
const REPROBE_UNUSABLE: Duration = Duration::from_secs(5);

/// The user the worker is on the jobs folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareUser {
    /// The user name, or `uid N`.
    pub name: String,
    pub ids: FsIds,
    /// Its supplementary groups (from `getgrouplist`; its group alone for a bare uid).
    pub groups: Vec<Gid>,
}

impl ShareUser {
    /// `ci (uid 1001, gid 1001)`.
    pub fn describe(&self) -> String {
        if self.name == format!("uid {}", self.ids.uid) {
            format!("uid {} (gid {})", self.ids.uid, self.ids.gid)
        } else {
            format!("{} (uid {}, gid {})", self.name, self.ids.uid, self.ids.gid)
        }
    }

    /// Resolves `--share-user` (`USER` or `USER:GROUP`, names or numbers); without one, the
    /// owner and group of the jobs folder (`owner`).
    pub fn resolve(spec: Option<&str>, owner: (u32, u32)) -> Result<Self, String> {
        let Some(spec) = spec else {
            return Ok(Self::of_uid(owner.0, Some(owner.1)));
        };
        let (user, group) = match spec.split_once(':') {
            Some((user, group)) => (user, Some(group)),
            None => (spec, None),
        };
        let gid = group
            .map(|group| match group.parse::<u32>() {
                Ok(gid) => Ok(gid),
                Err(_) => Group::from_name(group)
                    .ok()
                    .flatten()
                    .map(|g| g.gid.as_raw())
                    .ok_or_else(|| {
                        format!("--share-user {spec}: there is no group {group:?} on this host")
                    }),
            })
            .transpose()?;
        if let Ok(uid) = user.parse::<u32>() {
            return Ok(Self::of_uid(uid, gid));
        }
        let found = User::from_name(user).ok().flatten().ok_or_else(|| {
            format!("--share-user {spec}: there is no user {user:?} on this host")
        })?;
        Ok(Self::of_user(&found, gid))
    }

    fn of_uid(uid: u32, gid: Option<u32>) -> Self {
        if let Some(user) = User::from_uid(Uid::from_raw(uid)).ok().flatten() {
            return Self::of_user(&user, gid);
        }
        let gid = gid.unwrap_or(uid);
        Self {
            name: format!("uid {uid}"),
            ids: FsIds { uid, gid },
            groups: vec![Gid::from_raw(gid)],
        }
    }

    fn of_user(user: &User, gid: Option<u32>) -> Self {
        let gid = gid.unwrap_or(user.gid.as_raw());
        let mut groups = std::ffi::CString::new(user.name.as_str())
            .ok()
            .and_then(|name| nix::unistd::getgrouplist(&name, user.gid).ok())
            .unwrap_or_default();
        if !groups.iter().any(|g| g.as_raw() == gid) {
            groups.push(Gid::from_raw(gid));
        }
        Self {
            name: user.name.clone(),
            ids: FsIds {
                uid: user.uid.as_raw(),
                gid,
            },
            groups,
        }
    }

    /// Makes the share user's groups this process's supplementary groups (and so its
    /// runners'), when it is root: a thread taking the share user's file system ids then has
    /// its groups too. Root's own calls do not look at them.
    pub fn adopt_groups(&self) -> io::Result<()> {
        if !nix::unistd::geteuid().is_root() {
            return Ok(());
        }
        nix::unistd::setgroups(&self.groups).map_err(io::Error::from)
    }
}

/// What the probe found out, each `None` when it could not try.
#[derive(Debug, Clone, Default)]
pub struct Found {
    /// Whether the share user could create a folder and a file in the jobs folder.
    pub create: Option<Result<(), String>>,
    /// Who owns what the share user creates: `(uid, gid)`.
    pub owner: Option<(u32, u32)>,
    /// Whether a mode set on a file is kept.
    pub modes_kept: Option<bool>,
    /// Whether a rename over an existing file replaces it.
    pub rename_replaces: Option<bool>,
    /// Whether `fsync` works.
    pub fsync: Option<Result<(), String>>,
    /// Whether root's own rights may create a file in a folder of the share user's.
    pub root_creates: Option<bool>,
    /// Whether root's own rights may give a file to another owner.
    pub root_chowns: Option<bool>,
    /// What an identity of the pool could do to a job folder; `None` when jobs run as the
    /// supervisor's own user.
    pub reach: Option<Result<(Identity, Reach), String>>,
}

/// What the worker makes of its jobs folder.
#[derive(Debug, Clone)]
pub struct Verdict {
    pub jobs_dir: PathBuf,
    /// When it was probed.
    pub probed_at: std::time::Instant,
    /// The device of the jobs folder when it was probed: another device is another mount.
    pub dev: Option<u64>,
    pub mount: Option<Mount>,
    pub share: Option<ShareUser>,
    pub found: Found,
    pub isolation: ShareIsolation,
    /// Why the worker must not run jobs on this drive (data would be lost, or jobs could reach
    /// each other's folders when isolation is required), and how to fix it.
    pub refusal: Option<String>,
    /// Why jobs would fail here (no jobs folder, a read-only drive), without a refusal: the
    /// jobs are handed back, and another host may take them.
    pub problem: Option<String>,
}

impl Verdict {
    fn new(jobs_dir: &Path, isolation: ShareIsolation) -> Self {
        Self {
            jobs_dir: jobs_dir.to_owned(),
            probed_at: std::time::Instant::now(),
            dev: None,
            mount: None,
            share: None,
            found: Found::default(),
            isolation,
            refusal: None,
            problem: None,
        }
    }

    fn refuse(&mut self, why: String) {
        self.refusal.get_or_insert(why);
    }

    /// Why a job cannot run here now, if it cannot.
    pub fn unusable(&self) -> Option<&str> {
        self.refusal.as_deref().or(self.problem.as_deref())
    }

    /// How often a growing log must be pushed out for other hosts to see it.
    pub fn push_logs_every(&self) -> Option<Duration> {
        self.mount
            .as_ref()
            .is_some_and(|m| m.kind().holds_writes_back())
            .then_some(PUSH_LOGS_EVERY)
    }

    /// Whether a `result.json` found in a job's `results/` can only have been written by the
    /// worker or the controller: steps cannot reach the jobs folder (it was tried, or there is
    /// no other user for them to be).
    pub fn steps_kept_off(&self) -> bool {
        matches!(&self.found.reach, Some(Ok((_, reach))) if !reach.reaches_jobs())
    }

    /// The verdict in one line, for the log.
    pub fn line(&self) -> String {
        self.facts().join("; ")
    }

    /// The verdict, one fact a line, for `--check-jobs-dir`.
    pub fn report(&self) -> String {
        let mut text = String::new();
        for fact in self.facts() {
            text.push_str("  ");
            text.push_str(&fact);
            text.push('\n');
        }
        let last = match (&self.refusal, &self.problem) {
            (Some(refusal), _) => format!("REFUSED: {refusal}"),
            (None, Some(problem)) => format!("jobs cannot run here yet: {problem}"),
            (None, None) => "usable: jobs run here".to_owned(),
        };
        text + &last + "\n"
    }

    fn facts(&self) -> Vec<String> {
        let mut facts = vec![format!("jobs folder {}", self.jobs_dir.display())];
        if let Some(mount) = &self.mount {
            let kind = match mount.kind() {
                DriveKind::Local => "a local disk",
                DriveKind::Nfs => "NFS",
                DriveKind::Smb => "SMB",
                DriveKind::Fuse => "FUSE",
            };
            facts.push(format!("on {mount} ({kind})"));
        }
        if let Some(share) = &self.share {
            facts.push(format!(
                "the worker reads and writes it as the share user {}",
                share.describe()
            ));
        }
        let found = &self.found;
        if let Some(Err(e)) = &found.create {
            facts.push(format!("the share user cannot create there: {e}"));
        }
        if let (Some((uid, gid)), Some(share)) = (found.owner, &self.share) {
            if (uid, gid) == (share.ids.uid, share.ids.gid) {
                facts.push("owners kept (what it writes is its own)".to_owned());
            } else {
                facts.push(format!(
                    "owners not kept: what it writes belongs to uid {uid} gid {gid} (squashed or forced by the drive)"
                ));
            }
        }
        if let Some(kept) = found.modes_kept {
            facts.push(
                if kept {
                    "modes kept"
                } else {
                    "modes not kept (artifacts lose theirs)"
                }
                .to_owned(),
            );
        }
        if let Some(replaces) = found.rename_replaces {
            facts.push(
                if replaces {
                    "rename replaces"
                } else {
                    "rename does not replace (the worker never needs it to)"
                }
                .to_owned(),
            );
        }
        match &found.fsync {
            Some(Ok(())) => facts.push("fsync works".to_owned()),
            Some(Err(e)) => {
                facts.push(format!("fsync fails ({e}): manifests are not made durable"));
            }
            None => {}
        }
        match (found.root_creates, found.root_chowns) {
            (Some(false), _) => {
                facts.push("root's own rights may not create there (root squashed)".to_owned());
            }
            (Some(true), Some(false)) => facts.push("root may not chown there".to_owned()),
            (Some(true), Some(true)) => facts.push("root may create and chown there".to_owned()),
            _ => {}
        }
        match &found.reach {
            None => facts.push("steps run as the supervisor's own user: nothing keeps them off the jobs folder".to_owned()),
            Some(Ok((identity, reach))) if reach.reaches_jobs() => facts.push(format!(
                "steps CAN reach job folders: {} could {}",
                identity.describe(),
                reach.describe()
            )),
            Some(Ok((identity, reach))) => facts.push(format!(
                "steps cannot reach job folders ({} could {}): jobs are kept apart on it, and a result.json there is the worker's",
                identity.describe(),
                if reach.list_jobs { "only list the jobs folder" } else { "do nothing there" }
            )),
            Some(Err(e)) => facts.push(format!("whether steps can reach it is unknown: {e}")),
        }
        if self.push_logs_every().is_some() {
            facts.push(format!(
                "logs pushed out every {} ms while they grow (other hosts see writes only once sent)",
                PUSH_LOGS_EVERY.as_millis()
            ));
        }
        facts
    }
}

/// The jobs folder's verdict now, probed again when the jobs folder is mounted anew.
#[derive(Debug)]
pub struct Drive {
    current: Mutex<Arc<Verdict>>,
    /// Reaps the probe's process (see [`probe`]).
    reaper: Arc<Reaper>,
}

impl Drive {
    pub fn new(verdict: Verdict, reaper: Arc<Reaper>) -> Self {
        Self {
            current: Mutex::new(Arc::new(verdict)),
            reaper,
        }
    }

    /// The verdict of the last probe.
    pub fn current(&self) -> Arc<Verdict> {
        self.lock().clone()
    }

    /// The verdict for a job about to run (blocking: call it off the runtime): the last one,
    /// or a new one when the jobs folder is on another device than when it was probed (it was
    /// mounted anew, or has appeared since), or when the last one is old: a minute for a
    /// usable jobs folder, 5 seconds for one that is not (a drive remounted read-write, a
    /// `chmod`, are seen without a new mount). A verdict that says something new is logged.
    pub fn for_job(&self, settings: &Settings) -> Arc<Verdict> {
        let mut current = self.lock();
        let ids = current.share.as_ref().map(|s| s.ids);
        let dev = nats_fs::share::as_ids(ids, || fs::metadata(&settings.jobs_dir))
            .ok()
            .map(|m| m.dev());
        let every = if current.unusable().is_some() {
            REPROBE_UNUSABLE
        } else {
            REPROBE_USABLE
        };
        let moved = dev != current.dev;
        if !moved && current.probed_at.elapsed() < every {
            return current.clone();
        }
        let verdict = probe(settings, Some(&self.reaper));
        if moved {
            log(&verdict, "the jobs folder changed");
        } else if verdict.line() != current.line() || verdict.unusable() != current.unusable() {
            log(&verdict, "probed the jobs folder again");
        }
        *current = Arc::new(verdict);
        current.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Arc<Verdict>> {
        self.current.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Logs a verdict: its line, and its refusal or problem.
pub fn log(verdict: &Verdict, why: &str) {
    use crate::logging::event;
    match (&verdict.refusal, &verdict.problem) {
        (Some(refusal), _) => tracing::error!(
            event = event::JOBS_DIR_REFUSED,
            "{why}: {}; REFUSED: {refusal}",
            verdict.line()
        ),
        (None, Some(problem)) => tracing::warn!(
            event = event::JOBS_DIR_PROBED,
            "{why}: {}; jobs cannot run here yet: {problem}",
            verdict.line()
        ),
        (None, None) => tracing::info!(event = event::JOBS_DIR_PROBED, "{why}: {}", verdict.line()),
    }
}

/// Probes the jobs folder (see the module docs). Blocking; makes and removes a folder on the
/// drive, and runs the runner once to try what a step could do: through `reaper`, when the
/// supervisor reaps its children itself (a `waitpid` of our own would find the child gone).
pub fn probe(settings: &Settings, reaper: Option<&Reaper>) -> Verdict {
    let jobs = &settings.jobs_dir;
    let mut verdict = Verdict::new(jobs, settings.share_isolation);
    if let Some(why) = overlap(jobs, &settings.workspaces_dir) {
        verdict.refuse(why);
    }
    if settings.pool.switch {
        check_workspaces_drive(settings, &mut verdict);
    }
    // Looked at as the share user when it is named (root may be squashed on the drive), and
    // as root otherwise: its owner is who it will be.
    let named = match settings.share_user.as_deref() {
        Some(spec) => match ShareUser::resolve(Some(spec), (0, 0)) {
            Ok(share) => Some(share.ids),
            Err(e) => {
                verdict.refuse(e);
                return verdict;
            }
        },
        None => None,
    };
    let meta = match nats_fs::share::as_ids(named, || fs::metadata(jobs)) {
        Ok(meta) if meta.is_dir() => meta,
        Ok(_) => {
            verdict.problem = Some(format!("{} is not a folder", jobs.display()));
            return verdict;
        }
        Err(e) => {
            verdict.problem = Some(format!("the jobs folder cannot be reached: {e}"));
            return verdict;
        }
    };
    verdict.dev = Some(meta.dev());
    verdict.mount = Mount::of(jobs).ok();
    let share = match ShareUser::resolve(settings.share_user.as_deref(), (meta.uid(), meta.gid())) {
        Ok(share) => share,
        Err(e) => {
            verdict.refuse(e);
            return verdict;
        }
    };
    if settings.pool.switch && settings.pool.contains(Uid::from_raw(share.ids.uid)) {
        verdict.refuse(format!(
            "the share user {} is an identity of the pool (--run-as): a step of it would own the jobs folder; \
             give the jobs folder another owner, or name another user with --share-user",
            share.describe()
        ));
    }
    if let Err(e) = share.adopt_groups() {
        verdict.problem = Some(format!("taking the share user's groups: {e}"));
    }
    verdict.share = Some(share.clone());
    let folder = jobs.join(format!(
        ".nats-fs-probe.{}.{}",
        nats_fs::host_name(),
        std::process::id()
    ));
    match share
        .ids
        .run(|| fs::DirBuilder::new().mode(0o755).create(&folder))
    {
        Ok(()) => {
            verdict.found.create = Some(Ok(()));
            try_the_drive(settings, reaper, &share, &folder, &mut verdict.found);
            remove_probe(&share, &folder);
        }
        Err(e) => {
            let read_only = e.raw_os_error() == Some(nix::libc::EROFS);
            verdict.found.create = Some(Err(e.to_string()));
            verdict.problem.get_or_insert(if read_only {
                "the drive is read-only: no job's results can be written".to_owned()
            } else {
                format!(
                    "the share user {} cannot create in it ({e}): results/ cannot be made either; \
                     give it the jobs folder, or name its owner with --share-user",
                    share.describe()
                )
            });
        }
    }
    if let Some(Ok((identity, reach))) = &verdict.found.reach {
        if reach.reaches_jobs() && settings.share_isolation == ShareIsolation::Required {
            let how = how_to_keep_steps_off(&verdict, &share);
            verdict.refuse(format!(
                "a step running as {} could {} there, its own job's and every other's; {how}; \
                 or accept that with --share-isolation off",
                identity.describe(),
                reach.describe()
            ));
        }
    }
    verdict
}

/// Tries the drive in the probe's folder: a file written, owned, chmodded, renamed over and
/// flushed as the share user; what root's own rights may do there; what a step could do.
fn try_the_drive(
    settings: &Settings,
    reaper: Option<&Reaper>,
    share: &ShareUser,
    folder: &Path,
    found: &mut Found,
) {
    let input = folder.join(Reach::FILE);
    share.ids.run(|| {
        let written = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&input)
            .and_then(|mut file| {
                std::io::Write::write_all(&mut file, b"probe\n")?;
                Ok(file)
            });
        let Ok(file) = written else {
            return;
        };
        found.fsync = Some(file.sync_all().map_err(|e| e.to_string()));
        if let Ok(meta) = file.metadata() {
            found.owner = Some((meta.uid(), meta.gid()));
        }
        let modes_kept = file
            .set_permissions(fs::Permissions::from_mode(0o640))
            .and_then(|()| file.metadata())
            .is_ok_and(|m| m.mode() & 0o777 == 0o640);
        found.modes_kept = Some(modes_kept);
        let _ = file.set_permissions(fs::Permissions::from_mode(0o644));
        let other = folder.join("other");
        found.rename_replaces = Some(
            fs::write(&other, "replaced\n")
                .and_then(|()| fs::rename(&other, &input))
                .and_then(|()| fs::read_to_string(&input))
                .is_ok_and(|text| text == "replaced\n"),
        );
        let _ = fs::remove_file(&other);
        let _ = fs::set_permissions(&input, fs::Permissions::from_mode(0o644));
    });
    if nix::unistd::geteuid().is_root() {
        let as_root = folder.join("root");
        let created = fs::write(&as_root, "");
        found.root_creates = Some(created.is_ok());
        if created.is_ok() {
            // To any other owner and back.
            let other = share.ids.uid.wrapping_add(1);
            let chowned = std::os::unix::fs::lchown(&as_root, Some(other), None).is_ok()
                && fs::symlink_metadata(&as_root).is_ok_and(|m| m.uid() == other);
            found.root_chowns = Some(chowned);
            let _ = fs::remove_file(&as_root);
        }
    }
    if settings.pool.switch {
        found.reach = Some(reach(settings, reaper, folder));
    }
}

/// Removes the probe's folder (as the share user: it made everything in it).
fn remove_probe(share: &ShareUser, folder: &Path) {
    if let Err(e) = share.ids.run(|| nats_fs::tree::remove_tree(folder)) {
        tracing::warn!("removing the probe's folder {}: {e}", folder.display());
    }
}

/// Runs `nats-fs-runner --reach` as the pool's first identity (they differ only by uid: what
/// the drive lets one do, it lets each do).
fn reach(
    settings: &Settings,
    reaper: Option<&Reaper>,
    folder: &Path,
) -> Result<(Identity, Reach), String> {
    let identity = settings
        .pool
        .identities()
        .first()
        .cloned()
        .ok_or("the pool is empty")?;
    let ids = format!(
        "{}:{}:{}",
        identity.uid,
        identity.gid,
        identity
            .groups
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    );
    let runner = settings.runner.display();
    let mut command = Command::new(&settings.runner);
    command
        .arg("--reach")
        .arg(folder)
        .arg("--as")
        .arg(ids)
        .env_clear()
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut start = || {
        let child = command.spawn()?;
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap_or(-1));
        Ok((pid, child))
    };
    let started = match reaper {
        Some(reaper) => reaper
            .spawn(start)
            .map(|(child, exited)| (child, Some((reaper, exited)))),
        None => start().map(|(_, child)| (child, None)),
    };
    let (mut child, exited) = started.map_err(|e| format!("starting {runner} --reach: {e}"))?;
    let succeeded = wait_briefly(&mut child, exited)?.ok_or_else(|| {
        format!(
            "{runner} --reach did not finish within {} s",
            REACH_TIMEOUT.as_secs()
        )
    })?;
    // What it prints is one short line, and its pipes end when it does.
    let (mut out, mut err) = (String::new(), String::new());
    if let Some(mut stdout) = child.stdout.take() {
        let _ = std::io::Read::read_to_string(&mut stdout, &mut out);
    }
    if let Some(mut stderr) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut stderr, &mut err);
    }
    if !succeeded {
        return Err(format!("{runner} --reach failed: {}", err.trim()));
    }
    let found = serde_json::from_str(&out)
        .map_err(|e| format!("reading what {runner} --reach printed: {e}"))?;
    Ok((identity, found))
}

/// Waits up to [`REACH_TIMEOUT`] for `child` to exit: whether it succeeded, `None` when it did
/// not end in time (then it is killed). Through the supervisor's reaper when there is one,
/// which collects every child; reaped here all the same, as the reaper's task may not run
/// while this thread waits (at start, on the runtime's own thread).
fn wait_briefly(
    child: &mut std::process::Child,
    mut exited: Option<(&Reaper, tokio::sync::oneshot::Receiver<crate::reaper::Exit>)>,
) -> Result<Option<bool>, String> {
    let deadline = std::time::Instant::now() + REACH_TIMEOUT;
    loop {
        let done = match exited.as_mut() {
            Some((reaper, exited)) => {
                reaper.reap();
                exited
                    .try_recv()
                    .ok()
                    .map(|exit| exit == crate::reaper::Exit::Code(0))
            }
            None => child
                .try_wait()
                .map_err(|e| e.to_string())?
                .map(|s| s.success()),
        };
        if done.is_some() {
            return Ok(done);
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// How to keep steps off this jobs folder, for the refusal.
fn how_to_keep_steps_off(verdict: &Verdict, share: &ShareUser) -> String {
    let jobs = verdict.jobs_dir.display();
    let user = share.name.strip_prefix("uid ").unwrap_or(&share.name);
    // What works on every kind of share: the local folder above the mount point is checked by
    // this host's kernel, whatever the share makes of users.
    let guard = format!(
        "mount it inside a folder only the share user may enter (install -d -o {user} -m 0700 \
         /srv/nats-fs, then mount the share at /srv/nats-fs/jobs)"
    );
    let squashed = verdict
        .found
        .owner
        .is_some_and(|(uid, _)| uid != share.ids.uid);
    match &verdict.mount {
        Some(mount)
            if mount.kind() == DriveKind::Fuse
                && mount.has_option("allow_other")
                && !mount.has_option("default_permissions") =>
        {
            format!(
                "the FUSE mount at {} (allow_other, without default_permissions) lets every local \
                 user do what its daemon may: mount it without allow_other (then only root, which \
                 mounted it, may use it), or {guard}",
                mount.point.display()
            )
        }
        Some(mount) if mount.kind() == DriveKind::Smb => format!(
            "the SMB mount at {} lets local users in as its uid= owner: mount it with \
             dir_mode=0700,file_mode=0600, or {guard}",
            mount.point.display()
        ),
        Some(mount)
            if squashed || mount.kind() == DriveKind::Nfs && mount.has_option("all_squash") =>
        {
            format!(
                "the share at {} makes every user one owner, so no mode keeps steps out: {guard}",
                mount.point.display()
            )
        }
        _ => format!(
            "close the jobs folder to the pool: chown {user} {jobs} && chmod 0700 {jobs} (or 0750 \
             with a group no identity of the pool is in), or {guard}"
        ),
    }
}

/// Why the workspaces folder and the jobs folder must not share a tree, if they do: the
/// supervisor removes whatever it finds in the workspaces folder at start, and a job folder
/// there would go with it.
pub fn overlap(jobs: &Path, workspaces: &Path) -> Option<String> {
    let real = |p: &Path| fs::canonicalize(p).unwrap_or_else(|_| p.to_owned());
    let (jobs, workspaces) = (real(jobs), real(workspaces));
    (jobs.starts_with(&workspaces) || workspaces.starts_with(&jobs)).then(|| {
        format!(
            "the jobs folder {} and the workspaces folder {} overlap: the supervisor clears the \
             workspaces folder of what earlier runs left, and would remove job folders with it; \
             give them folders apart",
            jobs.display(),
            workspaces.display()
        )
    })
}

/// A workspaces folder on a network share cannot keep jobs apart: refused.
fn check_workspaces_drive(settings: &Settings, verdict: &mut Verdict) {
    if let Ok(mount) = Mount::of(&settings.workspaces_dir) {
        if mount.kind() != DriveKind::Local {
            verdict.refuse(format!(
                "the workspaces folder {} is on {mount}: it must be on a disk of this host, where \
                 each job's identity owns its workspace (and where staging is fast)",
                settings.workspaces_dir.display()
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_share_user_is_the_owner_or_as_given() {
        let me = ShareUser::resolve(None, (0, 0)).unwrap();
        assert_eq!(me.name, "root");
        assert_eq!(me.ids, FsIds { uid: 0, gid: 0 });
        let bare = ShareUser::resolve(Some("4000123:4000124"), (0, 0)).unwrap();
        assert_eq!(bare.name, "uid 4000123");
        assert_eq!(
            bare.ids,
            FsIds {
                uid: 4_000_123,
                gid: 4_000_124
            }
        );
        assert_eq!(bare.groups, [Gid::from_raw(4_000_124)]);
        assert_eq!(bare.describe(), "uid 4000123 (gid 4000124)");
        let err = ShareUser::resolve(Some("no-such-user-here"), (0, 0)).unwrap_err();
        assert!(err.contains("there is no user"), "{err}");
        let err = ShareUser::resolve(Some("root:no-such-group"), (0, 0)).unwrap_err();
        assert!(err.contains("there is no group"), "{err}");
    }

    #[test]
    fn overlapping_folders_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let jobs = dir.path().join("jobs");
        let ws = dir.path().join("ws");
        fs::create_dir_all(&jobs).unwrap();
        fs::create_dir_all(&ws).unwrap();
        assert!(overlap(&jobs, &ws).is_none());
        assert!(overlap(&jobs, &jobs.join("ws")).is_some());
        assert!(overlap(&ws.join("jobs"), &ws).is_some());
        assert!(overlap(&jobs, &jobs).is_some());
    }
}
