"""probes.py: the shape of every block of the U, recorded with forward hooks that are removed afterwards."""
import pytest
import torch
from torch import nn

from sd_scratch.lab.probes import capture, parameter_counts, shape_table, trace_shapes
from sd_scratch.unet import UNet, UNetConfig


@pytest.fixture(scope="module")
def tiny_unet() -> UNet:
    torch.manual_seed(0)
    # levels 8×8 (64 ch) and 4×4 (128 ch), one ResNet each, text width 128: the facts below count its skips
    return UNet(UNetConfig(channels=(64, 128), attention_levels=(True, True), layers_per_level=1,
                           context_dim=128)).eval()


def tiny_inputs(batch: int = 2):
    torch.manual_seed(1)
    return torch.randn(batch, 4, 8, 8), torch.tensor(500), torch.randn(batch, 77, 128)


def hooks_left(module: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def test_the_tiny_u_goes_from_8x8_down_to_4x4_and_back(tiny_unet):
    rows = {r.name: r for r in trace_shapes(tiny_unet, *tiny_inputs(), depth=1)}
    assert rows["conv_in"].output == (2, 64, 8, 8)
    assert rows["down_blocks.0.downsamplers.0"].output == (2, 64, 4, 4)
    assert rows["down_blocks.1.resnets.0"].output == (2, 128, 4, 4)
    assert rows["mid_block"].input == rows["mid_block"].output == (2, 128, 4, 4)
    assert rows["up_blocks.0.upsamplers.0"].output == (2, 128, 8, 8)
    assert rows["conv_out"].output == (2, 4, 8, 8)
    assert rows["time_embedding"].output == (2, 256)  # 4 × the first level's 64 channels


def test_up_path_resnets_take_the_skip_concatenated(tiny_unet):
    rows = {r.name: r for r in trace_shapes(tiny_unet, *tiny_inputs(), depth=1)}
    # the mid block's 128 channels + the skip from down_blocks.1 (128)
    assert rows["up_blocks.0.resnets.0"].input == (2, 256, 4, 4)
    # the running 128 + the skip from down_blocks.0's downsampler (64), at 4×4
    assert rows["up_blocks.0.resnets.1"].input == (2, 192, 4, 4)


def test_rows_come_in_call_order_and_depth_counts_calls(tiny_unet):
    rows = trace_shapes(tiny_unet, *tiny_inputs(), depth=1)
    names = [r.name for r in rows]
    assert all(r.depth == 1 for r in rows)
    assert names.index("conv_in") < names.index("down_blocks.1.resnets.0") < names.index("mid_block") \
        < names.index("up_blocks.0.resnets.0") < names.index("conv_out")
    assert "mid_block.resnets.0" not in names  # called by mid_block, one call deeper
    assert "down_blocks.0" not in names  # a Level is looped over, never called

    deeper = trace_shapes(tiny_unet, *tiny_inputs(), depth=2)
    assert max(r.depth for r in deeper) == 2
    names = [r.name for r in deeper]
    assert names.index("mid_block") + 1 == names.index("mid_block.resnets.0")  # a block, then its parts
    conv1 = next(r for r in deeper if r.name == "down_blocks.0.resnets.0.conv1")
    assert conv1.depth == 2 and conv1.output == (2, 64, 8, 8)
    assert len(trace_shapes(tiny_unet, *tiny_inputs())) > len(deeper)  # depth=None: everything


def test_hooks_are_removed_afterwards_even_when_the_call_raises(tiny_unet):
    trace_shapes(tiny_unet, *tiny_inputs())
    capture(tiny_unet, ["conv_in"], *tiny_inputs())
    assert hooks_left(tiny_unet) == 0

    broken = nn.Sequential(nn.Linear(3, 4), nn.Linear(5, 2))  # the second layer cannot take 4 features
    with pytest.raises(RuntimeError):
        trace_shapes(broken, torch.randn(1, 3))
    with pytest.raises(RuntimeError):
        capture(broken, ["0"], torch.randn(1, 3))
    assert hooks_left(broken) == 0


def test_shape_table_has_a_line_per_row(tiny_unet):
    rows = trace_shapes(tiny_unet, *tiny_inputs(), depth=2)
    lines = shape_table(rows).splitlines()
    assert len(lines) == len(rows) + 1
    line = next(x for x in lines if x.strip().startswith("mid_block.attentions.0 "))
    assert line.startswith("  ")  # indented one level under mid_block
    assert "SpatialTransformer" in line and line.endswith("(2, 128, 4, 4) -> (2, 128, 4, 4)")


def test_sd15_shapes_on_the_meta_device():
    """SD v1.5 at 512×512, traced without weights: the latent is 4×64×64 and the U's bottom is 8×8."""
    with torch.device("meta"):
        unet = UNet(UNetConfig.sd15())
    x, context = torch.empty(1, 4, 64, 64, device="meta"), torch.empty(1, 77, 768, device="meta")
    rows = {r.name: r for r in trace_shapes(unet, x, 999, context, depth=1)}
    assert rows["conv_in"].output == (1, 320, 64, 64)
    assert rows["down_blocks.2.downsamplers.0"].output == (1, 1280, 8, 8)
    assert rows["mid_block"].output == (1, 1280, 8, 8)
    assert rows["up_blocks.0.resnets.0"].input == (1, 2560, 8, 8)
    assert rows["conv_out"].output == (1, 4, 64, 64)
    assert sum(parameter_counts(unet).values()) == 859_520_964  # SD v1.5's UNet


def test_parameter_counts_split_the_total(tiny_unet):
    total = sum(p.numel() for p in tiny_unet.parameters())
    top = parameter_counts(tiny_unet)
    assert list(top) == ["conv_in", "time_embedding", "down_blocks", "mid_block", "up_blocks", "conv_norm_out",
                         "conv_out"]
    assert sum(top.values()) == total
    levels = parameter_counts(tiny_unet, depth=2)
    assert levels["down_blocks.0"] + levels["down_blocks.1"] == top["down_blocks"]
    assert levels["conv_in"] == top["conv_in"] == 4 * 64 * 3 * 3 + 64
    assert sum(levels.values()) == total


def test_capture_keeps_cross_attention_inputs_and_output(tiny_unet):
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    x, t, context = tiny_inputs()
    kept = capture(tiny_unet, [name], x, t, context)[name]
    queries_from, keys_from = kept.args
    assert queries_from.shape == (2, 64, 64)  # 8×8 latent pixels as tokens, 64 channels
    assert torch.equal(keys_from, context)  # keys and values come from the text
    attn2 = tiny_unet.get_submodule(name)
    with torch.no_grad():
        assert torch.allclose(kept.output, attn2(queries_from, keys_from))


class OneOfTwo(nn.Module):
    def __init__(self):
        super().__init__()
        self.used, self.unused = nn.Linear(3, 3), nn.Linear(3, 3)

    def forward(self, x):
        return self.used(x)


def test_capture_refuses_unknown_or_uncalled_names(tiny_unet):
    with pytest.raises(KeyError, match="nope"):
        capture(tiny_unet, ["nope"], *tiny_inputs())
    model = OneOfTwo()
    with pytest.raises(RuntimeError, match="unused"):
        capture(model, ["unused"], torch.randn(1, 3))
    assert hooks_left(model) == 0
