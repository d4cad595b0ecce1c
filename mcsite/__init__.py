"""Server-side shared glue for controller and DP agents (not imported by the client)."""
