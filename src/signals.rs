//! Unix signals, mapped to supervisor events.
//!
//! | signal | sent by | lb does |
//! | --- | --- | --- |
//! | SIGTERM | Docker, Kubernetes, systemd stopping lb | graceful stop; a second one stops at once |
//! | SIGINT | Ctrl-C in a terminal | the same as SIGTERM |
//! | SIGHUP | an operator or a config tool, after editing the config | reload: apply the difference |
//! | SIGUSR2 | a deploy script, after installing new code | rolling restart of every worker |

use tokio::signal::unix::{SignalKind, signal};

use crate::supervisor::{Command, Inbox, Scope};

/// Starts listening for signals; from now on none of them kills lb by default action.
pub fn start(inbox: Inbox) -> std::io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut usr2 = signal(SignalKind::user_defined2())?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                Some(()) = term.recv() => inbox.send(Command::Stop),
                Some(()) = int.recv() => inbox.send(Command::Stop),
                // The config is read off the supervisor's task, then applied.
                Some(()) = hup.recv() => {
                    inbox.with_config(|config| Command::Reload { config, reply: None });
                    true
                }
                Some(()) = usr2.recv() => {
                    inbox.with_config(|config| Command::Restart { scope: Scope::All, config, replies: Vec::new() });
                    true
                }
                else => return,
            };
        }
    });
    Ok(())
}
