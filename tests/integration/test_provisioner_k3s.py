"""dokku-provisioner with DOKKU_SCHEDULER=k3s, whatever MR_DOKKU_SCHEDULER says:
the exact commands written out (not derived from the helpers' sequences),
what the stand-in's k3s apps and PersistentVolumeClaim-backed entries hold,
cert-manager through a named issuer, and a request a cluster cannot serve."""

import os
import stat

import pytest

import mr
from provisioner_helpers import (HS_UID, IMAGE, MATRIX_IMAGE, MINDROOM_DIR, MINDROOM_UID, TAR,
                                 Dokku, body, imported, match)

# The provisioner never connects to PostgreSQL: nothing here differs behind a pooler.
pytestmark = pytest.mark.database_free

APP = "mindroom-kube"
CLASS = "longhorn"
PAYLOAD = body(APP, "skube", 768, 0.75, storage_gb=5, hs_memory_mb=256, hs_cpu=0.25,
               hs_storage_gb=2)


@pytest.fixture(scope="module")
def dokku():
    d = Dokku(scheduler="k3s")
    yield d
    d.assert_documented()


@pytest.fixture(scope="module")
def stack(pg, dokku):
    env = dokku.env(DOKKU_TLS="issuer", PROVISIONER_CERT_ISSUER="acme-dns",
                    PROVISIONER_STORAGE_CLASS=CLASS)
    with mr.Stack(pg, env=env, functions=["dokku-provisioner"]) as s:
        yield s


def post(stack, payload):
    return stack.call_provisioner("POST", "/apps", json=payload)


def test_create_on_k3s_runs_the_documented_k3s_commands(stack, dokku):
    dokku.mark()
    r = post(stack, PAYLOAD)
    assert r.status == 201, r
    assert r.json["frontend_url"] == "https://skube.mr.test"
    hs, hsd, data = APP + "-matrix", APP + "-matrix-data", APP + "-data"
    match(dokku.new_calls(), [
        ["apps:exists", hs],
        ["apps:create", hs],
        ["scheduler:set", hs, "selected", "k3s"],
        ["storage:info", hsd],
        ["storage:create", hsd, "--scheduler", "k3s", "--size", "2Gi", "--access-mode",
         "ReadWriteOnce", "--reclaim-policy", "Delete", "--storage-class-name", CLASS],
        ["storage:mount", hs, hsd, "--container-dir", "/data"],
        ["storage:labels:set", hsd, "mindroom.chat/storage-gb", "2"],
        ["resource:limit", "--memory", "256Mi", "--cpu", "0.25", hs],
        ["resource:reserve", "--memory", "256Mi", "--cpu", "0.25", hs],
        ["ports:set", hs, "http:80:8008"],
        ["nginx:set", hs, "client-max-body-size", "50M"],
        ["domains:set", hs, "skube-matrix.mr.test"],
        ["scheduler-k3s:set", hs, "cert-issuer-name", "acme-dns"],
        ["storage:exec", hsd] + TAR,
        ["git:from-image", hs, MATRIX_IMAGE],
        ["apps:exists", APP],
        ["apps:create", APP],
        ["scheduler:set", APP, "selected", "k3s"],
        ["storage:info", data],
        ["storage:create", data, "--scheduler", "k3s", "--size", "5Gi", "--access-mode",
         "ReadWriteOnce", "--reclaim-policy", "Delete", "--storage-class-name", CLASS],
        ["storage:mount", APP, data, "--container-dir", MINDROOM_DIR],
        ["storage:labels:set", data, "mindroom.chat/storage-gb", "5"],
        ["resource:limit", "--memory", "768Mi", "--cpu", "0.75", APP],
        ["resource:reserve", "--memory", "768Mi", "--cpu", "0.75", APP],
        ["ports:set", APP, "http:80:8765"],
        ["config:get", APP, "MINDROOM_MANAGED_ENV"],
        None,
        ["domains:set", APP, "skube.mr.test"],
        ["scheduler-k3s:set", APP, "cert-issuer-name", "acme-dns"],
        ["storage:exec", data] + TAR,
        ["git:from-image", APP, IMAGE]])
    cfg = [c for c in dokku.all_calls() if c[0] == "config:import"][0]
    assert imported(cfg)["MATRIX_HOMESERVER"] == \
        "http://mindroom-kube-matrix-web.default.svc.cluster.local"
    assert dokku.reaches(APP, hs + ".web")
    for app, entry, uid, gb, memory in ((hs, hsd, HS_UID, "2Gi", "256Mi"),
                                       (APP, data, MINDROOM_UID, "5Gi", "768Mi")):
        assert dokku.app(app, "scheduler") == "k3s"
        assert dokku.app_json(app, "k3s.json") == {"cert-issuer-name": "acme-dns"}
        assert dokku.app_json(app, "resource.json")["memory"] == memory
        assert dokku.app_json(app, "reserve.json") == dokku.app_json(app, "resource.json")
        e = dokku.entry(entry)
        assert (e["scheduler"], e["size"], e["storage_class"], e["reclaim_policy"]) == (
            "k3s", gb, CLASS, "Delete")
        # The volume's root was made the app's own before its first deploy.
        st = dokku.host_dir(entry).stat()
        assert stat.S_IMODE(st.st_mode) == 0o700
        if os.geteuid() == 0:
            assert st.st_uid == uid
    assert (dokku.host_dir(hsd) / "homeserver.yaml").exists()
    # The ingress takes the uploads Synapse takes (client-max-body-size becomes its
    # proxy-body-size annotation on k3s).
    assert dokku.app_json(hs, "nginx.json") == {"client-max-body-size": "50M"}
    assert dokku.app_json(APP, "nginx.json") is None


