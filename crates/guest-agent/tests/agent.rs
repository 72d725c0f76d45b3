//! The agent binary on a host Unix socket, driven through `Client::direct` (and `Client::new`
//! through a stand-in for the VMM's vsock socket), plus raw frames for hostile input.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use stratus_guest_agent::{
    read_frame, write_frame, AgentError, Client, ExecRequest, FrameError, Identity, Kind, Response,
    MAX_PAYLOAD,
};

const TIMEOUT: Duration = Duration::from_secs(10);

/// A running agent in its own temporary directory; killed when dropped.
struct Agent {
    process: Child,
    dir: PathBuf,
    socket: PathBuf,
}

impl Agent {
    fn start() -> Agent {
        Agent::start_with(&[])
    }

    fn start_with(args: &[&str]) -> Agent {
        Agent::start_full(args, None)
    }

    /// An agent running inside network namespace `netns` (its socket is still a file here).
    fn start_in(netns: Option<&str>) -> Agent {
        Agent::start_full(&[], netns)
    }

    fn start_full(args: &[&str], netns: Option<&str>) -> Agent {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "stratus-agent-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let dir = dir.canonicalize().unwrap();
        let socket = dir.join("agent.sock");
        let log = std::fs::File::create(dir.join("agent.log")).unwrap();
        let mut command = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_stratus-guest-agent")]);
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_stratus-guest-agent")),
        };
        let process = command
            .arg("--listen")
            .arg(format!("unix:{}", socket.display()))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let agent = Agent { process, dir, socket };
        agent.client().wait_ready(Instant::now() + TIMEOUT).expect("agent ready");
        agent
    }

    fn client(&self) -> Client {
        Client::direct(&self.socket, TIMEOUT)
    }

    fn connect(&self) -> UnixStream {
        let stream = UnixStream::connect(&self.socket).unwrap();
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        stream
    }

    /// Checks that the agent process is alive and still answers.
    fn assert_serving(&self) {
        let info = self.client().info().expect("agent still answers");
        assert_eq!(info.agent_version, env!("CARGO_PKG_VERSION"));
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct Output {
    code: i32,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

fn exec(client: &Client, argv: &[&str], stdin: Box<dyn Read + Send>) -> Result<Output, AgentError> {
    let request = ExecRequest { argv: argv.iter().map(|s| s.to_string()).collect(), ..Default::default() };
    exec_request(client, &request, stdin)
}

fn exec_request(
    client: &Client,
    request: &ExecRequest,
    stdin: Box<dyn Read + Send>,
) -> Result<Output, AgentError> {
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let code = client.exec(request, stdin, &mut stdout, &mut stderr)?;
    Ok(Output { code, stdout, stderr })
}

fn no_stdin() -> Box<dyn Read + Send> {
    Box::new(io::empty())
}

/// Deterministic incompressible bytes (xorshift).
fn noise(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn request_frame(stream: &mut UnixStream, json: &str) {
    write_frame(stream, Kind::Request, json.as_bytes()).unwrap();
}

fn response(stream: &mut UnixStream) -> Response {
    let frame = read_frame(stream).unwrap();
    assert_eq!(frame.kind, Kind::Response);
    serde_json::from_slice(&frame.payload).unwrap()
}

#[test]
fn info_answers() {
    let agent = Agent::start();
    let info = agent.client().info().unwrap();
    assert_eq!(info.agent_version, env!("CARGO_PKG_VERSION"));
    assert!(!info.hostname.is_empty());
    assert!(!info.kernel.is_empty());
    assert!(info.uptime_secs > 0.0);
    assert!(info.addresses.iter().all(|a| a.contains('/') && !a.starts_with("127.")), "{:?}", info.addresses);
}

#[test]
fn exec_relays_output_and_exit_code() {
    let agent = Agent::start();
    let out = exec(&agent.client(), &["sh", "-c", "echo out; echo err >&2; exit 3"], no_stdin()).unwrap();
    assert_eq!(out.code, 3);
    assert_eq!(out.stdout, b"out\n");
    assert_eq!(out.stderr, b"err\n");
}

#[test]
fn exec_echoes_a_mebibyte_of_stdin() {
    let agent = Agent::start();
    let data = noise(1 << 20);
    let out = exec(&agent.client(), &["cat"], Box::new(io::Cursor::new(data.clone()))).unwrap();
    assert_eq!(out.code, 0);
    assert!(out.stdout == data, "cat returned {} bytes, not the 1 MiB sent", out.stdout.len());
    assert!(out.stderr.is_empty());
}

#[test]
fn exec_of_a_missing_program_names_it() {
    let agent = Agent::start();
    let err = exec(&agent.client(), &["stratus-no-such-program"], no_stdin()).err().unwrap();
    match err {
        AgentError::Guest(message) => {
            assert_eq!(message, "cannot run 'stratus-no-such-program': No such file or directory")
        }
        other => panic!("expected a guest error, got {other:?}"),
    }
    let err = exec(&agent.client(), &[], no_stdin()).err().unwrap();
    assert!(matches!(err, AgentError::Guest(ref m) if m.contains("argv is empty")), "{err:?}");
    agent.assert_serving();
}

#[test]
fn killed_by_a_signal_exits_128_plus_n() {
    let agent = Agent::start();
    let out = exec(&agent.client(), &["sh", "-c", "kill -9 $$"], no_stdin()).unwrap();
    assert_eq!(out.code, 128 + 9);
}

#[test]
fn a_program_past_its_timeout_is_killed_with_what_it_started() {
    let agent = Agent::start();
    let request = ExecRequest {
        argv: vec!["sh".into(), "-c".into(), "sleep 300 & echo $!; sleep 300; echo not killed".into()],
        timeout_ms: Some(500),
        ..Default::default()
    };
    let out = exec_request(&agent.client(), &request, no_stdin()).unwrap();
    assert_eq!(out.code, 128 + 9, "the shell is killed");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let background: u32 = stdout.trim().parse().unwrap_or_else(|_| panic!("stdout: {stdout:?}"));
    // Killed and reaped by init (or the test harness as subreaper) shortly after.
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::read_to_string(format!("/proc/{background}/stat"))
        .is_ok_and(|stat| !stat.contains(") Z ") && stat.contains("sleep"))
    {
        assert!(Instant::now() < deadline, "background pid {background} survived the timeout");
        std::thread::sleep(Duration::from_millis(50));
    }
    // A program that finishes in time is not touched.
    let request = ExecRequest { argv: vec!["true".into()], timeout_ms: Some(60_000), ..Default::default() };
    assert_eq!(exec_request(&agent.client(), &request, no_stdin()).unwrap().code, 0);
    agent.assert_serving();
}

#[test]
fn exec_sets_env_and_cwd() {
    let agent = Agent::start();
    let request = ExecRequest {
        argv: vec!["sh".into(), "-c".into(), "printf '%s %s\\n' \"$STRATUS_TEST\" \"$(pwd)\"".into()],
        env: vec![("STRATUS_TEST".into(), "a b".into())],
        cwd: Some(agent.dir.display().to_string()),
        ..Default::default()
    };
    let out = exec_request(&agent.client(), &request, no_stdin()).unwrap();
    assert_eq!(String::from_utf8(out.stdout).unwrap(), format!("a b {}\n", agent.dir.display()));
    let request =
        ExecRequest { argv: vec!["true".into()], cwd: Some("/nonexistent/dir".into()), ..Default::default() };
    let err = exec_request(&agent.client(), &request, no_stdin()).err().unwrap();
    assert!(
        matches!(err, AgentError::Guest(ref m) if m == "cannot change to '/nonexistent/dir': No such file or directory"),
        "{err:?}"
    );
}

#[test]
fn a_program_that_ignores_endless_stdin_still_finishes() {
    let agent = Agent::start();
    let start = Instant::now();
    let out = exec(&agent.client(), &["true"], Box::new(io::repeat(b'y'))).unwrap();
    assert_eq!(out.code, 0);
    let out = exec(&agent.client(), &["head", "-c", "5"], Box::new(io::repeat(b'y'))).unwrap();
    assert_eq!((out.code, out.stdout.as_slice()), (0, &b"yyyyy"[..]));
    assert!(start.elapsed() < Duration::from_secs(5));
    agent.assert_serving();
}

#[test]
fn output_held_open_by_a_background_process_is_cut_after_a_grace() {
    let agent = Agent::start();
    let start = Instant::now();
    let out = exec(&agent.client(), &["sh", "-c", "sleep 8 & echo started"], no_stdin()).unwrap();
    assert_eq!((out.code, out.stdout.as_slice()), (0, &b"started\n"[..]));
    assert!(start.elapsed() < Duration::from_secs(6), "took {:?}", start.elapsed());
}

#[test]
fn concurrent_execs() {
    let agent = Agent::start();
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let client = agent.client();
            std::thread::spawn(move || {
                let arg = format!("job-{i}");
                let out = exec(&client, &["sh", "-c", "echo $0; exit $1", &arg, &i.to_string()], no_stdin())
                    .unwrap();
                assert_eq!(out.code, i);
                assert_eq!(out.stdout, format!("job-{i}\n").into_bytes());
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

/// Sends `bytes` as the whole conversation; the agent must answer with an error response or
/// close the connection, and keep serving others.
fn assert_rejected(agent: &Agent, bytes: &[u8], expected: &str) {
    let mut stream = agent.connect();
    // The agent may answer and close before it has read everything: ignore write errors.
    let _ = stream.write_all(bytes);
    match read_frame(&mut stream) {
        Ok(frame) => {
            assert_eq!(frame.kind, Kind::Response);
            match serde_json::from_slice(&frame.payload).unwrap() {
                Response::Error(message) => {
                    assert!(message.contains(expected), "{message:?} lacks {expected:?}")
                }
                ok => panic!("garbage {:?}... was accepted: {ok:?}", &bytes[..bytes.len().min(16)]),
            }
        }
        Err(FrameError::Closed) => {}
        Err(e) => panic!("reading the agent's answer: {e}"),
    }
    agent.assert_serving();
}

#[test]
fn garbage_gets_an_error_and_the_agent_survives() {
    let agent = Agent::start();
    assert_rejected(&agent, &[0xff, 0, 0, 0, 0], "unknown frame kind 255");
    let mut oversized = vec![Kind::Request as u8];
    oversized.extend_from_slice(&(MAX_PAYLOAD as u32 + 1).to_le_bytes());
    oversized.extend_from_slice(&noise(4096));
    assert_rejected(&agent, &oversized, "limit");
    let mut huge = vec![Kind::Request as u8];
    huge.extend_from_slice(&u32::MAX.to_le_bytes());
    assert_rejected(&agent, &huge, "limit");
    let mut not_json = Vec::new();
    stratus_guest_agent::encode(Kind::Request, b"\x00not json{", &mut not_json);
    assert_rejected(&agent, &not_json, "bad request");
    let mut unknown_op = Vec::new();
    stratus_guest_agent::encode(Kind::Request, br#"{"op":"format_disk"}"#, &mut unknown_op);
    assert_rejected(&agent, &unknown_op, "bad request");
    let mut wrong_kind = Vec::new();
    stratus_guest_agent::encode(Kind::Stdin, b"hello", &mut wrong_kind);
    assert_rejected(&agent, &wrong_kind, "expected a request frame");
    assert_rejected(&agent, &noise(100_000), "");

    // A frame cut short by the client's close.
    let mut stream = agent.connect();
    stream.write_all(&[Kind::Request as u8, 100, 0, 0, 0, b'{']).unwrap();
    stream.shutdown(Shutdown::Write).unwrap();
    match read_frame(&mut stream) {
        Ok(frame) => assert_eq!(frame.kind, Kind::Response),
        Err(FrameError::Closed) => {}
        Err(e) => panic!("{e}"),
    }
    // Connected and left without a word.
    drop(agent.connect());
    agent.assert_serving();
}

#[test]
fn a_client_breaking_the_protocol_mid_exec_still_gets_the_exit() {
    let agent = Agent::start();
    let mut stream = agent.connect();
    request_frame(
        &mut stream,
        r#"{"op":"exec","argv":["sh","-c","read x; echo got:$x; sleep 0.2; echo end"]}"#,
    );
    assert_eq!(response(&mut stream), Response::Ok(serde_json::Value::Null));
    write_frame(&mut stream, Kind::Stdin, b"line\n").unwrap();
    // Not a stdin frame: the agent stops reading this client, the program goes on.
    write_frame(&mut stream, Kind::Exit, b"{}").unwrap();
    let mut stdout = Vec::new();
    let code = loop {
        let frame = read_frame(&mut stream).unwrap();
        match frame.kind {
            Kind::Stdout => stdout.extend(frame.payload),
            Kind::Exit => {
                break serde_json::from_slice::<serde_json::Value>(&frame.payload).unwrap()["code"].clone()
            }
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(code, 0);
    assert_eq!(stdout, b"got:line\nend\n");
    agent.assert_serving();
}

#[test]
fn a_client_leaving_mid_exec_lets_the_program_finish() {
    let agent = Agent::start();
    let marker = agent.dir.join("finished");
    let script = format!("sleep 0.3; seq 1 200000; echo done >{}", marker.display());
    let mut stream = agent.connect();
    let request = serde_json::json!({"op": "exec", "argv": ["sh", "-c", script]});
    request_frame(&mut stream, &request.to_string());
    assert_eq!(response(&mut stream), Response::Ok(serde_json::Value::Null));
    drop(stream);
    let deadline = Instant::now() + TIMEOUT;
    while std::fs::read_to_string(&marker).ok().as_deref() != Some("done\n") {
        assert!(Instant::now() < deadline, "the program did not finish after its client left");
        std::thread::sleep(Duration::from_millis(50));
    }
    agent.assert_serving();
}

/// A stand-in for the VMM's vsock socket: answers `CONNECT 1024` with `reply`, then (if `OK`)
/// joins the stream to the agent's Unix socket.
fn fake_vmm(agent_socket: Option<&Path>, dir: &Path, name: &str, reply: &'static str) -> PathBuf {
    let path = dir.join(name);
    let listener = UnixListener::bind(&path).unwrap();
    let agent_socket = agent_socket.map(Path::to_owned);
    std::thread::spawn(move || {
        // Streams answered but not joined stay open, like a guest that never answers.
        let mut held = Vec::new();
        for host in listener.incoming() {
            let mut host = host.unwrap();
            let mut line = Vec::new();
            let mut byte = [0u8];
            while host.read(&mut byte).unwrap() == 1 && byte[0] != b'\n' {
                line.push(byte[0]);
            }
            assert_eq!(line, b"CONNECT 1024");
            if reply.is_empty() {
                continue; // closes: nothing listens on that port
            }
            host.write_all(reply.as_bytes()).unwrap();
            let Some(agent_socket) = &agent_socket else {
                held.push(host);
                continue;
            };
            let guest = UnixStream::connect(agent_socket).unwrap();
            let (mut h, mut g) = (host.try_clone().unwrap(), guest.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = io::copy(&mut h, &mut g);
                let _ = g.shutdown(Shutdown::Write);
            });
            std::thread::spawn(move || {
                let (mut guest, mut host) = (guest, host);
                let _ = io::copy(&mut guest, &mut host);
                let _ = host.shutdown(Shutdown::Write);
            });
        }
    });
    path
}

#[test]
fn the_vmm_handshake() {
    let agent = Agent::start();
    let vmm = fake_vmm(Some(&agent.socket), &agent.dir, "vmm.sock", "OK 1073741824\n");
    let client = Client::new(&vmm, TIMEOUT);
    assert_eq!(client.info().unwrap().agent_version, env!("CARGO_PKG_VERSION"));
    let out = exec(&client, &["cat"], Box::new(io::Cursor::new(b"through the vmm".to_vec()))).unwrap();
    assert_eq!((out.code, out.stdout.as_slice()), (0, &b"through the vmm"[..]));

    let unreachable = |client: Client| match client.info() {
        Err(AgentError::Unreachable(cause)) => cause,
        other => panic!("expected unreachable, got {other:?}"),
    };
    let closed = fake_vmm(None, &agent.dir, "closed.sock", "");
    assert!(unreachable(Client::new(&closed, TIMEOUT)).contains("closed the connection"));
    let refused = fake_vmm(None, &agent.dir, "refused.sock", "ERR expected CONNECT <port>\n");
    assert!(unreachable(Client::new(&refused, TIMEOUT)).contains("ERR expected"));
    let silent = fake_vmm(None, &agent.dir, "silent.sock", "OK 1\n");
    let err = Client::new(&silent, Duration::from_millis(300)).info().err().unwrap();
    assert!(matches!(err, AgentError::Timeout), "{err:?}");
    // The handshake itself timing out is unreachable.
    let listener = UnixListener::bind(agent.dir.join("mute.sock")).unwrap();
    let cause = unreachable(Client::new(agent.dir.join("mute.sock"), Duration::from_millis(300)));
    assert!(cause.contains("no answer"), "{cause}");
    drop(listener);
    assert!(unreachable(Client::new(agent.dir.join("absent.sock"), TIMEOUT)).contains("connecting to"));
}

#[test]
fn wait_ready_gives_up_at_the_deadline() {
    let start = Instant::now();
    let client = Client::direct("/nonexistent/stratus-agent.sock", TIMEOUT);
    let err = client.wait_ready(start + Duration::from_millis(500)).err().unwrap();
    assert!(matches!(err, AgentError::Unreachable(_)), "{err:?}");
    let waited = start.elapsed();
    assert!(waited >= Duration::from_millis(300) && waited < Duration::from_secs(3), "{waited:?}");
}

/// A network namespace with a veth `eth0`, removed on drop: where `configure` can change an
/// interface for real without touching the host's.
struct Netns(String);

impl Netns {
    fn create() -> Option<Netns> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            println!("SKIPPED: configure needs root (network namespaces)");
            return None;
        }
        let name = format!("stratus-agent-cfg-{}", std::process::id());
        let ns = Netns(name.clone());
        let _ = Command::new("ip").args(["netns", "del", &name]).status();
        for args in [
            vec!["netns", "add", &name],
            vec!["-n", &name, "link", "add", "eth0", "type", "veth", "peer", "name", "peer0"],
            vec!["-n", &name, "link", "set", "peer0", "up"],
        ] {
            assert!(Command::new("ip").args(&args).status().unwrap().success(), "ip {args:?}");
        }
        Some(ns)
    }

    fn ip(&self, args: &[&str]) -> String {
        let out = Command::new("ip").args(["-n", &self.0]).args(args).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[test]
fn configure_sets_mac_address_and_route() {
    let Some(ns) = Netns::create() else { return };
    let agent = Agent::start_in(Some(&ns.0));
    let client = agent.client();
    let identity = Identity {
        mac: Some("52:54:00:12:34:56".into()),
        address: Some("10.210.0.5/24".into()),
        gateway: Some("10.210.0.1".into()),
        ..Default::default()
    };
    client.configure(&identity).unwrap();
    let link = ns.ip(&["link", "show", "eth0"]);
    assert!(link.contains("link/ether 52:54:00:12:34:56") && link.contains(",UP"), "{link}");
    assert!(ns.ip(&["-4", "addr", "show", "eth0"]).contains("inet 10.210.0.5/24"));
    assert!(ns.ip(&["route"]).contains("default via 10.210.0.1 dev eth0"));

    // A second identity replaces the first: one address, one default route.
    let again = Identity {
        address: Some("10.211.4.7/16".into()),
        gateway: Some("10.211.0.1".into()),
        ..Default::default()
    };
    client.configure(&again).unwrap();
    let addr = ns.ip(&["-4", "addr", "show", "eth0"]);
    assert!(addr.contains("inet 10.211.4.7/16") && !addr.contains("10.210.0.5"), "{addr}");
    let routes = ns.ip(&["route"]);
    assert_eq!(routes.matches("default").count(), 1, "{routes}");
    assert!(routes.contains("default via 10.211.0.1 dev eth0"), "{routes}");

    let missing = Identity {
        address: Some("10.0.0.2/8".into()),
        interface: Some("nosuch0".into()),
        ..Default::default()
    };
    match client.configure(&missing) {
        Err(AgentError::Guest(message)) => assert!(message.contains("nosuch0"), "{message}"),
        other => panic!("expected the interface's error, got {other:?}"),
    }
    for bad in [
        Identity { hostname: Some("not_a_hostname".into()), ..Default::default() },
        Identity { address: Some("10.0.0.2".into()), ..Default::default() },
        Identity { mac: Some("52:54:00:12:34".into()), ..Default::default() },
        Identity { interface: Some("-f".into()), gateway: Some("10.0.0.1".into()), ..Default::default() },
    ] {
        assert!(matches!(client.configure(&bad), Err(AgentError::Guest(m)) if m.starts_with("bad ")));
    }
    // Nothing changed by the refused ones.
    assert!(ns.ip(&["-4", "addr", "show", "eth0"]).contains("inet 10.211.4.7/16"));
}
