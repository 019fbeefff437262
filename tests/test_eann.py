"""EANN logic on hand-made tables: every expected number below is worked out by hand."""

import json
import math

import pytest

from annify.eann import (
    MemberTable,
    build_schedule,
    default_placement,
    depth_ratio,
    format_eann,
    ideal_inflation,
    inflation,
    linear_ensemble_curve,
    prop41_bounds,
    schedule_to_json,
    uniform_inflation,
)
from annify.eann_run import plot_eann
from annify.spec import load_spec


def three_members() -> list[MemberTable]:
    return [
        MemberTable("a", [1, 2], [0.50, 0.40], [0.52, 0.41]),
        MemberTable("b", [1, 3, 4], [0.45, 0.38, 0.30], [0.47, 0.39, 0.33]),
        MemberTable("c", [2, 5, 8, 10], [0.35, 0.30, 0.25, 0.27], [0.36, 0.30, 0.26, 0.24]),
    ]


def test_schedule_uses_only_strict_validation_improvements():
    steps = build_schedule(three_members())
    got = [
        (s.member, s.member_name, s.output, s.flops, s.used, s.effective_val_error,
         s.effective_test_error, s.source_member, s.source_output)
        for s in steps
    ]  # fmt: skip
    assert got == [
        (0, "a", 0, 1, True, 0.50, 0.52, 0, 0),
        (0, "a", 1, 2, True, 0.40, 0.41, 0, 1),
        (1, "b", 0, 3, False, 0.40, 0.41, 0, 1),  # 0.45 > 0.40: a's final stands; cost 2 + 1
        (1, "b", 1, 5, True, 0.38, 0.39, 1, 1),
        (1, "b", 2, 6, True, 0.30, 0.33, 1, 2),
        (2, "c", 0, 8, False, 0.30, 0.33, 1, 2),  # cost 2 + 4 + 2
        (2, "c", 1, 11, False, 0.30, 0.33, 1, 2),  # a tie on validation is not an improvement
        (2, "c", 2, 14, True, 0.25, 0.26, 2, 2),
        (2, "c", 3, 16, False, 0.25, 0.26, 2, 2),  # worse on validation though better on test
    ]
    assert [s.val_error for s in steps[-2:]] == [0.25, 0.27]
    assert [s.test_error for s in steps[-2:]] == [0.26, 0.24]


def test_member_table_reports_every_problem():
    with pytest.raises(ValueError) as info:
        MemberTable("bad", [2, 2], [0.1], [0.1, 0.2, 0.3])
    msg = str(info.value)
    assert "'bad'" in msg and "val_error has 1" in msg and "test_error has 3" in msg
    assert "strictly increasing" in msg
    with pytest.raises(ValueError, match="at least one member"):
        build_schedule([])


def test_depth_ratio():
    members = three_members()  # totals 2, 4, 10
    assert depth_ratio(members, per_pair=True) == [2.0, 2.5]
    assert depth_ratio(members) == pytest.approx(math.sqrt(5.0))
    with pytest.raises(ValueError, match="a depth ratio needs at least two members, got 1"):
        depth_ratio(members[:1])


def test_prop41_bounds():
    bounds = prop41_bounds(2)
    assert bounds["sup_C"] == 3.0
    assert bounds["mean_C_bound"] == pytest.approx(1 - 0.25 + 1 + math.log(2))
    assert round(bounds["mean_C_bound"], 2) == 2.44  # the paper's E[C] for b = 2
    assert prop41_bounds(3)["sup_C"] == 2.5
    for b in (1, 0.5, -2):
        with pytest.raises(ValueError, match="b > 1"):
            prop41_bounds(b)


