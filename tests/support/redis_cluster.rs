//! A Redis Cluster of the tests' own: three masters and three replicas, on loopback
//! ports picked free, started from the `redis-server` on the path (`scripts/test`
//! installs it) and made a cluster with `redis-cli --cluster create`.
//!
//! Self-contained, so the benchmark (`examples/bench.rs`) starts its clusters with it
//! too.
//!
//! Each node runs under a shell that kills it when this process goes away (its stdin,
//! a pipe from this process, closes), so a cluster never outlives the test that
//! started it, even one killed by a timeout.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

use tokio::sync::OnceCell;

/// One node: its client port and the pid of its `redis-server`.
struct Node {
    port: u16,
    pid: u32,
    /// The watchdog shell; its stdin open keeps the node alive.
    _shell: Child,
    _stdin: ChildStdin,
}

pub struct RedisCluster {
    nodes: Vec<Node>,
    dir: std::path::PathBuf,
}

/// One cluster for every test of this process that only needs a cluster, not to hurt
/// one (a test that kills a node starts its own with [`RedisCluster::start`]).
static SHARED: OnceCell<RedisCluster> = OnceCell::const_new();

/// The process's shared cluster, started on first use.
pub async fn shared_cluster() -> &'static RedisCluster {
    SHARED.get_or_init(RedisCluster::start).await
}

