"""Settings every latentd process reads (LATENTD_* environment); the API, the worker and the CLI
all depend on this package, and it on none of them."""
