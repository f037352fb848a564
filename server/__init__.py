"""HTTP front end (installed as mlxrun.server)."""
