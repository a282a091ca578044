//! Device states from snapshots are untrusted: restoring a decodable but hostile one (queue
//! rings outside RAM, sizes that are not powers of two, bogus FIFO contents, thousands of
//! connections, volume paths that are absolute or climb with `..`, flags that would truncate a
//! host file) never panics and never rebuilds something a guest could not have built: each
//! `restore` path refuses it, or restores exactly what the state says.
//!
//! Real devices over real (anonymous) guest memory and real host directories; no KVM needed.

#![allow(clippy::unwrap_used)]

use std::path::Path;

use proptest::prelude::*;
use vmm_sys_util::eventfd::EventFd;

use crate::persist::{MAX_MSRS, Regs, STATE_VERSION, SavedState};
use crate::serial::{ConsoleLog, IrqLine, UartState};
use crate::virtio::block::{BlockDevice, BlockState};
use crate::virtio::fs::{FsDevice, FsState, VolumeAttach};
use crate::virtio::mmio::{INT_VRING, QueueSnap, TransportState, VIRTIO_F_VERSION_1};
use crate::virtio::vsock::{LiveConn, MAX_SNAPSHOT_CONNS, VsockDevice, VsockState};
use crate::vm::GuestRam;
use crate::volume::{HandleSnap, MAX_HANDLES, NodeSnap, ROOT_ID, VolumeServer, VolumeState};

const RAM: u64 = 1 << 20;
const FEATURES_OK: u32 = 8;

fn ram() -> GuestRam {
    GuestRam::anonymous(RAM as usize).unwrap()
}

fn irq() -> EventFd {
    EventFd::new(0).unwrap()
}

fn queue(size: u16, ready: bool, desc: u64) -> QueueSnap {
    QueueSnap {
        size,
        ready,
        desc,
        avail: desc + 0x1000,
        used: desc + 0x2000,
        next_avail: 0,
        next_used: 0,
    }
}

fn transport(queues: Vec<QueueSnap>) -> TransportState {
    TransportState {
        device_features_sel: 0,
        driver_features: VIRTIO_F_VERSION_1,
        driver_features_sel: 0,
        queue_sel: 0,
        status: 0xf,
        interrupt_status: 0,
        config_generation: 0,
        queues,
    }
}

fn block(state: &TransportState) -> std::io::Result<BlockDevice> {
    let ram = ram();
    BlockDevice::new(
        ram.memory().clone(),
        GuestRam::anonymous(64 << 10).unwrap(),
        irq(),
        Some(&BlockState {
            transport: state.clone(),
        }),
    )
}

fn vsock_state(live: usize, open: usize) -> VsockState {
    VsockState {
        cid: 3,
        next_port: (1 << 30) + (live + open) as u32,
        transport: transport(vec![
            queue(256, false, 0),
            queue(256, false, 0),
            queue(64, false, 0),
        ]),
        open: (0..open).map(|i| ((1 << 30) + i as u32, 52)).collect(),
        live: (0..live)
            .map(|i| LiveConn {
                local: (1 << 30) + (open + i) as u32,
                peer: 52,
                peer_buf_alloc: 1 << 18,
                peer_fwd_cnt: 0,
                tx_cnt: 0,
                fwd_cnt: 0,
                credit_sent: 0,
            })
            .collect(),
    }
}

fn vsock(state: &VsockState) -> std::io::Result<VsockDevice> {
    VsockDevice::new(ram().memory().clone(), irq(), Some(state))
}

