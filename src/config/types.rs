//! Small config values that validate themselves while they are deserialized, so a bad
//! value is reported with the YAML line and column of the value itself.

use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::str::FromStr;
use std::time::Duration;

use nix::sys::signal::Signal;
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::Spanned;

/// Builds a visitor error with our message instead of serde's generic "invalid type".
fn invalid<E: de::Error>(what: &str, found: impl fmt::Display) -> E {
    E::custom(format_args!("expected {what}, found {found}"))
}

/// Visitor methods that refuse the scalars YAML reads as numbers or booleans with our
/// message, placed at the value; serde's own "invalid type" error points at the key.
macro_rules! refuse_non_text_scalars {
    ($what:expr, $value:ty) => {
        fn visit_bool<E: de::Error>(self, v: bool) -> Result<$value, E> {
            Err(invalid($what, v))
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<$value, E> {
            Err(invalid($what, v))
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<$value, E> {
            Err(invalid($what, v))
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<$value, E> {
            Err(invalid($what, v))
        }
    };
}

/// A value as a person wrote it in an error: numbers bare (`found -2`), text quoted.
fn shown(text: &str) -> String {
    if text.parse::<f64>().is_ok() {
        text.to_owned()
    } else {
        format!("{text:?}")
    }
}

/// A duration written as `250ms`, `30s`, `5m` or `1h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DurationStr(pub Duration);

/// The longest duration a setting takes. Longer ones are surely typos, and deadlines
/// computed from them must not overflow the clock.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

impl<'de> Deserialize<'de> for DurationStr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        duration(d, true).map(DurationStr)
    }
}

/// A duration that must not be zero: a timeout or a period of 0s would close every
/// connection at once, fail every worker, or run a command in a busy loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PositiveDuration(pub Duration);

impl<'de> Deserialize<'de> for PositiveDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        duration(d, false).map(PositiveDuration)
    }
}

fn duration<'de, D: Deserializer<'de>>(d: D, zero_allowed: bool) -> Result<Duration, D::Error> {
    let text = ScalarText::deserialize(d)?;
    match humantime::parse_duration(&text.0) {
        Ok(d) if d.is_zero() && !zero_allowed => {
            Err(invalid("a duration longer than 0s", shown(&text.0)))
        }
        Ok(d) if d <= MAX_DURATION => Ok(d),
        _ => Err(invalid(
            "a duration like 250ms, 30s, 5m or 1h, up to 365d",
            shown(&text.0),
        )),
    }
}

/// A size in bytes written with its unit: `512MiB`, `1GiB`, `200MB`, `64KiB`, `4096B`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// Binary units first, so `MiB` is not read as `M` + `iB`.
    const UNITS: [(&'static str, u64); 7] = [
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
        ("GB", 1_000_000_000),
        ("MB", 1_000_000),
        ("KB", 1_000),
        ("B", 1),
    ];

    fn parse(text: &str) -> Option<u64> {
        let (number, unit) = Self::UNITS
            .iter()
            .find_map(|(name, unit)| Some((text.strip_suffix(name)?.trim_end(), *unit)))?;
        let number: u64 = number.parse().ok()?;
        number.checked_mul(unit).filter(|bytes| *bytes > 0)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = ScalarText::deserialize(d)?;
        ByteSize::parse(&text.0)
            .map(ByteSize)
            .ok_or_else(|| invalid("a size like 512MiB, 1GiB or 200MB", shown(&text.0)))
    }
}

/// `workers.count` and `threads`: a positive integer, or `auto` for the number of
/// available CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerCount {
    Auto,
    Fixed(NonZeroUsize),
}

