"""The checkpoint reader's small parts: the one ``--set`` parser and the quiet reads.

The reader end to end (resume, evaluate, convert, analysis) is tested where it is used:
test_train_reliability.py (a corrupt newest step, counted stderr lines), test_train_resume.py,
test_convert_deploy.py, test_analysis.py, test_transfer.py.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from halluvit_jax.checkpoint.io import quiet_reads
from halluvit_jax.cli import UsageError, parse_set, parse_value


def test_set_values_are_python_literals_then_json_words_then_strings():
    got = parse_set(["depth=4", "drop_path_rate=0.1", "depths=(1,1,1,1)", "hal_variant=chh", "qkv_bias=True",
                     "deploy=false", "img_size=null", "name='ihh'", " mlp_ratio = 2.5 ", "mean=[0.5, 0.5, 0.5]"])
    assert got == {"depth": 4, "drop_path_rate": 0.1, "depths": (1, 1, 1, 1), "hal_variant": "chh",
                   "qkv_bias": True, "deploy": False, "img_size": None, "name": "ihh", "mlp_ratio": 2.5,
                   "mean": [0.5, 0.5, 0.5]}
    assert parse_set(["depth=2", "depth=3"]) == {"depth": 3}  # the later wins
    assert parse_value("a=b") == "a=b" and parse_value("") == ""
    for bad in ("depth", "=4"):
        with pytest.raises(UsageError, match="write FIELD=VALUE"):
            parse_set([bad])


def _cancelled_read_that_fails():
    """What orbax's asyncio.run leaves when one read fails: a task that, cancelled at shutdown,
    raises; asyncio reports it through its logger ("unhandled exception during asyncio.run()
    shutdown")."""
    async def read():
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            raise ValueError("Truncated Zstd-compressed stream") from None

    async def main():
        asyncio.get_running_loop().create_task(read())
        await asyncio.sleep(0)

    asyncio.run(main())


def test_quiet_reads_hold_back_the_report_of_cancelled_reads(capfd):
    asyncio_logger = logging.getLogger("asyncio")
    handler = logging.StreamHandler()  # stderr, as logging's last resort would
    asyncio_logger.addHandler(handler)
    try:
        _cancelled_read_that_fails()
        noisy = capfd.readouterr().err
        with quiet_reads():
            _cancelled_read_that_fails()
        quiet = capfd.readouterr().err
    finally:
        asyncio_logger.removeHandler(handler)
    assert "unhandled exception during asyncio.run() shutdown" in noisy and "Truncated Zstd" in noisy
    assert quiet == ""
    assert asyncio_logger.filters == []  # nothing is left behind
