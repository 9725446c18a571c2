"""Where registry credentials come from: auth files, credential helpers, the kubelet's config, pushed credentials, and the keychain that orders them."""
