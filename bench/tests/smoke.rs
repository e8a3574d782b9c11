//! The bench harness cannot rot: start the upstream, every path (direct, the agent with
//! and without policy, its inbound listener, HAProxy when installed) and the control-plane
//! simulator, and complete a few requests, bytes and one policy change through each.
//! Nothing here measures or asserts a time.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bulwark_bench::certs::CertScenario;
use bulwark_bench::cpscale::Scenario;
use bulwark_bench::mtls::{self, Variant};
use bulwark_bench::report;
use bulwark_bench::run::{self, Config, PathKind};
use bulwark_bench::sut::{self, Layout};

/// The folder of the workspace's binaries (the one this test's bench binary is in),
/// with the agent and control plane built if `cargo` has not built them yet.
fn bin_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_BIN_EXE_bulwark-bench"))
        .parent()
        .expect("the bench binary is in a folder")
        .to_path_buf();
    let missing = ["bulwark-agent", "bulwark-control-plane"]
        .iter()
        .any(|bin| !dir.join(bin).is_file());
    if missing {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let status = std::process::Command::new(cargo)
            .args([
                "build",
                "-p",
                "bulwark-agent",
                "-p",
                "bulwark-control-plane",
                "--bins",
            ])
            .status()
            .expect("cargo runs");
        assert!(status.success(), "building the agent and control plane");
    }
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_path_starts_and_completes_requests() {
    let logs = tempfile::tempdir().unwrap();
    let layout = Layout {
        bin_dir: bin_dir(),
        log_dir: logs.path().to_path_buf(),
        proxy_cpus: None,
        load_cpus: None,
    };
    let haproxy = sut::haproxy_binary().is_some();
    if !haproxy {
        eprintln!("haproxy is not installed: its row is left out (make bench installs it)");
    }
    let config = Config {
        rates: vec![50, 100],
        duration: Duration::from_millis(300),
        warmup: Duration::from_millis(100),
        saturation: Duration::from_millis(200),
        concurrency: 4,
        h2_connections: 2,
        h2_streams: 2,
        tcp_streams: 2,
        tcp_duration: Duration::from_millis(200),
        services: 3,
        // Two rows: each is run and reported.
        many_services: vec![20, 40],
        haproxy,
        scale: vec![Scenario {
            agents: 30,
            services: 12,
            agents_per_connection: 7,
            // Two replicas: the spread and the sums run in CI too.
            replicas: 2,
        }],
        proxies: true,
        mtls: Some(mtls::Settings {
            rounds: 1,
            connection_rate: 20,
            connection_duration: Duration::from_millis(300),
            connection_concurrency: 2,
        }),
        certs: vec![CertScenario {
            agents: 20,
            concurrency: 4,
        }],
        // Callgrind runs take a minute each: measured by `make bench`, not here (the
        // table and the script's output format have unit tests of their own).
        instructions: false,
    };
    let results = run::run(&layout, &config).await.unwrap();

    let mut kinds: Vec<PathKind> = results.paths.iter().map(|p| p.kind).collect();
    kinds.dedup();
    let mut expected = vec![
        PathKind::Direct,
        PathKind::Agent,
        PathKind::AgentPolicies,
        PathKind::AgentInbound,
        PathKind::AgentManyServices,
    ];
    if haproxy {
        expected.push(PathKind::Haproxy);
    }
    assert_eq!(kinds, expected);
    let many: Vec<&str> = results
        .paths
        .iter()
        .filter(|p| p.kind == PathKind::AgentManyServices)
        .map(|p| p.name.as_str())
        .collect();
    assert_eq!(
        many,
        [
            "agent, no policy, 20 services",
            "agent, no policy, 40 services"
        ]
    );
    for path in &results.paths {
        for protocol in &path.protocols {
            assert_eq!(protocol.rates.len(), 2, "{}", path.name);
            for rate in &protocol.rates {
                assert!(
                    rate.run.ok > 0 && rate.run.errors == 0,
                    "{} {:?} at {}/s: {} ok, {} errors, first: {:?}",
                    path.name,
                    protocol.protocol,
                    rate.rate,
                    rate.run.ok,
                    rate.run.errors,
                    rate.run.first_error
                );
                assert_eq!(rate.cpu.is_some(), path.kind != PathKind::Direct);
                assert_eq!(
                    protocol.saturation_cpu.is_some(),
                    path.kind != PathKind::Direct
                );
            }
            assert!(protocol.saturation.ok > 0, "{} saturation", path.name);
        }
        if path.kind != PathKind::Direct {
            let end = path.end.expect("a proxy's memory is sampled");
            assert!(end.peak_rss_kib > 0, "{}", path.name);
        }
        if let Some(tcp) = &path.tcp {
            assert!(tcp.transfer.bytes > 0, "{} moved no bytes", path.name);
        }
    }
    let tcp_rows = results.paths.iter().filter(|p| p.tcp.is_some()).count();
    assert_eq!(tcp_rows, if haproxy { 3 } else { 2 });

    let [scale] = results.scale.as_slice() else {
        panic!("one control-plane scenario: {:?}", results.scale.len());
    };
    assert_eq!(scale.propagation.len(), 30, "every agent got the change");
    assert!(scale.bytes_per_change > 0);
    assert!(
        scale.acked_at_control_plane.is_some(),
        "the control plane counted every ACK"
    );
    assert!(scale.agents_page_bytes.is_some_and(|b| b > 0));

    let mtls = results.mtls.as_ref().expect("the mTLS row ran");
    assert_eq!(mtls.protocols.len(), 2);
    for rows in &mtls.protocols {
        for (variant, rates, saturation) in &rows.variants {
            for m in rates.iter().chain([saturation]) {
                assert!(
                    m.run.ok > 0 && m.run.errors == 0,
                    "{:?} {variant:?}: {} ok, {} errors, first: {:?}",
                    rows.protocol,
                    m.run.ok,
                    m.run.errors,
                    m.run.first_error
                );
            }
        }
    }
    for (variant, fixed, closed) in &mtls.connections {
        assert!(
            fixed.run.ok > 0 && fixed.run.errors == 0 && closed.run.ok > 0,
            "{variant:?} new connections: {:?}",
            fixed.run.first_error
        );
        // A meshed tunnel is one handshake per connection; a plaintext one, none.
        match variant {
            Variant::Plain => assert_eq!(fixed.handshakes, 0),
            Variant::Mtls => assert!(fixed.handshakes >= fixed.run.ok, "{}", fixed.handshakes),
        }
    }
    let [issued] = results.certs.as_slice() else {
        panic!("one certificate run: {:?}", results.certs.len());
    };
    assert_eq!(
        (issued.issued, issued.errors),
        (20, 0),
        "{:?}",
        issued.first_error
    );

    let table = report::markdown(&results, &config.rates);
    assert!(table.contains("Mutual TLS between two agents"), "{table}");
    assert!(table.contains("Certificates for N agents"), "{table}");
    for path in &results.paths {
        assert!(table.contains(&format!("| {} |", path.name)), "{table}");
    }
    assert!(table.contains("| 30 on 2 replicas | 12 |"), "{table}");
}
