"""Static checks of the deployment assets: infra/docker, infra/compose, infra/k8s.

No Docker engine and no cluster are needed, and none is used: these tests read the files and compare them
with the code they deploy (the settings model, the `encore`/Dagster command trees, the serving routes, the
arguments of models.distributed), with the Compose Specification's JSON Schema and with Dagster's own
instance and workspace schemas. Each check names what is wrong when it fails. What they cannot tell —
whether an image builds, whether a container starts — is listed in docs/deployment.md.
"""

from __future__ import annotations

import ast
import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
DOCKER_DIR = INFRA / "docker"
COMPOSE_DIR = INFRA / "compose"
COMPOSE_FILE = COMPOSE_DIR / "compose.yaml"
ENV_EXAMPLE = COMPOSE_DIR / ".env.example"
K8S_DIR = INFRA / "k8s"
K8S_ENV = K8S_DIR / "encore.env"
K8S_SECRET_EXAMPLE = K8S_DIR / "secret.example.yaml"
COMPOSE_SCHEMA = Path(__file__).parent / "schemas" / "compose-spec.json"

# ENCORE_* variables that are not settings fields but are read by infra/settings.py itself.
NON_FIELD_ENCORE_VARS = {"ENCORE_CONFIG"}


# ------------------------------------------------------------------------------------------------ loading


def yaml_files() -> list[Path]:
    return sorted(p for d in (DOCKER_DIR, COMPOSE_DIR, K8S_DIR) for p in d.rglob("*") if p.suffix in (".yaml", ".yml"))


def dockerfiles() -> list[Path]:
    return sorted(DOCKER_DIR.glob("*.Dockerfile"))


def read_env_file(path: Path, *, commented: bool = False) -> dict[str, str]:
    """KEY=VALUE lines of a dotenv file; with ``commented``, also the ``# KEY=VALUE`` lines (documented knobs)."""
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if commented and line.startswith("#"):
            line = line.lstrip("#").strip()
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)=(.*)", line)
        if match:
            out[match.group(1)] = match.group(2)
    return out


_VAR = re.compile(r"\$(?:\$|\{(?P<braced>[^}]*)\}|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable interpolation: ``$$``, ``$VAR``, ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``,
    ``${VAR:?error}`` and ``${VAR?error}``. A required variable that is missing raises, as Compose does."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        if match.group("plain"):
            return env.get(match.group("plain"), "")
        expr = match.group("braced")
        name = re.match(r"[A-Za-z_][A-Za-z0-9_]*", expr)
        assert name, f"bad interpolation ${{{expr}}}"
        var, rest = name.group(0), expr[name.end():]
        have = env.get(var)
        if rest.startswith(":-"):
            return have if have else interpolate(rest[2:], env)
        if rest.startswith("-"):
            return have if have is not None else interpolate(rest[1:], env)
        if rest.startswith((":?", "?")):
            if have is None or (rest.startswith(":?") and not have):
                raise KeyError(f"required variable {var} is not set: {rest.lstrip(':?')}")
            return have
        assert rest == "", f"unsupported interpolation ${{{expr}}}"
        return have or ""

    return _VAR.sub(one, value)


@lru_cache(maxsize=1)
def compose_raw() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@lru_cache(maxsize=1)
def compose() -> dict:
    """The compose file as Compose sees it with .env.example as its .env (anchors and merge keys resolved)."""
    return interpolate(compose_raw(), read_env_file(ENV_EXAMPLE))


def services() -> dict[str, dict]:
    return compose()["services"]


def k8s_manifest_files() -> list[Path]:
    return sorted(p for p in K8S_DIR.rglob("*.yaml") if p.name != "kustomization.yaml")


def k8s_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def k8s_objects() -> list[tuple[Path, dict]]:
    return [(p, d) for p in k8s_manifest_files() for d in k8s_docs(p)]


def pod_specs() -> Iterator[tuple[Path, dict, dict]]:
    """(file, workload, pod spec) of every Deployment, StatefulSet, Job in infra/k8s."""
    for path, obj in k8s_objects():
        if obj["kind"] in ("Deployment", "StatefulSet", "Job", "DaemonSet"):
            yield path, obj, obj["spec"]["template"]["spec"]


def containers(spec: dict) -> list[dict]:
    return spec.get("initContainers", []) + spec.get("containers", [])


# ------------------------------------------------------------------------------------------------ Dockerfiles


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comment lines dropped, as Docker parses."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or not stripped:
            continue  # comments (also inside a continuation) and blank lines
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        keyword, _, rest = full.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    assert not pending, f"{path.name}: dangling line continuation"
    return out


def dockerfile_base(path: Path) -> str:
    """The FROM image of a single-stage Dockerfile with its ARG defaults substituted."""
    args: dict[str, str] = {}
    for keyword, rest in dockerfile_instructions(path):
        if keyword == "ARG" and "=" in rest:
            name, value = rest.split("=", 1)
            args.setdefault(name.strip(), value.strip())
        if keyword == "FROM":
            image = rest.split()[0]
            return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), ""), image)
    raise AssertionError(f"{path.name} has no FROM")


def dockerignore_patterns() -> list[tuple[bool, str]]:
    out = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            negate = line.startswith("!")
            out.append((negate, line.lstrip("!").rstrip("/")))
    return out


