//! The usual start of a daemon test: private bus, stand-in auth, plain
//! stand-in server, the daemon, and its first connection.

use crate::{AuthService, ConnHandle, Daemon, DbusDaemon, Server, TIMEOUT};

/// Everything a connected daemon test holds. Drop in field order: the
/// connection handle and the daemon before the peers they talk to.
pub struct Connected {
    /// The daemon's websocket as the server sees it.
    pub conn: ConnHandle,
    /// The daemon under test.
    pub daemon: Daemon,
    /// The stand-in server.
    pub server: Server,
    /// The stand-in auth service (token `token`).
    pub auth: AuthService,
    /// The private D-Bus.
    pub bus: DbusDaemon,
}

/// Starts the daemon with `config` and `env`, authorised with `token`, and
/// waits for its connection (dumping its log and panicking if none comes).
pub fn connected(config: &str, env: &[(&str, &str)], token: &str) -> Connected {
    let bus = DbusDaemon::start();
    let server = Server::start_plain();
    let auth = AuthService::start(bus.address(), token, &server.url());
    let daemon = Daemon::spawn(config, bus.address(), env);
    let Some(conn) = server.wait_connection(TIMEOUT) else {
        daemon.dump_log();
        panic!("daemon never connected");
    };
    Connected {
        conn,
        daemon,
        server,
        auth,
        bus,
    }
}
