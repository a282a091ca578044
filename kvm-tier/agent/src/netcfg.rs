//! The guest's network set-up, done by the agent as PID 1 at start (the images have no
//! iproute2, and a fork+exec per command is slow where the guest kernel is emulated): `lo` up,
//! and when the VMM gave the guest its network device, `eth0` at [`GUEST_ADDR`]/[`PREFIX`]
//! with a default route through [`GATEWAY`], and [`DNS_SERVER`] in `/etc/resolv.conf`.
//!
//! The addresses are the VMM's fixed ones (`dormant_kvm`'s `net` module holds the same values
//! and tests that they agree).

use std::io;
use std::net::Ipv4Addr;

/// The guest's address on `eth0`.
pub const GUEST_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
/// The prefix length of the guest's network.
pub const PREFIX: u8 = 24;
/// The default gateway (the VMM's stack).
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// The DNS server (the VMM answers it).
pub const DNS_SERVER: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);
/// The network device's interface name.
pub const INTERFACE: &str = "eth0";

/// Brings `lo` up and configures [`INTERFACE`] if it exists. Returns whether it does.
/// Errors: an ioctl on an existing interface failed (the guest then has no network).
pub fn configure() -> io::Result<bool> {
    let sock = Socket::new()?;
    sock.up("lo")?;
    if !sock.exists(INTERFACE) {
        return Ok(false);
    }
    sock.set_addr(INTERFACE, libc::SIOCSIFADDR, GUEST_ADDR)?;
    let mask = Ipv4Addr::from(u32::MAX << (32 - u32::from(PREFIX)));
    sock.set_addr(INTERFACE, libc::SIOCSIFNETMASK, mask)?;
    sock.up(INTERFACE)?;
    sock.default_route(GATEWAY)?;
    write_resolv_conf();
    Ok(true)
}

/// `/etc/resolv.conf` names [`DNS_SERVER`], where `/etc` is writable (a dangling symlink, such
/// as systemd-resolved's, is replaced by a file). Best effort: a read-only `/etc` keeps its own.
fn write_resolv_conf() {
    let path = std::path::Path::new("/etc/resolv.conf");
    let text = format!("nameserver {DNS_SERVER}\n");
    if std::fs::write(path, &text).is_err()
        && path.is_symlink()
        && std::fs::remove_file(path).is_ok()
    {
        let _ = std::fs::write(path, &text);
    }
}

fn context(e: io::Error, what: &str, op: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {op}: {e}"))
}

/// `struct rtentry` of `<net/route.h>` (glibc's libc bindings lack it).
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_pad4: *mut libc::c_void,
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

fn sockaddr_in(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr are both 16-byte plain-data C structs; every bit
    // pattern is a valid sockaddr.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

/// A datagram socket to issue interface ioctls on.
struct Socket(std::os::fd::OwnedFd);

impl Socket {
    fn new() -> io::Result<Socket> {
        // SAFETY: plain socket(2) call; the result is checked before use.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor nobody else owns.
        Ok(Socket(unsafe {
            <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd)
        }))
    }

    /// The ioctl `req` on `arg`; the error is the OS error as is (its code kept).
    fn ioctl<T>(&self, req: libc::c_ulong, arg: &mut T) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        // SAFETY: `arg` is the structure `req` reads or writes (ifreq or rtentry), valid and
        // exclusively borrowed for the call.
        let r = unsafe { libc::ioctl(self.0.as_raw_fd(), req as _, arg as *mut T) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn ifreq(name: &str) -> libc::ifreq {
        // SAFETY: ifreq is plain data; all zeros is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req
            .ifr_name
            .iter_mut()
            .zip(name.bytes().take(libc::IFNAMSIZ - 1))
        {
            *dst = src as libc::c_char;
        }
        req
    }

    fn exists(&self, name: &str) -> bool {
        let mut req = Self::ifreq(name);
        self.ioctl(libc::SIOCGIFFLAGS, &mut req).is_ok()
    }

    fn up(&self, name: &str) -> io::Result<()> {
        let mut req = Self::ifreq(name);
        self.ioctl(libc::SIOCGIFFLAGS, &mut req)
            .map_err(|e| context(e, name, "read flags"))?;
        // SAFETY: SIOCGIFFLAGS filled the union's flags member.
        let flags = unsafe { req.ifr_ifru.ifru_flags };
        if flags & libc::IFF_UP as libc::c_short != 0 {
            return Ok(());
        }
        req.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
        self.ioctl(libc::SIOCSIFFLAGS, &mut req)
            .map_err(|e| context(e, name, "bring up"))
    }

    fn set_addr(&self, name: &str, req_code: libc::c_ulong, addr: Ipv4Addr) -> io::Result<()> {
        let mut req = Self::ifreq(name);
        req.ifr_ifru.ifru_addr = sockaddr_in(addr);
        self.ioctl(req_code, &mut req)
            .map_err(|e| context(e, name, &format!("set address {addr}")))
    }

    fn default_route(&self, gateway: Ipv4Addr) -> io::Result<()> {
        let any = sockaddr_in(Ipv4Addr::UNSPECIFIED);
        let mut rt = RtEntry {
            rt_pad1: 0,
            rt_dst: any,
            rt_gateway: sockaddr_in(gateway),
            rt_genmask: any,
            rt_flags: (libc::RTF_UP | libc::RTF_GATEWAY) as libc::c_ushort,
            rt_pad2: 0,
            rt_pad3: 0,
            rt_pad4: std::ptr::null_mut(),
            rt_metric: 0,
            rt_dev: std::ptr::null_mut(),
            rt_mtu: 0,
            rt_window: 0,
            rt_irtt: 0,
        };
        match self.ioctl(libc::SIOCADDRT, &mut rt) {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
            r => r.map_err(|e| context(e, "default route via", &gateway.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rtentry_has_the_kernels_layout() {
        // x86-64 <net/route.h>: 120 bytes, flags at 56, dev at 88.
        assert_eq!(std::mem::size_of::<RtEntry>(), 120);
        assert_eq!(std::mem::offset_of!(RtEntry, rt_flags), 56);
        assert_eq!(std::mem::offset_of!(RtEntry, rt_dev), 88);
    }

    #[test]
    fn sockaddrs_carry_the_address_in_network_order() {
        let sa = sockaddr_in(Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(sa.sa_family, libc::AF_INET as libc::sa_family_t);
        assert_eq!(
            &sa.sa_data[2..6],
            &[10, 0, 2, 15].map(|b: u8| b as libc::c_char)
        );
    }
}
