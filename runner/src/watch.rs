//! `--watch`: run the job, then run it again whenever something in its folder changes.
//!
//! inotify (through `notify`) is good at "something changed" and poor at "exactly what" (its
//! queue overflows and drops events under load), which is all this needs: any relevant event, debounced,
//! triggers a whole new run, and each run stages afresh. Changes under `results/` and an
//! earlier run's `results.N` — which the run itself writes, and moves aside — and mere reads
//! are ignored.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use nats_fs::folder::is_results_name;
use notify::event::{EventKind, MetadataKind, ModifyKind};
use notify::{Event, RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio::time::sleep;
use tracing::info;

use crate::{exit_code, print_result, run_once, Signals, Standalone};

/// Quiet time after the last change before running again, so a save of many files is one run.
const DEBOUNCE: Duration = Duration::from_millis(300);

pub(crate) async fn watch(job: &Standalone, signals: &mut Signals) -> anyhow::Result<ExitCode> {
    let (tx, mut changes) = mpsc::unbounded_channel();
    let dir = job.dir.clone();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<Event>| {
        if let Ok(event) = event {
            if is_relevant(&event, &dir) {
                let _ = tx.send(());
            }
        }
    })
    .context("starting the file watcher")?;
    watcher
        .watch(&job.dir, RecursiveMode::Recursive)
        .with_context(|| format!("watching {}", job.dir.display()))?;
    loop {
        let (outcome, interrupted) = run_once(job, signals).await?;
        print_result(&job.id, &outcome);
        if interrupted {
            return Ok(exit_code(&outcome));
        }
        info!(
            "watching {} for changes (Ctrl-C to stop)",
            job.dir.display()
        );
        tokio::select! {
            Some(()) = changes.recv() => {}
            () = signals.recv() => return Ok(exit_code(&outcome)),
        }
        // Let a burst of changes settle.
        loop {
            tokio::select! {
                Some(()) = changes.recv() => {}
                () = sleep(DEBOUNCE) => break,
            }
        }
        info!("the job folder changed; running again");
    }
}

/// Whether an event is a change to the inputs of the job in `dir`.
fn is_relevant(event: &Event, dir: &Path) -> bool {
    let kind_matters = !matches!(
        event.kind,
        EventKind::Access(_)
            | EventKind::Other
            | EventKind::Modify(ModifyKind::Metadata(MetadataKind::AccessTime))
    );
    let is_input = |path: &Path| {
        path.strip_prefix(dir)
            .ok()
            .and_then(|rel| rel.components().next())
            .is_none_or(|top| !is_results_name(top.as_os_str()))
    };
    kind_matters && event.paths.iter().any(|p| is_input(p))
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::CreateKind;

    fn event(kind: EventKind, path: &str) -> Event {
        Event::new(kind).add_path(std::path::PathBuf::from(path))
    }

    #[test]
    fn results_and_reads_do_not_count() {
        let dir = Path::new("/j");
        let create = EventKind::Create(CreateKind::File);
        assert!(is_relevant(&event(create, "/j/src/a.c"), dir));
        assert!(is_relevant(&event(create, "/j/results.x/a.c"), dir));
        for ours in [
            "/j/results/step_0.log",
            "/j/results",
            "/j/results.3",
            "/j/results.3/x",
        ] {
            assert!(!is_relevant(&event(create, ours), dir), "{ours}");
        }
        assert!(!is_relevant(
            &event(EventKind::Access(notify::event::AccessKind::Any), "/j/a"),
            dir
        ));
    }
}