def dockerignored(rel: str) -> bool:
    """Whether .dockerignore keeps ``rel`` (or a folder above it) out of the build context."""
    parts = rel.split("/")
    ignored = False
    for negate, pattern in dockerignore_patterns():
        candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        hit = any(fnmatch.fnmatch(c, pattern) or (pattern.startswith("**/") and
                  (fnmatch.fnmatch(c, pattern[3:]) or fnmatch.fnmatch(c.split("/")[-1], pattern[3:])))
                  for c in candidates)
        if hit:
            ignored = not negate
    return ignored


def exec_form(rest: str) -> list[str] | None:
    rest = rest.strip()
    if rest.startswith("["):
        return json.loads(rest)
    return None


# ------------------------------------------------------------------------------------------------ code facts


@lru_cache(maxsize=1)
def serving_routes() -> set[str]:
    """Paths of the FastAPI app in serving/app.py, read from its decorators (importing it loads torch/Feast)."""
    tree = ast.parse((ROOT / "serving" / "app.py").read_text())
    routes: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args:
            first = node.args[0]
            if node.func.attr in ("get", "post", "put", "delete", "patch", "add_api_route") and \
                    isinstance(node.func.value, ast.Name) and node.func.value.id == "app":
                if isinstance(first, ast.Constant) and isinstance(first.value, str):
                    routes.add(first.value)
                elif isinstance(first, ast.JoinedStr):  # f"/admin/experiments/{{name}}/{action}"
                    routes.add("".join(v.value if isinstance(v, ast.Constant) else "{}" for v in first.values))
    return routes


@lru_cache(maxsize=1)
def distributed_arguments() -> dict[str, dict]:
    """The options of models.distributed's argparse parser: {flag: {"choices": [...] | None}}."""
    tree = ast.parse((ROOT / "models" / "distributed.py").read_text())
    flags: dict[str, dict] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_argument":
            names = [a.value for a in node.args if isinstance(a, ast.Constant)]
            choices = next((ast.literal_eval(k.value) for k in node.keywords if k.arg == "choices"), None)
            for name in names:
                flags[name] = {"choices": choices}
    return flags


def settings_path(name: str) -> str | None:
    """The settings field an ENCORE_* variable sets (``ENCORE_FEAST__REDIS`` -> ``feast.redis``), or None.

    Walks ``EncoreSettings.model_fields`` and nested pydantic models generically, the way pydantic-settings
    maps variables (prefix ENCORE_, nested delimiter ``__``, case-insensitive)."""
    from pydantic import BaseModel

    from infra.settings import EncoreSettings

    assert name.startswith("ENCORE_")
    model: type[BaseModel] = EncoreSettings
    parts = name[len("ENCORE_"):].lower().split("__")
    path = []
    for i, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            return None
        path.append(part)
        annotation = field.annotation
        nested = [a for a in getattr(annotation, "__args__", (annotation,))
                  if isinstance(a, type) and issubclass(a, BaseModel)]
        if i < len(parts) - 1:
            if not nested:
                return None
            model = nested[0]
        elif nested:
            return None  # a whole group cannot be set from one variable here
    return ".".join(path)


# Programs whose command lines are checked against their real click command trees.
def _click_root(program: str):
    if program == "encore":
        from cli.main import main
        return main
    if program == "dagster":
        from dagster._cli import cli
        return cli
    if program == "dagster-daemon":
        from dagster._daemon.cli import cli
        return cli
    if program == "dagster-webserver":
        from dagster_webserver.cli import cli
        return cli
    return None


CHECKED_PROGRAMS = ("encore", "dagster", "dagster-daemon", "dagster-webserver")
SHELL_BREAKS = {"&&", "||", ";", "|", "then", "do", "done", "fi", "else"}


def command_lines(argv: list[str]) -> Iterator[list[str]]:
    """Invocations of the checked programs in a container command, including inside ``sh -c '...'``."""
    if len(argv) >= 3 and argv[0] in ("/bin/sh", "sh", "/bin/bash", "bash") and argv[1] == "-c":
        for line in re.split(r"[\n;]|&&|\|\|", argv[2]):
            try:
                tokens = shlex.split(line)
            except ValueError:
                continue
            while tokens and tokens[0] in ("exec", "then", "do", "else"):
                tokens = tokens[1:]
            if tokens and tokens[0] in CHECKED_PROGRAMS:
                yield tokens
        return
    if argv and argv[0] == "tini":
        argv = argv[argv.index("--") + 1:] if "--" in argv else argv[1:]
    if argv and argv[0] in CHECKED_PROGRAMS:
        yield list(argv)


def check_cli(tokens: list[str]) -> list[str]:
    """Problems of one command line: unknown subcommands or options of its click command tree."""
    import click

    command = _click_root(tokens[0])
    path = [tokens[0]]
    rest = tokens[1:]
    while isinstance(command, click.Group) and rest and not rest[0].startswith("-"):
        ctx = click.Context(command)
        sub = command.get_command(ctx, rest[0])
        if sub is None:
            known = sorted(command.list_commands(ctx))
            return [f"`{' '.join(path)}` has no subcommand {rest[0]!r} (known: {known})"]
        command, path, rest = sub, path + [rest[0]], rest[1:]
    help_opts = set(getattr(command, "context_settings", {}).get("help_option_names", ["--help"])) | {"--help"}
    if isinstance(command, click.Group) and not help_opts & set(rest):
        return [f"`{' '.join(path)}` is a group: a subcommand is missing"]
    ctx = click.Context(command)
    known = {opt for p in command.get_params(ctx) for opt in (*p.opts, *p.secondary_opts)}
    problems = []
    for token in rest:
        if token in SHELL_BREAKS:
            break
        if token.startswith("-") and token != "-":
            flag = token.split("=", 1)[0]
            if flag not in known:
                problems.append(f"`{' '.join(path)}` has no option {flag} (known: {sorted(known)})")
    return problems


