use clap::{Parser, Subcommand};

/// dog-operator: compiles Group/Profile/Zone/Host resources into host firewalls and
/// publishes them to dog agents through RabbitMQ.
#[derive(Parser, Debug)]
#[command(name = "dog-operator", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the CustomResourceDefinitions as YAML (committed under crds/).
    Crdgen(dog_operator::crdgen::CrdgenArgs),
    /// Compile a directory of YAML resources offline and show what one host would run.
    Compile(CompileArgs),
    /// Why a connection to or from a host is accepted or denied: the deciding rule and the
    /// Group or Zone membership behind it, from the same compiled output the agent runs.
    Explain(ExplainArgs),
    /// Run the operator: against the Kubernetes API, or on a directory with --from-dir.
    Run(Box<dog_operator::config::RunArgs>),
    /// Write a new Ed25519 signing key (base64 PKCS#8, mode 0600) and print its public key
    /// line (`key-id base64`) for the agents' operator-public-keys file.
    Keygen(KeygenArgs),
}

#[derive(clap::Args, Debug)]
struct KeygenArgs {
    /// Where to write the private key (refuses to overwrite an existing file).
    #[arg(long, env = "DOG_SIGNING_KEY")]
    out: std::path::PathBuf,
    /// Also write the public key line to this file.
    #[arg(long, env = "DOG_PUBLIC_KEY_OUT")]
    public_out: Option<std::path::PathBuf>,
}

fn keygen(args: KeygenArgs) -> anyhow::Result<()> {
    if args.out.exists() {
        anyhow::bail!(
            "{} exists; refusing to overwrite a signing key",
            args.out.display()
        );
    }
    let public = dog_protocol::keys::write_new_operator_key(&args.out)?;
    let line = format!("{} {}\n", public.fingerprint(), public.to_base64());
    if let Some(p) = &args.public_out {
        std::fs::write(p, &line)?;
    }
    print!("{line}");
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    tracing::info!("shutting down (agents keep their rules)");
}

/// `run` with logging set up first, so that a fatal error is a log line like every other.
async fn run_logged(args: dog_operator::config::RunArgs) -> std::process::ExitCode {
    dog_protocol::telemetry::init_logging(args.log_format, &args.log_level);
    match run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "dog-operator stopped");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: dog_operator::config::RunArgs) -> anyhow::Result<()> {
    use dog_operator::dir::{dir_source, FileStatusSink, LocalRegistrar, StatusFile, STATUS_FILE};
    use dog_operator::runtime::{Parts, Runtime};
    use std::sync::Arc;
    dog_protocol::broker::install_rustls_ring_provider();
    args.firewall
        .check_lockout(args.broker.port())
        .map_err(anyhow::Error::msg)?;
    let metrics = dog_operator::metrics::OperatorMetrics::new()?;
    let health = dog_protocol::telemetry::Health::default();
    health.set_not_ready("starting");
    let addr =
        dog_protocol::telemetry::serve(args.metrics_addr, metrics.registry.clone(), health.clone())
            .await?;
    tracing::info!(%addr, "serving /metrics, /healthz, /readyz");
    let key = dog_protocol::keys::load_operator_key(&args.signing_key).map_err(|e| {
        anyhow::anyhow!(
            "loading the signing key {}: {e}",
            args.signing_key.display()
        )
    })?;
    tracing::info!(key_id = %key.key_id(), "loaded the operator signing key");
    let sealer = dog_protocol::envelope::Sealer::new(args.operator_name.clone(), key);
    let mut broker = args
        .broker
        .config(format!("dog-operator/{}", args.operator_name));
    broker.transient_host_messages = args.transient_host_messages;
    tracing::info!(
        host_queues = if broker.quorum_queues {
            "quorum"
        } else {
            "classic"
        },
        host_messages = if broker.transient_host_messages {
            "transient"
        } else {
            "persistent"
        },
        "broker delivery as configured"
    );
    if broker.transient_host_messages && broker.quorum_queues {
        tracing::warn!(
            "--transient-host-messages (DOG_TRANSIENT_HOST_MESSAGES) applies to classic host queues only; quorum host queues persist every message, so it changes nothing unless the broker refuses quorum queues (see --classic-queues)"
        );
    }
    match args.from_dir.clone() {
        None => {
            dog_operator::kube::run(args, sealer, broker, metrics, health, shutdown_signal()).await
        }
        Some(dir) => {
            let status_path = args
                .status_file
                .clone()
                .unwrap_or_else(|| dir.join(STATUS_FILE));
            let initial = StatusFile::read(&status_path).unwrap_or_default();
            let seed = initial.hosts.clone();
            let sink = FileStatusSink::new(status_path, initial);
            tokio::spawn(sink.clone().flusher(std::time::Duration::from_millis(200)));
            let source = dir_source(
                dir.clone(),
                args.debounce.max(std::time::Duration::from_millis(100)),
                sink.clone(),
            )?;
            let broker_users =
                dog_operator::runtime::broker_users::from_args(&args.management, &broker)?;
            let (link, deliveries) = dog_protocol::broker::OperatorLink::start(broker)?;
            tracing::info!(dir = %dir.display(), "running on a resource directory (local mode)");
            // the only replica there is: always the active one
            metrics.leader.set(1);
            let runtime = Runtime::new(Parts {
                // no Kubernetes, no authority on tokens: admins pin, or --trust-on-first-use
                verifier: None,
                broker_users,
                args,
                sealer: Arc::new(sealer),
                link: link.clone(),
                deliveries,
                source,
                status: sink.clone(),
                events: Arc::new(dog_operator::runtime::sinks::LogEventSink),
                registrar: Arc::new(LocalRegistrar),
                metrics,
                health,
                seed,
            });
            let _ = runtime.run(shutdown_signal()).await;
            link.close();
            sink.flush()?;
            Ok(())
        }
    }
}

