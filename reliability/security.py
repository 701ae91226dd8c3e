"""Security: names that try to leave the workspace, unpickling, UI binds, leaked credentials.

- Arch and cell names with ``../``, absolute paths or shell metacharacters are refused by the
  params validation, by every stage's command line and by the flow, and nothing is written
  outside the workspace; through ``dvc repro`` (a shell command per stage) they stay one
  quoted argument, so no injected command runs.
- The source is scanned (``ast``): no ``pickle`` / ``dill`` / ``joblib`` / ``cloudpickle``
  import, no ``torch.load`` without ``weights_only=True``, no ``allow_pickle=True``, no
  ``read_pickle``. The scanner is first checked on planted offences.
- Every server the project starts binds 127.0.0.1 (scripts, Python command lines); no
  ``0.0.0.0`` in code.
- A fake ``HF_TOKEN`` (and other credentials) in the environment of train and register
  appears nowhere: not in the stage output, the MLflow store or artifacts, reports, dvc.lock.
"""

from __future__ import annotations

import ast
import json
import re
import sqlite3
from pathlib import Path

import yaml

from reliability import registry_state as R
from reliability import workspace as W
from reliability.core import Context, Trial, fault
from reliability.workspace import STAGES

CODE_DIRS = (
    "mc_core",
    "mc_registry",
    "tasks",
    "flows",
    "bench",
    "reliability",
    "mc_cli",
    "mc_lmms",
    "mc_vllm",
    "scripts",
    "tests",
)
BAD_NAMES = (
    "../evil",
    "/tmp/mc-faults-abs-escape",
    "tiny-llava/../../evil",
    "x; touch pwned-semicolon #",
    "$(touch pwned-subshell)",
    "`touch pwned-backtick`",
    "a b",
    "x'y",
)
PICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve"}


# Every stage entry point called with each bad name; prints {"<module> <name>": verdict}.
_CLI = """
import importlib, json, sys
out = {}
for name in json.loads(sys.argv[1]):
    for module, extra in (("tasks.train", ["--rate", "0.5"]), ("tasks.base", []),
                          ("tasks.evaluate", ["--rate", "0.5"]),
                          ("tasks.register", ["--rate", "0.5"])):
        try:
            importlib.import_module(module).main(["--arch", name, *extra])
            out[f"{module} {name}"] = "ACCEPTED"
        except ValueError as err:
            ok = repr(name) in str(err) and ("unknown arch" in str(err) or "choose" in str(err))
            out[f"{module} {name}"] = "refused" if ok else f"unclear: {err}"
        except BaseException as err:
            out[f"{module} {name}"] = f"{type(err).__name__}: {err}"
print(json.dumps(out))
"""