def all_container_commands() -> Iterator[tuple[str, list[str]]]:
    """(where, argv) of every command in compose, the Dockerfiles and the Kubernetes manifests."""
    for name, svc in services().items():
        cmd = svc.get("command")
        if isinstance(cmd, str):
            cmd = shlex.split(cmd)
        if cmd:
            yield f"compose service {name}", cmd
        test = (svc.get("healthcheck") or {}).get("test")
        if isinstance(test, list) and test and test[0] in ("CMD", "CMD-SHELL"):
            yield f"compose healthcheck of {name}", test[1:] if test[0] == "CMD" else ["sh", "-c", test[1]]
    for path in dockerfiles():
        for keyword, rest in dockerfile_instructions(path):
            if keyword in ("CMD", "ENTRYPOINT") and exec_form(rest):
                yield f"{path.name} {keyword}", exec_form(rest)
    for path, workload, spec in pod_specs():
        for c in containers(spec):
            argv = (c.get("command") or []) + (c.get("args") or [])
            if argv:
                yield f"{path.name} {workload['metadata']['name']}/{c['name']}", argv
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                exec_ = (c.get(probe) or {}).get("exec")
                if exec_:
                    yield f"{path.name} {workload['metadata']['name']}/{c['name']} {probe}", exec_["command"]


# ================================================================================================ tests: YAML


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_yaml_file_parses(path: Path) -> None:
    docs = list(yaml.safe_load_all(path.read_text()))
    assert any(d is not None for d in docs), f"{path} is empty"


def test_the_assets_exist() -> None:
    for rel in ("infra/docker/base.Dockerfile", "infra/docker/dagster.Dockerfile", "infra/docker/serving.Dockerfile",
                "infra/docker/trainer.Dockerfile", "infra/docker/dagster.yaml", "infra/docker/workspace.yaml",
                "infra/compose/compose.yaml", "infra/compose/.env.example", "infra/compose/nginx.conf",
                "infra/k8s/kustomization.yaml", "infra/k8s/training/kustomization.yaml", ".dockerignore",
                "docs/deployment.md"):
        assert (ROOT / rel).is_file(), f"missing {rel}"


# ================================================================================================ tests: Dockerfiles


@pytest.mark.parametrize("path", dockerfiles(), ids=lambda p: p.name)
def test_dockerfile_copy_sources_exist_and_are_in_the_build_context(path: Path) -> None:
    # Every image builds with the repository root as its context (compose: context ../..; build.sh: `.`).
    for keyword, rest in dockerfile_instructions(path):
        if keyword not in ("COPY", "ADD"):
            continue
        tokens = shlex.split(rest)
        if any(t.startswith("--from") for t in tokens):
            continue
        args = [t for t in tokens if not t.startswith("--")]
        for src in args[:-1]:
            assert (ROOT / src).exists(), f"{path.name}: COPY source {src} does not exist"
            if src != ".":
                assert not dockerignored(src), f"{path.name}: COPY source {src} is excluded by .dockerignore"


def test_dockerignore_keeps_local_state_out_of_images() -> None:
    for rel in (".venv/bin/python", ".encore/offline/x.parquet", "data/ml-1m/ratings.dat", ".git/HEAD",
                "infra/compose/.env", "features/__pycache__/x.pyc"):
        assert dockerignored(rel), f".dockerignore lets {rel} into the build context"
    for rel in ("infra/install.sh", "infra/requirements.lock", "pyproject.toml", "cli/main.py",
                "models/configs/default.yaml", "infra/docker/dagster.yaml"):
        assert not dockerignored(rel), f".dockerignore drops {rel}, which the images need"


def test_base_image_installs_with_install_sh_into_its_venv() -> None:
    install = (INFRA / "install.sh").read_text()
    assert re.search(r"^VENV=\$\{VENV:-", install, re.MULTILINE), "infra/install.sh no longer honours VENV=..."
    assert re.search(r"^PYTHON=\$\{PYTHON:-", install, re.MULTILINE), "infra/install.sh no longer honours PYTHON=..."
    text = " ".join(rest for k, rest in dockerfile_instructions(DOCKER_DIR / "base.Dockerfile") if k == "RUN")
    assert "bash infra/install.sh" in text and 'VENV="$VENV"' in text


@pytest.mark.parametrize("role", ["dagster", "serving", "trainer"])
def test_role_images_build_from_the_base_image(role: str) -> None:
    path = DOCKER_DIR / f"{role}.Dockerfile"
    assert dockerfile_base(path) == "encore-base", f"{path.name} should start FROM ${{BASE_IMAGE}} (encore-base)"
    # Non-root at run time: the base sets a numeric USER, and a role image that switches to root switches back.
    users = [rest for k, rest in dockerfile_instructions(path) if k == "USER"]
    assert not users or users[-1] == "10001:10001", f"{path.name} ends as user {users[-1]}"
    base_users = [rest for k, rest in dockerfile_instructions(DOCKER_DIR / "base.Dockerfile") if k == "USER"]
    assert base_users and base_users[-1] == "10001:10001"