#[derive(clap::Args, Debug)]
struct CompileArgs {
    /// Directory of YAML files (Zone, Host, Group, Profile, ConfigMap).
    #[arg(long, env = "DOG_FROM_DIR")]
    from_dir: std::path::PathBuf,
    /// The Host to show.
    #[arg(long, env = "DOG_HOST")]
    host: String,
    /// Show what changes for the host when going from --from-dir to this directory.
    #[arg(long, env = "DOG_DIFF")]
    diff: Option<std::path::PathBuf>,
    #[arg(long, env = "DOG_FORMAT", value_enum, default_value_t = Format::Text)]
    format: Format,
    /// The failsafe and cluster profile the running operator is given (same flags as `run`).
    #[command(flatten)]
    firewall: dog_operator::config::FirewallArgs,
}

#[derive(clap::Args, Debug)]
struct ExplainArgs {
    /// Directory of YAML files (Zone, Host, Group, Profile, ConfigMap); without it, the
    /// resources are read from the Kubernetes API (kubeconfig or in-cluster credentials).
    #[arg(long, env = "DOG_FROM_DIR")]
    from_dir: Option<std::path::PathBuf>,
    /// Status file whose agent-reported interfaces complete the hosts' addresses (default:
    /// `.dog-status.yaml` in the directory, when present).
    #[arg(long, env = "DOG_STATUS_FILE")]
    status_file: Option<std::path::PathBuf>,
    /// The Host whose firewall decides.
    #[arg(long, env = "DOG_HOST")]
    host: String,
    #[arg(long, env = "DOG_DIRECTION", value_enum, default_value = "in")]
    direction: dog_operator::core::explain::Direction,
    /// The other end: the source of inbound traffic, the destination of outbound.
    #[arg(long, env = "DOG_PEER")]
    peer: std::net::IpAddr,
    #[arg(long, env = "DOG_PROTOCOL", value_enum)]
    protocol: dog_operator::core::explain::Proto,
    /// Destination port (tcp, udp, sctp) or ICMP type (icmp, icmpv6).
    #[arg(long, env = "DOG_PORT")]
    port: Option<u16>,
    /// The interface the packet uses (for rules that name one, e.g. the pods' `cni0`).
    #[arg(long, env = "DOG_INTERFACE")]
    interface: Option<String>,
    /// Also check that the host's agent reports running exactly these rules and sets (its
    /// last reported hashes, from the status file).
    #[arg(long, env = "DOG_LIVE")]
    live: bool,
    #[arg(long, env = "DOG_FORMAT", value_enum, default_value_t = Format::Text)]
    format: Format,
    #[command(flatten)]
    firewall: dog_operator::config::FirewallArgs,
}

