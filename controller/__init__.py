"""Controller: the site server.  Source of truth for images, DPs, deployments and results.

Server side.  Its worker consumes queue ``controller``; its CLI (``mcdeploy``)
is the operator's tool.
"""
