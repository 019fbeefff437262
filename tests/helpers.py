"""Helpers shared by the test modules (pytest puts this folder on sys.path)."""

from torch import nn


class ConvBNReLU(nn.Module):
    """relu(bn(conv3x3(x))), C channels in and out, no bias: a unit whose cost is easy to derive."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


def tiny_spec(train: str = "{batch_size: 128}") -> str:
    """A hand-written spec: cifar_resnet_n3_c8 at 3×32×32 with heads after stages 1 and 2."""
    return f"""\
name: tiny
model: cifar_resnet_n3_c8
input_size: [3, 32, 32]
num_classes: 10
heads:
  - {{node: stages.0.2.add}}
  - {{node: stages.1.2.add}}
  - {{node: model}}
train: {train}
"""


def assert_one_line_error(result, *fragments: str, alone: bool = True) -> None:
    """Exit code 1, an ``Error: ...`` line holding every fragment, no traceback.

    With ``alone`` nothing else was printed; otherwise the error is the last line (commands that
    train print progress before they fail).
    """
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    if alone:
        assert len(lines) == 1, result.output
    assert lines[-1].startswith("Error: "), result.output
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]
