"""Running the store: daemon wiring, control socket, status, metrics, readiness notification, logs."""