impl WorkerCount {
    /// The number to run on this machine.
    pub fn resolve(self) -> NonZeroUsize {
        match self {
            WorkerCount::Fixed(n) => n,
            WorkerCount::Auto => std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN),
        }
    }

    /// `auto`, or a positive integer up to `max` (`noun`: what is counted, for the error).
    fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
        max: usize,
        noun: &str,
    ) -> Result<Self, D::Error> {
        const WHAT: &str = "a positive integer or \"auto\"";
        let text = ScalarText::deserialize(d)?;
        if text.0 == "auto" {
            return Ok(WorkerCount::Auto);
        }
        match text.0.parse::<usize>().ok().and_then(NonZeroUsize::new) {
            Some(n) if n.get() <= max => Ok(WorkerCount::Fixed(n)),
            Some(_) => Err(invalid(&format!("at most {max} {noun}"), text.0)),
            None => Err(invalid(WHAT, shown(&text.0))),
        }
    }
}

/// The most workers one service may run: far more than CPUs on any machine.
const MAX_WORKERS: usize = 1024;

impl<'de> Deserialize<'de> for WorkerCount {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        WorkerCount::deserialize(d, MAX_WORKERS, "workers")
    }
}

/// `threads`: how many threads carry connections, each with its own event loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThreadCount(pub WorkerCount);

/// The most connection threads: more than CPUs on any machine lb runs on; past the CPU
/// count threads only take turns.
const MAX_THREADS: usize = 1024;

impl<'de> Deserialize<'de> for ThreadCount {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        WorkerCount::deserialize(d, MAX_THREADS, "threads").map(ThreadCount)
    }
}

/// `max_connections`: a positive integer, at most [`MAX_CONNECTIONS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimit(pub NonZeroUsize);

/// Far above what one machine's file descriptors allow, and within what tokio's
/// semaphore can count.
pub const MAX_CONNECTIONS: usize = 1 << 24;

impl<'de> Deserialize<'de> for ConnectionLimit {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        const WHAT: &str = "a positive integer up to 16777216";
        let text = ScalarText::deserialize(d)?;
        match text.0.parse::<usize>().ok().and_then(NonZeroUsize::new) {
            Some(n) if n.get() <= MAX_CONNECTIONS => Ok(ConnectionLimit(n)),
            _ => Err(invalid(WHAT, shown(&text.0))),
        }
    }
}

/// A service name: `[a-z0-9_-]+`, because it appears in logs, metrics labels and URLs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceName(pub String);

impl<'de> Deserialize<'de> for ServiceName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        const WHAT: &str = "a name made of a-z, 0-9, _ and -";
        let text = ScalarText::deserialize(d)?;
        let ok = !text.0.is_empty()
            && text
                .0
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if ok {
            Ok(ServiceName(text.0))
        } else {
            Err(invalid(WHAT, shown(&text.0)))
        }
    }
}

const LISTEN_WHAT: &str = "an IP:port address like 0.0.0.0:8080";

/// A listen address: an IP and a port (`0.0.0.0:8080`, `[::]:8080`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenAddr(pub SocketAddr);

impl<'de> Deserialize<'de> for ListenAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = ScalarText::deserialize(d)?;
        SocketAddr::from_str(&text.0)
            .map(ListenAddr)
            .map_err(|_| invalid(LISTEN_WHAT, shown(&text.0)))
    }
}

/// Whether two listen addresses cannot both be bound: the same port, and the same IP or
/// a wildcard that covers the other (`[::]` covers IPv4 too: Linux binds it dual-stack).
pub fn addresses_clash(a: SocketAddr, b: SocketAddr) -> bool {
    let covers = |wild: SocketAddr, other: SocketAddr| {
        wild.ip().is_unspecified() && (wild.is_ipv6() || other.is_ipv4())
    };
    a.port() != 0 && a.port() == b.port() && (a.ip() == b.ip() || covers(a, b) || covers(b, a))
}

/// `admin.listen`: an address, `null` to turn the admin API off, or absent for the
/// default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AdminListen {
    #[default]
    Default,
    Disabled,
    Addr(SocketAddr),
}

impl AdminListen {
    pub fn resolve(self) -> Option<SocketAddr> {
        match self {
            AdminListen::Default => Some(super::DEFAULT_ADMIN),
            AdminListen::Disabled => None,
            AdminListen::Addr(addr) => Some(addr),
        }
    }
}

