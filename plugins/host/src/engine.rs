//! The one wasmtime engine of a host, and the clock that interrupts guests.

use std::sync::OnceLock;
use std::time::Duration;
use wasmtime::{Config, Engine, OptLevel};

/// How often running guests check their deadline and cancellation.
pub(crate) const TICK: Duration = Duration::from_millis(5);

/// The process-wide engine. Epoch interruption is how time limits and
/// cancellation reach a guest that never calls the host: a background thread
/// bumps the epoch every tick, and each store's callback decides.
pub(crate) fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let mut config = Config::new();
        config
            .epoch_interruption(true)
            .parallel_compilation(true)
            .cranelift_opt_level(OptLevel::Speed);
        let engine =
            Engine::new(&config).expect("the plugin engine's fixed configuration is valid");
        let weak = engine.weak();
        let started = std::thread::Builder::new()
            .name("pixart-plugin-epoch".into())
            .spawn(move || {
                while let Some(engine) = weak.upgrade() {
                    engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(TICK);
                }
            });
        if let Err(e) = started {
            tracing::error!(
                "cannot start the plugin clock thread ({e}): plugin time limits are off"
            );
        }
        engine
    })
}
