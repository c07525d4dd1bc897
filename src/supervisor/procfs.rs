//! Every process on the machine as `/proc/PID/stat` describes it: one listing for the
//! two readers, worker usage (`usage.rs`) and adopted orphans (`orphans.rs`). Blocking
//! file I/O: call it on a blocking thread, never on the supervisor's task.

/// What one `/proc/PID/stat` line says of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Stat {
    pub pid: i32,
    pub ppid: i32,
    pub group: i32,
    pub zombie: bool,
    /// utime + stime + cutime + cstime, in clock ticks.
    pub ticks: u64,
    /// Resident pages.
    pub pages: u64,
}

/// Every process that could be read; one that exits between the listing and the read
/// is left out.
pub(super) fn processes() -> impl Iterator<Item = Stat> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
            // Bytes, not a String: comm is cut at 15 bytes, maybe inside a UTF-8 character.
            let stat = std::fs::read(format!("/proc/{pid}/stat")).ok()?;
            parse(pid, &String::from_utf8_lossy(&stat))
        })
}

/// proc(5): the command name is in parentheses and may hold spaces or parentheses, so
/// fields are counted from the last `)`: state is field 3, ppid 4, pgrp 5,
/// utime..cstime 14..17, rss 24.
fn parse(pid: i32, stat: &str) -> Option<Stat> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_ascii_whitespace().collect();
    let field = |n: usize| fields.get(n - 3).copied();
    let number = |n: usize| field(n)?.parse::<u64>().ok();
    Some(Stat {
        pid,
        ppid: field(4)?.parse().ok()?,
        group: field(5)?.parse().ok()?,
        zombie: field(3)? == "Z",
        ticks: number(14)? + number(15)? + number(16)? + number(17)?,
        pages: number(24)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_are_read_from_the_last_parenthesis() {
        let line = "4242 (my (odd) app) S 17 4240 4240 0 -1 4194560 1 0 0 0 70 30 5 5 20 0 1 0 \
                    100 12345678 2500 18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 1 0 0";
        assert_eq!(
            parse(4242, line),
            Some(Stat {
                pid: 4242,
                ppid: 17,
                group: 4240,
                zombie: false,
                ticks: 110,
                pages: 2500,
            })
        );
        assert!(
            parse(7, "7 (z) Z 1 7 7 0 -1 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0")
                .is_some_and(|s| s.zombie)
        );
        assert_eq!(parse(4242, "4242 (truncated"), None);
        assert_eq!(parse(1, "garbage"), None);
    }

    #[test]
    fn this_process_is_listed() {
        let me = i32::try_from(std::process::id()).expect("a pid");
        assert!(processes().any(|p| p.pid == me && p.pages > 0));
    }
}