@fault("names-escape-workspace", "security")
def names(ctx: Context, trial: int) -> Trial:
    """arch names `../evil`, an absolute path, `;`, `$()`, backticks, spaces, a quote: refused
    by params validation, by the stages' --arch (train, base, evaluate, register) and by the
    flow; in params.yaml run by `dvc repro` no injected command runs; nothing written outside
    the workspace"""
    from flows import workspace as fws
    from tasks import params as config

    ws = ctx.clone("names")
    before = sorted(p.name for p in ws.parent.iterdir())
    raw = config.read_yaml(ws / "params.yaml")
    problems = []
    for name in BAD_NAMES:
        bad = {**raw, "grid": {**raw["grid"], "archs": [name]}}
        try:
            config.validate(bad)
            problems.append(f"params accepted {name!r}")
        except ValueError as err:
            if repr(name) not in str(err):
                problems.append(f"params error does not name {name!r}: {err}")
        try:
            fws.select_cells([W.CELL], config.validate(raw).grid, [name], None)
            problems.append(f"flow accepted archs=[{name!r}]")
        except ValueError:
            pass
    # Each stage's command line (its main(), in one process for speed).
    r = W.python(ws, "-c", _CLI, json.dumps(BAD_NAMES))
    try:
        verdicts = json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        verdicts = {"harness": f"exit {r.returncode}: {(r.stderr or '')[-300:]}"}
    problems += [f"{k}: {v}" for k, v in verdicts.items() if v != "refused"]
    # Through DVC: the names in params.yaml, each stage run by `dvc repro -s` (a shell).
    shellish = [n for n in BAD_NAMES if any(c in n for c in ";$`# ") and "'" not in n]
    p = yaml.safe_load((ws / "params.yaml").read_text())
    p["grid"]["archs"] = shellish
    (ws / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    for name in shellish:  # the shared-arch stage and one cell's first stage per name
        for stage in (f"base@{name}", f"train@{name}-0.5"):
            W.dvc(ws, "repro", "-s", stage)
    pwned = sorted(str(x.relative_to(ws.parent)) for x in ws.parent.rglob("pwned*"))
    pwned += sorted(str(x) for x in Path("/tmp").glob("mc-faults-abs-escape*"))
    after = sorted(p.name for p in ws.parent.iterdir())
    outside = [n for n in after if n not in before and not n.startswith(ws.name)]
    problems += [f"injected command ran: {pwned}"] if pwned else []
    problems += [f"written outside the workspace: {outside}"] if outside else []
    how = (
        f"{len(BAD_NAMES)} names x (params, 4 stage CLIs, flow) refused and named; "
        f"{len(shellish)} shell-metacharacter names through `dvc repro -s` stages: no "
        "injected command ran, nothing written outside the workspace. Limit: a name with a "
        "single quote in a hand-edited params.yaml could break out of dvc.yaml's quoting "
        "under a bare `dvc repro` (params.yaml is as trusted as dvc.yaml's commands; "
        "`make run` and the flow validate it first)"
    )
    return Trial(not problems, False, how if not problems else "; ".join(problems)[:1500])


def scan_source(files: list[Path]) -> list[str]:
    """Unpickling risks in Python files: pickler imports, torch.load without
    weights_only=True, allow_pickle=True, read_pickle."""
    found = []
    for f in files:
        try:
            tree = ast.parse(f.read_text(), filename=str(f))
        except SyntaxError as err:
            found.append(f"{f}: does not parse: {err}")
            continue
        for node in ast.walk(tree):
            where = f"{f}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Import | ast.ImportFrom):
                mods = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module or ""]
                )
                for m in mods:
                    if m.split(".")[0] in PICKLERS:
                        found.append(f"{where}: imports {m}")
            elif isinstance(node, ast.Call):
                fn = node.func
                name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
                owner = getattr(fn.value, "id", "") if isinstance(fn, ast.Attribute) else ""
                kw = {k.arg: k.value for k in node.keywords}
                if name == "load" and owner == "torch":
                    wo = kw.get("weights_only")
                    if not (isinstance(wo, ast.Constant) and wo.value is True):
                        found.append(f"{where}: torch.load without weights_only=True")
                ap = kw.get("allow_pickle")
                if isinstance(ap, ast.Constant) and ap.value is True:
                    found.append(f"{where}: allow_pickle=True")
                if name in ("read_pickle", "to_pickle"):
                    found.append(f"{where}: {name}")
    return found


def project_files(root: Path = W.ROOT) -> list[Path]:
    """The project's Python files (every package, scripts and tests)."""
    return sorted(
        f for d in CODE_DIRS for f in (root / d).rglob("*.py") if "__pycache__" not in f.parts
    )


@fault("no-unpickling", "security", ci=True, reference=False)
def no_pickle(ctx: Context, trial: int) -> Trial:
    """the source scanned with ast: no pickle/dill/joblib/cloudpickle import, no torch.load
    without weights_only=True, no allow_pickle=True or read_pickle (the scanner first catches
    five planted offences)"""
    plant = ctx.scratch("plant") / "bad.py"
    plant.write_text(
        "import pickle\nimport torch\nfrom joblib import load\n"
        "torch.load('x')\ntorch.load('x', weights_only=False)\n"
        "import numpy as np\nnp.load('x', allow_pickle=True)\n"
    )
    caught = scan_source([plant])
    files = project_files()
    found = scan_source(files)
    saves = [
        f"{f.relative_to(W.ROOT)}"
        for f in files
        if "tests" not in f.parts and re.search(r"\btorch\.save\(", f.read_text())
    ]
    how = (
        f"scanner caught {len(caught)}/5 planted offences; {len(files)} project files: "
        f"{len(found)} findings"
        + (f": {found}" if found else "")
        + (f"; torch.save (read back only with weights_only=True) in {saves}" if saves else "")
    )
    return Trial(len(caught) == 5 and not found and len(files) > 50, False, how)


