//! The packets a short connection costs through lb, as the kernel counts them for each
//! socket (`ss -ti`, `segs_in`): a reply that ends its connection leaves lb with the FIN
//! in one packet, and bytes lb has for a backend ride on the handshake's last ACK.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use common::config::{Config, Service};
use common::observe::healthz;
use common::{Lb, backend, wait_until};

const QUICK: Duration = Duration::from_secs(10);

/// Segments the socket from `local` to `peer` has received, from `ss` (iproute2).
fn segs_in(local: SocketAddr, peer: SocketAddr) -> u64 {
    let out = Command::new("ss")
        .args(["-tinH", "state", "all", "src", &local.to_string(), "dst"])
        .arg(peer.to_string())
        .output()
        .expect("run ss (iproute2)");
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .find_map(|word| word.strip_prefix("segs_in:"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no segs_in for {local} -> {peer} in: {text}"))
}

fn lb_in_front_of(service: Service) -> Lb {
    let lb = Lb::start(&Config::new().service(service).yaml());
    let admin = lb.admin.expect("an admin API");
    wait_until("lb answering", QUICK, || healthz(admin).is_some());
    lb
}

#[test]
fn a_reply_that_ends_the_connection_reaches_the_client_with_the_fin_in_one_packet() {
    // The backend's reply and FIN arrive at lb together, in one segment (MSG_MORE, then the
    // shutdown), as from a server that closes after a short reply.
    let backend = backend(|mut stream| {
        let mut request = [0u8; 8];
        if stream.read_exact(&mut request).is_ok() {
            let socket = socket2::SockRef::from(&stream);
            let _ = socket.send_with_flags(b"the whole reply", nix::libc::MSG_MORE);
            let _ = stream.shutdown(Shutdown::Write);
        }
    });
    let lb = lb_in_front_of(Service::backends("web", &[backend]));
    let mut client = TcpStream::connect(lb.listen).expect("connect to lb");
    client.set_read_timeout(Some(QUICK)).expect("read timeout");
    client.write_all(b"request!").expect("send");
    let mut reply = Vec::new();
    client.read_to_end(&mut reply).expect("the reply, then EOF");
    assert_eq!(reply, b"the whole reply");
    // The SYN-ACK, lb's acknowledgement of the request, and the reply with the FIN; a
    // lone FIN after the reply would make it 4.
    let me = client.local_addr().expect("client address");
    assert_eq!(segs_in(me, lb.listen), 3);
}

#[test]
fn a_proxy_header_rides_on_the_handshakes_last_ack() {
    let (got, header) = mpsc::channel();
    let backend = backend(move |mut stream| {
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while !line.ends_with(b"\r\n") && stream.read(&mut byte).is_ok_and(|n| n == 1) {
            line.push(byte[0]);
        }
        let me = stream.local_addr().expect("backend address");
        let lb = stream.peer_addr().expect("lb's address");
        // Health checks send the LOCAL header alone and close: only clients count here.
        if line.starts_with(b"PROXY TCP4") {
            let _ = got.send((line, segs_in(me, lb)));
        }
        let _ = stream.write_all(b"ok");
    });
    let lb = lb_in_front_of(Service::backends("web", &[backend]).option("proxy_protocol", "v1"));
    let mut client = TcpStream::connect(lb.listen).expect("connect to lb");
    client.set_read_timeout(Some(QUICK)).expect("read timeout");
    let mut ok = [0u8; 2];
    client.read_exact(&mut ok).expect("the backend's answer");
    let (line, segments) = header.recv_timeout(QUICK).expect("a client's header");
    assert!(
        line.starts_with(b"PROXY TCP4 127.0.0.1 127.0.0.1 "),
        "{line:?}"
    );
    // The SYN, then the ACK with the header; a lone ACK before the header would make it 3.
    assert_eq!(segments, 2);
}
