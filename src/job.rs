//! The job contract as data: what a controller publishes ([`JobRequest`]), what the job folder
//! says ([`JobSpec`], read from `job.json`), and the pieces both are made of ([`JobId`],
//! [`Step`], durations).
//!
//! Everything here is validated when it is decoded, with errors that say where the problem is
//! (`steps[2].timeout: …`), because the people who read them are writing job files by hand.
//! Decoding goes through [`serde_json::Value`] rather than derived `Deserialize` so that every
//! rule of contract §2–3 has its own message.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

use crate::limits::Limits;

/// The longest job id accepted, in bytes.
pub const MAX_ID_LEN: usize = 128;

/// A validated job id: 1–128 bytes of `[A-Za-z0-9_-]` in non-empty segments joined by single
/// dots. Such an id is safe as a path component and as a NATS subject token sequence: it can
/// never be `..`, contain `/`, be absolute, or carry control characters or wildcards.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct JobId(String);

/// Why a string is not a valid [`JobId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("the id is empty")]
    Empty,
    #[error("the id is {0} bytes long; at most {MAX_ID_LEN} are allowed")]
    TooLong(usize),
    #[error(
        "the id contains {0:?}; only letters, digits, '_', '-' and single dots between them are allowed"
    )]
    BadChar(char),
    #[error("the id has an empty part: dots may only separate non-empty parts (no '..', no leading or trailing dot)")]
    EmptySegment,
}

impl JobId {
    /// Checks `s` against the id rules of contract §2.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        if s.is_empty() {
            return Err(IdError::Empty);
        }
        if s.len() > MAX_ID_LEN {
            return Err(IdError::TooLong(s.len()));
        }
        if let Some(bad) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
        {
            return Err(IdError::BadChar(bad));
        }
        if s.split('.').any(str::is_empty) {
            return Err(IdError::EmptySegment);
        }
        Ok(Self(s.to_owned()))
    }

    /// The id as a string slice.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for JobId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for JobId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        JobId::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// One step of a job: a shell command run with `/bin/sh -c`, optionally named, with its own
/// timeout and environment.
///
/// In `job.json` a step is either a plain string or `{run, name?, timeout?, env?}`. It
/// serializes back to the object form (timeout in seconds), which [`Step::from_value`] reads,
/// so steps survive the pipe to the runner unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// The command line, given to `/bin/sh -c`.
    pub run: String,
    /// A label for logs and the manifest.
    pub name: Option<String>,
    /// Stop the step after this long (TERM, grace, KILL); the job's timeout still applies.
    pub timeout: Option<Duration>,
    /// Variables added to the step's environment, after the job's.
    pub env: BTreeMap<String, String>,
    /// End the step as `timeout` when it prints nothing for this long (the job's
    /// `idleTimeout`, or the operator's, applies otherwise).
    pub idle_timeout: Option<Duration>,
}

impl Step {
    /// A step that runs `run` with no name, timeout or environment of its own.
    #[must_use]
    pub fn shell(run: impl Into<String>) -> Self {
        Self {
            run: run.into(),
            name: None,
            timeout: None,
            env: BTreeMap::new(),
            idle_timeout: None,
        }
    }

    /// Reads one step; `at` names it in errors (`steps[3]`).
    pub fn from_value(value: &Value, at: &str) -> Result<Self, SpecError> {
        match value {
            Value::String(run) => {
                check_command(run, at)?;
                Ok(Self::shell(run.clone()))
            }
            Value::Object(fields) => {
                let allowed = ["run", "name", "timeout", "idleTimeout", "env"];
                if let Some(unknown) = fields.keys().find(|k| !allowed.contains(&k.as_str())) {
                    return Err(SpecError::invalid(
                        format!("{at}.{unknown}"),
                        "is not a step field (a step has run, name, timeout, idleTimeout and env)",
                    ));
                }
                let run = match fields.get("run") {
                    Some(Value::String(run)) => run.clone(),
                    Some(other) => {
                        return Err(SpecError::invalid(
                            format!("{at}.run"),
                            format!("must be a string, not {}", kind_of(other)),
                        ))
                    }
                    None => {
                        return Err(SpecError::invalid(at, "has no \"run\" command"));
                    }
                };
                check_command(&run, &format!("{at}.run"))?;
                let name = match fields.get("name") {
                    None | Some(Value::Null) => None,
                    Some(Value::String(name)) => Some(name.clone()),
                    Some(other) => {
                        return Err(SpecError::invalid(
                            format!("{at}.name"),
                            format!("must be a string, not {}", kind_of(other)),
                        ))
                    }
                };
                let timeout = optional_duration(fields, "timeout", at)?;
                let idle_timeout = optional_duration(fields, "idleTimeout", at)?;
                let env = optional_env(fields, at)?;
                Ok(Self {
                    run,
                    name,
                    timeout,
                    env,
                    idle_timeout,
                })
            }
            other => Err(SpecError::invalid(
                at,
                format!(
                    "must be a command string or a {{\"run\": …}} object, not {}",
                    kind_of(other)
                ),
            )),
        }
    }
}

