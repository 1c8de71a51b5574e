//! A private PostgreSQL server for one test: `initdb` and `postgres` from the machine's
//! packages (`/usr/lib/postgresql/*/bin`), in a temporary directory, on a free loopback port,
//! optionally with TLS. What the shared server cannot offer without disturbing others: a
//! listener with our own certificates, and a second server to fail over to.
//!
//! Postgres refuses to run as root, so when the test runs as root the server runs as the
//! `postgres` OS user (the directory is handed to it). Stopped (immediate shutdown) and
//! removed on drop.

use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sqlx::{Connection as _, PgConnection};

use super::tls_certs::CertFiles;

/// How long a fresh server may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A running private Postgres server (trust authentication for user `postgres`).
pub struct PrivatePg {
    /// Its port on 127.0.0.1.
    pub port: u16,
    bin: PathBuf,
    dir: PathBuf,
    child: Child,
}

/// Who the server runs as: the `postgres` OS user when we are root, else ourselves.
struct RunAs {
    ids: Option<(u32, u32)>,
}

impl RunAs {
    fn find() -> Self {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Self { ids: None };
        }
        let id = |flag: &str| -> u32 {
            let out = Command::new("id")
                .args([flag, "postgres"])
                .output()
                .expect("run `id` to find the postgres OS user");
            assert!(
                out.status.success(),
                "a private Postgres must not run as root, and there is no `postgres` OS user"
            );
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse()
                .expect("numeric id")
        };
        Self {
            ids: Some((id("-u"), id("-g"))),
        }
    }

    fn command(&self, program: &Path) -> Command {
        let mut cmd = Command::new(program);
        if let Some((uid, gid)) = self.ids {
            cmd.uid(uid).gid(gid);
        }
        cmd.env("LC_ALL", "C");
        cmd
    }

    fn own(&self, path: &Path) {
        if let Some((uid, gid)) = self.ids {
            std::os::unix::fs::chown(path, Some(uid), Some(gid)).expect("hand a file to postgres");
        }
    }
}

/// The directory of the newest installed server binaries, or a panic that says what is missing.
fn bin_dir() -> PathBuf {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_string_lossy().parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    found
        .pop()
        .map(|(_, bin)| bin)
        .expect("a private Postgres needs the server binaries (initdb, postgres) under /usr/lib/postgresql/*/bin: apt-get install postgresql")
}

impl PrivatePg {
    /// Initialises and starts a server called `name` (in its directory's name only); with
    /// `tls`, `ssl = on` with that certificate and key, and only TLS connections accepted.
    pub async fn start(name: &str, tls: Option<&CertFiles>) -> Self {
        let bin = bin_dir();
        let run_as = RunAs::find();
        let dir = std::env::temp_dir().join(format!(
            "tt-pg-{name}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        ));
        let data = dir.join("data");
        std::fs::create_dir_all(&dir).expect("private Postgres directory");
        run_as.own(&dir);
        let init = run_as
            .command(&bin.join("initdb"))
            .args(["-D", &data.to_string_lossy()])
            .args(["-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8"])
            .output()
            .expect("run initdb");
        assert!(
            init.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&init.stderr)
        );
        if let Some(files) = tls {
            install_tls(&run_as, &data, files);
        }
        let port = super::free_local_addr().port();
        let log = std::fs::File::create(dir.join("server.log")).expect("server log");
        run_as.own(&dir.join("server.log"));
        let mut cmd = run_as.command(&bin.join("postgres"));
        cmd.args(["-D", &data.to_string_lossy(), "-p", &port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", &format!("unix_socket_directories={}", dir.display())])
            .args(["-c", "fsync=off", "-c", "max_connections=40"])
            .args(["-c", "shared_buffers=16MB"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("server log"))
            .stderr(log);
        if tls.is_some() {
            cmd.args(["-c", "ssl=on"]);
        }
        let child = cmd.spawn().expect("start postgres");
        let mut pg = Self {
            port,
            bin,
            dir,
            child,
        };
        pg.wait_ready(tls.is_some()).await;
        pg
    }

    /// The URL of database `db` on this server, without TLS parameters (`host` is the host
    /// name to use: `127.0.0.1`, or `localhost` to match a certificate's name).
    pub fn url(&self, host: &str, db: &str) -> String {
        format!("postgres://postgres@{host}:{}/{db}", self.port)
    }

    /// `host:port`, for a [`super::TcpProxy`].
    pub fn host_port(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The directory of the server binaries (for `pg_dump` and `psql` of the same version).
    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// The server's log, for a failure message.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    /// Copies database `db` to `to` (`pg_dump | psql`, created there first): every committed
    /// transaction, as a synchronous replica has them when it is promoted.
    pub fn copy_database_to(&self, to: &PrivatePg, db: &str) {
        let client = |tool: &str, port: u16| {
            let mut cmd = Command::new(self.bin.join(tool));
            cmd.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
                .env("PGSSLMODE", "disable");
            cmd
        };
        let created = client("psql", to.port)
            .args(["-d", "postgres", "-v", "ON_ERROR_STOP=1", "-q"])
            .args(["-c", &format!("CREATE DATABASE \"{db}\"")])
            .output()
            .expect("run psql");
        assert!(
            created.status.success(),
            "create {db} on the standby: {}",
            String::from_utf8_lossy(&created.stderr)
        );
        let mut dump = client("pg_dump", self.port)
            .args(["-d", db])
            .stdout(Stdio::piped())
            .spawn()
            .expect("run pg_dump");
        let restore = client("psql", to.port)
            .args(["-d", db, "-v", "ON_ERROR_STOP=1", "-q"])
            .stdin(dump.stdout.take().expect("pg_dump output"))
            .output()
            .expect("run psql");
        let dumped = dump.wait().expect("pg_dump");
        assert!(
            dumped.success() && restore.status.success(),
            "pg_dump | psql of {db}: {}",
            String::from_utf8_lossy(&restore.stderr)
        );
    }

    async fn wait_ready(&mut self, tls: bool) {
        // The Unix socket needs no TLS, so readiness does not depend on the certificates.
        let url = format!(
            "postgres://postgres@localhost:{}/postgres?host={}&sslmode=disable",
            self.port,
            self.dir.display()
        );
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if PgConnection::connect(&url).await.is_ok() {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("private postgres exited with {status}:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "private postgres (tls: {tls}) not ready within {START_TIMEOUT:?}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Copies the server certificate and key into the data directory (Postgres wants the key
/// owned by its user and private) and accepts TCP connections only over TLS.
fn install_tls(run_as: &RunAs, data: &Path, files: &CertFiles) {
    for (from, to) in [(&files.cert, "server.crt"), (&files.key, "server.key")] {
        let dst = data.join(to);
        std::fs::copy(from, &dst).expect("copy TLS file into the data directory");
        std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o600))
            .expect("key permissions");
        run_as.own(&dst);
    }
    let hba = "local all all trust\n\
               hostssl all all 127.0.0.1/32 trust\n\
               hostnossl all all 127.0.0.1/32 reject\n";
    std::fs::write(data.join("pg_hba.conf"), hba).expect("pg_hba.conf");
}

impl Drop for PrivatePg {
    fn drop(&mut self) {
        // SIGQUIT: immediate shutdown, the server's children go with it.
        // SAFETY: kill has no memory preconditions; the pid is our own child's.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGQUIT);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("private postgres log:\n{}", self.log());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
