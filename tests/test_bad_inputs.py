"""Issue 20: every bad or unusual input a user tried gets one line naming the problem and the fix, or the
right result; never a hang, a silent change of the data, or a lost file."""

import pytest
from click.testing import CliRunner
from helpers import assert_one_line_error, tiny_spec

from annify.cli import main
from annify.spec import SpecError, load_spec

TINY_ARGS = ("cifar_resnet_n3_c8", "--input-size", "1,8,8", "--num-classes", "5")


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


# --- hangs: what an input can make annify allocate or expand is bounded -----------------------------


def test_flops_period_of_a_few_flops_is_refused_before_any_list_is_made(tmp_path):
    # 2 FLOPs of a 1e5-FLOP network used to build a list of every multiple (resnet18: 11 GB in 35 s)
    result = invoke("convert", *TINY_ARGS, "--flops-period", "2", "--out", tmp_path)
    assert_one_line_error(result, "--flops-period 2 asks for", "tap points", "such as 0.25")
    assert not list(tmp_path.glob("*.yaml"))


def test_yaml_alias_bomb_in_a_spec_is_refused_at_once(tmp_path):
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]  # 10**9 nodes
    spec = tmp_path / "bomb.yaml"
    spec.write_text(tiny_spec().replace("train: {batch_size: 128}", "placement:\n  " + "\n  ".join(levels)))
    with pytest.raises(SpecError, match="line 11 uses the YAML alias \\*a0; a spec is plain data"):
        load_spec(spec)
    assert_one_line_error(invoke("train", spec, "--out", tmp_path / "r"), "uses the YAML alias")


def test_a_key_given_twice_names_the_key_and_both_lines(tmp_path):
    spec = tmp_path / "twice.yaml"
    spec.write_text(tiny_spec() + "heads:\n  - {node: model}\n")  # the second heads: used to win silently
    with pytest.raises(SpecError, match="key 'heads' appears twice \\(lines 5 and 10\\); keep one"):
        load_spec(spec)
    spec.write_text(tiny_spec().replace("{node: model}", "{node: model, node: stages.0.0.add}"))
    with pytest.raises(SpecError, match="key 'node' appears twice on line 8"):
        load_spec(spec)


# --- silent wrong results -------------------------------------------------------------------------


def test_every_with_a_start_past_the_last_block_is_refused(tmp_path):
    # used to write a spec with only the classifier
    result = invoke("convert", *TINY_ARGS, "--every", "2", "--start", "100", "--out", tmp_path)
    assert_one_line_error(result, "--every 2 --start 100 places no head", "9 blocks", "blocks 1 to 8")
    assert not list(tmp_path.glob("*.yaml"))