impl<'de> Deserialize<'de> for AdminListen {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = AdminListen;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an address like 127.0.0.1:9900, or null")
            }
            fn visit_unit<E: de::Error>(self) -> Result<AdminListen, E> {
                Ok(AdminListen::Disabled)
            }
            fn visit_none<E: de::Error>(self) -> Result<AdminListen, E> {
                Ok(AdminListen::Disabled)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<AdminListen, E> {
                SocketAddr::from_str(v)
                    .map(AdminListen::Addr)
                    .map_err(|_| invalid(ADMIN_WHAT, shown(v)))
            }
            refuse_non_text_scalars!(ADMIN_WHAT, AdminListen);
        }
        const ADMIN_WHAT: &str = "an IP:port address like 127.0.0.1:9900, or null";
        d.deserialize_any(V)
    }
}

/// `listen`: one address or a list of them; list items keep their position, so a
/// clash between services points at the very item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddrs {
    One(SocketAddr),
    Many(Vec<Spanned<ListenAddr>>),
}

impl ListenAddrs {
    pub fn addrs(&self) -> Vec<SocketAddr> {
        match self {
            ListenAddrs::One(addr) => vec![*addr],
            ListenAddrs::Many(items) => items.iter().map(|i| i.value.0).collect(),
        }
    }
}

impl<'de> Deserialize<'de> for ListenAddrs {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ListenAddrs;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an address like 0.0.0.0:8080, or a list of them")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ListenAddrs, E> {
                let addr = SocketAddr::from_str(v).map_err(|_| invalid(LISTEN_WHAT, shown(v)))?;
                Ok(ListenAddrs::One(addr))
            }
            refuse_non_text_scalars!(LISTEN_WHAT, ListenAddrs);
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ListenAddrs, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                if items.is_empty() {
                    return Err(invalid("at least one address", "an empty list"));
                }
                Ok(ListenAddrs::Many(items))
            }
        }
        d.deserialize_any(V)
    }
}

const COMMAND_WHAT: &str = "a list of arguments, or a string run through sh -c";

/// `workers.command`: an argv list run as is, or a string run through `sh -c`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandSpec {
    Argv(Vec<String>),
    Shell(String),
}

impl CommandSpec {
    /// The argv lb executes.
    pub fn argv(&self) -> Vec<String> {
        match self {
            CommandSpec::Argv(argv) => argv.clone(),
            CommandSpec::Shell(line) => vec!["sh".into(), "-c".into(), line.clone()],
        }
    }
}

/// What a command must be free of to reach exec(2).
const NO_NUL: &str = "a command without NUL bytes";

impl<'de> Deserialize<'de> for CommandSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = CommandSpec;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(COMMAND_WHAT)
            }
            refuse_non_text_scalars!(COMMAND_WHAT, CommandSpec);
            fn visit_str<E: de::Error>(self, v: &str) -> Result<CommandSpec, E> {
                if v.trim().is_empty() {
                    return Err(invalid("a command", "an empty string"));
                }
                if v.contains('\0') {
                    return Err(invalid(NO_NUL, "a NUL byte"));
                }
                Ok(CommandSpec::Shell(v.to_owned()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<CommandSpec, A::Error> {
                let mut argv = Vec::new();
                while let Some(arg) = seq.next_element::<ScalarText>()? {
                    argv.push(arg.0);
                }
                if argv.first().is_none_or(|program| program.is_empty()) {
                    return Err(invalid("a program and its arguments", "an empty command"));
                }
                // exec(2) takes C strings: such an argument could never start.
                if argv.iter().any(|arg| arg.contains('\0')) {
                    return Err(invalid(NO_NUL, "a NUL byte"));
                }
                Ok(CommandSpec::Argv(argv))
            }
        }
        d.deserialize_any(V)
    }
}

/// Any YAML scalar as the text a person wrote, so `env: {PORT_OFFSET: 3}` works, `0644`,
/// `1.10` and `on` reach a worker unchanged, and numeric values are checked by our code
/// with our messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScalarText(pub String);

