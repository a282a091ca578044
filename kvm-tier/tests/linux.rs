//! End to end with the real Linux guest (kernel + busybox + dormant's agent, built by
//! `kvm-tier/guest/build.sh`): booted once per test run (the sandbox's base snapshot), then every
//! test resumes it. Skipped with a message where /dev/kvm is missing; where KVM exists a missing
//! guest image is a failure (the README's test command builds it).

#![allow(clippy::unwrap_used)]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use dormant_core::progress::{ProgressEvent, Unit};
use dormant_core::{
    Command, Error, GrantError, Grants, LocalStore, Managed, Runtime, Sandbox, SandboxSpec,
    SnapshotId, Tier,
};
use dormant_kvm::KvmRuntime;
use dormant_kvm::sandbox::{KvmOptions, KvmSandbox};

/// Guest RAM for the tests (boot time grows with it on PVM hosts).
const RAM: u64 = 128 << 20;

/// The progress events of [`booted`]'s create (a base's first boot).
static BOOT_EVENTS: OnceLock<Vec<ProgressEvent>> = OnceLock::new();

/// The store and a booted guest's snapshot, shared by all tests of this run.
fn booted() -> &'static (Arc<LocalStore>, SnapshotId) {
    static BOOTED: OnceLock<(Arc<LocalStore>, SnapshotId)> = OnceLock::new();
    BOOTED.get_or_init(|| {
        // Under target/ (cargo clean removes it); earlier runs' stores go first.
        let tmp = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
        for old in std::fs::read_dir(tmp).into_iter().flatten().flatten() {
            if old
                .file_name()
                .to_string_lossy()
                .starts_with("linux-tests-")
            {
                let _ = std::fs::remove_dir_all(old.path());
            }
        }
        let dir = tmp.join(format!("linux-tests-{}", std::process::id()));
        let store = Arc::new(LocalStore::open(&dir).unwrap());
        let t = std::time::Instant::now();
        // Generous deadlines: tests check behaviour, and guest kernel code may be emulated on a
        // busy host.
        let spec = SandboxSpec::linux()
            .image("minimal")
            .memory_limit(RAM)
            .call_timeout(Duration::from_secs(300));
        // The store is new: this create boots the base, and its progress events are kept for
        // `a_first_boot_reports_its_stages_in_order`.
        let events = std::sync::Mutex::new(Vec::new());
        let collect = |e: &ProgressEvent| events.lock().unwrap().push(e.clone());
        let mut sb =
            KvmSandbox::create_with_progress(store.clone(), spec, KvmOptions::default(), &collect)
                .unwrap_or_else(|e| panic!("boot the Linux guest: {e}"));
        BOOT_EVENTS.set(events.into_inner().unwrap()).unwrap();
        let id = sb.checkpoint().unwrap();
        eprintln!("Linux guest booted and checkpointed in {:?}", t.elapsed());
        (store, id)
    })
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs a usable /dev/kvm, which this machine lacks")]
fn a_first_boot_reports_its_stages_in_order() {
    let (store, _) = booted();
    let events = BOOT_EVENTS.get().unwrap();
    let stages: Vec<(&str, u64)> = events.iter().map(|e| (e.stage.as_str(), e.done)).collect();
    // Where the kernel is slow enough to be watched, its console lines come as step 0's text.
    let kernel = |s: &str| s == "boot: kernel" || s.starts_with("boot: kernel — ");
    let steps: Vec<(&str, u64)> = stages.iter().copied().filter(|(s, _)| !kernel(s)).collect();
    assert_eq!(stages[0], ("boot: kernel", 0), "{stages:?}");
    assert!(
        stages
            .iter()
            .take_while(|(s, _)| kernel(s))
            .all(|&(_, d)| d == 0)
    );
    assert_eq!(
        steps,
        [
            ("boot: agent answered", 1),
            ("boot: snapshot of the base", 2),
            ("boot: resume the base", 3),
            ("sandbox ready", 4),
        ],
        "{stages:?}"
    );
    for e in events {
        assert_eq!(
            (e.total, e.unit),
            (Some(dormant_kvm::BOOT_STEPS), Unit::Steps)
        );
    }
    let finished: Vec<bool> = events.iter().map(|e| e.finished).collect();
    assert_eq!(finished.iter().filter(|f| **f).count(), 1);
    assert!(finished.last().unwrap());

    // The base is cached now: another create of the same spec reports the final event only.
    let again = std::sync::Mutex::new(Vec::new());
    let collect = |e: &ProgressEvent| again.lock().unwrap().push(e.clone());
    let spec = SandboxSpec::linux()
        .image("minimal")
        .memory_limit(RAM)
        .call_timeout(Duration::from_secs(300));
    let rt = KvmRuntime::default();
    let mut sb = rt
        .create_with_progress(store.clone(), spec, &collect)
        .unwrap();
    let again = again.into_inner().unwrap();
    assert_eq!(
        again,
        [ProgressEvent::finished(
            "sandbox ready (base cached)",
            dormant_kvm::BOOT_STEPS,
            Unit::Steps
        )]
    );
    let out = sb.exec(&Command::new(["echo", "up"])).unwrap();
    assert_eq!(out.stdout, b"up\n");
}

fn fresh() -> KvmSandbox {
    let (store, id) = booted();
    let t = std::time::Instant::now();
    let sb = KvmSandbox::from_snapshot(store.clone(), id).unwrap();
    // The resume's phases are parts of the call, the guest's first reply among them.
    let phases = sb.resume_timings().unwrap();
    assert!(phases.total() <= t.elapsed(), "{phases:?}");
    assert!(phases.first_reply > Duration::ZERO, "{phases:?}");
    sb
}

fn sh(sb: &mut KvmSandbox, script: &str) -> (String, i32) {
    let out = sb.exec(&Command::new(["sh", "-c", script])).unwrap();
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        out.exit_code,
    )
}

/// The names in a guest directory, as the files API lists them (sorted).
fn names(sb: &mut KvmSandbox, dir: &str) -> Vec<String> {
    sb.list_dir(dir)
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect()
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs a usable /dev/kvm, which this machine lacks")]
fn exec_returns_output_and_exit_codes() {
    let mut sb = fresh();
    let out = sb.exec(&Command::new(["echo", "hello"])).unwrap();
    assert_eq!(out.stdout, b"hello\n");
    assert_eq!(out.exit_code, 0);
    let out = sb
        .exec(&Command::new(["sh", "-c", "echo oops >&2; exit 3"]))
        .unwrap();
    assert_eq!(out.exit_code, 3);
    assert_eq!(out.stderr, b"oops\n");
    let out = sb.exec(&Command::new(["cat"]).stdin("piped in")).unwrap();
    assert_eq!(out.stdout, b"piped in");
    let out = sb.exec(&Command::new(["pwd"]).cwd("/tmp")).unwrap();
    assert_eq!(out.stdout, b"/tmp\n");
    match sb.exec(&Command::new(["/no/such/program"])) {
        Err(Error::File { source, .. }) => {
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound)
        }
        other => panic!("expected not found, got {other:?}"),
    }
    let mut slow = Command::new(["sleep", "30"]);
    slow.timeout = Some(Duration::from_millis(500));
    assert!(matches!(sb.exec(&slow), Err(Error::Deadline { .. })));
    // The sandbox is still usable after a timed-out command.
    assert_eq!(sh(&mut sb, "echo still here").0, "still here\n");
}

/// Runs `f` on its own thread; its result arrives on the returned channel.
fn in_background<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> std::sync::mpsc::Receiver<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx
}

