//! A real coturn (Debian's `turnserver`, installed by `.ci/setup.sh`) started by a test on loopback
//! with `turn-config/turnserver.test.conf`, on free ports, killed on drop.

use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running coturn.
pub struct Coturn {
    child: Child,
    /// Its STUN/TURN UDP address.
    pub addr: SocketAddr,
    /// Its log file.
    pub log: PathBuf,
}

impl Coturn {
    /// Start coturn with the test config, `secrets` as `static-auth-secret` lines and `extra`
    /// options (e.g. `denied-peer-ip=...`) appended to a copy of the config.
    pub fn start(secrets: &[&str], extra: &[String]) -> Coturn {
        let dir = super::temp_dir("coturn");
        let conf = dir.join("turnserver.conf");
        let base = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/turn-config/turnserver.test.conf"))
            .expect("turn-config/turnserver.test.conf");
        std::fs::write(&conf, format!("{base}\n{}\n", extra.join("\n"))).unwrap();
        let port = free_udp_port();
        // A relay range of its own per test process (coturn binds them lazily).
        let relay_min = 20_000 + (rand::random::<u16>() % 400) * 100;
        let log = dir.join("turn.log");
        let mut cmd = Command::new("turnserver");
        cmd.arg("-c")
            .arg(&conf)
            .args(["--listening-port", &port.to_string()])
            .args(["--min-port", &relay_min.to_string(), "--max-port", &(relay_min + 99).to_string()])
            .arg("--log-file")
            .arg(&log)
            .arg("--db")
            .arg(dir.join("turndb"))
            .arg("--pidfile")
            .arg(dir.join("turnserver.pid"))
            .arg("--no-stdout-log")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        for s in secrets {
            cmd.args(["--static-auth-secret", s]);
        }
        let child = cmd.spawn().expect("turnserver (Debian package coturn; .ci/setup.sh installs it)");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let coturn = Coturn { child, addr, log };
        coturn.wait_ready();
        coturn
    }

    /// `turn:127.0.0.1:<port>?transport=udp`.
    pub fn turn_url(&self) -> String {
        format!("turn:{}?transport=udp", self.addr)
    }

    /// Everything coturn logged so far (its `--log-file` gets a date suffix).
    pub fn log_text(&self) -> String {
        let dir = self.log.parent().unwrap();
        let mut text = String::new();
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            if entry.file_name().to_string_lossy().starts_with("turn")
                && entry.path().extension().is_some_and(|e| e == "log")
            {
                text.push_str(&std::fs::read_to_string(entry.path()).unwrap_or_default());
            }
        }
        text
    }

    /// Wait until coturn answers a STUN Binding request (RFC 5389 §6).
    fn wait_ready(&self) {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let mut request = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42];
        request.extend_from_slice(&rand::random::<[u8; 12]>());
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut buf = [0u8; 512];
        while Instant::now() < deadline {
            let _ = socket.send_to(&request, self.addr);
            if let Ok((n, _)) = socket.recv_from(&mut buf)
                && n >= 20
                && buf[0..2] == [0x01, 0x01]
            {
                return;
            }
        }
        panic!("coturn did not answer STUN on {}; log:\n{}", self.addr, self.log_text());
    }
}

impl Drop for Coturn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_udp_port() -> u16 {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.local_addr().unwrap().port()
}

/// `denied-peer-ip=...` lines of the production `turn-config/turnserver.conf`.
pub fn production_denied_peer_ips() -> Vec<String> {
    let conf = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/turn-config/turnserver.conf")).unwrap();
    conf.lines().map(str::trim).filter(|l| l.starts_with("denied-peer-ip=")).map(str::to_owned).collect()
}
