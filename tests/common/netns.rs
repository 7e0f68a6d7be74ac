//! A network namespace joined to the test's by a veth pair (`ip netns`; needs root:
//! CAP_NET_ADMIN, CAP_SYS_ADMIN), for clients that must not share the server's loopback.

use std::os::fd::AsRawFd;
use std::process::Command;

/// A network namespace joined to ours by a veth pair `10.213.<n>.1/24 (ours) <-> .2 (its)`.
pub struct NetNs {
    pub name: String,
    pub inner_if: String,
    pub subnet: u8,
}

pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("`ip` (iproute2; .ci/setup.sh installs it)");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

impl NetNs {
    pub fn create() -> NetNs {
        let tag = format!("{:06x}", rand::random::<u32>() & 0xff_ffff);
        let subnet = 1 + rand::random::<u8>() % 250;
        let (name, outer, inner) = (format!("kt-{tag}"), format!("kt{tag}o"), format!("kt{tag}i"));
        ip(&["netns", "add", &name]);
        let ns = NetNs { name: name.clone(), inner_if: inner.clone(), subnet };
        ip(&["link", "add", &outer, "type", "veth", "peer", "name", &inner]);
        ip(&["link", "set", &inner, "netns", &name]);
        ip(&["addr", "add", &format!("10.213.{subnet}.1/24"), "dev", &outer]);
        ip(&["link", "set", &outer, "up"]);
        ns.exec(&["addr", "add", &format!("10.213.{subnet}.2/24"), "dev", &inner]);
        ns.exec(&["link", "set", &inner, "up"]);
        ns
    }

    pub fn exec(&self, args: &[&str]) {
        let mut all = vec!["netns", "exec", &self.name, "ip"];
        all.extend_from_slice(args);
        ip(&all);
    }

    pub fn addr(&self, host: u8) -> String {
        format!("10.213.{}.{host}", self.subnet)
    }

    /// A single-threaded runtime whose thread lives in this namespace: sockets made by tasks on
    /// it (the client's HTTP and WebRTC sockets) belong to the namespace.
    pub fn runtime(&self) -> tokio::runtime::Handle {
        let path = format!("/var/run/netns/{}", self.name);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).expect("netns file");
            // SAFETY: setns on this thread only, with a namespace file we opened.
            assert_eq!(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) }, 0, "setns");
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            tx.send(rt.handle().clone()).unwrap();
            rt.block_on(std::future::pending::<()>());
        });
        rx.recv().unwrap()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace deletes its veth end, and with it the pair.
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// A fresh namespace and a test server on the host end of its veth (`addr(1)`) that takes the
/// API key `api_key`: (namespace, server address, server).
pub async fn server_on_veth(api_key: &str) -> (NetNs, String, super::TestServer) {
    let ns = NetNs::create();
    let server_ip = ns.addr(1);
    let key = api_key.to_owned();
    let ts = super::TestServer::start_with(|c| {
        c.bind = format!("{server_ip}:0").parse().unwrap();
        c.api_keys = vec![key];
    })
    .await;
    (ns, server_ip, ts)
}
