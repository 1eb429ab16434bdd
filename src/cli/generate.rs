//! `claracore generate`: shell completions and man pages built from the
//! clap definition in [`super::Cli`], so they cannot drift from the
//! flags. Hidden from `--help`: it is for packagers, who install the
//! output (e.g. into share/bash-completion/completions and share/man/man1).

use std::path::PathBuf;

use clap::{CommandFactory, Subcommand};
use clap_complete::Shell;

use super::Cli;

#[derive(Debug, PartialEq, Eq, Subcommand)]
pub enum Generate {
    /// Write the completion script for SHELL to stdout
    Completions {
        #[arg(value_enum)]
        shell: Shell,
    },
    /// Write claracore.1 and one page per command (claracore-serve.1, ...) into DIR
    Man {
        /// Created if missing; existing pages are overwritten
        dir: PathBuf,
    },
}

/// Runs `generate`; the text to print on success.
pub fn run(what: &Generate) -> Result<String, String> {
    match what {
        Generate::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(*shell, &mut Cli::command(), "claracore", &mut script);
            String::from_utf8(script).map_err(|e| format!("the {shell} completion: {e}"))
        }
        Generate::Man { dir } => {
            std::fs::create_dir_all(dir)
                .and_then(|()| clap_mangen::generate_to(Cli::command(), dir))
                .map_err(|e| format!("writing man pages to {}: {e}", dir.display()))?;
            Ok(String::new())
        }
    }
}
