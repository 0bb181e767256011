//! The shared drive, as the worker meets it: whose rights a file system call uses, and which
//! mount (and so which kind of drive) holds a folder.
//!
//! **Whose rights.** The worker's own code touches the jobs folder, never a step: it stages the
//! job folder, streams the logs, copies the artifacts and writes `result.json` (contract §4).
//! It does so with the rights of one user, the *share user* (`--share-user`, by default the
//! owner of the jobs folder): the user the controller and the export agree on. On an NFS
//! export with `root_squash` root is nobody, so root's own rights would not do; on every kind
//! of share, files the worker creates then belong to whoever the share makes that user, so the
//! controller can read them and clean them up. The worker's processes stay root (they start
//! the steps as the job's identity), and take the share user's rights only for the file system
//! calls on the share: Linux keeps a *file system* uid and gid per thread (`setfsuid(2)`),
//! which is what a local file system, NFS (its RPC credentials) and FUSE (its request header)
//! look at. [`FsIds::enter`] switches the calling thread, and switches it back when the guard
//! goes. The same switch, to the job's identity, makes what the worker writes into a job's
//! private workspace the job's own.
//!
//! **Which drive.** [`Mount::of`] finds the mount that holds a folder in
//! `/proc/self/mountinfo` (by device number, the longest mount point above it), which names
//! its file system type (`nfs4`, `cifs`, `fuse.sshfs`, `ext4`, …), source and options.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::unistd::{Gid, Uid};
use serde::{Deserialize, Serialize};

/// A user and group whose rights file system calls use: a thread's fsuid and fsgid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FsIds {
    pub uid: u32,
    pub gid: u32,
}

impl FsIds {
    /// This process's own effective ids.
    #[must_use]
    pub fn of_process() -> Self {
        Self {
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
        }
    }

    /// This process's effective ids as they were when first asked: a process that takes other
    /// file system ids for its calls does not change its own (a runner gives up root only as
    /// its very last act).
    fn of_process_at_start() -> Self {
        static IDS: std::sync::OnceLock<FsIds> = std::sync::OnceLock::new();
        *IDS.get_or_init(Self::of_process)
    }

    /// Makes the calling thread's file system calls use these ids until the guard is dropped,
    /// which restores the thread's own. Only root can take other ids; for any other process,
    /// and for ids it has already, this changes nothing (its calls use its own rights, which
    /// are the only ones it has).
    ///
    /// Per thread: `setfsuid(2)` and `setfsgid(2)` change the calling thread's credentials
    /// only (glibc does not pass them on to the other threads, as it does for `setuid`). A
    /// thread started while they are taken starts with them: start threads outside the guard.
    /// Taking a non-zero fsuid also takes away root's file capabilities (`CAP_DAC_OVERRIDE`,
    /// `CAP_CHOWN`, `CAP_FOWNER`, …) for this thread's file system calls until it gives the ids
    /// back: a call made as the share user is checked exactly as that user's would be.
    #[must_use = "the ids hold only while the guard lives"]
    pub fn enter(self) -> AsIds {
        let own = Self::of_process_at_start();
        if self == own || own.uid != 0 {
            return AsIds { previous: None };
        }
        // The group first: it needs CAP_SETGID, which a non-zero fsuid would not take away,
        // but the order keeps the two changes symmetrical with the restore.
        let gid = nix::unistd::setfsgid(Gid::from_raw(self.gid));
        let uid = nix::unistd::setfsuid(Uid::from_raw(self.uid));
        AsIds {
            previous: Some((uid, gid)),
        }
    }

    /// Runs `work` with these ids (see [`FsIds::enter`]).
    pub fn run<T>(self, work: impl FnOnce() -> T) -> T {
        let _ids = self.enter();
        work()
    }
}

impl std::fmt::Display for FsIds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "uid {} gid {}", self.uid, self.gid)
    }
}

/// Runs `work` as `ids` when there are some, else with the thread's own rights.
pub fn as_ids<T>(ids: Option<FsIds>, work: impl FnOnce() -> T) -> T {
    match ids {
        Some(ids) => ids.run(work),
        None => work(),
    }
}

/// A thread's file system ids, taken by [`FsIds::enter`]; dropping it gives back the ones the
/// thread had.
#[derive(Debug)]
pub struct AsIds {
    previous: Option<(Uid, Gid)>,
}

impl Drop for AsIds {
    fn drop(&mut self) {
        if let Some((uid, gid)) = self.previous {
            nix::unistd::setfsuid(uid);
            nix::unistd::setfsgid(gid);
        }
    }
}