@pytest.mark.parametrize("b, n_members", [(2, 12), (3, 8)])
def test_ideal_model_meets_proposition_41(b, n_members):
    result = ideal_inflation(b, (b**n_members - 1) / (b - 1))
    bounds = result["bounds"]
    assert result["depths"] == [b**i for i in range(n_members)]
    # sup C = 2 + 1/(b-1) - 1/(b^(n-1) (b-1)) at the end of the last Case 1 phase (n = n_members - 1)
    assert result["sup_C"] == pytest.approx(bounds["sup_C"] - 1 / (b ** (n_members - 2) * (b - 1)))
    assert abs(result["sup_C"] - bounds["sup_C"]) < 2e-3
    assert bounds["mean_C_bound"] - 0.01 < result["mean_C"] <= bounds["mean_C_bound"]


def test_ideal_mean_bound_needs_whole_members():
    # b = 2: members 1..1024 cost 2047; stopping 1024 units into the next one ends on its Case 1 phase
    assert ideal_inflation(2, 2047 + 1024)["mean_C"] > prop41_bounds(2)["mean_C_bound"]


def two_members() -> list[MemberTable]:
    return [
        MemberTable("s", [1, 2], [0.5, 0.4], [0.5, 0.4]),
        MemberTable("d", [2, 4, 8], [0.45, 0.3, 0.2], [0.45, 0.3, 0.2]),
    ]


def test_inflation_against_members():
    members = two_members()
    steps = build_schedule(members)  # EANN costs 1, 2, 4 (unused), 6, 10
    result = inflation(members, steps)
    rows = [
        (r["budget"], r["error"], r["matched_cost"], r["matched_member"], r["C"])
        for r in result["per_budget"]
    ]
    assert rows == [
        (1, 0.5, 1, "s", 1.0),
        (2, 0.4, 2, "s", 1.0),
        (4, 0.4, 2, "s", 2.0),  # d's first output is unused: s's final, cost 2 alone, is in force
        (6, 0.3, 4, "d", 1.5),
        (10, 0.2, 8, "d", 1.25),
    ]
    assert result["max"] == 2.0
    assert result["mean"] == pytest.approx(6.75 / 5)
    assert result["skipped"] == []


def test_inflation_custom_budgets_and_reference():
    members = two_members()
    steps = build_schedule(members)
    result = inflation(members, steps, budgets=[12, 0.5, 3])
    assert [(r["budget"], r["C"]) for r in result["per_budget"]] == [(3, 1.5), (12, 1.5)]
    assert result["skipped"] == [0.5]  # nothing computed yet
    alone = inflation(members, steps, reference=members[:1])
    assert alone["skipped"] == [6, 10]  # s alone never reaches 0.3 or 0.2
    opt = MemberTable("opt", [3, 5], [0.4, 0.2], [0.4, 0.2])
    assert [r["C"] for r in inflation(members, steps, reference=[opt])["per_budget"]] == [
        1 / 3,
        2 / 3,
        4 / 3,
        6 / 5,
        10 / 5,
    ]  # fmt: skip  C < 1 where the members beat the reference


def test_linear_ensemble_curve():
    members = three_members()  # finals: a (2, val .40), b (4, val .30), c (10, val .27)
    assert linear_ensemble_curve(members) == [(2, 0.41), (6, 0.33), (16, 0.24)]
    members[2] = MemberTable("c", [10], [0.35], [0.20])  # worse on validation: b's final stands
    assert linear_ensemble_curve(members) == [(2, 0.41), (6, 0.33), (16, 0.33)]


def test_schedule_to_json():
    members = three_members()
    out = schedule_to_json(build_schedule(members), members, {"dataset": "toy"})
    out = json.loads(json.dumps(out))
    assert out["dataset"] == "toy"
    assert len(out["steps"]) == 9 and out["steps"][2]["used"] is False
    assert out["depth_ratio"]["ratios"] == [2.0, 2.5]
    assert out["prop41"] == pytest.approx(prop41_bounds(math.sqrt(5.0)))
    assert out["linear_ensemble"] == [[2, 0.41], [6, 0.33], [16, 0.24]]
    assert out["inflation"]["max"] >= 1
    with pytest.raises(ValueError, match="overwrite"):
        schedule_to_json(build_schedule(members), members, {"steps": []})
    single = schedule_to_json(build_schedule(members[:1]), members[:1])
    assert single["depth_ratio"] is None and single["prop41"] is None