impl Serialize for Step {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("run", &self.run)?;
        if let Some(name) = &self.name {
            map.serialize_entry("name", name)?;
        }
        if let Some(timeout) = self.timeout {
            map.serialize_entry("timeout", &timeout.as_secs_f64())?;
        }
        if let Some(idle) = self.idle_timeout {
            map.serialize_entry("idleTimeout", &idle.as_secs_f64())?;
        }
        if !self.env.is_empty() {
            map.serialize_entry("env", &self.env)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for Step {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(deserializer)?;
        Step::from_value(&value, "step").map_err(serde::de::Error::custom)
    }
}

/// Reads a steps array; `at` names it in errors.
pub fn steps_from_value(value: &Value, at: &str) -> Result<Vec<Step>, SpecError> {
    let Value::Array(items) = value else {
        return Err(SpecError::invalid(
            at,
            format!("must be a list of steps, not {}", kind_of(value)),
        ));
    };
    if items.is_empty() {
        return Err(SpecError::invalid(at, "must list at least one step"));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, item)| Step::from_value(item, &format!("{at}[{i}]")))
        .collect()
}

/// The contents of `job.json` (contract §3).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct JobSpec {
    /// The steps, in order. Empty only when `job.json` has none and the request supplies them.
    pub steps: Vec<Step>,
    /// The job's timeout; the worker's default applies when absent.
    pub timeout: Option<Duration>,
    /// Variables added to every step's environment.
    pub env: BTreeMap<String, String>,
    /// What the job asks for; the operator's ceilings still apply ([`Limits::within`]).
    pub limits: Limits,
    /// End a step as `timeout` when it prints nothing for this long.
    pub idle_timeout: Option<Duration>,
}

impl JobSpec {
    /// Parses `job.json`. With `steps_required` false (the request carries its own steps), a
    /// missing `steps` field is allowed; steps that are present are validated either way.
    /// Unknown top-level fields are ignored, so controllers may keep their own metadata there.
    pub fn parse(bytes: &[u8], steps_required: bool) -> Result<Self, SpecError> {
        let value: Value = serde_json::from_slice(bytes).map_err(|e| SpecError::Json {
            message: e.to_string(),
        })?;
        let Value::Object(fields) = value else {
            return Err(SpecError::invalid(
                "job.json",
                format!("must be an object, not {}", kind_of(&value)),
            ));
        };
        let steps = match fields.get("steps") {
            Some(steps) => steps_from_value(steps, "steps")?,
            None if steps_required => {
                return Err(SpecError::invalid("job.json", "has no \"steps\" list"))
            }
            None => Vec::new(),
        };
        let timeout = optional_duration(&fields, "timeout", "job")?;
        let idle_timeout = optional_duration(&fields, "idleTimeout", "job")?;
        let env = optional_env(&fields, "job")?;
        let limits = crate::limits::optional_limits(&fields)?;
        Ok(Self {
            steps,
            timeout,
            env,
            limits,
            idle_timeout,
        })
    }
}

/// A job request as published on the input subject (contract §2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JobRequest {
    /// Names the job folder `{jobs_dir}/{id}` and the result subject `{output}.{id}`.
    pub id: JobId,
    /// When present, replaces the steps of `job.json`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steps: Option<Vec<Step>>,
}

