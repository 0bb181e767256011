//! The environment every step starts from, under a supervisor and standalone alike: `PATH` and
//! `LANG` of the process that starts the job (the supervisor, or a standalone runner), or sane
//! defaults. A job adds its own variables on top (`env` in `job.json`, `--pass-env`).

use std::collections::BTreeMap;

/// `PATH` for runners and steps when the process that starts them has none: the usual
/// system-wide search path (systemd's default for services).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// `LANG` when the process that starts a job has none.
pub const DEFAULT_LANG: &str = "C.UTF-8";

/// `PATH` and `LANG` for the steps: this process's own, or [`DEFAULT_PATH`] and
/// [`DEFAULT_LANG`] (also for a value that is not UTF-8).
#[must_use]
pub fn base_env() -> BTreeMap<String, String> {
    base_env_from(|name| std::env::var(name).ok())
}

/// [`base_env`] with the variables read through `var`.
fn base_env_from(var: impl Fn(&str) -> Option<String>) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "PATH".to_owned(),
            var("PATH").unwrap_or_else(|| DEFAULT_PATH.to_owned()),
        ),
        (
            "LANG".to_owned(),
            var("LANG").unwrap_or_else(|| DEFAULT_LANG.to_owned()),
        ),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_and_lang_come_from_the_environment_or_the_defaults() {
        let defaults = base_env_from(|_| None);
        assert_eq!(
            defaults,
            BTreeMap::from([
                ("LANG".to_owned(), "C.UTF-8".to_owned()),
                (
                    "PATH".to_owned(),
                    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_owned()
                ),
            ])
        );
        let own = base_env_from(|name| Some(format!("own {name}")));
        assert_eq!(own["PATH"], "own PATH");
        assert_eq!(own["LANG"], "own LANG");
        assert_eq!(own.len(), 2);
        assert_eq!(
            base_env()["PATH"],
            std::env::var("PATH").unwrap_or(DEFAULT_PATH.into())
        );
    }
}