impl<'de> Deserialize<'de> for ScalarText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ScalarText;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a scalar value")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ScalarText, E> {
                Ok(ScalarText(v.to_owned()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<ScalarText, E> {
                Ok(ScalarText(v))
            }
        }
        // Asking for a string makes the parser hand over the scalar as written rather
        // than as the number or boolean YAML 1.1 would read it as.
        d.deserialize_string(V)
    }
}

/// `stop_signal`: a signal name, with or without the `SIG` prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignalName(pub Signal);

impl<'de> Deserialize<'de> for SignalName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        const WHAT: &str = "a signal name like SIGTERM";
        let text = ScalarText::deserialize(d)?;
        let upper = text.0.to_ascii_uppercase();
        let full = if upper.starts_with("SIG") {
            upper
        } else {
            format!("SIG{upper}")
        };
        Signal::from_str(&full)
            .map(SignalName)
            .map_err(|_| invalid(WHAT, shown(&text.0)))
    }
}

const BACKEND_WHAT: &str = "host:port, or { address: host:port, weight: N }";

/// One static backend: `host:port`, or `{ address: host:port, weight: N }`. A host name
/// is kept as written: it is looked up while lb runs, not when the file is read, so a
/// config checks where DNS is unavailable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendSpec {
    /// The address as written, used as its label in logs and metrics (a host name's
    /// addresses are labelled each by its own `ip:port`).
    pub label: String,
    pub target: BackendTarget,
    pub weight: u32,
}

/// Where a static backend is: one address, or every address a host name resolves to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum BackendTarget {
    Addr(SocketAddr),
    Name { host: String, port: u16 },
}

/// The highest weight: enough to express any realistic capacity ratio (HAProxy allows 256).
pub const MAX_WEIGHT: u32 = 256;

impl BackendSpec {
    fn parse<E: de::Error>(label: String, weight: u32) -> Result<Self, E> {
        let target = BackendTarget::parse(&label).ok_or_else(|| {
            invalid(
                "host:port like 10.0.0.5:8080 or api.internal:8080",
                format_args!("{label:?}"),
            )
        })?;
        Ok(BackendSpec {
            label,
            target,
            weight,
        })
    }

    /// The host name, if the address is one.
    pub fn host_name(&self) -> Option<&str> {
        match &self.target {
            BackendTarget::Name { host, .. } => Some(host),
            BackendTarget::Addr(_) => None,
        }
    }
}

impl BackendTarget {
    /// `ip:port` (`[v6]:port`), or `name:port` with a well-formed DNS name and a port
    /// from 1 to 65535.
    fn parse(text: &str) -> Option<BackendTarget> {
        if let Ok(addr) = text.parse::<SocketAddr>() {
            return Some(BackendTarget::Addr(addr));
        }
        let (host, port) = text.rsplit_once(':')?;
        let port = port.parse::<u16>().ok().filter(|p| *p != 0)?;
        host_name_ok(host).then(|| BackendTarget::Name {
            host: host.to_owned(),
            port,
        })
    }
}

/// A DNS host name (RFC 1123): dot-separated labels of letters, digits and `-` (and
/// `_`, which service names in DNS use), none empty, none starting or ending with `-`,
/// at most 63 bytes each and 253 in all; one trailing dot allowed. A bare IP address
/// is not a name (it would be one without its port, which `SocketAddr` refused).
fn host_name_ok(host: &str) -> bool {
    let name = host.strip_suffix('.').unwrap_or(host);
    if name.is_empty() || name.len() > 253 || name.parse::<std::net::IpAddr>().is_ok() {
        return false;
    }
    // All-numeric top labels are IPv4 look-alikes (`10.0.0.300`), not names.
    if name
        .rsplit('.')
        .next()
        .is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit()))
    {
        return false;
    }
    name.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    })
}