/// The resources and what the host's agent last reported: from `--from-dir` (and its status
/// file) or from the API server. Returns the snapshot, where it came from, and the reported
/// hashes.
fn explain_input(
    args: &ExplainArgs,
) -> anyhow::Result<(
    dog_operator::core::compile::Snapshot,
    String,
    Option<dog_operator::crd::HashesStatus>,
)> {
    Ok(match &args.from_dir {
        Some(dir) => {
            let (mut snap, errors) = dog_operator::dir::load::load_dir(dir)?;
            for e in &errors {
                eprintln!("warning: {e}");
            }
            let status_path = args
                .status_file
                .clone()
                .unwrap_or_else(|| dir.join(dog_operator::dir::STATUS_FILE));
            let status_file = dog_operator::dir::StatusFile::read(&status_path);
            // what the running operator recorded of each host is what it compiles with
            if let Some(st) = &status_file {
                for name in snap.hosts.keys() {
                    if let Some(reported) = st.hosts.get(name) {
                        snap.facts.insert(
                            name.clone(),
                            dog_operator::core::compile::HostFacts {
                                state: reported.state,
                                interfaces: reported.interfaces.clone(),
                            },
                        );
                    }
                }
            }
            snap.facts_from_status();
            let reported = status_file
                .as_ref()
                .and_then(|st| st.hosts.get(&args.host))
                .and_then(|h| h.reported_hashes.clone());
            (snap, status_path.display().to_string(), reported)
        }
        None => {
            let mut snap = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(async {
                    let client = kube::Client::try_default().await?;
                    anyhow::Ok(dog_operator::kube::listing::snapshot(client).await?)
                })?;
            snap.facts_from_status();
            let reported = snap
                .hosts
                .get(&args.host)
                .and_then(|h| h.status.as_ref())
                .and_then(|s| s.reported_hashes.clone());
            (snap, "the cluster".to_string(), reported)
        }
    })
}

/// `--live`: whether the host's agent reports running exactly `expected`.
fn live_check(
    host: &str,
    expected: &dog_protocol::ruleset::FirewallHashes,
    reported: Option<&dog_operator::crd::HashesStatus>,
    source: &str,
) -> serde_json::Value {
    match reported {
        None => {
            serde_json::json!({"matches": false, "why": format!("no hashes reported by {host}'s agent in {source}")})
        }
        Some(r) => {
            let mut differs = Vec::new();
            if r.ipv4_rules != expected.ipv4_rules {
                differs.push("ipv4_rules");
            }
            if r.ipv6_rules != expected.ipv6_rules {
                differs.push("ipv6_rules");
            }
            if r.sets != expected.sets {
                differs.push("sets");
            }
            serde_json::json!({"matches": differs.is_empty(), "differs": differs})
        }
    }
}