#[test]
fn queues_outside_ram_or_misaligned_are_refused() {
    assert!(block(&transport(vec![queue(128, true, 0x10000)])).is_ok());
    assert!(
        block(&transport(vec![queue(128, true, RAM - 0x1000)])).is_err(),
        "rings past the end of RAM"
    );
    assert!(
        block(&transport(vec![queue(128, true, u64::MAX - 0xfff)])).is_err(),
        "rings at the top of the address space"
    );
    // A misaligned descriptor table used to be dropped silently (the queue kept address 0).
    let misaligned = transport(vec![queue(128, true, 0x10008)]);
    if let Ok(dev) = block(&misaligned) {
        assert_eq!(
            dev.state().transport,
            misaligned,
            "restored exactly, or refused"
        );
    }
    assert!(block(&misaligned).is_err());
    assert!(
        block(&transport(vec![queue(100, false, 0)])).is_err(),
        "size"
    );
    assert!(
        block(&transport(vec![queue(512, false, 0)])).is_err(),
        "size"
    );
    assert!(
        block(&transport(vec![queue(128, false, 0); 2])).is_err(),
        "count"
    );
    let mut unoffered = transport(vec![queue(128, false, 0)]);
    unoffered.driver_features |= 1 << 40;
    assert!(
        block(&unoffered).is_err(),
        "features the device never offered"
    );
}

#[test]
fn thousands_of_vsock_connections_are_refused() {
    assert!(vsock(&vsock_state(10, 10)).is_ok());
    assert!(vsock(&vsock_state(MAX_SNAPSHOT_CONNS, 0)).is_ok());
    assert!(vsock(&vsock_state(5000, 0)).is_err(), "5000 live");
    assert!(vsock(&vsock_state(0, 5000)).is_err(), "5000 to reset");
    assert!(vsock(&vsock_state(3000, 3000)).is_err(), "6000 in all");
    // And the decoder stops reading past the cap.
    let json = serde_json::to_string(&vsock_state(MAX_SNAPSHOT_CONNS + 1, 0)).unwrap();
    assert!(serde_json::from_str::<VsockState>(&json).is_err());
}

#[test]
fn vsock_states_with_bogus_ids_or_ports_are_refused() {
    for cid in [0, 1, 2, u32::MAX as u64, u64::MAX] {
        let mut s = vsock_state(1, 0);
        s.cid = cid;
        assert!(vsock(&s).is_err(), "context id {cid}");
    }
    let mut s = vsock_state(1, 1);
    s.live[0].local = s.open[0].0;
    assert!(vsock(&s).is_err(), "one port twice");
    let mut s = vsock_state(1, 0);
    s.live[0].local = 80;
    assert!(vsock(&s).is_err(), "a port the host never allocates");
    let mut s = vsock_state(1, 0);
    s.next_port = 0;
    assert!(vsock(&s).is_err(), "next port");
}

#[test]
fn a_uart_state_with_more_than_its_fifo_is_refused() {
    let mut s = UartState::capture(&crate::serial::Uart::new(
        IrqLine(irq()),
        ConsoleLog::new(false),
    ));
    s.in_buffer = vec![b'x'; 64];
    assert!(s.restore(IrqLine(irq()), ConsoleLog::new(false)).is_ok());
    s.in_buffer.push(b'x');
    assert!(s.restore(IrqLine(irq()), ConsoleLog::new(false)).is_err());
    let json = serde_json::to_string(&s).unwrap();
    assert!(serde_json::from_str::<UartState>(&json).is_err());
}

/// FUSE requests, by the numbers of `include/uapi/linux/fuse.h`.
fn fuse(s: &mut VolumeServer, opcode: u32, nodeid: u64, body: &[u8]) -> Result<Vec<u8>, i32> {
    use zerocopy::{FromBytes, IntoBytes};
    let h = crate::volume::InHeader {
        len: (40 + body.len()) as u32,
        opcode,
        unique: 1,
        nodeid,
        uid: 0,
        gid: 0,
        pid: 1,
        padding: 0,
    };
    let mut req = h.as_bytes().to_vec();
    req.extend_from_slice(body);
    let mut reply = Vec::new();
    s.handle(&req, &mut reply);
    let (out, rest) = crate::volume::OutHeader::read_from_prefix(&reply).unwrap();
    if out.error != 0 {
        Err(-out.error)
    } else {
        Ok(rest.to_vec())
    }
}

fn read(s: &mut VolumeServer, node: u64, fh: u64) -> Result<Vec<u8>, i32> {
    let mut body = Vec::new();
    body.extend_from_slice(&fh.to_ne_bytes());
    body.extend_from_slice(&0u64.to_ne_bytes()); // offset
    body.extend_from_slice(&4096u32.to_ne_bytes()); // size
    body.extend_from_slice(&[0; 20]); // read_flags, lock_owner, flags, padding
    fuse(s, 15, node, &body)
}

