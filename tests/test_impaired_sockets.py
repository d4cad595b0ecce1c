"""The transport on real sockets against a bad network: loss, bursts, reordering, duplication, corruption.

Real multicast on 127.0.0.1 (TTL 1) between real processes (`mcdeploy send` / `mcdeploy receive`);
each receiver damages what arrives with the client's TEST FEATURE impairment knob (these machines
have no netem).  Every receiver must end bit-exact.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.test_standalone import Procs, finish, free_port, last_json, mcdeploy, procs  # noqa: F401

pytestmark = pytest.mark.integration

IMPAIRMENTS = {
    "clean": "",
    "loss1": "loss=1",
    "loss5": "loss=5",
    "loss10": "loss=10",
    "burst1": "burst=0.125:8",  # about 1 % of packets lost, in bursts of 8 on average
    "reorder25": "reorder=25",
    "dup5": "dup=5",
    "corrupt1": "corrupt=1",
}


@pytest.mark.timeout(120)
def test_every_impaired_receiver_ends_bit_exact(procs: Procs, tmp_path: Path) -> None:  # noqa: F811
    image = tmp_path / "image.bin"
    image.write_bytes(os.urandom(6 * 1024 * 1024))
    port = free_port()
    sender = procs.start(mcdeploy("send", str(image), "--port", str(port), "--control-port", "0",
                                  "--min-receivers", str(len(IMPAIRMENTS)), "--rate", "400", "--json"))
    receivers = {}
    for i, (name, spec) in enumerate(IMPAIRMENTS.items()):
        args = ["receive", "--out", str(tmp_path / name), "--port", str(port), "--id", name, "--json",
                "--wait", "30", "--test-seed", str(i)]
        if spec:
            args += ["--test-impair", spec]
        receivers[name] = procs.start(mcdeploy(*args))
    results = {name: finish(p, 90) for name, p in receivers.items()}
    code, out, err = finish(sender, 30)
    original = image.read_bytes()
    for name, (rc, rout, rerr) in results.items():
        assert rc == 0, (name, rerr)
        res = last_json(rout)
        assert res["verified"] and res["acknowledged"], (name, res)
        assert (tmp_path / name).read_bytes() == original, name
        if name == "corrupt1":
            assert res["rejected"] > 0, res  # damaged packets were caught by the checksum, never written
        if name.startswith(("loss", "burst")):
            assert res["test_dropped"] > 0, res
        if name == "dup5":
            assert res["duplicates"] > 0, res
    assert code == 0, err
    summary = last_json(out)
    assert summary["done"] == len(IMPAIRMENTS)
