//! The real binary as a child process: run to its exit, or started on a port it binds
//! itself and reports in its log.

use std::io::{BufRead as _, BufReader, Read as _};
use std::net::SocketAddr;
use std::process::{Child, Command, Output, Stdio};
use std::thread::JoinHandle;
use std::time::Duration;

/// How long a child process may take to start listening, or to stop once signalled.
const PROCESS_PATIENCE: Duration = Duration::from_secs(30);

/// The binary with only `env` (and never the default metrics port: tests start many
/// processes at once).
pub fn binary_command(env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_restock-notifier"));
    command
        .env_clear()
        .env("RESTOCK_METRICS_LISTEN", "127.0.0.1:0")
        .envs(env.iter().copied())
        .stdin(Stdio::null());
    command
}

/// Runs the real binary with only the given environment and waits for it to exit (at
/// most 30 s: a binary that keeps running fails the test).
pub fn run_binary(env: &[(&str, &str)], args: &[&str]) -> Output {
    let child = binary_command(env)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary starts");
    let pid = child.id();
    let (done, output) = std::sync::mpsc::channel();
    std::thread::spawn(move || done.send(child.wait_with_output()));
    match output.recv_timeout(PROCESS_PATIENCE) {
        Ok(output) => output.expect("the binary's output"),
        Err(_) => {
            signal_process(pid, "KILL");
            panic!("the binary with {env:?} {args:?} was still running after 30 s");
        }
    }
}

/// Sends `signal` (`TERM`, `KILL`, ...) to process `pid`.
pub fn signal_process(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status();
}

/// A running service process that has said where it listens.
pub struct ServiceProcess {
    /// Taken by `finish`; killed on drop otherwise.
    process: Option<Child>,
    /// The gRPC address it bound (on port 0) and logged.
    pub addr: SocketAddr,
    stdout: Option<JoinHandle<Vec<u8>>>,
    stderr: Option<JoinHandle<Vec<u8>>>,
}

/// Starts `command` (the binary, from [`binary_command`]) listening on 127.0.0.1:0 (or
/// on the `RESTOCK_LISTEN` the command sets: a restart on the same address) and returns
/// once its log says which port it got. The process binds the port itself, before it
/// serves, so nothing else can take the port in between and a connection made after
/// this cannot race its start. Its log goes to stdout and must include `info` (the
/// default); it is kept, and also shown when `TEST_LOG` is set. Fails the test if the
/// process exits or stays silent for 30 s first.
pub async fn start_service(mut command: Command) -> ServiceProcess {
    if !command.get_envs().any(|(key, _)| key == "RESTOCK_LISTEN") {
        command.env("RESTOCK_LISTEN", "127.0.0.1:0");
    }
    let mut process = command
        .stdout(Stdio::piped())
        .spawn()
        .expect("the binary starts");
    let (listening, addr) = tokio::sync::oneshot::channel();
    let stdout = process.stdout.take().expect("stdout is piped");
    let show = std::env::var_os("TEST_LOG").is_some();
    let stdout = std::thread::spawn(move || {
        let mut listening = Some(listening);
        let mut log = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if show {
                eprintln!("{line}");
            }
            if let Some(addr) = listening_addr(&line)
                && let Some(listening) = listening.take()
            {
                let _ = listening.send(addr);
            }
            log.extend_from_slice(line.as_bytes());
            log.push(b'\n');
        }
        log
    });
    let stderr = process.stderr.take().map(|mut stderr| {
        std::thread::spawn(move || {
            let mut text = Vec::new();
            let _ = stderr.read_to_end(&mut text);
            text
        })
    });
    let mut service = ServiceProcess {
        process: Some(process),
        addr: "127.0.0.1:0".parse().unwrap(),
        stdout: Some(stdout),
        stderr,
    };
    match tokio::time::timeout(PROCESS_PATIENCE, addr).await {
        Ok(Ok(addr)) => service.addr = addr,
        outcome => {
            service.signal("KILL");
            let output = service.finish().await;
            panic!(
                "the service did not come up ({}):\n{}{}",
                if outcome.is_err() {
                    "silent for 30 s"
                } else {
                    "it exited"
                },
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr),
            );
        }
    }
    service
}

/// The address in the service's "listening" log line (`... listening addr=IP:PORT`).
fn listening_addr(line: &str) -> Option<SocketAddr> {
    let (_, rest) = line.split_once(" listening addr=")?;
    rest.split_whitespace().next()?.parse().ok()
}

impl ServiceProcess {
    fn pid(&self) -> u32 {
        self.process.as_ref().expect("running").id()
    }

    /// Sends `signal` (`TERM`, `KILL`, ...) to the process.
    pub fn signal(&self, signal: &str) {
        signal_process(self.pid(), signal);
    }

    /// Blocks until the process has exited.
    pub fn wait(&mut self) -> std::process::ExitStatus {
        self.process
            .as_mut()
            .expect("running")
            .wait()
            .expect("the binary's exit")
    }

    /// Waits (at most 30 s, then kills it and fails the test) until the process has
    /// exited, and returns its exit status and all it printed.
    pub async fn finish(mut self) -> Output {
        let pid = self.pid();
        let (stdout, stderr) = (self.stdout.take(), self.stderr.take());
        let mut process = self.process.take().expect("running");
        let exited = tokio::task::spawn_blocking(move || {
            let status = process.wait().expect("the binary's exit");
            let collect = |t: Option<JoinHandle<Vec<u8>>>| {
                t.map(|t| t.join().unwrap_or_default()).unwrap_or_default()
            };
            Output {
                status,
                stdout: collect(stdout),
                stderr: collect(stderr),
            }
        });
        match tokio::time::timeout(PROCESS_PATIENCE, exited).await {
            Ok(output) => output.unwrap(),
            Err(_) => {
                signal_process(pid, "KILL");
                panic!("the service did not stop within 30 s");
            }
        }
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        if let Some(mut process) = self.process.take() {
            let _ = process.kill();
            let _ = process.wait();
        }
    }
}

/// Starts the real binary with only the given environment on a port it binds itself,
/// waits until it listens, stops it with SIGTERM and returns what it printed. Fails the
/// test if it does not come up or does not stop within 30 s.
pub async fn start_and_stop_binary(env: &[(&str, &str)]) -> Output {
    let mut command = binary_command(env);
    command.stderr(Stdio::piped());
    let service = start_service(command).await;
    service.signal("TERM");
    service.finish().await
}

/// Waits (at most 10 s) until something accepts connections on 127.0.0.1:`port`: a
/// process of a test's own that takes a port number and cannot report one it bound
/// (`redis-server`).
pub async fn wait_until_listening(port: u16, what: &str) {
    crate::helpers::poll_until(
        Duration::from_secs(10),
        &format!("{what} listening on port {port}"),
        || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .map(drop)
        },
    )
    .await;
}
