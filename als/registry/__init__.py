"""The registry client: registries.conf, credentials, and the OCI distribution API spoken to pull (and push) images lazily."""
