"""`mlxrun doctor`: request shapes of real clients checked against a running server."""
