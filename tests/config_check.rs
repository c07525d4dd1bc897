//! `lb check` against golden files (contract §1 and §2).
//!
//! `tests/config/invalid/NAME.yaml` is checked with the current directory set to that
//! folder, and its stderr must equal `NAME.err` exactly. Each `NAME.yaml` starts with one
//! `# expect: FIELD.PATH` comment per expected error line, written by hand, so the field
//! path of every line is checked against what a person meant, not only against the
//! golden file. Adding a `.yaml`/`.err` pair adds a case.
//!
//! Every `tests/config/valid/*.yaml` must pass `lb check`, and so must every config that
//! ships: `config.example.yaml`, `examples/*/lb.yaml` and the `yaml` blocks of the READMEs
//! and of `docs/*.md`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const LB: &str = env!("CARGO_BIN_EXE_lb");

fn config_dir(kind: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("config")
        .join(kind)
}

/// The `*.yaml` files of `dir`, sorted; panics if there are none.
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|err| panic!("reading {}: {err}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "no *.yaml cases in {}: the test would check nothing",
        dir.display()
    );
    files
}

fn lb_check(cwd: &Path, args: &[&str]) -> Output {
    Command::new(LB)
        .current_dir(cwd)
        .arg("check")
        .args(args)
        .output()
        .expect("run lb check")
}

/// `services[0].workers.count`, `admin.listen`, `services[1]`: names and indexes only.
fn is_field_path(path: &str) -> bool {
    let mut rest = path;
    let mut first = true;
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix('[') {
            let Some(end) = after.find(']') else {
                return false;
            };
            if end == 0 || !after[..end].bytes().all(|b| b.is_ascii_digit()) {
                return false;
            }
            rest = &after[end + 1..];
        } else {
            let name_start = if first {
                rest
            } else if let Some(after) = rest.strip_prefix('.') {
                after
            } else {
                return false;
            };
            let end = name_start.find(['.', '[']).unwrap_or(name_start.len());
            let name = &name_start[..end];
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                return false;
            }
            rest = &name_start[end..];
        }
        first = false;
    }
    !path.is_empty()
}

/// Checks one error line's shape: `FILE:LINE:COL: field.path: message`, with LINE and
/// COL inside the file. Returns the field path.
fn check_line<'a>(case: &str, file: &str, source: &str, line: &'a str) -> &'a str {
    let prefix = format!("{file}:");
    let rest = line
        .strip_prefix(&prefix)
        .unwrap_or_else(|| panic!("{case}: line does not start with {prefix:?}: {line:?}"));
    let mut parts = rest.splitn(3, ':');
    let (Some(l), Some(c), Some(tail)) = (parts.next(), parts.next(), parts.next()) else {
        panic!("{case}: no :LINE:COL: in {line:?}");
    };
    let (l, c): (usize, usize) = match (l.parse(), c.parse()) {
        (Ok(l), Ok(c)) => (l, c),
        _ => panic!("{case}: no :LINE:COL: in {line:?}"),
    };
    let lines: Vec<&str> = source.lines().collect();
    assert!(
        (1..=lines.len()).contains(&l),
        "{case}: line {l} is outside the file ({} lines): {line:?}",
        lines.len()
    );
    let width = lines[l - 1].chars().count();
    assert!(
        (1..=width + 1).contains(&c),
        "{case}: column {c} is outside line {l} ({width} characters): {line:?}"
    );
    let tail = tail
        .strip_prefix(' ')
        .unwrap_or_else(|| panic!("{case}: no space after :LINE:COL: in {line:?}"));
    let (path, message) = tail
        .split_once(": ")
        .unwrap_or_else(|| panic!("{case}: no `field.path: message` in {line:?}"));
    assert!(
        is_field_path(path),
        "{case}: {path:?} is not a field path like services[0].workers.count: {line:?}"
    );
    assert!(
        !path.split(['.', '[']).any(|seg| seg == "value"),
        "{case}: a `value` segment leaked into the field path: {line:?}"
    );
    assert!(
        !message.trim().is_empty(),
        "{case}: empty message: {line:?}"
    );
    path
}

