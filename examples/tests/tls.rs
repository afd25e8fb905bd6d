//! opamp-supervisor and opamp-agent as processes over TLS: with fleet tokens,
//! and with mTLS where the device id is the certificate's Common Name. The
//! supervisors run on memory backends; the agent's log says when it holds a
//! session and the supervisor's stats line counts it.

use std::path::PathBuf;

mod common;
use common::Proc;

/// A CA, and certificates it signs for `localhost`, written as PEM files into a directory of the test's own.
struct Pki {
    dir: PathBuf,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl Pki {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("opamp-examples-tls-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "opamp test CA");
        let key = rcgen::KeyPair::generate().unwrap();
        std::fs::write(dir.join("ca.pem"), params.self_signed(&key).unwrap().pem()).unwrap();
        Pki {
            dir,
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    fn ca(&self) -> String {
        self.path("ca.pem")
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    /// Writes `{name}.pem` and `{name}.key` for `common_name`; returns their paths.
    fn issue(&self, name: &str, common_name: &str) -> (String, String) {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, common_name);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (cert_path, key_path) = (self.path(&format!("{name}.pem")), self.path(&format!("{name}.key")));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert_path, key_path)
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|arg| (*arg).to_owned()).collect()
}

/// Starts a supervisor with `supervisor_args` and an agent for `device` with
/// `agent_args` (the server URL is added), waits until the agent holds a
/// session that the supervisor counts, and stops both gracefully.
async fn connects(supervisor_args: &[&str], device: &str, agent_args: &[&str], fleet_key: Option<&str>) {
    let mut args = strings(&["--id", "s-tls", "--listen", "127.0.0.1:0", "--stats-interval", "100ms"]);
    args.extend(strings(supervisor_args));
    let mut supervisor = Proc::spawn(
        "opamp-supervisor",
        env!("CARGO_BIN_EXE_opamp-supervisor"),
        &args,
        fleet_key,
    );
    let line = supervisor.first_line().await;
    let port = line
        .rsplit_once(':')
        .map(|(_, port)| port.to_owned())
        .unwrap_or_else(|| panic!("expected `listening ADDR`, got {line:?}"));

    // The certificates name `localhost`, so the agent connects by that name.
    let url = format!("https://localhost:{port}");
    let mut args = strings(&["--server", &url, "--device", device, "--applier", "memory"]);
    args.extend(strings(agent_args));
    let mut agent = Proc::spawn("opamp-agent", env!("CARGO_BIN_EXE_opamp-agent"), &args, fleet_key);
    agent.wait_for_log("connected=true").await;
    supervisor.wait_for_log("connected_devices=1").await;
    agent.terminate().await;
    supervisor.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_connects_over_tls_with_a_fleet_token() {
    let pki = Pki::new();
    let (cert, key) = pki.issue("server", "supervisor");
    let fleet_key = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
    connects(
        &["--tls-cert", &cert, "--tls-key", &key],
        "t1",
        &["--tls-ca", &pki.ca()],
        Some(fleet_key),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_connects_over_mtls_as_the_device_its_certificate_names() {
    let pki = Pki::new();
    let (cert, key) = pki.issue("server", "supervisor");
    let (device_cert, device_key) = pki.issue("m1", "m1");
    connects(
        &[
            "--auth",
            "client-cert",
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--tls-client-ca",
            &pki.ca(),
        ],
        "m1",
        &[
            "--tls-ca",
            &pki.ca(),
            "--tls-cert",
            &device_cert,
            "--tls-key",
            &device_key,
        ],
        None,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opamp_agents_connect_over_wss_and_a_renewed_certificate_is_served_after_sighup() {
    let pki = Pki::new();
    let (cert, key) = pki.issue("server", "supervisor");
    let fleet_key = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
    let args = strings(&[
        "--id",
        "s-tls",
        "--listen",
        "127.0.0.1:0",
        "--opamp-listen",
        "127.0.0.1:0",
        "--stats-interval",
        "100ms",
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
    ]);
    let mut supervisor = Proc::spawn(
        "opamp-supervisor",
        env!("CARGO_BIN_EXE_opamp-supervisor"),
        &args,
        Some(fleet_key),
    );
    let line = supervisor.first_line().await;
    let (grpc_port, opamp_port) = match line.split(' ').collect::<Vec<_>>().as_slice() {
        ["listening", grpc, "opamp", opamp, ..] => (
            grpc.rsplit_once(':').unwrap().1.to_owned(),
            opamp.rsplit_once(':').unwrap().1.to_owned(),
        ),
        _ => panic!("expected `listening ADDR opamp ADDR`, got {line:?}"),
    };
    let agent = |device: &str, url: String, ca: String| {
        let args = strings(&[
            "--server",
            &url,
            "--device",
            device,
            "--applier",
            "memory",
            "--tls-ca",
            &ca,
        ]);
        Proc::spawn("opamp-agent", env!("CARGO_BIN_EXE_opamp-agent"), &args, Some(fleet_key))
    };
    let wss = format!("wss://localhost:{opamp_port}/v1/opamp");
    let first = agent("w1", wss.clone(), pki.ca());
    first.wait_for_log("connected=true").await;
    supervisor.wait_for_log("connected_devices=1").await;

    // The operator renews the certificate (another CA here, so that only
    // the renewed one satisfies the next agents) and sends SIGHUP.
    let renewed = Pki::new();
    let (new_cert, new_key) = renewed.issue("server", "supervisor");
    std::fs::copy(&new_cert, &cert).unwrap();
    std::fs::copy(&new_key, &key).unwrap();
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &supervisor.pid().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    supervisor.wait_for_log("TLS certificate reloaded").await;
    let second = agent("w2", wss, renewed.ca());
    second.wait_for_log("connected=true").await;
    let third = agent("g3", format!("https://localhost:{grpc_port}"), renewed.ca());
    third.wait_for_log("connected=true").await;
    supervisor.wait_for_log("connected_devices=3").await;
    supervisor.terminate().await;
}

/// One HTTPS request to `port` on `localhost`, trusting `ca_pem`: the answer's status line.
async fn https_status(port: &str, ca_pem: &[u8], path: &str) -> std::io::Result<String> {
    use rustls_pki_types::pem::PemObject as _;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config =
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(format!("127.0.0.1:{port}")).await?;
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await?;
    tls.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut answer = Vec::new();
    tls.read_to_end(&mut answer).await?;
    let answer = String::from_utf8_lossy(&answer);
    Ok(answer.lines().next().unwrap_or_default().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opamp_server_serves_its_api_over_https_and_reloads_on_sighup() {
    let pki = Pki::new();
    let (cert, key) = pki.issue("server", "opamp-server");
    let fleet_key = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
    let args = strings(&[
        "--listen",
        "127.0.0.1:0",
        "--grpc-listen",
        "127.0.0.1:0",
        "--opamp-listen",
        "127.0.0.1:0",
        "--tokens",
        "ops:operator:an-operator-secret-for-tests",
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
    ]);
    let mut server = Proc::spawn(
        "opamp-server",
        env!("CARGO_BIN_EXE_opamp-server"),
        &args,
        Some(fleet_key),
    );
    let line = server.first_line().await;
    let ports: Vec<String> = line
        .split(' ')
        .filter_map(|part| part.rsplit_once(':').map(|(_, port)| port.to_owned()))
        .collect();
    let [api, _grpc, opamp] = ports.as_slice() else {
        panic!("expected `listening ADDR grpc ADDR opamp ADDR`, got {line:?}");
    };
    let ca = std::fs::read(pki.ca()).unwrap();
    assert_eq!(https_status(api, &ca, "/health/live").await.unwrap(), "HTTP/1.1 200 OK");
    // The supervisor in the process serves OpAMP over TLS from the same files.
    let agent_args = strings(&[
        "--server",
        &format!("wss://localhost:{opamp}/v1/opamp"),
        "--device",
        "w1",
        "--applier",
        "memory",
        "--tls-ca",
        &pki.ca(),
    ]);
    let agent = Proc::spawn(
        "opamp-agent",
        env!("CARGO_BIN_EXE_opamp-agent"),
        &agent_args,
        Some(fleet_key),
    );
    agent.wait_for_log("connected=true").await;

    // Renewed under another CA, then SIGHUP: the API serves the new one.
    let renewed = Pki::new();
    let (new_cert, new_key) = renewed.issue("server", "opamp-server");
    std::fs::copy(&new_cert, &cert).unwrap();
    std::fs::copy(&new_key, &key).unwrap();
    let renewed_ca = std::fs::read(renewed.ca()).unwrap();
    assert!(https_status(api, &renewed_ca, "/health/live").await.is_err());
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &server.pid().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    server.wait_for_log("TLS certificate reloaded").await;
    assert_eq!(
        https_status(api, &renewed_ca, "/health/live").await.unwrap(),
        "HTTP/1.1 200 OK"
    );
    server.terminate().await;
}
