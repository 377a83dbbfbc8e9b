"""The sweep driver behind compare and study: the grid, variants, in-process and worker runs."""

from __future__ import annotations

import functools

import pytest

from lipgan.errors import LipganError
from lipgan.experiments import sweep
from lipgan.experiments.sweep import Cell, Variant


def _square(cell: Cell, tag: str, ctx: sweep.Context, *, offset: int = 0) -> int:
    ctx.log(f"{tag}: squaring")
    if cell.options.get("fail"):
        raise LipganError(f"{cell.name} cannot be squared")
    return cell.seed**2 + cell.options["x"] + offset


def test_grid_crosses_variants_and_seeds(tmp_path):
    cells = sweep.grid([Variant("a", {"x": 1}), Variant("b", {"x": 2})], 2, tmp_path)
    assert [c.name for c in cells] == ["a-seed0", "a-seed1", "b-seed0", "b-seed1"]
    assert [(c.variant, c.seed, c.options["x"]) for c in cells] == [
        ("a", 0, 1), ("a", 1, 1), ("b", 0, 2), ("b", 1, 2),
    ]  # fmt: skip
    assert cells[0].path == tmp_path / "a-seed0"
    assert sweep.grid([Variant("a")], 1, tmp_path, "{variant}_s{seed}")[0].name == "a_s0"
    with pytest.raises(LipganError, match="given twice: a"):
        sweep.grid([Variant("a"), Variant("a")], 1, tmp_path)
    with pytest.raises(LipganError, match="--seeds"):
        sweep.grid([Variant("a")], 0, tmp_path)
    for bad in ("", "../up", "a/b", "sp ace"):
        with pytest.raises(LipganError, match="variant name"):
            Variant(bad)


def test_variant_values_are_yaml_with_exponents_as_numbers():
    v = sweep.parse_variant("slow:lr-d=1e-4,n_critic=1,compile=true,eps=[1, 2e3]")
    assert v.options == {"lr_d": 1e-4, "n_critic": 1, "compile": True, "eps": [1, 2000.0]}
    assert isinstance(v.options["lr_d"], float)
    with pytest.raises(LipganError, match="KEY=VALUE"):
        sweep.parse_variant("a:lr_d")


def test_parse_variant_keeps_commas_inside_values():
    v = sweep.parse_variant(
        "w64-mix:method=frobenius,constraint=l2,frobenius-reg,eps=[1, 2],width=64"
    )
    assert v.name == "w64-mix"
    assert v.options == {
        "method": "frobenius", "constraint": "l2,frobenius-reg", "eps": [1, 2], "width": 64,
    }  # fmt: skip
    assert sweep.parse_variant("sn") == Variant("sn", {})


def test_read_variants_from_yaml(tmp_path):
    path = tmp_path / "v.yaml"
    path.write_text("w64: {method: frobenius, width: 64}\nslow:\n  method: sn\n  lr_d: 1e-4\n")
    got = sweep.read_variants(path)
    assert got == [
        Variant("w64", {"method": "frobenius", "width": 64}),
        Variant("slow", {"method": "sn", "lr_d": 1e-4}),
    ]
    path.write_text("- a\n- b\n")
    with pytest.raises(LipganError, match="mapping"):
        sweep.read_variants(path)
    with pytest.raises(LipganError, match="missing.yaml"):
        sweep.read_variants(tmp_path / "missing.yaml")


def test_in_process_and_workers_give_the_same_results(tmp_path):
    cells = sweep.grid([Variant("a", {"x": 1}), Variant("b", {"x": 10})], 2, tmp_path)
    work = functools.partial(_square, offset=100)
    logs: list[str] = []
    seen: list[tuple[str, set]] = []

    def done(cell, value, unfinished):
        seen.append((cell.name, unfinished))

    serial = sweep.run_cells(cells, work, log=logs.append, on_done=done)
    assert [(c.name, v) for c, v in serial.finished] == [
        ("a-seed0", 101), ("a-seed1", 102), ("b-seed0", 110), ("b-seed1", 111),
    ]  # fmt: skip
    assert logs == [f"[{i}/4] {c.name}: squaring" for i, c in enumerate(cells, 1)]
    assert seen[0] == ("a-seed0", {c.path for c in cells[1:]}) and seen[-1][1] == set()
    logs.clear()
    pooled = sweep.run_cells(cells, work, jobs=2, threads=1, log=logs.append)
    assert sorted((c.name, v) for c, v in pooled.finished) == sorted(
        (c.name, v) for c, v in serial.finished
    )
    assert sorted(logs) == sorted(f"[{i}/4] {c.name}: squaring" for i, c in enumerate(cells, 1))


