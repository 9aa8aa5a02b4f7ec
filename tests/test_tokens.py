"""The coordinator's random tokens: secret-sized, never repeated, drawn without letting go of the GIL."""

from __future__ import annotations

import os
import re
import secrets

from cis490fleet import tokens
from conftest import keeps_the_gil


def test_a_token_is_hex_of_the_asked_size_and_never_repeats():
    drawn = [tokens.token_hex(16) for _ in range(10_000)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", t) for t in drawn)
    assert len(set(drawn)) == len(drawn)
    assert re.fullmatch(r"[0-9a-f]{16}", tokens.token_hex(8))


def test_drawing_a_token_keeps_the_gil_where_secrets_lets_go():
    assert keeps_the_gil(lambda: tokens.token_hex(16))
    assert not keeps_the_gil(lambda: secrets.token_hex(16)), "the check itself must see a call that lets go"


def test_a_forked_child_draws_other_tokens_than_its_parent():
    tokens.token_hex(16)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(write, tokens.token_hex(16).encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.waitpid(pid, 0)
    assert child != tokens.token_hex(16)
