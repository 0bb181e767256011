//! `--dry-run` (contract §9): run `./test-payload.json` once through the same runner and privilege
//! path as a real job, without NATS, and print the result message.

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{anyhow, Context};
use nats_fs::job::JobRequest;
use nats_fs::protocol::CancelMode;
use serde_json::Value;
use tokio::sync::{mpsc, watch};

use crate::config::Settings;
use crate::execute::{execute, Env, JobRun};
use crate::identity::Identities;
use crate::reaper::Reaper;
use crate::{share, sweep, Shutdown};

/// The payload file a dry run reads, in the current folder.
const PAYLOAD: &str = "test-payload.json";

/// Runs the payload's job; exit 0 on success, 1 otherwise.
pub async fn run(
    settings: &Settings,
    mut shutdown: watch::Receiver<Shutdown>,
) -> anyhow::Result<ExitCode> {
    let bytes = fs::read(PAYLOAD)
        .with_context(|| format!("reading ./{PAYLOAD} (the request a dry run sends)"))?;
    let mut value: Value =
        serde_json::from_slice(&bytes).with_context(|| format!("./{PAYLOAD} is not JSON"))?;
    if let Value::Object(fields) = &mut value {
        fields.entry("id").or_insert_with(|| Value::from("dry-run"));
    }
    let request = JobRequest::decode(value.to_string().as_bytes())
        .map_err(|e| anyhow!("./{PAYLOAD}: {e}"))?;
    let dir = settings.jobs_dir.join(request.id.as_str());
    if request.steps.is_some() && !dir.exists() {
        // A jobs folder made here is closed to the pool, as the probe wants it.
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("creating the job folder {}", dir.display()))?;
    }
    sweep::ensure_workspaces_dir(&settings.workspaces_dir, &settings.pool)?;
    nix::sys::prctl::set_child_subreaper(true).context("becoming a child subreaper")?;
    let reaper = Reaper::start().context("listening for SIGCHLD")?;
    let identities = Identities::new(settings.pool.clone());
    let verdict = share::probe(settings, Some(&reaper));
    share::log(&verdict, "probed the jobs folder");
    if let Some(refusal) = verdict.refusal.clone() {
        return Err(share::Refused(refusal).into());
    }
    let drive = Arc::new(share::Drive::new(verdict, reaper.clone()));

    // Ctrl-C cancels the job (TERM, grace, KILL); a second one kills it at once.
    let (tx, mut control) = mpsc::channel(4);
    tokio::spawn(async move {
        let mut cancelled = false;
        while shutdown.changed().await.is_ok() {
            let mode = match *shutdown.borrow() {
                Shutdown::Run => continue,
                Shutdown::Drain if !cancelled => CancelMode::Cancel,
                Shutdown::Drain | Shutdown::Now => CancelMode::AbortNow,
            };
            cancelled = true;
            let _ = tx.send(mode).await;
        }
    });
    let job = JobRun {
        settings,
        request: &request,
        attempt: 1,
        stream_sequence: None,
        tag: format!("dry{}", std::process::id()),
        events: crate::events::JobEvents::none(),
    };
    let env = Env {
        reaper: &reaper,
        identities: &identities,
        drive: &drive,
    };
    let (end, leftovers) = execute(&job, env, &mut control).await;
    leftovers.clear().await;
    let success = end.is_success();
    let result = end.into_result(request.id.as_str());
    println!("{}", serde_json::to_string(&result)?);
    if let Some(path) = result.manifest_file.as_deref() {
        eprintln!("manifest: {}", Path::new(&dir).join(path).display());
    }
    Ok(if success {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
