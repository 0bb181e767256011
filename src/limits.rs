//! Resource limits of a job: what `job.json` may ask for (`"limits": {…}`), what the operator
//! allows (the supervisor's `--max-*` options), and how the two combine.
//!
//! The operator's values are ceilings and, for a job that asks for nothing, the defaults. A job
//! may ask for less than a ceiling, never more: asking for more gets the ceiling and a warning
//! in its manifest ([`Limits::within`]).
//!
//! How each limit is enforced is not decided here, only what it is: `processes`, `openFiles`,
//! `fileSize` and `cpuTime` become rlimits of the steps (`RLIMIT_NPROC`, `RLIMIT_NOFILE`,
//! `RLIMIT_FSIZE`, `RLIMIT_CPU`); `memory` is a job-wide total that the supervisor watches;
//! `output` caps the bytes a job writes into `results/`, watched by the runner. A later
//! backend (cgroup v2: `pids.max`, `memory.max`) can enforce the same values.

use std::fmt;
use std::time::Duration;

use bytesize::ByteSize;
use nix::sys::resource::Resource;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::job::{duration_from_value, kind_of, SpecError};

/// A job's resource limits; `None` is "no limit of this kind".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Limits {
    /// Processes (and threads) of the job's identity at once: `RLIMIT_NPROC`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub processes: Option<u64>,
    /// Open descriptors per process: `RLIMIT_NOFILE`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open_files: Option<u64>,
    /// Largest file a process may write, in bytes: `RLIMIT_FSIZE`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_size: Option<u64>,
    /// CPU time per process, in whole seconds: `RLIMIT_CPU` (SIGXCPU, then SIGKILL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_time: Option<u64>,
    /// Resident memory of all of the job's processes together, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<u64>,
    /// Bytes the job may write into `results/`: step logs and artifacts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<u64>,
}

/// The limits that are rlimits of every process, with their resources: the one table the
/// supervisor (lowering ceilings to what can be given) and the runner (the ceilings and a job's
/// lower values, for its steps) both use.
pub const RLIMITS: [(Kind, Resource); 4] = [
    (Kind::Processes, Resource::RLIMIT_NPROC),
    (Kind::OpenFiles, Resource::RLIMIT_NOFILE),
    (Kind::FileSize, Resource::RLIMIT_FSIZE),
    (Kind::CpuTime, Resource::RLIMIT_CPU),
];

/// The kinds of limit, in the order they are listed everywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Processes,
    OpenFiles,
    FileSize,
    CpuTime,
    Memory,
    Output,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::Processes,
        Kind::OpenFiles,
        Kind::FileSize,
        Kind::CpuTime,
        Kind::Memory,
        Kind::Output,
    ];

    /// The field's name in `job.json`.
    #[must_use]
    pub fn field(self) -> &'static str {
        match self {
            Self::Processes => "processes",
            Self::OpenFiles => "openFiles",
            Self::FileSize => "fileSize",
            Self::CpuTime => "cpuTime",
            Self::Memory => "memory",
            Self::Output => "output",
        }
    }

    /// Reads a value of this kind as an operator types it: a whole number (processes, open
    /// files), a size (`"2GiB"`), or a duration (`"1h"`, rounded up to whole seconds).
    pub fn parse_str(self, s: &str) -> Result<u64, String> {
        match self {
            Self::Processes | Self::OpenFiles => match s.trim().parse::<u64>() {
                Ok(n) if n > 0 => Ok(n),
                _ => Err(format!("{s:?} is not a whole number of at least 1")),
            },
            Self::CpuTime => duration_from_value(&Value::String(s.to_owned())).map(whole_seconds),
            Self::FileSize | Self::Memory | Self::Output => parse_size(s),
        }
    }

    /// A value of this kind as people write it: `4.0 GiB`, `1h`, `50`.
    #[must_use]
    pub fn show(self, value: u64) -> String {
        match self {
            Self::Processes | Self::OpenFiles => value.to_string(),
            Self::CpuTime => humantime::format_duration(Duration::from_secs(value)).to_string(),
            Self::FileSize | Self::Memory | Self::Output => size(value),
        }
    }
}

impl Limits {
    /// The value of one kind.
    #[must_use]
    pub fn get(&self, kind: Kind) -> Option<u64> {
        match kind {
            Kind::Processes => self.processes,
            Kind::OpenFiles => self.open_files,
            Kind::FileSize => self.file_size,
            Kind::CpuTime => self.cpu_time,
            Kind::Memory => self.memory,
            Kind::Output => self.output,
        }
    }

