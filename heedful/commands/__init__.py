"""CLI commands beyond simulate/fit/demo: each module here defines ``register(app)`` (typer)."""