/// What an identity of the pool could do to a job folder made as a controller makes one
/// (folder 0755, a file 0644 in it, both the share user's), as `nats-fs-runner --reach` found
/// out by trying, as that identity, in a real process of its own: a FUSE mount without
/// `allow_other` refuses a process by its real uid, which a thread's file system ids do not
/// show.
// Five answers to five questions: a bool each is what they are.
#[allow(clippy::struct_excessive_bools)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reach {
    /// It could list the jobs folder (see which jobs there are).
    pub list_jobs: bool,
    /// It could list the job folder.
    pub list_job: bool,
    /// It could read the file.
    pub read: bool,
    /// It could open the file for writing.
    pub write: bool,
    /// It could create a file in the job folder.
    pub create: bool,
}

impl Reach {
    /// The name of the file in the probe's job folder.
    pub const FILE: &'static str = "input";

    /// Whether a step could read or change another job's folder.
    #[must_use]
    pub fn reaches_jobs(&self) -> bool {
        self.list_job || self.read || self.write || self.create
    }

    /// What it could do, for people: `list, read and write job folders`.
    #[must_use]
    pub fn describe(&self) -> String {
        let could: Vec<&str> = [
            (self.list_jobs, "list the jobs folder"),
            (self.list_job, "list a job folder"),
            (self.read, "read a job's files"),
            (self.write, "change a job's files"),
            (self.create, "create files in a job folder"),
        ]
        .into_iter()
        .filter_map(|(could, what)| could.then_some(what))
        .collect();
        match could.as_slice() {
            [] => "nothing".to_owned(),
            [one] => (*one).to_owned(),
            [first @ .., last] => format!("{}, and {last}", first.join(", ")),
        }
    }
}

/// The kind of drive a mount is, as far as the worker cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DriveKind {
    /// A disk of this host (ext4, xfs, btrfs, tmpfs, …).
    Local,
    /// NFS: owners kept or squashed by the export; other hosts see what this one wrote only
    /// once it is sent to the server.
    Nfs,
    /// SMB/CIFS.
    Smb,
    /// A FUSE file system (sshfs, bindfs, …): whatever its daemon makes of it.
    Fuse,
}

impl DriveKind {
    /// The kind of a mount of file system type `fstype` (as `/proc/self/mountinfo` names it).
    #[must_use]
    pub fn of_type(fstype: &str) -> Self {
        match fstype {
            "nfs" | "nfs4" => Self::Nfs,
            "cifs" | "smb3" | "smbfs" => Self::Smb,
            t if t == "fuse" || t == "fuseblk" || t.starts_with("fuse.") => Self::Fuse,
            _ => Self::Local,
        }
    }

    /// Whether what this host writes reaches other hosts only once it is sent: NFS clients
    /// keep written data in their page cache (for up to half a minute), so a log another host
    /// reads must be pushed out while it grows. FUSE file systems send every write to their
    /// daemon; SMB hands a file's cached writes over when another client opens it.
    #[must_use]
    pub fn holds_writes_back(self) -> bool {
        self == Self::Nfs
    }
}

/// A mounted file system, as `/proc/self/mountinfo` describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    /// The mount's id: a new mount at the same place has another.
    pub id: u64,
    /// Where it is mounted.
    pub point: PathBuf,
    /// The file system type: `nfs4`, `cifs`, `fuse.sshfs`, `ext4`, …
    pub fstype: String,
    /// What is mounted: `server:/export`, `//server/share`, `user@host:/path`, a device.
    pub source: String,
    /// The mount's options and the file system's, comma-separated.
    pub options: String,
}

impl Mount {
    /// The mount holding `path` (which must exist): the mount with the device number of
    /// `path` whose mount point is the longest one above it.
    pub fn of(path: &Path) -> io::Result<Self> {
        let meta = fs::metadata(path)?;
        let path = fs::canonicalize(path)?;
        let dev = (
            nix::sys::stat::major(meta.dev()),
            nix::sys::stat::minor(meta.dev()),
        );
        let table = fs::read_to_string("/proc/self/mountinfo")?;
        table
            .lines()
            .filter_map(parse_mountinfo_line)
            .filter(|(device, mount)| *device == dev && path.starts_with(&mount.point))
            .max_by_key(|(_, mount)| mount.point.as_os_str().len())
            .map(|(_, mount)| mount)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("no mount in /proc/self/mountinfo holds {}", path.display()),
                )
            })
    }

    /// The kind of drive it is.
    #[must_use]
    pub fn kind(&self) -> DriveKind {
        DriveKind::of_type(&self.fstype)
    }

    /// Whether one of its options is `name` (`allow_other`, `ro`, `default_permissions`).
    #[must_use]
    pub fn has_option(&self, name: &str) -> bool {
        self.options.split(',').any(|o| o == name)
    }
}

impl std::fmt::Display for Mount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} at {}",
            self.fstype,
            self.source,
            self.point.display()
        )
    }
}