fn lookup(s: &mut VolumeServer, parent: u64, name: &str) -> u64 {
    let mut body = name.as_bytes().to_vec();
    body.push(0);
    let out = fuse(s, 1, parent, &body).unwrap();
    u64::from_ne_bytes(out[..8].try_into().unwrap())
}

fn size_of_node(s: &mut VolumeServer, node: u64) -> u64 {
    let out = fuse(s, 3, node, &[0; 16]).unwrap();
    // attr_valid u64, attr_valid_nsec u32, dummy u32, then attr { ino u64, size u64, … }.
    u64::from_ne_bytes(out[24..32].try_into().unwrap())
}

fn volume_state(root: &Path, nodes: Vec<NodeSnap>, handles: Vec<HandleSnap>) -> VolumeState {
    VolumeState {
        root: root.to_path_buf(),
        next_id: 2 + nodes
            .iter()
            .map(|n| n.id)
            .chain(handles.iter().map(|h| h.fh))
            .max()
            .unwrap_or(0),
        nodes,
        handles,
    }
}

fn node(id: u64, path: &[u8]) -> NodeSnap {
    NodeSnap {
        id,
        path: path.to_vec(),
        lookups: 1,
    }
}

#[test]
fn a_restored_handle_cannot_truncate_or_create_host_files() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("f"), b"precious host data").unwrap();
    let state = volume_state(
        dir.path(),
        vec![node(2, b"f")],
        vec![HandleSnap {
            fh: 3,
            path: b"f".to_vec(),
            flags: (libc::O_RDWR | libc::O_TRUNC) as u32,
            dir: false,
        }],
    );
    let r = VolumeServer::open(dir.path(), false, Some(&state));
    if let Ok(mut s) = r {
        // What the old code did: the handle reopens with O_TRUNC on first use.
        let _ = read(&mut s, 2, 3);
        assert_eq!(
            std::fs::read(dir.path().join("f")).unwrap(),
            b"precious host data",
            "restoring a volume state truncated a host file"
        );
        panic!("a handle with O_TRUNC was restored");
    }
    for flags in [libc::O_CREAT, libc::O_EXCL, libc::O_PATH, libc::O_DIRECTORY] {
        let mut st = state.clone();
        st.handles[0].flags = (libc::O_RDONLY | flags) as u32;
        assert!(VolumeServer::open(dir.path(), false, Some(&st)).is_err());
    }
    let mut st = state.clone();
    st.handles[0].flags = libc::O_RDWR as u32;
    let mut s = VolumeServer::open(dir.path(), false, Some(&st)).unwrap();
    assert_eq!(read(&mut s, 2, 3).unwrap(), b"precious host data");
}

#[test]
fn restored_node_ids_never_collide_with_new_ones() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a"), b"a").unwrap();
    for name in ["b", "c", "d", "e"] {
        std::fs::write(dir.path().join(name), b"eeeee").unwrap();
    }
    let mut state = volume_state(dir.path(), vec![node(5, b"a")], vec![]);
    state.next_id = 2;
    let r = VolumeServer::open(dir.path(), false, Some(&state));
    if let Ok(mut s) = r {
        for name in ["b", "c", "d", "e"] {
            lookup(&mut s, ROOT_ID, name);
        }
        assert_eq!(
            size_of_node(&mut s, 5),
            1,
            "node 5 (the guest's `a`) now names another file"
        );
        panic!("a state whose next id is below its nodes' was restored");
    }
    state.next_id = 6;
    let mut s = VolumeServer::open(dir.path(), false, Some(&state)).unwrap();
    assert!(lookup(&mut s, ROOT_ID, "b") >= 6);
    assert_eq!(size_of_node(&mut s, 5), 1);
}