def test_a_failing_cell_raises_its_error_in_this_process(tmp_path):
    cells = sweep.grid(
        [Variant("ok", {"x": 1}), Variant("bad", {"x": 1, "fail": True})], 1, tmp_path
    )
    for jobs in (1, 2):
        with pytest.raises(LipganError, match="bad-seed0 cannot be squared"):
            sweep.run_cells(cells, _square, jobs=jobs, threads=1)


@pytest.mark.parametrize("jobs", [0, -1, 1.5, True])
def test_bad_jobs(jobs, tmp_path):
    with pytest.raises(LipganError, match="--jobs must be"):
        sweep.run_cells([], _square, jobs=jobs)


# --------------------------------------------------------------------------- user constraints
# The helper module is imported inside the tests, never at the top of this file: a worker
# imports this module to run _constraint_of, and must learn the user's registration from the
# parent, not from that import.


def _constraint_of(cell: Cell, tag: str, ctx: sweep.Context) -> str:
    from lipgan import constraints

    return type(constraints.get(cell.options["name"])).__name__


def test_a_users_registered_constraint_reaches_the_workers(tmp_path):
    import user_constraints  # registers test-user-clip in this process

    cells = sweep.grid([Variant("u", {"name": "test-user-clip"})], 2, tmp_path)
    got = sweep.run_cells(cells, _constraint_of, jobs=2, threads=1)
    assert [v for _, v in got.finished] == [user_constraints.UserClip.__name__] * 2


def test_a_constraint_workers_cannot_import_is_one_line_naming_it(tmp_path, monkeypatch):
    from lipgan import constraints
    from lipgan.constraints import base

    class Local(constraints.Constraint):  # defined in a function: no worker can import it
        pass

    monkeypatch.setitem(base._REGISTRY, "test-local", Local)
    with pytest.raises(LipganError, match="'test-local' cannot reach the worker") as err:
        base.check_for_workers(["gradient-penalty,test-local", None])
    assert "--jobs 1" in str(err.value) and "\n" not in str(err.value)
    base.check_for_workers("gradient-penalty")  # lipgan's own: always there
    cells = sweep.grid([Variant("u", {"name": "test-local"})], 2, tmp_path)
    with pytest.raises(LipganError, match="'test-local' cannot reach the worker"):
        sweep.run_cells(cells, _constraint_of, jobs=2, threads=1)
    # the other registered names still work in the workers
    cells = sweep.grid([Variant("u", {"name": "weight-clip"})], 2, tmp_path)
    got = sweep.run_cells(cells, _constraint_of, jobs=2, threads=1)
    assert [v for _, v in got.finished] == ["WeightClip"] * 2


def test_a_constraint_registered_in_a_scripts_main_reaches_the_workers(tmp_path):
    """The usual case: a user's script registers its constraint in ``__main__`` and sweeps with
    workers. Spawn re-runs the script's top level in each worker (as ``__mp_main__``, under its
    main guard), which registered it even before the parent handed its entries over; this keeps
    that so (the handed-over entry resolves to the same class)."""
    import os
    import subprocess
    import sys
    import textwrap

    script = tmp_path / "my_sweep.py"
    script.write_text(textwrap.dedent('''
        from lipgan import constraints
        from lipgan.experiments import sweep


        @constraints.register("script-clip")
        class ScriptClip(constraints.WeightClip):
            pass


        def build(cell, tag, ctx):
            return type(constraints.get("script-clip", c=0.5)).__name__


        if __name__ == "__main__":
            cells = sweep.grid([sweep.Variant("v")], 2, "unused")
            done = sweep.run_cells(cells, build, jobs=2, threads=1)
            print(sorted(v for _, v in done.finished))
    '''))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "['ScriptClip', 'ScriptClip']"