/// Why a request payload was rejected. Every variant is final: the message is terminated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("the payload is not JSON: {message}")]
    NotJson { message: String },
    #[error("the payload must be a JSON object, not {kind}")]
    NotObject { kind: &'static str },
    #[error("the payload has no \"id\"")]
    MissingId,
    #[error("\"id\" must be a string, not {kind}")]
    IdNotString { kind: &'static str },
    #[error("\"id\" {shown} is not a valid job id: {source}")]
    BadId { shown: String, source: IdError },
    #[error("job {id}: {source}")]
    BadSteps { id: JobId, source: SpecError },
}

impl RequestError {
    /// The job id, when the payload carried a valid one (an error result can then be published).
    #[must_use]
    pub fn id(&self) -> Option<&JobId> {
        match self {
            Self::BadSteps { id, .. } => Some(id),
            _ => None,
        }
    }
}

impl JobRequest {
    /// Decodes and validates a request payload. Unknown fields are ignored.
    pub fn decode(payload: &[u8]) -> Result<Self, RequestError> {
        let value: Value = serde_json::from_slice(payload).map_err(|e| RequestError::NotJson {
            message: e.to_string(),
        })?;
        let Value::Object(fields) = value else {
            return Err(RequestError::NotObject {
                kind: kind_of(&value),
            });
        };
        let id = match fields.get("id") {
            None => return Err(RequestError::MissingId),
            Some(Value::String(s)) => JobId::parse(s).map_err(|source| RequestError::BadId {
                shown: shown(s),
                source,
            })?,
            Some(other) => {
                return Err(RequestError::IdNotString {
                    kind: kind_of(other),
                })
            }
        };
        let steps =
            match fields.get("steps") {
                None | Some(Value::Null) => None,
                Some(steps) => Some(steps_from_value(steps, "steps").map_err(|source| {
                    RequestError::BadSteps {
                        id: id.clone(),
                        source,
                    }
                })?),
            };
        Ok(Self { id, steps })
    }
}

/// A problem in `job.json` or in a steps list, located by a path such as `steps[1].env.A`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("job.json is not valid JSON: {message}")]
    Json { message: String },
    #[error("{at} {problem}")]
    Invalid { at: String, problem: String },
}

impl SpecError {
    pub(crate) fn invalid(at: impl Into<String>, problem: impl Into<String>) -> Self {
        Self::Invalid {
            at: at.into(),
            problem: problem.into(),
        }
    }
}

/// Parses a duration as job files write it: a number of seconds, or a string such as `"90s"`,
/// `"10m"`, `"1h"`, `"1h 30m"` (humantime syntax). Zero and negative values are rejected.
pub fn duration_from_value(value: &Value) -> Result<Duration, String> {
    let duration = match value {
        Value::Number(n) => {
            let secs = n.as_f64().ok_or_else(|| format!("{n} is not a number"))?;
            Duration::try_from_secs_f64(secs).map_err(|_| {
                format!("{n} is not a usable number of seconds (it must be positive)")
            })?
        }
        Value::String(s) => parse_duration(s)?,
        other => {
            return Err(format!(
                "must be a duration such as \"90s\", \"10m\" or a number of seconds, not {}",
                kind_of(other)
            ))
        }
    };
    if duration.is_zero() {
        return Err("must be longer than zero".to_owned());
    }
    Ok(duration)
}

/// Parses a duration string: a bare number is seconds, anything else is humantime syntax
/// (`"90s"`, `"10m"`, `"1h 30m"`, `"500ms"`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<f64>() {
        return Duration::try_from_secs_f64(secs)
            .map_err(|_| format!("{s:?} is not a usable number of seconds"));
    }
    humantime::parse_duration(s).map_err(|e| {
        format!("{s:?} is not a duration ({e}); write it like \"90s\", \"10m\" or \"1h\"")
    })
}

/// Parses the worker's default job timeout (`--timeout`, `JOB_TIMEOUT`): as
/// [`parse_duration`], except that a bare number means minutes, as in the original worker.
pub fn parse_default_timeout(s: &str) -> Result<Duration, String> {
    let duration = match s.trim().parse::<f64>() {
        Ok(minutes) => Duration::try_from_secs_f64(minutes * 60.0)
            .map_err(|_| format!("{s:?} is not a usable number of minutes"))?,
        Err(_) => parse_duration(s)?,
    };
    if duration.is_zero() {
        return Err("the timeout must be longer than zero".to_owned());
    }
    Ok(duration)
}

