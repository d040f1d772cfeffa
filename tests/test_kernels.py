"""The GPU fast path's imports: liger-kernel's import-time chatter stays out of the user's terminal."""

from __future__ import annotations

import logging
import sys

import pytest

from peftctl.fast_path import liger_available

# What liger-kernel 0.8 does at import on a machine without CuTe DSL or Ascend: a logger it configures itself (its
# own handler on stderr, level INFO) reports each optional backend it could not import; some versions print.
FAKE_LIGER = '''
import logging, sys
logger = logging.getLogger("liger_kernel.ops.backends")
handler = logging.StreamHandler(sys.stderr)
logger.addHandler(handler)
logger.setLevel(logging.INFO)
logger.info("Backend impl cutedsl could not be imported: No module named 'cutlass'")
logger.warning("Backend impl ascend could not be imported: No module named 'torch_npu'")
print("Backend impl ascend could not be imported")
'''


@pytest.fixture
def fake_liger(tmp_path, monkeypatch):
    package = tmp_path / "liger_kernel"
    (package / "transformers").mkdir(parents=True)
    (package / "__init__.py").write_text(FAKE_LIGER)
    (package / "transformers" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("PEFTCTL_DEBUG", raising=False)
    for name in [n for n in sys.modules if n.startswith("liger_kernel")]:
        monkeypatch.delitem(sys.modules, name)
    yield
    for name in [n for n in sys.modules if n.startswith("liger_kernel")]:
        del sys.modules[name]
    logging.getLogger("liger_kernel.ops.backends").handlers.clear()


def test_liger_import_chatter_does_not_reach_the_terminal(fake_liger, capfd):
    assert liger_available()
    out, err = capfd.readouterr()
    assert "could not be imported" not in out + err
    # Afterwards its loggers are errors-only: the same chatter logged lazily, when the kernels are applied (seen on
    # the H200: liger_kernel.backends.registry, at the first lookup of 'rope'), stays out too, and a real error
    # still reaches stderr (not the lost buffer).
    logger = logging.getLogger("liger_kernel.ops.backends")
    logger.info("chatter")
    logger.warning("Backend impl 'rope' could not be imported")
    logger.error("a real problem")
    out, err = capfd.readouterr()
    assert "chatter" not in err and "could not be imported" not in err and "a real problem" in err
    assert logging.root.manager.disable == logging.NOTSET  # logging elsewhere is untouched


# liger's loss, as far as peftctl calls it: the module, and the function with its parameters in 0.8.5's order.
FAKE_LIGER_LOSS = '''
import torch

class LigerFusedLinearCrossEntropyLoss(torch.nn.Module):
    def __init__(self, ignore_index=-100, reduction="mean"):
        super().__init__()
        self.ignore_index, self.reduction = ignore_index, reduction
'''
FAKE_LIGER_LOSS_FUNCTION = '''
import torch

calls = []

class LigerFusedLinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward({parameters}):
        calls.append(dict(locals()))
        return _input.sum() * 0 + 7.0, None, None, None

    @staticmethod
    def backward(ctx, *grads):
        return (None,) * 18
'''


@pytest.mark.parametrize("renamed", [False, True])
def test_the_fused_loss_takes_its_chunk_size_where_liger_takes_it_so(fake_liger, tmp_path, renamed):
    import torch

    from peftctl.data.tokenize import IGNORE
    from peftctl.train import loss as loss_module

    names = list(loss_module._LIGER_LOSS_PARAMETERS)
    if renamed:  # a liger whose function moved its parameters: its own chunks, not a wrong argument
        names[names.index("softcap")] = "soft_cap"
    defaults = ", ".join(n if n in ("ctx", "_input", "weight", "target") else f"{n}=None" for n in names)
    (tmp_path / "liger_kernel" / "transformers" / "__init__.py").write_text(FAKE_LIGER_LOSS)
    (tmp_path / "liger_kernel" / "ops").mkdir()
    (tmp_path / "liger_kernel" / "ops" / "__init__.py").write_text("")
    (tmp_path / "liger_kernel" / "ops" / "fused_linear_cross_entropy.py").write_text(
        FAKE_LIGER_LOSS_FUNCTION.replace("{parameters}", defaults))
    assert loss_module.fused_loss_module(1).chunk_mem == 1  # liger's own loss module, as it comes
    built = loss_module.fused_loss_module(8)
    if renamed:
        assert built.chunk_mem == 1 and built.reduction == "sum" and built.ignore_index == IGNORE
        return
    assert built.chunk_mem == 8
    hidden, weight = torch.ones(3, 4), torch.ones(5, 4)
    assert built(weight, hidden, torch.tensor([1, IGNORE, 2])).item() == 7.0
    from liger_kernel.ops.fused_linear_cross_entropy import calls

    (call,) = calls
    assert call["_input"] is hidden and call["weight"] is weight and call["bias"] is None
    assert (call["chunk_mem_const"], call["reduction"], call["ignore_index"]) == (8, "sum", IGNORE)
    assert call["return_z_loss"] is False and call["label_smoothing"] == 0.0 and call["softcap"] is None


def test_fused_loss_chunks_follow_liger_s_rule_and_checkpointing():
    from peftctl.fast_path import FUSED_LOSS_CHUNK_MEM, fused_loss_chunk_mem, fused_loss_chunk_rows

    assert fused_loss_chunk_mem(True) == 1 and fused_loss_chunk_mem(False) == FUSED_LOSS_CHUNK_MEM == 8
    # liger 0.8.5: next_power_of_2(cdiv(tokens, cdiv(vocab, chunk_mem x hidden))), at most the tokens
    assert fused_loss_chunk_rows(8188, 128256, 4096, 1) == 256
    assert fused_loss_chunk_rows(8188, 128256, 4096, 8) == 2048
    assert fused_loss_chunk_rows(2047, 128256, 4096, 1) == 64
    assert fused_loss_chunk_rows(2047, 128256, 4096, 8) == 512
    assert fused_loss_chunk_rows(8188, 128256, 4096, 32) == 8188  # one chunk: never more than the tokens
    assert fused_loss_chunk_rows(100, 32000, 4096, 8) == 100
    assert fused_loss_chunk_rows(300, 32000, 4096, 1) == 64  # cdiv(300, cdiv(32000, 4096) = 8) = 38 -> 64


def test_the_plan_counts_the_loss_s_chunk_of_logits():
    """Without checkpointing the fused loss takes 2,048-token chunks of an 8B's 8,188 tokens (256 with it): the
    plan's loss component grows by the difference in bf16 logits."""
    from peftctl import plan
    from peftctl.plan.constants import FUSED_LOSS_HIDDEN_COPIES
    from test_plan import LLAMA3_8B, make_recipe, shape_and_setting

    recipe = make_recipe(str(LLAMA3_8B), {"name": "lora", "r": 16, "alpha": 32, "targets": ["q_proj", "v_proj"]},
                         micro_batch_size=4, max_length=2048, checkpointing=False)
    losses = {}
    for checkpointing in (False, True):
        shape, setting = shape_and_setting(recipe, checkpointing, fast_path=True)
        assert setting.fused_loss
        (loss,) = [c for c in plan.estimate(shape, setting, "lora") if c.name == "logits and loss"]
        tokens = 4 * 2048
        chunk = 2048 if not checkpointing else 256
        assert loss.bytes == 2 * (FUSED_LOSS_HIDDEN_COPIES * 4096 * tokens + chunk * 128256) + 4 * tokens
        assert f"{chunk:,d} tokens at a time" in loss.detail
        losses[checkpointing] = loss.bytes
    assert losses[False] - losses[True] == 2 * (2048 - 256) * 128256