#[test]
fn volume_paths_must_be_relative_and_below_the_root() {
    let dir = tempfile::tempdir().unwrap();
    for bad in [
        &b"/etc/passwd"[..],
        b"..",
        b"../x",
        b"a/../../x",
        b"a//b",
        b"a/./b",
        b"a/",
        b"",
        b"a\0b",
    ] {
        let st = volume_state(dir.path(), vec![node(2, bad)], vec![]);
        assert!(
            VolumeServer::open(dir.path(), false, Some(&st)).is_err(),
            "{:?}",
            String::from_utf8_lossy(bad)
        );
    }
    let twice = volume_state(dir.path(), vec![node(2, b"a"), node(3, b"a")], vec![]);
    assert!(VolumeServer::open(dir.path(), false, Some(&twice)).is_err());
    let root = volume_state(dir.path(), vec![node(ROOT_ID, b"a")], vec![]);
    assert!(VolumeServer::open(dir.path(), false, Some(&root)).is_err());
    let handles = volume_state(
        dir.path(),
        vec![],
        (0..=MAX_HANDLES as u64)
            .map(|i| HandleSnap {
                fh: 2 + i,
                path: Vec::new(),
                flags: 0,
                dir: true,
            })
            .collect(),
    );
    assert!(VolumeServer::open(dir.path(), false, Some(&handles)).is_err());
    let ok = volume_state(dir.path(), vec![node(2, b"a/b c/d")], vec![]);
    assert!(VolumeServer::open(dir.path(), false, Some(&ok)).is_ok());
}

// --- Property tests: random states are refused or restored exactly, never a panic. ---

/// Addresses near the edges: inside RAM (aligned or not), at its end, far beyond.
fn address() -> impl Strategy<Value = u64> {
    prop_oneof![
        8 => (0u64..RAM / 0x1000).prop_map(|p| p * 0x1000),
        1 => 0u64..RAM,
        1 => (RAM - 0x100)..(RAM + 0x100),
        1 => any::<u64>(),
        1 => Just(u64::MAX - 3),
    ]
}

/// Mostly a queue a driver could have set up, sometimes anything.
fn queue_snap() -> impl Strategy<Value = QueueSnap> {
    prop_oneof![3 => valid_queue_snap(), 1 => any_queue_snap()]
}

fn valid_queue_snap() -> impl Strategy<Value = QueueSnap> {
    let page = || (0u64..RAM / 0x1000 - 1).prop_map(|p| p * 0x1000);
    (
        prop::sample::select(&[1u16, 16, 64][..]),
        any::<bool>(),
        page(),
        page(),
        page(),
        any::<u16>(),
        any::<u16>(),
    )
        .prop_map(
            |(size, ready, desc, avail, used, next_avail, next_used)| QueueSnap {
                size,
                ready,
                desc,
                avail,
                used,
                next_avail,
                next_used,
            },
        )
}

fn any_queue_snap() -> impl Strategy<Value = QueueSnap> {
    (
        prop_oneof![
            1 => Just(0u16),
            2 => Just(1),
            4 => Just(64),
            2 => Just(256),
            1 => Just(512),
            1 => any::<u16>()
        ],
        any::<bool>(),
        address(),
        address(),
        address(),
        any::<u16>(),
        any::<u16>(),
    )
        .prop_map(
            |(size, ready, desc, avail, used, next_avail, next_used)| QueueSnap {
                size,
                ready,
                desc,
                avail,
                used,
                next_avail,
                next_used,
            },
        )
}

fn transport_state(queues: usize) -> impl Strategy<Value = TransportState> {
    (
        any::<u32>(),
        prop_oneof![Just(VIRTIO_F_VERSION_1), any::<u64>()],
        any::<u32>(),
        any::<u32>(),
        prop_oneof![Just(0xfu32), Just(0), any::<u32>()],
        prop_oneof![Just(0u32), any::<u32>()],
        any::<u32>(),
        prop_oneof![
            4 => prop::collection::vec(queue_snap(), queues..=queues),
            1 => prop::collection::vec(queue_snap(), 0..=queues + 1),
        ],
    )
        .prop_map(
            |(dfs, df, drs, qs, status, int, gen_, queues)| TransportState {
                device_features_sel: dfs,
                driver_features: df,
                driver_features_sel: drs,
                queue_sel: qs,
                status,
                interrupt_status: int,
                config_generation: gen_,
                queues,
            },
        )
}

