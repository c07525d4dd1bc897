//! Looking up the host names in a service's `backends`: a task per service asks DNS for
//! every name at once, reports each answer to the supervisor, waits `resolve_every` and
//! asks again, so the supervisor never waits on DNS. The lookups go through
//! `hickory-resolver`: the name servers in `resolvers` and nothing else when the config
//! lists some, otherwise the system's (`/etc/resolv.conf` with its search domains and
//! `ndots`, and `/etc/hosts`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{LookupIpStrategy, NameServerConfig, ResolveHosts, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::Event;

/// A host name to look up, and the `backends` entry (its label) it comes from.
#[derive(Debug, Clone)]
pub(super) struct Name {
    pub label: String,
    pub host: String,
    pub port: u16,
}

/// What one lookup of a name gave: its addresses with the entry's port, sorted, or why
/// there are none.
pub(super) type Answer = Result<Vec<SocketAddr>, String>;

/// Looks up `names` now and then every `every` until `cancel` fires, sending each
/// answer as [`Event::Resolved`] tagged with `generation`.
pub(super) fn start(
    service: String,
    generation: u64,
    names: Vec<Name>,
    resolvers: Arc<[SocketAddr]>,
    every: Duration,
    cancel: CancellationToken,
    events: mpsc::UnboundedSender<Event>,
) {
    tokio::spawn(async move {
        let lookups = async {
            loop {
                // A new resolver each round: no answer outlives its round in a cache, and
                // an edited /etc/resolv.conf or /etc/hosts takes effect.
                let resolver = resolver(&resolvers).map(Arc::new);
                let mut round = JoinSet::new();
                for name in &names {
                    let (resolver, name) = (resolver.clone(), name.clone());
                    round.spawn(async move {
                        let answer = match resolver {
                            Ok(resolver) => lookup(&resolver, &name.host, name.port).await,
                            Err(err) => Err(err),
                        };
                        (name.label, answer)
                    });
                }
                while let Some(done) = round.join_next().await {
                    let Ok((label, answer)) = done else { continue };
                    let event = Event::Resolved {
                        service: service.clone(),
                        generation,
                        label,
                        answer,
                    };
                    if events.send(event).is_err() {
                        return;
                    }
                }
                tokio::time::sleep(every).await;
            }
        };
        tokio::select! {
            () = lookups => {}
            () = cancel.cancelled() => {}
        }
    });
}

/// A resolver for `servers` (UDP, then TCP for truncated answers), or the system's
/// when there are none. Asks for A and AAAA records both: every address is a backend.
fn resolver(servers: &[SocketAddr]) -> Result<TokioResolver, String> {
    let provider = TokioRuntimeProvider::default();
    let mut builder = if servers.is_empty() {
        TokioResolver::builder(provider)
            .map_err(|err| format!("could not read the system's resolver config: {err}"))?
    } else {
        let servers = servers
            .iter()
            .map(|server| {
                let mut config = NameServerConfig::udp_and_tcp(server.ip());
                for connection in &mut config.connections {
                    connection.port = server.port();
                }
                config
            })
            .collect();
        let mut builder = TokioResolver::builder_with_config(
            ResolverConfig::from_name_servers(servers),
            provider,
        );
        // Exactly those servers: /etc/hosts is the system's resolver's business.
        builder.options_mut().use_hosts_file = ResolveHosts::Never;
        builder
    };
    builder.options_mut().ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
    builder
        .build()
        .map_err(|err| format!("could not set up a DNS resolver: {err}"))
}

/// The addresses `host` resolves to, each with `port`; an empty answer is an error.
async fn lookup(resolver: &TokioResolver, host: &str, port: u16) -> Answer {
    let found = resolver.lookup_ip(host).await.map_err(|err| match &err {
        // The query as Debug, which is all the error's Display says, reads poorly.
        NetError::Dns(DnsError::NoRecordsFound(none)) => {
            format!(
                "could not resolve {host}: no address ({})",
                none.response_code
            )
        }
        _ => format!("could not resolve {host}: {err}"),
    })?;
    let mut addrs: Vec<SocketAddr> = found.iter().map(|ip| SocketAddr::new(ip, port)).collect();
    addrs.sort_unstable();
    addrs.dedup();
    if addrs.is_empty() {
        return Err(format!(
            "could not resolve {host}: no address in the answer"
        ));
    }
    Ok(addrs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_system_resolver_reads_etc_hosts() {
        // Debian's /etc/hosts always has localhost; without a resolv.conf the system
        // resolver cannot be built at all, which is an answer too.
        let Ok(resolver) = resolver(&[]) else {
            return;
        };
        let addrs = lookup(&resolver, "localhost", 80).await.expect("localhost");
        assert!(
            addrs.iter().all(|a| a.ip().is_loopback() && a.port() == 80),
            "{addrs:?}"
        );
    }
}
