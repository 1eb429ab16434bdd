//! `claracore pull REF`: a model from a Hugging Face hub (or a URL with its
//! SHA-256) into a models folder, with a progress bar on stderr.
//!
//! This runs the download in this process (as the user who runs it, who
//! must be able to write the folder; under systemd that is the `claracore`
//! user: `sudo -u claracore claracore pull …`). The daemon serves the file
//! from the folder as soon as the rename puts it there. Interrupted, the
//! same command resumes from the part file.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::pull::{self, Progress, PullOptions, Pulled};

/// The folder pulls go to unless `--dir` names another.
pub const DEFAULT_MODELS_DIR: &str = "/var/lib/claracore/models";

#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct Pull {
    /// hf.co/USER/REPO[:QUANT], hf.co/USER/REPO/FILE.gguf, or https://…/FILE.gguf with --sha256
    pub reference: String,
    /// The models folder the file goes to
    #[arg(long, value_name = "DIR", default_value = DEFAULT_MODELS_DIR)]
    pub dir: PathBuf,
    /// The repository revision: a branch, tag or commit
    #[arg(long, value_name = "REV", default_value = pull::DEFAULT_REVISION)]
    pub revision: String,
    /// The expected SHA-256 of a URL pull (64 hex digits)
    #[arg(long, value_name = "HEX")]
    pub sha256: Option<String>,
    /// The hub's address (a mirror, an air-gapped hub)
    #[arg(long, env = "HF_ENDPOINT", value_name = "URL", default_value = pull::DEFAULT_ENDPOINT)]
    pub endpoint: String,
    /// A file holding the hub token for gated repositories (HF_TOKEN also works)
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Print what was pulled as JSON
    #[arg(long)]
    pub json: bool,
}

impl Pull {
    /// The token: `--token-file`, else `HF_TOKEN`, else the systemd
    /// credential `hf_token`.
    fn token(&self) -> Result<Option<String>, String> {
        let from_file = |path: &PathBuf| {
            std::fs::read_to_string(path)
                .map(|t| Some(t.trim().to_string()))
                .map_err(|e| format!("{}: {e}", path.display()))
        };
        if let Some(path) = &self.token_file {
            return from_file(path);
        }
        if let Some(token) = std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty()) {
            return Ok(Some(token));
        }
        match std::env::var_os("CREDENTIALS_DIRECTORY") {
            Some(dir) => {
                let path = PathBuf::from(dir).join("hf_token");
                if path.exists() {
                    from_file(&path)
                } else {
                    Ok(None)
                }
            }
            None => Ok(None),
        }
    }
}

/// Runs the pull; the text printed on success.
pub fn run(args: &Pull) -> Result<String, String> {
    let opts = PullOptions {
        endpoint: args.endpoint.clone(),
        token: args.token()?,
        models_dir: args.dir.clone(),
        revision: args.revision.clone(),
        sha256: args.sha256.clone(),
    };
    let mut bar = Bar::new(std::io::stderr().is_terminal());
    let result = super::block_on(async {
        pull::pull(&args.reference, &opts, &mut |p| bar.show(&p))
            .await
            .map_err(|e| e.to_string())
    });
    bar.end();
    let pulled = result?;
    if args.json {
        return serde_json::to_string_pretty(&pulled)
            .map(|s| s + "\n")
            .map_err(|e| e.to_string());
    }
    Ok(summary(&pulled))
}

fn summary(p: &Pulled) -> String {
    let mut text = format!(
        "pulled {} ({}) from {}{}\n",
        p.name,
        human(p.bytes),
        p.repo,
        if p.revision.is_empty() {
            String::new()
        } else {
            format!(" at {}", p.revision)
        }
    );
    for f in p.files.iter().chain(p.mmproj.iter()) {
        text.push_str(&format!("  {}\n", f.display()));
    }
    text
}

/// Bytes as Ollama prints them: `512 B`, `1.5 KB`, `4.1 GB` (powers of
/// 1000).
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// The progress line: redrawn in place on a terminal, a line per file
/// otherwise (so logs stay readable).
struct Bar {
    tty: bool,
    file: String,
    drawn: bool,
}

impl Bar {
    fn new(tty: bool) -> Bar {
        Bar {
            tty,
            file: String::new(),
            drawn: false,
        }
    }

    fn show(&mut self, p: &Progress) {
        let mut err = std::io::stderr().lock();
        if p.file != self.file {
            if self.drawn && self.tty {
                let _ = writeln!(err);
            }
            self.file = p.file.clone();
            if !self.tty {
                let _ = writeln!(err, "pulling {} ({})", p.file, human(p.total));
            }
        }
        if let Some(note) = &p.note {
            let _ = writeln!(
                err,
                "{}{}: {note}",
                if self.drawn && self.tty { "\n" } else { "" },
                p.file
            );
            self.drawn = false;
        }
        if self.tty {
            let _ = write!(err, "\r\x1b[K{}", line(p));
            self.drawn = true;
        }
        let _ = err.flush();
    }

    fn end(&mut self) {
        if self.drawn && self.tty {
            let _ = writeln!(std::io::stderr());
        }
    }
}

/// `pulling FILE  45% ▕█████     ▏ 450 MB/1.0 GB  120 MB/s  5s`.
pub fn line(p: &Progress) -> String {
    const WIDTH: usize = 20;
    let frac = if p.total > 0 {
        (p.completed as f64 / p.total as f64).min(1.0)
    } else {
        0.0
    };
    let filled = (frac * WIDTH as f64).round() as usize;
    let eta = p
        .eta
        .map(|d| {
            format!(
                "  {}",
                humantime::format_duration(Duration::from_secs(d.as_secs()))
            )
        })
        .unwrap_or_default();
    format!(
        "pulling {} {:>3}% ▕{}{}▏ {}/{}  {}/s{}",
        p.file,
        (frac * 100.0).floor() as u32,
        "█".repeat(filled),
        " ".repeat(WIDTH - filled),
        human(p.completed),
        human(p.total),
        human(p.rate as u64),
        eta
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_print_as_ollama_prints_them() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(1_500), "1.5 KB");
        assert_eq!(human(4_100_000_000), "4.1 GB");
    }

    #[test]
    fn the_bar_shows_share_sizes_rate_and_eta() {
        let p = Progress {
            file: "m.gguf".into(),
            completed: 450_000_000,
            total: 1_000_000_000,
            rate: 120_000_000.0,
            eta: Some(Duration::from_secs(5)),
            note: None,
        };
        assert_eq!(
            line(&p),
            "pulling m.gguf  45% ▕█████████           ▏ 450.0 MB/1.0 GB  120.0 MB/s  5s"
        );
    }
}
