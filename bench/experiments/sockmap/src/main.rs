//! Experiment, not part of wsproxy: does handing a proxied WebSocket's two
//! sockets to the kernel after the handshake beat copying in user space?
//!
//! The handshake is relayed in user space (request to the backend, its
//! response to the client, nothing checked). Then both sockets go into a
//! BPF sockmap whose `sk_skb` verdict program redirects every skb a socket
//! receives to the egress of its peer, found through a hash map keyed by
//! the receiving socket's cookie. The program is 18 instructions, written
//! out by hand below (no clang, no BPF crate). With `user` as the third
//! argument it copies with `tokio::io::copy_bidirectional` instead, as a
//! baseline. BENCHMARKS.md quotes what it measured.
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, Ordering};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[repr(C)]
#[derive(Clone, Copy)]
struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}
fn i(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: (src << 4) | dst,
        off,
        imm,
    }
}

fn bpf(cmd: i32, attr: &mut [u8]) -> io::Result<i32> {
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as i32)
    }
}
fn put32(a: &mut [u8], off: usize, v: u32) {
    a[off..off + 4].copy_from_slice(&v.to_ne_bytes());
}
fn put64(a: &mut [u8], off: usize, v: u64) {
    a[off..off + 8].copy_from_slice(&v.to_ne_bytes());
}

fn map_create(ty: u32, key: u32, val: u32, max: u32) -> io::Result<i32> {
    let mut a = [0u8; 128];
    put32(&mut a, 0, ty);
    put32(&mut a, 4, key);
    put32(&mut a, 8, val);
    put32(&mut a, 12, max);
    bpf(0, &mut a)
}
fn map_update(fd: i32, key: &[u8], val: &[u8]) -> io::Result<()> {
    let mut a = [0u8; 128];
    put32(&mut a, 0, fd as u32);
    put64(&mut a, 8, key.as_ptr() as u64);
    put64(&mut a, 16, val.as_ptr() as u64);
    put64(&mut a, 24, 0);
    bpf(2, &mut a).map(|_| ())
}
fn map_delete(fd: i32, key: &[u8]) -> io::Result<()> {
    let mut a = [0u8; 128];
    put32(&mut a, 0, fd as u32);
    put64(&mut a, 8, key.as_ptr() as u64);
    bpf(3, &mut a).map(|_| ())
}

struct Maps {
    sockmap: i32,
    peers: i32,
}

fn setup() -> io::Result<Maps> {
    let sockmap = map_create(15, 4, 4, 65536)?; // SOCKMAP
    let peers = map_create(1, 8, 4, 65536)?; // HASH cookie -> peer index
    let prog = [
        i(0xbf, 6, 1, 0, 0),   // r6 = r1
        i(0x85, 0, 0, 0, 46),  // call get_socket_cookie
        i(0x7b, 10, 0, -8, 0), // *(u64*)(r10-8) = r0
        i(0x18, 1, 1, 0, peers),
        i(0, 0, 0, 0, 0),     // r1 = peers
        i(0xbf, 2, 10, 0, 0), // r2 = r10
        i(0x07, 2, 0, 0, -8), // r2 += -8
        i(0x85, 0, 0, 0, 1),  // call map_lookup_elem
        i(0x15, 0, 0, 7, 0),  // if r0 == 0 goto pass
        i(0x61, 3, 0, 0, 0),  // r3 = *(u32*)r0
        i(0xbf, 1, 6, 0, 0),  // r1 = r6
        i(0x18, 2, 1, 0, sockmap),
        i(0, 0, 0, 0, 0),
        i(0xb7, 4, 0, 0, 0),  // r4 = 0 (egress)
        i(0x85, 0, 0, 0, 52), // call sk_redirect_map
        i(0x95, 0, 0, 0, 0),  // exit
        i(0xb7, 0, 0, 0, 1),  // pass: r0 = SK_PASS
        i(0x95, 0, 0, 0, 0),
    ];
    let license = b"GPL\0";
    let mut log = vec![0u8; 65536];
    let mut a = [0u8; 160];
    put32(&mut a, 0, 14); // SK_SKB
    put32(&mut a, 4, prog.len() as u32);
    put64(&mut a, 8, prog.as_ptr() as u64);
    put64(&mut a, 16, license.as_ptr() as u64);
    put32(&mut a, 24, 1);
    put32(&mut a, 28, log.len() as u32);
    put64(&mut a, 32, log.as_mut_ptr() as u64);
    // expected_attach_type at offset 68 (after kern_version 40, prog_flags 44, prog_name 48..64, prog_ifindex 64)
    put32(&mut a, 68, 38);
    let fd = match bpf(5, &mut a) {
        Ok(fd) => fd,
        Err(e) => {
            let s = String::from_utf8_lossy(&log);
            eprintln!("verifier: {}", s.trim_end_matches('\0'));
            return Err(e);
        }
    };
    let mut a = [0u8; 64];
    put32(&mut a, 0, sockmap as u32);
    put32(&mut a, 4, fd as u32);
    put32(&mut a, 8, 38); // BPF_SK_SKB_VERDICT
    bpf(8, &mut a)?;
    Ok(Maps { sockmap, peers })
}