def test_serving_image_healthcheck_and_port_match_the_app() -> None:
    instr = dockerfile_instructions(DOCKER_DIR / "serving.Dockerfile")
    health = " ".join(rest for k, rest in instr if k == "HEALTHCHECK")
    paths = re.findall(r"(/[a-z]+)'", health)
    assert paths, "serving.Dockerfile has no HEALTHCHECK on an HTTP path"
    for p in paths:
        assert p in serving_routes(), f"HEALTHCHECK path {p} is not a route of serving/app.py"
    env = " ".join(rest for k, rest in instr if k == "ENV")
    assert "ENCORE_SERVE__PORT=8000" in env and any(k == "EXPOSE" and "8000" in r for k, r in instr)


def test_trainer_entrypoint_passes_only_real_arguments_of_models_distributed() -> None:
    script = (DOCKER_DIR / "trainer-entrypoint.sh").read_text()
    known = distributed_arguments()
    assert "--data" in known, "models/distributed.py: could not read its argparse arguments"
    used = set()
    for line in script.splitlines():
        if re.match(r"\s*(args=\(|if .*args\+=\()", line):
            used |= set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", line))
    assert {"--config", "--data", "--backend"} <= used, f"argument lines not found in the entrypoint: {used}"
    unknown = used - set(known)
    assert not unknown, f"trainer-entrypoint.sh passes {sorted(unknown)}, not arguments of models.distributed"
    assert "-m models.distributed" in script
    # Every backend the images and manifests choose must be one models.distributed accepts.
    choices = known["--backend"]["choices"]
    backends = set(re.findall(r"TRAIN_BACKEND[=:]\s*\"?(\w+)", (DOCKER_DIR / "trainer.Dockerfile").read_text()))
    backends |= {"nccl"}  # the GPU build (build.sh, docs)
    for svc in services().values():
        if "TRAIN_BACKEND" in (svc.get("environment") or {}):
            backends.add(svc["environment"]["TRAIN_BACKEND"])
    for _, _, spec in pod_specs():
        for c in containers(spec):
            backends |= {e["value"] for e in c.get("env", []) if e["name"] == "TRAIN_BACKEND"}
    if choices:
        assert backends <= set(choices), f"backends {backends - set(choices)} are not in {choices}"


# ================================================================================================ tests: Compose


def test_compose_matches_the_compose_specification() -> None:
    import jsonschema_rs

    validator = jsonschema_rs.validator_for(json.loads(COMPOSE_SCHEMA.read_text()))
    errors = [f"{'/'.join(map(str, e.instance_path))}: {e.message}" for e in validator.iter_errors(compose())]
    assert not errors, "compose.yaml does not match the Compose Specification:\n" + "\n".join(errors)


def test_compose_refuses_to_start_without_the_secrets() -> None:
    # `${VAR:?message}`: with an empty .env, Compose must stop and say which secret is missing.
    with pytest.raises(KeyError, match="POSTGRES_PASSWORD|REDIS_PASSWORD|MINIO_ROOT|ADMIN_TOKEN"):
        interpolate(compose_raw(), {})
    raw = COMPOSE_FILE.read_text()
    for secret in ("POSTGRES_PASSWORD", "REDIS_PASSWORD", "MINIO_ROOT_PASSWORD", "ENCORE_SERVE__ADMIN_TOKEN"):
        assert secret in read_env_file(ENV_EXAMPLE), f".env.example lacks {secret}"
        assert re.search(rf"\$\{{{secret}[:}}]", raw), f"compose.yaml never uses {secret}"
    # No literal password anywhere in compose.yaml: every one comes from .env.
    assert not re.search(r"(?i)password[=:]\s*(?!\$)[A-Za-z0-9]", raw.replace("password=${", "")), \
        "compose.yaml seems to hold a literal password"


def test_compose_builds_point_at_existing_dockerfiles() -> None:
    builds = 0
    for name, svc in services().items():
        build = svc.get("build")
        if build is None:
            continue
        builds += 1
        if isinstance(build, str):
            build = {"context": build}
        context = (COMPOSE_DIR / build.get("context", ".")).resolve()
        assert context.is_dir(), f"service {name}: build context {context} does not exist"
        dockerfile = context / build.get("dockerfile", "Dockerfile")
        assert dockerfile.is_file(), f"service {name}: Dockerfile {dockerfile} does not exist"
        assert context == ROOT, f"service {name}: the images build from the repository root"
        for label, ref in (build.get("additional_contexts") or {}).items():
            if ref.startswith("service:"):
                other = ref.split(":", 1)[1]
                assert other in services() and "build" in services()[other], \
                    f"service {name}: additional context {label} names {other}, which builds no image"
        # A role image starts FROM encore-base: the named context must be there to provide it.
        if dockerfile_base(dockerfile) == "encore-base":
            assert "encore-base" in (build.get("additional_contexts") or {}), \
                f"service {name}: {dockerfile.name} needs additional_contexts.encore-base"
    assert builds >= 4


def _depends(svc: dict) -> dict[str, dict]:
    deps = svc.get("depends_on") or {}
    return {d: {"condition": "service_started"} for d in deps} if isinstance(deps, list) else deps


