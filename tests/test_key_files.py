"""Key files serve reads: a key others can read is warned about; enroll's 0640 root:group layout is not."""

from __future__ import annotations

import logging
import os

import pytest

from cis490fleet import auth

KEY = "ab" * 32 + "\n"


@pytest.mark.skipif(os.name == "nt", reason="POSIX modes")
@pytest.mark.parametrize("mode, warned", [(0o600, False), (0o640, False), (0o644, True), (0o660, True)])
def test_a_key_others_may_read_or_change_is_warned_about(tmp_path, caplog, mode, warned):
    path = tmp_path / "cluster.key"
    path.write_text(KEY)
    path.chmod(mode)
    with caplog.at_level(logging.WARNING, logger="cis490fleet.auth"):
        assert auth.load_or_create_key(str(path), "cluster key") == bytes.fromhex("ab" * 32)
    assert any("others may read or change it" in r.getMessage() for r in caplog.records) is warned
