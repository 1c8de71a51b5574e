//! Private RabbitMQ nodes for tests that must stop a broker or configure one: each node has
//! its own name (`tt-<run>-<label>@localhost`), loopback ports, data directory and Erlang
//! cookie, and is started with the installed `rabbitmq-server`, so the machine's default node
//! (5672) is never touched. Nodes can be joined into a cluster ([`RabbitCluster`]).
//!
//! A node dies with its handle: dropping a [`RabbitNode`] kills its processes (also when the
//! test panics), and a node whose test process died anyway (SIGKILL, a timeout) kills itself,
//! because it is started under a small shell that kills its process group when the test
//! process's end of its stdin closes. Files live under the system temp directory and are
//! removed with the last node of a site.
//!
//! ```ignore
//! let node = RabbitNode::builder().conf("heartbeat = 5").start().await;
//! let conn = tenant_tokens::broker::connect(&node.amqp_url(), "test").await?;
//! ```

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::util::free_local_addr;

/// How long a node may take to boot (three booting at once on two busy cores are slow).
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long one `rabbitmqctl` call may take.
const CTL_TIMEOUT: Duration = Duration::from_secs(120);

/// Where the RabbitMQ scripts are: `RABBITMQ_SBIN` if set; else Debian's
/// `/usr/lib/rabbitmq/bin`, the scripts themselves (the `/usr/sbin` wrappers switch to the
/// `rabbitmq` user, its home and its cookie, and could not write a root-owned temp dir); else
/// the `PATH`.
fn script(name: &str) -> PathBuf {
    let dir = std::env::var_os("RABBITMQ_SBIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/lib/rabbitmq/bin"));
    let path = dir.join(name);
    if path.exists() {
        path
    } else {
        PathBuf::from(name)
    }
}

/// The directory and Erlang cookie that the nodes of one cluster (and `rabbitmqctl`) share;
/// removed when the last node holding it is dropped.
struct Site {
    dir: PathBuf,
    /// Random part of the node names, unique per site.
    run: String,
}

