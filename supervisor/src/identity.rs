//! Who runs the jobs: the pool of identities given by `--run-as`, and which slot holds which.
//!
//! Jobs that run at the same time must never share a uid: the kernel lets a process signal,
//! ptrace and read through `/proc` any other process of its own uid, and write any file it
//! owns. So every running job holds an identity of its own from the pool, and gives it back
//! only once nothing of the job is left. A pool is one user, a list of users
//! (`ci1,ci2,ci3`), or a range of uids (`61184-61215`, which need no passwd entries). All of a
//! pool may share one group (`--run-as-group`), the usual way to reach the shared drive.
//!
//! A pool of two or more identities is *dedicated*: its users serve nothing else, so when a job
//! ends every process of its uid is killed, whatever the runner said. A single user (such as
//! the default `nobody`) may be shared with other programs on the host; then only what
//! descends from the job is killed.

use std::collections::{BTreeSet, VecDeque};
use std::ffi::CString;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::{anyhow, bail, Context};
use nix::unistd::{Gid, Group, Uid, User};
use tokio::sync::Notify;

/// The most identities a pool may have (a typo such as `1000-100000` is not a pool).
const MAX_POOL: u32 = 65_536;

/// One user a runner and its steps run as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The user name, or `uid N` for a uid without a passwd entry.
    pub name: String,
    pub uid: Uid,
    /// The primary group.
    pub gid: Gid,
    /// Supplementary groups (the user's own, from `getgrouplist`, plus the pool's group).
    pub groups: Vec<Gid>,
}

impl Identity {
    /// How the identity appears in messages: `ci1 (uid 1001)`.
    pub fn describe(&self) -> String {
        if self.name == format!("uid {}", self.uid) {
            self.name.clone()
        } else {
            format!("{} (uid {})", self.name, self.uid)
        }
    }

    /// Whether this identity may enter (search) a folder with these owner, group and mode.
    fn may_enter(&self, meta: &std::fs::Metadata) -> bool {
        use std::os::unix::fs::MetadataExt;
        if self.uid.is_root() {
            return true;
        }
        let mode = meta.mode();
        if meta.uid() == self.uid.as_raw() {
            mode & 0o100 != 0
        } else if meta.gid() == self.gid.as_raw()
            || self.groups.iter().any(|g| g.as_raw() == meta.gid())
        {
            mode & 0o010 != 0
        } else {
            mode & 0o001 != 0
        }
    }
}

/// The identities of `--run-as`, resolved once at start.
#[derive(Debug, Clone)]
pub struct Pool {
    identities: Vec<Identity>,
    /// Whether spawning switches to the identity (we are root and it is not).
    pub switch: bool,
}

impl Pool {
    /// Resolves `--run-as` (`spec`) and `--run-as-group` (`group`). When we are not root the
    /// pool can only be ourselves; as root it defaults to `nobody`.
    pub fn resolve(spec: Option<&str>, group: Option<&str>) -> anyhow::Result<Self> {
        let euid = nix::unistd::geteuid();
        if !euid.is_root() {
            let me = User::from_uid(euid)
                .ok()
                .flatten()
                .map_or_else(|| euid.to_string(), |u| u.name);
            if let Some(requested) = spec {
                if requested != me && requested != euid.to_string() {
                    bail!("--run-as {requested} needs the supervisor to start as root; it runs as {me}");
                }
            }
            if group.is_some() {
                bail!("--run-as-group needs the supervisor to start as root");
            }
            return Ok(Self {
                identities: vec![Identity {
                    name: me,
                    uid: euid,
                    gid: nix::unistd::getegid(),
                    groups: Vec::new(),
                }],
                switch: false,
            });
        }
        let group = Groups {
            pool: group.map(resolve_group).transpose()?,
            nogroup: Group::from_name("nogroup")
                .ok()
                .flatten()
                .map_or(Gid::from_raw(65_534), |g| g.gid),
        };
        let spec = spec.unwrap_or("nobody");
        let identities = match parse_range(spec)? {
            Some((first, last)) => (first..=last)
                .map(|uid| by_uid(Uid::from_raw(uid), group))
                .collect::<anyhow::Result<Vec<_>>>()?,
            None => spec
                .split(',')
                .map(str::trim)
                .filter(|entry| !entry.is_empty())
                .map(|entry| by_name_or_uid(entry, group))
                .collect::<anyhow::Result<Vec<_>>>()?,
        };
        let mut seen = BTreeSet::new();
        for identity in &identities {
            if !seen.insert(identity.uid.as_raw()) {
                bail!("--run-as names uid {} twice", identity.uid);
            }
        }
        let Some(first) = identities.first() else {
            bail!("--run-as {spec:?} names no user");
        };
        if identities.len() > 1 && identities.iter().any(|i| i.uid.is_root()) {
            bail!("--run-as: root cannot be part of a pool; jobs must run unprivileged");
        }
        let switch = !first.uid.is_root();
        if switch {
            if let Some(identity) = identities
                .iter()
                .find(|i| i.gid.as_raw() == 0 || i.groups.iter().any(|g| g.as_raw() == 0))
            {
                bail!(
                    "--run-as: {} would run with the root group (gid 0), which reaches root's \
                     files and sees every process; give the pool another group (--run-as-group)",
                    identity.describe()
                );
            }
        }
        Ok(Self { identities, switch })
    }