fn optional_duration(
    fields: &Map<String, Value>,
    key: &str,
    at: &str,
) -> Result<Option<Duration>, SpecError> {
    match fields.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => duration_from_value(value)
            .map(Some)
            .map_err(|problem| SpecError::invalid(format!("{at}.{key}"), problem)),
    }
}

fn optional_env(
    fields: &Map<String, Value>,
    at: &str,
) -> Result<BTreeMap<String, String>, SpecError> {
    let map = match fields.get("env") {
        None | Some(Value::Null) => return Ok(BTreeMap::new()),
        Some(Value::Object(map)) => map,
        Some(other) => {
            return Err(SpecError::invalid(
                format!("{at}.env"),
                format!("must be an object of strings, not {}", kind_of(other)),
            ))
        }
    };
    let mut env = BTreeMap::new();
    for (name, value) in map {
        let here = format!("{at}.env.{name}");
        check_env_name(name).map_err(|problem| SpecError::invalid(&here, problem))?;
        let value = match value {
            Value::String(s) => s.clone(),
            // Numbers and booleans are what people write for flags such as CI=1; accept them.
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            other => {
                return Err(SpecError::invalid(
                    here,
                    format!("must be a string, not {}", kind_of(other)),
                ))
            }
        };
        if value.contains('\0') {
            return Err(SpecError::invalid(here, "contains a NUL character"));
        }
        env.insert(name.clone(), value);
    }
    Ok(env)
}

/// Checks an environment variable name: non-empty, no `=`, no NUL.
pub fn check_env_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        Err("is an empty variable name".to_owned())
    } else if name.contains('=') || name.contains('\0') {
        Err("is not a valid variable name (it contains '=' or NUL)".to_owned())
    } else {
        Ok(())
    }
}

fn check_command(run: &str, at: &str) -> Result<(), SpecError> {
    if run.trim().is_empty() {
        Err(SpecError::invalid(at, "is an empty command"))
    } else if run.contains('\0') {
        Err(SpecError::invalid(at, "contains a NUL character"))
    } else {
        Ok(())
    }
}

