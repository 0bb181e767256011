//! What a job runs under: its own limits within the operator's ceilings, its timeout capped at
//! the longest the operator allows, and each step's idle timeout.

use std::time::Duration;

use nats_fs::job::{JobSpec, Step};
use nats_fs::limits::Limits;
use nats_fs::protocol::StartJob;

/// The job's terms, worked out once after `job.json` is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Grant {
    /// Its limits: its own where lower than a ceiling, the ceiling otherwise.
    pub(crate) limits: Limits,
    /// Its timeout: its own, or the default, never above the operator's maximum.
    pub(crate) timeout: Duration,
    /// The idle timeout of a step that sets none and whose job sets none.
    pub(crate) default_idle: Option<Duration>,
    /// One for each request the host did not grant in full, for the manifest.
    pub(crate) warnings: Vec<String>,
}

/// The terms of `spec` under the operator's settings in `start`.
pub(crate) fn grant(spec: &JobSpec, start: &StartJob) -> Grant {
    let (limits, mut warnings) = spec.limits.within(&start.ceilings);
    let mut timeout = spec
        .timeout
        .unwrap_or(Duration::from_millis(start.default_timeout_ms));
    if let Some(max) = start.max_timeout_ms.map(Duration::from_millis) {
        if timeout > max {
            // Only a job that asked for more hears about it; a default above the maximum is
            // the operator's own setting.
            if spec.timeout.is_some() {
                warnings.push(format!(
                    "timeout asks for {}, more than this host allows; the job runs with {}",
                    humantime::format_duration(timeout),
                    humantime::format_duration(max)
                ));
            }
            timeout = max;
        }
    }
    Grant {
        limits,
        timeout,
        default_idle: spec
            .idle_timeout
            .or(start.idle_timeout_ms.map(Duration::from_millis)),
        warnings,
    }
}

impl Grant {
    /// The idle timeout of `step`: its own, else the job's, else the operator's default.
    pub(crate) fn idle_timeout(&self, step: &Step) -> Option<Duration> {
        step.idle_timeout.or(self.default_idle)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nats_fs::protocol::PROTOCOL_VERSION;

    fn start(ceilings: Limits, max_timeout_ms: Option<u64>, idle_ms: Option<u64>) -> StartJob {
        StartJob {
            version: PROTOCOL_VERSION,
            id: nats_fs::JobId::parse("j").unwrap(),
            attempt: 1,
            stream_sequence: None,
            job_dir: "/jobs/j".into(),
            share: None,
            identity: None,
            kill_uid_at_end: false,
            workspace: "/ws".into(),
            outputs_dir: None,
            tmp_dir: None,
            steps: None,
            default_timeout_ms: 60_000,
            kill_grace_ms: 1000,
            base_env: std::collections::BTreeMap::new(),
            pass_env: std::collections::BTreeMap::new(),
            ceilings,
            max_timeout_ms,
            idle_timeout_ms: idle_ms,
            worker: None,
            share_parallelism: 1,
            push_logs_every_ms: None,
            min_free_space: 0,
        }
    }

    #[test]
    fn limits_above_a_ceiling_get_the_ceiling_and_a_warning() {
        let spec = JobSpec::parse(
            br#"{"steps": ["x"], "limits": {"output": "2GiB", "openFiles": 64}}"#,
            true,
        )
        .unwrap();
        let ceilings = Limits {
            output: Some(1 << 30),
            processes: Some(100),
            ..Limits::default()
        };
        let grant = grant(&spec, &start(ceilings, None, None));
        assert_eq!(
            grant.limits,
            Limits {
                output: Some(1 << 30),
                processes: Some(100),
                open_files: Some(64),
                ..Limits::default()
            }
        );
        assert_eq!(grant.warnings.len(), 1);
        assert!(
            grant.warnings[0].contains("limits.output asks for 2.0 GiB")
                && grant.warnings[0].contains("runs with 1.0 GiB"),
            "{:?}",
            grant.warnings
        );
    }

    #[test]
    fn the_timeout_is_capped_and_only_a_request_is_warned_about() {
        let asked = JobSpec::parse(br#"{"steps": ["x"], "timeout": "2h"}"#, true).unwrap();
        let grant_asked = grant(&asked, &start(Limits::default(), Some(3_600_000), None));
        assert_eq!(grant_asked.timeout, Duration::from_secs(3600));
        assert!(grant_asked.warnings[0].starts_with("timeout asks for 2h"));

        let default = JobSpec::parse(br#"{"steps": ["x"]}"#, true).unwrap();
        let grant_default = grant(&default, &start(Limits::default(), Some(30_000), None));
        assert_eq!(grant_default.timeout, Duration::from_secs(30));
        assert!(grant_default.warnings.is_empty());
    }

    #[test]
    fn idle_timeout_step_then_job_then_operator() {
        let spec = JobSpec::parse(
            br#"{"steps": [{"run": "a", "idleTimeout": 5}, "b"], "idleTimeout": 7}"#,
            true,
        )
        .unwrap();
        let with_job = grant(&spec, &start(Limits::default(), None, Some(9_000)));
        assert_eq!(
            with_job.idle_timeout(&spec.steps[0]),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            with_job.idle_timeout(&spec.steps[1]),
            Some(Duration::from_secs(7))
        );
        let plain = JobSpec::parse(br#"{"steps": ["b"]}"#, true).unwrap();
        let operator = grant(&plain, &start(Limits::default(), None, Some(9_000)));
        assert_eq!(
            operator.idle_timeout(&plain.steps[0]),
            Some(Duration::from_secs(9))
        );
        let none = grant(&plain, &start(Limits::default(), None, None));
        assert_eq!(none.idle_timeout(&plain.steps[0]), None);
    }
}