/// One line of `/proc/self/mountinfo` (see proc(5)): `36 35 98:0 /mnt1 /mnt2 rw,noatime
/// master:1 - ext3 /dev/root rw,errors=continue`, with the device number. Mount points with
/// spaces are written with octal escapes (`\040`).
fn parse_mountinfo_line(line: &str) -> Option<((u64, u64), Mount)> {
    let (before, after) = line.split_once(" - ")?;
    let mut fields = before.split(' ');
    let id = fields.next()?.parse().ok()?;
    let _parent = fields.next()?;
    let (major, minor) = fields.next()?.split_once(':')?;
    let _root = fields.next()?;
    let point = unescape(fields.next()?);
    let mount_options = fields.next()?;
    let mut rest = after.split(' ');
    let fstype = rest.next()?.to_owned();
    let source = unescape(rest.next()?);
    let super_options = rest.next().unwrap_or("");
    Some((
        (major.parse().ok()?, minor.parse().ok()?),
        Mount {
            id,
            point: PathBuf::from(point),
            fstype,
            source,
            options: format!("{mount_options},{super_options}"),
        },
    ))
}

/// Undoes the octal escapes of `/proc/self/mountinfo` (`\040` for a space, `\011`, `\012`,
/// `\134`).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            if let Some(byte) = field
                .get(i + 1..i + 4)
                .and_then(|digits| u8::from_str_radix(digits, 8).ok())
            {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_are_read_with_their_escapes() {
        let (dev, mount) = parse_mountinfo_line(
            "36 35 98:0 /mnt1 /srv/build\\040jobs rw,noatime master:1 - nfs4 fs1:/export rw,vers=4.2",
        )
        .unwrap();
        assert_eq!(dev, (98, 0));
        assert_eq!(mount.id, 36);
        assert_eq!(mount.point, Path::new("/srv/build jobs"));
        assert_eq!(mount.fstype, "nfs4");
        assert_eq!(mount.source, "fs1:/export");
        assert!(mount.has_option("noatime") && mount.has_option("vers=4.2"));
        assert_eq!(mount.kind(), DriveKind::Nfs);
        assert!(mount.kind().holds_writes_back());
        assert_eq!(DriveKind::of_type("fuse.sshfs"), DriveKind::Fuse);
        assert_eq!(DriveKind::of_type("cifs"), DriveKind::Smb);
        assert_eq!(DriveKind::of_type("ext4"), DriveKind::Local);
        assert_eq!(unescape("a\\134b\\011"), "a\\b\t");
    }

    #[test]
    fn the_mount_of_a_folder_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let mount = Mount::of(dir.path()).unwrap();
        assert!(dir.path().canonicalize().unwrap().starts_with(&mount.point));
        assert!(!mount.fstype.is_empty());
        assert!(Mount::of(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn a_thread_takes_other_file_system_ids_alone_and_gives_them_back() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED: taking other file system ids needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let ids = FsIds {
            uid: 4_000_123,
            gid: 4_000_124,
        };
        let (entered, seen) = (std::sync::Barrier::new(2), std::sync::Barrier::new(2));
        let made = std::thread::scope(|scope| {
            // Another thread keeps its own ids meanwhile.
            scope.spawn(|| {
                entered.wait();
                assert_eq!(fs_ids_of_this_thread(), (0, 0));
                seen.wait();
            });
            scope
                .spawn(|| {
                    let _as = ids.enter();
                    entered.wait();
                    seen.wait();
                    assert_eq!(fs_ids_of_this_thread(), (4_000_123, 4_000_124));
                    // Checked as that user: root's folder 0700 is closed to it.
                    let closed = fs::write(dir.path().join("refused"), "x");
                    (closed, fs_ids_of_this_thread())
                })
                .join()
                .unwrap()
        });
        assert_eq!(made.1, (4_000_123, 4_000_124));
        assert_eq!(
            made.0.unwrap_err().kind(),
            io::ErrorKind::PermissionDenied,
            "a tempdir is 0700 root's"
        );
        // What it creates where it may is its own.
        fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o777),
        )
        .unwrap();
        let file = dir.path().join("made");
        ids.run(|| fs::write(&file, "x")).unwrap();
        let meta = fs::metadata(&file).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (4_000_123, 4_000_124));
        assert_eq!(fs_ids_of_this_thread(), (0, 0));
    }

    /// The calling thread's fsuid and fsgid, from `/proc/thread-self/status`.
    fn fs_ids_of_this_thread() -> (u32, u32) {
        let status = fs::read_to_string("/proc/thread-self/status").unwrap();
        let field = |name: &str| -> u32 {
            let line = status.lines().find(|l| l.starts_with(name)).unwrap();
            line.split_whitespace().nth(4).unwrap().parse().unwrap()
        };
        (field("Uid:"), field("Gid:"))
    }
}
