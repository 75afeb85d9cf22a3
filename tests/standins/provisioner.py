"""Stand-in for the dokku-provisioner service (DOKKU_PROVISIONER_URL).

Speaks the provisioner's HTTP contract (README, provisioner section):
  POST   /apps                {app, subdomain, memory_mb, cpu, env} -> 201 (new) / 200
                              {app, state, all_restarted, backend_url, frontend_url,
                               matrix_server_url}
                              (creates, or updates and starts, an existing app)
  POST   /apps/{app}/stop     -> 200 {app, state: "stopped"}; 404 unknown app
  POST   /apps/{app}/start    -> 200 {app, state: "running", urls}; 404 unknown app
  POST   /apps/{app}/restart  -> the same as start
  GET    /apps/{app}          -> 200 {app, state, ...}; 404 unknown app
  DELETE /apps/{app}          -> 200 (also for a missing app); ?purge=true: "purged": true
  DELETE /apps/{app}/storage  -> 200 (also when none is left); 409 apps_exist while the app is
  any other path              -> 404 no_route (a missing app is 404 not_found)
with `Authorization: Bearer <token>` compared in constant time (401 otherwise).
Keeps the apps it was asked for in .apps, so a test can tell "one app" from "two".
Failure behaviours come from RecordingServer (fail, reject, hang, slow).

    with ProvisionerStandin(token="...") as p:
        env = {"DOKKU_PROVISIONER_URL": p.url, "DOKKU_PROVISIONER_TOKEN": p.token}
"""
import re
import secrets

try:
    from .recording import RecordingServer
except ImportError:  # imported as a top-level module
    from recording import RecordingServer

APP_PATH = re.compile(r"^/apps/([a-z][a-z0-9-]{0,62})(?:/(start|stop|restart|storage))?$")


class ProvisionerStandin(RecordingServer):
    def __init__(self, token=None, domain="mindroom.test"):
        super().__init__(token=token or secrets.token_hex(24))
        self.domain = domain
        self.apps = {}          # app -> {"state", "memory_mb", "cpu", "env", "subdomain"}
        self.creates = 0        # POST /apps that created a new app

    def reset(self):
        super().reset()
        with self.lock:
            self.apps.clear()
            self.creates = 0

    def urls(self, sub):
        return {
            "backend_url": f"https://api.{sub}.{self.domain}",
            "frontend_url": f"https://{sub}.{self.domain}",
            "matrix_server_url": f"https://matrix.{sub}.{self.domain}",
        }

    def create_calls(self):
        return self.recorded("POST", "/apps")

    def answer(self, rec):
        with self.lock:
            return self._answer(rec)

    def _answer(self, rec):
        if rec.path == "/apps" and rec.method == "POST":
            b = rec.json
            if (not isinstance(b, dict) or not isinstance(b.get("app"), str)
                    or not re.fullmatch(r"[a-z][a-z0-9-]{0,62}", b["app"])
                    or not isinstance(b.get("subdomain"), str)
                    or not isinstance(b.get("memory_mb"), int)
                    or not isinstance(b.get("cpu"), (int, float))
                    or not isinstance(b.get("env", {}), dict)):
                return 400, {"error": {"code": "invalid", "message": "bad app request"}}
            created = b["app"] not in self.apps
            if created:
                self.creates += 1
            # As the provisioner: a new app and a stopped one get new processes; one
            # running is left as it is (nothing changed).
            started = created or self.apps[b["app"]]["state"] != "running"
            self.apps[b["app"]] = {"state": "running", "memory_mb": b["memory_mb"],
                                   "cpu": b["cpu"], "env": dict(b.get("env") or {}),
                                   "subdomain": b["subdomain"]}
            return (201 if created else 200), dict(app=b["app"], state="running",
                                                   all_restarted=started, **self.urls(b["subdomain"]))
        path, _, query = rec.path.partition("?")
        m = APP_PATH.match(path)
        if not m:
            return 404, {"error": {"code": "no_route", "message": "no such route"}}
        app, verb = m.group(1), m.group(2)
        known = self.apps.get(app)
        if query and not (rec.method == "DELETE" and verb is None and query == "purge=true"):
            return 400, {"error": {"code": "invalid_request", "message": "no such query"}}
        if rec.method == "DELETE" and verb is None:
            self.apps.pop(app, None)
            return 200, {"app": app, "state": "deleted", "purged": bool(query)}
        if rec.method == "DELETE" and verb == "storage":
            if known is not None:
                return 409, {"error": {"code": "apps_exist", "message": f"{app} still exists"}}
            return 200, {"app": app, "storage": "destroyed"}
        if known is None:
            return 404, {"error": {"code": "not_found", "message": f"no app {app}"}}
        if rec.method == "GET" and verb is None:
            return 200, dict(app=app, state=known["state"], **self.urls(known["subdomain"]))
        if rec.method == "POST" and verb in ("start", "stop", "restart"):
            known["state"] = "stopped" if verb == "stop" else "running"
            return 200, dict(app=app, state=known["state"], **self.urls(known["subdomain"]))
        return 405, {"error": {"code": "method_not_allowed", "message": "method not allowed"}}