impl<'de> Deserialize<'de> for BackendSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Full {
            address: Address,
            #[serde(default)]
            weight: Option<Weight>,
        }
        /// `address` checked where it is written, so an error points at the value.
        struct Address(BackendSpec);
        impl<'de> Deserialize<'de> for Address {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = ScalarText::deserialize(d)?;
                BackendSpec::parse(text.0, 1).map(Address)
            }
        }
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = BackendSpec;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(BACKEND_WHAT)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<BackendSpec, E> {
                BackendSpec::parse(v.to_owned(), 1)
            }
            refuse_non_text_scalars!(BACKEND_WHAT, BackendSpec);
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<BackendSpec, A::Error> {
                let full = Full::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(BackendSpec {
                    weight: full.weight.map_or(1, |w| w.0),
                    ..full.address.0
                })
            }
        }
        d.deserialize_any(V)
    }
}

/// A backend weight from 1 to [`MAX_WEIGHT`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Weight(u32);

impl<'de> Deserialize<'de> for Weight {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let what = format!("an integer weight from 1 to {MAX_WEIGHT}");
        let text = ScalarText::deserialize(d)?;
        match text.0.parse::<u32>() {
            Ok(w) if (1..=MAX_WEIGHT).contains(&w) => Ok(Weight(w)),
            _ => Err(invalid(&what, shown(&text.0))),
        }
    }
}

/// `balance`: how a service picks a backend for each new connection (§7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    RoundRobin,
    LeastConn,
    RandomTwo,
    SourceHash,
}

impl Balance {
    const ALL: [Balance; 4] = [
        Balance::RoundRobin,
        Balance::LeastConn,
        Balance::RandomTwo,
        Balance::SourceHash,
    ];

    fn name(self) -> &'static str {
        match self {
            Balance::RoundRobin => "round-robin",
            Balance::LeastConn => "least-conn",
            Balance::RandomTwo => "random-two",
            Balance::SourceHash => "source-hash",
        }
    }
}

impl<'de> Deserialize<'de> for Balance {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = ScalarText::deserialize(d)?;
        let names = Balance::ALL.map(Balance::name);
        let name = choice(&text.0, &names, &[])?;
        Ok(Balance::ALL
            .into_iter()
            .find(|b| b.name() == name)
            .expect("choice returns one of the names it was given"))
    }
}

impl fmt::Display for Balance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `workers.ready`: when a worker counts as ready for connections.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ReadyCheck {
    /// Once a connect to its PORT succeeds.
    #[default]
    Tcp,
    /// Once it sends the string "ready" on its channel (Node: `process.send('ready')`).
    Message,
}

impl fmt::Display for ReadyCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ReadyCheck::Tcp => "tcp",
            ReadyCheck::Message => "message",
        })
    }
}

impl<'de> Deserialize<'de> for ReadyCheck {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = ScalarText::deserialize(d)?;
        match choice(&text.0, &["tcp", "message"], &[])? {
            "tcp" => Ok(ReadyCheck::Tcp),
            _ => Ok(ReadyCheck::Message),
        }
    }
}

/// `proxy_protocol`: whether and how lb tells backends the client's address.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ProxyProtocol {
    #[default]
    Off,
    V1,
    V2,
}

impl<'de> Deserialize<'de> for ProxyProtocol {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = ScalarText::deserialize(d)?;
        match choice(&text.0, &["off", "v1", "v2"], &[])? {
            "v1" => Ok(ProxyProtocol::V1),
            "v2" => Ok(ProxyProtocol::V2),
            _ => Ok(ProxyProtocol::Off),
        }
    }
}

impl fmt::Display for ProxyProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ProxyProtocol::Off => "off",
            ProxyProtocol::V1 => "v1",
            ProxyProtocol::V2 => "v2",
        })
    }
}

/// `true` or `false`, as written: YAML 1.1's `yes`, `on` and friends are refused rather
/// than guessed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flag(pub bool);

impl<'de> Deserialize<'de> for Flag {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = ScalarText::deserialize(d)?;
        match text.0.as_str() {
            "true" => Ok(Flag(true)),
            "false" => Ok(Flag(false)),
            other => Err(invalid("true or false", shown(other))),
        }
    }
}

/// The most checks `fall` or `rise` may count: more would take hours to act.
pub const MAX_CHECK_COUNT: u32 = 100;