/// The model of what a transport may restore (see `MmioTransport::restore`).
fn transport_ok(s: &TransportState, max_sizes: &[u16], features: u64) -> bool {
    let fits = |addr: u64, len: u64| addr.checked_add(len).is_some_and(|end| end <= RAM);
    s.queues.len() == max_sizes.len()
        && (s.status & FEATURES_OK == 0 || s.driver_features & !features == 0)
        && s.queues.iter().zip(max_sizes).all(|(q, &max)| {
            let n = q.size as u64;
            q.size != 0
                && q.size.is_power_of_two()
                && q.size <= max
                && q.desc % 16 == 0
                && q.avail % 2 == 0
                && q.used % 4 == 0
                && (!q.ready
                    || (fits(q.desc, 16 * n)
                        && fits(q.avail, 6 + 2 * n)
                        && fits(q.used, 6 + 8 * n)))
        })
}

/// What the transport reports after restoring `s` (a pending interrupt is re-raised).
fn restored(s: &TransportState) -> TransportState {
    let mut want = s.clone();
    if want.interrupt_status != 0 {
        want.interrupt_status |= INT_VRING;
    }
    want
}

fn live_conn() -> impl Strategy<Value = LiveConn> {
    (
        prop_oneof![8 => (1u32 << 30)..(1 << 30) + 64, 1 => any::<u32>()],
        any::<u32>(),
        any::<u32>(),
        any::<u32>(),
        any::<u32>(),
        any::<u32>(),
        any::<u32>(),
    )
        .prop_map(|(local, peer, a, b, c, d, e)| LiveConn {
            local,
            peer,
            peer_buf_alloc: a,
            peer_fwd_cnt: b,
            tx_cnt: c,
            fwd_cnt: d,
            credit_sent: e,
        })
}

fn rel_path() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => prop::collection::vec("[a-z]{1,3}", 1..4).prop_map(|c| c.join("/").into_bytes()),
        2 => prop::collection::vec(prop::sample::select(&b"ab/."[..]), 0..8),
        1 => Just(b"..".to_vec()),
        1 => Just(b"/abs".to_vec()),
        1 => prop::collection::vec(any::<u8>(), 0..6),
    ]
}

/// Volume states (their root is set by the test to its own directory).
fn volume() -> impl Strategy<Value = VolumeState> {
    (
        prop::collection::vec(
            (
                prop_oneof![4 => 0u64..40, 1 => any::<u64>()],
                rel_path(),
                any::<u64>(),
            )
                .prop_map(|(id, path, lookups)| NodeSnap { id, path, lookups }),
            0..6,
        ),
        prop::collection::vec(
            (
                prop_oneof![4 => 0u64..40, 1 => any::<u64>()],
                rel_path(),
                prop_oneof![
                    2 => Just(0u32),
                    1 => Just(libc::O_RDWR as u32),
                    1 => Just((libc::O_WRONLY | libc::O_APPEND) as u32),
                    1 => any::<u32>()
                ],
                any::<bool>(),
            )
                .prop_map(|(fh, path, flags, dir)| HandleSnap {
                    fh,
                    path,
                    flags,
                    dir,
                }),
            0..4,
        ),
        prop_oneof![4 => 40u64..50, 1 => 0u64..40, 1 => any::<u64>()],
    )
        .prop_map(move |(nodes, handles, next_id)| VolumeState {
            root: std::path::PathBuf::new(),
            nodes,
            handles,
            next_id,
        })
}

fn blob(len: usize) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        12 => Just(vec![0u8; len]),
        6 => prop::collection::vec(any::<u8>(), len..=len),
        1 => prop::collection::vec(any::<u8>(), 0..len + 8),
    ]
}

