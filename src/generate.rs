//! `--generate`: the manual page or a shell's completions of a binary, built from its clap
//! definition, for the Debian package (`packaging/build-deb.sh` runs both binaries with it).
//! Behind the `generate` feature: controllers that use this crate for the contract need none
//! of it.

use std::io::Write;
use std::process::ExitCode;

/// What `--generate` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Generate {
    /// The manual page, in roff.
    Man,
    /// Completions for bash.
    CompleteBash,
    /// Completions for zsh.
    CompleteZsh,
    /// Completions for fish.
    CompleteFish,
}

/// Prints `what` for `command` on stdout: `SUCCESS`, or `failure` after saying why on stderr.
pub fn generate(mut command: clap::Command, what: Generate, failure: ExitCode) -> ExitCode {
    let name = command.get_name().to_owned();
    // Into memory first: clap_complete panics when its writer fails (e.g. a closed pipe).
    let mut out = Vec::new();
    let shell = match what {
        Generate::Man => None,
        Generate::CompleteBash => Some(clap_complete::Shell::Bash),
        Generate::CompleteZsh => Some(clap_complete::Shell::Zsh),
        Generate::CompleteFish => Some(clap_complete::Shell::Fish),
    };
    let rendered = match shell {
        Some(shell) => {
            clap_complete::generate(shell, &mut command, name.clone(), &mut out);
            Ok(())
        }
        None => clap_mangen::Man::new(command).render(&mut out),
    };
    let mut stdout = std::io::stdout().lock();
    match rendered
        .and_then(|()| stdout.write_all(&out))
        .and_then(|()| stdout.flush())
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: --generate: {e}");
            failure
        }
    }
}