fn cookie(s: &TcpStream) -> io::Result<u64> {
    let mut v: u64 = 0;
    let mut len = 8 as libc::socklen_t;
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            57,
            &mut v as *mut u64 as *mut _,
            &mut len,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(v)
    }
}

static NEXT: AtomicU32 = AtomicU32::new(0);

async fn read_head(s: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(1024);
    let mut b = [0u8; 1024];
    loop {
        let n = s.read(&mut b).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&b[..n]);
        if buf.windows(4).any(|w| w == b"\r\n\r\n") {
            return Ok(buf);
        }
    }
}

async fn handle(
    maps: &'static Maps,
    mut c: TcpStream,
    backend: String,
    user: bool,
) -> io::Result<()> {
    c.set_nodelay(true)?;
    let req = read_head(&mut c).await?;
    let mut b = TcpStream::connect(&backend).await?;
    b.set_nodelay(true)?;
    b.write_all(&req).await?;
    let resp = read_head(&mut b).await?;
    c.write_all(&resp).await?;
    if user {
        tokio::io::copy_bidirectional(&mut c, &mut b).await?;
        return Ok(());
    }
    let (ck, bk) = (cookie(&c)?, cookie(&b)?);
    let ci = NEXT.fetch_add(2, Ordering::Relaxed) % 65536;
    let bi = ci + 1;
    map_update(maps.peers, &ck.to_ne_bytes(), &bi.to_ne_bytes())?;
    map_update(maps.peers, &bk.to_ne_bytes(), &ci.to_ne_bytes())?;
    map_update(
        maps.sockmap,
        &bi.to_ne_bytes(),
        &(b.as_raw_fd() as u32).to_ne_bytes(),
    )?;
    map_update(
        maps.sockmap,
        &ci.to_ne_bytes(),
        &(c.as_raw_fd() as u32).to_ne_bytes(),
    )?;
    // Wait for either side to end.
    let (mut x, mut y) = ([0u8; 64], [0u8; 64]);
    let r = tokio::select! {
        r = c.read(&mut x) => ("client", r),
        r = b.read(&mut y) => ("backend", r),
    };
    if !matches!(r.1, Ok(0)) {
        eprintln!("unexpected user-space read on {}: {:?}", r.0, r.1);
    }
    let _ = map_delete(maps.sockmap, &ci.to_ne_bytes());
    let _ = map_delete(maps.sockmap, &bi.to_ne_bytes());
    let _ = map_delete(maps.peers, &ck.to_ne_bytes());
    let _ = map_delete(maps.peers, &bk.to_ne_bytes());
    Ok(())
}

#[tokio::main]
async fn main() -> io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let port = &args[1];
    let backend = args[2].clone();
    let user = args.get(3).map(|s| s == "user").unwrap_or(false);
    let maps: &'static Maps = Box::leak(Box::new(setup()?));
    let l = TcpListener::bind(format!("127.0.0.1:{port}")).await?;
    eprintln!("listening on {port} -> {backend} (user={user})");
    loop {
        let (c, _) = l.accept().await?;
        let backend = backend.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(maps, c, backend, user).await {
                eprintln!("conn: {e}");
            }
        });
    }
}
