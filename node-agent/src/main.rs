//! dog-agent: applies the firewall the dog operator sends to this node, keeps it in place,
//! repairs drift and reports. See `dog_agent::runtime`.

use clap::Parser;
use dog_agent::config::Config;
use dog_agent::runtime::Agent;
use tracing::Instrument;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cfg = Config::parse();
    dog_protocol::telemetry::init_logging(cfg.log_format);
    let host = cfg.resolved_hostname().unwrap_or_else(|_| "?".into());
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