fn saved_state() -> impl Strategy<Value = SavedState> {
    use kvm_bindings as k;
    use std::mem::size_of;
    (
        prop_oneof![4 => Just(STATE_VERSION), 1 => any::<u32>()],
        prop::collection::vec(any::<(u32, u64)>(), 0..MAX_MSRS + 3),
        (
            blob(size_of::<k::kvm_sregs>()),
            blob(size_of::<k::kvm_fpu>()),
            blob(size_of::<k::kvm_xsave>()),
            blob(size_of::<k::kvm_xcrs>()),
            blob(size_of::<k::kvm_lapic_state>()),
        ),
        (
            blob(size_of::<k::kvm_vcpu_events>()),
            blob(size_of::<k::kvm_debugregs>()),
            prop_oneof![
                4 => prop::collection::vec(blob(size_of::<k::kvm_irqchip>()), 3..=3),
                1 => prop::collection::vec(blob(size_of::<k::kvm_irqchip>()), 0..5),
            ],
            blob(size_of::<k::kvm_pit_state2>()),
            blob(size_of::<k::kvm_clock_data>()),
        ),
        any::<u64>(),
    )
        .prop_map(
            |(
                version,
                msrs,
                (sregs, fpu, xsave, xcrs, lapic),
                (events, debugregs, irqchips, pit, clock),
                r,
            )| {
                SavedState {
                    version,
                    regs: Regs {
                        rax: r,
                        rbx: r,
                        rcx: r,
                        rdx: r,
                        rsi: r,
                        rdi: r,
                        rsp: r,
                        rbp: r,
                        r8: r,
                        r9: r,
                        r10: r,
                        r11: r,
                        r12: r,
                        r13: r,
                        r14: r,
                        r15: r,
                        rip: r,
                        rflags: r,
                    },
                    msrs,
                    mp_state: r as u32,
                    sregs,
                    fpu,
                    xsave,
                    xcrs,
                    lapic,
                    events,
                    debugregs,
                    irqchips,
                    pit,
                    clock,
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// A block device restores a transport state exactly as it says, or refuses it, as the
    /// model says.
    #[test]
    fn block_transports_restore_exactly_or_are_refused(s in transport_state(1)) {
        let ok = transport_ok(&s, &[256], VIRTIO_F_VERSION_1 | (1 << virtio_bindings::virtio_blk::VIRTIO_BLK_F_FLUSH));
        match block(&s) {
            Ok(dev) => {
                prop_assert!(ok, "restored a state the model refuses: {:?}", s);
                prop_assert_eq!(dev.state().transport, restored(&s));
            }
            Err(_) => prop_assert!(!ok, "refused a valid state: {:?}", s),
        }
    }

    /// A vsock device restores its connections exactly, or refuses the state.
    #[test]
    fn vsock_states_restore_exactly_or_are_refused(
        cid in prop_oneof![4 => Just(3u64), 1 => any::<u64>()],
        next_port in prop_oneof![4 => Just((1u32 << 30) + 100), 1 => any::<u32>()],
        t in transport_state(3),
        open in prop::collection::vec((prop_oneof![8 => (1u32 << 30)..(1 << 30) + 64, 1 => any::<u32>()], any::<u32>()), 0..3),
        live in prop::collection::vec(live_conn(), 0..3),
    ) {
        let s = VsockState { cid, next_port, transport: t, open, live };
        let ok = s.check().is_ok() && transport_ok(&s.transport, &[256, 256, 64], VIRTIO_F_VERSION_1);
        match vsock(&s) {
            Ok(dev) => {
                prop_assert!(ok, "restored a state the model refuses: {:?}", s);
                let got = dev.state();
                let mut live = s.live.clone();
                live.sort_unstable_by_key(|c| c.local);
                prop_assert_eq!(got.live, live);
                prop_assert_eq!((got.cid, got.next_port), (s.cid, s.next_port));
                prop_assert_eq!(got.transport, restored(&s.transport));
            }
            Err(_) => prop_assert!(!ok, "refused a valid state: {:?}", s),
        }
    }

    /// A UART restores exactly or refuses, then survives any register traffic.
    #[test]
    fn uart_states_restore_exactly_and_survive_any_traffic(
        regs in prop::array::uniform9(any::<u8>()),
        in_buffer in prop::collection::vec(any::<u8>(), 0..80),
        ops in prop::collection::vec((0u8..10, any::<u8>(), any::<bool>()), 0..64),
    ) {
        let s = UartState {
            baud_divisor_low: regs[0],
            baud_divisor_high: regs[1],
            interrupt_enable: regs[2],
            interrupt_identification: regs[3],
            line_control: regs[4],
            line_status: regs[5],
            modem_control: regs[6],
            modem_status: regs[7],
            scratch: regs[8],
            in_buffer,
        };
        match s.restore(IrqLine(irq()), ConsoleLog::new(false)) {
            Ok(mut uart) => {
                prop_assert!(s.in_buffer.len() <= 64);
                prop_assert_eq!(UartState::capture(&uart), s.clone());
                for (offset, value, write) in ops {
                    if write {
                        let _ = uart.write(offset, value);
                    } else {
                        let _ = uart.read(offset);
                    }
                }
            }
            Err(_) => prop_assert!(s.in_buffer.len() > 64),
        }
    }

    /// A volume server restores a state exactly (as `state()` reports it back) or refuses it;
    /// whatever it restored is valid.
    #[test]
    fn volume_states_restore_exactly_or_are_refused(mut s in volume()) {
        let dir = tempfile::tempdir().unwrap();
        s.root = dir.path().to_path_buf();
        match VolumeServer::open(dir.path(), false, Some(&s)) {
            Ok(server) => {
                prop_assert!(s.check().is_ok());
                let mut want = s.clone();
                want.nodes.sort_by_key(|n| n.id);
                want.handles.sort_by_key(|h| h.fh);
                prop_assert_eq!(server.state(), want);
            }
            Err(_) => prop_assert!(s.check().is_err()),
        }
    }

    /// A volume slot's state (transport and volume together) restores or is refused, never a
    /// panic.
    #[test]
    fn fs_slot_states_restore_or_are_refused(
        t in transport_state(2),
        v in prop::option::of(volume()),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let v = v.map(|v| VolumeState { root: dir.path().to_path_buf(), ..v });
        let s = FsState { transport: t, volume: v };
        let attach = VolumeAttach { host: dir.path().to_path_buf(), read_only: false };
        let r = FsDevice::new(0, ram().memory().clone(), irq(), Some(&attach), Some(&s));
        let ok = transport_ok(&s.transport, &[128, 256], VIRTIO_F_VERSION_1)
            && s.volume.as_ref().is_none_or(|v| v.check().is_ok());
        prop_assert_eq!(r.is_ok(), ok);
    }

    /// The vCPU state is accepted exactly when every saved structure has its length, there are
    /// three irqchips and at most `MAX_MSRS` MSRs, and the version is known.
    #[test]
    fn saved_vcpu_states_load_exactly_when_well_formed(s in saved_state()) {
        use kvm_bindings as k;
        use std::mem::size_of;
        let ok = s.version == STATE_VERSION
            && s.msrs.len() <= MAX_MSRS
            && s.sregs.len() == size_of::<k::kvm_sregs>()
            && s.fpu.len() == size_of::<k::kvm_fpu>()
            && s.xsave.len() == size_of::<k::kvm_xsave>()
            && s.xcrs.len() == size_of::<k::kvm_xcrs>()
            && s.lapic.len() == size_of::<k::kvm_lapic_state>()
            && s.events.len() == size_of::<k::kvm_vcpu_events>()
            && s.debugregs.len() == size_of::<k::kvm_debugregs>()
            && s.irqchips.len() == 3
            && s.irqchips.iter().all(|c| c.len() == size_of::<k::kvm_irqchip>())
            && s.pit.len() == size_of::<k::kvm_pit_state2>()
            && s.clock.len() == size_of::<k::kvm_clock_data>();
        let r = s.to_state();
        prop_assert_eq!(r.is_ok(), ok, "{:?}", r.err());
        if let Ok(vm) = r {
            prop_assert_eq!(SavedState::from_state(&vm), s);
        }
    }
}