/// `health_check.fall` / `rise`: checks in a row, 1 to [`MAX_CHECK_COUNT`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckCount(pub u32);

impl<'de> Deserialize<'de> for CheckCount {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = ScalarText::deserialize(d)?;
        match text.0.parse::<u32>() {
            Ok(n) if (1..=MAX_CHECK_COUNT).contains(&n) => Ok(CheckCount(n)),
            _ => Err(invalid(
                &format!("a number of checks from 1 to {MAX_CHECK_COUNT}"),
                shown(&text.0),
            )),
        }
    }
}

/// `health_check.path`: an absolute HTTP path, sent as is in the request line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpPath(pub String);

impl<'de> Deserialize<'de> for HttpPath {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = ScalarText::deserialize(d)?;
        let fits = text.0.starts_with('/')
            && text.0.len() <= 1024
            && text.0.bytes().all(|b| b.is_ascii_graphic());
        if fits {
            Ok(HttpPath(text.0))
        } else {
            Err(invalid(
                "an HTTP path like /healthz (no spaces, at most 1024 characters)",
                shown(&text.0),
            ))
        }
    }
}

/// One of `resolvers`: a DNS server as `IP:port`, or an IP (port 53).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resolver(pub SocketAddr);

impl<'de> Deserialize<'de> for Resolver {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = ScalarText::deserialize(d)?;
        if let Ok(addr) = text.0.parse::<SocketAddr>() {
            return Ok(Resolver(addr));
        }
        match text.0.parse::<std::net::IpAddr>() {
            Ok(ip) => Ok(Resolver(SocketAddr::new(ip, 53))),
            Err(_) => Err(invalid(
                "a DNS server as IP:port or IP, like 10.0.0.2:53",
                shown(&text.0),
            )),
        }
    }
}

/// An enum-like string setting of which only some values are built so far.
pub fn choice<E: de::Error>(
    text: &str,
    supported: &[&'static str],
    planned: &[&str],
) -> Result<&'static str, E> {
    if let Some(found) = supported.iter().find(|s| **s == text) {
        return Ok(found);
    }
    if planned.contains(&text) {
        return Err(E::custom(format_args!(
            "{text:?} is not supported yet (supported: {})",
            supported.join(", ")
        )));
    }
    let all: Vec<&str> = supported
        .iter()
        .copied()
        .chain(planned.iter().copied())
        .collect();
    Err(invalid(
        &format!("one of {}", all.join(", ")),
        format_args!("{text:?}"),
    ))
}

#[cfg(test)]
mod tests {

    #[test]
    fn sizes_are_read_with_their_unit() {
        use super::ByteSize;
        assert_eq!(ByteSize::parse("512MiB"), Some(512 << 20));
        assert_eq!(ByteSize::parse("1GiB"), Some(1 << 30));
        assert_eq!(ByteSize::parse("200MB"), Some(200_000_000));
        assert_eq!(ByteSize::parse("64 KiB"), Some(64 << 10));
        assert_eq!(ByteSize::parse("4096B"), Some(4096));
        for bad in [
            "512",
            "0MiB",
            "-1MiB",
            "1.5GiB",
            "MiB",
            "99999999999GiB",
            "512mib",
        ] {
            assert_eq!(ByteSize::parse(bad), None, "{bad}");
        }
    }

    use super::*;

    fn parse<T: for<'de> Deserialize<'de>>(yaml: &str) -> Result<T, String> {
        serde_saphyr::from_str(yaml).map_err(|e| {
            serde_saphyr::MessageFormatter::format_message(
                &serde_saphyr::UserMessageFormatter,
                e.without_snippet(),
            )
            .into_owned()
        })
    }

    #[test]
    fn durations_take_units() {
        assert_eq!(
            parse::<DurationStr>("250ms").unwrap().0,
            Duration::from_millis(250)
        );
        assert_eq!(
            parse::<DurationStr>("1h").unwrap().0,
            Duration::from_secs(3600)
        );
        let err = parse::<DurationStr>("soon").unwrap_err();
        assert!(err.contains("expected a duration"), "{err}");
    }

