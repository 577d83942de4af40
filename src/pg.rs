//! A throwaway local PostgreSQL for `demo` and `bench` when no `DATABASE_URL` is given: a new
//! cluster in a temporary directory, from the system's server binaries, on a free loopback
//! port; stopped and deleted on drop. (As root it runs as the `postgres` user: Postgres refuses
//! to run as root.)

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error(
        "PostgreSQL server binaries (initdb, pg_ctl) were not found in /usr/lib/postgresql/*/bin or on PATH. \
         Install them (Debian/Ubuntu: `apt-get install -y postgresql`; `scripts/test.sh` does this) or set DATABASE_URL"
    )]
    NotInstalled,
    #[error("{step} failed: {detail}")]
    Failed { step: &'static str, detail: String },
}

/// A running throwaway cluster.
pub struct ThrowawayPostgres {
    bin: PathBuf,
    dir: PathBuf,
    run_as: Option<String>,
    port: u16,
}

/// The directory of the installed PostgreSQL server's programs (`initdb`, `pg_ctl`, `psql`),
/// the newest under `/usr/lib/postgresql`, else the first on `PATH`.
pub fn bin_dir() -> Option<PathBuf> {
    find_bin()
}

fn find_bin() -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("initdb").is_file() && p.join("pg_ctl").is_file())
        .collect();
    found.sort();
    if let Some(best) = found.pop() {
        return Some(best);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .find(|p| p.join("initdb").is_file() && p.join("pg_ctl").is_file())
    })
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0"))
        .unwrap_or(false)
}

fn free_port() -> Result<u16, PgError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| PgError::Failed {
            step: "finding a free port",
            detail: e.to_string(),
        })
}

impl ThrowawayPostgres {
    /// Starts a cluster; `extra_conf` lines go into postgresql.conf.
    pub fn start(extra_conf: &str) -> Result<ThrowawayPostgres, PgError> {
        let bin = find_bin().ok_or(PgError::NotInstalled)?;
        let dir = std::env::temp_dir().join(format!(
            "contact-sync-pg-{}-{}",
            std::process::id(),
            fastrand::u32(..)
        ));
        std::fs::create_dir_all(&dir).map_err(|e| PgError::Failed {
            step: "creating the data directory",
            detail: e.to_string(),
        })?;
        let run_as = if is_root() {
            Some("postgres".to_string())
        } else {
            None
        };
        if let Some(user) = &run_as {
            let status = Command::new("chown").arg(user).arg(&dir).status();
            if !status.map(|s| s.success()).unwrap_or(false) {
                return Err(PgError::Failed {
                    step: "chown to the postgres user",
                    detail: format!("{}", dir.display()),
                });
            }
        }
        let port = free_port()?;
        let pg = ThrowawayPostgres {
            bin,
            dir,
            run_as,
            port,
        };
        pg.run(
            "initdb",
            &[
                "-D",
                &pg.data().to_string_lossy(),
                "--auth=trust",
                "--username=postgres",
                "-E",
                "UTF8",
                "--no-locale",
            ],
        )?;
        let conf = format!(
            "listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{}'\nmax_connections = 200\nshared_buffers = 256MB\n{extra_conf}\n",
            pg.dir.display()
        );
        let conf_path = pg.data().join("postgresql.conf");
        let mut existing = std::fs::read_to_string(&conf_path).unwrap_or_default();
        existing.push_str(&conf);
        std::fs::write(&conf_path, existing).map_err(|e| PgError::Failed {
            step: "writing postgresql.conf",
            detail: e.to_string(),
        })?;
        pg.run(
            "pg_ctl",
            &[
                "-D",
                &pg.data().to_string_lossy(),
                "-l",
                &pg.dir.join("server.log").to_string_lossy(),
                "-w",
                "-t",
                "60",
                "start",
            ],
        )?;
        Ok(pg)
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn run(&self, tool: &'static str, args: &[&str]) -> Result<(), PgError> {
        let exe = self.bin.join(tool);
        let mut cmd = match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        let out = cmd
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| PgError::Failed {
                step: tool,
                detail: e.to_string(),
            })?;
        if out.status.success() {
            Ok(())
        } else {
            let log = std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default();
            Err(PgError::Failed {
                step: tool,
                detail: format!(
                    "{}{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr),
                    log
                ),
            })
        }
    }

    /// Restarts the server; `mode` is pg_ctl's shutdown mode (`smart`, `fast`, `immediate`).
    /// Every connection is cut; clients must reconnect.
    pub fn restart(&self, mode: &str) -> Result<(), PgError> {
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data().to_string_lossy(),
                "-l",
                &self.dir.join("server.log").to_string_lossy(),
                "-m",
                mode,
                "-w",
                "-t",
                "60",
                "restart",
            ],
        )
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    pub fn data_dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for ThrowawayPostgres {
    fn drop(&mut self) {
        let _ = self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data().to_string_lossy(),
                "-m",
                "fast",
                "-w",
                "stop",
            ],
        );
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Closes `pool` and waits until its last connection is closed: call it before a throwaway
/// cluster stops, or each connection the server ends is reported as a warning ("error occurred
/// while testing the connection on-release … terminating connection due to administrator
/// command") when sqlx tests it on its way back to the pool. `Pool::close` alone may return
/// early (sqlx 0.8: closing an idle connection gives back a permit it had already returned, so
/// the wait for every permit can end while a connection is still on its way back), and one
/// arriving afterwards lands in the closed pool's idle queue: close again until none is left
/// (at most 5 s).
pub async fn close_pool(pool: &sqlx::PgPool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        pool.close().await;
        if pool.size() == 0 || std::time::Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// A migrated pool on `database_url`, or on a throwaway cluster (with `extra_conf`) started for
/// the occasion and kept alive by the returned guard. Used by `demo` and `bench`.
pub async fn open(
    database_url: Option<String>,
    extra_conf: &'static str,
    max_connections: u32,
) -> anyhow::Result<(Option<ThrowawayPostgres>, sqlx::PgPool, String)> {
    let (pg, url) = match database_url {
        Some(url) => (None, url),
        None => {
            let pg =
                tokio::task::spawn_blocking(move || ThrowawayPostgres::start(extra_conf)).await??;
            let url = pg.url();
            (Some(pg), url)
        }
    };
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(max_connections)
        .connect(&url)
        .await
        .map_err(|e| anyhow::anyhow!("connecting to the database: {e}"))?;
    crate::migrate(&pool).await?;
    Ok((pg, pool, url))
}
