"""Client agent: runs on the machine being installed (WinPE or a Linux live/PXE system).

Portable by construction: imports only the standard library, :mod:`mcproto`
(pydantic + msgpack) and nothing Linux-only; Linux fast paths sit behind
run-time checks with portable fallbacks.  Never holds broker credentials:
it speaks only to its DP over the session plane.
"""
