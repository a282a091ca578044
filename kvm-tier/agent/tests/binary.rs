#![allow(clippy::unwrap_used)]
//! The real `dormant-agent` binary, listening on a Unix socket.
//! (A separate test binary: the in-process tests' reaper would reap this process's children.)

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use dormant_agent::client::Client;

struct Agent {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Agent {
    fn start() -> Agent {
        Agent::start_with(&[])
    }

    /// The agent with these environment variables (on top of a bare environment).
    fn start_with(env: &[(&str, &str)]) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        // A bare environment: the agent supplies PATH and HOME.
        let mut child = Command::new(env!("CARGO_BIN_EXE_dormant-agent"))
            .arg("--unix")
            .arg(&socket)
            .env_clear()
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        stderr.read_line(&mut line).unwrap();
        assert_eq!(
            line.trim_end(),
            format!("dormant-agent ready on unix socket {}", socket.display())
        );
        // Keep draining the agent's stderr so it never blocks on it.
        std::thread::spawn(move || {
            let mut sink = String::new();
            while stderr.read_line(&mut sink).is_ok_and(|n| n > 0) {
                sink.clear();
            }
        });
        Agent {
            child,
            socket,
            _dir: dir,
        }
    }

    fn connect(&self) -> Client<UnixStream> {
        let s = UnixStream::connect(&self.socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        Client::new(s)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn binary_serves_a_unix_socket() {
    let agent = Agent::start();
    let mut c = agent.connect();
    let info = c.hello().unwrap();
    assert_eq!(info.version, 1);
    assert_eq!(info.pid, agent.child.id());

    let out = c
        .exec_collect(
            &["sh", "-c", "echo $PATH $HOME $LANG"],
            &[],
            None,
            b"",
            None,
        )
        .unwrap();
    // A login environment where none was given.
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin /root C.UTF-8\n"
    );
    let out = c
        .exec_collect(&["echo", "hello"], &[], None, b"", None)
        .unwrap();
    assert_eq!(out.stdout, b"hello\n");
    assert_eq!(out.status.code, Some(0));

    // A background process outlives the connection; a new connection finds it.
    let pid = c
        .spawn(&["sh", "-c", "echo started; exec sleep 30"], &[], None)
        .unwrap();
    drop(c);
    let mut c = agent.connect();
    let list = c.processes().unwrap();
    assert!(list.iter().any(|p| p.pid == pid && p.running), "{list:?}");
    let mut stdout = Vec::new();
    for _ in 0..500 {
        stdout.extend(c.output(pid).unwrap().stdout);
        if !stdout.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(stdout, b"started\n");
    c.signal(pid, 9).unwrap();
    let status = c.wait(pid, Some(Duration::from_secs(10))).unwrap().unwrap();
    assert_eq!(status.signal, Some(9));

    // Orphans do not confuse it: a grandchild that outlives its parent.
    let out = c
        .exec_collect(
            &["sh", "-c", "(sleep 0.2 &); echo parent"],
            &[],
            None,
            b"",
            None,
        )
        .unwrap();
    assert_eq!(out.stdout, b"parent\n");

    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("x/y.txt");
    let f = f.to_str().unwrap();
    c.write_file(f, b"data", None, false).unwrap();
    assert_eq!(c.read_file(f).unwrap(), b"data");
    assert!(Path::new(f).exists());
    c.sync().unwrap();

    // Garbage on one connection does not take the agent down.
    {
        use std::io::Write;
        let mut raw = UnixStream::connect(&agent.socket).unwrap();
        raw.write_all(&[0xff; 64]).unwrap();
    }
    let mut c2 = agent.connect();
    assert!(c2.hello().is_ok());
    assert!(c.hello().is_ok());
}

#[test]
fn binary_rejects_bad_arguments() {
    let status = Command::new(env!("CARGO_BIN_EXE_dormant-agent"))
        .args(["--bogus"])
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(2));
    let out = Command::new(env!("CARGO_BIN_EXE_dormant-agent"))
        .arg("--version")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        format!("dormant-agent {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn run_code_without_python_is_not_found_and_names_it() {
    for python in ["/nonexistent/python3", "dormant-no-such-python"] {
        let agent = Agent::start_with(&[("DORMANT_AGENT_PYTHON", python)]);
        let mut c = agent.connect();
        let err = c.run_code("1 + 1", None, None).unwrap_err();
        assert!(err.is_not_found(), "{err:?}");
        assert!(err.to_string().contains(python), "{err}");
        // The connection and the agent go on.
        assert!(c.hello().is_ok());
    }
}
