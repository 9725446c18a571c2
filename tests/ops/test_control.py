import os
import stat

import pytest

from als.ops.control import ControlError, ControlServer, request, socket_path


def test_request_answer_and_errors(tmp_path):
    server = ControlServer(socket_path(tmp_path), {"echo": lambda req: req["x"] * 2,
                                                   "boom": lambda req: 1 / 0}).start()
    try:
        assert stat.S_IMODE(os.stat(socket_path(tmp_path)).st_mode) == 0o600
        assert request(tmp_path, "echo", x=21) == 42
        with pytest.raises(ControlError, match="unknown operation 'nope'"):
            request(tmp_path, "nope")
        with pytest.raises(ControlError, match="division by zero"):
            request(tmp_path, "boom")
    finally:
        server.close()
    assert not socket_path(tmp_path).exists()
    with pytest.raises(ControlError, match="cannot reach the store"):
        request(tmp_path, "echo", x=1)


def test_the_daemon_answers_on_its_socket(store):
    assert request(store.root, "ping") == "pong"