def test_plot_writes_png(tmp_path):
    members = three_members()
    path = plot_eann(build_schedule(members), members, tmp_path / "eann.png")
    assert path.read_bytes().startswith(b"\x89PNG") and path.stat().st_size > 1000
    assert [p.name for p in tmp_path.iterdir()] == ["eann.png"]


def test_uniform_inflation():
    members = two_members()
    steps = build_schedule(members)  # EANN costs 1, 2, 4 (unused), 6, 10
    result = uniform_inflation(members, steps, n=10)  # budgets 1, 2, ..., 10
    # errors in force 0.5 .4 .4 .4 .4 .3 .3 .3 .3 .2, reached alone at cost 1 2 2 2 2 4 4 4 4 8
    assert result["max"] == 2.5
    assert result["mean"] == pytest.approx((1 + 1 + 1.5 + 2 + 2.5 + 1.5 + 1.75 + 2 + 2.25 + 1.25) / 10)
    assert (result["budgets"], result["from"], result["to"], result["split"]) == (10, 1, 10, "test")


def test_linear_ensemble_of_other_networks():
    members = three_members()
    plain = [MemberTable("a", [1.5], [0.45], [0.46]), MemberTable("b", [3], [0.3], [0.31])]
    out = schedule_to_json(build_schedule(members), members, linear=plain)
    assert out["linear_ensemble"] == [[1.5, 0.46], [4.5, 0.31]]


def test_format_eann():
    members = two_members()
    text = format_eann(json.loads(json.dumps(schedule_to_json(build_schedule(members), members))))
    lines = text.splitlines()
    assert lines[0].split() == ["step", "member", "output", "flops", "val", "err", "%", "test", "err", "%",
                                "used", "in", "force:", "test", "err", "%"]  # fmt: skip
    assert lines[3].split() == ["3", "d", "1", "4", "45.00", "45.00", "-", "40.00"]
    assert "depth ratio b = 4.00 (member to member: 4.00)" in text
    assert "max 2.00, mean 1.35 over the 5 output times" in text
    assert "Proposition 4.1 at b = 4.00: sup C = 2.33, E[C] <= 1.67" in text


@pytest.mark.parametrize(
    "spec",
    ["cifar_resann_n7_c16", "cifar_resann_n25_c32", "resann26", "resann50", "resann101", "denseann169"],
)
def test_default_placement_is_the_papers(spec):
    """The placement ``annify eann`` converts a model name with is the one of the shipped spec."""
    shipped = load_spec(f"specs/{spec}.yaml")
    placement = default_placement(shipped.model)
    assert {**placement, "start": placement.get("start", placement["every"])} == shipped.placement


def test_default_placement_elsewhere():
    assert default_placement("cifar_resnet_n13_c16") == {"every": 1}
    assert default_placement("cifar_resnet_n25_c16") == {"every": 3}
    assert default_placement("vit_tiny_patch16_224") == {"heads": 4}


def test_the_eann_maths_imports_no_torch():
    import subprocess
    import sys

    code = (
        "import sys\nfrom annify.eann import MemberTable, build_schedule, inflation, prop41_bounds\n"
        "members = [MemberTable('a', [1.0, 2.0], [0.5, 0.4], [0.5, 0.4]), MemberTable('b', [4.0], [0.3], [0.3])]\n"
        "steps = build_schedule(members)\n"
        "print(inflation(members, steps)['max'], prop41_bounds(2.0)['sup_C'], 'torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1.5", "3.0", "False"]  # b's 0.3 at 2 + 4 = 6 against b alone at 4


def test_the_stage_keeps_its_names_in_annify_eann():
    import annify.eann
    import annify.eann_run

    for name in ("run_eann", "EANNRun", "plot_eann"):
        assert getattr(annify.eann, name) is getattr(annify.eann_run, name)
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        annify.eann.nothing  # noqa: B018
