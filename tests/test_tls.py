"""TLS and mutual TLS for ``serve``, with real certificates from throwaway CAs (trustme)."""

from __future__ import annotations

import ssl

import pytest
import trustme

from cis490fleet import errors, tls
from conftest import OPERATOR_TOKEN, http_call, manifest_toml


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture(scope="module")
def pems(ca, tmp_path_factory):
    """PEM files: the server's cert+key, the CA, ws1's client cert (SAN only), ws2's (with a CN), a rogue's."""
    d = tmp_path_factory.mktemp("pki")
    server = ca.issue_cert("127.0.0.1", "localhost")
    server.cert_chain_pems[0].write_to_path(d / "server.pem")
    server.private_key_pem.write_to_path(d / "server.key")
    ca.cert_pem.write_to_path(d / "ca.pem")
    for name, leaf in (("ws1", ca.issue_cert("ws1")), ("ws2", ca.issue_cert("ws2.lab", common_name="ws2"))):
        leaf.private_key_and_cert_chain_pem.write_to_path(d / f"{name}.pem")
    rogue_ca = trustme.CA()
    rogue_ca.issue_cert("ws1").private_key_and_cert_chain_pem.write_to_path(d / "rogue.pem")
    return d


KNOWN_HOSTS = '[[hosts]]\nid = "ws1"\n\n[[hosts]]\nid = "ws2"\n'  # only hosts the fleet knows hold jobs


def server_ctx(pems, mutual: bool) -> ssl.SSLContext:
    return tls.server_context(pems / "server.pem", pems / "server.key", pems / "ca.pem" if mutual else None)


def client_ctx(pems, who: str | None = None) -> ssl.SSLContext:
    return tls.client_context(pems / "ca.pem", pems / f"{who}.pem" if who else None)


def test_identity_from_cert_prefers_the_common_name_then_the_first_dns_name():
    assert tls.identity_from_cert({"subject": ((("commonName", "ws2"),),),
                                   "subjectAltName": (("DNS", "ws2.lab"),)}) == "ws2"
    assert tls.identity_from_cert({"subject": ((("organizationName", "lab"),),),
                                   "subjectAltName": (("IP Address", "10.0.0.1"), ("DNS", "ws1"))}) == "ws1"
    assert tls.identity_from_cert({}) is None and tls.identity_from_cert(None) is None


def test_contexts_refuse_missing_files_with_the_flag_to_fix(tmp_path, pems):
    with pytest.raises(errors.ConfigError, match="--cert"):
        tls.server_context(tmp_path / "nope.pem", tmp_path / "nope.key")
    with pytest.raises(errors.ConfigError, match="--client-ca"):
        tls.server_context(pems / "server.pem", pems / "server.key", tmp_path / "ca.pem")
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(errors.ConfigError, match="belong together"):
        tls.server_context(tmp_path / "junk.pem", pems / "server.key")


def test_server_context_floor_is_tls_1_2(pems):
    ctx = server_ctx(pems, mutual=True)
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2 and ctx.verify_mode == ssl.CERT_REQUIRED
    assert server_ctx(pems, mutual=False).verify_mode == ssl.CERT_NONE


def test_https_without_client_certificates(live_server, pems):
    srv = live_server(manifest_toml(1), server_context=server_ctx(pems, mutual=False),
                      client_context=client_ctx(pems))
    assert srv.url.startswith("https://")
    status, _, body = srv.call("GET", "/v1/health")
    assert status == 200 and body["ok"] is True
    # Without a certificate the identity still comes from x-lab-host.
    assert srv.call("POST", "/v1/job/claim", {}, {"x-lab-host": "ws9"})[0] == 200
    assert srv.call("POST", "/v1/job/claim", {})[0] == 401
    with pytest.raises(ssl.SSLError):  # a client that does not trust our CA
        http_call(srv.url, "GET", "/v1/health", context=ssl.create_default_context())


@pytest.fixture
def mtls(live_server, pems):
    return live_server(manifest_toml(2, extra=KNOWN_HOSTS), server_context=server_ctx(pems, mutual=True))


def test_mutual_tls_takes_the_identity_from_the_certificate(mtls, pems):
    ws1 = client_ctx(pems, "ws1")
    status, _, body = http_call(mtls.url, "POST", "/v1/job/claim", {}, context=ws1)
    assert status == 200 and body["job_id"]
    _, _, detail = http_call(mtls.url, "GET", f"/v1/job/{body['job_id']}", context=ws1)
    assert detail["job"]["host"] == "ws1"
    status, _, body = http_call(mtls.url, "POST", "/v1/job/claim", {}, {"x-lab-host": "ws2"},
                                context=client_ctx(pems, "ws2"))
    assert status == 200 and body["job_id"]


def test_mutual_tls_refuses_an_x_lab_host_other_than_the_certificate(mtls, pems):
    status, _, body = http_call(mtls.url, "POST", "/v1/job/claim", {}, {"x-lab-host": "ws2"},
                                context=client_ctx(pems, "ws1"))
    assert status == 403 and body["error"] == "forbidden"
    assert "'ws2'" in body["detail"] and "'ws1'" in body["detail"]
    assert "--host-id ws1" in body["detail"]  # what a `work` user changes, not only the header's name


@pytest.mark.parametrize("who", [None, "rogue"])
def test_mutual_tls_refuses_clients_without_a_certificate_from_our_ca(mtls, pems, who):
    with pytest.raises((ssl.SSLError, ConnectionError)):
        http_call(mtls.url, "GET", "/v1/health", context=client_ctx(pems, who))
    # the server is still fine for a good client
    assert http_call(mtls.url, "GET", "/v1/health", context=client_ctx(pems, "ws1"))[0] == 200


def test_serve_process_with_mutual_tls(serve_process, pems):
    sp = serve_process(manifest=manifest_toml(1, extra=KNOWN_HOSTS),
                       args=["--cert", str(pems / "server.pem"), "--key", str(pems / "server.key"),
                             "--client-ca", str(pems / "ca.pem")],
                       ssl_context=client_ctx(pems, "ws1"))
    assert sp.url.startswith("https://127.0.0.1:")
    status, _, body = sp.call("POST", "/v1/job/claim", {})
    assert status == 200 and body["job_id"]
    status, _, body = sp.call("POST", f"/v1/job/{body['job_id']}/cancel", None, {"x-operator-token": OPERATOR_TOKEN})
    assert status == 200
    assert sp.stop() == 0


def test_serve_refuses_client_ca_without_a_certificate(serve_process, pems):
    sp = serve_process(args=["--client-ca", str(pems / "ca.pem")], wait=False)
    assert sp.proc.wait(60) == 2
    assert "--cert" in sp.log_text()