impl Site {
    fn new() -> Arc<Self> {
        let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
        let dir = std::env::temp_dir().join(format!("tt-rabbit-{run}"));
        let home = dir.join("home");
        std::fs::create_dir_all(&home).expect("private RabbitMQ: create the site directory");
        // Erlang reads the cookie from $HOME and refuses one that others can read.
        let cookie = home.join(".erlang.cookie");
        let value = uuid::Uuid::new_v4().simple().to_string().to_uppercase();
        std::fs::write(&cookie, value).expect("private RabbitMQ: write the Erlang cookie");
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&cookie, std::fs::Permissions::from_mode(0o400))
            .expect("private RabbitMQ: cookie permissions");
        // An empty env file instead of /etc/rabbitmq/rabbitmq-env.conf (which names the
        // machine's default node).
        std::fs::write(dir.join("rabbitmq-env.conf"), "")
            .expect("private RabbitMQ: write rabbitmq-env.conf");
        Arc::new(Self { dir, run })
    }

    /// Environment shared by the nodes and the CLI tools of this site.
    fn env(&self) -> Vec<(String, String)> {
        vec![
            ("HOME".into(), path_str(&self.dir.join("home"))),
            (
                "RABBITMQ_CONF_ENV_FILE".into(),
                path_str(&self.dir.join("rabbitmq-env.conf")),
            ),
            ("ERL_EPMD_ADDRESS".into(), "127.0.0.1".into()),
        ]
    }

    /// `cmd` with this site's environment, and none of the caller's `RABBITMQ_*` settings.
    fn command(&self, program: &Path) -> Command {
        let mut cmd = Command::new(program);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("RABBITMQ_") || k == "ERL_FLAGS" {
                cmd.env_remove(k);
            }
        }
        cmd.envs(self.env()).stdin(Stdio::null());
        cmd
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn path_str(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// A node to start: extra `rabbitmq.conf` lines and plugins. Its directory ([`Self::dir`])
/// exists already, for files the configuration names (certificates, say).
pub struct NodeBuilder {
    site: Arc<Site>,
    label: String,
    conf: Vec<String>,
    plugins: Vec<String>,
}

impl NodeBuilder {
    fn new(site: Arc<Site>, label: &str) -> Self {
        let b = Self {
            site,
            label: label.to_owned(),
            conf: Vec::new(),
            plugins: Vec::new(),
        };
        std::fs::create_dir_all(b.dir()).expect("private RabbitMQ: create the node directory");
        b
    }

    /// The node's own directory (removed with it): a place for files its configuration names.
    pub fn dir(&self) -> PathBuf {
        self.site.dir.join(&self.label)
    }

    /// Adds a line to the node's `rabbitmq.conf` (e.g. `listeners.ssl.default = 127.0.0.1:N`).
    pub fn conf(mut self, line: impl Into<String>) -> Self {
        self.conf.push(line.into());
        self
    }

    /// Enables a plugin (none by default, not even the management plugin).
    pub fn plugin(mut self, name: impl Into<String>) -> Self {
        self.plugins.push(name.into());
        self
    }

    /// Starts the node and waits until it has booted (its AMQP port answers and
    /// `rabbitmqctl await_startup` agrees); panics with its log if it does not.
    pub async fn start(self) -> RabbitNode {
        let dir = self.dir();
        let port = free_local_addr().port();
        let dist_port = loop {
            let p = free_local_addr().port();
            if p != port {
                break p;
            }
        };
        let mut conf = String::from("log.console = false\nlog.file.level = info\n");
        for line in &self.conf {
            let _ = writeln!(conf, "{line}");
        }
        std::fs::write(dir.join("rabbitmq.conf"), conf).expect("write rabbitmq.conf");
        let plugins = format!("[{}].\n", self.plugins.join(","));
        std::fs::write(dir.join("enabled_plugins"), plugins).expect("write enabled_plugins");
        let name = format!("tt-{}-{}@localhost", self.site.run, self.label);
        let mut node = RabbitNode {
            site: self.site.clone(),
            name,
            port,
            dist_port,
            dir,
            wrapper: None,
        };
        node.spawn();
        node.wait_booted().await;
        node
    }
}

/// A private RabbitMQ node on loopback ports, killed when dropped.
pub struct RabbitNode {
    site: Arc<Site>,
    name: String,
    port: u16,
    dist_port: u16,
    dir: PathBuf,
    /// The shell that owns the node's process group; `None` once the node is stopped.
    wrapper: Option<Child>,
}

impl RabbitNode {
    /// A single node of its own (own site and cookie).
    pub fn builder() -> NodeBuilder {
        NodeBuilder::new(Site::new(), "a")
    }

    /// A single node with the default configuration.
    pub async fn start() -> Self {
        Self::builder().start().await
    }

    /// The Erlang node name, `tt-<run>-<label>@localhost`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The plain AMQP port, on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The Erlang distribution port, on 127.0.0.1.
    pub fn dist_port(&self) -> u16 {
        self.dist_port
    }

    /// The node's directory (configuration, data, logs).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `amqp://guest:guest@127.0.0.1:<port>/%2f` (guest may log in over loopback).
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// The Erlang VM's process id, from the pid file the node writes once booted.
    pub fn os_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.dir.join("rabbitmq.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Whether the node has been started and not stopped or killed since.
    pub fn is_running(&mut self) -> bool {
        self.wrapper
            .as_mut()
            .is_some_and(|w| matches!(w.try_wait(), Ok(None)))
    }

    /// Starts `rabbitmq-server` under a shell that leads the node's process group and kills
    /// the group when its stdin (held by this process) reaches end of file.
    fn spawn(&mut self) {
        use std::os::unix::process::CommandExt as _;
        let d = |f: &str| path_str(&self.dir.join(f));
        let mut cmd = self.site.command(Path::new("sh"));
        cmd.arg("-c")
            .arg(r#""$0" </dev/null >"$1" 2>&1 & read -r _; kill -KILL 0"#)
            .arg(script("rabbitmq-server"))
            .arg(d("server.out"))
            .envs([
                ("RABBITMQ_NODENAME", self.name.clone()),
                ("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1".into()),
                ("RABBITMQ_NODE_PORT", self.port.to_string()),
                ("RABBITMQ_DIST_PORT", self.dist_port.to_string()),
                ("RABBITMQ_MNESIA_BASE", d("mnesia")),
                ("RABBITMQ_LOG_BASE", d("log")),
                ("RABBITMQ_PID_FILE", d("rabbitmq.pid")),
                ("RABBITMQ_CONFIG_FILE", d("rabbitmq.conf")),
                ("RABBITMQ_ADVANCED_CONFIG_FILE", d("advanced.config")),
                ("RABBITMQ_ENABLED_PLUGINS_FILE", d("enabled_plugins")),
                (
                    "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                    "-kernel inet_dist_use_interface {127,0,0,1}".into(),
                ),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0);
        let child = cmd.spawn().unwrap_or_else(|e| {
            panic!("cannot start rabbitmq-server ({e}): install RabbitMQ (Debian package rabbitmq-server) or set RABBITMQ_SBIN")
        });
        self.wrapper = Some(child);
    }

    /// Waits until the AMQP port answers, then for `await_startup`.
    async fn wait_booted(&mut self) {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        loop {
            let exited = self
                .wrapper
                .as_mut()
                .is_none_or(|w| !matches!(w.try_wait(), Ok(None)));
            assert!(
                !exited,
                "RabbitMQ node {} exited while booting:\n{}",
                self.name,
                self.log_tail()
            );
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "RabbitMQ node {} did not boot within {BOOT_TIMEOUT:?}:\n{}",
                self.name,
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.ctl(&["await_startup"]).await;
    }

    /// Runs `tool` (`rabbitmqctl`, `rabbitmq-queues`, …) against this node; its stdout, or
    /// what went wrong.
    pub async fn try_cli(&self, tool: &str, args: &[&str]) -> Result<String, String> {
        let mut cmd = tokio::process::Command::from(self.site.command(&script(tool)));
        cmd.arg("-n").arg(&self.name).args(args).kill_on_drop(true);
        match tokio::time::timeout(CTL_TIMEOUT, cmd.output()).await {
            Err(_) => Err(format!("no answer within {CTL_TIMEOUT:?}")),
            Ok(Err(e)) => Err(format!("cannot run {tool}: {e}")),
            Ok(Ok(out)) if out.status.success() => {
                Ok(String::from_utf8_lossy(&out.stdout).into_owned())
            }
            Ok(Ok(out)) => Err(format!(
                "{}\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )),
        }
    }

    /// `rabbitmqctl -n <this node> args…`; panics with the output when it fails.
    pub async fn ctl(&self, args: &[&str]) -> String {
        self.try_cli("rabbitmqctl", args)
            .await
            .unwrap_or_else(|e| panic!("rabbitmqctl -n {} {}: {e}", self.name, args.join(" ")))
    }

    /// `rabbitmqctl … --formatter json` parsed; panics when it fails or is not JSON.
    pub async fn ctl_json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["-q"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--formatter", "json"]);
        let out = self.ctl(&all).await;
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("rabbitmqctl {}: not JSON ({e}): {out}", all.join(" ")))
    }

    /// The node that leads quorum queue `queue` of `vhost`, as this node sees it (`None` when
    /// the queue does not exist or has no leader right now).
    pub async fn quorum_leader(&self, vhost: &str, queue: &str) -> Option<String> {
        let rows = self
            .ctl_json(&["list_queues", "-p", vhost, "name", "leader"])
            .await;
        rows.as_array()?
            .iter()
            .find(|r| r["name"] == queue)?
            .get("leader")?
            .as_str()
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
    }

    /// Connections of the cluster this node belongs to, as `(client-given connection name,
    /// server port)`: the port tells which node a client is connected to.
    pub async fn connections(&self) -> Vec<(String, u16)> {
        self.connection_rows(&["port"])
            .await
            .into_iter()
            .filter_map(|(name, r)| Some((name, u16::try_from(r["port"].as_u64()?).ok()?)))
            .collect()
    }

    /// Connections of the cluster, as `(client-given connection name, row)`, where the row
    /// holds the `list_connections` `columns` asked for.
    pub async fn connection_rows(&self, columns: &[&str]) -> Vec<(String, serde_json::Value)> {
        let mut args = vec!["list_connections", "client_properties"];
        args.extend_from_slice(columns);
        let rows = self.ctl_json(&args).await;
        let rows = rows.as_array().cloned().unwrap_or_default();
        rows.into_iter()
            .map(|r| (connection_name(&r["client_properties"]), r))
            .collect()
    }

    /// Kills the node's processes at once (SIGKILL), as a crash or a lost machine would.
    pub fn kill(&mut self) {
        if let Some(mut w) = self.wrapper.take() {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", w.id())])
                .status();
            let _ = w.kill();
            let _ = w.wait();
        }
    }

    /// Stops the node gracefully (`rabbitmqctl shutdown`, which waits for the VM to exit).
    pub async fn stop(&mut self) {
        if self.wrapper.is_some() {
            self.ctl(&["shutdown"]).await;
        }
        self.kill();
    }

    /// The last lines of the node's log and of its console output.
    pub fn log_tail(&self) -> String {
        let log = self.dir.join("log").join(format!("{}.log", self.name));
        let mut out = String::new();
        for file in [self.dir.join("server.out"), log] {
            let text = std::fs::read_to_string(&file).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let _ = writeln!(out, "--- {}", file.display());
            for l in &lines[lines.len().saturating_sub(30)..] {
                let _ = writeln!(out, "{l}");
            }
        }
        out
    }
}

impl Drop for RabbitNode {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("RabbitMQ node {}:\n{}", self.name, self.log_tail());
        }
        self.kill();
    }
}

/// The `connection_name` a client gave, from `client_properties` as rabbitmqctl prints it
/// in JSON (a list of `[key, type, value]` triples, or an object).
fn connection_name(props: &serde_json::Value) -> String {
    let from_list = props.as_array().and_then(|items| {
        items.iter().find_map(|i| {
            let i = i.as_array()?;
            (i.first()?.as_str()? == "connection_name")
                .then(|| i.last()?.as_str().map(str::to_owned))?
        })
    });
    from_list
        .or_else(|| props["connection_name"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// A cluster of private nodes, labelled `a`, `b`, `c`, … and joined to the first.
pub struct RabbitCluster {
    /// The nodes, in the order of their labels.
    pub nodes: Vec<RabbitNode>,
}

impl RabbitCluster {
    /// Starts `size` nodes at once and joins every other node to the first (`stop_app`,
    /// `join_cluster`, `start_app`); returns when all are running in one cluster.
    pub async fn start(size: usize) -> Self {
        assert!((1..=26).contains(&size), "a cluster of 1 to 26 nodes");
        let site = Site::new();
        let starts = (0..size).map(|i| {
            let label = char::from(b'a' + u8::try_from(i).unwrap_or(0)).to_string();
            NodeBuilder::new(site.clone(), &label).start()
        });
        let nodes = futures::future::join_all(starts).await;
        let first = nodes[0].name.clone();
        for node in &nodes[1..] {
            node.ctl(&["stop_app"]).await;
            node.ctl(&["join_cluster", first.as_str()]).await;
            node.ctl(&["start_app"]).await;
        }
        let size = size.to_string();
        nodes[0].ctl(&["await_online_nodes", size.as_str()]).await;
        Self { nodes }
    }

    /// `AMQP_URL` for the whole cluster: every node's URL, in order, separated by commas.
    pub fn amqp_urls(&self) -> String {
        let urls: Vec<String> = self.nodes.iter().map(RabbitNode::amqp_url).collect();
        urls.join(",")
    }

    /// The node called `name`.
    pub fn by_name(&self, name: &str) -> Option<&RabbitNode> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// The node whose AMQP port is `port`.
    pub fn by_port(&self, port: u16) -> Option<&RabbitNode> {
        self.nodes.iter().find(|n| n.port == port)
    }
}
