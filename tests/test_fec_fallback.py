"""Without the rs16 library (no wheel for Python 3.13+), everything falls back to zfec and says so clearly."""

from __future__ import annotations

import subprocess
import sys

PROBE = r"""
import sys
sys.modules["reed_solomon_leopard"] = None  # as on a Python with no wheel for it
from mcproto import fec
from mcsite.settings import DPSettings
import controller.standalone  # the send/receive tools still import
d = DPSettings()
assert fec.DEFAULT_FEC == "rs" and d.fec == "rs" and d.block_symbols == 128, (fec.DEFAULT_FEC, d.fec)
try:
    fec.layout_for("rs16", 10_000, 1000, 8)
except ValueError as exc:
    print("refused:", exc)
"""


def test_without_the_rs16_library_defaults_fall_back_to_zfec_and_rs16_is_refused_clearly() -> None:
    res = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "refused: fec rs16 needs the reed-solomon-leopard package" in res.stdout
