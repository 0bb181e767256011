//! Integration tests: real nats-server, real binaries, real folders.
