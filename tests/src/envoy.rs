//! The reference: Envoy 1.40, where its binary comes from and a running
//! instance on a static bootstrap, for tests that run one configuration
//! through Envoy and through Ferry and compare what they observe.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::proxy::{TempDir, accepts, free_port, http_request, local};

fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Envoy's binary: `$FERRY_ENVOY` when it names a file (CI exports it after
/// installing), otherwise what `scripts/install-envoy.sh` installs (once per
/// test process; the script serialises concurrent installs). `None` when it
/// cannot be had outside CI; under `CI=true` that is an error.
pub fn bin() -> Result<Option<PathBuf>> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let found = BIN.get_or_init(|| {
        if let Some(path) = std::env::var_os("FERRY_ENVOY").map(PathBuf::from)
            && path.is_file()
        {
            return Ok(path);
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/install-envoy.sh");
        let out = Command::new("bash")
            .arg(&script)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("running {}: {e}", script.display()))?;
        let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && path.is_file() {
            Ok(path)
        } else {
            Err(format!(
                "install-envoy.sh failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    });
    match found {
        Ok(p) => Ok(Some(p.clone())),
        Err(e) if under_ci() => bail!("Envoy 1.40 is required under CI=true: {e}"),
        Err(e) => {
            eprintln!("Envoy not available ({e}); its half of the comparison is skipped");
            Ok(None)
        }
    }
}

/// Like [`bin`], for tests that cannot run without Envoy at all.
pub fn require_bin() -> Result<PathBuf> {
    bin()?.context("Envoy 1.40 is not installed (scripts/install-envoy.sh)")
}

/// A running Envoy on a static bootstrap, killed on drop.
pub struct Envoy {
    child: Child,
    admin: u16,
    log: PathBuf,
    _dir: TempDir,
}

impl Envoy {
    /// Starts Envoy on `config` (a bootstrap as JSON; an admin listener is
    /// added) and waits until `port` accepts connections.
    pub fn start(bin: &Path, config: &Value, port: u16) -> Result<Envoy> {
        Envoy::start_with(bin, config, port, &[])
    }

    /// Like [`Envoy::start`], with more command-line arguments
    /// (`--drain-time-s`, …).
    pub fn start_with(bin: &Path, config: &Value, port: u16, args: &[&str]) -> Result<Envoy> {
        let dir = TempDir::new("envoy")?;
        let admin = free_port();
        let mut cfg = config.clone();
        cfg["admin"] =
            json!({"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}});
        let path = dir.path().join("envoy.json");
        fs::write(&path, serde_json::to_string_pretty(&cfg)?)?;
        let log = dir.path().join("envoy.log");
        let child = Command::new(bin)
            .arg("-c")
            .arg(&path)
            .args(["--concurrency", "1", "--disable-hot-restart", "-l"])
            // `FERRY_ENVOY_LOG_LEVEL=debug` when a comparison needs Envoy's reasons.
            .arg(std::env::var("FERRY_ENVOY_LOG_LEVEL").unwrap_or_else(|_| "warning".into()))
            // Several Envoys may run at once: each its own shared-memory id.
            .args(["--base-id", &free_port().to_string()])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log)?)
            .spawn()
            .context("spawning envoy")?;
        let mut envoy = Envoy {
            child,
            admin,
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !accepts(port) {
            if let Some(st) = envoy.child.try_wait()? {
                bail!("envoy exited ({st}):\n{}", envoy.log());
            }
            if Instant::now() >= deadline {
                bail!("envoy did not listen on {port}:\n{}", envoy.log());
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(envoy)
    }

    /// Envoy's admin port on 127.0.0.1.
    pub fn admin(&self) -> u16 {
        self.admin
    }

    /// Everything Envoy logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A counter or gauge from `/stats` (0 when Envoy has not created it).
    pub fn stat(&self, name: &str) -> Result<u64> {
        let (_, body) = http_request(local(self.admin), "GET", &format!("/stats?filter=^{name}$"))?;
        Ok(body
            .lines()
            .find_map(|l| {
                l.strip_prefix(name)?
                    .strip_prefix(": ")?
                    .trim()
                    .parse()
                    .ok()
            })
            .unwrap_or(0))
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