/// Checks `ready` every 50 ms until it holds; panics with its last answer after
/// `timeout`.
async fn wait_for(timeout: Duration, what: &str, mut ready: impl FnMut() -> Result<(), String>) {
    let end = tokio::time::Instant::now() + timeout;
    loop {
        match ready() {
            Ok(()) => return,
            Err(last) if tokio::time::Instant::now() >= end => {
                panic!("{what}: not within {timeout:?}; last seen {last}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// A loopback port nothing listens on now. redis-server only takes a port number
/// (`--port 0` turns TCP off rather than choosing one), so its ports are probed here;
/// everything of the service's own binds port 0.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli is installed (scripts/test installs it)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl RedisCluster {
    /// Starts six nodes and makes them a cluster; returns once every slot is served.
    pub async fn start() -> Self {
        let dir =
            std::env::temp_dir().join(format!("restock-cluster-{:016x}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut nodes = vec![];
        for _ in 0..6 {
            nodes.push(Self::answering_node(&dir).await);
        }
        let addresses: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("redis-cli --cluster create");
        assert!(
            created.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&created.stdout)
        );
        let cluster = Self { nodes, dir };
        cluster.wait_until_ok().await;
        // A replica that never synced refuses to take over its master's slots.
        for node in &cluster.nodes {
            let port = node.port;
            wait_for(Duration::from_secs(30), "every replica synced", || {
                let replication = redis_cli(port, &["info", "replication"]);
                if replication.contains("role:slave")
                    && !replication.contains("master_link_status:up")
                {
                    return Err(replication);
                }
                Ok(())
            })
            .await;
        }
        cluster
    }

    /// A node that answers PING. Ports are picked free, but another test may take one
    /// before the node binds it: then the node is dropped and another one started.
    async fn answering_node(dir: &std::path::Path) -> Node {
        for _ in 0..10 {
            let mut node = Self::node(dir);
            for _ in 0..50 {
                if redis_cli(node.port, &["ping"]).trim() == "PONG" {
                    return node;
                }
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
            let _ = node._stdin.write_all(b"\n");
        }
        panic!("no redis-server node would start");
    }

    fn node(dir: &std::path::Path) -> Node {
        let (port, bus_port) = (free_port(), free_port());
        let command = format!(
            "redis-server --port {port} --cluster-port {bus_port} --bind 127.0.0.1 \
             --cluster-enabled yes --cluster-config-file nodes-{port}.conf \
             --cluster-node-timeout 1000 --repl-diskless-sync-delay 0 \
             --save '' --appendonly no --dir '{dir}' \
             >/dev/null 2>&1 & pid=$!; echo $pid; read -r _; kill -9 $pid",
            dir = dir.display()
        );
        let mut shell = Command::new("sh")
            .args(["-c", &command])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("sh");
        let mut pid = String::new();
        BufReader::new(shell.stdout.take().unwrap())
            .read_line(&mut pid)
            .unwrap();
        let stdin = shell.stdin.take().unwrap();
        Node {
            port,
            pid: pid.trim().parse().expect("the node's pid"),
            _shell: shell,
            _stdin: stdin,
        }
    }

    /// Waits until every live node says the cluster is ok and agrees on who serves
    /// each slot.
    async fn wait_until_ok(&self) {
        let ports: Vec<u16> = self.live().map(|n| n.port).collect();
        wait_for(Duration::from_secs(30), "the cluster is ok", || {
            for &port in &ports {
                let info = redis_cli(port, &["cluster", "info"]);
                if !info.contains("cluster_state:ok") {
                    return Err(format!("{port}: {info}"));
                }
            }
            Ok(())
        })
        .await;
    }

    fn live(&self) -> impl Iterator<Item = &Node> {
        self.nodes.iter().filter(|n| n.pid != 0)
    }

    /// `REDIS_URL` for the service: every node named, as fred's cluster form takes them.
    pub fn url(&self) -> String {
        let mut live = self.live();
        let first = live.next().expect("a live node");
        let others: Vec<String> = live.map(|n| format!("node=127.0.0.1:{}", n.port)).collect();
        format!(
            "redis-cluster://127.0.0.1:{}?{}",
            first.port,
            others.join("&")
        )
    }

    /// Kills (SIGKILL) the master that serves `key` and returns once its replica took
    /// its slots over and the cluster is ok again.
    pub async fn kill_master_of(&mut self, key: &str) {
        let any = self.live().next().unwrap().port;
        let slot: u16 = redis_cli(any, &["cluster", "keyslot", key])
            .trim()
            .parse()
            .unwrap();
        let port = master_of(any, slot).unwrap_or_else(|| panic!("no master serves slot {slot}"));
        let node = self.nodes.iter_mut().find(|n| n.port == port).unwrap();
        Command::new("kill")
            .args(["-9", &node.pid.to_string()])
            .status()
            .unwrap();
        node.pid = 0;
        let asked = self.live().next().unwrap().port;
        wait_for(
            Duration::from_secs(30),
            "a replica took over",
            || match master_of(asked, slot) {
                Some(now) if now != port => Ok(()),
                _ => Err(redis_cli(asked, &["cluster", "nodes"])),
            },
        )
        .await;
        self.wait_until_ok().await;
    }
}

impl RedisCluster {
    /// Moves the slot of `key` to another master, its keys with it, as a resharding
    /// does (`CLUSTER SETSLOT ... IMPORTING / MIGRATING`, `MIGRATE`, `SETSLOT ... NODE`
    /// on every master), and returns once every master says the other one serves it.
    pub async fn move_slot_of(&self, key: &str) {
        let any = self.live().next().unwrap().port;
        let slot: u16 = redis_cli(any, &["cluster", "keyslot", key])
            .trim()
            .parse()
            .unwrap();
        let from = master_of(any, slot).expect("a master serves the slot");
        let masters: Vec<u16> = self
            .live()
            .map(|n| n.port)
            .filter(|&port| redis_cli(port, &["role"]).starts_with("master"))
            .collect();
        let to = *masters
            .iter()
            .find(|&&port| port != from)
            .expect("another master");
        let id = |port: u16| redis_cli(port, &["cluster", "myid"]).trim().to_string();
        let (from_id, to_id, slot_arg) = (id(from), id(to), slot.to_string());
        redis_cli(
            to,
            &["cluster", "setslot", &slot_arg, "importing", &from_id],
        );
        redis_cli(
            from,
            &["cluster", "setslot", &slot_arg, "migrating", &to_id],
        );
        let to_port = to.to_string();
        loop {
            let keys = redis_cli(from, &["cluster", "getkeysinslot", &slot_arg, "100"]);
            let keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
            if keys.is_empty() {
                break;
            }
            let mut args = vec!["migrate", "127.0.0.1", &to_port, "", "0", "5000", "keys"];
            args.extend(keys);
            redis_cli(from, &args);
        }
        for &port in &masters {
            redis_cli(port, &["cluster", "setslot", &slot_arg, "node", &to_id]);
        }
        wait_for(
            Duration::from_secs(30),
            "every master sees the slot moved",
            || {
                for &port in &masters {
                    if master_of(port, slot) != Some(to) {
                        return Err(redis_cli(port, &["cluster", "nodes"]));
                    }
                }
                Ok(())
            },
        )
        .await;
    }
}

/// The port of the master that serves `slot`, as the node on `asked` sees it.
fn master_of(asked: u16, slot: u16) -> Option<u16> {
    redis_cli(asked, &["cluster", "nodes"])
        .lines()
        .find(|line| line.contains("master") && !line.contains("fail") && serves(line, slot))
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|address| address.split([':', '@']).nth(1))
        .and_then(|port| port.parse::<u16>().ok())
}

/// Whether a `CLUSTER NODES` line's slot ranges (`0-5460`, `7`) include `slot`.
fn serves(line: &str, slot: u16) -> bool {
    line.split_whitespace().skip(8).any(|range| {
        let mut ends = range.split('-').map(|n| n.parse::<u16>());
        match (ends.next(), ends.next()) {
            (Some(Ok(from)), Some(Ok(to))) => (from..=to).contains(&slot),
            (Some(Ok(only)), None) => only == slot,
            _ => false,
        }
    })
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            let _ = node._stdin.write_all(b"\n");
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
