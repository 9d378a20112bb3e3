"""The long-running parts: worker, HTTP server, process assembly and supervision."""