/// JSON's name for the kind of a value, for error messages.
pub(crate) fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// A rejected id as it may appear in a log line: escaped, and cut short when long.
fn shown(s: &str) -> String {
    const MAX: usize = 64;
    let mut cut: String = s.chars().take(MAX).collect();
    if cut.len() < s.len() {
        cut.push('…');
    }
    format!("{cut:?}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn decode(v: &Value) -> Result<JobRequest, RequestError> {
        JobRequest::decode(v.to_string().as_bytes())
    }

    #[test]
    fn valid_ids() {
        for id in [
            "a",
            "job_2026_01",
            "A-b_c",
            "x.y.z",
            "1.2-3",
            &"a".repeat(128),
        ] {
            assert_eq!(JobId::parse(id).map(|i| i.to_string()), Ok(id.to_owned()));
        }
    }

    #[test]
    fn hostile_ids_are_rejected() {
        let cases: &[(&str, IdError)] = &[
            ("", IdError::Empty),
            ("..", IdError::EmptySegment),
            (".", IdError::EmptySegment),
            ("a..b", IdError::EmptySegment),
            (".a", IdError::EmptySegment),
            ("a.", IdError::EmptySegment),
            ("/x", IdError::BadChar('/')),
            ("a/b", IdError::BadChar('/')),
            ("../etc", IdError::BadChar('/')),
            ("a\nb", IdError::BadChar('\n')),
            ("a\0b", IdError::BadChar('\0')),
            ("a\u{1b}[31m", IdError::BadChar('\u{1b}')),
            ("a b", IdError::BadChar(' ')),
            ("a*", IdError::BadChar('*')),
            ("a>", IdError::BadChar('>')),
            ("é", IdError::BadChar('é')),
        ];
        for (id, want) in cases {
            assert_eq!(JobId::parse(id).as_ref(), Err(want), "id {id:?}");
        }
        assert_eq!(JobId::parse(&"a".repeat(129)), Err(IdError::TooLong(129)));
        // Length counts bytes, not characters.
        assert!(matches!(
            JobId::parse(&"é".repeat(65)),
            Err(IdError::TooLong(130))
        ));
    }

    #[test]
    fn request_rejects_non_objects_and_bad_ids() {
        assert!(matches!(
            JobRequest::decode(b"not json"),
            Err(RequestError::NotJson { .. })
        ));
        assert!(matches!(
            JobRequest::decode(b""),
            Err(RequestError::NotJson { .. })
        ));
        assert_eq!(
            decode(&json!(["a"])),
            Err(RequestError::NotObject { kind: "a list" })
        );
        assert_eq!(
            decode(&json!({"steps": ["x"]})),
            Err(RequestError::MissingId)
        );
        for (id, kind) in [
            (json!(7), "a number"),
            (json!(null), "null"),
            (json!(["a"]), "a list"),
            (json!({"a": 1}), "an object"),
            (json!(true), "a boolean"),
        ] {
            assert_eq!(
                decode(&json!({ "id": id })),
                Err(RequestError::IdNotString { kind })
            );
        }
        let err = decode(&json!({"id": "../../etc"})).unwrap_err();
        assert!(err.to_string().contains("\"../../etc\""), "{err}");
        assert!(err.id().is_none());
    }

    #[test]
    fn request_with_valid_id_and_bad_steps_keeps_the_id() {
        let err = decode(&json!({"id": "j1", "steps": "echo hi"})).unwrap_err();
        assert_eq!(err.id().map(JobId::as_str), Some("j1"));
        assert!(err.to_string().contains("steps must be a list"), "{err}");
        let err = decode(&json!({"id": "j1", "steps": [1]})).unwrap_err();
        assert!(err.to_string().contains("steps[0]"), "{err}");
    }

    #[test]
    fn request_ignores_unknown_fields_and_reads_steps() {
        let req = decode(&json!({"id": "j", "extra": {"x": 1}, "steps": ["true", {"run": "ls", "name": "list"}]})).unwrap();
        assert_eq!(req.id.as_str(), "j");
        let steps = req.steps.unwrap();
        assert_eq!(steps[0], Step::shell("true"));
        assert_eq!(steps[1].name.as_deref(), Some("list"));
        assert_eq!(
            decode(&json!({"id": "j", "steps": null})).unwrap().steps,
            None
        );
    }

    #[test]
    fn job_json_full_example() {
        let spec = JobSpec::parse(
            br#"{ "steps": ["npm install", {"run": "npm run build", "name": "build", "timeout": "10m", "env": {"CI": "1"}}],
                  "timeout": "30m", "env": {"NODE_ENV": "production"}, "owner": "ci" }"#,
            true,
        )
        .unwrap();
        assert_eq!(spec.steps.len(), 2);
        assert_eq!(spec.steps[1].timeout, Some(Duration::from_secs(600)));
        assert_eq!(spec.steps[1].env["CI"], "1");
        assert_eq!(spec.timeout, Some(Duration::from_secs(1800)));
        assert_eq!(spec.env["NODE_ENV"], "production");
    }

    #[test]
    fn job_json_errors_name_the_place() {
        let cases: &[(&str, &str)] = &[
            ("{", "not valid JSON"),
            ("[]", "job.json must be an object"),
            ("{}", "has no \"steps\""),
            (r#"{"steps": {}}"#, "steps must be a list"),
            (r#"{"steps": []}"#, "at least one step"),
            (r#"{"steps": [""]}"#, "steps[0] is an empty command"),
            (r#"{"steps": [{"name": "x"}]}"#, "steps[0] has no \"run\""),
            (
                r#"{"steps": [{"run": 5}]}"#,
                "steps[0].run must be a string",
            ),
            (
                r#"{"steps": [{"run": "x", "timout": "1s"}]}"#,
                "steps[0].timout is not a step field",
            ),
            (
                r#"{"steps": [{"run": "x", "timeout": "10x"}]}"#,
                "steps[0].timeout \"10x\" is not a duration",
            ),
            (
                r#"{"steps": [{"run": "x", "timeout": 0}]}"#,
                "longer than zero",
            ),
            (r#"{"steps": [{"run": "x", "timeout": -1}]}"#, "positive"),
            (
                r#"{"steps": ["x"], "timeout": []}"#,
                "job.timeout must be a duration",
            ),
            (
                r#"{"steps": ["x"], "env": []}"#,
                "job.env must be an object",
            ),
            (
                r#"{"steps": ["x"], "env": {"A=B": "1"}}"#,
                "job.env.A=B is not a valid variable name",
            ),
            (
                r#"{"steps": ["x"], "env": {"A": {}}}"#,
                "job.env.A must be a string",
            ),
            (
                r#"{"steps": [{"run": "x", "name": 3}]}"#,
                "steps[0].name must be a string",
            ),
            (r#"{"steps": [null]}"#, "steps[0] must be a command string"),
        ];
        for (text, want) in cases {
            let err = JobSpec::parse(text.as_bytes(), true)
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{text}: got {err:?}, want {want:?}");
        }
    }

    #[test]
    fn job_json_limits_and_idle_timeouts() {
        let spec = JobSpec::parse(
            br#"{"steps": [{"run": "make", "idleTimeout": "10m"}], "idleTimeout": 30,
                 "limits": {"memory": "1GiB", "processes": 50}}"#,
            true,
        )
        .unwrap();
        assert_eq!(spec.idle_timeout, Some(Duration::from_secs(30)));
        assert_eq!(spec.steps[0].idle_timeout, Some(Duration::from_secs(600)));
        assert_eq!(spec.limits.memory, Some(1 << 30));
        assert_eq!(spec.limits.processes, Some(50));
        let err = JobSpec::parse(br#"{"steps": ["x"], "limits": {"memory": "x"}}"#, true)
            .unwrap_err()
            .to_string();
        assert!(err.contains("limits.memory"), "{err}");
        let err = JobSpec::parse(br#"{"steps": ["x"], "idleTimeout": "never"}"#, true)
            .unwrap_err()
            .to_string();
        assert!(err.contains("job.idleTimeout"), "{err}");
    }

    #[test]
    fn job_json_steps_optional_when_request_has_them() {
        let spec = JobSpec::parse(br#"{"timeout": 5}"#, false).unwrap();
        assert!(spec.steps.is_empty());
        assert_eq!(spec.timeout, Some(Duration::from_secs(5)));
    }

    #[test]
    fn durations() {
        let d = |v: Value| duration_from_value(&v);
        assert_eq!(d(json!("90s")), Ok(Duration::from_secs(90)));
        assert_eq!(d(json!("10m")), Ok(Duration::from_secs(600)));
        assert_eq!(d(json!("1h")), Ok(Duration::from_secs(3600)));
        assert_eq!(d(json!("1h 30m")), Ok(Duration::from_secs(5400)));
        assert_eq!(d(json!(90)), Ok(Duration::from_secs(90)));
        assert_eq!(d(json!(1.5)), Ok(Duration::from_millis(1500)));
        assert_eq!(d(json!("2")), Ok(Duration::from_secs(2)));
        assert!(d(json!(0)).is_err());
        assert!(d(json!("0s")).is_err());
        assert!(d(json!(-5)).is_err());
        assert!(d(json!("soon")).is_err());
        assert!(d(json!(true)).is_err());
        assert!(d(json!(1e300)).is_err());
    }

    #[test]
    fn default_timeout_bare_number_is_minutes() {
        assert_eq!(parse_default_timeout("30"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_default_timeout("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_default_timeout("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_default_timeout("0").is_err());
        assert!(parse_default_timeout("-1").is_err());
        assert!(parse_default_timeout("later").is_err());
    }

    #[test]
    fn env_values_and_names() {
        let spec = JobSpec::parse(
            br#"{"steps": ["x"], "env": {"CI": 1, "DEBUG": true, "S": "v"}}"#,
            true,
        )
        .unwrap();
        assert_eq!(spec.env["CI"], "1");
        assert_eq!(spec.env["DEBUG"], "true");
        assert!(JobSpec::parse(br#"{"steps": ["x"], "env": {"": "1"}}"#, true).is_err());
        assert!(JobSpec::parse(br#"{"steps": ["x"], "env": {"A": "a\u0000"}}"#, true).is_err());
    }

    #[test]
    fn step_round_trips_through_serde() {
        let step = Step {
            run: "make".into(),
            name: Some("build".into()),
            timeout: Some(Duration::from_millis(1500)),
            env: BTreeMap::from([("A".into(), "1".into())]),
            idle_timeout: Some(Duration::from_secs(600)),
        };
        let text = serde_json::to_string(&step).unwrap();
        let back: Step = serde_json::from_str(&text).unwrap();
        assert_eq!(back, step);
        let plain: Step = serde_json::from_str("\"ls -l\"").unwrap();
        assert_eq!(plain, Step::shell("ls -l"));
    }
}
