"""The replicated group's membership over HTTP: add, remove and replace a peer (operator only).

Shell (registered through ``http_api.EXTENSIONS``). Each route checks its input,
then asks the Replicator to propose one single-server change (``raft.py``: a new
peer joins as a learner and the leader promotes it once it has caught up; a
replacement removes the old peer after that) and answers once the change is
committed. A follower forwards these requests to the leader like every write.
Never changes the membership of a coordinator that runs alone: that one has no
group to change.
"""

from __future__ import annotations

import urllib.parse

from cis490fleet import errors
from cis490fleet.model import HOST_ID_RE


def _replicator(req):
    replicator = getattr(req.app, "replicator", None)
    if replicator is None:
        raise errors.BadRequest("this coordinator runs alone, with no replicated group to change: start every "
                                "peer with serve --node-id ID --peer ID=URL ... (one --peer per member)")
    return replicator


def _peer_id(value: object, field: str) -> str:
    if not isinstance(value, str) or not HOST_ID_RE.match(value):
        raise errors.BadRequest(f"{field!r} must be a peer id (letters, digits, '.', '_' or '-'), got {value!r}")
    return value


def _peer_url(value: object) -> str:
    parts = urllib.parse.urlsplit(value) if isinstance(value, str) and len(value) <= 300 else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise errors.BadRequest(f"'url' must be the new peer's http(s) URL, e.g. https://coord-d.lab:8445; "
                                f"got {value!r}")
    return value.rstrip("/")


def _body(req) -> dict:
    body = req.json()
    if not isinstance(body, dict):
        raise errors.BadRequest('expected a JSON object like {"id": "d", "url": "https://coord-d.lab:8445"}')
    return body


def h_add(req):
    """``POST /v1/peers {"id", "url"}``: the peer joins as a learner; promoted once it has caught up."""
    req.require_operator()
    body = _body(req)
    pid, url = _peer_id(body.get("id"), "id"), _peer_url(body.get("url"))
    return _replicator(req).change_membership(lambda node: node.add_learner(pid, url), f"adding {pid} ({url})")


def h_remove(req):
    """``DELETE /v1/peers/{id}`` or ``POST /v1/peers/{id}/remove``."""
    req.require_operator()
    req.json()  # an optional, ignored body is read so the connection stays usable
    pid = _peer_id(req.params["id"], "id")
    return _replicator(req).change_membership(lambda node: node.remove_member(pid), f"removing {pid}")


def h_replace(req):
    """``POST /v1/peers/replace {"old", "id", "url"}``: add the new peer, then remove the old one once the new
    one is a voter. The way back for a dead host, or one whose raft state is gone."""
    req.require_operator()
    body = _body(req)
    old, pid, url = _peer_id(body.get("old"), "old"), _peer_id(body.get("id"), "id"), _peer_url(body.get("url"))
    return _replicator(req).change_membership(lambda node: node.add_learner(pid, url, replaces=old),
                                              f"replacing {old} by {pid} ({url})")


def register(router) -> None:
    router.add("POST", "/v1/peers", h_add)
    router.add("POST", "/v1/peers/replace", h_replace)
    router.add("DELETE", "/v1/peers/{id}", h_remove)
    router.add("POST", "/v1/peers/{id}/remove", h_remove)