#[test]
fn invalid_configs_print_the_golden_errors() {
    let dir = config_dir("invalid");
    let cases = yaml_files(&dir);

    // Every golden file belongs to a case, so a renamed .yaml cannot leave one unchecked.
    for entry in fs::read_dir(&dir).expect("read the invalid folder") {
        let path = entry.expect("directory entry").path();
        if path.extension().is_some_and(|ext| ext == "err") {
            assert!(
                path.with_extension("yaml").is_file(),
                "{} has no .yaml beside it",
                path.display()
            );
        }
    }

    let mut failures = Vec::new();
    for yaml in &cases {
        let file = yaml.file_name().unwrap().to_str().unwrap();
        let case = file.trim_end_matches(".yaml");
        let source = fs::read_to_string(yaml).expect("read the case");
        let err_path = yaml.with_extension("err");
        let expected = fs::read_to_string(&err_path)
            .unwrap_or_else(|err| panic!("{case}: reading {}: {err}", err_path.display()));
        let expected = expected.trim_end_matches('\n');
        let expected_paths: Vec<&str> = source
            .lines()
            .filter_map(|line| line.strip_prefix("# expect: "))
            .map(str::trim)
            .collect();
        assert!(
            !expected_paths.is_empty(),
            "{case}: the .yaml needs one `# expect: FIELD.PATH` comment per error line"
        );

        let out = lb_check(&dir, &[file]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stderr = stderr.trim_end_matches('\n');

        assert_eq!(
            out.status.code(),
            Some(1),
            "{case}: lb check should exit 1\nstderr:\n{stderr}"
        );
        assert!(
            out.stdout.is_empty(),
            "{case}: nothing belongs on stdout for an invalid file, got:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );

        // One line per problem, each in the contract's shape.
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(
            lines.len(),
            expected_paths.len(),
            "{case}: expected {} error line(s), got:\n{stderr}",
            expected_paths.len()
        );
        for (line, want) in lines.iter().zip(&expected_paths) {
            let path = check_line(case, file, &source, line);
            assert_eq!(path, *want, "{case}: wrong field path in {line:?}");
        }

        if stderr != expected {
            failures.push(format!(
                "{case}:\n  expected: {}\n  actual:   {}",
                expected.replace('\n', "\n            "),
                stderr.replace('\n', "\n            ")
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "stderr differs from the .err golden file:\n{}",
        failures.join("\n")
    );
}

#[test]
fn valid_configs_pass() {
    // Run from the crate root with a path into tests/config/valid, so `cwd` keys are
    // resolved against the config file's folder and not against lb's current directory.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut failures = Vec::new();
    for yaml in yaml_files(&config_dir("valid")) {
        let rel = yaml
            .strip_prefix(root)
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned();
        let out = lb_check(root, &[&rel]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let first = stdout.lines().next().unwrap_or_default();
        if out.status.code() != Some(0) || first != format!("{rel}: ok") || !stderr.is_empty() {
            failures.push(format!(
                "{rel}: exit {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
                out.status.code()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn config_flag_and_positional_file_agree() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let valid = "tests/config/valid/minimal.yaml";
    let invalid = "tests/config/invalid/count_negative.yaml";
    for file in [valid, invalid] {
        let positional = lb_check(root, &[file]);
        let flag = lb_check(root, &["--config", file]);
        let short = lb_check(root, &["-c", file]);
        for other in [&flag, &short] {
            assert_eq!(positional.status.code(), other.status.code(), "{file}");
            assert_eq!(positional.stdout, other.stdout, "{file}");
            assert_eq!(positional.stderr, other.stderr, "{file}");
        }
    }
    let out = lb_check(root, &[valid]);
    assert_eq!(out.status.code(), Some(0));
    let out = lb_check(root, &[invalid]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim_end(),
        format!(
            "{invalid}:7:14: services[0].workers.count: expected a positive integer or \"auto\", found -2"
        )
    );
}

#[test]
fn a_missing_file_is_one_line_and_exit_1() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = lb_check(dir.path(), &["nope.yaml"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stderr = stderr.trim_end_matches('\n');
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("nope.yaml: "), "{stderr}");
}

#[test]
fn an_empty_file_is_one_line_and_exit_1() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("empty.yaml");
    std::fs::write(&path, "# only a comment\n\n").expect("write");
    let out = lb_check(dir.path(), &[&path.to_string_lossy()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.trim_end(),
        format!(
            "{}: the file is empty; expected a `services:` list",
            path.display()
        )
    );
}

#[test]
fn every_shipped_example_config_is_valid() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut configs = vec![root.join("config.example.yaml")];
    for entry in fs::read_dir(root.join("examples")).expect("examples folder") {
        let config = entry.expect("entry").path().join("lb.yaml");
        if config.exists() {
            configs.push(config);
        }
    }
    assert!(configs.len() >= 3, "{configs:?}");
    // Every ```yaml block of the READMEs and of the pages in docs/, written to a file of its own.
    let blocks = tempfile::tempdir().expect("temp dir");
    let mut readmes = vec![root.join("README.md")];
    for entry in fs::read_dir(root.join("examples")).expect("examples folder") {
        let readme = entry.expect("entry").path().join("README.md");
        if readme.exists() {
            readmes.push(readme);
        }
    }
    for entry in fs::read_dir(root.join("docs")).expect("docs folder") {
        let page = entry.expect("entry").path();
        if page.extension().is_some_and(|ext| ext == "md") {
            readmes.push(page);
        }
    }
    let mut found = 0;
    for readme in &readmes {
        let text = fs::read_to_string(readme).expect("read the markdown file");
        for (n, block) in yaml_blocks(&text).into_iter().enumerate() {
            let name = readme
                .strip_prefix(root)
                .expect("under the crate root")
                .to_string_lossy()
                .replace('/', "_");
            let file = blocks.path().join(format!("{name}-{n}.yaml"));
            fs::write(&file, block).expect("write the block");
            configs.push(file);
            found += 1;
        }
    }
    assert!(found >= 1, "no ```yaml block in {readmes:?}");
    for config in configs {
        let out = lb_check(Path::new("."), &[&config.to_string_lossy()]);
        assert!(
            out.status.success(),
            "{}: {}",
            config.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Contract §4: `lb check` prints the longest a stop can take, naming where it comes
/// from: `shutdown_delay`, then the service slowest to drain and stop as a whole.
#[test]
fn check_prints_the_longest_stop() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cases = [
        (
            "tests/config/valid/stop_times.yaml",
            "longest stop: 47s (shutdown_delay 5s + drain_timeout 40s + stop_timeout 2s of service api); \
             set docker stop -t / terminationGracePeriodSeconds above it",
        ),
        (
            "tests/config/valid/minimal.yaml",
            "longest stop: 40s (shutdown_delay 0s + drain_timeout 30s + stop_timeout 10s of service web); \
             set docker stop -t / terminationGracePeriodSeconds above it",
        ),
        (
            "tests/config/valid/static_backends.yaml",
            "longest stop: 30s (shutdown_delay 0s + drain_timeout 30s of service db-proxy, static backends only); \
             set docker stop -t / terminationGracePeriodSeconds above it",
        ),
    ];
    for (file, want) in cases {
        let out = lb_check(root, &[file]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{file}: {stdout}");
        let lines: Vec<&str> = stdout
            .lines()
            .filter(|l| l.starts_with("longest stop:"))
            .collect();
        assert_eq!(lines, [want], "{file}:\n{stdout}");
    }
}

/// The contents of the ```yaml fenced blocks of a Markdown text.
fn yaml_blocks(markdown: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in markdown.lines() {
        match &mut current {
            None if line.trim_start() == "```yaml" => current = Some(String::new()),
            Some(_) if line.trim_start() == "```" => blocks.extend(current.take()),
            Some(block) => {
                block.push_str(line);
                block.push('\n');
            }
            None => {}
        }
    }
    blocks
}
