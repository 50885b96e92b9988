//! dog-agent: applies the firewall the dog operator sends to this node, keeps it in place,
//! repairs drift and reports. See `dog_agent::runtime`.

use clap::Parser;
use dog_agent::config::Config;
use dog_agent::runtime::Agent;
use tracing::Instrument;

/// `--print-keys`: the Host's `spec.keys` for this agent, as YAML.
fn print_keys(cfg: &Config) -> std::process::ExitCode {
    match dog_protocol::keys::AgentKeys::load_or_create(&cfg.state_dir) {
        Ok((keys, _)) => {
            println!(
                "keys:\n  signing: {}\n  encryption: {}",
                keys.signing.public().to_base64(),
                keys.encryption.public().to_base64()
            );
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("dog-agent: agent keys in {}: {e}", cfg.state_dir.display());
            std::process::ExitCode::FAILURE
        }
    }
}

/// `--print-backend`: the iptables backend the agent would use here, detected as at start.
fn print_backend(cfg: &Config) -> std::process::ExitCode {
    match dog_agent::apply::Applier::new(cfg.kernel_config()) {
        Ok(kernel) => {
            println!("{}", kernel.backend().word());
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("dog-agent: cannot detect the iptables backend: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn main() -> std::process::ExitCode {
    // Before any thread allocates: one malloc arena (see `limit_malloc_arenas`).
    dog_agent::runtime::limit_malloc_arenas();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("dog-agent: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    rt.block_on(run())
}

async fn run() -> std::process::ExitCode {
    let cfg = Config::parse();
    if cfg.print_keys {
        return print_keys(&cfg);
    }
    if cfg.print_backend {
        return print_backend(&cfg);
    }
    let host = cfg.resolved_hostname().unwrap_or_else(|_| "?".into());
    dog_protocol::telemetry::init_logging_with(cfg.log_format, &cfg.log_level, &[("host", &host)]);
    let span = tracing::info_span!("agent", host = %host);
    let result = async {
        let (agent, deliveries) = Agent::start(cfg).await?;
        agent.run(deliveries).await
    }
    .instrument(span.clone())
    .await;
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            let _g = span.enter();
            tracing::error!(error = format!("{e:#}"), "dog-agent stopped");
            std::process::ExitCode::FAILURE
        }
    }
}