    /// Sets the value of one kind.
    pub fn set(&mut self, kind: Kind, value: Option<u64>) {
        let field = match kind {
            Kind::Processes => &mut self.processes,
            Kind::OpenFiles => &mut self.open_files,
            Kind::FileSize => &mut self.file_size,
            Kind::CpuTime => &mut self.cpu_time,
            Kind::Memory => &mut self.memory,
            Kind::Output => &mut self.output,
        };
        *field = value;
    }

    /// Whether no limit is set.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        Kind::ALL.iter().all(|kind| self.get(*kind).is_none())
    }

    /// What a job asking for `self` gets under the operator's `ceilings`: its own value where
    /// it is lower, the ceiling where it asks for more or for nothing. Asking for more than a
    /// ceiling is not an error (the job still runs, within the ceiling); each such request is
    /// named in a warning for the manifest.
    #[must_use]
    pub fn within(&self, ceilings: &Limits) -> (Limits, Vec<String>) {
        let mut granted = Limits::default();
        let mut warnings = Vec::new();
        for kind in Kind::ALL {
            let value = match (self.get(kind), ceilings.get(kind)) {
                (Some(asked), Some(ceiling)) if asked > ceiling => {
                    warnings.push(format!(
                        "limits.{} asks for {}, more than this host allows; the job runs with {}",
                        kind.field(),
                        kind.show(asked),
                        kind.show(ceiling)
                    ));
                    Some(ceiling)
                }
                (Some(asked), _) => Some(asked),
                (None, ceiling) => ceiling,
            };
            granted.set(kind, value);
        }
        (granted, warnings)
    }

    /// Reads the `limits` object of `job.json`; `at` names it in errors (`limits`).
    pub fn from_value(value: &Value, at: &str) -> Result<Self, SpecError> {
        let Value::Object(fields) = value else {
            return Err(SpecError::invalid(
                at,
                format!(
                    "must be an object such as {{\"memory\": \"4GiB\"}}, not {}",
                    kind_of(value)
                ),
            ));
        };
        if let Some(unknown) = fields
            .keys()
            .find(|k| !Kind::ALL.iter().any(|kind| kind.field() == k.as_str()))
        {
            return Err(SpecError::invalid(
                format!("{at}.{unknown}"),
                "is not a limit (the limits are processes, openFiles, fileSize, cpuTime, memory and output)",
            ));
        }
        let mut limits = Limits::default();
        for kind in Kind::ALL {
            let here = format!("{at}.{}", kind.field());
            let value = match fields.get(kind.field()) {
                None | Some(Value::Null) => continue,
                Some(value) => value,
            };
            let parsed = match kind {
                Kind::Processes | Kind::OpenFiles => count_from_value(value),
                Kind::CpuTime => duration_from_value(value).map(whole_seconds),
                Kind::FileSize | Kind::Memory | Kind::Output => size_from_value(value),
            };
            limits.set(
                kind,
                Some(parsed.map_err(|problem| SpecError::invalid(here, problem))?),
            );
        }
        Ok(limits)
    }
}

impl fmt::Display for Limits {
    /// `memory 4.0 GiB, processes 50`, or `none`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for kind in Kind::ALL {
            if let Some(value) = self.get(kind) {
                if !first {
                    f.write_str(", ")?;
                }
                write!(f, "{} {}", kind.field(), kind.show(value))?;
                first = false;
            }
        }
        if first {
            f.write_str("none")?;
        }
        Ok(())
    }
}

/// A size as people read it: `512 B`, `1.5 MiB`, `4.0 GiB`.
#[must_use]
pub fn size(bytes: u64) -> String {
    ByteSize::b(bytes).display().iec().to_string()
}

/// Parses a size: a number of bytes, or a string such as `"2GiB"`, `"512 MiB"`, `"1.5GB"`
/// (IEC units are powers of 1024, SI units of 1000). Zero is rejected: a limit of nothing
/// cannot be met.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let bytes = s.trim().parse::<ByteSize>().map_err(|e| {
        format!(
            "{s:?} is not a size ({e}); write it like \"512MiB\", \"2GiB\" or a number of bytes"
        )
    })?;
    if bytes.as_u64() == 0 {
        return Err("must be larger than zero".to_owned());
    }
    Ok(bytes.as_u64())
}

