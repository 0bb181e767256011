//! `nats-fs`: the contract shared by `nats-fs-supervisor`, `nats-fs-runner` and their users.
//!
//! A controller drops a job folder on a shared drive (`{jobs_dir}/{id}/job.json`) and publishes
//! `{"id": "…"}` on a JetStream subject. A supervisor on each host pulls the request, spawns one
//! runner per job and talks to it over a pipe; the runner stages the folder (as the share
//! user), runs the steps (as the job's identity), syncs artifacts back to `results/` and writes `results/result.json`; the
//! supervisor then publishes the result message and acks.
//!
//! The contract is written down in `docs/contract.md`; comments cite it as "contract §n".
//! This crate holds everything both sides (and tests, and controllers written in Rust) must agree
//! on, as plain data with validation, and no I/O policy of its own beyond a few file helpers.
//!
//! # Layout
//! - [`fds`]: descriptor hygiene (nothing inherited reaches a runner or a step).
//! - `generate` (feature `generate`): the binaries' manual pages and shell completions.
//! - [`folder`]: opening a job folder and `results/` without following symlinks; `job.json`.
//! - [`job`]: the request (`{"id", "steps"?}`), `job.json`, steps, ids and durations, validated.
//! - [`limits`]: a job's resource limits, as asked for and as the operator allows.
//! - [`manifest`]: `results/result.json`, the result message, statuses and their exit codes.
//! - [`outcome`]: how a job ended ([`JobOutcome`]), from the runner through the pipe to the ack.
//! - [`protocol`]: the supervisor⇄runner pipe messages (versioned JSON lines).
//! - [`share`]: the shared drive: whose rights a file system call uses, which mount holds a
//!   folder.
//! - [`step_env`]: the environment every step starts from (`PATH`, `LANG`).
//! - [`tree`]: file-tree helpers both processes need (removing a tree a job may have locked).
//! - [`reap`]: finding and killing the leftover children of a process (`/proc` scan).

pub mod fds;
pub mod folder;
#[cfg(feature = "generate")]
pub mod generate;
pub mod job;
pub mod limits;
pub mod manifest;
pub mod outcome;
pub mod protocol;
pub mod reap;
pub mod share;
pub mod step_env;
pub mod tree;

pub use job::{JobId, JobRequest, JobSpec, RequestError, SpecError, Step};
pub use manifest::{Manifest, ResultMessage, Status};
pub use outcome::JobOutcome;
pub use protocol::{FromRunner, StartJob, ToRunner, PROTOCOL_VERSION};

/// A duration in whole milliseconds, as every `…_ms` / `…Ms` field has it (saturating).
#[must_use]
pub fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// This host's name, as results, events and locks report it (empty if it cannot be read).
#[must_use]
pub fn host_name() -> String {
    nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default()
}