@fault("ui-bind-localhost", "security", reference=False)
def ui_bind(ctx: Context, trial: int) -> Trial:
    """every server started by the project (scripts/serve.sh: Prefect server, MLflow UI; the
    vLLM server command) binds 127.0.0.1; no 0.0.0.0 anywhere in code or scripts"""
    serve = (W.ROOT / "scripts" / "serve.sh").read_text()
    problems = []
    for tool in ("prefect server start", "mlflow server"):
        lines = [ln for ln in serve.splitlines() if tool in ln]
        cmd = " ".join(serve.split(tool, 1)[1].split("\n")[:2]) if lines else ""
        host = re.search(r"--host\s+(\S+)", cmd)
        if not lines or not host or host.group(1) not in ("127.0.0.1", "localhost"):
            problems.append(f"{tool}: host {host.group(1) if host else 'unset'}")
    from mc_vllm.server import server_command

    cmd = server_command("python", "m")
    vhost = cmd[cmd.index("--host") + 1] if "--host" in cmd else "unset"
    if vhost != "127.0.0.1":
        problems.append(f"vllm server host {vhost}")
    # the harness itself names the string it looks for
    texts = [
        f
        for f in project_files()
        if not {"tests", "reliability"} & set(f.relative_to(W.ROOT).parts)
    ]
    texts += sorted((W.ROOT / "scripts").glob("*.sh")) + [
        W.ROOT / "Makefile",
        W.ROOT / "prefect.yaml",
    ]
    wide = [str(f.relative_to(W.ROOT)) for f in texts if f.is_file() and "0.0.0.0" in f.read_text()]
    problems += [f"0.0.0.0 in {wide}"] if wide else []
    how = (
        "scripts/serve.sh: prefect server --host 127.0.0.1, mlflow server --host 127.0.0.1; "
        f"vLLM server --host {vhost}; no 0.0.0.0 in {len(texts)} code/script files"
    )
    return Trial(not problems, False, how if not problems else "; ".join(problems))


SECRETS = {
    "HF_TOKEN": "hf_FAKEfaultsTOKEN0123456789abcdef",
    "HUGGING_FACE_HUB_TOKEN": "hf_FAKEfaultsHUB0123456789",
    "MLFLOW_TRACKING_PASSWORD": "FAKEfaultsPASSWORD42",
    "AWS_SECRET_ACCESS_KEY": "FAKEfaultsAWSsecret0123456789",
    "GITHUB_TOKEN": "ghp_FAKEfaultsGITHUB0123456789",
}


@fault("token-not-logged", "security", ci=True)
def tokens(ctx: Context, trial: int) -> Trial:
    """fake HF_TOKEN, hub, MLflow, AWS and GitHub credentials in the environment of a train and
    a register stage run by `dvc repro`: none appears in the stage output, the MLflow store
    (params, tags, metrics) or artifacts, reports/ or dvc.lock"""
    ws = ctx.clone("tokens")
    R.unregister(ws)
    W.forget(ws, STAGES["train"])
    r = W.dvc(ws, "repro", "--no-run-cache", **SECRETS)
    out = (r.stdout or "") + (r.stderr or "")
    if r.returncode != 0 or STAGES["register"] not in W.ran(out):
        return Trial(False, False, f"repro failed or did not register: {out[-500:]}")
    leaks = [k for k, v in SECRETS.items() if v in out]
    with sqlite3.connect(ws / "mlflow.db") as con:
        dump = "\n".join(con.iterdump())
    leaks += [f"{k} in mlflow.db" for k, v in SECRETS.items() if v in dump]
    scanned = 0
    for d in ("mlartifacts", "reports", "models", "cache"):
        for f in (ws / d).rglob("*"):
            if f.is_file():
                scanned += 1
                data = f.read_bytes()
                leaks += [
                    f"{k} in {f.relative_to(ws)}" for k, v in SECRETS.items() if v.encode() in data
                ]
    lock = (ws / "dvc.lock").read_text()
    leaks += [f"{k} in dvc.lock" for k, v in SECRETS.items() if v in lock]
    how = (
        f"{len(SECRETS)} fake credentials set; `dvc repro` ran {W.ran(out)}; scanned the "
        f"output, mlflow.db ({len(dump) // 1024} KiB dump), {scanned} files of mlartifacts/ "
        f"reports/ models/ cache/, dvc.lock: {leaks if leaks else 'no leak'}"
    )
    return Trial(not leaks, False, how)
