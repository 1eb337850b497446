"""The session's real Mooncake Store on 127.0.0.1 for the tests (see
:mod:`evicpress_sglang.tiers.mooncake_local`), started once per session; a test that kills
one starts its own with :func:`mooncake_server`.

Missing Mooncake is a test *failure* with the install commands, never a skip: CI installs
it (``pip install -e '.[test]'`` and ``.ci/run``'s apt line), so a missing piece there is
a broken setup that must be seen.
"""

from __future__ import annotations

import os
from typing import Iterator

import pytest

from evicpress_sglang.tiers import TierError
from evicpress_sglang.tiers.mooncake_local import LOOPBACK, MooncakeServer, mooncake_server, require_mooncake

__all__ = ["LOOPBACK", "mooncake_server", "mooncake_store"]


@pytest.fixture(scope="session")
def mooncake_store(tmp_path_factory) -> Iterator[MooncakeServer]:
    """One store for the session's remote-tier tests."""
    # The transfer engine advertises this address to its peers (the tier sets it too; being
    # explicit keeps a value inherited from the environment from sending tests elsewhere).
    previous = os.environ.get("MC_TCP_BIND_ADDRESS")
    os.environ["MC_TCP_BIND_ADDRESS"] = LOOPBACK
    try:
        try:
            require_mooncake()
        except TierError as e:
            pytest.fail(str(e), pytrace=False)
        with mooncake_server(tmp_path_factory.mktemp("mooncake")) as server:
            yield server
    finally:
        if previous is None:
            os.environ.pop("MC_TCP_BIND_ADDRESS", None)
        else:
            os.environ["MC_TCP_BIND_ADDRESS"] = previous
