"""The Docker image, the Singularity recipe and the app under container conditions.

There is no container engine on the test machines, so the image is checked in three
ways: statically (hadolint; the recipe parsed with spython; the Dockerfile's contract),
through the pieces it runs (``docker/install.sh``, ``docker/fetch_templates.py``,
``brainage_xai.utils.env``), and end to end: the image's install steps are replayed in
a clean virtual environment and the entry point runs as an unprivileged user with HOME
unset, a read-only BIDS_DIR and no network, through the participant and group levels on
a small simulated cohort.

As root (CI) the unprivileged user is ``nobody`` (via ``setpriv``) and the network is
removed with ``unshare -n``; otherwise the current user runs the app and read-only
folders are made with ``chmod``. In both cases an audit hook in the child interpreters
records (and refuses) every attempt to reach the network, so "never tries" is checked,
not only "cannot".
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from brainage_xai._version import __version__
from brainage_xai.utils.env import configure_runtime, container_info

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
IS_ROOT = os.geteuid() == 0
NOBODY = 65534

# ----------------------------------------------------------------------- helpers ----


def _tool(name: str) -> str:
    path = BIN / name
    assert path.exists(), f"{name} is not installed in {BIN}: pip install -e '.[test]'"
    return str(path)


def _as_user(cmd: list[str]) -> list[str]:
    """Run ``cmd`` unprivileged: as ``nobody`` when we are root, else as ourselves."""
    if not IS_ROOT:
        return cmd
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *cmd]


def _offline(cmd: list[str]) -> list[str]:
    """Run ``cmd`` in a network namespace with no interfaces up, where we can."""
    probe = (
        subprocess.run(["unshare", "-n", "true"], capture_output=True, check=False)
        if shutil.which("unshare")
        else None
    )
    if probe is not None and probe.returncode == 0:
        return ["unshare", "-n", *cmd]
    return cmd  # the audit hook below still records and refuses every attempt


def _user_writable(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    if IS_ROOT:
        os.chown(path, NOBODY, NOBODY)
    return path


def _read_only_tree(path: Path) -> None:
    """Make ``path`` read-only for the unprivileged user (root owns it; no write bits)."""
    for dirpath, _dirnames, filenames in os.walk(path):
        for name in filenames:
            os.chmod(Path(dirpath) / name, 0o444)
        os.chmod(dirpath, 0o555)


def _tree_digest(path: Path) -> dict[str, str]:
    out = {}
    for p in sorted(path.rglob("*")):
        rel = str(p.relative_to(path))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _scratch_parent() -> str | None:
    """tmpfs when it has room: the replayed environment is 1.5 GB in 40,000 files, and
    writing and deleting those on a busy disk takes minutes."""
    shm = "/dev/shm"
    if (
        os.path.isdir(shm)
        and os.access(shm, os.W_OK)
        and not os.statvfs(shm).f_flag & os.ST_NOEXEC  # the venv's programs must run
        and shutil.disk_usage(shm).free > 4e9
    ):
        return shm
    return None


@pytest.fixture(scope="module")
def scratch():
    """A folder the unprivileged user can traverse (pytest's tmp_path is root-only)."""
    base = Path(tempfile.mkdtemp(prefix="brainage-xai-ctest-", dir=_scratch_parent()))
    os.chmod(base, 0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


NET_GUARD = textwrap.dedent(
    '''
    """Test guard: record and refuse every attempt to reach the network."""
    import os
    import sys

    _LOG = os.environ.get("BRAINAGE_XAI_NETLOG")
    _LOCAL = {None, "localhost", "127.0.0.1", "::1", b"localhost"}

    def _hook(event, args):
        if event == "socket.connect" and isinstance(args[1], tuple):
            what = f"connect {args[1]!r}"
        elif event == "socket.getaddrinfo" and args[0] not in _LOCAL:
            what = f"getaddrinfo {args[0]!r}"
        else:
            return
        if _LOG:
            with open(_LOG, "a", encoding="utf-8") as fh:
                fh.write(f"{os.getpid()} {what}\\n")
        raise OSError(f"network access in a test of an offline run: {what}")

    sys.addaudithook(_hook)
    '''
)


@pytest.fixture(scope="module")
def net_guard(scratch):
    """A ``sitecustomize`` folder (for PYTHONPATH) and the log file it appends to."""
    folder = scratch / "netguard"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(NET_GUARD, encoding="utf-8")
    log = _user_writable(scratch / "netlog") / "attempts.log"
    return folder, log


def _python_as_user_args(code: str, args: list[str], env: dict, cwd: Path):
    """Run ``code`` with ``args`` in a fresh interpreter, unprivileged and offline."""
    proc = subprocess.run(
        _offline(_as_user([sys.executable, "-c", code, *args])),
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, f"child failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc


def _base_env(net_guard, **extra) -> dict:
    """A clean environment, as ``singularity run --cleanenv`` gives: no HOME."""
    folder, log = net_guard
    env = {
        "PATH": f"{BIN}:/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "PYTHONPATH": f"{folder}{os.pathsep}{ROOT}",
        "BRAINAGE_XAI_NETLOG": str(log),
    }
    env.update(extra)
    return env


def _net_attempts(net_guard) -> str:
    log = net_guard[1]
    return log.read_text(encoding="utf-8") if log.exists() else ""


# ------------------------------------------------------------- static checks ----


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    logical, buf = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        logical.append(buf + stripped)
        buf = ""
    out = []
    for item in logical:
        word, _, rest = item.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def _final_stage(instructions):
    starts = [i for i, (word, _) in enumerate(instructions) if word == "FROM"]
    return instructions[starts[-1] :]


def test_hadolint_passes_on_the_dockerfile():
    proc = subprocess.run(
        [_tool("hadolint"), "--failure-threshold", "info", str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_pins_its_bases_and_builds_in_stages():
    instructions = _dockerfile_instructions()
    args = {}
    for word, rest in instructions:
        if word == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            args.setdefault(key, value)
    froms = [rest for word, rest in instructions if word == "FROM"]
    assert len(froms) == 2, froms
    for rest in froms:
        image = rest.split()[0]
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
        # an exact release (x.y.z) or a digest, never a floating tag
        assert re.search(r"(:\d+\.\d+\.\d+[\w.-]*$)|(@sha256:[0-9a-f]{64}$)", image), image
        assert "latest" not in image
    assert args["PYTHON_IMAGE"].endswith("-slim-bookworm")
    # the CUDA-capable build is the default, CPU-only one build argument away
    assert args["TORCH_VARIANT"] == "cuda"
    assert args["TORCH_VERSION"] == "2.13.0"
    # the Makefile installs the same torch the image does
    assert "torch==2.13.0" in (ROOT / "Makefile").read_text(encoding="utf-8")
    # one source of the version: the package's; the image takes it as a build argument
    # without a default and checks it against the installed package
    assert ("ARG", "VERSION") in instructions and "VERSION" not in args
    assert not any("node" in rest.lower() or "npm" in rest for _, rest in instructions)
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert "brainage_xai/_version.py" in makefile and "--build-arg VERSION=$(VERSION)" in makefile


def test_dockerfile_runtime_contract():
    final = _final_stage(_dockerfile_instructions())
    by_word: dict[str, list[str]] = {}
    for word, rest in final:
        by_word.setdefault(word, []).append(rest)

    assert json.loads(by_word["ENTRYPOINT"][-1]) == ["brainage-xai"]
    assert by_word["WORKDIR"][-1] == "/tmp"
    user = by_word["USER"][-1]
    assert re.fullmatch(r"\d+:\d+", user) and not user.startswith("0"), user

    env = {}
    for rest in by_word["ENV"]:
        for key, value in re.findall(r"(\w+)=(\S+)", rest):
            env[key] = value
    assert env["TEMPLATEFLOW_HOME"] == "/opt/templateflow"
    assert env["TEMPLATEFLOW_AUTOUPDATE"] == "0"
    assert env["HOME"] == "/home/brainage"
    assert env["BRAINAGE_XAI_CONTAINER"] == "docker"
    assert env["DOCKER_IMAGE"] == "${IMAGE_NAME}:${VERSION}"
    assert env["PATH"].startswith("/opt/venv/bin:")
    # cache variables are decided at run time, where HOME's state is known
    for name in ("MPLCONFIGDIR", "XDG_CACHE_HOME", "TORCH_HOME"):
        assert name not in env

    labels = set(re.findall(r"(org\.opencontainers\.image\.[\w.]+)=", " ".join(by_word["LABEL"])))
    for key in ("title", "description", "version", "created", "revision", "source", "licenses"):
        assert f"org.opencontainers.image.{key}" in labels

    copies = " ".join(by_word["COPY"])
    assert "/opt/templateflow" in copies and "/opt/venv" in copies
    run = " ".join(by_word["RUN"])
    assert "bids-validator-deno --version" in run and "useradd" in run
    assert '"brainage-xai ${VERSION}"' in run  # the label's version is the package's


def test_dockerfile_installs_through_the_replayed_scripts():
    instructions = _dockerfile_instructions()
    runs = " ".join(rest for word, rest in instructions if word == "RUN")
    assert "docker/install.sh /opt/venv /src" in runs
    assert "docker/fetch_templates.py" in runs
    # everything the build copies exists and is not excluded by .dockerignore
    allowed = {
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.startswith("!")
    }
    for word, rest in instructions:
        if word == "COPY" and not rest.startswith("--from"):
            *sources, _dest = rest.split()
            for source in sources:
                assert source in allowed, f"COPY {source} is excluded by .dockerignore"
                assert (ROOT / source).exists(), f"COPY {source}: no such file"


def _def_sections() -> tuple[dict[str, str], dict[str, str]]:
    """The header keywords and the %sections of singularity.def."""
    header, sections, current = {}, {}, None
    for line in (ROOT / "singularity.def").read_text(encoding="utf-8").splitlines():
        if line.startswith("%"):
            current = line[1:].split()[0]
            sections[current] = ""
        elif current is None:
            if ":" in line and not line.lstrip().startswith("#"):
                key, _, value = line.partition(":")
                header[key.strip()] = value.strip()
        else:
            sections[current] += line + "\n"
    return header, {k: textwrap.dedent(v).strip() + "\n" for k, v in sections.items()}


def test_singularity_recipe_parses_and_has_its_sections():
    from spython.main.parse.parsers import SingularityParser

    recipe = SingularityParser(str(ROOT / "singularity.def")).recipe["spython-base"]
    # the Docker image of the same version, from the local daemon; the version is a
    # build argument (make singularity passes the package's)
    assert recipe.fromHeader.lower() == "brainage-xai/brainage-xai:{{ version }}"
    assert recipe.cmd == 'exec brainage-xai "$@"'
    assert any("brainage-xai --version" in line for line in recipe.install)  # spython: %test
    assert any("org.opencontainers.image.title" in label for label in recipe.labels)

    header, sections = _def_sections()
    assert header["Bootstrap"] == "docker-daemon"
    assert header["From"] == "brainage-xai/brainage-xai:{{ VERSION }}"
    assert {"help", "runscript", "test", "labels"} <= set(sections)
    assert "--cleanenv" in sections["help"] and "--nv" in sections["help"]
    assert "org.opencontainers.image.version {{ VERSION }}" in sections["labels"]
    assert "apptainer build --build-arg VERSION=$(VERSION)" in (ROOT / "Makefile").read_text()


def test_slurm_examples_are_valid_and_chained():
    examples = ROOT / "docs" / "examples"
    for name in ("participant.sbatch", "group.sbatch", "submit.sh"):
        proc = subprocess.run(
            ["bash", "-n", str(examples / name)], capture_output=True, text=True, check=False
        )
        assert proc.returncode == 0, f"{name}: {proc.stderr}"
    participant = (examples / "participant.sbatch").read_text(encoding="utf-8")
    assert "SLURM_ARRAY_TASK_ID" in participant and "--cleanenv" in participant
    assert '"$BIDS_DIR":/data:ro' in participant
    assert "--nv" in (examples / "group.sbatch").read_text(encoding="utf-8")
    submit = (examples / "submit.sh").read_text(encoding="utf-8")
    assert '--dependency="afterok:${array}"' in submit and "--array=" in submit


# ---------------------------------------------------------- container_info ----


def test_container_info_docker():
    env = {"BRAINAGE_XAI_CONTAINER": "docker", "DOCKER_IMAGE": "brainage-xai/brainage-xai:1.2.3"}
    assert container_info(env) == {"Type": "docker", "Tag": "brainage-xai/brainage-xai:1.2.3"}


def test_container_info_singularity_wins_over_the_docker_variables_it_inherits():
    env = {
        "BRAINAGE_XAI_CONTAINER": "docker",
        "DOCKER_IMAGE": "brainage-xai/brainage-xai:1.2.3",
        "APPTAINER_CONTAINER": "/images/brainage-xai.sif",
        "APPTAINER_NAME": "brainage-xai.sif",
    }
    assert container_info(env) == {
        "Type": "singularity",
        "URI": "/images/brainage-xai.sif",
        "Tag": "brainage-xai/brainage-xai:1.2.3",
    }
    legacy = {"SINGULARITY_CONTAINER": "/images/old.simg"}
    assert container_info(legacy) == {"Type": "singularity", "URI": "/images/old.simg"}


def test_container_info_outside_a_container():
    assert container_info({"HOME": "/home/user", "PATH": "/usr/bin"}) is None
    assert container_info({"APPTAINER_CONTAINER": "  ", "DOCKER_IMAGE": ""}) is None


# --------------------------------------------------------- configure_runtime ----


def test_writable_home_is_left_alone(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {"HOME": str(home), "TEMPLATEFLOW_AUTOUPDATE": "1"}
    changed = configure_runtime(tmp_path / "work", environ=env)
    # only the switch that keeps TemplateFlow offline, forced even when set otherwise
    assert changed == {"TEMPLATEFLOW_AUTOUPDATE": "0"}
    assert env == {"HOME": str(home), "TEMPLATEFLOW_AUTOUPDATE": "0"}
    # probing the default places must not litter HOME with empty folders
    assert list(home.iterdir()) == []
    assert not (tmp_path / "work").exists()


def test_explicit_cache_variables_are_kept_when_writable(tmp_path):
    env = {"HOME": "/nonexistent-home"}
    for name in ("XDG_CACHE_HOME", "MPLCONFIGDIR", "TORCH_HOME", "TEMPLATEFLOW_HOME"):
        env[name] = str(tmp_path / name.lower())
    before = dict(env)
    changed = configure_runtime(tmp_path / "work", environ=env)
    assert changed == {"TEMPLATEFLOW_AUTOUPDATE": "0"}
    assert {k: env[k] for k in before} == before


def test_relative_cache_variable_is_replaced(tmp_path):
    env = {"HOME": str(tmp_path), "MPLCONFIGDIR": "relative/mpl"}
    changed = configure_runtime(tmp_path / "work", environ=env)
    assert changed["MPLCONFIGDIR"] == str((tmp_path / "work" / "cache" / "matplotlib").absolute())
    assert Path(env["MPLCONFIGDIR"]).is_dir()


CHILD = textwrap.dedent(
    """
    import json, os, sys
    from brainage_xai.utils.env import configure_runtime
    work = sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] else None
    changed = configure_runtime(work)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig = plt.figure()
    fig.text(0.5, 0.5, "font cache")   # builds matplotlib's font cache in MPLCONFIGDIR
    fig.canvas.draw()
    import templateflow.conf             # unpacks its file index into TEMPLATEFLOW_HOME
    print(json.dumps({"changed": changed, "mpl": matplotlib.get_configdir(),
                      "tf": str(templateflow.conf.TF_HOME),
                      "env": {k: os.environ.get(k) for k in
                              ("XDG_CACHE_HOME", "MPLCONFIGDIR", "TORCH_HOME",
                               "TEMPLATEFLOW_HOME", "TEMPLATEFLOW_AUTOUPDATE")}}))
    """
)


def _run_child(scratch, net_guard, env_extra, work: Path | None, drop_home: bool):
    """Run :data:`CHILD` unprivileged and offline; returns its report and the process."""
    env = _base_env(net_guard, **env_extra)
    if drop_home:
        env.pop("HOME", None)
    proc = _python_as_user_args(CHILD, [str(work) if work else ""], env, cwd=scratch)
    # matplotlib warns (through logging) when it falls back to a temporary folder itself
    assert "created a temporary" not in proc.stderr, proc.stderr
    assert "Read-only file system" not in proc.stderr and "Permission denied" not in proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc


def test_home_unset_puts_caches_in_the_work_dir(scratch, net_guard):
    case = scratch / "home-unset"
    case.mkdir()
    os.chmod(case, 0o755)
    work = _user_writable(case / "work")
    info, _ = _run_child(case, net_guard, {}, work, drop_home=True)
    cache = work / "cache"
    assert info["env"]["MPLCONFIGDIR"] == str(cache / "matplotlib") == info["mpl"]
    assert info["env"]["XDG_CACHE_HOME"] == str(cache / "xdg")
    assert info["env"]["TORCH_HOME"] == str(cache / "xdg" / "torch")
    assert info["env"]["TEMPLATEFLOW_HOME"] == str(cache / "xdg" / "templateflow") == info["tf"]
    assert info["env"]["TEMPLATEFLOW_AUTOUPDATE"] == "0"
    # the libraries really wrote there
    assert list((cache / "matplotlib").glob("fontlist-*.json"))
    assert (cache / "xdg" / "templateflow" / "tpl-MNI152NLin2009cAsym").is_dir()
    assert _net_attempts(net_guard) == ""


def test_read_only_home_is_never_written(scratch, net_guard):
    case = scratch / "home-ro"
    case.mkdir()
    os.chmod(case, 0o755)
    home = case / "home"
    (home / ".config").mkdir(parents=True)
    (home / ".bashrc").write_text("# user's file\n", encoding="utf-8")
    _read_only_tree(home)
    before = _tree_digest(home)
    work = _user_writable(case / "work")
    info, _ = _run_child(case, net_guard, {"HOME": str(home)}, work, drop_home=False)
    assert info["mpl"] == str(work / "cache" / "matplotlib")
    assert info["tf"] == str(work / "cache" / "xdg" / "templateflow")
    assert _tree_digest(home) == before
    assert _net_attempts(net_guard) == ""


def test_prefetched_read_only_templateflow_is_used_in_place(scratch, net_guard):
    """A populated read-only TemplateFlow home (the image's /opt/templateflow) is kept,
    also when it is the default under a read-only HOME (prefetched on a login node)."""
    case = scratch / "tf-ro"
    case.mkdir()
    os.chmod(case, 0o755)
    home = case / "home"
    tf = home / ".cache" / "templateflow"
    subprocess.run(
        [sys.executable, "-c", "import templateflow.conf"],
        env={**_base_env(net_guard), "TEMPLATEFLOW_HOME": str(tf)},
        check=True,
        capture_output=True,
        timeout=120,
    )
    assert (tf / "tpl-MNI152NLin2009cAsym").is_dir()
    _read_only_tree(home)
    before = _tree_digest(home)
    work = _user_writable(case / "work")

    info, _ = _run_child(case, net_guard, {"HOME": str(home)}, work, drop_home=False)
    assert info["tf"] == str(tf)  # pinned, although XDG_CACHE_HOME moved to the work dir
    assert info["env"]["XDG_CACHE_HOME"] == str(work / "cache" / "xdg")

    info, _ = _run_child(
        case, net_guard, {"HOME": str(home), "TEMPLATEFLOW_HOME": str(tf)}, work, drop_home=False
    )
    assert info["tf"] == str(tf)
    assert "TEMPLATEFLOW_HOME" not in info["changed"]
    assert _tree_digest(home) == before


def test_no_usable_work_dir_falls_back_to_a_private_temporary_folder(scratch, net_guard):
    case = scratch / "no-work"
    case.mkdir()
    os.chmod(case, 0o755)
    work = case / "work-ro"
    work.mkdir()
    _read_only_tree(work)
    env = {"TMPDIR": str(_user_writable(case / "tmp"))}
    info, _ = _run_child(case, net_guard, env, work, drop_home=True)
    mpl = Path(info["mpl"])
    assert mpl.parent.parent == case / "tmp" and mpl.parent.name.startswith("brainage-xai-cache-")
    # removed when the process ends, so repeated runs leave nothing behind
    assert not mpl.parent.exists()
    assert list(work.iterdir()) == []


# ------------------------------------------------------------- fetch_templates ----


def test_fetch_templates_selects_one_file_per_query_and_covers_the_app(
    scratch, net_guard, monkeypatch
):
    """The image's template set: each query selects one file (checked offline against
    TemplateFlow's bundled index), and with exactly those files present the app uses
    TemplateFlow's template instead of its nilearn stand-in and TemplateFlow's atlas
    instead of its lobe atlas: every file fetched is read."""
    tf_home = scratch / "tf-list"
    env = {
        **_base_env(net_guard),
        "TEMPLATEFLOW_HOME": str(tf_home),
        "TEMPLATEFLOW_AUTOUPDATE": "0",
    }
    proc = subprocess.run(
        _offline([sys.executable, str(ROOT / "docker" / "fetch_templates.py"), "--list"]),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    listed = [Path(line) for line in proc.stdout.split()]
    names = {p.name for p in listed}
    expected = {
        f"tpl-MNI152NLin2009cAsym_res-{res}_{entities}.nii.gz"
        for res in ("01", "02")
        for entities in ("T1w", "desc-brain_mask", "label-GM_probseg", "atlas-HOSPA_desc-th25_dseg")
    } | {"tpl-MNI152NLin6Asym_atlas-HOSPA_dseg.tsv"}
    assert len(listed) == len(names) and names == expected
    assert _net_attempts(net_guard) == ""

    # Fill exactly the listed files with real images (nilearn's MNI152 stand-ins) and
    # check the app's template loader takes TemplateFlow's files.
    from nilearn import datasets

    images = {
        "T1w": datasets.load_mni152_template(resolution=2),
        "mask": datasets.load_mni152_brain_mask(resolution=2),
        "probseg": datasets.load_mni152_gm_template(resolution=2),
        "dseg": datasets.load_mni152_brain_mask(resolution=2),
    }
    for path in listed:
        if path.name.endswith(".nii.gz"):
            suffix = path.name[: -len(".nii.gz")].rsplit("_", 1)[1]
            images[suffix].to_filename(path)
    from brainage_xai.imaging import atlas, templates

    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(tf_home))
    template = templates.get_template(2)
    assert template.source == "templateflow"
    assert template.shape == templates.model_grid(2)[0] == (97, 115, 97)
    # the label table is TemplateFlow's own (its index carries it), read as it is
    named = atlas.naming_atlas(template.t1)
    assert named.name == "HOSPA" and named.labels[8] == "brainstem"


# ----------------------------------------------------------------- end to end ----


def _interpreter_for_user() -> str:
    """A Python of this version that the unprivileged user can run.

    The image's Python lives in /usr/local/bin; here the test interpreter may live under
    root's 0700 HOME (pyenv), which ``nobody`` cannot reach, so look for a system one.
    """
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [os.path.realpath(getattr(sys, "_base_executable", sys.executable))]
    candidates += [f"/usr/local/bin/{version}", f"/usr/bin/{version}"]
    for candidate in candidates:
        if not os.path.exists(candidate):
            continue
        # through a shell, as the entry point's shebang is reached in the image
        probe = subprocess.run(
            _as_user(["/bin/sh", "-c", '"$0" -c "import venv, ensurepip"', candidate]),
            env={"PATH": "/usr/bin:/bin"},
            cwd="/",
            capture_output=True,
            check=False,
        )
        if probe.returncode == 0:
            return candidate
    pytest.fail(f"no {version} with venv that an unprivileged user can run: {candidates}")


@pytest.fixture(scope="module")
def replayed_venv(scratch):
    """The image's install steps (docker/install.sh) replayed into a fresh venv.

    Only the files the Dockerfile copies are used, from a copy of the checkout, so that
    pip's in-tree build leaves the checkout alone. torch comes from pip's configured
    find-links (the local CPU wheel) instead of the PyTorch index.
    """
    src = scratch / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("brainage_xai", "docker"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    venv = scratch / "venv"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON"))}
    env.update(
        TORCH_VARIANT="cpu", TORCH_INDEX_URL="", PYTHON=_interpreter_for_user(), PIP_NO_INPUT="1"
    )
    proc = subprocess.run(
        ["sh", str(src / "docker" / "install.sh"), str(venv), str(src)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"brainage-xai {__version__}" in proc.stdout
    return venv


def test_replayed_install_is_isolated_and_complete(replayed_venv, net_guard):
    code = textwrap.dedent(
        """
        import json, brainage_xai, torch
        from importlib import metadata, resources, util
        from brainage_xai.bids import find_validator
        atlas = resources.files("brainage_xai") / "data" / "atlas"
        meta = metadata.metadata("brainage-xai")
        print(json.dumps({"pkg": brainage_xai.__file__, "torch": torch.__version__,
                          "atlas": sorted(p.name for p in atlas.iterdir()),
                          "absent": [m for m in ("optuna", "dask", "distributed")
                                     if util.find_spec(m) is None],
                          "license": meta["License-Expression"],
                          "license_files": meta.get_all("License-File"),
                          "validator": find_validator()}))
        """
    )
    proc = subprocess.run(
        [str(replayed_venv / "bin" / "python"), "-c", code],
        env={"PATH": "/usr/bin:/bin"},
        cwd=replayed_venv,  # not the checkout: "-c" puts the working directory on sys.path
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    # the package comes from the new environment, not from the checkout's editable install
    assert info["pkg"].startswith(str(replayed_venv))
    assert info["torch"].startswith("2.13.0")
    # package data travels with the wheel (the image has no checkout to fall back on)
    assert "tpl-MNI152NLin2009cAsym_res-1_atlas-Lobes_dseg.nii.gz" in info["atlas"]
    # a plain install pulls neither optional extra; the validator comes with the app
    assert info["absent"] == ["optuna", "dask", "distributed"]
    assert info["validator"] == str(replayed_venv / "bin" / "bids-validator-deno")
    assert info["license"] == "Apache-2.0" and info["license_files"] == ["LICENSE"]
    # the pins the image installs are the ones installed
    freeze = (
        subprocess.run(
            [str(replayed_venv / "bin" / "python"), "-m", "pip", "freeze"],
            capture_output=True,
            text=True,
            check=True,
        )
        .stdout.lower()
        .replace("_", "-")
    )
    for line in (ROOT / "docker" / "constraints.txt").read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#") and line.split("==")[0] in freeze:
            assert line.lower() in freeze, line


def test_net_guard_records_attempts(replayed_venv, net_guard, scratch):
    """The guard works in the replayed environment, so an empty log means something."""
    folder, _ = net_guard
    log = scratch / "guard-selftest.log"
    proc = subprocess.run(
        [
            str(replayed_venv / "bin" / "python"),
            "-c",
            "import urllib.request; urllib.request.urlopen('http://example.org', timeout=2)",
        ],
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(folder), "BRAINAGE_XAI_NETLOG": str(log)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode != 0
    assert "example.org" in log.read_text(encoding="utf-8")


def test_singularity_runscript_and_test_sections_run(replayed_venv, scratch, net_guard):
    """%runscript and %test, run as the image runs them: /bin/sh, unprivileged, offline."""
    _, sections = _def_sections()
    path = f"{replayed_venv / 'bin'}:/usr/local/bin:/usr/bin:/bin"
    env = {"PATH": path, "LANG": "C.UTF-8"}

    def sh(*args):
        return subprocess.run(
            _offline(_as_user(["/bin/sh", "-c", *args])),
            env=env, cwd=scratch, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip

    proc = sh(sections["runscript"], "runscript", "--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"brainage-xai {__version__}"
    proc = sh(sections["runscript"], "runscript", "--no-such")
    assert proc.returncode == 2  # arguments reach the app, which rejects this one
    # as `apptainer build --build-arg VERSION=...` fills it in
    proc = sh(sections["test"].replace("{{ VERSION }}", __version__))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert __version__ in proc.stdout
    proc = sh(sections["test"].replace("{{ VERSION }}", "0.0.0"))
    assert proc.returncode != 0  # an image of another version fails its test


def test_options_of_absent_extras_are_one_line_usage_errors(replayed_venv, scratch, net_guard):
    bids = scratch / "empty-bids"
    bids.mkdir(exist_ok=True)
    for option, extra in ((["--tune", "3"], "tune"), (["--dask-scheduler", "tcp://127.0.0.1:1"], "dask")):
        out = scratch / f"out-{extra}"
        proc = _app(replayed_venv, net_guard, scratch, bids, out, "group", *option)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and f"pip install 'brainage-xai[{extra}]'" in lines[0], lines
        assert not out.exists()


N_SUBJECTS = 12
CONTAINER_ENV = {
    "BRAINAGE_XAI_CONTAINER": "docker",
    "DOCKER_IMAGE": f"brainage-xai/brainage-xai:{__version__}",
}


@pytest.fixture(scope="module")
def cohort(replayed_venv, scratch):
    """A small simulated cohort, then made read-only.

    Not under /dev/shm (where ``scratch`` may be): Deno, the BIDS validator's runtime,
    refuses to read below /dev without --allow-all.
    """
    base = Path(tempfile.mkdtemp(prefix="brainage-xai-cohort-"))
    os.chmod(base, 0o755)
    bids = base / "bids"
    proc = subprocess.run(
        [
            str(replayed_venv / "bin" / "brainage-xai-simulate"),
            str(bids),
            "--n-subjects",
            str(N_SUBJECTS),
            "--resolution",
            "4",
            "--seed",
            "0",
        ],
        env={
            "PATH": f"{replayed_venv / 'bin'}:/usr/bin:/bin",
            "HOME": str(scratch),
            "MPLBACKEND": "Agg",
        },
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    _read_only_tree(bids)
    yield bids
    for dirpath, _dirnames, _filenames in os.walk(base):
        os.chmod(dirpath, 0o755)
    shutil.rmtree(base, ignore_errors=True)


def _app(replayed_venv, net_guard, scratch, *args):
    env = _base_env(net_guard, **CONTAINER_ENV)
    env["PATH"] = "/usr/local/bin:/usr/bin:/bin"  # the validator is found beside the app
    env["PYTHONPATH"] = str(net_guard[0])  # the guard only: the app comes from the venv
    return subprocess.run(
        _offline(_as_user([str(replayed_venv / "bin" / "brainage-xai"), *map(str, args)])),
        env=env,
        cwd=scratch,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


@pytest.mark.slow
def test_entrypoint_runs_both_levels_unprivileged_offline_without_home(
    replayed_venv, cohort, scratch, net_guard
):
    before = _tree_digest(cohort)
    out = _user_writable(scratch / "out")
    work = _user_writable(scratch / "work")  # "local scratch", apart from OUTPUT_DIR

    # the model grid at 4 mm keeps training on CPU to seconds
    common = ["-w", work, "--n-cpus", "1", "--resolution", "4", "--quiet"]

    proc = _app(replayed_venv, net_guard, scratch, cohort, out, "participant", *common)
    assert proc.returncode == 0, proc.stderr[-4000:]
    subjects = sorted(p.name for p in cohort.glob("sub-*"))
    assert len(subjects) == N_SUBJECTS
    for sub in subjects:
        assert list((out / sub / "anat").glob(f"{sub}_space-*_res-4_*desc-preproc_*.nii.gz")), sub

    fast = ["--epochs", "2", "--ranks", "2", "2", "--lambda", "0.01"]
    proc = _app(replayed_venv, net_guard, scratch, cohort, out, "group", *common, *fast)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (out / "group" / "model.safetensors").is_file()
    assert (out / "group" / "predictions.tsv").is_file()

    # the input is untouched, and nothing tried the network
    assert _tree_digest(cohort) == before
    assert _net_attempts(net_guard) == ""
    # caches went to the work dir (HOME unset; nobody's home does not exist)
    assert (work / "cache" / "matplotlib").is_dir()
    # provenance: the container, from the variables the image sets
    desc = json.loads((out / "dataset_description.json").read_text(encoding="utf-8"))
    assert desc["GeneratedBy"][0]["Container"] == {
        "Type": "docker",
        "Tag": CONTAINER_ENV["DOCKER_IMAGE"],
    }
    # outputs belong to the user that ran the app
    if IS_ROOT:
        assert all(p.stat().st_uid == NOBODY for p in out.rglob("*"))
    # the group level's last stage: the page users open first
    assert (out / "group" / "report.html").is_file()


def test_available_memory_reads_meminfo_and_the_cgroup_limit(tmp_path):
    from brainage_xai.utils.env import available_memory

    proc, cg = tmp_path / "proc", tmp_path / "cgroup"
    proc.mkdir()
    cg.mkdir()
    (proc / "meminfo").write_text("MemTotal:       16000000 kB\nMemFree:  100 kB\nMemAvailable:    8000000 kB\n")
    assert available_memory(proc, cg) == 8_000_000 * 1024  # no memory cgroup
    (cg / "memory.max").write_text("max\n")
    (cg / "memory.current").write_text("1000\n")
    assert available_memory(proc, cg) == 8_000_000 * 1024  # cgroup v2 without a limit
    (cg / "memory.max").write_text(f"{4 * 2**30}\n")  # a 4 GiB job with 1 GiB used
    (cg / "memory.current").write_text(f"{2**30}\n")
    assert available_memory(proc, cg) == 3 * 2**30
    (cg / "memory.current").write_text(f"{5 * 2**30}\n")  # over its limit (page cache)
    assert available_memory(proc, cg) == 0
    v1 = tmp_path / "v1"
    (v1 / "memory").mkdir(parents=True)
    (v1 / "memory" / "memory.limit_in_bytes").write_text(f"{2**63 - 4096}\n")  # v1: no limit
    (v1 / "memory" / "memory.usage_in_bytes").write_text("5\n")
    assert available_memory(proc, v1) == 8_000_000 * 1024
    (v1 / "memory" / "memory.limit_in_bytes").write_text(f"{2 * 2**30}\n")
    assert available_memory(proc, v1) == 2 * 2**30 - 5
    assert available_memory(tmp_path / "nowhere", tmp_path / "nowhere") is None
    # SLURM on cgroup v2: the process sits in the step's cgroup, the limit on the job's.
    (proc / "self").mkdir()
    (proc / "self" / "cgroup").write_text("0::/system.slice/slurmstepd.scope/job_7/step_0/user/task_0\n")
    job = tmp_path / "host"
    task = job / "system.slice" / "slurmstepd.scope" / "job_7" / "step_0" / "user" / "task_0"
    task.mkdir(parents=True)
    for folder in (task, task.parent):
        (folder / "memory.max").write_text("max\n")
        (folder / "memory.current").write_text(f"{2**30}\n")
    (job / "system.slice" / "slurmstepd.scope" / "job_7" / "memory.max").write_text(f"{6 * 2**30}\n")
    (job / "system.slice" / "slurmstepd.scope" / "job_7" / "memory.current").write_text(f"{2**30}\n")
    assert available_memory(proc, job) == 5 * 2**30
    assert available_memory(tmp_path / "nowhere", v1) == 2 * 2**30 - 5  # the cgroup alone