    /// How many identities there are.
    pub fn len(&self) -> usize {
        self.identities.len()
    }

    /// Never true: a pool has at least one identity.
    pub fn is_empty(&self) -> bool {
        self.identities.is_empty()
    }

    /// The identities, in the order given.
    pub fn identities(&self) -> &[Identity] {
        &self.identities
    }

    /// Whether every identity belongs to this supervisor alone (see the module docs), so that
    /// every process of a slot's uid belongs to the job holding it.
    pub fn dedicated(&self) -> bool {
        self.switch && self.identities.len() > 1
    }

    /// Whether every identity may enter (search) every folder on the way to `path`; if not,
    /// why, for the first one that may not. Each folder is looked at once, whatever the size
    /// of the pool.
    pub fn can_traverse(&self, path: &Path) -> Result<(), String> {
        use std::os::unix::fs::MetadataExt;
        let folders = path
            .ancestors()
            .map(|dir| {
                let meta = std::fs::metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
                Ok((dir, meta))
            })
            .collect::<Result<Vec<_>, String>>()?;
        for identity in &self.identities {
            if let Some((dir, meta)) = folders.iter().find(|(_, meta)| !identity.may_enter(meta)) {
                return Err(format!(
                    "{} (mode {:o}) cannot be entered by {}",
                    dir.display(),
                    meta.mode() & 0o7777,
                    identity.describe()
                ));
            }
        }
        Ok(())
    }

    /// Whether `uid` is one of the pool's.
    pub fn contains(&self, uid: Uid) -> bool {
        self.identities.iter().any(|i| i.uid == uid)
    }

    /// The pool in one line: `nats-fs-1 (uid 999) … nats-fs-4 (uid 996), 4 users`.
    pub fn describe(&self) -> String {
        match self.identities.as_slice() {
            [one] => one.describe(),
            [first, .., last] => format!(
                "{} … {}, {} users",
                first.describe(),
                last.describe(),
                self.identities.len()
            ),
            [] => "nobody".to_owned(),
        }
    }

    /// Checks the pool against `--concurrency`: a pool of several identities needs one per
    /// slot; a single user may serve every slot, at the price of isolation (see
    /// [`Pool::shared_by_slots`]).
    pub fn check_concurrency(&self, concurrency: usize) -> anyhow::Result<()> {
        if self.identities.len() > 1 && self.identities.len() < concurrency {
            bail!(
                "--run-as gives {} identities but --concurrency (NATS_FS_CONCURRENCY) is {concurrency}: \
                 every slot needs an identity of its own; add users (or widen the uid range) or lower the concurrency",
                self.identities.len()
            );
        }
        Ok(())
    }

    /// Whether jobs running at the same time share the one identity.
    pub fn shared_by_slots(&self, concurrency: usize) -> bool {
        self.identities.len() == 1 && concurrency > 1
    }
}

/// `first-last` as a uid range, `None` for anything else.
fn parse_range(spec: &str) -> anyhow::Result<Option<(u32, u32)>> {
    let Some((first, last)) = spec.split_once('-') else {
        return Ok(None);
    };
    let (first, last) = (first.trim(), last.trim());
    if !(is_number(first) && is_number(last)) {
        return Ok(None);
    }
    let parse = |s: &str| {
        s.parse::<u32>()
            .map_err(|_| anyhow!("--run-as {spec}: {s} is not a uid"))
    };
    let (first, last) = (parse(first)?, parse(last)?);
    if first == 0 || first > last {
        bail!("--run-as {spec}: a uid range goes from a first uid above 0 up to a last one, such as 61184-61215");
    }
    if last - first >= MAX_POOL {
        bail!("--run-as {spec}: a range may hold at most {MAX_POOL} uids");
    }
    Ok(Some((first, last)))
}

