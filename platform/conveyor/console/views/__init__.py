"""The console's pages, one module per subject; each exposes ``routes(site, ...)``."""