def test_compose_dependencies_exist_are_acyclic_and_their_conditions_can_be_met() -> None:
    svcs = services()
    for name, svc in svcs.items():
        for dep, spec in _depends(svc).items():
            assert dep in svcs, f"service {name} depends on {dep}, which is not defined"
            condition = spec.get("condition", "service_started")
            target = svcs[dep]
            if condition == "service_healthy":
                built = target.get("build")
                image_health = built and "HEALTHCHECK" in {k for k, _ in dockerfile_instructions(
                    (COMPOSE_DIR / built["context"] / built["dockerfile"]).resolve())}
                assert "healthcheck" in target or image_health, \
                    f"service {name} waits for {dep} to be healthy, but {dep} has no healthcheck"
            if condition == "service_completed_successfully":
                assert target.get("restart", "no") == "no", \
                    f"service {name} waits for {dep} to complete, but {dep} restarts (restart: {target['restart']})"
            # A service that always starts cannot wait for one that only starts in a profile.
            if not svc.get("profiles") and not spec.get("required") is False:
                assert not target.get("profiles"), f"service {name} depends on {dep}, which is only in a profile"
    # Compose rejects dependency cycles: check there are none.
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        if state.get(node) == 1:
            raise AssertionError("dependency cycle: " + " -> ".join(trail + [node]))
        if state.get(node) == 2:
            return
        state[node] = 1
        for dep in _depends(svcs[node]):
            visit(dep, trail + [node])
        state[node] = 2

    for name in svcs:
        visit(name, [])


def test_compose_healthchecks_are_well_formed() -> None:
    # The schema accepts strings here (they may be interpolated); Compose then needs a number or a duration.
    duration = re.compile(r"^(\d+(\.\d+)?(ns|us|ms|s|m|h))+$")
    checks = 0
    for name, svc in services().items():
        check = svc.get("healthcheck")
        if not check:
            continue
        checks += 1
        assert isinstance(check["test"], list) and check["test"][0] in ("CMD", "CMD-SHELL"), f"{name}: test form"
        for key in ("interval", "timeout", "start_period"):
            if key in check:
                assert duration.match(str(check[key])), f"{name}: healthcheck {key}={check[key]!r} is not a duration"
        assert str(check.get("retries", 3)).isdigit(), f"{name}: healthcheck retries={check.get('retries')!r}"
    assert checks >= 8


def test_compose_volumes_and_bind_mounts_exist() -> None:
    declared = set(compose().get("volumes") or {})
    for name, svc in services().items():
        for volume in svc.get("volumes") or []:
            source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source")
            if source.startswith((".", "/")):
                assert (COMPOSE_DIR / source).exists(), f"service {name}: bind mount {source} does not exist"
            else:
                assert source in declared, f"service {name}: volume {source} is not declared under volumes:"


def test_compose_publishes_each_host_port_once_and_only_on_loopback() -> None:
    seen: dict[str, str] = {}
    for name, svc in services().items():
        for port in svc.get("ports") or []:
            host = str(port).rsplit(":", 1)[0]
            assert host.startswith("127.0.0.1:"), f"service {name} publishes {port} on every interface"
            assert host not in seen, f"{host} is published by {seen.get(host)} and {name}"
            seen[host] = name
    assert "ports" not in services()["serving"], "replicas must not publish ports (they would collide)"


def test_compose_serving_replicas_sit_behind_the_proxy() -> None:
    svcs = services()
    serving = svcs["serving"]
    assert int(serving["deploy"]["replicas"]) >= 2
    port = str(serving["environment"]["ENCORE_SERVE__PORT"])
    conf = (COMPOSE_DIR / "nginx.conf").read_text()
    upstreams = re.findall(r"^\s*server\s+([\w.-]+):(\d+)", conf, re.MULTILINE)
    assert upstreams == [("serving", port)], f"nginx.conf upstream {upstreams} is not serving:{port}"
    mount = [v for v in svcs["proxy"]["volumes"] if "nginx.conf" in v]
    assert mount and (COMPOSE_DIR / mount[0].split(":")[0]).is_file()
    assert conf.count("{") == conf.count("}"), "nginx.conf braces do not balance"


def test_compose_dagster_workspace_points_at_the_code_location() -> None:
    workspace = yaml.safe_load((DOCKER_DIR / "workspace.yaml").read_text())
    (location,) = workspace["load_from"]
    grpc = location["grpc_server"]
    code = services()[grpc["host"]]
    assert ["-p", str(grpc["port"])] == code["command"][code["command"].index("-p"):code["command"].index("-p") + 2]
    assert code["command"][code["command"].index("--location-name") + 1] == grpc["location_name"]
    for name in ("dagster-webserver", "dagster-daemon"):
        assert "/opt/dagster/workspace.yaml" in services()[name]["command"]
    dockerfile = (DOCKER_DIR / "dagster.Dockerfile").read_text()
    assert "COPY infra/docker/workspace.yaml /opt/dagster/workspace.yaml" in dockerfile


def test_compose_dagster_url_names_the_psycopg2_driver() -> None:
    # dagster-postgres needs psycopg2; SQLAlchemy maps a bare postgresql:// to psycopg 3 (infra/docker/dagster.yaml).
    env = services()["dagster-code"]["environment"]
    assert env["ENCORE_DAGSTER__POSTGRES_URL"].startswith("postgresql+psycopg2://")
    secret = next(d for d in k8s_docs(K8S_SECRET_EXAMPLE) if d["metadata"]["name"] == "encore-secrets")
    assert secret["stringData"]["ENCORE_DAGSTER__POSTGRES_URL"].startswith("postgresql+psycopg2://")


