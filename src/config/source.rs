//! Where lb's config comes from: a file, read again on every reload and rolling restart,
//! or the command line of `lb run`, which has no file and stays as it was given.

use std::fmt::{self, Write as _};
use std::path::{Path, PathBuf};

use super::{Config, ConfigErrors};

#[derive(Debug, Clone)]
pub enum Source {
    File(PathBuf),
    /// `lb run`: the YAML its flags stand for, with relative paths taken from `cwd`.
    CommandLine {
        yaml: String,
        cwd: PathBuf,
    },
}

impl Source {
    /// Reads (for a file), parses and validates the config. Blocking: a file read.
    pub fn load(&self) -> Result<Config, ConfigErrors> {
        match self {
            Source::File(path) => super::load(path),
            Source::CommandLine { yaml, cwd } => super::parse(yaml, "lb run", cwd),
        }
    }

    /// `lb run`'s single service: `command` run `count` times (`auto` or a number),
    /// listening on `listen`, ready by `ready` (`tcp` or `message`); the admin API on
    /// `admin` when given, else at its default. Every other key keeps its default.
    pub fn command_line(run: &RunFlags<'_>, cwd: &Path) -> Source {
        let quote = yaml_string;
        let argv: Vec<String> = run.command.iter().map(|arg| yaml_string(arg)).collect();
        let argv = format!("[{}]", argv.join(", "));
        let admin = run.admin.map_or(String::new(), |addr| {
            format!("admin:\n  listen: {}\n", quote(&addr.to_string()))
        });
        let yaml = format!(
            "{admin}services:\n  - name: {name}\n    listen: {listen}\n    workers:\n      command: {argv}\n      count: {count}\n      ready: {ready}\n",
            name = quote(run.name),
            listen = quote(&run.listen.to_string()),
            count = quote(run.count),
            ready = quote(run.ready),
        );
        Source::CommandLine {
            yaml,
            cwd: cwd.to_owned(),
        }
    }
}

/// `text` as a YAML double-quoted string: every character YAML would not take as written
/// (quotes, backslashes, control and line-separating characters) escaped, so no argument
/// can change the file's shape or fail to parse.
fn yaml_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() || matches!(c, '\u{2028}' | '\u{2029}' | '\u{feff}') => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The flags of `lb run`.
#[derive(Debug)]
pub struct RunFlags<'a> {
    pub name: &'a str,
    pub listen: std::net::SocketAddr,
    pub count: &'a str,
    pub ready: &'a str,
    pub admin: Option<std::net::SocketAddr>,
    pub command: &'a [String],
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::File(path) => write!(f, "{}", path.display()),
            Source::CommandLine { .. } => f.write_str("lb run"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{RunFlags, Source};
    use std::path::Path;

    fn flags<'a>(command: &'a [String], count: &'a str) -> RunFlags<'a> {
        RunFlags {
            name: "app",
            listen: "0.0.0.0:8080".parse().expect("address"),
            count,
            ready: "tcp",
            admin: None,
            command,
        }
    }

    #[test]
    fn lb_run_is_one_service_with_every_other_key_at_its_default() {
        let command = ["node".to_owned(), "server.js".to_owned()];
        let config = Source::command_line(&flags(&command, "2"), Path::new("/srv/app"))
            .load()
            .expect("valid");
        assert_eq!(config.services.len(), 1);
        let svc = &config.services[0];
        assert_eq!(svc.name, "app");
        assert_eq!(svc.listen, vec!["0.0.0.0:8080".parse().expect("address")]);
        let workers = svc.workers.as_ref().expect("workers");
        assert_eq!(workers.count.get(), 2);
        assert_eq!(workers.command.argv(), command);
        assert_eq!(workers.cwd, Path::new("/srv/app"));
        assert_eq!(config.admin, Some(crate::config::DEFAULT_ADMIN));
    }

    #[test]
    fn arguments_that_look_like_yaml_stay_arguments() {
        let command = [
            "sh".to_owned(),
            "-c".to_owned(),
            "echo \"]\n- x: {\\ \u{7f}\u{85}\u{2028}\t \u{1F600}".to_owned(),
        ];
        let config = Source::command_line(&flags(&command, "auto"), Path::new("/"))
            .load()
            .expect("valid");
        let workers = config.services[0].workers.as_ref().expect("workers");
        assert_eq!(workers.command.argv(), command);
    }

    #[test]
    fn a_bad_count_names_the_field() {
        let command = ["x".to_owned()];
        let err = Source::command_line(&flags(&command, "-2"), Path::new("/"))
            .load()
            .expect_err("refused")
            .to_string();
        assert!(err.contains("workers.count"), "{err}");
    }
}
