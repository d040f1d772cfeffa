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
