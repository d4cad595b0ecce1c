"""Pure shared core of mcdeploy: message models, codec, packet formats and the
sans-I/O sender/receiver state machines.

Pure: no sockets, no clock, no Celery, no Redis.  Everything here is importable
on the client (WinPE) and is driven by bytes and ``now`` passed in by adapters.
"""

PROTOCOL_VERSION = 1
