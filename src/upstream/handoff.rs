//! Where a tunnel runs, once the client has its 101: the two sockets as the
//! handshakes left them (hyper's upgraded client connection, the dialled
//! [`BackendStream`]) are taken apart into the halves the copy loop of
//! [`super::tunnel`] pumps.
//!
//! A plain-TCP tunnel is handed off to a worker thread: [`detach`] takes its
//! sockets off the runtime they were opened on, and [`tunnel_detached`]
//! puts them on the event loop of the worker that polls it. A tunnel with
//! TLS on either side stays where its sockets are, with [`tunnel`].
//! [`detach`] decides once which way a connection goes: [`tunnel`] only
//! gets what it gave back as [`Placed::Here`], so no plain-TCP pair
//! reaches it.

use std::pin::Pin;

use hyper_util::rt::TokioIo;

use super::connect::BackendStream;
use super::limits::Limits;
use super::tunnel::{Meter, Verdict, both_ways};
use crate::context::Draining;

/// A plain-TCP tunnel's sockets, taken off the runtime they were opened
/// on so that a worker's event loop can take them (see [`detach`]).
#[derive(Debug)]
pub struct Detached {
    client: std::net::TcpStream,
    early: Vec<u8>,
    backend: std::net::TcpStream,
    leftover: Vec<u8>,
}

/// Where a tunnel can run.
pub enum Placed {
    /// Plain TCP on both sides: anywhere, with [`tunnel_detached`].
    Detached(Detached),
    /// TLS on either side (or a client stream hyper would not give back):
    /// with [`tunnel`], where the sockets already are.
    Here(TokioIo<hyper::upgrade::Upgraded>, (BackendStream, Vec<u8>)),
}

/// Takes a plain-TCP tunnel's two sockets off this runtime's event loop
/// (one `epoll_ctl` each; the worker adds them to its own). Anything else
/// is given back as it is. An error means a socket could not be taken off,
/// and the connection is lost.
pub fn detach(
    client: TokioIo<hyper::upgrade::Upgraded>,
    (backend, leftover): (BackendStream, Vec<u8>),
) -> std::io::Result<Placed> {
    let BackendStream::Plain(backend) = backend else {
        return Ok(Placed::Here(client, (backend, leftover)));
    };
    match client
        .into_inner()
        .downcast::<TokioIo<tokio::net::TcpStream>>()
    {
        Ok(parts) => Ok(Placed::Detached(Detached {
            // A copy, as in `tunnel`: the view would keep hyper's buffer.
            early: parts.read_buf.to_vec(),
            client: parts.io.into_inner().into_std()?,
            backend: backend.into_std()?,
            leftover,
        })),
        Err(upgraded) => Ok(Placed::Here(
            TokioIo::new(upgraded),
            (BackendStream::Plain(backend), leftover),
        )),
    }
}

/// [`tunnel`] for sockets [`detach`]ed from another runtime: they join the
/// event loop of the runtime this future is polled on.
pub async fn tunnel_detached(
    d: Detached,
    meters: (&Meter, &Meter),
    (stop, limits, verdict): (&Draining, Option<Limits>, &Verdict),
) -> (u64, u64) {
    let (client, backend) = match (
        tokio::net::TcpStream::from_std(d.client),
        tokio::net::TcpStream::from_std(d.backend),
    ) {
        (Ok(c), Ok(b)) => (c, b),
        (Err(e), _) | (_, Err(e)) => {
            tracing::warn!(error = %e, "a tunnel's sockets could not join their worker");
            return (0, 0);
        }
    };
    both_ways(
        client.into_split(),
        backend.into_split(),
        (d.early, d.leftover),
        meters,
        (stop, limits, verdict),
    )
    .await
}

/// Tunnels a proxied connection that [`detach`] left where it is (see
/// [`Placed::Here`]), checking the client's messages against `limits` if
/// the route has any: the returned future runs until both directions have
/// ended and returns (client to backend, backend to client) bytes.
///
/// Boxed, so that its state (a TLS stream's) is not reserved in the task
/// of every plain-TCP tunnel, which runs [`tunnel_detached`] instead.
pub fn tunnel<'a>(
    client: TokioIo<hyper::upgrade::Upgraded>,
    (backend, leftover): (BackendStream, Vec<u8>),
    meters: (&'a Meter, &'a Meter),
    (stop, limits, verdict): (&'a Draining, Option<Limits>, &'a Verdict),
) -> impl Future<Output = (u64, u64)> + Send + 'a {
    type Boxed<'a> = Pin<Box<dyn Future<Output = (u64, u64)> + Send + 'a>>;
    let boxed: Boxed<'a> = match client
        .into_inner()
        .downcast::<TokioIo<tokio::net::TcpStream>>()
    {
        Ok(parts) => {
            // `read_buf` is a view into hyper's whole request buffer (8 KiB
            // or more): keeping it, even empty, would keep that buffer for
            // the connection's life. Copy out what it holds (almost always
            // nothing) and let it go.
            let early = parts.read_buf.to_vec();
            Box::pin(both_ways(
                parts.io.into_inner().into_split(),
                tokio::io::split(backend),
                (early, leftover),
                meters,
                (stop, limits, verdict),
            ))
        }
        Err(upgraded) => Box::pin(both_ways(
            tokio::io::split(TokioIo::new(upgraded)),
            tokio::io::split(backend),
            (Vec::new(), leftover),
            meters,
            (stop, limits, verdict),
        )),
    };
    boxed
}
