"""Property-based tests of every command-line entry point: any combination of arguments is refused in one line with
exit status 2, or starts correctly; never a traceback.

Not part of the paper's method: the robustness contract of docs/robustness.md, for the arguments nobody has listed.
hypothesis draws, for each script (train_toy.py, train_sd.py, bench_toy.py, bench_bias.py, bench_progressive.py,
bench_sd.py, minisd.py, bench_minisd.py), a few of its flags with values of their type and of other types (0, negatives,
huge, nan, inf, text, '~', '..', names over 255 bytes, empty lists), appended to a small valid command line. The script
runs in process, through what its __main__ runs (argument parsing, the checks, the resume / fresh-folder checks, the run
folder's lock), up to the function that would train or build, which is replaced by one that raises `Started`.

Notation: SCRIPTS script → (arguments dataclass, entry point, the function replaced, base argv); `Started` the
correct start.

Run: python -m pytest -q tests/test_cli_hypothesis.py
"""

import dataclasses
import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bench_bias
import bench_minisd
import bench_progressive
import bench_sd
import bench_toy
import minisd
import runio
import train_sd
import train_toy


class Started(Exception):
    """The script got past every check and would now train or build."""


def started(*a, **kw):
    raise Started


SCRIPTS = {
    "train_toy": (train_toy.Args, train_toy.main, (train_toy, "_train"),
                  ["--out-dir", "runs", "--budget", "2", "--budget-unit", "updates"]),
    "train_sd": (train_sd.Args, lambda argv: runio.cli(train_sd.main, train_sd.Args, train_sd.check_args, argv),
                 (train_sd, "train"), ["--tiny", "--out-dir", "runs"]),
    "bench_toy": (bench_toy.BenchArgs, bench_toy.main, (bench_toy, "run_bench"), ["--out-dir", "runs"]),
    "bench_bias": (bench_bias.BenchArgs, bench_bias.main, (bench_bias, "run_bench"), ["--out-dir", "runs"]),
    "bench_progressive": (bench_progressive.Args, bench_progressive.main, (bench_progressive, "run_bench"),
                          ["--out-dir", "runs"]),
    "bench_sd": (bench_sd.Args, lambda argv: runio.cli(bench_sd.main, bench_sd.Args, bench_sd.check_args, argv),
                 (bench_sd, "run"), ["--tiny", "--device", "cpu", "--out", "bench/b"]),
    "minisd": (minisd.Args, lambda argv: runio.cli(minisd.main, minisd.Args, minisd.check_args, argv),
               (minisd, "build"), ["--out", "mini"]),
    "bench_minisd": (bench_minisd.Args,
                     lambda argv: runio.cli(bench_minisd.main, bench_minisd.Args, bench_minisd.check_args, argv),
                     (bench_minisd, "run"), ["--minisd", "fake-minisd", "--out", "mbench"]),
}

TEXT = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\0"), max_size=6)
WORDS = st.sampled_from(["", "x", "~", "~/r", ".", "..", "../x", "a/b", "n" * 300, "runs", "shortft", "full", "gflop",
                         "updates", "digit", "region:1e308", "aesthetic:1e308", "clipscore", "nope", "cpu", "cuda",
                         "hyper-sd-4", "test", "full", "-1", "nan", "1e309", "prompts/train.txt", "mini"])
INTS = st.one_of(st.integers(-3, 12), st.sampled_from([0, 64, 1000, 2**31, 2**64, -2**40]))
FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=False), st.sampled_from([0.0, -0.0, 1e-300, 1e308, 0.5]))


def text_of(kind):
    """Values of a field's type as typed (repr of numbers, nan and inf included), and sometimes of another type."""
    own = {int: INTS.map(str), float: FLOATS.map(repr), str: st.one_of(WORDS, TEXT)}[kind]
    return st.one_of(own, own, WORDS, TEXT)


def flag_values(field, default):
    """The argv words of one flag: --flag / --no-flag for a boolean, --flag=VALUE, or --flag V1 V2 … for a list."""
    name = "--" + field.name.replace("_", "-")
    if isinstance(default, bool):
        return st.sampled_from([[name], ["--no-" + name[2:]]])
    if isinstance(default, (list, tuple)):
        kind = runio._element_type(default, field.type)
        return st.lists(text_of(kind).filter(lambda v: not v.startswith("-") or v[1:2].isdigit()), max_size=4) \
            .map(lambda vs: [name, *vs])
    kind = type(default) if default is not None else runio._annotated_type(field.type)
    return text_of(kind).map(lambda v: [f"{name}={v}"])


def argvs(cls):
    fields = {f.name: (f, f.default if f.default is not dataclasses.MISSING else f.default_factory())
              for f in dataclasses.fields(cls)}
    chosen = st.lists(st.sampled_from(sorted(fields)), min_size=1, max_size=4, unique=True)
    return chosen.flatmap(lambda names: st.tuples(*[flag_values(*fields[n]) for n in names])
                          .map(lambda parts: [w for p in parts for w in p]))


@pytest.fixture
def sandbox(tmp_path_factory, monkeypatch):
    """A working folder (relative paths land there), HOME inside it, no network, a fake minisd.py build."""
    root = tmp_path_factory.mktemp("cli")
    monkeypatch.chdir(root)
    monkeypatch.setenv("HOME", str(root / "home"))
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    (root / "fake-minisd" / "pipeline").mkdir(parents=True)
    (root / "fake-minisd" / "pipeline" / "model_index.json").write_text("{}")
    (root / "fake-minisd" / "report.json").write_text(json.dumps({"shortcut": {"teacher_guidance": 2.0}}))
    (root / "prompts").symlink_to(runio.Path(train_sd.__file__).resolve().parent / "prompts")
    return root


def check(script, extra, capfd, monkeypatch):
    """The invariant: `Started`, or SystemExit(2) with one line on stderr and no traceback."""
    cls, entry, (module, fn), base = SCRIPTS[script]
    monkeypatch.setattr(module, fn, started)
    capfd.readouterr()
    try:
        entry(base + extra)
    except Started:
        return
    except SystemExit as e:
        err = capfd.readouterr().err
        assert e.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, (e.code, err)
        return
    raise AssertionError(f"{script} {extra}: returned without starting or exiting")


SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_any_arguments_are_one_line_or_a_start(script, sandbox, capfd, monkeypatch):
    @SETTINGS
    @given(extra=argvs(SCRIPTS[script][0]))
    def run(extra):
        check(script, extra, capfd, monkeypatch)

    run()


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_the_base_command_starts(script, sandbox, capfd, monkeypatch):
    """The base command lines are valid: the property above explores around a start, not only around refusals."""
    cls, entry, (module, fn), base = SCRIPTS[script]
    monkeypatch.setattr(module, fn, started)
    with pytest.raises(Started):
        entry(base)


def test_floats_in_argv_are_typed_as_a_user_would():
    assert repr(math.inf) == "inf" and repr(math.nan) == "nan"