fn run_explain(args: ExplainArgs) -> anyhow::Result<()> {
    use dog_operator::core::compile::setname::{set_name, SetSource};
    use dog_operator::core::explain::{explain, Query};
    use dog_protocol::ruleset::Family;
    args.firewall.cluster().map_err(anyhow::Error::msg)?;
    let (snap, source, reported) = explain_input(&args)?;
    let compiled = dog_operator::core::compile::compile(&snap, &args.firewall.compile_options());
    let Some(fw) = compiled.host_firewall(&args.host) else {
        anyhow::bail!(
            "host `{}` runs no firewall compiled from {source} ({:?})",
            args.host,
            compiled.hosts.get(&args.host)
        );
    };
    let mut names = dog_operator::core::explain::SetNames::new();
    for f in Family::BOTH {
        for g in snap.groups.keys() {
            names.insert(set_name(SetSource::Group, g, f), format!("Group {g}"));
        }
        for z in snap.zones.keys() {
            names.insert(set_name(SetSource::Zone, z, f), format!("Zone {z}"));
        }
    }
    for (p, profile) in &snap.profiles {
        for (dir, word, rules) in [
            ("in", "inbound", &profile.spec.inbound),
            ("out", "outbound", &profile.spec.outbound),
        ] {
            for (idx, rule) in rules.iter().enumerate() {
                let id = dog_operator::core::compile::render::rule_id(rule);
                let name = rule
                    .name
                    .as_ref()
                    .map(|n| format!(" ({n})"))
                    .unwrap_or_default();
                names
                    .entry(format!("dog:{p}:{dir}:{id}"))
                    .or_insert_with(|| format!("Profile {p}: {word} rule {idx}{name}"));
            }
        }
    }
    let q = Query {
        direction: args.direction,
        peer: args.peer,
        protocol: args.protocol,
        port: args.port,
        interface: args.interface.clone(),
    };
    let e = explain(&fw, &q, &names);
    // --live: the verdict holds for the host only if its agent runs exactly this firewall
    let live = args
        .live
        .then(|| live_check(&args.host, &fw.hashes(), reported.as_ref(), &source));
    match args.format {
        Format::Json => {
            let mut v = serde_json::to_value(&e)?;
            if let Some(l) = &live {
                v["live"] = l.clone();
            }
            println!("{}", serde_json::to_string_pretty(&v)?)
        }
        Format::Text => {
            if let Some(l) = &live {
                if l["matches"] == true {
                    println!("live:    the agent reports running exactly these rules and sets");
                } else {
                    println!(
                        "live:    NOT what the host runs now ({}); the verdict is for the desired rules",
                        l.get("why").cloned().unwrap_or_else(|| l["differs"].clone())
                    );
                }
            }
            println!("verdict: {:?}", e.verdict);
            println!("because: {}", e.reason);
            for v in &e.via {
                println!("via:     {v}");
            }
            if !e.rule.is_empty() {
                println!("rule:    {}", e.rule);
            }
            for l in &e.logged {
                println!("logged:  {l}");
            }
            for m in &e.may_match {
                println!("unless:  {m} decides first (it counts connections or rates)");
            }
        }
    }
    Ok(())
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum Format {
    Text,
    Json,
}

fn load(
    dir: &std::path::Path,
    firewall: &dog_operator::config::FirewallArgs,
) -> anyhow::Result<dog_operator::core::compile::Compiled> {
    firewall.cluster().map_err(anyhow::Error::msg)?;
    let (snap, errors) = dog_operator::dir::load::load_dir(dir)?;
    for e in &errors {
        eprintln!("warning: {e}");
    }
    Ok(dog_operator::core::compile::compile(
        &snap,
        &firewall.compile_options(),
    ))
}

fn run_compile(args: CompileArgs) -> anyhow::Result<()> {
    use dog_operator::core::preview;
    let old = load(&args.from_dir, &args.firewall)?;
    let known = |c: &dog_operator::core::compile::Compiled, dir: &std::path::Path| {
        if c.hosts.contains_key(&args.host) {
            Ok(())
        } else {
            Err(anyhow::anyhow!(
                "host `{}` is not defined in {}",
                args.host,
                dir.display()
            ))
        }
    };
    match &args.diff {
        None => {
            known(&old, &args.from_dir)?;
            match args.format {
                Format::Text => {
                    print!(
                        "{}",
                        preview::host_text(&old, &args.host).unwrap_or_default()
                    )
                }
                Format::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&preview::host_json(&old, &args.host))?
                ),
            }
        }
        Some(dir) => {
            let new = load(dir, &args.firewall)?;
            if known(&old, &args.from_dir).is_err() {
                known(&new, dir)?;
            }
            match args.format {
                Format::Text => print!("{}", preview::host_diff(&old, &new, &args.host)),
                Format::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "old": preview::host_json(&old, &args.host),
                        "new": preview::host_json(&new, &args.host),
                        "diff": preview::host_diff(&old, &new, &args.host),
                    }))?
                ),
            }
        }
    }
    Ok(())
}

fn main() -> anyhow::Result<std::process::ExitCode> {
    let cli = Cli::parse();
    let ok = |r: anyhow::Result<()>| r.map(|()| std::process::ExitCode::SUCCESS);
    match cli.command {
        Command::Crdgen(args) => ok(dog_operator::crdgen::run(&args).map_err(Into::into)),
        Command::Compile(args) => ok(run_compile(args)),
        Command::Explain(args) => ok(run_explain(args)),
        Command::Keygen(args) => ok(keygen(args)),
        Command::Run(args) => Ok(tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(run_logged(*args))),
    }
}