fn size_from_value(value: &Value) -> Result<u64, String> {
    match value {
        Value::Number(_) => count_from_value(value),
        Value::String(s) => parse_size(s),
        other => Err(format!(
            "must be a size such as \"2GiB\" or a number of bytes, not {}",
            kind_of(other)
        )),
    }
}

fn count_from_value(value: &Value) -> Result<u64, String> {
    match value {
        Value::Number(n) => match n.as_u64() {
            Some(0) => Err("must be at least 1".to_owned()),
            Some(count) => Ok(count),
            None => Err(format!("{n} is not a whole number of at least 1")),
        },
        other => Err(format!("must be a whole number, not {}", kind_of(other))),
    }
}

/// `RLIMIT_CPU` counts whole seconds; a part of one is rounded up.
fn whole_seconds(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// Reads `fields["limits"]`, absent meaning none.
pub(crate) fn optional_limits(fields: &Map<String, Value>) -> Result<Limits, SpecError> {
    match fields.get("limits") {
        None | Some(Value::Null) => Ok(Limits::default()),
        Some(value) => Limits::from_value(value, "limits"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_limit_reads_as_people_write_it() {
        let limits = Limits::from_value(
            &json!({"processes": 50, "openFiles": 256, "fileSize": "2GiB", "cpuTime": "1h",
                    "memory": "512 MiB", "output": 1_000_000}),
            "limits",
        )
        .unwrap();
        assert_eq!(
            limits,
            Limits {
                processes: Some(50),
                open_files: Some(256),
                file_size: Some(2 << 30),
                cpu_time: Some(3600),
                memory: Some(512 << 20),
                output: Some(1_000_000),
            }
        );
        assert_eq!(
            Limits::from_value(&json!({"cpuTime": 1.5, "memory": "1GB"}), "limits").unwrap(),
            Limits {
                cpu_time: Some(2),
                memory: Some(1_000_000_000),
                ..Limits::default()
            }
        );
        assert!(Limits::from_value(&json!({}), "limits").unwrap().is_empty());
    }

    #[test]
    fn bad_limits_are_named() {
        let cases = [
            (json!([]), "limits must be an object"),
            (json!({"mem": "1GiB"}), "limits.mem is not a limit"),
            (
                json!({"processes": 0}),
                "limits.processes must be at least 1",
            ),
            (
                json!({"processes": -1}),
                "limits.processes -1 is not a whole number",
            ),
            (json!({"processes": 2.5}), "not a whole number"),
            (
                json!({"processes": "50"}),
                "limits.processes must be a whole number",
            ),
            (
                json!({"memory": "lots"}),
                "limits.memory \"lots\" is not a size",
            ),
            (json!({"memory": "0B"}), "larger than zero"),
            (json!({"output": true}), "limits.output must be a size"),
            (json!({"cpuTime": "soon"}), "limits.cpuTime"),
            (json!({"cpuTime": 0}), "longer than zero"),
        ];
        for (value, want) in cases {
            let err = Limits::from_value(&value, "limits")
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{value}: got {err:?}, want {want:?}");
        }
    }

    #[test]
    fn a_job_may_lower_a_ceiling_never_raise_it() {
        let ceilings = Limits {
            processes: Some(100),
            memory: Some(4 << 30),
            ..Limits::default()
        };
        let asked = Limits {
            processes: Some(50),
            memory: Some(8 << 30),
            output: Some(1 << 20),
            ..Limits::default()
        };
        let (granted, warnings) = asked.within(&ceilings);
        assert_eq!(
            granted,
            Limits {
                processes: Some(50),
                memory: Some(4 << 30),
                output: Some(1 << 20),
                ..Limits::default()
            }
        );
        assert_eq!(
            warnings,
            ["limits.memory asks for 8.0 GiB, more than this host allows; the job runs with 4.0 GiB"]
        );
        // Asking for nothing gets the ceilings.
        assert_eq!(Limits::default().within(&ceilings), (ceilings, vec![]));
    }

    #[test]
    fn limits_round_trip_and_display() {
        let limits = Limits {
            processes: Some(50),
            memory: Some(3 << 29),
            ..Limits::default()
        };
        let text = serde_json::to_string(&limits).unwrap();
        assert_eq!(text, r#"{"processes":50,"memory":1610612736}"#);
        assert_eq!(serde_json::from_str::<Limits>(&text).unwrap(), limits);
        assert_eq!(limits.to_string(), "processes 50, memory 1.5 GiB");
        assert_eq!(Limits::default().to_string(), "none");
    }
}
