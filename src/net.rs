//! Sockets: the listener wsproxy binds and the options every client and
//! backend socket gets.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;

/// Pending connections the kernel may queue before wsproxy accepts them.
/// `TcpListener::bind` uses 128, which overflows under a burst of
/// connects (each dropped SYN costs the client a one-second retransmit);
/// the kernel caps this at `net.core.somaxconn`.
pub const LISTEN_BACKLOG: u32 = 4096;

/// TCP keepalive for client and backend sockets: first probe after 60 s
/// idle, then every 10 s, 3 probes. A peer that vanished without a FIN (a
/// dropped network) is noticed within about 90 s even where nothing else
/// pings, as on proxied tunnels.
fn keepalive() -> socket2::TcpKeepalive {
    socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(60))
        .with_interval(Duration::from_secs(10))
        .with_retries(3)
}

/// Sets what every backend socket gets: no Nagle delay, and the `keepalive` settings above.
/// (Client sockets inherit both from the listener [`bind`] makes.)
pub fn tune_socket(stream: &tokio::net::TcpStream) {
    let _ = stream.set_nodelay(true);
    let _ = socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive());
}

/// Binds the listening socket with [`LISTEN_BACKLOG`] and `SO_REUSEADDR`
/// (so a restart does not wait for old connections in TIME_WAIT). It also
/// sets `TCP_NODELAY` and that keepalive, which Linux copies to every
/// accepted socket: no system call per connection.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_nodelay(true)?;
    socket2::SockRef::from(&socket).set_tcp_keepalive(&keepalive())?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_tuned(stream: &tokio::net::TcpStream) {
        let sock = socket2::SockRef::from(stream);
        assert!(sock.tcp_nodelay().expect("nodelay"));
        assert!(sock.keepalive().expect("keepalive"));
        assert_eq!(
            sock.tcp_keepalive_time().expect("idle"),
            Duration::from_secs(60)
        );
        assert_eq!(
            sock.tcp_keepalive_interval().expect("interval"),
            Duration::from_secs(10)
        );
        assert_eq!(sock.tcp_keepalive_retries().expect("retries"), 3);
    }

    #[tokio::test]
    async fn accepted_sockets_inherit_nodelay_and_keepalive_and_backends_get_them() {
        let listener = bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (client, accepted) =
            tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        let (server_side, _) = accepted.expect("accept");
        assert_tuned(&server_side);
        let client = client.expect("connect");
        assert!(
            !socket2::SockRef::from(&client)
                .keepalive()
                .expect("keepalive")
        );
        tune_socket(&client);
        assert_tuned(&client);
    }
}