def test_a_repeat_on_k3s_creates_nothing_and_restarts_nothing(stack, dokku):
    dokku.mark()
    r = post(stack, PAYLOAD)
    assert r.status == 200 and r.json["restarted"] is False, r
    calls = dokku.new_calls()
    assert not [c for c in calls if c[0] in ("apps:create", "storage:create", "ps:restart",
                                             "ps:rebuild")]
    assert [c for c in calls if c[0] in ("ps:report", "ps:start")] == [
        ["ps:report", APP + "-matrix", "--deployed"], ["ps:report", APP + "-matrix", "--running"],
        ["ps:report", APP, "--deployed"], ["ps:report", APP, "--running"]]


def test_a_storage_size_is_required_on_k3s_and_nothing_runs_without_it(stack, dokku):
    for payload in (body("mindroom-nosize", "snosize", storage_gb=None),
                    body("mindroom-nosize", "snosize", hs_storage_gb=None)):
        dokku.mark()
        r = post(stack, payload)
        assert r.status == 400 and r.json["error"]["code"] == "invalid_request", r
        assert "storage_gb" in r.json["error"]["message"]
        assert dokku.new_calls() == []


def test_a_cpu_limit_of_1m_is_taken_on_k3s(stack, dokku):
    """Kubernetes takes 1m (0.001 CPU); docker-local's least of 0.01 is not k3s's."""
    dokku.mark()
    r = post(stack, body("mindroom-milli", "smilli", cpu=0.001, hs_cpu=0.005))
    assert r.status == 201, r
    limits = [c for c in dokku.new_calls() if c[0] in ("resource:limit", "resource:reserve")]
    assert [c[4] for c in limits] == ["0.005", "0.005", "0.001", "0.001"], limits


def test_stop_start_restart_destroy_and_purge_on_k3s(stack, dokku):
    hs = APP + "-matrix"
    dokku.mark()
    assert stack.call_provisioner("POST", "/apps/%s/stop" % APP).status == 200
    assert stack.call_provisioner("POST", "/apps/%s/start" % APP).status == 200
    assert dokku.new_calls() == [
        ["apps:exists", APP], ["apps:exists", hs], ["ps:stop", APP], ["ps:stop", hs],
        ["apps:exists", APP], ["apps:exists", hs], ["ps:report", hs, "--deployed"],
        ["ps:report", APP, "--deployed"], ["ps:start", hs], ["ps:start", APP]]
    assert stack.call_provisioner("POST", "/apps/%s/restart" % APP).status == 200
    assert dokku.new_calls() == [
        ["apps:exists", APP], ["apps:exists", hs], ["ps:report", hs, "--deployed"],
        ["ps:report", APP, "--deployed"], ["ps:restart", hs], ["ps:restart", APP]]
    dokku.container_write(APP, MINDROOM_DIR + "/kept", "data")
    r = stack.call_provisioner("DELETE", "/apps/" + APP)
    assert r.status == 200 and r.json["storage"] == {"mindroom": "present",
                                                      "homeserver": "present"}, r
    assert dokku.new_calls() == [
        ["apps:exists", APP], ["apps:exists", hs], ["--force", "apps:destroy", APP],
        ["--force", "apps:destroy", hs], ["storage:info", APP + "-data"],
        ["storage:info", hs + "-data"]]
    assert (dokku.host_dir(APP + "-data") / "kept").read_text() == "data"
    r = stack.call_provisioner("DELETE", "/apps/%s/storage" % APP)
    assert r.status == 200 and r.json["purged"] is True, r
    # Reclaim policy Delete: the volume goes with the entry; --destroy-host-dir
    # is docker-local only.
    assert dokku.new_calls() == [
        ["apps:exists", APP], ["apps:exists", hs],
        ["storage:info", APP + "-data"], ["storage:destroy", APP + "-data", "--force"],
        ["storage:info", hs + "-data"], ["storage:destroy", hs + "-data", "--force"]]
    assert not dokku.host_dir(APP + "-data").exists()
    assert stack.call_provisioner("GET", "/apps/" + APP).status == 404
