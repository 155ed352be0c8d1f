//! The `restock-notifier` binary: parse config, init tracing, build the app, run until
//! stopped.

use clap::Parser as _;
use restock_notifier::config::Config;
use restock_notifier::startup::{Application, shutdown_signal};
use restock_notifier::telemetry;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    let _telemetry = telemetry::init(&config)?;
    let stop = shutdown_signal()?;
    let app = Application::build(config).await?;
    tracing::info!(addr = %app.local_addr(), "listening");
    app.run_until_stopped(stop).await
}
