"""DP agent: a Celery worker per distribution point that runs multicast sessions.

Server side.  Consumes queue ``dp.<name>``; owns the UDP control port clients
join on (:mod:`dpagent.host`), runs one sender per session
(:mod:`dpagent.session`) and relays client results to the controller
(:mod:`dpagent.relay`).
"""