    #[test]
    fn count_is_auto_or_positive() {
        assert_eq!(parse::<WorkerCount>("auto").unwrap(), WorkerCount::Auto);
        assert_eq!(
            parse::<WorkerCount>("3").unwrap(),
            WorkerCount::Fixed(NonZeroUsize::new(3).unwrap())
        );
        let err = parse::<WorkerCount>("-2").unwrap_err();
        assert_eq!(err, "expected a positive integer or \"auto\", found -2");
        assert!(parse::<WorkerCount>("0").is_err());
        assert_eq!(
            parse::<ThreadCount>("auto").unwrap().0.resolve(),
            std::thread::available_parallelism().unwrap()
        );
        let err = parse::<ThreadCount>("2000").unwrap_err();
        assert_eq!(err, "expected at most 1024 threads, found 2000");
    }

    #[test]
    fn command_is_argv_or_shell() {
        assert_eq!(
            parse::<CommandSpec>("[node, app.js]").unwrap().argv(),
            vec!["node", "app.js"]
        );
        assert_eq!(
            parse::<CommandSpec>("node app.js").unwrap().argv(),
            vec!["sh", "-c", "node app.js"]
        );
        assert!(parse::<CommandSpec>("[]").is_err());
    }

    #[test]
    fn listen_is_one_or_many() {
        assert_eq!(
            parse::<ListenAddrs>("127.0.0.1:80").unwrap().addrs().len(),
            1
        );
        assert_eq!(
            parse::<ListenAddrs>("['127.0.0.1:80', '[::1]:81']")
                .unwrap()
                .addrs()
                .len(),
            2
        );
        assert!(parse::<ListenAddrs>("localhost").is_err());
    }

    #[test]
    fn backends_take_weights() {
        let b = parse::<BackendSpec>("{ address: '127.0.0.1:9', weight: 3 }").unwrap();
        assert_eq!((b.weight, b.label.as_str()), (3, "127.0.0.1:9"));
        assert!(parse::<BackendSpec>("{ address: '127.0.0.1:9', weight: 0 }").is_err());
        assert!(parse::<BackendSpec>("{ adress: '127.0.0.1:9' }").is_err());
    }

    #[test]
    fn backend_host_names_are_kept_as_written() {
        let target = |text: &str| parse::<BackendSpec>(&format!("'{text}'")).map(|b| b.target);
        assert_eq!(
            target("[::1]:80").unwrap(),
            BackendTarget::Addr("[::1]:80".parse().unwrap())
        );
        for (text, host, port) in [
            ("api.internal:8080", "api.internal", 8080),
            ("localhost:9", "localhost", 9),
            (
                "my-svc.ns.svc.cluster.local.:443",
                "my-svc.ns.svc.cluster.local.",
                443,
            ),
            ("_grpc.web:1", "_grpc.web", 1),
        ] {
            let name = BackendTarget::Name {
                host: host.to_owned(),
                port,
            };
            assert_eq!(target(text).unwrap(), name, "{text}");
        }
        // Not resolved while parsing: a name that exists nowhere is still valid.
        assert!(target("does-not-exist.invalid:80").is_ok());
        for bad in [
            "api.internal",
            "api.internal:",
            "api.internal:0",
            "api.internal:65536",
            "api..internal:80",
            "-api:80",
            "api-:80",
            "api internal:80",
            ":80",
            "10.0.0.300:80",
            "::1:80",
            "http://api:80",
        ] {
            assert!(target(bad).is_err(), "{bad}");
        }
        assert!(target(&format!("{}:80", "a".repeat(64))).is_err());
    }

    #[test]
    fn signals_with_or_without_prefix() {
        assert_eq!(parse::<SignalName>("TERM").unwrap().0, Signal::SIGTERM);
        assert_eq!(parse::<SignalName>("SIGQUIT").unwrap().0, Signal::SIGQUIT);
        assert!(parse::<SignalName>("SIGNOPE").is_err());
    }
}