/// A tiny static x86-64 program for the guest: it makes itself `SCHED_FIFO` priority 99, then
/// spins for ever. With RT throttling off, nothing else runs again on the guest's only vCPU:
/// not the agent, not the kernel's vsock worker. If the kernel refuses, it exits with the errno.
fn cpu_hog_elf() -> Vec<u8> {
    const BASE: u64 = 0x40_0000;
    const CODE: u64 = 64 + 56;
    #[rustfmt::skip]
    let mut code: Vec<u8> = vec![
        0xB8, 0x90, 0x00, 0x00, 0x00, // mov eax, 144 (sched_setscheduler)
        0x31, 0xFF,                   // xor edi, edi (this process)
        0xBE, 0x01, 0x00, 0x00, 0x00, // mov esi, 1 (SCHED_FIFO)
        0x48, 0x8D, 0x15, 0, 0, 0, 0, // lea rdx, [rip + param]
        0x0F, 0x05,                   // syscall
        0x85, 0xC0,                   // test eax, eax
        0x75, 0x02,                   // jnz fail
        0xEB, 0xFE,                   // spin: jmp spin
        0xF7, 0xD8,                   // fail: neg eax
        0x89, 0xC7,                   // mov edi, eax
        0xB8, 0x3C, 0x00, 0x00, 0x00, // mov eax, 60 (exit)
        0x0F, 0x05,                   // syscall
    ];
    let param = code.len() as u32;
    code.extend_from_slice(&99u32.to_le_bytes()); // struct sched_param { 99 }
    code[15..19].copy_from_slice(&(param - 19).to_le_bytes()); // from the end of the lea
    let size = CODE + code.len() as u64;
    let mut elf = Vec::new();
    elf.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0"); // 64-bit, little-endian
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&0x3Eu16.to_le_bytes()); // x86-64
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&(BASE + CODE).to_le_bytes()); // entry
    elf.extend_from_slice(&64u64.to_le_bytes()); // program headers
    elf.extend_from_slice(&0u64.to_le_bytes()); // no section headers
    elf.extend_from_slice(&0u32.to_le_bytes());
    for v in [64u16, 56, 1, 0, 0, 0] {
        elf.extend_from_slice(&v.to_le_bytes());
    }
    elf.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    elf.extend_from_slice(&5u32.to_le_bytes()); // R + X
    for v in [0, BASE, BASE, size, size, 0x1000] {
        elf.extend_from_slice(&v.to_le_bytes());
    }
    assert_eq!(elf.len() as u64, CODE);
    elf.extend_from_slice(&code);
    elf
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs a usable /dev/kvm, which this machine lacks")]
fn a_guest_that_stops_answering_cannot_hang_a_call() {
    let (_, id) = booted();
    let mut sb = fresh();
    sb.write_file("/root/hog", &cpu_hog_elf()).unwrap();
    // The command takes the guest's only CPU for ever: the agent cannot even kill it at its
    // timeout and report. The host gives up on its own (before, this call never returned).
    // The timeout leaves the guest time to start the program (a fork+exec can take seconds
    // where its kernel is emulated): killed before it spins, the hog would prove nothing.
    let mut hog = Command::new([
        "sh",
        "-c",
        "chmod +x /root/hog && echo -1 > /proc/sys/kernel/sched_rt_runtime_us && exec /root/hog",
    ]);
    hog.timeout = Some(Duration::from_secs(30));
    let (r, mut sb) = in_background(move || (sb.exec(&hog), sb))
        .recv_timeout(Duration::from_secs(300))
        .expect("exec did not return although the guest hangs");
    assert!(matches!(r, Err(Error::Deadline { .. })), "{r:?}");
    // The next call cannot reach the agent: the sandbox is poisoned, naming its last snapshot.
    let (r, mut sb) = in_background(move || (sb.exists("/root"), sb))
        .recv_timeout(Duration::from_secs(300))
        .expect("a call did not return although the guest hangs");
    assert!(
        matches!(&r, Err(Error::Poisoned { last_good: Some(s), .. }) if s == id),
        "{r:?}"
    );
    assert_eq!(sb.state(), dormant_core::State::Poisoned);
    // Resuming it brings the sandbox back.
    sb.resume(id).unwrap();
    assert_eq!(sh(&mut sb, "echo back").0, "back\n");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs a usable /dev/kvm, which this machine lacks")]
fn an_interrupt_stops_a_long_exec_at_once_and_the_sandbox_answers_after() {
    // Through `Managed`: the running call holds its lock, the interrupter needs none.
    let m = dormant_core::Managed::new(fresh(), None);
    let (started, pid) = std::sync::mpsc::channel();
    let call = {
        let m = m.clone();
        in_background(move || {
            let cmd = Command::new(["sh", "-c", "echo $$; exec sleep 600"]);
            m.with(|sb| {
                sb.exec_streaming(
                    &cmd,
                    &mut |d| {
                        let _ = started.send(String::from_utf8_lossy(d).into_owned());
                    },
                    &mut |_| {},
                )
            })
        })
    };
    let pid: u32 = pid
        .recv_timeout(Duration::from_secs(300))
        .expect("the command did not start")
        .trim()
        .parse()
        .unwrap();
    m.interrupt();
    let r = call
        .recv_timeout(Duration::from_secs(60))
        .expect("the interrupted call did not return");
    assert!(matches!(r, Err(Error::Interrupted { .. })), "{r:?}");
    // The lock is free, the sandbox answers, and the command was killed in the guest.
    assert_eq!(m.state(), dormant_core::State::Running);
    let gone = format!("while kill -0 {pid} 2>/dev/null; do sleep 0.1; done; echo gone");
    let out = m.exec(&Command::new(["sh", "-c", &gone])).unwrap();
    assert_eq!(out.stdout, b"gone\n");
    // An interrupt between calls does not stop the next one.
    m.interrupt();
    let out = m.exec(&Command::new(["echo", "unaffected"])).unwrap();
    assert_eq!(out.stdout, b"unaffected\n");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs a usable /dev/kvm, which this machine lacks")]
fn output_past_the_limit_stops_the_command_at_once() {
    let (store, _) = booted();
    let limit = 64 << 10;
    let spec = SandboxSpec::linux()
        .image("minimal")
        .memory_limit(RAM)
        .call_timeout(Duration::from_secs(300))
        .output_limit(limit);
    let mut sb = KvmSandbox::create(store.clone(), spec).unwrap();
    // Endless output is refused as soon as it passes the limit, and the command is killed
    // (before, it ran to its timeout).
    let mut endless = Command::new(["sh", "-c", "echo $$ > /tmp/yes.pid; exec yes"]);
    endless.timeout = Some(Duration::from_secs(120));
    match sb.exec(&endless) {
        Err(Error::OutputLimit { stream, limit: l }) => assert_eq!((stream, l), ("stdout", limit)),
        other => panic!("expected the output limit, got {other:?}"),
    }
    let gone = "p=$(cat /tmp/yes.pid); while kill -0 $p 2>/dev/null; do sleep 0.1; done; echo gone";
    assert_eq!(sh(&mut sb, gone).0, "gone\n");
    let too_much = Command::new(["sh", "-c", "head -c 65537 /dev/zero >&2"]);
    assert!(matches!(
        sb.exec(&too_much),
        Err(Error::OutputLimit {
            stream: "stderr",
            ..
        })
    ));
    // Up to the limit is fine.
    let out = sb
        .exec(&Command::new(["head", "-c", "65536", "/dev/zero"]))
        .unwrap();
    assert_eq!(out.stdout.len(), limit);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs a usable /dev/kvm, which this machine lacks")]
fn files_api_and_guest_commands_see_the_same_files() {
    let mut sb = fresh();
    sb.write_file("/root/notes/a.txt", b"from the host")
        .unwrap();
    assert_eq!(sh(&mut sb, "cat /root/notes/a.txt").0, "from the host");
    sh(&mut sb, "echo from the guest > /root/notes/b.txt");
    assert_eq!(
        sb.read_file("/root/notes/b.txt").unwrap(),
        b"from the guest\n"
    );
    assert_eq!(names(&mut sb, "/root/notes"), ["a.txt", "b.txt"]);
    assert!(sb.exists("/root/notes/a.txt").unwrap());
    sb.remove("/root/notes/a.txt").unwrap();
    assert!(!sb.exists("/root/notes/a.txt").unwrap());
    assert!(matches!(
        sb.read_file("/root/notes/missing"),
        Err(Error::File { .. })
    ));
    assert!(matches!(
        sb.read_file("relative/path"),
        Err(Error::InvalidPath { .. })
    ));
}

/// Child half of `files_and_processes_survive_resume_in_a_new_process`: run by that test in a
/// new process (`--ignored --exact`), it resumes the snapshot named in the environment.
#[test]
#[ignore = "run by files_and_processes_survive_resume_in_a_new_process in a child process"]
fn child_resumes_in_a_new_process() {
    let Ok(dir) = std::env::var("DORMANT_TEST_STORE") else {
        return;
    };
    let id: SnapshotId = std::env::var("DORMANT_TEST_SNAPSHOT")
        .unwrap()
        .parse()
        .unwrap();
    let store = Arc::new(LocalStore::open(dir).unwrap());
    let mut sb = KvmSandbox::from_snapshot(store, &id).unwrap();
    assert_eq!(
        sb.read_file("/root/api.txt").unwrap(),
        b"written by the API"
    );
    assert_eq!(sh(&mut sb, "cat /root/cmd.txt").0, "written by a command\n");
    let count = |sb: &mut KvmSandbox| -> u64 {
        let n = sb.read_file("/root/counter").unwrap();
        String::from_utf8_lossy(&n).lines().count() as u64
    };
    let before = count(&mut sb);
    let t = std::time::Instant::now();
    let mut after = before;
    while after <= before && t.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(500));
        after = count(&mut sb);
    }
    assert!(
        after > before,
        "the counter loop keeps running: {before} -> {after}"
    );
    let page = sh(&mut sb, "wget -qO- http://127.0.0.1:8080/index.html").0;
    assert_eq!(page, "served from the guest\n");
    println!("CHILD-OK counter {before} -> {after}");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs a usable /dev/kvm, which this machine lacks")]
fn files_and_processes_survive_resume_in_a_new_process() {
    let (store, _) = booted();
    let mut sb = fresh();
    sb.write_file("/root/api.txt", b"written by the API")
        .unwrap();
    sh(&mut sb, "echo written by a command > /root/cmd.txt");
    sb.write_file("/var/www/index.html", b"served from the guest\n")
        .unwrap();
    sb.spawn(&Command::new([
        "sh",
        "-c",
        "i=0; while true; do i=$((i+1)); echo $i >> /root/counter; sleep 1; done",
    ]))
    .unwrap();
    sb.spawn(&Command::new([
        "httpd", "-f", "-p", "8080", "-h", "/var/www",
    ]))
    .unwrap();
    // Wait until both run.
    let mut served = String::new();
    for _ in 0..50 {
        served = sh(
            &mut sb,
            "wget -qO- http://127.0.0.1:8080/index.html 2>/dev/null",
        )
        .0;
        if !served.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(served, "served from the guest\n");
    let id = sb.standby().unwrap();
    assert_eq!(sb.state(), dormant_core::State::Standby);

    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "child_resumes_in_a_new_process",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env("DORMANT_TEST_STORE", store.root())
        .env("DORMANT_TEST_SNAPSHOT", id.to_string())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && text.contains("CHILD-OK"), "{text}");

    // And in this process too, from the same snapshot.
    sb.resume(&id).unwrap();
    assert_eq!(
        sb.read_file("/root/api.txt").unwrap(),
        b"written by the API"
    );
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs a usable /dev/kvm, which this machine lacks")]
fn the_guest_clock_continues_after_resume() {
    let mut sb = fresh();
    let uptime = |sb: &mut KvmSandbox| -> f64 {
        let s = sh(sb, "cat /proc/uptime").0;
        s.split_whitespace().next().unwrap().parse().unwrap()
    };
    let start = std::time::Instant::now();
    let before = uptime(&mut sb);
    let id = sb.standby().unwrap();
    let asleep = std::time::Instant::now();
    std::thread::sleep(Duration::from_millis(2500));
    let slept = asleep.elapsed();
    sb.resume(&id).unwrap();
    let after = uptime(&mut sb);
    assert!(
        after >= before,
        "the clock went backwards: {before} -> {after}"
    );
    // The monotonic clock stood still while the snapshot slept: the guest counted at most the
    // time it ran (and was saved and restored), not the 2.5 s between. (On PVM hosts with the
    // `tsc` clocksource it counted them, and caught up on them at resume.)
    let ran = (start.elapsed() - slept).as_secs_f64();
    assert!(
        after - before <= ran + 0.5,
        "the guest's clock counted the standby: {before} -> {after} with {ran:.2} s of running"
    );
    // The wall clock is the host's again (it stood still during the standby).
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    };
    let before_exec = now();
    let guest: i64 = sh(&mut sb, "date +%s").0.trim().parse().unwrap();
    let after_exec = now();
    assert!(
        guest >= before_exec - 1 && guest <= after_exec + 1,
        "guest {guest} vs host {before_exec}..{after_exec}"
    );
    std::thread::sleep(Duration::from_millis(1200));
    let later = uptime(&mut sb);
    assert!(
        later > after + 0.5,
        "the clock runs after resume: {after} -> {later}"
    );
}

/// The KVM tier as a front end holds it, without naming it: its `Runtime` gives a
/// `Box<dyn Sandbox>`, and `Managed` reaches every capability through the contract.
#[test]
#[cfg_attr(no_kvm, ignore = "needs a usable /dev/kvm, which this machine lacks")]
fn the_kvm_runtime_gives_sandboxes_with_every_capability_behind_the_contract() {
    let (store, id) = booted();
    let rt: &dyn Runtime = &KvmRuntime::default();
    assert_eq!(rt.tier(), Tier::Kvm);
    let m = Managed::new(rt.resume(store.clone(), id, &Grants::new()).unwrap(), None);
    assert_eq!(m.tier(), Tier::Kvm);

    // Output as it comes.
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = m
        .exec_streaming(
            &Command::new(["sh", "-c", "echo one; echo two >&2; exit 4"]),
            &mut |c| out.extend_from_slice(c),
            &mut |c| err.extend_from_slice(c),
        )
        .unwrap();
    assert_eq!(
        (code, &out[..], &err[..]),
        (4, &b"one\n"[..], &b"two\n"[..])
    );

    // Background processes.
    let pid = m
        .spawn(&Command::new([
            "sh",
            "-c",
            "echo from the background; exit 5",
        ]))
        .unwrap();
    assert_eq!(
        m.wait(pid, Some(Duration::from_secs(300))).unwrap(),
        Some(5)
    );
    let (o, _, running) = m.output(pid).unwrap();
    assert_eq!((&o[..], running), (&b"from the background\n"[..], false));

    // Its interrupt kills a command and keeps the sandbox; run_code needs an image with
    // python3, which the minimal one lacks.
    assert!(m.interrupter().unwrap().stops_commands());
    let r = m.run_code_with_timeout("1", Some(Duration::from_secs(5)));
    assert!(matches!(r, Err(Error::Unsupported { .. })), "{r:?}");

    // Children of a stored snapshot: ids of their own, the snapshot's files, apart.
    m.write_file("/root/mark", b"parent").unwrap();
    let snap = m.checkpoint().unwrap();
    let mut kids = rt.fork(store.clone(), &snap, &Grants::new(), 2).unwrap();
    assert!(kids[0].id() != kids[1].id() && kids[0].id() != m.id());
    kids[0].write_file("/root/mark", b"child").unwrap();
    assert_eq!(kids[1].read_file("/root/mark").unwrap(), b"parent");
    assert_eq!(m.read_file("/root/mark").unwrap(), b"parent");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs a usable /dev/kvm, which this machine lacks")]
fn run_code_on_an_image_without_python_is_unsupported_and_names_one_with_it() {
    let mut sb = fresh();
    for timeout in [None, Some(Duration::from_secs(30))] {
        match sb.run_code_with_timeout("1 + 1", timeout) {
            Err(e @ Error::Unsupported { op: "run_code", .. }) => {
                let msg = e.to_string();
                assert!(msg.contains("\"minimal\" image"), "{msg}");
                assert!(msg.contains("no python3"), "{msg}");
                assert!(msg.contains("image=\"coding\""), "{msg}");
            }
            other => panic!("expected Unsupported, got {other:?}"),
        }
    }
    // The sandbox goes on.
    assert_eq!(sh(&mut sb, "echo still here"), ("still here\n".into(), 0));
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs a usable /dev/kvm, which this machine lacks")]
fn two_resumes_of_one_snapshot_are_independent() {
    let mut sb = fresh();
    sb.write_file("/root/shared.txt", b"before").unwrap();
    let mut kids = sb.fork(2).unwrap();
    let (a, b) = kids.split_at_mut(1);
    let (a, b) = (&mut a[0], &mut b[0]);
    assert_ne!(a.id(), b.id());
    // Their randomness differs at once (the entropy from the host mixed in on resume reseeds
    // the kernel's CRNG; before it did, two forks read the same bytes until the CRNG's own
    // reseed came, up to a minute later).
    let ra = sh(a, "head -c 16 /dev/urandom | od -An -tx1").0;
    let rb = sh(b, "head -c 16 /dev/urandom | od -An -tx1").0;
    assert_ne!(ra, rb);
    a.write_file("/root/shared.txt", b"changed by a").unwrap();
    sh(a, "echo only in a > /root/a-only");
    assert_eq!(b.read_file("/root/shared.txt").unwrap(), b"before");
    assert!(!b.exists("/root/a-only").unwrap());
    assert_eq!(sb.read_file("/root/shared.txt").unwrap(), b"before");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs a usable /dev/kvm, which this machine lacks")]
fn corrupted_or_foreign_snapshots_are_refused() {
    let (store, _) = booted();
    let mut sb = fresh();
    sb.write_file("/root/x", b"x").unwrap();
    let id = sb.checkpoint().unwrap();
    drop(sb);
    let manifest = store.snapshot_dir(&id).join("manifest.dsnp");
    let good = std::fs::read(&manifest).unwrap();

    // A flipped byte: the checksum catches it.
    let mut bad = good.clone();
    let n = bad.len();
    bad[n / 2] ^= 0x10;
    std::fs::write(&manifest, &bad).unwrap();
    match KvmSandbox::from_snapshot(store.clone(), &id) {
        Err(Error::Snapshot { id: got, .. }) => assert_eq!(got, id),
        other => panic!("expected a snapshot error, got {other:?}"),
    }
    // A format version from the future.
    let mut future = good.clone();
    future[8] = 0xff;
    future[9] = 0x7f;
    std::fs::write(&manifest, &future).unwrap();
    match KvmSandbox::from_snapshot(store.clone(), &id) {
        Err(
            e @ Error::Snapshot {
                source: dormant_core::SnapshotError::UnsupportedVersion { .. },
                ..
            },
        ) => assert!(
            e.to_string().contains(&id.to_string()),
            "the error names the snapshot: {e}"
        ),
        other => panic!("expected an unsupported version, got {other:?}"),
    }
    // A missing snapshot.
    let missing: SnapshotId = SnapshotId::generate();
    assert!(matches!(
        KvmSandbox::from_snapshot(store.clone(), &missing),
        Err(Error::SnapshotNotFound(_))
    ));
    // Restored, it loads again.
    std::fs::write(&manifest, &good).unwrap();
    let mut again = KvmSandbox::from_snapshot(store.clone(), &id).unwrap();
    assert_eq!(again.read_file("/root/x").unwrap(), b"x");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs a usable /dev/kvm, which this machine lacks")]
fn incremental_checkpoints_store_only_what_changed() {
    let (store, base) = booted();
    let mut sb = fresh();
    sb.write_file("/root/small", b"tiny change").unwrap();
    let id = sb.checkpoint().unwrap();
    let m = store.manifest(&id).unwrap();
    assert_eq!(m.parent.as_ref(), Some(base));
    // The idle agent connection is part of the snapshot (a resume adopts it).
    let state = m.tier_state.to_value();
    let live = &state["devices"]["vsock"]["live"];
    assert_eq!(live.as_array().map(Vec::len), Some(1), "{live}");
    let chain = store.chain(&id).unwrap();
    assert_eq!(
        chain[0].memory.kind,
        dormant_core::snapshot::LayerKind::Full
    );
    let full = chain[0].memory.file.stored;
    eprintln!(
        "delta after a small change: {} bytes; full image: {} bytes",
        m.memory.file.stored, full
    );
    assert!(
        m.memory.file.stored * 4 < full,
        "a small change stores a small delta: {} vs full {}",
        m.memory.file.stored,
        full
    );
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs a usable /dev/kvm, which this machine lacks")]
fn metrics_count_vcpu_time_resident_ram_and_disk_writes_across_standby() {
    let mut sb = fresh();
    sh(&mut sb, "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done");
    let m = sb.metrics().unwrap();
    assert!(m.cpu_time > Duration::ZERO, "{m:?}");
    assert_eq!(m.memory_limit_bytes, RAM);
    assert!(m.memory_bytes > 0 && m.memory_bytes <= RAM, "{m:?}");
    // 4 MiB through the block device (the guest's filesystem writes more: metadata, journal).
    let (_, code) = sh(
        &mut sb,
        "dd if=/dev/urandom of=/data/metrics bs=65536 count=64 2>/dev/null && sync",
    );
    assert_eq!(code, 0);
    let m2 = sb.metrics().unwrap();
    assert!(
        m2.disk_bytes_written >= m.disk_bytes_written + (4 << 20),
        "{m:?} -> {m2:?}"
    );
    assert!(m2.cpu_time >= m.cpu_time);
    // In standby: no guest RAM, the counters kept; resumed, they go on from there.
    let snap = sb.standby().unwrap();
    let asleep = sb.metrics().unwrap();
    assert_eq!(asleep.memory_bytes, 0);
    assert!(asleep.cpu_time >= m2.cpu_time);
    assert_eq!(asleep.disk_bytes_written, m2.disk_bytes_written);
    sb.resume(&snap).unwrap();
    sh(&mut sb, "cat /data/metrics > /dev/null");
    let woken = sb.metrics().unwrap();
    assert!(
        woken.memory_bytes > 0 && woken.memory_bytes <= RAM,
        "{woken:?}"
    );
    assert!(woken.cpu_time > asleep.cpu_time);
    assert!(woken.disk_bytes_written >= asleep.disk_bytes_written);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs a usable /dev/kvm, which this machine lacks")]
fn an_idle_guest_halts_its_vcpu() {
    let (store, _) = booted();
    let mut sb = fresh();
    // Asynchronous page faults are off: without a local APIC their "page ready" notices were
    // never taken, and with one pending KVM kept the vCPU runnable, so every `hlt` of the idle
    // loop returned at once (see `base_cmdline`).
    let id = sb.checkpoint().unwrap();
    let state = dormant_kvm::snapshot::load_machine(store, &id)
        .unwrap()
        .vm
        .save_state()
        .unwrap();
    const MSR_KVM_ASYNC_PF_EN: u32 = 0x4b56_4d02;
    let apf = state
        .msrs
        .iter()
        .find(|m| m.index == MSR_KVM_ASYNC_PF_EN)
        .map_or(0, |m| m.data);
    assert_eq!(apf & 1, 0, "async page faults enabled: {apf:#x}");
    // And the vCPU sleeps while nothing is asked of the guest: ~0.01 s of CPU per idle second
    // here (0.05 s with the PIT as its only timer), against a whole core before.
    // Timer interrupts (the PIT's line 0 and the local APIC timer's LOC row of
    // /proc/interrupts) between two reads 2 s apart.
    let timer_interrupts = |sb: &mut KvmSandbox| -> u64 {
        let text = String::from_utf8(sb.read_file("/proc/interrupts").unwrap()).unwrap();
        text.lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                match f.next() {
                    Some("0:" | "LOC:") => f.next()?.parse::<u64>().ok(),
                    _ => None,
                }
            })
            .sum()
    };
    // A read costs interrupts of its own (the kernel ticks while a command runs): the count
    // between two reads back to back is taken off.
    let first = timer_interrupts(&mut sb);
    let second = timer_interrupts(&mut sb);
    let before = sb.metrics().unwrap().cpu_time;
    std::thread::sleep(Duration::from_secs(2));
    let used = sb.metrics().unwrap().cpu_time - before;
    let third = timer_interrupts(&mut sb);
    let ticks = (third - second).saturating_sub(second - first);
    assert!(
        used < Duration::from_secs(1),
        "{used:?} of vCPU time over 2 idle seconds"
    );
    // The idle kernel sleeps until its next timer: the local APIC's TSC-deadline timer reaches
    // that far, where the PIT (the only clock event device without a local APIC) woke it every
    // ~27.5 ms, 72 times in 2 s.
    assert!(ticks < 36, "{ticks} timer interrupts over 2 idle seconds");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs a usable /dev/kvm, which this machine lacks")]
fn the_disk_keeps_its_writes_across_checkpoints_and_copies_stay_apart() {
    let (store, _) = booted();
    let mut sb = fresh();
    let (mounts, _) = sh(&mut sb, "grep ' /data ' /proc/mounts");
    assert!(
        mounts.contains("/dev/vda"),
        "the disk is mounted: {mounts:?}"
    );
    // Without ext4's lazy init, which would run again after every resume (guest init).
    assert!(
        mounts.contains("noinit_itable") && mounts.contains("no_prefetch_block_bitmaps"),
        "{mounts:?}"
    );
    sh(
        &mut sb,
        "dd if=/dev/urandom of=/data/blob bs=4096 count=64 2>/dev/null; md5sum /data/blob > /data/blob.md5; sync",
    );
    let sum = sb.read_file("/data/blob.md5").unwrap();
    let id = sb.checkpoint().unwrap();
    let layers = store.snapshot_dir(&id);
    let delta = std::fs::metadata(layers.join("disk.delta")).unwrap().len();
    assert!(
        delta >= 64 * 4096,
        "the disk delta holds the written blocks: {delta} bytes"
    );
    // The running sandbox goes on writing; a resumed copy sees the checkpoint's disk.
    sh(&mut sb, "rm /data/blob; echo later > /data/later; sync");
    let mut copy = KvmSandbox::from_snapshot(store.clone(), &id).unwrap();
    let (check, code) = sh(&mut copy, "md5sum -c /data/blob.md5");
    assert_eq!(code, 0, "{check}");
    assert_eq!(copy.read_file("/data/blob.md5").unwrap(), sum);
    assert!(!copy.exists("/data/later").unwrap());
    assert!(sb.exists("/data/later").unwrap());
    assert!(!sb.exists("/data/blob").unwrap());
    // Store maintenance keeps the disk layers; compaction says it does not handle them.
    drop(copy);
    store.gc().unwrap();
    assert!(layers.join("disk.delta").exists());
    assert!(matches!(store.compact(&id), Err(Error::Unsupported { .. })));
    let mut again = KvmSandbox::from_snapshot(store.clone(), &id).unwrap();
    assert_eq!(again.read_file("/data/blob.md5").unwrap(), sum);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs a usable /dev/kvm, which this machine lacks")]
fn a_managed_linux_sandbox_sleeps_when_idle_and_wakes_on_use() {
    let m = dormant_core::Managed::new(fresh(), Some(Duration::from_millis(300)));
    m.exec(&Command::new(["sh", "-c", "echo kept > /root/managed"]))
        .unwrap();
    let t = std::time::Instant::now();
    while m.state() != dormant_core::State::Standby {
        assert!(t.elapsed() < Duration::from_secs(30), "never went idle");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(m.stats().auto_standbys, 1);
    // The next call wakes it transparently.
    let out = m.exec(&Command::new(["cat", "/root/managed"])).unwrap();
    assert_eq!(out.stdout, b"kept\n");
    assert_eq!(m.stats().wakes, 1);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs a usable /dev/kvm, which this machine lacks")]
fn volumes_share_host_directories_live_and_across_resumes() {
    let (store, _) = booted();
    let work = tempfile::tempdir().unwrap();
    let reference = tempfile::tempdir().unwrap();
    let host = |p: &str| work.path().join(p);
    std::fs::write(host("from-host.txt"), "hello from the host\n").unwrap();
    std::fs::write(reference.path().join("ref.txt"), "reference\n").unwrap();
    let spec = SandboxSpec::linux()
        .image("minimal")
        .memory_limit(RAM)
        .call_timeout(Duration::from_secs(300))
        .mount(work.path(), "/mnt/work", false)
        .mount(reference.path(), "/mnt/ref", true);
    let mut sb = KvmSandbox::create(store.clone(), spec).unwrap();

    // Host files are there; guest commands and the files API write through to the host.
    assert_eq!(
        sh(&mut sb, "cat /mnt/work/from-host.txt"),
        ("hello from the host\n".into(), 0)
    );
    let (out, code) = sh(
        &mut sb,
        "mkdir -p /mnt/work/proj/src && echo 'fn main() {}' > /mnt/work/proj/src/main.rs \
         && ls /mnt/work/proj/src",
    );
    assert_eq!((out.as_str(), code), ("main.rs\n", 0));
    assert_eq!(
        std::fs::read_to_string(host("proj/src/main.rs")).unwrap(),
        "fn main() {}\n"
    );
    sb.write_file("/mnt/work/api.txt", b"via the files API")
        .unwrap();
    assert_eq!(
        std::fs::read(host("api.txt")).unwrap(),
        b"via the files API"
    );
    assert_eq!(
        names(&mut sb, "/mnt/work"),
        ["api.txt", "from-host.txt", "proj"]
    );

    // Read-only: readable, never written.
    assert_eq!(sh(&mut sb, "cat /mnt/ref/ref.txt").0, "reference\n");
    assert_ne!(sh(&mut sb, "echo x > /mnt/ref/ref.txt").1, 0);
    assert!(matches!(
        sb.write_file("/mnt/ref/new.txt", b"x"),
        Err(Error::ReadOnly { .. })
    ));
    assert!(matches!(
        sb.remove("/mnt/ref/../ref/ref.txt"),
        Err(Error::ReadOnly { .. })
    ));
    assert_eq!(
        std::fs::read_to_string(reference.path().join("ref.txt")).unwrap(),
        "reference\n"
    );
    assert!(!reference.path().join("new.txt").exists());

    // A host change shows at once: the guest caches no volume data.
    std::fs::write(host("from-host.txt"), "changed while running\n").unwrap();
    assert_eq!(
        sh(&mut sb, "cat /mnt/work/from-host.txt").0,
        "changed while running\n"
    );

    // A process keeps a volume file open across standby and resume.
    sb.spawn(&Command::new([
        "sh",
        "-c",
        "exec 3>>/mnt/work/log; i=0; while true; do i=$((i+1)); echo $i >&3; sleep 1; done",
    ]))
    .unwrap();
    let lines = || {
        std::fs::read_to_string(host("log"))
            .map(|t| t.lines().count())
            .unwrap_or(0)
    };
    let t = std::time::Instant::now();
    while lines() == 0 && t.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(lines() > 0, "the writer started");
    let id = sb.standby().unwrap();

    // While the sandbox sleeps, the host edits and deletes.
    std::fs::write(host("from-host.txt"), "changed while asleep\n").unwrap();
    std::fs::remove_file(host("api.txt")).unwrap();
    let asleep = lines();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(lines(), asleep, "nothing runs while asleep");

    sb.resume(&id).unwrap();
    assert_eq!(
        sh(&mut sb, "cat /mnt/work/from-host.txt").0,
        "changed while asleep\n"
    );
    assert_eq!(sh(&mut sb, "test -e /mnt/work/api.txt").1, 1);
    let t = std::time::Instant::now();
    while lines() <= asleep && t.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        lines() > asleep,
        "the writer goes on through its open descriptor: {asleep} -> {}",
        lines()
    );

    // Copies share the volume (it is no snapshot's): a fork's write is the parent's too.
    let mut kids = sb.fork(1).unwrap();
    let kid = &mut kids[0];
    assert_eq!(sh(kid, "echo from the fork > /mnt/work/fork.txt").1, 0);
    assert_eq!(sh(&mut sb, "cat /mnt/work/fork.txt").0, "from the fork\n");
    // And resuming the old snapshot (its volumes granted again) does not roll the directory
    // back.
    let grants = Grants::new().mount(work.path(), "/mnt/work", false).mount(
        reference.path(),
        "/mnt/ref",
        true,
    );
    let mut old =
        KvmSandbox::from_snapshot_granted(store.clone(), &id, &grants, KvmOptions::default())
            .unwrap();
    assert_eq!(sh(&mut old, "cat /mnt/work/fork.txt").0, "from the fork\n");
}

/// Rewrites snapshot `id`'s manifest as a forger (or a build from before grants) would: its
/// mount point `guest` names the host directory `host`; re-encoded with valid checksums.
fn forge_mount(store: &LocalStore, id: &SnapshotId, guest: &str, host: &std::path::Path) {
    use dormant_core::snapshot::format;
    let path = store.snapshot_dir(id).join("manifest.dsnp");
    let bytes = std::fs::read(&path).unwrap();
    let sections = format::decode(&bytes, 1 << 26).unwrap();
    assert_eq!(&sections[0].0, b"META");
    let mut meta: serde_json::Value = serde_json::from_slice(sections[0].1).unwrap();
    let mounts = meta["spec"]["mounts"].as_array_mut().unwrap();
    let m = mounts.iter_mut().find(|m| m["guest"] == guest).unwrap();
    m["host"] = host.display().to_string().into();
    let meta = serde_json::to_vec(&meta).unwrap();
    let mut out: Vec<(format::Tag, &[u8])> = vec![(*b"META", &meta)];
    out.extend(sections[1..].iter().copied());
    std::fs::write(&path, format::encode(&out)).unwrap();
    store.manifest(id).unwrap();
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs a usable /dev/kvm, which this machine lacks")]
fn a_snapshot_never_grants_host_directories() {
    let (store, _) = booted();
    let work = tempfile::tempdir().unwrap();
    let secret = tempfile::tempdir().unwrap();
    std::fs::write(work.path().join("mine.txt"), "mine\n").unwrap();
    std::fs::write(secret.path().join("secret.txt"), "top secret\n").unwrap();
    let spec = SandboxSpec::linux()
        .image("minimal")
        .memory_limit(RAM)
        .call_timeout(Duration::from_secs(300))
        .mount(work.path(), "/mnt/work", false);
    let mut sb = KvmSandbox::create(store.clone(), spec).unwrap();
    sb.write_file("/root/own.txt", b"own\n").unwrap();
    let id = sb.standby().unwrap();
    // The spec in the manifest names the mount point, not the directory.
    let manifest = std::fs::read(store.snapshot_dir(&id).join("manifest.dsnp")).unwrap();
    let sections = dormant_core::snapshot::format::decode(&manifest, 1 << 26).unwrap();
    let meta: serde_json::Value = serde_json::from_slice(sections[0].1).unwrap();
    assert_eq!(
        meta["spec"]["mounts"],
        serde_json::json!([{"guest": "/mnt/work", "read_only": false}])
    );
    forge_mount(store, &id, "/mnt/work", secret.path());

    // No grant: an error naming the mount point.
    match KvmSandbox::from_snapshot(store.clone(), &id) {
        Err(Error::Grant {
            source: GrantError::MountMissing { guest, .. },
            ..
        }) => assert_eq!(guest, "/mnt/work"),
        other => panic!("expected a missing grant, got {other:?}"),
    }
    // Detached: the guest's mount shows an empty directory that refuses writes.
    let detach = Grants::new().detach_missing(true);
    let mut d =
        KvmSandbox::from_snapshot_granted(store.clone(), &id, &detach, KvmOptions::default())
            .unwrap();
    assert_eq!(
        sh(&mut d, "ls -A /mnt/work; cat /root/own.txt"),
        ("own\n".into(), 0)
    );
    assert_ne!(sh(&mut d, "echo x > /mnt/work/planted").1, 0);
    assert!(matches!(
        d.write_file("/mnt/work/planted", b"x"),
        Err(Error::ReadOnly { .. })
    ));
    drop(d);
    // Granted read-only: readable, never written, though the guest mounted it writable.
    let ro = Grants::new().mount(work.path(), "/mnt/work", true);
    let mut r =
        KvmSandbox::from_snapshot_granted(store.clone(), &id, &ro, KvmOptions::default()).unwrap();
    assert_eq!(sh(&mut r, "cat /mnt/work/mine.txt").0, "mine\n");
    assert_ne!(sh(&mut r, "echo x > /mnt/work/planted").1, 0);
    drop(r);
    // The handle resumes (as an auto-standby wake does) with its own grant, and its forks
    // inherit it.
    sb.resume(&id).unwrap();
    assert_eq!(
        sh(
            &mut sb,
            "cat /mnt/work/mine.txt; test -e /mnt/work/secret.txt"
        ),
        ("mine\n".into(), 1)
    );
    let mut kids = sb.fork(1).unwrap();
    assert_eq!(sh(&mut kids[0], "echo kid > /mnt/work/kid.txt").1, 0);
    assert_eq!(
        std::fs::read_to_string(work.path().join("kid.txt")).unwrap(),
        "kid\n"
    );
    assert!(!work.path().join("planted").exists());
    let left: Vec<_> = std::fs::read_dir(secret.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        left,
        ["secret.txt"],
        "the secret directory was never touched"
    );
}

/// In a child-process helper: resumes the snapshot `DORMANT_TEST_SNAPSHOT` of the store
/// `DORMANT_TEST_STORE` (set by the parent test).
fn resume_from_env() -> KvmSandbox {
    let dir = std::env::var("DORMANT_TEST_STORE").expect("started by a parent test");
    let id: SnapshotId = std::env::var("DORMANT_TEST_SNAPSHOT")
        .unwrap()
        .parse()
        .unwrap();
    let store = Arc::new(LocalStore::open(dir).unwrap());
    KvmSandbox::from_snapshot(store, &id).unwrap()
}

/// Helper process: resumes the snapshot `DORMANT_TEST_SNAPSHOT` of the store
/// `DORMANT_TEST_STORE` in this new process, runs the shell script `DORMANT_TEST_SCRIPT` in the
/// guest and prints its output between `CHILD-OUT:` and `CHILD-END`.
#[test]
#[ignore = "child-process helper of the tests that resume a snapshot in a new process"]
fn helper_resume_and_run() {
    let script = std::env::var("DORMANT_TEST_SCRIPT").unwrap();
    let mut sb = resume_from_env();
    let (out, code) = sh(&mut sb, &script);
    assert_eq!(code, 0, "{out}");
    print!("CHILD-OUT:{out}CHILD-END");
}

/// Resumes `id` of `store` in a new process, runs `script` there and returns its output.
fn in_new_process(store: &LocalStore, id: &SnapshotId, script: &str) -> String {
    child_output(
        "helper_resume_and_run",
        store,
        id,
        &[("DORMANT_TEST_SCRIPT", script)],
    )
}

/// Runs the child-process helper test `helper` on snapshot `id` of `store` (with `env` added)
/// and returns what it printed between `CHILD-OUT:` and `CHILD-END`.
fn child_output(helper: &str, store: &LocalStore, id: &SnapshotId, env: &[(&str, &str)]) -> String {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            helper,
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("DORMANT_TEST_STORE", store.root())
        .env("DORMANT_TEST_SNAPSHOT", id.to_string())
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "child failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let at = stdout.find("CHILD-OUT:").expect("the child's output") + "CHILD-OUT:".len();
    let len = stdout[at..]
        .find("CHILD-END")
        .expect("the end of the child's output");
    stdout[at..at + len].to_string()
}

/// Copies a snapshot and the snapshots it is layered on into another store (holes stay holes).
fn copy_chain(from: &LocalStore, to: &LocalStore, id: &SnapshotId) {
    let mut next = Some(id.clone());
    while let Some(id) = next {
        let dst = to.snapshot_dir(&id);
        if !dst.exists() {
            let ok = std::process::Command::new("cp")
                .args(["-r", "--sparse=always"])
                .arg(from.snapshot_dir(&id))
                .arg(&dst)
                .status()
                .unwrap();
            assert!(ok.success(), "copy {id}");
        }
        next = from.manifest(&id).unwrap().parent;
    }
}

/// Fault 1 of issue 11, on a real full filesystem: checkpoints fail for want of space at every
/// stage, the sandbox runs on, and the first checkpoint after space is freed holds everything
/// written before and after the failures (nothing the failed ones had collected is lost),
/// checked byte for byte by a resume in a new process.
fn a_full_store_loses_nothing(kind: dormant_core::testing::FsKind) {
    use dormant_core::testing::{SmallFs, Stage, sweep_full_store};
    let (shared, base) = booted();
    let tmp = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    let mut fs = SmallFs::mount(kind, 192 << 20, 4096, tmp).unwrap();
    let store = Arc::new(LocalStore::open(fs.path().join("store")).unwrap());
    copy_chain(shared, &store, base);
    let mut sb = KvmSandbox::from_snapshot(store.clone(), base).unwrap();
    // Written before the failures: in guest RAM (/tmp) and on the disk (/data).
    let write = |sb: &mut KvmSandbox, name: &str, from: u32| {
        let script = format!(
            "seq {from} {} > /tmp/{name} && seq {from} {} > /data/{name} && sync",
            from + 150_000,
            from + 150_000
        );
        assert_eq!(sh(sb, &script).1, 0);
    };
    write(&mut sb, "a", 1);
    sb.write_file("/root/marker", b"alive").unwrap();
    let stages = sweep_full_store(
        &mut fs,
        store.root(),
        &mut sb,
        |sb| sb.checkpoint(),
        |sb| {
            assert_eq!(sb.state(), dormant_core::State::Running);
            assert_eq!(sb.read_file("/root/marker").unwrap(), b"alive");
        },
    )
    .unwrap();
    let mut want = vec![Stage::Begin, Stage::Disk, Stage::Memory, Stage::Manifest];
    if kind == dormant_core::testing::FsKind::Ext4 {
        want.push(Stage::Commit);
    }
    for s in want {
        assert!(stages.contains(&s), "no failure at stage {s:?}: {stages:?}");
    }
    // Space is back: write more, checkpoint, and resume in a new process.
    write(&mut sb, "b", 400_000);
    let check = "md5sum /tmp/a /data/a /tmp/b /data/b";
    let sums = sh(&mut sb, check).0;
    let id = sb.checkpoint().unwrap();
    assert_eq!(in_new_process(&store, &id, check), sums);
    drop(sb);
}

#[test]
#[cfg_attr(
    any(no_kvm, not_root),
    ignore = "needs /dev/kvm and root (mounts a small filesystem for the store)"
)]
fn a_full_ext4_store_fails_checkpoints_cleanly_and_loses_nothing() {
    a_full_store_loses_nothing(dormant_core::testing::FsKind::Ext4);
}

#[test]
#[cfg_attr(
    any(no_kvm, not_root),
    ignore = "needs /dev/kvm and root (mounts a small filesystem for the store)"
)]
fn a_full_tmpfs_store_fails_checkpoints_cleanly_and_loses_nothing() {
    a_full_store_loses_nothing(dormant_core::testing::FsKind::Tmpfs);
}

/// Faults 1 and 2 of issue 11: the snapshot a running sandbox is layered on is deleted under
/// it. Its next checkpoint starts a new chain (a full image) instead of failing after the VM
/// was taken out of its thread (which left a "running" sandbox with no guest), and nothing
/// written before or after is lost.
#[test]
#[cfg_attr(no_kvm, ignore = "needs a usable /dev/kvm, which this machine lacks")]
fn deleting_the_parent_snapshot_under_a_running_sandbox_loses_nothing() {
    let (store, _) = booted();
    let mut sb = fresh();
    sb.write_file("/root/before", b"written before").unwrap();
    let parent = sb.checkpoint().unwrap();
    let mut sb = KvmSandbox::from_snapshot(store.clone(), &parent).unwrap();
    store.delete(&parent).unwrap();
    sb.write_file("/root/after", b"written after").unwrap();
    let id = sb.checkpoint().unwrap();
    assert_eq!(sb.state(), dormant_core::State::Running);
    assert_eq!(
        sh(&mut sb, "cat /root/before /root/after").0,
        "written beforewritten after"
    );
    assert_eq!(
        in_new_process(store, &id, "cat /root/before /root/after"),
        "written beforewritten after"
    );
}

/// Helper process of `sigkill_during_a_linux_checkpoint_leaves_only_complete_snapshots`:
/// resumes the snapshot named in the environment and checkpoints in a loop, changing a file
/// before each checkpoint and printing each committed id with the file's content.
#[test]
#[ignore = "child-process helper of sigkill_during_a_linux_checkpoint_leaves_only_complete_snapshots"]
fn helper_checkpoint_loop() {
    let mut sb = resume_from_env();
    for i in 0u64.. {
        // A page of new data in guest RAM each round.
        let data = format!("{i:08}").repeat(512);
        sb.write_file("/root/round", data.as_bytes()).unwrap();
        let id = sb.checkpoint().unwrap();
        println!("COMMITTED {id} {i}");
    }
}

/// A process killed (SIGKILL) at any point of a Linux sandbox's checkpoint leaves only complete
/// snapshots in the store: every one the child reported as committed resumes with the data it
/// had, and leftovers of the interrupted one are removed.
///
/// Rounds alternate between two kinds of kill. Even rounds kill at a fraction of one round of
/// the child's loop that differs from round to round (anywhere: writing a file, pausing the
/// guest, writing the snapshot). Odd rounds aim inside the write of a snapshot: they watch
/// the store's `tmp/` with inotify and kill at a varying step of the snapshot being written
/// (its directory created, then each of its files created or closed). A guest process keeps
/// 8 MiB of memory dirty, so that writing each snapshot takes milliseconds.
#[test]
#[cfg_attr(no_kvm, ignore = "needs a usable /dev/kvm, which this machine lacks")]
fn sigkill_during_a_linux_checkpoint_leaves_only_complete_snapshots() {
    use std::io::BufRead;
    let (shared, base) = booted();
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let store = Arc::new(LocalStore::open(dir.path()).unwrap());
    copy_chain(shared, &store, base);
    let tmp = store.root().join("tmp");
    let parse = |line: &str| -> Option<(SnapshotId, u64)> {
        let (id, i) = line.strip_prefix("COMMITTED ")?.split_once(' ')?;
        Some((id.parse().unwrap(), i.trim().parse().unwrap()))
    };
    // A guest process rewrites 8 MiB of its memory all the time, so that each checkpoint
    // writes that much (milliseconds to kill it in, instead of a fraction of one).
    let mut sb = KvmSandbox::from_snapshot(store.clone(), base).unwrap();
    sb.write_file("/root/memcheck", memcheck_binary()).unwrap();
    assert_eq!(sh(&mut sb, "chmod +x /root/memcheck").1, 0);
    sb.spawn(&Command::new([
        "/root/memcheck",
        "churn",
        "8",
        "/root/churn.ready",
    ]))
    .unwrap();
    let t = std::time::Instant::now();
    while !sb.exists("/root/churn.ready").unwrap() {
        assert!(
            t.elapsed() < Duration::from_secs(600),
            "the memory churner did not start"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut start = sb.checkpoint().unwrap();
    drop(sb);
    let mut committed: Vec<(SnapshotId, u64)> = Vec::new();
    let mut interrupted = 0;
    // Eight rounds, and more (up to 40) until at least two kills landed inside a checkpoint
    // (a kill is sent within a fraction of a millisecond of the event, but on a loaded machine
    // the child may still commit first).
    for round in 0..40u64 {
        if round >= 8 && interrupted >= 2 {
            break;
        }
        // Set up before the child starts, so that no event of its checkpoints is missed.
        let watch = (round % 2 == 1).then(|| CheckpointWatch::new(&tmp));
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "helper_checkpoint_loop",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("DORMANT_TEST_STORE", store.root())
            .env("DORMANT_TEST_SNAPSHOT", start.to_string())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        match watch {
            None => {
                // Times one round of the child's loop from two commits, then kills at a
                // fraction of a later round.
                let mut seen = Vec::new();
                for line in lines.by_ref() {
                    if let Some(c) = parse(&line.unwrap()) {
                        committed.push(c);
                        seen.push(std::time::Instant::now());
                        if seen.len() == 2 {
                            break;
                        }
                    }
                }
                assert_eq!(seen.len(), 2, "the child checkpoints in a loop");
                let fraction = (round as f64 * 0.618_034).fract();
                std::thread::sleep((seen[1] - seen[0]).mul_f64(fraction));
            }
            Some(mut watch) => {
                // The second checkpoint of this child, at step 0 to 3 of writing it.
                watch.wait_for(&mut child, 2, (round / 2 % 4) as usize);
            }
        }
        child.kill().unwrap();
        child.wait().unwrap();
        if std::fs::read_dir(&tmp).unwrap().count() > 0 {
            interrupted += 1;
        }
        // Reading the rest drains what the child printed before the kill.
        committed.extend(lines.map_while(Result::ok).filter_map(|l| parse(&l)));
        start = committed.last().map_or(start, |c| c.0.clone());
    }
    eprintln!("{interrupted} kills left a partial snapshot");
    assert!(
        interrupted >= 2,
        "kills landed inside a checkpoint in only {interrupted} of 40 rounds"
    );
    // Opening the store again removes the interrupted writers' leftovers.
    let store = Arc::new(LocalStore::open(dir.path()).unwrap());
    assert_eq!(
        std::fs::read_dir(store.root().join("tmp")).unwrap().count(),
        0,
        "no partial snapshot is left"
    );
    let listed: Vec<SnapshotId> = store.list().unwrap().into_iter().map(|s| s.id).collect();
    for (id, _) in &committed {
        assert!(listed.contains(id), "{id} was reported committed");
    }
    // Every snapshot in the store is complete: the last of each child resumes with its data.
    for (id, i) in committed.iter().rev().step_by(3) {
        let mut sb = KvmSandbox::from_snapshot(store.clone(), id).unwrap();
        assert_eq!(
            sb.read_file("/root/round").unwrap(),
            format!("{i:08}").repeat(512).as_bytes(),
            "{id}"
        );
    }
}

/// Follows, with inotify, the snapshots a child process writes into a store's `tmp/`.
struct CheckpointWatch {
    fd: std::os::fd::OwnedFd,
    tmp_wd: i32,
    tmp: std::path::PathBuf,
}

impl CheckpointWatch {
    fn new(tmp: &std::path::Path) -> Self {
        use rustix::fs::inotify;
        let fd =
            inotify::init(inotify::CreateFlags::CLOEXEC | inotify::CreateFlags::NONBLOCK).unwrap();
        let tmp_wd = inotify::add_watch(&fd, tmp, inotify::WatchFlags::CREATE).unwrap();
        CheckpointWatch {
            fd,
            tmp_wd,
            tmp: tmp.to_path_buf(),
        }
    }

    /// Returns at step `step` of writing the `nth` snapshot (1-based) that appears in `tmp/`:
    /// step 0 is its directory being created, each later step a file in it created or closed
    /// after writing. Returns early if the snapshot is committed (its directory moved) first.
    /// Panics if the child exits or nothing happens for ten minutes.
    fn wait_for(&mut self, child: &mut std::process::Child, nth: usize, step: usize) {
        use rustix::fs::inotify::{self, ReadFlags, WatchFlags};
        let deadline = std::time::Instant::now() + Duration::from_secs(600);
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 4096];
        let mut reader = inotify::Reader::new(&self.fd, &mut buf);
        let (mut dirs, mut steps, mut inner) = (0, 0, None);
        loop {
            let ev = match reader.next() {
                Ok(ev) => ev,
                Err(rustix::io::Errno::AGAIN) => {
                    assert!(
                        child.try_wait().unwrap().is_none(),
                        "the checkpointing child exited"
                    );
                    assert!(
                        std::time::Instant::now() < deadline,
                        "no checkpoint in ten minutes"
                    );
                    std::thread::sleep(Duration::from_micros(200));
                    continue;
                }
                Err(e) => panic!("inotify: {e}"),
            };
            if ev.wd() == self.tmp_wd {
                if !ev.events().contains(ReadFlags::ISDIR) {
                    continue;
                }
                dirs += 1;
                if dirs < nth {
                    continue;
                }
                if step == 0 {
                    return;
                }
                let name = ev.file_name().unwrap().to_str().unwrap().to_owned();
                let path = self.tmp.join(name);
                match inotify::add_watch(
                    &self.fd,
                    &path,
                    WatchFlags::CREATE | WatchFlags::CLOSE_WRITE | WatchFlags::MOVE_SELF,
                ) {
                    Ok(wd) => inner = Some(wd),
                    // Already committed and moved away.
                    Err(rustix::io::Errno::NOENT) => return,
                    Err(e) => panic!("watch {}: {e}", path.display()),
                }
            } else if Some(ev.wd()) == inner {
                if ev
                    .events()
                    .intersects(ReadFlags::MOVE_SELF | ReadFlags::IGNORED)
                {
                    return;
                }
                steps += 1;
                if steps >= step {
                    return;
                }
            }
        }
    }
}

/// The guest-side checker (`tests/guest/memcheck.c`), compiled statically with the host's C
/// compiler once per test run.
fn memcheck_binary() -> &'static [u8] {
    static BIN: OnceLock<Vec<u8>> = OnceLock::new();
    BIN.get_or_init(|| {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guest/memcheck.c");
        let out = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("memcheck-{}", std::process::id()));
        let st = std::process::Command::new("cc")
            .args(["-O2", "-static", "-mgeneral-regs-only", "-o"])
            .arg(&out)
            .arg(&src)
            .status()
            .expect("a C compiler (cc) builds the guest-side checker");
        assert!(st.success(), "compile {}", src.display());
        std::fs::read(&out).unwrap()
    })
}

/// Pseudo-random data checked from inside the guest: 64 MiB in a process's memory, 2 MiB in
/// a file in the page cache.
const HELD_MIB: u32 = 64;
const CACHED_MIB: u32 = 2;

/// Starts the holder of `HELD_MIB` of data in `sb` and writes the page-cache file.
fn hold_data(sb: &mut KvmSandbox) {
    sb.write_file("/root/memcheck", memcheck_binary()).unwrap();
    assert_eq!(
        sh(
            sb,
            &format!("chmod +x /root/memcheck && mkdir -p /root/mc && /root/memcheck fill /root/pc 99 {CACHED_MIB}")
        )
        .1,
        0
    );
    sb.spawn(&Command::new([
        "/root/memcheck".to_string(),
        "hold".into(),
        "1234".into(),
        HELD_MIB.to_string(),
        "/root/mc".into(),
    ]))
    .unwrap();
    let t = std::time::Instant::now();
    while !sb.exists("/root/mc/pid").unwrap() {
        assert!(
            t.elapsed() < Duration::from_secs(300),
            "the holder did not start"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Asks the holder to check its memory, checks the page-cache file, and adds a first
/// command's output to compare from outside.
const CHECK_DATA: &str = "n=$(($(cat /root/mc/n 2>/dev/null || echo 0) + 1)); echo $n > /root/mc/n; \
    kill -USR1 $(cat /root/mc/pid) && while [ ! -e /root/mc/result.$n ]; do sleep 0.1; done; \
    cat /root/mc/result.$n; /root/memcheck check /root/pc 99 2; seq 1 20000 | md5sum";

/// What `CHECK_DATA` prints when every byte is right.
fn data_ok() -> String {
    let seq: String = (1..=20000).map(|i| format!("{i}\n")).collect();
    let mut md5 = std::process::Command::new("md5sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    md5.stdin.take().unwrap().write_all(seq.as_bytes()).unwrap();
    let sum = String::from_utf8(md5.wait_with_output().unwrap().stdout).unwrap();
    format!("OK {HELD_MIB}\nOK {CACHED_MIB}\n{sum}")
}

/// Issue 11, "a resume gives back exactly what was saved": in a new sandbox (`create` resumes
/// the base snapshot every sandbox starts from), a guest process holding 64 MiB of
/// pseudo-random data and a file in the page cache, checkpointed and resumed ten times — in new
/// processes, as forks, and at every link of a chain of incremental checkpoints — with every
/// byte checked inside the guest and the first command's output compared from outside.
#[test]
#[cfg_attr(no_kvm, ignore = "needs a usable /dev/kvm, which this machine lacks")]
fn every_resume_gives_back_exactly_what_was_saved() {
    let (store, _) = booted();
    let want = data_ok();
    let spec = SandboxSpec::linux()
        .image("minimal")
        .memory_limit(RAM)
        .call_timeout(Duration::from_secs(300));
    let mut sb = KvmSandbox::create(store.clone(), spec).unwrap();
    hold_data(&mut sb);
    assert_eq!(sh(&mut sb, CHECK_DATA).0, want, "before any checkpoint");
    let base = sb.checkpoint().unwrap();
    // 1-3: in new processes.
    for _ in 0..3 {
        assert_eq!(in_new_process(store, &base, CHECK_DATA), want);
    }
    // 4-6: as forks.
    for kid in &mut sb.fork(3).unwrap() {
        assert_eq!(sh(kid, CHECK_DATA).0, want, "a fork");
    }
    drop(sb);
    // 7-9: each link of a chain of incremental checkpoints, resumed in this process; 10: its
    // end, in a new process.
    let mut link = KvmSandbox::from_snapshot(store.clone(), &base).unwrap();
    let mut last = base.clone();
    for i in 0..3 {
        link.write_file("/root/link", format!("{i}").as_bytes())
            .unwrap();
        last = link.checkpoint().unwrap();
        link = KvmSandbox::from_snapshot(store.clone(), &last).unwrap();
        assert_eq!(
            link.read_file("/root/link").unwrap(),
            format!("{i}").as_bytes()
        );
        assert_eq!(sh(&mut link, CHECK_DATA).0, want, "link {i}");
    }
    drop(link);
    assert_eq!(
        in_new_process(store, &last, CHECK_DATA),
        want,
        "the chain's end"
    );
}

/// Fault 12 of issue 11: in new sandboxes, the first and second runs of a command with half a
/// megabyte of output give exactly its output, and neither `dmesg` nor a background process
/// crashes; the same after a checkpoint and a resume. (On PVM hosts guest vector registers were
/// seen zeroed in the middle of glibc's copies: runs of NULs in the output, segfaults.)
#[test]
#[cfg_attr(no_kvm, ignore = "needs a usable /dev/kvm, which this machine lacks")]
fn new_sandboxes_give_exact_output_and_their_processes_do_not_crash() {
    let (store, _) = booted();
    let expected: String = (1..=100_000).map(|i| format!("{i}\n")).collect();
    let check = |sb: &mut KvmSandbox, what: &str| {
        for run in ["first", "second"] {
            let out = sb.exec(&Command::new(["seq", "1", "100000"])).unwrap();
            assert_eq!(out.exit_code, 0, "{what}, {run} run");
            if out.stdout != expected.as_bytes() {
                let at = out
                    .stdout
                    .iter()
                    .zip(expected.as_bytes())
                    .position(|(a, b)| a != b);
                panic!(
                    "{what}, {run} run: {} bytes, first difference at {at:?}",
                    out.stdout.len()
                );
            }
        }
        assert_eq!(
            sh(sb, "set -o pipefail; dmesg | tail -1 > /dev/null").1,
            0,
            "{what}: dmesg"
        );
        let pid = sb.spawn(&Command::new(["seq", "1", "300000"])).unwrap();
        assert_eq!(
            sb.wait(pid, Some(Duration::from_secs(600))).unwrap(),
            Some(0),
            "{what}: a background seq"
        );
    };
    let spec = SandboxSpec::linux()
        .image("minimal")
        .memory_limit(RAM)
        .call_timeout(Duration::from_secs(300));
    let mut last = None;
    for i in 0..3 {
        let mut sb = KvmSandbox::create(store.clone(), spec.clone()).unwrap();
        check(&mut sb, &format!("new sandbox {i}"));
        last = Some(sb);
    }
    let mut sb = last.unwrap();
    let id = sb.checkpoint().unwrap();
    let mut resumed = KvmSandbox::from_snapshot(store.clone(), &id).unwrap();
    check(&mut resumed, "after a checkpoint and a resume");
}

/// Fault 10 of issue 11 on the KVM tier: the snapshot files a running Linux sandbox's RAM and
/// disk are mapped from, truncated behind its back. The guest can no longer be given its pages
/// (a device thread touching one gets SIGBUS, the vCPU an error from KVM): that sandbox fails
/// with a typed error and is no longer running, while the process and another sandbox go on.
#[test]
#[cfg_attr(no_kvm, ignore = "needs a usable /dev/kvm, which this machine lacks")]
fn snapshot_files_truncated_under_a_running_sandbox_fail_only_it() {
    let (shared, base) = booted();
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let store = Arc::new(LocalStore::open(dir.path()).unwrap());
    copy_chain(shared, &store, base);
    let mut victim = KvmSandbox::from_snapshot(store.clone(), base).unwrap();
    let mut other = fresh();
    assert_eq!(sh(&mut victim, "echo before").0, "before\n");
    for m in store.chain(base).unwrap() {
        for f in std::fs::read_dir(store.snapshot_dir(&m.id))
            .unwrap()
            .flatten()
        {
            let name = f.file_name().to_string_lossy().into_owned();
            if name.starts_with("memory.") || name.starts_with("disk.") {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(f.path())
                    .unwrap()
                    .set_len(0)
                    .unwrap();
            }
        }
    }
    // Commands that need pages the files no longer hold: the first that fails ends it.
    let mut failed = None;
    for _ in 0..5 {
        match victim.exec(&Command::new([
            "sh",
            "-c",
            "cat /bin/busybox | md5sum; ls -R / > /dev/null",
        ])) {
            Ok(_) => {}
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    let e = failed.expect("a sandbox whose memory is gone fails");
    assert!(
        matches!(
            e,
            Error::Trap { .. }
                | Error::Poisoned { .. }
                | Error::Runtime { .. }
                | Error::Deadline { .. }
        ),
        "a typed failure of that sandbox: {e:?}"
    );
    assert_ne!(victim.state(), dormant_core::State::Running, "{e}");
    // The process and the other sandbox are fine.
    assert_eq!(sh(&mut other, "echo still here").0, "still here\n");
}

/// A plain HTTP/1.0 GET of `path` from `addr`: the response's body (after the headers), or
/// the whole response when it has no header end (a connection closed at once gives nothing).
fn http_get(addr: std::net::SocketAddr, path: &str) -> Vec<u8> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: guest\r\n\r\n").unwrap();
    let mut out = Vec::new();
    if let Err(e) = s.read_to_end(&mut out) {
        // A reset after the answer (the server closing with unread bytes) is fine; a hang is
        // not.
        assert_ne!(e.kind(), std::io::ErrorKind::WouldBlock, "{e}");
        assert_ne!(e.kind(), std::io::ErrorKind::TimedOut, "{e}");
    }
    match out.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(i) => out[i + 4..].to_vec(),
        None => out,
    }
}

/// Starts busybox `httpd` on the guest's `127.0.0.1:port` serving `/var/www` and waits until
/// it accepts connections.
fn start_httpd(sb: &mut KvmSandbox, port: u16) {
    let listen = format!("127.0.0.1:{port}");
    sb.spawn(&Command::new([
        "httpd", "-f", "-p", &listen, "-h", "/var/www",
    ]))
    .unwrap();
    let t = std::time::Instant::now();
    while !sb.listening(port).unwrap() {
        assert!(
            t.elapsed() < Duration::from_secs(300),
            "httpd did not start"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The host port guest port `guest` is exposed on.
fn host_port_of(ports: &[dormant_core::PortMapping], guest: u16) -> u16 {
    ports
        .iter()
        .find(|m| m.guest_port == guest)
        .unwrap_or_else(|| panic!("guest port {guest} is not exposed: {ports:?}"))
        .host_port
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs a usable /dev/kvm, which this machine lacks")]
fn a_sandbox_booted_directly_serves_its_exposed_ports() {
    // `KvmSandbox::boot` (no base snapshot, no resume): its ports reached no machine, so the
    // host's connections were accepted and reset.
    use dormant_core::Ports;
    let (store, _) = booted();
    let image = dormant_kvm::GuestImage::locate().unwrap();
    let spec = SandboxSpec::linux()
        .image("minimal")
        .memory_limit(RAM)
        .call_timeout(Duration::from_secs(300));
    let mut sb = KvmSandbox::boot(store.clone(), &image, spec, KvmOptions::default()).unwrap();
    sb.write_file("/var/www/index.html", b"from a booted guest\n")
        .unwrap();
    start_httpd(&mut sb, 8080);
    let addr = sb.expose(8080, 0).unwrap();
    assert_eq!(http_get(addr, "/index.html"), b"from a booted guest\n");
    sb.kill().unwrap();
}

/// Helper process: resumes the snapshot of `DORMANT_TEST_SNAPSHOT` in this new process and
/// prints what guest port 8080, exposed again from the snapshot, serves at `/index.html`.
#[test]
#[ignore = "child-process helper of exposed_ports_reach_a_guest_server_across_standby_forks_and_a_new_process"]
fn helper_resume_and_fetch_exposed() {
    use dormant_core::Ports;
    let sb = resume_from_env();
    let port = host_port_of(&sb.exposed(), 8080);
    let page = http_get(
        std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        "/index.html",
    );
    print!("CHILD-OUT:{}CHILD-END", String::from_utf8_lossy(&page));
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs a usable /dev/kvm, which this machine lacks")]
fn exposed_ports_reach_a_guest_server_across_standby_forks_and_a_new_process() {
    use dormant_core::Ports;
    use std::io::{Read, Write};
    let (store, _) = booted();
    let mut sb = fresh();
    sb.write_file("/var/www/index.html", b"served through expose\n")
        .unwrap();
    sh(&mut sb, "head -c 3000000 /dev/urandom > /var/www/big.bin");
    let big = sb.read_file("/var/www/big.bin").unwrap();
    start_httpd(&mut sb, 8080);

    // The host reaches the guest's loopback server, small and large answers alike.
    let addr = sb.expose(8080, 0).unwrap();
    assert!(addr.ip().is_loopback() && addr.port() != 0);
    assert_eq!(http_get(addr, "/index.html"), b"served through expose\n");
    assert!(
        http_get(addr, "/big.bin") == big,
        "the large file came through intact"
    );
    // Exposing it again gives the same address; port 0 and a second host port are refused.
    assert_eq!(sb.expose(8080, 0).unwrap(), addr);
    assert!(matches!(sb.expose(0, 0), Err(Error::InvalidArgument(_))));
    let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = other.local_addr().unwrap().port();
    assert!(matches!(
        sb.expose(8080, busy),
        Err(Error::InvalidArgument(_))
    ));
    // A host port in use: the OS error.
    assert!(matches!(sb.expose(8081, busy), Err(Error::Runtime { .. })));
    // A guest port nobody listens on: connections close at once.
    let closed = sb.expose(9, 0).unwrap();
    assert!(http_get(closed, "/").is_empty());
    assert_eq!(sb.exposed().len(), 2);
    sb.unexpose(9).unwrap();
    assert_eq!(
        sb.exposed(),
        [dormant_core::PortMapping {
            guest_port: 8080,
            host_port: addr.port()
        }]
    );
    assert!(std::net::TcpStream::connect(closed).is_err());

    // A connection open at standby ends (end of file or a reset), it does not hang; the
    // listener closes with the machine (no wake hooks here).
    let mut open = std::net::TcpStream::connect(addr).unwrap();
    open.write_all(b"GET /index.html HTTP/1.0\r\n").unwrap();
    let t = std::time::Instant::now();
    while sb.open_connections() == 0 {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "the connection was not forwarded"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let id = sb.standby().unwrap();
    open.set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    match open.read(&mut [0u8; 64]) {
        Ok(n) => assert_eq!(n, 0, "nothing was answered"),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }
    assert!(std::net::TcpStream::connect(addr).is_err());
    assert_eq!(
        sb.exposed()[0].guest_port,
        8080,
        "standby keeps the description"
    );

    // In a new process the snapshot exposes its port again, and it answers.
    let page = child_output("helper_resume_and_fetch_exposed", store, &id, &[]);
    assert_eq!(page, "served through expose\n");

    // Resumed here while something else holds its host port: a new one, reported.
    let blocker = std::net::TcpListener::bind(addr).ok();
    sb.resume(&id).unwrap();
    let port = host_port_of(&sb.exposed(), 8080);
    if blocker.is_some() {
        assert_ne!(port, addr.port());
    }
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    assert_eq!(http_get(addr, "/index.html"), b"served through expose\n");

    // A fork's children expose nothing; the parent's port goes on answering.
    let mut kids = sb.fork(1).unwrap();
    assert!(kids[0].exposed().is_empty());
    assert_eq!(http_get(addr, "/index.html"), b"served through expose\n");
    kids[0].kill().unwrap();
    sb.kill().unwrap();
    assert!(std::net::TcpStream::connect(addr).is_err());
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs a usable /dev/kvm, which this machine lacks")]
fn a_managed_sandbox_asleep_is_woken_by_a_connection_to_an_exposed_port() {
    use std::io::Write;
    let mut sb = fresh();
    sb.write_file("/var/www/index.html", b"woken to serve\n")
        .unwrap();
    start_httpd(&mut sb, 8080);
    let m = Managed::new(sb, Some(Duration::from_secs(2)));
    let addr = m.expose(8080, 0).unwrap();
    assert_eq!(http_get(addr, "/index.html"), b"woken to serve\n");

    // An open forwarded connection keeps it awake past its idle time.
    let mut open = std::net::TcpStream::connect(addr).unwrap();
    open.write_all(b"GET /index.html HTTP/1.0\r\n").unwrap();
    std::thread::sleep(Duration::from_secs(8));
    assert_eq!(m.state(), dormant_core::State::Running);
    drop(open);

    // Idle, it sleeps by itself; the listener stays open, and a request wakes it.
    let t = std::time::Instant::now();
    while m.state() != dormant_core::State::Standby {
        assert!(t.elapsed() < Duration::from_secs(300), "no auto-standby");
        std::thread::sleep(Duration::from_millis(100));
    }
    let before = m.stats();
    assert!(before.auto_standbys >= 1);
    assert_eq!(http_get(addr, "/index.html"), b"woken to serve\n");
    assert_eq!(m.stats().wakes, before.wakes + 1);
    assert_eq!(m.exposed().unwrap()[0].host_port, addr.port());
    m.kill().unwrap();
    assert!(std::net::TcpStream::connect(addr).is_err());
}

/// The egress policy is part of the sandbox's description: set while running (through
/// `Managed` too, which wakes a sleeping sandbox for it), kept by checkpoints, forks and
/// resumes; refused on a sandbox in standby.
#[test]
#[cfg_attr(no_kvm, ignore = "needs a usable /dev/kvm, which this machine lacks")]
fn the_network_policy_is_set_while_running_and_kept_by_checkpoints() {
    use dormant_core::{Egress, NetworkPolicy};
    let (store, _) = booted();
    let host = NetworkPolicy::parse(["host", "pypi.org"], ["10.0.0.0/8"]).unwrap();
    let mut sb = fresh();
    assert_eq!(sb.network(), &NetworkPolicy::off());
    sb.egress().unwrap().set_network(host.clone()).unwrap();
    assert_eq!(sb.network(), &host);
    assert_eq!(sb.spec().network, host);

    // Checkpoints record it; a resume and the children of a fork start under it.
    let snap = sb.checkpoint().unwrap();
    let again = KvmSandbox::from_snapshot(store.clone(), &snap).unwrap();
    assert_eq!(again.network(), &host);
    drop(again);
    let kids = sb.fork(1).unwrap();
    assert_eq!(kids[0].network(), &host);
    drop(kids);

    // Not in standby (the sandbox's snapshot is already written); a policy too long is refused.
    let slept = sb.standby().unwrap();
    match sb.set_network(NetworkPolicy::open()) {
        Err(Error::IllegalTransition { op, .. }) => {
            assert_eq!(op.to_string(), "change the network policy of")
        }
        other => panic!("expected IllegalTransition, got {other:?}"),
    }
    sb.resume(&slept).unwrap();
    assert_eq!(sb.network(), &host);
    let m = Managed::new(sb, None);
    let mut long = NetworkPolicy::off();
    long.allow = vec![dormant_core::Rule::Any; dormant_core::network::MAX_POLICY_RULES + 1];
    assert!(matches!(
        m.set_network(long),
        Err(Error::InvalidArgument(_))
    ));
    assert_eq!(m.network().unwrap(), host);

    // Through Managed: a sleeping sandbox is woken, and the policy reads back.
    m.standby().unwrap();
    m.set_network(NetworkPolicy::open()).unwrap();
    assert_eq!(m.state(), dormant_core::State::Running);
    assert_eq!(m.network().unwrap(), NetworkPolicy::open());
    let snap = m.standby().unwrap();
    assert_eq!(
        KvmSandbox::from_snapshot(store.clone(), &snap)
            .unwrap()
            .network(),
        &NetworkPolicy::open()
    );
}
