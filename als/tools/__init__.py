"""Image tooling beside the store: convert, optimize, the registry and OCI-layout transports, an isolated Podman."""