def test_compose_postgres_creates_every_database_the_urls_name() -> None:
    init = (COMPOSE_DIR / "postgres-init.sql").read_text()
    created = set(re.findall(r"CREATE DATABASE (\w+)", init))
    env = {**services()["dagster-code"]["environment"], **services()["mlflow"]["environment"]}
    named = {url.rsplit("/", 1)[1] for key, url in env.items() if str(url).startswith("postgresql")}
    assert named == {"mlflow", "dagster", "feast"} and named <= created, (named, created)


# ================================================================================================ tests: settings


def _all_encore_names() -> dict[str, str]:
    """Every ENCORE_* variable the deployment assets set, with where it was found."""
    names: dict[str, str] = {}
    for name, svc in services().items():
        for key in svc.get("environment") or {}:
            names.setdefault(key, f"compose service {name}")
    for key in read_env_file(ENV_EXAMPLE, commented=True):
        names.setdefault(key, ".env.example")
    for key in read_env_file(K8S_ENV, commented=True):
        names.setdefault(key, "k8s/encore.env")
    for path, obj in k8s_objects():
        for key in (obj.get("stringData") or {}) | (obj.get("data") or {}):
            names.setdefault(key, f"{path.name} {obj['kind']} {obj['metadata']['name']}")
    for path, workload, spec in pod_specs():
        for c in containers(spec):
            for e in c.get("env", []):
                names.setdefault(e["name"], f"{path.name} {workload['metadata']['name']}")
    for path in dockerfiles():
        for keyword, rest in dockerfile_instructions(path):
            if keyword == "ENV":
                for key in re.findall(r"(\w+)=", rest):
                    names.setdefault(key, path.name)
    return {k: v for k, v in names.items() if k.startswith("ENCORE_")}


def test_every_encore_variable_is_a_settings_field() -> None:
    names = _all_encore_names()
    assert len(names) >= 10, names
    unknown = {n: where for n, where in sorted(names.items())
               if n not in NON_FIELD_ENCORE_VARS and settings_path(n) is None}
    assert not unknown, "ENCORE_* variables that are not fields of infra.settings.EncoreSettings:\n" + "\n".join(
        f"  {n}  (in {where})" for n, where in unknown.items())


