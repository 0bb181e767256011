//! Integration tests: real `nats-server` processes, the real binaries, real folders.
//!
//! Build the binaries first (`cargo build --workspace`; `scripts/test` does). Tests that drop
//! privileges need root, as CI has; they say SKIPPED otherwise.

// Test modules share helpers through `pub` items; this is a test binary, nothing escapes.
#![allow(unreachable_pub)]
// A failed unwrap in a test helper is a failed test, which is what it should be.
#![allow(clippy::unwrap_used)]

mod support;

/// Shares to mount a jobs folder on (bindfs, sshfs), for `shares` and the benchmark.
mod mounts;

/// `nats-fs-runner --job`: staging, steps, logs, sync, manifest, process cleanup.
mod runner;

/// `nats-fs-supervisor`: the contract end to end, rejected input, privilege drop, leases,
/// cancel, concurrency, configuration errors and the dry run.
mod supervisor;

/// Isolation, attacked: jobs against each other, against their runner and their limits;
/// forged results, hostile job folders, leaked descriptors, duplicate deliveries, zombies.
mod isolation;

/// Operability: systemd notifications, the NATS service API, job events, metrics.
mod operability;

/// Reliability under faults: crashes, restarts, drains, competition, host faults, lost acks
/// and leases, a clustered server, dead letters.
mod faults;

/// Containment: process and memory limits, disk room, OOM scores, rlimits, the timeout ceiling.
mod containment;

/// The jobs folder on real shares (bindfs, sshfs): the contract, the attacks, the probe.
mod shares;

/// Job limits enforced by the runner: output quota, idle timeout, rlimits, a full drive, resources.
mod limits;
