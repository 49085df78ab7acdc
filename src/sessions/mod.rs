//! Per-session protocol handlers (shell, file transfer, port forward, mender-client).
