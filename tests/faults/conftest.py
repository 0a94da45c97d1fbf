from __future__ import annotations

import pytest

from .saving import unregister_plugin


@pytest.fixture(autouse=True)
def _plugin_registered_for_one_test():
    """`saving.build` registers the in-test plugin; take it off after each test so that other
    test folders can register their own."""
    yield
    unregister_plugin()


@pytest.fixture(scope="module")
def fork_server():
    """A fresh single-threaded interpreter that forks the saving processes (see
    `saving.ForkServer`)."""
    import os

    from .saving import ForkServer

    if not hasattr(os, "fork"):
        pytest.skip("needs os.fork (POSIX)")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    server = ForkServer(root)
    yield server
    server.close()