fn is_number(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// The group every identity of the pool runs with.
fn resolve_group(spec: &str) -> anyhow::Result<Gid> {
    if is_number(spec) {
        let gid = spec
            .parse::<u32>()
            .map_err(|_| anyhow!("--run-as-group {spec} is not a gid"))?;
        return Ok(Gid::from_raw(gid));
    }
    Group::from_name(spec)
        .with_context(|| format!("looking up --run-as-group {spec:?}"))?
        .map(|g| g.gid)
        .ok_or_else(|| anyhow!("--run-as-group: there is no group {spec:?} on this host"))
}

/// The groups identities get: the pool's (`--run-as-group`), if given; `nogroup` for a uid
/// without a passwd entry otherwise. Looked up once for the whole pool.
#[derive(Debug, Clone, Copy)]
struct Groups {
    pool: Option<Gid>,
    nogroup: Gid,
}

/// A user by name, or by uid (a uid need not have a passwd entry).
fn by_name_or_uid(entry: &str, group: Groups) -> anyhow::Result<Identity> {
    if is_number(entry) {
        let uid = entry
            .parse::<u32>()
            .map_err(|_| anyhow!("--run-as: {entry} is not a uid"))?;
        return by_uid(Uid::from_raw(uid), group);
    }
    let user = User::from_name(entry)
        .with_context(|| format!("looking up --run-as user {entry:?}"))?
        .ok_or_else(|| anyhow!("--run-as: there is no user {entry:?} on this host"))?;
    from_user(user, group.pool)
}

/// A uid: its passwd entry when there is one, else just the uid with the pool's group (or
/// `nogroup`).
fn by_uid(uid: Uid, group: Groups) -> anyhow::Result<Identity> {
    if let Some(user) = User::from_uid(uid).with_context(|| format!("looking up uid {uid}"))? {
        return from_user(user, group.pool);
    }
    let gid = group.pool.unwrap_or(group.nogroup);
    Ok(Identity {
        name: format!("uid {uid}"),
        uid,
        gid,
        groups: vec![gid],
    })
}

fn from_user(user: User, group: Option<Gid>) -> anyhow::Result<Identity> {
    let cname = CString::new(user.name.as_str()).context("--run-as: a user name with NUL")?;
    let mut groups = nix::unistd::getgrouplist(&cname, user.gid)
        .with_context(|| format!("looking up the groups of {}", user.name))?;
    let gid = group.unwrap_or(user.gid);
    if !groups.contains(&gid) {
        groups.push(gid);
    }
    Ok(Identity {
        name: user.name,
        uid: user.uid,
        gid,
        groups,
    })
}

/// Which identities are free. A job takes one for its whole life, cleanup included; a pool of
/// one user is lent to every slot at once.
#[derive(Debug)]
pub struct Identities {
    pool: Arc<Pool>,
    free: Mutex<VecDeque<usize>>,
    returned: Notify,
}

impl Identities {
    pub fn new(pool: Arc<Pool>) -> Self {
        Self {
            free: Mutex::new((0..pool.len()).collect()),
            pool,
            returned: Notify::new(),
        }
    }

    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// Takes the identity that has been free the longest (so a uid rests between jobs), waiting
    /// if none is free.
    pub async fn acquire(&self) -> Held<'_> {
        if self.pool.len() == 1 {
            return Held {
                identities: self,
                index: None,
            };
        }
        loop {
            let notified = self.returned.notified();
            if let Some(index) = self.lock().pop_front() {
                return Held {
                    identities: self,
                    index: Some(index),
                };
            }
            notified.await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<usize>> {
        self.free.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// An identity held by one job; given back when dropped.
#[derive(Debug)]
pub struct Held<'a> {
    identities: &'a Identities,
    /// `None` for the one identity of a single-user pool, which is never exclusive.
    index: Option<usize>,
}

impl Held<'_> {
    pub fn identity(&self) -> &Identity {
        &self.identities.pool.identities[self.index.unwrap_or(0)]
    }

    /// Whether every process of this identity's uid belongs to the job holding it.
    pub fn exclusive(&self) -> bool {
        self.index.is_some() && self.identities.pool.dedicated()
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if let Some(index) = self.index {
            self.identities.lock().push_back(index);
            self.identities.returned.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    #[test]
    fn ranges_lists_and_mistakes() {
        assert_eq!(parse_range("61184-61215").unwrap(), Some((61184, 61215)));
        assert_eq!(parse_range("nats-fs-1").unwrap(), None);
        assert_eq!(parse_range("a-1").unwrap(), None);
        assert!(parse_range("0-10").is_err());
        assert!(parse_range("10-5").is_err());
        assert!(parse_range("1-99999999").is_err());
        if !root() {
            return;
        }
        let pool = Pool::resolve(Some("61184-61215"), Some("65534")).unwrap();
        assert_eq!(pool.len(), 32);
        assert!(pool.switch && pool.dedicated());
        assert_eq!(pool.identities()[0].gid, Gid::from_raw(65534));
        assert!(Pool::resolve(Some("61184-61215"), Some("0"))
            .unwrap_err()
            .to_string()
            .contains("root group"));
        assert!(pool.check_concurrency(32).is_ok());
        let err = pool.check_concurrency(33).unwrap_err().to_string();
        assert!(err.contains("32 identities"), "{err}");
        let one = Pool::resolve(Some("nobody"), None).unwrap();
        assert!(one.switch && !one.dedicated());
        assert!(one.check_concurrency(4).is_ok());
        assert!(one.shared_by_slots(4));
        assert!(Pool::resolve(Some("nobody,65534"), None)
            .unwrap_err()
            .to_string()
            .contains("twice"));
        assert!(Pool::resolve(Some("nobody,root"), None).is_err());
        assert!(Pool::resolve(Some("no-such-user-here"), None).is_err());
        assert!(Pool::resolve(Some("nobody"), Some("no-such-group-here")).is_err());
    }

    #[test]
    fn a_folder_the_pool_cannot_enter_is_named_with_who_cannot() {
        use std::os::unix::fs::PermissionsExt;
        let identity = |uid, gid| Identity {
            name: format!("uid {uid}"),
            uid: Uid::from_raw(uid),
            gid: Gid::from_raw(gid),
            groups: vec![Gid::from_raw(gid)],
        };
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("jobs");
        std::fs::create_dir(&dir).unwrap();
        let owner = std::os::unix::fs::MetadataExt::gid(&std::fs::metadata(&dir).unwrap());
        // The second identity is in the folder's group; the third is not.
        let pool = Pool {
            identities: vec![
                identity(3_999_001, 3_999_001),
                identity(3_999_002, owner),
                identity(3_999_003, 3_999_003),
            ],
            switch: true,
        };
        let mode =
            |bits| std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(bits)).unwrap();
        mode(0o711);
        assert_eq!(pool.can_traverse(&dir), Ok(()));
        mode(0o710);
        let err = pool.can_traverse(&dir).unwrap_err();
        assert!(
            err.contains("mode 710") && err.contains("uid 3999001"),
            "{err}"
        );
        let members = Pool {
            identities: pool.identities[1..2].to_vec(),
            switch: true,
        };
        assert_eq!(members.can_traverse(&dir), Ok(()));
        assert!(pool.can_traverse(&dir.join("missing/x")).is_err());
    }

    #[tokio::test]
    async fn identities_rotate_and_come_back() {
        let identity = |uid| Identity {
            name: format!("uid {uid}"),
            uid: Uid::from_raw(uid),
            gid: Gid::from_raw(uid),
            groups: vec![],
        };
        let identities = Identities::new(Arc::new(Pool {
            identities: vec![identity(1), identity(2)],
            switch: true,
        }));
        let a = identities.acquire().await;
        let b = identities.acquire().await;
        assert_ne!(a.identity().uid, b.identity().uid);
        assert!(a.exclusive());
        let first = a.identity().uid;
        drop(a);
        let c = identities.acquire().await;
        assert_eq!(c.identity().uid, first);
        // A third waits until one is given back.
        let waiting =
            tokio::time::timeout(std::time::Duration::from_millis(50), identities.acquire()).await;
        assert!(waiting.is_err());
    }
}