def _settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    from infra.settings import EncoreSettings

    monkeypatch.chdir(tmp_path)  # no ./encore.yaml of a developer's checkout
    monkeypatch.delenv("ENCORE_CONFIG", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    return EncoreSettings()


def test_compose_environment_is_a_complete_production_configuration(monkeypatch, tmp_path) -> None:
    env = {k: v for k, v in services()["serving"]["environment"].items() if k.startswith("ENCORE_")}
    settings = _settings_from(env, monkeypatch, tmp_path)
    assert settings.profile == "production"
    assert settings.kafka_bootstrap == "kafka:9092" and "kafka" in services()
    assert settings.mlflow_tracking_uri == "http://mlflow:5000" and "mlflow" in services()
    assert settings.serve.port == 8000 and settings.serve.host == "0.0.0.0"
    assert str(settings.data_dir) == "/var/lib/encore"
    for svc in ("ingest", "dagster-code", "dagster-webserver", "dagster-daemon", "bootstrap"):
        assert "encore-data:/var/lib/encore" in services()[svc]["volumes"], f"{svc} lacks the data volume"


def test_k8s_config_and_secret_template_are_a_complete_production_configuration(monkeypatch, tmp_path) -> None:
    env = read_env_file(K8S_ENV)
    secret = next(d for d in k8s_docs(K8S_SECRET_EXAMPLE) if d["metadata"]["name"] == "encore-secrets")
    settings = _settings_from({**env, **secret["stringData"]}, monkeypatch, tmp_path)
    assert settings.profile == "production"
    assert settings.kafka.security_protocol == "SASL_SSL"
    assert settings.mlflow_tracking_uri == "http://mlflow:5000"
    assert {"mlflow"} <= {o["metadata"]["name"] for _, o in k8s_objects() if o["kind"] == "Service"}


# ================================================================================================ tests: commands


def test_every_command_uses_real_subcommands_and_options() -> None:
    checked, problems = 0, []
    for where, argv in all_container_commands():
        for tokens in command_lines(argv):
            checked += 1
            problems += [f"{where}: {p}" for p in check_cli(tokens)]
    assert checked >= 15, f"only {checked} command lines found"
    assert not problems, "\n".join(problems)


def test_the_command_checker_catches_mistakes() -> None:
    assert check_cli(["encore", "ingest", "--follow"]) == []
    assert check_cli(["encore", "ingest", "--folow"]), "a misspelt option must be reported"
    assert check_cli(["encore", "serv"]), "an unknown subcommand must be reported"
    assert check_cli(["dagster", "code-server", "start", "-m", "x", "--no-such-flag"])
    assert list(command_lines(["/bin/sh", "-c", "x=1\nexec encore ingest --follow --partitions \"$p\""])) == [
        ["encore", "ingest", "--follow", "--partitions", "$p"]]


# ================================================================================================ tests: Dagster


def test_dagster_instance_config_is_valid_for_the_installed_dagster() -> None:
    from dagster._config import process_config
    from dagster._core.instance.config import dagster_instance_config

    config, _ = dagster_instance_config(str(DOCKER_DIR))  # raises on unknown or malformed keys
    assert config["storage"]["postgres"]["postgres_url"] == {"env": "ENCORE_DAGSTER__POSTGRES_URL"}
    import importlib

    for key in ("run_coordinator", "run_launcher", "local_artifact_storage", "compute_logs"):
        section = config[key]
        cls = getattr(importlib.import_module(section["module"]), section["class"])
        result = process_config(cls.config_type(), section.get("config") or {})
        assert result.success, f"dagster.yaml {key}: {[e.message for e in result.errors]}"
    # Step outputs and logs on the shared data volume, where the CLI's own instance keeps them too.
    assert config["local_artifact_storage"]["config"]["base_dir"].startswith("/var/lib/encore/")
    assert config["compute_logs"]["config"]["base_dir"].startswith("/var/lib/encore/")


def test_dagster_workspace_is_valid() -> None:
    from dagster._core.workspace.config_schema import ensure_workspace_config

    path = DOCKER_DIR / "workspace.yaml"
    ensure_workspace_config(yaml.safe_load(path.read_text()), str(path))


# ================================================================================================ tests: Kubernetes


def test_k8s_objects_are_well_formed() -> None:
    objects = k8s_objects()
    assert len(objects) >= 15
    for path, obj in objects:
        for key in ("apiVersion", "kind"):
            assert obj.get(key), f"{path.name}: an object without {key}"
        assert obj.get("metadata", {}).get("name"), f"{path.name}: {obj['kind']} without metadata.name"
    names = [(o["kind"], o["metadata"]["name"]) for _, o in objects]
    assert len(names) == len(set(names)), f"duplicate objects: {names}"


@pytest.mark.parametrize("kustomization", [K8S_DIR / "kustomization.yaml", K8S_DIR / "training" / "kustomization.yaml"],
                         ids=["k8s", "k8s/training"])
def test_kustomizations_list_every_manifest_beside_them(kustomization: Path) -> None:
    k = yaml.safe_load(kustomization.read_text())
    here = kustomization.parent
    for resource in k["resources"]:
        assert (here / resource).is_file(), f"{kustomization}: resource {resource} does not exist"
    for gen in k.get("configMapGenerator", []):
        for env in gen.get("envs", []):
            assert (here / env).is_file(), f"{kustomization}: env file {env} does not exist"
    manifests = {p.name for p in here.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
    assert manifests == set(k["resources"]), f"not listed (or listed but missing): {manifests ^ set(k['resources'])}"
    # Every image in these manifests has its tag set in this kustomization (never an implicit :latest).
    images = {i["name"] for i in k.get("images", [])}
    for path in here.glob("*.yaml"):
        if path.name in ("kustomization.yaml", "secret.example.yaml"):
            continue
        for obj in k8s_docs(path):
            spec = obj.get("spec", {}).get("template", {}).get("spec")
            for c in containers(spec) if spec else []:
                assert c["image"] in images, f"{path.name}: image {c['image']} has no entry in images:"


def test_k8s_selectors_services_and_ports_match_their_pods() -> None:
    objects = k8s_objects()
    pods = {o["metadata"]["name"]: (o, s) for _, o, s in pod_specs()}
    for name, (workload, spec) in pods.items():
        if workload["kind"] == "Job":
            continue
        selector = workload["spec"]["selector"]["matchLabels"]
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), f"{workload['kind']} {name}: selector {selector} ≠ labels {labels}"
    for _, svc in ((p, o) for p, o in objects if o["kind"] == "Service"):
        selector = svc["spec"]["selector"]
        matched = [(w, s) for w, s in pods.values()
                   if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert matched, f"Service {svc['metadata']['name']} selects no pods"
        for port in svc["spec"].get("ports", []):
            target = port.get("targetPort", port["port"])
            for _, spec in matched:
                ports = {p.get("name") for c in spec["containers"] for p in c.get("ports", [])} | \
                        {p["containerPort"] for c in spec["containers"] for p in c.get("ports", [])}
                assert target in ports, f"Service {svc['metadata']['name']}: targetPort {target} not in {ports}"
    for _, obj in objects:
        if obj["kind"] == "PodDisruptionBudget":
            sel = obj["spec"]["selector"]["matchLabels"]
            assert any(sel.items() <= w["spec"]["template"]["metadata"]["labels"].items() for w, _ in pods.values())
        if obj["kind"] == "HorizontalPodAutoscaler":
            assert obj["spec"]["scaleTargetRef"]["name"] in pods
        if obj["kind"] == "StatefulSet":
            service = obj["spec"]["serviceName"]
            assert any(o["kind"] == "Service" and o["metadata"]["name"] == service and
                       o["spec"].get("clusterIP") == "None" for _, o in objects), f"no headless Service {service}"


def test_k8s_references_resolve() -> None:
    objects = k8s_objects()
    services_ = {o["metadata"]["name"]: o for _, o in objects if o["kind"] == "Service"}
    secrets = {o["metadata"]["name"] for _, o in objects if o["kind"] == "Secret"}
    claims = {o["metadata"]["name"] for _, o in objects if o["kind"] == "PersistentVolumeClaim"}
    generated = {g["name"] for g in yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())["configMapGenerator"]}
    for path, workload, spec in pod_specs():
        where = f"{path.name} {workload['metadata']['name']}"
        for c in containers(spec):
            for source in c.get("envFrom", []):
                if "configMapRef" in source:
                    assert source["configMapRef"]["name"] in generated, f"{where}: unknown ConfigMap"
                    assert path.parent == K8S_DIR, f"{where}: {source} is generated only in infra/k8s"
                if "secretRef" in source:
                    assert source["secretRef"]["name"] in secrets, f"{where}: Secret not in secret.example.yaml"
            for mount in c.get("volumeMounts", []):
                assert mount["name"] in {v["name"] for v in spec.get("volumes", [])}, f"{where}: no volume {mount}"
        for volume in spec.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, f"{where}: unknown PVC"
    for _, ingress in ((p, o) for p, o in objects if o["kind"] == "Ingress"):
        for rule in ingress["spec"]["rules"]:
            for p in rule["http"]["paths"]:
                backend = p["backend"]["service"]
                assert backend["name"] in services_, f"Ingress backend {backend['name']} is not a Service"
                port_names = {sp.get("name") for sp in services_[backend["name"]]["spec"]["ports"]}
                assert backend["port"].get("name") in port_names or backend["port"].get("number")
                assert any(r == p["path"] or r.startswith(p["path"] + "/") for r in serving_routes()), \
                    f"Ingress path {p['path']} matches no route of serving/app.py"


def test_k8s_serving_probes_use_real_routes_and_resources_are_set() -> None:
    routes = serving_routes()
    probes_seen = set()
    for path, workload, spec in pod_specs():
        for c in containers(spec):
            assert c.get("resources", {}).get("requests"), f"{workload['metadata']['name']}/{c['name']}: no requests"
            assert c.get("securityContext", {}).get("allowPrivilegeEscalation") is False
            if c["image"] != "encore/serving":
                continue
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                http = c[probe]["httpGet"]
                assert http["path"] in routes, f"{probe} path {http['path']} is not a serving route"
                probes_seen.add((probe, http["path"]))
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == 10001
    assert ("readinessProbe", "/readyz") in probes_seen and ("livenessProbe", "/healthz") in probes_seen


def test_k8s_ingest_workers_split_the_partitions_between_the_replicas() -> None:
    (ingest,) = [o for _, o in k8s_objects() if o["kind"] == "StatefulSet" and o["metadata"]["name"] == "ingest"]
    (c,) = ingest["spec"]["template"]["spec"]["containers"]
    workers = int(next(e["value"] for e in c["env"] if e["name"] == "INGEST_WORKERS"))
    assert workers == ingest["spec"]["replicas"], "INGEST_WORKERS must equal the StatefulSet's replicas"
    partitions = int(read_env_file(K8S_ENV)["ENCORE_TOPICS__PARTITIONS"])
    assert partitions >= workers, "more ingest workers than partitions: some would own none"
    # The shell in the manifest: worker k owns k, k+N, ...; together they own every partition exactly once.
    script = c["args"][2]
    owned: list[int] = []
    for ordinal in range(workers):
        out = subprocess.run(["sh", "-c", script.replace("exec encore", "echo encore")],
                             env={**os.environ, "HOSTNAME": f"ingest-{ordinal}", "INGEST_WORKERS": str(workers),
                                  "ENCORE_TOPICS__PARTITIONS": str(partitions)},
                             capture_output=True, text=True, check=True).stdout
        parts = re.search(r"--partitions (\S+)", out).group(1)
        owned += [int(p) for p in parts.split(",")]
    assert sorted(owned) == list(range(partitions)), f"partitions owned: {sorted(owned)}"


def test_k8s_offline_index_writers_share_a_node() -> None:
    # SQLite WAL on the data volume: the pods that write the offline index must be scheduled on one host.
    label = {"encore.io/offline-index-writer": "true"}
    writers = {o["metadata"]["name"]: s for _, o, s in pod_specs()
               if label.items() <= o["spec"]["template"]["metadata"].get("labels", {}).items()}
    assert {"ingest", "dagster-code"} <= set(writers), f"writers labelled: {sorted(writers)}"
    for name, spec in writers.items():
        affinity = spec.get("affinity", {}).get("podAffinity", {})
        terms = affinity.get("requiredDuringSchedulingIgnoredDuringExecution", [])
        assert any(t["topologyKey"] == "kubernetes.io/hostname" and t["labelSelector"]["matchLabels"] == label
                   for t in terms), f"{name}: no required podAffinity to the other offline-index writers"


def test_k8s_training_job_is_consistent() -> None:
    objects = [o for _, o in k8s_objects()]
    (job,) = [o for o in objects if o["kind"] == "Job" and o["metadata"]["name"] == "encore-train"]
    spec = job["spec"]
    pod = spec["template"]["spec"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert spec["completionMode"] == "Indexed"
    assert int(env["NNODES"]) == spec["completions"] == spec["parallelism"], "NNODES, completions, parallelism"
    # Pod k of an Indexed Job is <job>-<k> under its subdomain: node 0 hosts the rendezvous.
    assert env["MASTER"] == f"{job['metadata']['name']}-0.{pod['subdomain']}"
    headless = [o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == pod["subdomain"]]
    assert headless and headless[0]["spec"]["clusterIP"] == "None"
    assert headless[0]["spec"].get("publishNotReadyAddresses") is True
    assert any(p["port"] == int(env["RDZV_PORT"]) for p in headless[0]["spec"]["ports"])
    assert pod["restartPolicy"] == "Never" and spec["backoffLimit"] == 0


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed (it renders kustomize offline)")
@pytest.mark.parametrize("where", ["infra/k8s", "infra/k8s/training"])
def test_kustomize_renders(where: str) -> None:
    out = subprocess.run(["kubectl", "kustomize", str(ROOT / where)], capture_output=True, text=True, timeout=60,
                         check=False)
    assert out.returncode == 0, out.stderr
    kinds = [d["kind"] for d in yaml.safe_load_all(out.stdout) if d]
    assert kinds and "Secret" not in kinds, "the Secret must come from the operator, not from kustomize"
